//! The SQLite database: opening it with the pragmas a read-model store wants, Projector's own
//! tables and their migrations, checkpoints and dead letters.
//!
//! A checkpoint is written in the same transaction as the projection writes it covers; that is
//! the whole of the exactly-once guarantee, so nothing here commits on its own.
//! `lifecycle.rs` records what changes over a projection's life (its definition, a halt, a
//! rebuild), `dead_letters.rs` the events it could not apply.

pub mod dead_letters;
pub mod lifecycle;
pub mod postgres;

use std::path::Path;
use std::time::Duration;

use crate::config::Synchronous;
use crate::event::PagePlace;
use rusqlite::{
    params, Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior,
};

/// Projector's own schema, oldest first. Append only: never edit or remove a migration, because
/// `user_version` records how many of them a database has run.
const MIGRATIONS: &[&str] = &[
    // 1: checkpoints and dead letters.
    "CREATE TABLE projector_checkpoints (
        projection    TEXT PRIMARY KEY,
        feed          TEXT NOT NULL,
        next_offset   INTEGER NOT NULL,
        last_event_id TEXT,
        updated_at    TEXT NOT NULL
    ) STRICT;
    CREATE TABLE projector_dead_letters (
        id           INTEGER PRIMARY KEY,
        projection   TEXT NOT NULL,
        feed         TEXT NOT NULL,
        event_offset INTEGER NOT NULL,
        event_id     TEXT NOT NULL,
        event_type   TEXT NOT NULL,
        payload      TEXT,
        error        TEXT NOT NULL,
        recorded_at  TEXT NOT NULL
    ) STRICT;
    CREATE INDEX projector_dead_letters_by_projection
        ON projector_dead_letters (projection, event_offset);",
    // 2: paused feeds, so that a pause survives a restart until it is resumed.
    "CREATE TABLE projector_paused_feeds (
        feed      TEXT PRIMARY KEY,
        paused_at TEXT NOT NULL
    ) STRICT;",
    // 3: a projection's life: the definition its tables were built by, where it halted, the
    // rebuilds in progress, and what became of each dead letter.
    "ALTER TABLE projector_checkpoints ADD COLUMN definition_version TEXT;
    ALTER TABLE projector_checkpoints ADD COLUMN definition TEXT;
    ALTER TABLE projector_checkpoints ADD COLUMN schema_objects TEXT;
    ALTER TABLE projector_checkpoints ADD COLUMN halted_offset INTEGER;
    ALTER TABLE projector_checkpoints ADD COLUMN halted_event_id TEXT;
    ALTER TABLE projector_checkpoints ADD COLUMN halted_error TEXT;
    ALTER TABLE projector_checkpoints ADD COLUMN halted_at TEXT;
    ALTER TABLE projector_checkpoints ADD COLUMN halted_event_type TEXT;
    ALTER TABLE projector_checkpoints ADD COLUMN halted_payload TEXT;
    ALTER TABLE projector_checkpoints ADD COLUMN halted_event_meta TEXT;
    ALTER TABLE projector_dead_letters ADD COLUMN event_meta TEXT;
    ALTER TABLE projector_dead_letters ADD COLUMN aggregate TEXT;
    ALTER TABLE projector_dead_letters ADD COLUMN resolution TEXT;
    ALTER TABLE projector_dead_letters ADD COLUMN resolved_at TEXT;
    CREATE INDEX projector_dead_letters_parked
        ON projector_dead_letters (projection, aggregate) WHERE resolution IS NULL;
    CREATE TABLE projector_rebuilds (
        projection         TEXT PRIMARY KEY,
        feed               TEXT NOT NULL,
        definition_version TEXT NOT NULL,
        reason             TEXT NOT NULL,
        started_at         TEXT NOT NULL
    ) STRICT;",
    // 4: on a feed paged by links or cursors, the page a checkpoint's last event is on.
    "ALTER TABLE projector_checkpoints ADD COLUMN page_cursor TEXT;
    ALTER TABLE projector_checkpoints ADD COLUMN page_first_offset INTEGER;",
];

/// How long a writer waits for a lock held by someone else (an operator's shell, a backup).
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a projection stands: the offset of the next event it expects, and the id of the event
/// just before it (to prove, on restart, that the feed still has that event there).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    pub next_offset: u64,
    pub last_event_id: Option<String>,
    /// On a feed paged by links or cursors, the page the event just before it is on; `None`
    /// reads from the feed's first page.
    pub page: Option<PagePlace>,
}

/// A checkpoint's columns, in `checkpoint_at`'s order.
pub const CHECKPOINT_COLUMNS: &str = "next_offset, last_event_id, page_cursor, page_first_offset";

/// One event a projection could not apply under `on_error = "skip"`.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    pub projection: &'a str,
    pub feed: &'a str,
    pub event_offset: u64,
    pub event_id: &'a str,
    pub event_type: &'a str,
    pub payload: Option<String>,
    pub error: String,
    /// The event's other metadata (aggregate, version, created), as JSON, so a retry can
    /// give the projection the event as it was.
    pub event_meta: String,
    /// The aggregate it holds back, when it was parked (`on_error = "park"`).
    pub parks: Option<String>,
}

/// Opens (creating if needed) the database for writing and brings Projector's tables up to date.
pub fn open_writer(path: &Path, synchronous: Synchronous) -> rusqlite::Result<Connection> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        // A missing folder is created, like systemd's StateDirectory; failure shows up in open.
        let _ = crate::files::create_private_folder(parent);
    }
    // Never through a symbolic link: in a folder another user could write to, it would lead
    // anywhere.
    let mut conn =
        Connection::open_with_flags(path, OpenFlags::default() | OpenFlags::SQLITE_OPEN_NOFOLLOW)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // WAL: readers never block the writer and the writer never blocks readers. NORMAL is durable
    // across process crashes in WAL mode; only a power loss can drop the last commits
    // ([daemon] synchronous = "full" for that). Set before the migrations commit anything.
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(
            mode,
            "database did not switch to WAL mode; readers may block the daemon"
        );
    }
    set_synchronous(&conn, synchronous)?;
    conn.pragma_update(None, "foreign_keys", true)?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// Lets the connection's page cache hold up to `bytes`.
pub fn set_page_cache(conn: &Connection, bytes: u64) -> rusqlite::Result<()> {
    // A negative cache_size is in KiB rather than pages.
    let kib = i64::try_from(bytes / 1024).unwrap_or(i64::MAX);
    conn.pragma_update(None, "cache_size", -kib)
}

/// Sets how far each commit is pushed to disk (see [`Synchronous`]).
fn set_synchronous(conn: &Connection, synchronous: Synchronous) -> rusqlite::Result<()> {
    let value = match synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", value)
}

/// Caps the database file at about `max_bytes` (SQLite's `max_page_count`): past it, writes fail
/// as on a full disk. A database already larger keeps its size and cannot grow.
pub fn limit_size(conn: &Connection, max_bytes: u64) -> rusqlite::Result<()> {
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |row| row.get(0))?;
    let pages = (max_bytes / u64::try_from(page_size).unwrap_or(4096).max(512)).max(1);
    conn.pragma_update(None, "max_page_count", offset_to_sql(pages))
}

/// Takes the database's instance lock (`<database>.lock`), so that a second daemon on the same
/// database refuses to start instead of competing with the first. First it makes the database's
/// folder (owner-only) if it is missing, refuses a folder other users can write to, and creates
/// the database file with `mode` if it is missing (SQLite gives its -wal and -shm files the
/// database's mode); the lock file is made with `mode` too, never through a symbolic link.
pub fn lock_instance(database: &Path, mode: u32) -> anyhow::Result<std::fs::File> {
    use anyhow::Context;
    let with_suffix = |suffix: &str| {
        let mut name = database.as_os_str().to_owned();
        name.push(suffix);
        std::path::PathBuf::from(name)
    };
    let path = with_suffix(".lock");
    let folder = match database.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    crate::files::create_private_folder(folder)
        .with_context(|| format!("creating the folder {}", folder.display()))?;
    let companions = [with_suffix("-wal"), with_suffix("-shm"), path.clone()];
    let mut files: Vec<&Path> = companions.iter().map(|p| p.as_path()).collect();
    files.push(database);
    crate::files::check_folder(folder, "the database", &files, false)
        .map_err(anyhow::Error::msg)?;
    let file = crate::files::open_private(&path, mode)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another projector is already running on {} (it holds {})",
            database.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(err)) => {
            return Err(err).with_context(|| format!("locking {}", path.display()))
        }
    }
    let existing = std::fs::symlink_metadata(database).ok();
    match existing {
        None => drop(
            crate::files::open_private(database, mode)
                .with_context(|| format!("creating the database {}", database.display()))?,
        ),
        Some(meta) => {
            use std::os::unix::fs::MetadataExt;
            let loose = meta.mode() & 0o777 & !mode;
            if loose != 0 {
                tracing::warn!(
                    database = %database.display(),
                    "the database's mode is {:04o}, wider than database_mode {mode:04o}: other users may read it (chmod it to the mode you want)",
                    meta.mode() & 0o777
                );
            }
        }
    }
    Ok(file)
}

/// Opens the database read-only, for `projector query` and the demo's progress display.
pub fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(format!(
                "the database is at schema version {version}, newer than this projector knows ({}); upgrade projector",
                MIGRATIONS.len()
            )),
        ));
    }
    for migration in &MIGRATIONS[version..] {
        tx.execute_batch(migration)?;
    }
    tx.pragma_update(None, "user_version", MIGRATIONS.len() as i64)?;
    tx.commit()
}

/// `projection`'s committed checkpoint; inside the writer's transaction, what it has written.
pub fn load_checkpoint(
    conn: &Connection,
    projection: &str,
) -> rusqlite::Result<Option<Checkpoint>> {
    conn.prepare_cached(&format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM projector_checkpoints WHERE projection = ?1"
    ))?
    .query_row([projection], |row| checkpoint_at(row, 0))
    .optional()
}

/// The checkpoint in the CHECKPOINT_COLUMNS of `row` from column `first` on.
pub fn checkpoint_at(row: &rusqlite::Row, first: usize) -> rusqlite::Result<Checkpoint> {
    let cursor: Option<String> = row.get(first + 2)?;
    let page_first: Option<i64> = row.get(first + 3)?;
    Ok(Checkpoint {
        next_offset: row.get::<_, i64>(first)?.try_into().unwrap_or(0),
        last_event_id: row.get(first + 1)?,
        page: cursor.zip(page_first).map(|(cursor, first)| PagePlace {
            cursor,
            first_offset: first.try_into().unwrap_or(0),
        }),
    })
}

/// Every projection's checkpoint, by projection name (for readers: the demo, status, tests).
pub fn read_checkpoints(conn: &Connection) -> rusqlite::Result<Vec<(String, Checkpoint)>> {
    let mut statement = conn.prepare_cached(&format!(
        "SELECT projection, {CHECKPOINT_COLUMNS} FROM projector_checkpoints ORDER BY projection"
    ))?;
    let rows = statement.query_map([], |row| Ok((row.get(0)?, checkpoint_at(row, 1)?)))?;
    rows.collect()
}

pub fn save_checkpoint(
    tx: &Transaction,
    projection: &str,
    feed: &str,
    checkpoint: &Checkpoint,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO projector_checkpoints
             (projection, feed, next_offset, last_event_id, page_cursor, page_first_offset,
              updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
         ON CONFLICT (projection) DO UPDATE SET
             feed = excluded.feed, next_offset = excluded.next_offset,
             last_event_id = excluded.last_event_id, page_cursor = excluded.page_cursor,
             page_first_offset = excluded.page_first_offset, updated_at = excluded.updated_at,
             halted_offset = NULL, halted_event_id = NULL, halted_error = NULL, halted_at = NULL,
             halted_event_type = NULL, halted_payload = NULL, halted_event_meta = NULL",
    )?
    .execute(params![
        projection,
        feed,
        offset_to_sql(checkpoint.next_offset),
        checkpoint.last_event_id,
        checkpoint.page.as_ref().map(|page| &page.cursor),
        checkpoint
            .page
            .as_ref()
            .map(|page| offset_to_sql(page.first_offset)),
    ])?;
    Ok(())
}

pub fn insert_dead_letter(tx: &Transaction, letter: &DeadLetter) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO projector_dead_letters
             (projection, feed, event_offset, event_id, event_type, payload, error, event_meta,
              aggregate, recorded_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
    )?
    .execute(params![
        letter.projection,
        letter.feed,
        offset_to_sql(letter.event_offset),
        letter.event_id,
        letter.event_type,
        letter.payload,
        letter.error,
        letter.event_meta,
        letter.parks
    ])?;
    Ok(())
}

/// How many dead letters of `projection` wait for an operator (neither retried nor discarded).
pub fn count_dead_letters(conn: &Connection, projection: &str) -> rusqlite::Result<u64> {
    let count: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM projector_dead_letters WHERE projection = ?1 AND resolution IS NULL",
        )?
        .query_row([projection], |row| row.get(0))?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// Records `feed` as paused or resumed. Pausing a paused feed keeps its first `paused_at`.
pub fn set_paused(tx: &Transaction, feed: &str, paused: bool) -> rusqlite::Result<()> {
    if paused {
        tx.prepare_cached(
            "INSERT INTO projector_paused_feeds (feed, paused_at)
             VALUES (?1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
             ON CONFLICT (feed) DO NOTHING",
        )?
        .execute([feed])?;
    } else {
        tx.prepare_cached("DELETE FROM projector_paused_feeds WHERE feed = ?1")?
            .execute([feed])?;
    }
    Ok(())
}

/// The feeds paused and not resumed since, by name.
pub fn paused_feeds(conn: &Connection) -> rusqlite::Result<std::collections::BTreeSet<String>> {
    let mut statement = conn.prepare_cached("SELECT feed FROM projector_paused_feeds")?;
    let rows = statement.query_map([], |row| row.get(0))?;
    rows.collect()
}

/// SQLite integers are signed; a feed offset never gets near 2^63.
pub fn offset_to_sql(offset: u64) -> i64 {
    i64::try_from(offset).unwrap_or(i64::MAX)
}

/// True for errors of the database itself (disk full, I/O, locks): the batch is retried later.
/// Anything else a projection's SQL raises (a constraint, a bad value) is the event's fault.
pub fn is_storage_failure(err: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    match err.sqlite_error_code() {
        Some(code) => matches!(
            code,
            DiskFull
                | SystemIoFailure
                | DatabaseBusy
                | DatabaseLocked
                | OutOfMemory
                | CannotOpen
                | DatabaseCorrupt
                | NotADatabase
                | ReadOnly
                | FileLockingProtocolFailed
                | OperationInterrupted
        ),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_idempotent_and_checkpoints_round_trip() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("nested/db.sqlite");
        drop(open_writer(&path, Synchronous::Normal)?);
        let mut conn = open_writer(&path, Synchronous::Normal)?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        assert_eq!(version, MIGRATIONS.len() as i64);
        let tx = conn.transaction()?;
        assert_eq!(load_checkpoint(&tx, "p")?, None);
        let checkpoint = Checkpoint {
            next_offset: 42,
            last_event_id: Some("e41".into()),
            page: None,
        };
        save_checkpoint(&tx, "p", "bank", &checkpoint)?;
        assert_eq!(load_checkpoint(&tx, "p")?, Some(checkpoint));
        let paged = Checkpoint {
            next_offset: 45,
            last_event_id: Some("e44".into()),
            page: Some(PagePlace {
                cursor: "https://feed.example/events?after=40".into(),
                first_offset: 40,
            }),
        };
        save_checkpoint(&tx, "p", "bank", &paged)?;
        assert_eq!(read_checkpoints(&tx)?, vec![("p".to_string(), paged)]);
        Ok(tx.commit()?)
    }

    #[test]
    fn pausing_is_idempotent_and_resuming_forgets() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut conn = open_writer(&dir.path().join("db.sqlite"), Synchronous::Normal)?;
        let tx = conn.transaction()?;
        set_paused(&tx, "bank", true)?;
        set_paused(&tx, "bank", true)?;
        set_paused(&tx, "other", true)?;
        set_paused(&tx, "other", false)?;
        set_paused(&tx, "never-paused", false)?;
        tx.commit()?;
        assert_eq!(paused_feeds(&conn)?, ["bank".to_string()].into());
        Ok(())
    }

    #[test]
    fn a_second_instance_lock_is_refused_until_the_first_is_dropped() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("db");
        let first = lock_instance(&path, 0o600)?;
        let message = lock_instance(&path, 0o600).err().map(|e| format!("{e:#}"));
        assert!(message.is_some_and(|m| m.contains("already running")));
        drop(first);
        assert!(lock_instance(&path, 0o600).is_ok());
        Ok(())
    }

    #[test]
    fn a_newer_database_is_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("db.sqlite");
        open_writer(&path, Synchronous::Normal)?.pragma_update(None, "user_version", 99)?;
        let err = open_writer(&path, Synchronous::Normal)
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("newer")));
        Ok(())
    }
}
