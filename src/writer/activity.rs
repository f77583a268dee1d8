//! What the writer thread is doing right now: which feed's batch, since when, and which
//! projection and event it is applying. Read by `status` (a slow batch) and the systemd watchdog
//! (a writer stuck on one job); written by the writer at each job and each event.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::control::protocol::SlowBatch;

/// What the writer thread is on, for `status` and the watchdog: the job under a mutex (taken
/// once a job), the projection and the event in atomics (stored once an event applies).
pub(super) struct WriterActivity {
    /// When the job in progress started, and the feed of its batch; None while idle.
    job: Mutex<Option<(Instant, Option<String>)>>,
    /// The slot of the projection applying an event; NOT_APPLYING otherwise.
    projection: AtomicUsize,
    offset: AtomicU64,
    /// The projections' names, by slot.
    names: Vec<String>,
}

const NOT_APPLYING: usize = usize::MAX;

impl WriterActivity {
    pub(super) fn new(names: Vec<String>) -> WriterActivity {
        WriterActivity {
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

    pub(super) fn start_job(&self, feed: Option<String>) {
        *self.job() = Some((Instant::now(), feed));
    }

    pub(super) fn end_job(&self) {
        self.committing();
        *self.job() = None;
    }

    pub(super) fn applying(&self, slot: usize, offset: u64) {
        self.offset.store(offset, Ordering::Relaxed);
        self.projection.store(slot, Ordering::Relaxed);
    }

    pub(super) fn committing(&self) {
        self.projection.store(NOT_APPLYING, Ordering::Relaxed);
    }

    /// How long the writer has been on its current job (zero when idle): a writer stuck for
    /// longer than the systemd watchdog interval is reported by no longer pinging it.
    pub fn busy_for(&self) -> Duration {
        self.job()
            .as_ref()
            .map_or(Duration::ZERO, |(since, _)| since.elapsed())
    }

    /// The batch the writer has been on for `at_least` or longer, with when it started (which
    /// tells one batch from the next): its feed, and the projection and event it is applying
    /// (the two read apart from each other: good for a report, which matters when the writer
    /// stays on one event).
    pub fn slow_batch(&self, at_least: Duration) -> Option<(Instant, SlowBatch)> {
        let (since, feed) = self.job().clone()?;
        let feed = feed?;
        let elapsed = since.elapsed();
        if elapsed < at_least {
            return None;
        }
        let slot = self.projection.load(Ordering::Relaxed);
        let applying = self.names.get(slot);
        let slow = SlowBatch {
            feed,
            seconds: elapsed.as_secs(),
            projection: applying.cloned(),
            offset: applying.map(|_| self.offset.load(Ordering::Relaxed)),
        };
        Some((since, slow))
    }
}
