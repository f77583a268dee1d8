//! The one thread that writes the database. It owns the connection and every projection, and
//! applies each batch of events in one transaction together with the checkpoints it moves
//! (`apply.rs`, where "exactly once" lives), on a thread of its own (`thread.rs`), keeping the
//! write-ahead log bounded (`wal.rs`) and saying what it is on (`activity.rs`).

mod activity;
mod apply;
mod open;
pub mod postgres;
mod requests;
mod settle;
mod shadow;
mod sqlite;
mod thread;
mod wal;

use std::collections::BTreeSet;

use rusqlite::{Connection, TransactionBehavior};

pub use postgres::PostgresWriter;
pub use requests::{LeaseReport, LeaseRequest, OperatorChange};
pub use shadow::{rebuilt_projection, schema_objects, shadow_member};
pub use thread::{PendingBatch, WriterHandle, WriterThread};

use crate::config::Synchronous;
use crate::event::Event;
use crate::projection::{ConfiguredProjection, EventTypes};
use crate::store::{self, Checkpoint};
use apply::Members;
use wal::WalPolicy;

/// Events of one feed, in offset order, for some of its projections.
#[derive(Debug)]
pub struct Batch {
    pub feed: String,
    pub projections: Vec<String>,
    pub events: Vec<Event>,
}

/// What a committed batch did.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// The offsets of the batch's events: its first, and the one after its last.
    pub offsets: std::ops::Range<u64>,
    /// The batch's projections, where they stand now and what this batch did to each.
    pub projections: Vec<ProjectionOutcome>,
    /// Projections halted by a poison event (`on_error = "stop"`).
    pub halted: Vec<Halt>,
    /// Event applications (an event applied to two projections counts twice).
    pub applied: usize,
    pub dead_lettered: usize,
}

/// One projection's part of a committed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionOutcome {
    pub projection: String,
    pub checkpoint: Checkpoint,
    /// Events of this batch the projection applied.
    pub applied: usize,
    /// Events of this batch it recorded as dead letters (`on_error = "skip"`).
    pub dead_lettered: usize,
    /// The `created` of the last event this batch moved its checkpoint past, as the feed
    /// wrote it.
    pub last_created: Option<String>,
}

/// A projection stopped at an event it could not apply.
#[derive(Debug, Clone)]
pub struct Halt {
    pub projection: String,
    pub offset: u64,
    pub event_id: String,
    pub event_type: String,
    pub error: String,
    /// The event's payload and other metadata, recorded so that `projector skip` can move it
    /// into the dead letters.
    pub payload: Option<String>,
    pub event_meta: String,
}

/// Why a batch was not committed. Nothing of it was applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("the database failed: {0}")]
    Storage(String),
    #[error("the database failed: {0}: the database's disk is full, or it reached [daemon] max_database_bytes; writes resume once there is room")]
    Full(String),
    #[error(
        "the feed was rewritten: projection {projection:?} applied event {expected} at offset {offset}, but the feed now has {found} there"
    )]
    FeedRewritten {
        projection: String,
        offset: u64,
        expected: String,
        found: String,
    },
    #[error("this daemon no longer holds the lease on feed {0:?}: another daemon applies it now")]
    LeaseLost(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApplyError {
    /// The database failed; a full one says where the space went.
    fn storage(err: rusqlite::Error) -> ApplyError {
        if err.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
            ApplyError::Full(err.to_string())
        } else {
            ApplyError::Storage(err.to_string())
        }
    }

    /// The PostgreSQL server (or the connection to it) failed.
    fn postgres(err: ::postgres::Error) -> ApplyError {
        let message = crate::projection::postgres_message(&err);
        if err.code() == Some(&::postgres::error::SqlState::DISK_FULL) {
            ApplyError::Full(message)
        } else {
            ApplyError::Storage(message)
        }
    }
}

/// A projection as the writer holds it.
struct Slot {
    projection: ConfiguredProjection,
    state: SlotState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Running,
    /// Halted by a poison event (`on_error = "stop"`) until the daemon starts again.
    Halted,
    /// Its definition changed: the old tables are served as they are while a rebuild builds
    /// the new ones.
    Frozen,
    /// A rebuild's shadow that has replaced the live tables.
    Retired,
}

/// Where one projection starts, as read when the writer opened.
#[derive(Debug, Clone)]
pub struct StartingPoint {
    pub projection: String,
    pub feed: String,
    pub event_types: EventTypes,
    pub checkpoint: Checkpoint,
    /// Its events recorded in `projector_dead_letters` so far.
    pub dead_letters: u64,
    /// Not read: its definition changed, and a rebuild replaces its tables.
    pub frozen: bool,
}

/// How the writer treats the database file ([daemon] settings).
#[derive(Debug, Clone, Copy, Default)]
pub struct WriterSettings {
    /// `max_database_bytes`.
    pub max_bytes: Option<u64>,
    pub synchronous: Synchronous,
    /// `page_cache_bytes`; SQLite's default (2 MiB) if none.
    pub page_cache_bytes: Option<u64>,
    /// `database_mode`, for the rebuilds' databases; 0600 if none.
    pub file_mode: Option<u32>,
}

pub struct Writer {
    conn: Connection,
    wal: WalPolicy,
    members: Members,
    /// The rebuilds in progress.
    shadows: Vec<shadow::Shadow>,
    /// The checkpoints read at open. After that the database is the only record of them.
    starting_points: Vec<StartingPoint>,
    /// The feeds paused when the writer opened.
    paused_feeds: BTreeSet<String>,
    /// Counts the rebuilds finished: the daemon then starts its readers again.
    rebuilt: tokio::sync::watch::Sender<u64>,
}

impl Writer {
    pub fn starting_points(&self) -> Vec<StartingPoint> {
        self.starting_points.clone()
    }

    /// Changes each time a rebuild has replaced a projection's tables: its readers must then
    /// start again from the checkpoints.
    pub fn rebuilds_finished(&self) -> tokio::sync::watch::Receiver<u64> {
        self.rebuilt.subscribe()
    }

    pub fn paused_feeds(&self) -> BTreeSet<String> {
        self.paused_feeds.clone()
    }

    /// Moves the writer to its own thread. It runs until every handle is dropped, finishing the
    /// batches already sent.
    pub fn spawn(self) -> std::io::Result<(WriterHandle, WriterThread)> {
        thread::spawn(self)
    }
}

impl thread::WriterStore for Writer {
    fn activity(&self) -> std::sync::Arc<activity::WriterActivity> {
        self.members.activity.clone()
    }

    fn interrupter(&self) -> thread::Interrupter {
        let handle = self.conn.get_interrupt_handle();
        Box::new(move || handle.interrupt())
    }

    fn apply(&mut self, batch: &Batch) -> Result<BatchOutcome, ApplyError> {
        Writer::apply(self, batch)
    }

    fn set_paused(&mut self, feeds: &[String], paused: bool) -> Result<(), ApplyError> {
        let storage = ApplyError::storage;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(storage)?;
        for feed in feeds {
            store::set_paused(&tx, feed, paused).map_err(storage)?;
        }
        tx.commit().map_err(storage)
    }

    fn after_full(&mut self) {
        // The write-ahead log may hold the space the next batch needs.
        let _ = self.wal.truncate(&self.conn);
    }

    fn leases(&mut self, _request: &LeaseRequest) -> Result<LeaseReport, ApplyError> {
        Err(ApplyError::Internal(
            "a SQLite database has one daemon: it has no leases".into(),
        ))
    }

    fn release(&mut self, _feed: &str) -> Result<(), ApplyError> {
        Err(ApplyError::Internal(
            "a SQLite database has one daemon: it has no leases".into(),
        ))
    }

    fn change(
        &mut self,
        _projection: &str,
        _change: OperatorChange,
    ) -> Result<Result<String, String>, ApplyError> {
        Err(ApplyError::Internal(
            "on SQLite an operator's change is made with the engine stopped, not by the writer"
                .into(),
        ))
    }

    fn starting_points_of(&mut self, _feed: &str) -> Result<Vec<StartingPoint>, ApplyError> {
        Err(ApplyError::Internal(
            "a SQLite writer's starting points are read once, at open".into(),
        ))
    }
}

#[cfg(test)]
mod tests;
