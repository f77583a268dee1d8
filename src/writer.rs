//! The one thread that writes the database. It owns the connection and every projection, and
//! applies each batch of events in one transaction together with the checkpoints it moves.
//!
//! This is where "exactly once" lives: an event is applied to a projection only if its offset is
//! exactly that projection's next offset, and the new checkpoint commits in the same transaction
//! as the projection's writes. Passing the event just before a checkpoint, the writer also checks
//! that its id is the one the checkpoint recorded: if not, the feed was rewritten, and nothing of
//! the batch is applied.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, InterruptHandle, Transaction, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use crate::config::{OnError, Synchronous};
use crate::control::protocol::SlowBatch;
use crate::event::Event;
use crate::projection::{ConfiguredProjection, ProjectionError};
use crate::store::{self, Checkpoint, DeadLetter};

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
    /// The batch's projections and where they stand now.
    pub checkpoints: Vec<(String, Checkpoint)>,
    /// Projections halted by a poison event (`on_error = "stop"`).
    pub halted: Vec<Halt>,
    /// The events in the batch.
    pub events: usize,
    /// Event applications (an event applied to two projections counts twice).
    pub applied: usize,
    pub dead_lettered: usize,
}

/// A projection stopped at an event it could not apply.
#[derive(Debug, Clone)]
pub struct Halt {
    pub projection: String,
    pub offset: u64,
    pub event_id: String,
    pub event_type: String,
    pub error: String,
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
}

/// A projection as the writer holds it.
struct Slot {
    projection: ConfiguredProjection,
    halted: bool,
}

/// Where one projection starts, as read when the writer opened.
#[derive(Debug, Clone)]
pub struct StartingPoint {
    pub projection: String,
    pub feed: String,
    pub event_types: Vec<String>,
    pub checkpoint: Checkpoint,
}

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

/// How the writer treats the database file ([daemon] settings).
#[derive(Debug, Clone, Copy, Default)]
pub struct WriterSettings {
    /// `max_database_bytes`.
    pub max_bytes: Option<u64>,
    pub synchronous: Synchronous,
    /// `page_cache_bytes`; SQLite's default (2 MiB) if none.
    pub page_cache_bytes: Option<u64>,
}

pub struct Writer {
    conn: Connection,
    wal_path: std::path::PathBuf,
    /// When a blocked truncation was last logged (once a minute at most).
    wal_warned_at: Option<Instant>,
    /// No truncation before this, after one a reader prevented.
    wal_truncate_after: Option<Instant>,
    /// How long the next truncation waits for readers.
    wal_truncate_wait: Duration,
    /// How long after a failed truncation the next one comes.
    wal_truncate_retry: Duration,
    slots: Vec<Slot>,
    by_name: HashMap<String, usize>,
    /// The checkpoints read at open. After that the database is the only record of them.
    starting_points: Vec<StartingPoint>,
    /// The feeds paused when the writer opened.
    paused_feeds: BTreeSet<String>,
    progress: Arc<Progress>,
    /// Feeds whose last batch had a poison event: their next batch starts with savepoints.
    poisoned_feeds: HashSet<String>,
}

impl Writer {
    /// Opens the database, sets up every projection's tables and reads their checkpoints and the
    /// paused feeds, all in one transaction. The caller holds the instance lock
    /// ([`store::lock_instance`]).
    pub fn open(
        path: &Path,
        settings: WriterSettings,
        projections: Vec<ConfiguredProjection>,
    ) -> anyhow::Result<Writer> {
        use anyhow::Context;
        let mut conn = store::open_writer(path, settings.synchronous)
            .with_context(|| format!("opening database {}", path.display()))?;
        if let Some(bytes) = settings.page_cache_bytes {
            store::set_page_cache(&conn, bytes)
                .with_context(|| format!("sizing the page cache of {}", path.display()))?;
        }
        if let Some(max_bytes) = settings.max_bytes {
            store::limit_size(&conn, max_bytes)
                .with_context(|| format!("limiting the size of {}", path.display()))?;
        }
        let mut slots = Vec::with_capacity(projections.len());
        let mut starting_points = Vec::with_capacity(projections.len());
        let paused_feeds;
        {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for projection in projections {
                projection
                    .projection
                    .setup(&tx)
                    .with_context(|| format!("setting up projection {:?}", projection.name))?;
                let checkpoint = match store::load_checkpoint(&tx, &projection.name)? {
                    Some(checkpoint) => checkpoint,
                    None => {
                        let fresh = Checkpoint::default();
                        store::save_checkpoint(&tx, &projection.name, &projection.feed, &fresh)?;
                        fresh
                    }
                };
                starting_points.push(StartingPoint {
                    projection: projection.name.clone(),
                    feed: projection.feed.clone(),
                    event_types: projection.event_types.iter().cloned().collect(),
                    checkpoint,
                });
                slots.push(Slot {
                    projection,
                    halted: false,
                });
            }
            paused_feeds = store::paused_feeds(&tx)?;
            tx.commit()?;
        }
        let by_name = slots
            .iter()
            .enumerate()
            .map(|(index, slot)| (slot.projection.name.clone(), index))
            .collect();
        let mut wal_path = path.as_os_str().to_owned();
        wal_path.push("-wal");
        let progress = Arc::new(Progress::new(
            slots
                .iter()
                .map(|slot| slot.projection.name.clone())
                .collect(),
        ));
        Ok(Writer {
            conn,
            wal_path: wal_path.into(),
            wal_warned_at: None,
            wal_truncate_after: None,
            wal_truncate_wait: WAL_TRUNCATE_WAIT,
            wal_truncate_retry: WAL_TRUNCATE_RETRY,
            slots,
            by_name,
            starting_points,
            paused_feeds,
            progress,
            poisoned_feeds: HashSet::new(),
        })
    }

    pub fn starting_points(&self) -> Vec<StartingPoint> {
        self.starting_points.clone()
    }

    pub fn paused_feeds(&self) -> BTreeSet<String> {
        self.paused_feeds.clone()
    }

    /// Moves the writer to its own thread. It runs until every handle is dropped, finishing the
    /// batches already sent.
    pub fn spawn(self) -> std::io::Result<(WriterHandle, WriterThread)> {
        let (jobs, receiver) = mpsc::channel(16);
        let progress = self.progress.clone();
        let interrupt = self.conn.get_interrupt_handle();
        let join = std::thread::Builder::new()
            .name("projector-writer".into())
            .spawn(move || self.run(receiver))?;
        Ok((
            WriterHandle { jobs, progress },
            WriterThread { join, interrupt },
        ))
    }

    fn run(mut self, mut jobs: mpsc::Receiver<Job>) {
        while let Some(job) = jobs.blocking_recv() {
            let feed = match &job {
                Job::Apply { batch, .. } => Some(batch.feed.clone()),
                Job::SetPaused { .. } => None,
            };
            self.progress.start_job(feed);
            self.run_job(job);
            self.progress.end_job();
        }
    }

    /// Runs one job. The sender may have gone (shutdown); the job is committed or not either way.
    fn run_job(&mut self, job: Job) {
        match job {
            Job::Apply { batch, reply } => {
                // A panicking projection is a bug, but it must not take the other feeds down:
                // its transaction rolls back as it unwinds, and the batch fails.
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| self.apply(&batch)))
                    .unwrap_or_else(|panic| {
                        let message = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "unknown panic".into());
                        Err(ApplyError::Internal(format!(
                            "a projection panicked: {message}"
                        )))
                    });
                if matches!(result, Err(ApplyError::Full(_))) {
                    // The write-ahead log may hold the space the next batch needs.
                    let _ = self.truncate_wal();
                }
                let _ = reply.send(result);
            }
            Job::SetPaused {
                feeds,
                paused,
                reply,
            } => {
                let _ = reply.send(self.set_paused(&feeds, paused));
            }
        }
    }

    /// SQLite's automatic checkpoints cannot restart the write-ahead log while readers keep
    /// using it, so with long readers coming and going it would grow for ever. Past a size, the
    /// log is checkpointed and truncated, waiting briefly for the readers of the moment to end.
    /// If one holds on, the writer goes on without, and tries again a little later with a longer
    /// wait; the retries space out while it fails, since each wait holds up the batches.
    fn keep_wal_bounded(&mut self) {
        let now = Instant::now();
        if self.wal_size() < WAL_TRUNCATE_BYTES
            || self.wal_truncate_after.is_some_and(|at| now < at)
        {
            return;
        }
        let waited = self.wal_truncate_wait;
        if self.truncate_wal() {
            self.wal_truncate_retry = WAL_TRUNCATE_RETRY;
        } else {
            self.wal_truncate_after = Some(now + self.wal_truncate_retry);
            // Longer waits first; only once they are at their longest do the retries space out.
            if waited >= WAL_TRUNCATE_MAX_WAIT {
                self.wal_truncate_retry = (self.wal_truncate_retry * 2).min(WAL_TRUNCATE_MAX_RETRY);
            }
        }
    }

    fn wal_size(&self) -> u64 {
        std::fs::metadata(&self.wal_path).map_or(0, |m| m.len())
    }

    /// Checkpoints and truncates the write-ahead log; false if a reader kept it from doing so.
    fn truncate_wal(&mut self) -> bool {
        let wal_size = self.wal_size();
        let outcome = self
            .conn
            .busy_timeout(self.wal_truncate_wait)
            .and_then(|()| {
                self.conn
                    .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                        row.get::<_, i64>(0)
                    })
            });
        let _ = self.conn.busy_timeout(store::BUSY_TIMEOUT);
        match outcome {
            Ok(0) => {
                // The wait that worked is kept: the readers are likely to stay alike.
                tracing::debug!(wal_size, "write-ahead log checkpointed and truncated");
                true
            }
            Ok(_) => {
                self.wal_truncate_wait = (self.wal_truncate_wait * 2).min(WAL_TRUNCATE_MAX_WAIT);
                let now = Instant::now();
                let due = self
                    .wal_warned_at
                    .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(60));
                if due {
                    self.wal_warned_at = Some(now);
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

    /// Records feeds as paused or resumed, in one transaction.
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

    /// Applies a batch in one transaction. On error nothing is committed and no in-memory
    /// checkpoint moves.
    ///
    /// Most batches apply cleanly, so the first attempt runs without a savepoint per event
    /// (they cost about a tenth of the writer's time). An event that fails there may leave part
    /// of its writes behind, which only a savepoint undoes: the batch is then rolled back whole
    /// and applied again with a savepoint around each event. Poison events tend to come in
    /// runs, so after such a batch the feed's next batches start with savepoints, until one
    /// applies without a failure: a feed full of poison events is applied once, not twice.
    pub fn apply(&mut self, batch: &Batch) -> Result<BatchOutcome, ApplyError> {
        if self.poisoned_feeds.contains(&batch.feed) {
            let outcome = self.apply_with_savepoints(batch)?;
            if outcome.halted.is_empty() && outcome.dead_lettered == 0 {
                self.poisoned_feeds.remove(&batch.feed);
            }
            return Ok(outcome);
        }
        match self.apply_with(batch, Savepoints::Off) {
            Ok(outcome) => Ok(outcome),
            Err(Attempt::Failed(err)) => Err(err),
            Err(Attempt::NeedsSavepoints) => {
                let outcome = self.apply_with_savepoints(batch)?;
                self.poisoned_feeds.insert(batch.feed.clone());
                Ok(outcome)
            }
        }
    }

    fn apply_with_savepoints(&mut self, batch: &Batch) -> Result<BatchOutcome, ApplyError> {
        self.apply_with(batch, Savepoints::On)
            .map_err(|attempt| match attempt {
                Attempt::Failed(err) => err,
                Attempt::NeedsSavepoints => {
                    ApplyError::Internal("an event failed although it ran in a savepoint".into())
                }
            })
    }

    fn apply_with(
        &mut self,
        batch: &Batch,
        savepoints: Savepoints,
    ) -> Result<BatchOutcome, Attempt> {
        let members: Vec<usize> = batch
            .projections
            .iter()
            .filter_map(|name| self.by_name.get(name).copied())
            .filter(|&index| !self.slots[index].halted)
            .collect();
        let mut halts: Vec<Option<Halt>> = vec![None; members.len()];
        let mut outcome = BatchOutcome {
            events: batch.events.len(),
            ..BatchOutcome::default()
        };

        let storage = ApplyError::storage;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(storage)?;
        // The checkpoints as committed, read under the write lock: the database, not this
        // thread's memory, decides what is applied, so even a second writer cannot double-apply.
        let committed: Vec<Checkpoint> = members
            .iter()
            .map(|&index| {
                store::load_checkpoint(&tx, &self.slots[index].projection.name)
                    .map(Option::unwrap_or_default)
            })
            .collect::<Result<_, _>>()
            .map_err(storage)?;
        let mut checkpoints = committed.clone();
        for event in &batch.events {
            for (k, &index) in members.iter().enumerate() {
                let slot = &self.slots[index];
                let checkpoint = &mut checkpoints[k];
                if halts[k].is_some() {
                    continue;
                }
                if event.offset < checkpoint.next_offset {
                    if event.offset + 1 == checkpoint.next_offset
                        && checkpoint.last_event_id.as_deref() != Some(event.event_id.as_str())
                    {
                        return Err(ApplyError::FeedRewritten {
                            projection: slot.projection.name.clone(),
                            offset: event.offset,
                            expected: checkpoint.last_event_id.clone().unwrap_or_default(),
                            found: event.event_id.clone(),
                        }
                        .into());
                    }
                    continue;
                }
                if event.offset > checkpoint.next_offset {
                    return Err(ApplyError::Internal(format!(
                        "projection {:?} expects offset {} but the batch jumps to {}",
                        slot.projection.name, checkpoint.next_offset, event.offset
                    ))
                    .into());
                }
                if slot.projection.handles(&event.event_type) {
                    self.progress.applying(index, event.offset);
                    match apply_one(&tx, &slot.projection, event, savepoints).map_err(storage)? {
                        Ok(()) => outcome.applied += 1,
                        Err(ProjectionError::Sql(err)) if store::is_storage_failure(&err) => {
                            return Err(ApplyError::storage(err).into())
                        }
                        // Dropping the transaction rolls it back.
                        Err(_) if savepoints == Savepoints::Off => {
                            return Err(Attempt::NeedsSavepoints)
                        }
                        Err(err) => match slot.projection.on_error {
                            OnError::Stop => {
                                halts[k] = Some(Halt {
                                    projection: slot.projection.name.clone(),
                                    offset: event.offset,
                                    event_id: event.event_id.clone(),
                                    event_type: event.event_type.clone(),
                                    error: err.to_string(),
                                });
                                continue;
                            }
                            OnError::Skip => {
                                store::insert_dead_letter(
                                    &tx,
                                    &DeadLetter {
                                        projection: &slot.projection.name,
                                        feed: &batch.feed,
                                        event_offset: event.offset,
                                        event_id: &event.event_id,
                                        event_type: &event.event_type,
                                        payload: event
                                            .payload
                                            .as_ref()
                                            .map(|p| p.as_str().to_string()),
                                        error: err.to_string(),
                                    },
                                )
                                .map_err(storage)?;
                                outcome.dead_lettered += 1;
                            }
                        },
                    }
                }
                checkpoint.next_offset = event.offset + 1;
                checkpoint.last_event_id = Some(event.event_id.clone());
            }
        }
        self.progress.committing();
        for (k, &index) in members.iter().enumerate() {
            let slot = &self.slots[index];
            if checkpoints[k] != committed[k] {
                store::save_checkpoint(&tx, &slot.projection.name, &batch.feed, &checkpoints[k])
                    .map_err(storage)?;
            }
        }
        tx.commit().map_err(storage)?;
        self.keep_wal_bounded();

        for ((index, checkpoint), halt) in members.into_iter().zip(checkpoints).zip(halts) {
            let slot = &mut self.slots[index];
            outcome
                .checkpoints
                .push((slot.projection.name.clone(), checkpoint));
            if let Some(halt) = halt {
                slot.halted = true;
                outcome.halted.push(halt);
            }
        }
        Ok(outcome)
    }
}

/// Whether each event runs in a savepoint of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Savepoints {
    Off,
    On,
}

/// Why an attempt at a batch did not commit.
enum Attempt {
    Failed(ApplyError),
    /// An event failed without a savepoint to undo its writes.
    NeedsSavepoints,
}

impl From<ApplyError> for Attempt {
    fn from(err: ApplyError) -> Attempt {
        Attempt::Failed(err)
    }
}

/// Applies one event to one projection; with savepoints, inside one, so that a failing event
/// leaves none of its writes behind. The outer error is the database failing the savepoint
/// itself.
fn apply_one(
    tx: &Transaction,
    projection: &ConfiguredProjection,
    event: &Event,
    savepoints: Savepoints,
) -> rusqlite::Result<Result<(), ProjectionError>> {
    if savepoints == Savepoints::Off {
        return Ok(projection.projection.apply(tx, event));
    }
    tx.prepare_cached("SAVEPOINT projector_event")?
        .execute([])?;
    let result = projection.projection.apply(tx, event);
    if let Err(ProjectionError::Sql(err)) = &result {
        if store::is_storage_failure(err) {
            // SQLite may already have rolled the whole transaction back (a full disk, an I/O
            // error), taking the savepoint with it: the batch fails as a whole, with this error.
            return Ok(result);
        }
    }
    if result.is_err() {
        tx.prepare_cached("ROLLBACK TO projector_event")?
            .execute([])?;
    }
    tx.prepare_cached("RELEASE projector_event")?.execute([])?;
    Ok(result)
}

enum Job {
    Apply {
        batch: Batch,
        reply: oneshot::Sender<Result<BatchOutcome, ApplyError>>,
    },
    SetPaused {
        feeds: Vec<String>,
        paused: bool,
        reply: oneshot::Sender<Result<(), ApplyError>>,
    },
}

/// The writer's thread, for whoever stops it.
pub struct WriterThread {
    pub join: JoinHandle<()>,
    interrupt: InterruptHandle,
}

impl WriterThread {
    /// Makes the statement the writer is running fail, so its batch rolls back whole (an
    /// interrupted statement is a storage failure, never the event's fault). Between
    /// statements it does nothing.
    pub fn interrupt(&self) {
        self.interrupt.interrupt();
    }
}

/// What the writer thread is on, for `status` and the watchdog: the job under a mutex (taken
/// once a job), the projection and the event in atomics (stored once an event applies).
struct Progress {
    /// When the job in progress started, and the feed of its batch; None while idle.
    job: Mutex<Option<(Instant, Option<String>)>>,
    /// The slot of the projection applying an event; NOT_APPLYING otherwise.
    projection: AtomicUsize,
    offset: AtomicU64,
    /// The projections' names, by slot.
    names: Vec<String>,
}

const NOT_APPLYING: usize = usize::MAX;

impl Progress {
    fn new(names: Vec<String>) -> Progress {
        Progress {
            job: Mutex::new(None),
            projection: AtomicUsize::new(NOT_APPLYING),
            offset: AtomicU64::new(0),
            names,
        }
    }

    fn job(&self) -> std::sync::MutexGuard<'_, Option<(Instant, Option<String>)>> {
        self.job
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn start_job(&self, feed: Option<String>) {
        *self.job() = Some((Instant::now(), feed));
    }

    fn end_job(&self) {
        self.committing();
        *self.job() = None;
    }

    fn applying(&self, slot: usize, offset: u64) {
        self.offset.store(offset, Ordering::Relaxed);
        self.projection.store(slot, Ordering::Relaxed);
    }

    fn committing(&self) {
        self.projection.store(NOT_APPLYING, Ordering::Relaxed);
    }
}

/// Sends batches to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct WriterHandle {
    jobs: mpsc::Sender<Job>,
    progress: Arc<Progress>,
}

/// A batch handed to the writer, whose outcome is awaited later (so the next page can be
/// fetched meanwhile).
pub struct PendingBatch {
    reply: oneshot::Receiver<Result<BatchOutcome, ApplyError>>,
}

impl WriterHandle {
    /// How long the writer has been on its current job (zero when idle): a writer stuck for
    /// longer than the systemd watchdog interval is reported by no longer pinging it.
    pub fn busy_for(&self) -> Duration {
        self.progress
            .job()
            .as_ref()
            .map_or(Duration::ZERO, |(since, _)| since.elapsed())
    }

    /// The batch the writer has been on for `at_least` or longer, with when it started (which
    /// tells one batch from the next): its feed, and the projection and event it is applying
    /// (the two read apart from each other: good for a report, which matters when the writer
    /// stays on one event).
    pub fn slow_batch(&self, at_least: Duration) -> Option<(Instant, SlowBatch)> {
        let (since, feed) = self.progress.job().clone()?;
        let feed = feed?;
        let elapsed = since.elapsed();
        if elapsed < at_least {
            return None;
        }
        let slot = self.progress.projection.load(Ordering::Relaxed);
        let applying = self.progress.names.get(slot);
        let slow = SlowBatch {
            feed,
            seconds: elapsed.as_secs(),
            projection: applying.cloned(),
            offset: applying.map(|_| self.progress.offset.load(Ordering::Relaxed)),
        };
        Some((since, slow))
    }

    pub async fn submit(&self, batch: Batch) -> PendingBatch {
        let (reply, receiver) = oneshot::channel();
        // If the writer is gone, the reply sender is dropped with the job and `outcome` says so.
        let _ = self.jobs.send(Job::Apply { batch, reply }).await;
        PendingBatch { reply: receiver }
    }

    /// Records `feeds` as paused (or resumed) once the batches sent before have committed.
    pub async fn set_paused(&self, feeds: Vec<String>, paused: bool) -> Result<(), ApplyError> {
        let (reply, receiver) = oneshot::channel();
        let job = Job::SetPaused {
            feeds,
            paused,
            reply,
        };
        let _ = self.jobs.send(job).await;
        receiver
            .await
            .unwrap_or_else(|_| Err(ApplyError::Internal("the database writer stopped".into())))
    }
}

impl PendingBatch {
    /// Waits for the commit. Not to be awaited again once it has returned.
    pub async fn outcome(&mut self) -> Result<BatchOutcome, ApplyError> {
        (&mut self.reply)
            .await
            .unwrap_or_else(|_| Err(ApplyError::Internal("the database writer stopped".into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::Projection;
    use serde_json::json;

    /// Sums `amount` into one row per projection; refuses negative amounts.
    struct Summer(&'static str);

    impl Projection for Summer {
        fn event_types(&self) -> Vec<String> {
            vec!["add".into()]
        }
        fn setup(&self, tx: &Transaction) -> Result<(), ProjectionError> {
            tx.execute_batch(&format!(
                "CREATE TABLE IF NOT EXISTS {0} (total INTEGER NOT NULL, applied INTEGER NOT NULL);
                 INSERT INTO {0} SELECT 0, 0 WHERE NOT EXISTS (SELECT 1 FROM {0});",
                self.0
            ))?;
            Ok(())
        }
        fn apply(&self, tx: &Transaction, event: &Event) -> Result<(), ProjectionError> {
            #[derive(serde::Deserialize)]
            struct Add {
                amount: i64,
            }
            let add: Add = event.decode()?;
            tx.execute(
                &format!(
                    "UPDATE {} SET total = total + ?1, applied = applied + 1",
                    self.0
                ),
                [add.amount],
            )?;
            if add.amount < 0 {
                return Err(ProjectionError::Rejected("negative".into()));
            }
            Ok(())
        }
    }

    fn configured(name: &'static str, on_error: OnError) -> ConfiguredProjection {
        ConfiguredProjection {
            name: name.into(),
            feed: "f".into(),
            on_error,
            event_types: HashSet::from(["add".to_string()]),
            projection: Box::new(Summer(name)),
        }
    }

    fn event(offset: u64, event_type: &str, amount: i64) -> Event {
        Event {
            offset,
            event_id: format!("id-{offset}"),
            event_type: event_type.into(),
            aggregate_id: String::new(),
            aggregate_name: String::new(),
            aggregate_version: 0,
            created: String::new(),
            payload: Some(json!({ "amount": amount }).into()),
        }
    }

    fn batch(events: Vec<Event>) -> Batch {
        Batch {
            feed: "f".into(),
            projections: vec!["a".into(), "b".into()],
            events,
        }
    }

    fn total(path: &Path, table: &str) -> (i64, i64) {
        let conn = store::open_reader(path).unwrap_or_else(|e| panic!("{e}"));
        conn.query_row(&format!("SELECT total, applied FROM {table}"), [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The committed next offsets of `a` and `b`.
    fn committed(path: &Path) -> Vec<u64> {
        let conn = store::open_reader(path).unwrap_or_else(|e| panic!("{e}"));
        let checkpoints = store::read_checkpoints(&conn).unwrap_or_else(|e| panic!("{e}"));
        checkpoints.iter().map(|(_, c)| c.next_offset).collect()
    }

    fn open(path: &Path, b_on_error: OnError) -> Writer {
        Writer::open(
            path,
            WriterSettings::default(),
            vec![configured("a", OnError::Stop), configured("b", b_on_error)],
        )
        .unwrap_or_else(|e| panic!("{e:#}"))
    }

    #[test]
    fn replayed_events_are_not_applied_twice_even_after_reopening() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("db");
        let mut writer = open(&path, OnError::Stop);
        writer.apply(&batch(vec![event(0, "add", 1), event(1, "skip-me", 0)]))?;
        drop(writer);
        let mut writer = open(&path, OnError::Stop);
        assert_eq!(writer.starting_points()[0].checkpoint.next_offset, 2);
        // The same events again, then new ones: only the new ones count.
        let outcome = writer.apply(&batch(vec![
            event(1, "skip-me", 0),
            event(2, "add", 10),
            event(3, "add", 100),
        ]))?;
        assert_eq!(outcome.applied, 4);
        assert_eq!(total(&path, "a"), (111, 3));
        assert_eq!(total(&path, "b"), (111, 3));
        Ok(())
    }

    #[test]
    fn a_poison_event_halts_stop_and_dead_letters_skip() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("db");
        let mut writer = open(&path, OnError::Skip);
        let outcome = writer.apply(&batch(vec![
            event(0, "add", 1),
            event(1, "add", -5),
            event(2, "add", 2),
        ]))?;
        assert_eq!(outcome.halted.len(), 1);
        assert_eq!(outcome.halted[0].projection, "a");
        assert_eq!(outcome.halted[0].offset, 1);
        assert_eq!(outcome.dead_lettered, 1);
        // `a` stopped before the poison event, none of whose writes survive anywhere.
        assert_eq!(total(&path, "a"), (1, 1));
        assert_eq!(total(&path, "b"), (3, 2));
        assert_eq!(committed(&path), [1, 3]);
        let conn = store::open_reader(&path)?;
        let (offset, error): (i64, String) = conn.query_row(
            "SELECT event_offset, error FROM projector_dead_letters WHERE projection = 'b'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        assert_eq!(offset, 1);
        assert!(error.contains("negative"), "{error}");
        Ok(())
    }

    /// Rejects negative amounts, counting every call, rolled back or not.
    struct Counting(Arc<AtomicUsize>);

    impl Projection for Counting {
        fn event_types(&self) -> Vec<String> {
            vec!["add".into()]
        }
        fn setup(&self, _: &Transaction) -> Result<(), ProjectionError> {
            Ok(())
        }
        fn apply(&self, _: &Transaction, event: &Event) -> Result<(), ProjectionError> {
            self.0.fetch_add(1, Ordering::Relaxed);
            #[derive(serde::Deserialize)]
            struct Add {
                amount: i64,
            }
            match event.decode::<Add>()?.amount {
                amount if amount < 0 => Err(ProjectionError::Rejected("negative".into())),
                _ => Ok(()),
            }
        }
    }

    #[test]
    fn after_a_batch_with_a_poison_event_the_next_ones_start_with_savepoints_until_one_is_clean(
    ) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let calls = Arc::new(AtomicUsize::new(0));
        let mut writer = Writer::open(
            &dir.path().join("db"),
            WriterSettings::default(),
            vec![ConfiguredProjection {
                name: "counting".into(),
                feed: "f".into(),
                on_error: OnError::Skip,
                event_types: HashSet::from(["add".to_string()]),
                projection: Box::new(Counting(calls.clone())),
            }],
        )?;
        let mut offset = 0;
        let mut apply = |amounts: &[i64]| -> anyhow::Result<usize> {
            let events = amounts
                .iter()
                .map(|&amount| {
                    offset += 1;
                    event(offset - 1, "add", amount)
                })
                .collect();
            let before = calls.load(Ordering::Relaxed);
            writer.apply(&Batch {
                feed: "f".into(),
                projections: vec!["counting".into()],
                events,
            })?;
            Ok(calls.load(Ordering::Relaxed) - before)
        };
        // Up to the poison event without savepoints, then all three with them.
        assert_eq!(apply(&[1, -1, 1])?, 2 + 3);
        // With savepoints from the start: once each.
        assert_eq!(apply(&[1, -1, 1])?, 3);
        // Still with savepoints; this batch is clean, so the next starts without.
        assert_eq!(apply(&[1, 1])?, 2);
        assert_eq!(apply(&[-1, 1])?, 1 + 2);
        Ok(())
    }

    #[test]
    fn a_rewritten_feed_is_refused_whole() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("db");
        let mut writer = open(&path, OnError::Stop);
        writer.apply(&batch(vec![event(0, "add", 1), event(1, "add", 2)]))?;
        let mut replaced = event(1, "add", 2);
        replaced.event_id = "someone-else".into();
        let result = writer.apply(&batch(vec![replaced, event(2, "add", 4)]));
        assert!(
            matches!(&result, Err(ApplyError::FeedRewritten { offset: 1, .. })),
            "{result:?}"
        );
        assert_eq!(total(&path, "a"), (3, 2));
        assert_eq!(committed(&path)[0], 2);
        Ok(())
    }

    #[test]
    fn the_committed_checkpoint_decides_not_the_writers_memory() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("db");
        let mut writer = open(&path, OnError::Stop);
        // Another writer commits behind this one's back (here: the checkpoints moved on).
        let mut conn = store::open_writer(&path, Synchronous::Normal)?;
        let tx = conn.transaction()?;
        for name in ["a", "b"] {
            let moved = Checkpoint {
                next_offset: 1,
                last_event_id: Some("id-0".into()),
            };
            store::save_checkpoint(&tx, name, "f", &moved)?;
        }
        tx.commit()?;
        let outcome = writer.apply(&batch(vec![event(0, "add", 1), event(1, "add", 2)]))?;
        assert_eq!(outcome.applied, 2, "only offset 1, for a and b");
        assert_eq!(total(&path, "a"), (2, 1));
        Ok(())
    }

    #[test]
    fn a_gap_is_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut writer = open(&dir.path().join("db"), OnError::Stop);
        let result = writer.apply(&batch(vec![event(5, "add", 1)]));
        assert!(matches!(result, Err(ApplyError::Internal(_))), "{result:?}");
        Ok(())
    }

    #[test]
    fn synchronous_is_normal_unless_full_is_asked_for() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("db");
        let synchronous = |writer: &Writer| -> rusqlite::Result<i64> {
            writer
                .conn
                .query_row("PRAGMA synchronous", [], |row| row.get(0))
        };
        // SQLite's numbers: 1 is NORMAL, 2 is FULL.
        assert_eq!(synchronous(&open(&path, OnError::Stop))?, 1);
        let full = WriterSettings {
            synchronous: Synchronous::Full,
            ..WriterSettings::default()
        };
        assert_eq!(synchronous(&Writer::open(&path, full, Vec::new())?)?, 2);
        Ok(())
    }

    #[test]
    fn the_page_cache_is_sized_as_configured() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let settings = WriterSettings {
            page_cache_bytes: Some(12 << 20),
            ..WriterSettings::default()
        };
        let writer = Writer::open(&dir.path().join("db"), settings, Vec::new())?;
        let cache_size: i64 = writer
            .conn
            .query_row("PRAGMA cache_size", [], |row| row.get(0))?;
        // Negative: KiB.
        assert_eq!(cache_size, -12 * 1024);
        Ok(())
    }
}
