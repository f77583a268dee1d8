//! The writer's thread: it owns the connection and runs the jobs the readers and the supervisor
//! send it, one at a time, in the order sent. Handles to it are cheap to clone; it ends once the
//! last one is dropped, after finishing the jobs already sent.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::InterruptHandle;
use tokio::sync::{mpsc, oneshot};

use super::activity::WriterActivity;
use super::{ApplyError, Batch, BatchOutcome, Writer};
use crate::control::protocol::SlowBatch;

impl Writer {
    /// Moves the writer to its own thread. It runs until every handle is dropped, finishing the
    /// batches already sent.
    pub fn spawn(self) -> std::io::Result<(WriterHandle, WriterThread)> {
        let (jobs, receiver) = mpsc::channel(16);
        let activity = self.activity.clone();
        let interrupt = self.conn.get_interrupt_handle();
        let join = std::thread::Builder::new()
            .name("projector-writer".into())
            .spawn(move || self.run(receiver))?;
        Ok((
            WriterHandle { jobs, activity },
            WriterThread { join, interrupt },
        ))
    }

    fn run(mut self, mut jobs: mpsc::Receiver<Job>) {
        while let Some(job) = jobs.blocking_recv() {
            let feed = match &job {
                Job::Apply { batch, .. } => Some(batch.feed.clone()),
                Job::SetPaused { .. } => None,
            };
            self.activity.start_job(feed);
            self.run_job(job);
            self.activity.end_job();
        }
    }

    /// Runs one job. The sender may have gone (shutdown); the job is committed or not either way.
    fn run_job(&mut self, job: Job) {
        match job {
            Job::Apply { batch, reply } => {
                let started = Instant::now();
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
                if result.is_ok() {
                    crate::metrics::metrics().batch(
                        &batch.feed,
                        started.elapsed().as_secs_f64(),
                        batch.events.len(),
                    );
                }
                if matches!(result, Err(ApplyError::Full(_))) {
                    // The write-ahead log may hold the space the next batch needs.
                    let _ = self.wal.truncate(&self.conn);
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
