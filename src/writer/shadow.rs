//! Rebuilds without downtime. A projection being rebuilt is replayed from offset 0 into a
//! shadow database of its own (`<database>.rebuild-NAME`), by the same definition running on
//! another connection, while the live tables go on being queried (and updated, unless the
//! definition changed). Once the shadow has caught up with the live checkpoint, its tables
//! replace the live ones and the checkpoint moves, in one transaction of the live database:
//! a reader sees the old model or the new one, whole.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, TransactionBehavior};

use crate::projection::{ConfiguredProjection, ProjectionError};
use crate::store::lifecycle::{self, Definition, SchemaObject};
use crate::store::{self, Checkpoint};

/// The name the reader and the writer know a rebuild's shadow by: `@` is never in a
/// projection's name, so it cannot be another projection's.
pub fn shadow_member(projection: &str) -> String {
    format!("{projection}@rebuild")
}

/// The projection whose shadow `member` is, if it is one.
pub fn rebuilt_projection(member: &str) -> Option<&str> {
    member.strip_suffix("@rebuild")
}

/// A rebuild's shadow database, open for writing.
pub(super) struct Shadow {
    /// The live projection's name.
    pub projection: String,
    pub member: String,
    pub feed: String,
    pub conn: Connection,
    pub path: PathBuf,
    /// The definition the shadow is built by.
    pub version: String,
}

/// The schema objects `projection`'s setup creates, found by running it on an empty scratch
/// database.
pub fn schema_objects(projection: &ConfiguredProjection) -> anyhow::Result<Vec<SchemaObject>> {
    let mut scratch = Connection::open_in_memory()?;
    let tx = scratch.transaction()?;
    projection.projection.setup(&tx).map_err(|err| match err {
        ProjectionError::Sql(err) => anyhow::Error::from(err),
        other => anyhow::anyhow!("{other}"),
    })?;
    objects_in(&tx, "main")
}

/// The objects of `schema` that are not Projector's own or SQLite's, tables first. A virtual
/// table (a full-text index) is of kind `virtual`; the tables it keeps its data in are its
/// own, made and dropped with it, and not listed.
fn objects_in(conn: &Connection, schema: &str) -> anyhow::Result<Vec<SchemaObject>> {
    let mut statement = conn.prepare(&format!(
        "SELECT CASE WHEN list.type = 'virtual' THEN 'virtual' ELSE master.type END, master.name
         FROM {schema}.sqlite_master AS master
         LEFT JOIN pragma_table_list AS list
           ON list.schema = '{schema}' AND list.name = master.name
         WHERE master.sql IS NOT NULL
           AND coalesce(list.type, '') != 'shadow'
           AND master.name NOT LIKE 'projector\\_%' ESCAPE '\\'
           AND master.name NOT LIKE 'sqlite\\_%' ESCAPE '\\'
         ORDER BY master.type != 'table', master.rowid"
    ))?;
    let rows = statement.query_map([], |row| {
        Ok(SchemaObject {
            kind: row.get(0)?,
            name: row.get(1)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

impl Shadow {
    /// Opens (creating with the database's mode if it is missing) the shadow of `projection`'s
    /// rebuild, with the main database's settings, and sets up its tables.
    pub fn open(
        database: &Path,
        projection: &ConfiguredProjection,
        version: &str,
        settings: &super::WriterSettings,
    ) -> anyhow::Result<Shadow> {
        use anyhow::Context;
        let path = lifecycle::shadow_path(database, &projection.name);
        drop(
            crate::files::open_private(&path, settings.file_mode.unwrap_or(0o600))
                .with_context(|| format!("creating the rebuild's database {}", path.display()))?,
        );
        let mut conn = store::open_writer(&path, settings.synchronous)
            .with_context(|| format!("opening the rebuild's database {}", path.display()))?;
        if let Some(bytes) = settings.page_cache_bytes {
            store::set_page_cache(&conn, bytes)?;
        }
        let member = shadow_member(&projection.name);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        projection.projection.setup(&tx).with_context(|| {
            format!("setting up projection {:?} to rebuild it", projection.name)
        })?;
        if store::load_checkpoint(&tx, &member)?.is_none() {
            store::save_checkpoint(&tx, &member, &projection.feed, &Checkpoint::default())?;
        }
        tx.commit()?;
        Ok(Shadow {
            projection: projection.name.clone(),
            member,
            feed: projection.feed.clone(),
            conn,
            path,
            version: version.to_string(),
        })
    }

    /// Where the shadow stands.
    pub fn checkpoint(&self) -> rusqlite::Result<Checkpoint> {
        store::load_checkpoint(&self.conn, &self.member).map(Option::unwrap_or_default)
    }

    /// The dead letters the rebuild recorded so far.
    pub fn dead_letters(&self) -> rusqlite::Result<u64> {
        store::count_dead_letters(&self.conn, &self.member)
    }

    /// Replaces the live projection's tables with the shadow's, moves its checkpoint to the
    /// shadow's and ends the rebuild, in one transaction of `live`; or does nothing if the
    /// shadow is still behind the live checkpoint. `source` says where the definition comes
    /// from. True if it swapped.
    pub fn swap_into(&self, live: &mut Connection, source: &str) -> anyhow::Result<bool> {
        let path = self
            .path
            .to_str()
            .ok_or_else(|| anyhow::anyhow!("{} is not UTF-8", self.path.display()))?;
        live.execute("ATTACH DATABASE ?1 AS projector_shadow", [path])?;
        let swapped = self.swap_attached(live, source);
        let detached = live.execute("DETACH DATABASE projector_shadow", []);
        let swapped = swapped?;
        detached?;
        Ok(swapped)
    }

    fn swap_attached(&self, live: &mut Connection, source: &str) -> anyhow::Result<bool> {
        let tx = live.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let shadow_checkpoint = tx
            .query_row(
                &format!(
                    "SELECT {} FROM projector_shadow.projector_checkpoints WHERE projection = ?1",
                    store::CHECKPOINT_COLUMNS
                ),
                [&self.member],
                |row| store::checkpoint_at(row, 0),
            )
            .unwrap_or_default();
        let live_checkpoint = store::load_checkpoint(&tx, &self.projection)?.unwrap_or_default();
        if shadow_checkpoint.next_offset < live_checkpoint.next_offset {
            return Ok(false);
        }
        let recorded = lifecycle::recorded_definition(&tx, &self.projection)?
            .map(|definition| definition.objects)
            .unwrap_or_default();
        let objects = objects_in(&tx, "projector_shadow")?;

        // Out with the live objects, the old definition's and any the new one would collide
        // with: views and triggers first, then tables (taking their indexes), then indexes.
        let mut doomed: Vec<(String, String)> = Vec::new();
        for name in recorded.iter().chain(&objects).map(|o| &o.name) {
            let kind: Option<String> = tx
                .query_row(
                    "SELECT type FROM main.sqlite_master WHERE name = ?1",
                    [name],
                    |row| row.get(0),
                )
                .ok();
            if let Some(kind) = kind {
                if !doomed.iter().any(|(_, n)| n == name) {
                    doomed.push((kind, name.clone()));
                }
            }
        }
        for rank in ["view", "trigger", "table", "index"] {
            for (kind, name) in doomed.iter().filter(|(kind, _)| kind == rank) {
                tx.execute_batch(&format!(
                    "DROP {} IF EXISTS main.{}",
                    kind.to_uppercase(),
                    quoted(name)
                ))?;
            }
        }

        // In with the shadow's: tables and their rows, then the rest, built on the rows.
        let sql_of = |name: &str| -> rusqlite::Result<String> {
            tx.query_row(
                "SELECT sql FROM projector_shadow.sqlite_master WHERE name = ?1",
                [name],
                |row| row.get(0),
            )
        };
        // A virtual table's own tables come with it, and its rows are indexed as they go in.
        for object in objects
            .iter()
            .filter(|o| o.kind == "table" || o.kind == "virtual")
        {
            tx.execute_batch(&sql_of(&object.name)?)?;
            let name = quoted(&object.name);
            tx.execute_batch(&format!(
                "INSERT INTO main.{name} SELECT * FROM projector_shadow.{name}"
            ))?;
        }
        let shadow_has_sequences: bool = tx.query_row(
            "SELECT count(*) > 0 FROM projector_shadow.sqlite_master WHERE name = 'sqlite_sequence'",
            [],
            |row| row.get(0),
        )?;
        if shadow_has_sequences {
            for object in objects.iter().filter(|o| o.kind == "table") {
                tx.execute(
                    "DELETE FROM main.sqlite_sequence WHERE name = ?1",
                    [&object.name],
                )
                .ok();
                tx.execute(
                    "INSERT INTO main.sqlite_sequence (name, seq)
                     SELECT name, seq FROM projector_shadow.sqlite_sequence WHERE name = ?1",
                    [&object.name],
                )?;
            }
        }
        for object in objects
            .iter()
            .filter(|o| o.kind != "table" && o.kind != "virtual")
        {
            tx.execute_batch(&sql_of(&object.name)?)?;
        }

        // The rebuild's dead letters are the projection's now; the old model's are moot.
        tx.execute(
            "DELETE FROM main.projector_dead_letters WHERE projection = ?1",
            [&self.projection],
        )?;
        tx.execute(
            "INSERT INTO main.projector_dead_letters
                 (projection, feed, event_offset, event_id, event_type, payload, error,
                  recorded_at, event_meta, aggregate, resolution, resolved_at)
             SELECT ?1, feed, event_offset, event_id, event_type, payload, error,
                    recorded_at, event_meta, aggregate, resolution, resolved_at
             FROM projector_shadow.projector_dead_letters WHERE projection = ?2 ORDER BY id",
            params![self.projection, self.member],
        )?;
        store::save_checkpoint(&tx, &self.projection, &self.feed, &shadow_checkpoint)?;
        lifecycle::record_definition(
            &tx,
            &self.projection,
            &Definition {
                version: self.version.clone(),
                source: source.to_string(),
                objects,
            },
        )?;
        lifecycle::end_rebuild(&tx, &self.projection)?;
        tx.commit()?;
        Ok(true)
    }
}

/// An SQL identifier, quoted.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
