//! The writer's thread: it owns the connection and runs the jobs the readers and the supervisor
//! send it, one at a time, in the order sent. Handles to it are cheap to clone; it ends once the
//! last one is dropped, after finishing the jobs already sent.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::activity::WriterActivity;
use super::requests::{LeaseReport, LeaseRequest, OperatorChange};
use super::{ApplyError, Batch, BatchOutcome, StartingPoint};
use crate::control::protocol::SlowBatch;

/// A store's writer, as its thread runs it.
pub(super) trait WriterStore: Send + 'static {
    fn activity(&self) -> Arc<WriterActivity>;
    /// What makes the statement running fail (a stop past its timeout).
    fn interrupter(&self) -> Interrupter;
    fn apply(&mut self, batch: &Batch) -> Result<BatchOutcome, ApplyError>;
    /// Records feeds as paused or resumed, in one transaction.
    fn set_paused(&mut self, feeds: &[String], paused: bool) -> Result<(), ApplyError>;
    /// After a batch failed for want of room: frees what the store can.
    fn after_full(&mut self) {}
    /// Keeps this daemon's session alive and takes the leases it may: see [`LeaseRequest`].
    fn leases(&mut self, request: &LeaseRequest) -> Result<LeaseReport, ApplyError>;
    /// Gives `feed`'s lease back, once its readers have stopped.
    fn release(&mut self, feed: &str) -> Result<(), ApplyError>;
    /// Where `feed`'s projections stand now, as committed (by whichever daemon).
    fn starting_points_of(&mut self, feed: &str) -> Result<Vec<StartingPoint>, ApplyError>;
    /// Makes an operator's `change` to `projection` where the store's writer makes it itself
    /// (PostgreSQL): what was done, or (the inner error) why not.
    fn change(
        &mut self,
        projection: &str,
        change: OperatorChange,
    ) -> Result<Result<String, String>, ApplyError>;
}

/// Makes the writer's current statement fail.
pub(super) type Interrupter = Box<dyn Fn() + Send + Sync>;

/// Moves `store`'s writer to its own thread. It runs until every handle is dropped, finishing
/// the batches already sent.
pub(super) fn spawn(store: impl WriterStore) -> std::io::Result<(WriterHandle, WriterThread)> {
    let (jobs, receiver) = mpsc::channel(16);
    let activity = store.activity();
    let interrupt = store.interrupter();
    let join = std::thread::Builder::new()
        .name("projector-writer".into())
        .spawn(move || run(store, receiver))?;
    Ok((
        WriterHandle { jobs, activity },
        WriterThread { join, interrupt },
    ))
}

fn run(mut store: impl WriterStore, mut jobs: mpsc::Receiver<Job>) {
    let activity = store.activity();
    while let Some(job) = jobs.blocking_recv() {
        let feed = match &job {
            Job::Apply { batch, .. } => Some(batch.feed.clone()),
            _ => None,
        };
        activity.start_job(feed);
        run_job(&mut store, job);
        activity.end_job();
    }
}

/// Runs one job. The sender may have gone (shutdown); the job is committed or not either way.
fn run_job(store: &mut impl WriterStore, job: Job) {
    match job {
        Job::Apply { batch, reply } => {
            let started = Instant::now();
            // A panicking projection is a bug, but it must not take the other feeds down: its
            // transaction rolls back as it unwinds, and the batch fails.
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| store.apply(&batch)))
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
            if result.is_ok() {
                crate::metrics::metrics().batch(
                    &batch.feed,
                    started.elapsed().as_secs_f64(),
                    batch.events.len(),
                );
            }
            if matches!(result, Err(ApplyError::Full(_))) {
                store.after_full();
            }
            let _ = reply.send(result);
        }
        Job::SetPaused {
            feeds,
            paused,
            reply,
        } => {
            let _ = reply.send(store.set_paused(&feeds, paused));
        }
        Job::Leases { request, reply } => {
            let _ = reply.send(store.leases(&request));
        }
        Job::Release { feed, reply } => {
            let _ = reply.send(store.release(&feed));
        }
        Job::StartingPoints { feed, reply } => {
            let _ = reply.send(store.starting_points_of(&feed));
        }
        Job::Change {
            projection,
            change,
            reply,
        } => {
            let _ = reply.send(store.change(&projection, change));
        }
    }
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
    Leases {
        request: LeaseRequest,
        reply: oneshot::Sender<Result<LeaseReport, ApplyError>>,
    },
    Release {
        feed: String,
        reply: oneshot::Sender<Result<(), ApplyError>>,
    },
    StartingPoints {
        feed: String,
        reply: oneshot::Sender<Result<Vec<StartingPoint>, ApplyError>>,
    },
    Change {
        projection: String,
        change: OperatorChange,
        reply: oneshot::Sender<Result<Result<String, String>, ApplyError>>,
    },
}

/// The writer's thread, for whoever stops it.
pub struct WriterThread {
    pub join: JoinHandle<()>,
    interrupt: Interrupter,
}

impl WriterThread {
    /// Makes the statement the writer is running fail, so its batch rolls back whole (an
    /// interrupted statement is a storage failure, never the event's fault). Between
    /// statements it does nothing.
    pub fn interrupt(&self) {
        (self.interrupt)();
    }
}

/// Sends batches to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct WriterHandle {
    jobs: mpsc::Sender<Job>,
    activity: Arc<WriterActivity>,
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
        self.activity.busy_for()
    }

    /// The batch the writer has been on for `at_least` or longer, with when it started.
    pub fn slow_batch(&self, at_least: Duration) -> Option<(Instant, SlowBatch)> {
        self.activity.slow_batch(at_least)
    }

    pub async fn submit(&self, batch: Batch) -> PendingBatch {
        let (reply, receiver) = oneshot::channel();
        // If the writer is gone, the reply sender is dropped with the job and `outcome` says so.
        let _ = self.jobs.send(Job::Apply { batch, reply }).await;
        PendingBatch { reply: receiver }
    }

    /// Records `feeds` as paused (or resumed) once the batches sent before have committed.
    pub async fn set_paused(&self, feeds: Vec<String>, paused: bool) -> Result<(), ApplyError> {
        self.ask(|reply| Job::SetPaused {
            feeds,
            paused,
            reply,
        })
        .await
    }

    /// Renews this daemon's session and takes the leases it may (PostgreSQL).
    pub async fn leases(&self, request: LeaseRequest) -> Result<LeaseReport, ApplyError> {
        self.ask(|reply| Job::Leases { request, reply }).await
    }

    /// Gives `feed`'s lease back (PostgreSQL).
    pub async fn release(&self, feed: String) -> Result<(), ApplyError> {
        self.ask(|reply| Job::Release { feed, reply }).await
    }

    /// Where `feed`'s projections stand now, as committed.
    pub async fn starting_points_of(&self, feed: String) -> Result<Vec<StartingPoint>, ApplyError> {
        self.ask(|reply| Job::StartingPoints { feed, reply }).await
    }

    /// Makes an operator's change to `projection` (PostgreSQL): what was done, or why not.
    pub async fn change(
        &self,
        projection: String,
        change: OperatorChange,
    ) -> Result<String, String> {
        self.ask(|reply| Job::Change {
            projection,
            change,
            reply,
        })
        .await
        .unwrap_or_else(|err| Err(err.to_string()))
    }

    async fn ask<T>(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<T, ApplyError>>) -> Job,
    ) -> Result<T, ApplyError> {
        let (reply, receiver) = oneshot::channel();
        let _ = self.jobs.send(job(reply)).await;
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
