//! What the database records of a projection's life besides its checkpoint: the definition its
//! tables were built by (version, source, the schema objects it made), where it halted, and the
//! rebuild in progress. `projector projections` reads all of it without a running daemon.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::offset_to_sql;

/// A table, index, view or trigger a projection's setup creates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaObject {
    /// As `sqlite_master` says: `table`, `index`, `view` or `trigger`.
    pub kind: String,
    pub name: String,
}

/// The definition a projection's tables were built by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    pub version: String,
    /// Where it comes from, for people (`file projections/x.toml`, `module x`).
    pub source: String,
    pub objects: Vec<SchemaObject>,
}

/// The definition recorded for `projection`; None for a projection never recorded, or one
/// recorded before definitions were (its version is then unknown).
pub fn recorded_definition(
    conn: &Connection,
    projection: &str,
) -> rusqlite::Result<Option<Definition>> {
    let row: Option<(Option<String>, Option<String>, Option<String>)> = conn
        .prepare_cached(
            "SELECT definition_version, definition, schema_objects FROM projector_checkpoints
             WHERE projection = ?1",
        )?
        .query_row([projection], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?;
    Ok(match row {
        Some((Some(version), source, objects)) => Some(Definition {
            version,
            source: source.unwrap_or_default(),
            objects: objects
                .and_then(|json| serde_json::from_str(&json).ok())
                .unwrap_or_default(),
        }),
        _ => None,
    })
}

/// Records the definition `projection`'s tables are built by (its checkpoint row exists).
pub fn record_definition(
    conn: &Connection,
    projection: &str,
    definition: &Definition,
) -> rusqlite::Result<()> {
    let objects = serde_json::to_string(&definition.objects).unwrap_or_else(|_| "[]".into());
    conn.prepare_cached(
        "UPDATE projector_checkpoints
         SET definition_version = ?2, definition = ?3, schema_objects = ?4
         WHERE projection = ?1",
    )?
    .execute(params![
        projection,
        definition.version,
        definition.source,
        objects
    ])?;
    Ok(())
}

/// Where a projection halted (`on_error = "stop"`), until its checkpoint moves again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HaltRecord {
    pub offset: u64,
    pub event_id: String,
    pub error: String,
    pub at: String,
}

/// The event a projection halted on, as recorded with the halt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaltedEvent {
    pub offset: u64,
    pub event_id: String,
    pub event_type: String,
    pub payload: Option<String>,
    pub event_meta: String,
    pub error: String,
}

pub fn record_halt(
    conn: &Connection,
    projection: &str,
    event: &HaltedEvent,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE projector_checkpoints
         SET halted_offset = ?2, halted_event_id = ?3, halted_error = ?4,
             halted_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
             halted_event_type = ?5, halted_payload = ?6, halted_event_meta = ?7
         WHERE projection = ?1",
    )?
    .execute(params![
        projection,
        offset_to_sql(event.offset),
        event.event_id,
        event.error,
        event.event_type,
        event.payload,
        event.event_meta
    ])?;
    Ok(())
}

/// The event `projection` is halted on, if it is halted.
pub fn halted_event(conn: &Connection, projection: &str) -> rusqlite::Result<Option<HaltedEvent>> {
    conn.query_row(
        "SELECT halted_offset, halted_event_id, halted_event_type, halted_payload,
                halted_event_meta, halted_error
         FROM projector_checkpoints WHERE projection = ?1 AND halted_offset IS NOT NULL",
        [projection],
        |row| {
            Ok(HaltedEvent {
                offset: row.get::<_, i64>(0)?.try_into().unwrap_or(0),
                event_id: row.get::<_, Option<String>>(1)?.unwrap_or_default(),
                event_type: row.get::<_, Option<String>>(2)?.unwrap_or_default(),
                payload: row.get(3)?,
                event_meta: row.get::<_, Option<String>>(4)?.unwrap_or_default(),
                error: row.get::<_, Option<String>>(5)?.unwrap_or_default(),
            })
        },
    )
    .optional()
}

/// Skipping the event a projection halted on, as every store makes it: the dead letter it
/// becomes, and the checkpoint past it.
pub struct Skip<'a> {
    pub letter: super::DeadLetter<'a>,
    pub past: super::Checkpoint,
}

impl<'a> Skip<'a> {
    /// Skips `halted`, on which `projection` (of `feed`, at `checkpoint`) halted; why not if
    /// the checkpoint has moved since.
    pub fn of(
        projection: &'a str,
        feed: &'a str,
        halted: &'a HaltedEvent,
        checkpoint: super::Checkpoint,
    ) -> Result<Skip<'a>, String> {
        if checkpoint.next_offset != halted.offset {
            return Err(format!(
                "{projection} halted at offset {} but its checkpoint is at {} now: nothing skipped",
                halted.offset, checkpoint.next_offset
            ));
        }
        Ok(Skip {
            letter: super::DeadLetter {
                projection,
                feed,
                event_offset: halted.offset,
                event_id: &halted.event_id,
                event_type: &halted.event_type,
                payload: halted.payload.clone(),
                error: format!("skipped by an operator; it failed with: {}", halted.error),
                event_meta: halted.event_meta.clone(),
                parks: None,
            },
            past: super::Checkpoint {
                next_offset: halted.offset + 1,
                last_event_id: Some(halted.event_id.clone()),
                // The page before the halted event: the reader reads on from there past it.
                page: checkpoint.page,
            },
        })
    }

    /// What was done, once the letter is dead letter `id`.
    pub fn said(&self, id: i64) -> String {
        let projection = self.letter.projection;
        format!(
            "event {} (offset {}) of {projection} moved into the dead letters as dead letter {id}; {projection} goes on from offset {}",
            crate::shown::escaped(self.letter.event_id),
            self.letter.event_offset,
            self.past.next_offset
        )
    }
}

/// `checkpoint` moved to `offset` by an operator: no event id to prove, and the page it is on
/// kept only if it lies before the new checkpoint (else the reader starts from the first page).
pub fn reset_to(checkpoint: &super::Checkpoint, offset: u64) -> super::Checkpoint {
    super::Checkpoint {
        next_offset: offset,
        last_event_id: None,
        page: checkpoint
            .page
            .clone()
            .filter(|page| page.first_offset < offset),
    }
}

/// A projection as the database records it.
#[derive(Debug, Clone)]
pub struct ProjectionRecord {
    pub projection: String,
    pub feed: String,
    pub next_offset: u64,
    pub last_event_id: Option<String>,
    pub updated_at: String,
    pub version: Option<String>,
    pub source: Option<String>,
    pub halted: Option<HaltRecord>,
}

/// Every projection the database has a checkpoint for, by name.
pub fn projection_records(conn: &Connection) -> rusqlite::Result<Vec<ProjectionRecord>> {
    let mut statement = conn.prepare(
        "SELECT projection, feed, next_offset, last_event_id, updated_at, definition_version,
                definition, halted_offset, halted_event_id, halted_error, halted_at
         FROM projector_checkpoints ORDER BY projection",
    )?;
    let rows = statement.query_map([], |row| {
        let halted_offset: Option<i64> = row.get(7)?;
        Ok(ProjectionRecord {
            projection: row.get(0)?,
            feed: row.get(1)?,
            next_offset: row.get::<_, i64>(2)?.try_into().unwrap_or(0),
            last_event_id: row.get(3)?,
            updated_at: row.get(4)?,
            version: row.get(5)?,
            source: row.get(6)?,
            halted: match halted_offset {
                Some(offset) => Some(HaltRecord {
                    offset: offset.try_into().unwrap_or(0),
                    event_id: row.get::<_, Option<String>>(8)?.unwrap_or_default(),
                    error: row.get::<_, Option<String>>(9)?.unwrap_or_default(),
                    at: row.get::<_, Option<String>>(10)?.unwrap_or_default(),
                }),
                None => None,
            },
        })
    })?;
    rows.collect()
}

/// The reason of a rebuild an operator asked for starts with this.
pub const ASKED: &str = "asked for";

/// A rebuild in progress: the projection is replayed from offset 0 into a shadow database
/// (`shadow_path`) until it has caught up with the live checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuild {
    pub projection: String,
    pub feed: String,
    /// The definition the shadow is built by.
    pub version: String,
    /// Why: asked for by an operator, or the definition changed.
    pub reason: String,
    pub started_at: String,
}

pub fn rebuilds(conn: &Connection) -> rusqlite::Result<Vec<Rebuild>> {
    let mut statement = conn.prepare(
        "SELECT projection, feed, definition_version, reason, started_at
         FROM projector_rebuilds ORDER BY projection",
    )?;
    let rows = statement.query_map([], |row| {
        Ok(Rebuild {
            projection: row.get(0)?,
            feed: row.get(1)?,
            version: row.get(2)?,
            reason: row.get(3)?,
            started_at: row.get(4)?,
        })
    })?;
    rows.collect()
}

/// Records a rebuild as started (replacing one of the projection that was in progress).
pub fn start_rebuild(
    conn: &Connection,
    projection: &str,
    feed: &str,
    version: &str,
    reason: &str,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO projector_rebuilds
             (projection, feed, definition_version, reason, started_at)
         VALUES (?1, ?2, ?3, ?4, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
    )?
    .execute(params![projection, feed, version, reason])?;
    Ok(())
}

pub fn end_rebuild(conn: &Connection, projection: &str) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM projector_rebuilds WHERE projection = ?1")?
        .execute([projection])?;
    Ok(())
}

/// Where the shadow of `projection`'s rebuild is built: beside the database, so that it is on
/// the same disk and under the same folder rules.
pub fn shadow_path(database: &Path, projection: &str) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(format!(".rebuild-{projection}"));
    PathBuf::from(name)
}

/// Deletes a shadow database with its write-ahead log and shared memory files.
pub fn remove_shadow(path: &Path) -> std::io::Result<()> {
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::remove_file(PathBuf::from(name)) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
    }
    Ok(())
}

/// The shadow files beside `database` that no rebuild of `rebuilding` owns (left by a crash
/// between a rebuild's swap and the removal of its shadow).
pub fn stale_shadows(database: &Path, rebuilding: &[String]) -> Vec<PathBuf> {
    let (Some(folder), Some(file)) = (database.parent(), database.file_name()) else {
        return Vec::new();
    };
    let folder = if folder.as_os_str().is_empty() {
        Path::new(".")
    } else {
        folder
    };
    let prefix = format!("{}.rebuild-", file.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let projection = name.strip_prefix(&prefix)?;
            let owned = rebuilding.iter().any(|p| p == projection);
            (!owned && !projection.ends_with("-wal") && !projection.ends_with("-shm"))
                .then(|| folder.join(&name))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;
    use crate::store::{open_writer, save_checkpoint, Checkpoint};

    #[test]
    fn a_definition_a_halt_and_a_rebuild_are_recorded_and_a_move_clears_the_halt(
    ) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut conn = open_writer(&dir.path().join("db"), Synchronous::Normal)?;
        let tx = conn.transaction()?;
        save_checkpoint(&tx, "p", "bank", &Checkpoint::default())?;
        assert_eq!(recorded_definition(&tx, "p")?, None);
        let definition = Definition {
            version: "v1".into(),
            source: "module p".into(),
            objects: vec![SchemaObject {
                kind: "table".into(),
                name: "t".into(),
            }],
        };
        record_definition(&tx, "p", &definition)?;
        assert_eq!(recorded_definition(&tx, "p")?, Some(definition));
        let event = HaltedEvent {
            offset: 7,
            event_id: "e7".into(),
            event_type: "t".into(),
            payload: Some("{}".into()),
            event_meta: "{}".into(),
            error: "boom".into(),
        };
        record_halt(&tx, "p", &event)?;
        assert_eq!(halted_event(&tx, "p")?, Some(event));
        let halted = projection_records(&tx)?.remove(0).halted;
        assert_eq!(
            halted.map(|h| (h.offset, h.error)),
            Some((7, "boom".into()))
        );
        let moved = Checkpoint {
            next_offset: 8,
            last_event_id: Some("e7".into()),
            page: None,
        };
        save_checkpoint(&tx, "p", "bank", &moved)?;
        assert!(projection_records(&tx)?[0].halted.is_none());
        assert_eq!(halted_event(&tx, "p")?, None);
        start_rebuild(&tx, "p", "bank", "v2", "asked")?;
        assert_eq!(rebuilds(&tx)?.len(), 1);
        end_rebuild(&tx, "p")?;
        assert!(rebuilds(&tx)?.is_empty());
        Ok(tx.commit()?)
    }

    #[test]
    fn only_shadows_no_rebuild_owns_are_stale() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let database = dir.path().join("db");
        for name in ["db.rebuild-a", "db.rebuild-a-wal", "db.rebuild-b", "other"] {
            std::fs::write(dir.path().join(name), b"")?;
        }
        let stale = stale_shadows(&database, &["b".to_string()]);
        assert_eq!(stale, vec![dir.path().join("db.rebuild-a")]);
        remove_shadow(&stale[0])?;
        assert!(!dir.path().join("db.rebuild-a-wal").exists());
        Ok(())
    }
}
