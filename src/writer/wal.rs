//! Keeping the write-ahead log bounded. SQLite's automatic checkpoints cannot restart the log
//! while readers keep using it, so with long readers coming and going it would grow for ever.
//! Past a size, the writer checkpoints and truncates it, waiting briefly for the readers of the
//! moment to end. If one holds on, the writer goes on without, and tries again a little later with
//! a longer wait; the retries space out while it fails, since each wait holds up the batches.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::store;

/// The write-ahead log's size past which the writer truncates it (4 times SQLite's automatic
/// checkpoint size).
const WAL_TRUNCATE_BYTES: u64 = 16 << 20;
/// How long the truncation waits for the readers of the moment, at first and at most: readers
/// that start while it copies the log hold it up too, so after a failure it waits longer.
const WAL_TRUNCATE_WAIT: Duration = Duration::from_millis(200);
const WAL_TRUNCATE_MAX_WAIT: Duration = Duration::from_secs(2);
/// How long after a truncation a reader prevented the writer tries again, at first and at
/// most: a reader that holds on for ever must not stall the writes.
const WAL_TRUNCATE_RETRY: Duration = Duration::from_millis(250);
const WAL_TRUNCATE_MAX_RETRY: Duration = Duration::from_secs(30);

/// When the writer last truncated the log, and how long it waits next time.
pub(super) struct WalPolicy {
    path: PathBuf,
    /// When a blocked truncation was last logged (once a minute at most).
    warned_at: Option<Instant>,
    /// No truncation before this, after one a reader prevented.
    truncate_after: Option<Instant>,
    /// How long the next truncation waits for readers.
    wait: Duration,
    /// How long after a failed truncation the next one comes.
    retry: Duration,
}

impl WalPolicy {
    /// The policy for the database at `database`.
    pub(super) fn new(database: &Path) -> WalPolicy {
        let mut path = database.as_os_str().to_owned();
        path.push("-wal");
        WalPolicy {
            path: path.into(),
            warned_at: None,
            truncate_after: None,
            wait: WAL_TRUNCATE_WAIT,
            retry: WAL_TRUNCATE_RETRY,
        }
    }

    /// After a commit: truncates the log if it has grown past its bound and a recent attempt
    /// does not hold the next one back.
    pub(super) fn keep_bounded(&mut self, conn: &Connection) {
        let now = Instant::now();
        if self.size() < WAL_TRUNCATE_BYTES || self.truncate_after.is_some_and(|at| now < at) {
            return;
        }
        let waited = self.wait;
        if self.truncate(conn) {
            self.retry = WAL_TRUNCATE_RETRY;
        } else {
            self.truncate_after = Some(now + self.retry);
            // Longer waits first; only once they are at their longest do the retries space out.
            if waited >= WAL_TRUNCATE_MAX_WAIT {
                self.retry = (self.retry * 2).min(WAL_TRUNCATE_MAX_RETRY);
            }
        }
    }

    fn size(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// Checkpoints and truncates the log; false if a reader kept it from doing so.
    pub(super) fn truncate(&mut self, conn: &Connection) -> bool {
        let wal_size = self.size();
        let outcome = conn.busy_timeout(self.wait).and_then(|()| {
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                row.get::<_, i64>(0)
            })
        });
        let _ = conn.busy_timeout(store::BUSY_TIMEOUT);
        match outcome {
            Ok(0) => {
                // The wait that worked is kept: the readers are likely to stay alike.
                tracing::debug!(wal_size, "write-ahead log checkpointed and truncated");
                true
            }
            Ok(_) => {
                self.wait = (self.wait * 2).min(WAL_TRUNCATE_MAX_WAIT);
                let now = Instant::now();
                let due = self
                    .warned_at
                    .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(60));
                if due {
                    self.warned_at = Some(now);
                    tracing::warn!(wal_size, "readers keep the write-ahead log in use, so it cannot be truncated yet and grows until a moment without them (a read transaction held open for long does this)");
                }
                false
            }
            Err(err) => {
                tracing::warn!(wal_size, "checkpointing the write-ahead log failed: {err}");
                false
            }
        }
    }
}
