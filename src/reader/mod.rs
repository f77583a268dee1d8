//! One feed's reader: a stream of the feed's events (`pages.rs` reads the pages in order,
//! `bodies.rs` fetches the bodies its projections need `body_concurrency` at a time across page
//! boundaries, `gate.rs` bounds what waits), gathered into batches (`batch.rs`) that the writer
//! commits while the next batch is read. A batch grows while the writer is busy, so catching up
//! commits large transactions and following the head commits at once.
//!
//! The reader never decides what is applied: it starts from the committed checkpoints, and after
//! any failure it starts again from them. Fetch failures, and a feed that shrank below a
//! checkpoint, are retried forever with backoff (`retry.rs`); only a feed that contradicts a
//! checkpoint (the event there has another id: rewritten) halts the reader.

mod batch;
mod bodies;
pub mod budget;
mod gate;
mod head;
mod pages;
pub mod retry;

use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use batch::Gathering;
pub use batch::MAX_BATCH_EVENTS;
use bodies::{BodyReader, Read};
use budget::Budget;
pub use head::{find_head, follow_head};
use pages::PageReader;
use retry::Backoff;

use crate::event::{Event, PagePlace};
use crate::feed::error::FetchError;
use crate::feed::FeedClient;
use crate::monitor::{FeedMonitor, ReaderPhase};
use crate::projection::EventTypes;
use crate::writer::{ApplyError, Batch, BatchOutcome, PendingBatch, WriterHandle};

/// A projection read by this reader, as far as the reader needs to know it.
#[derive(Debug, Clone)]
pub struct Member {
    pub projection: String,
    pub event_types: EventTypes,
    pub next_offset: u64,
    /// On a feed paged by links or cursors, the page its checkpoint's last event is on.
    pub page: Option<PagePlace>,
}

/// How a feed is read.
#[derive(Debug, Clone)]
pub struct ReadPolicy {
    pub poll_interval: Duration,
    pub body_concurrency: usize,
    /// Pages asked for at once while they come back full.
    pub page_lookahead: usize,
    /// `live = "long-poll"`: at the head, the next page is asked for with this wait.
    pub long_poll: Option<Duration>,
    pub backoff: Backoff,
}

pub struct FeedReader {
    feed: String,
    client: FeedClient,
    policy: ReadPolicy,
    writer: WriterHandle,
    members: Vec<Member>,
    /// Whether the feed is paused; the supervisor owns the value.
    paused: watch::Receiver<bool>,
    monitor: Arc<FeedMonitor>,
    /// This reader's id in `monitor`.
    reader: usize,
    shutdown: CancellationToken,
    budget: Arc<Budget>,
    moved: Option<watch::Receiver<u64>>,
    passed_over: u64,
    passed_over_counter: prometheus_client::metrics::counter::Counter,
    /// Batches committed.
    batches: u64,
    /// The feed's failures counted when the reader last took stock (see `note_recovery`).
    failures_seen: u64,
    applied: u64,
}

/// The reader's links to the rest of the daemon: how it is steered and where it reports.
pub struct Steering {
    pub paused: watch::Receiver<bool>,
    pub monitor: Arc<FeedMonitor>,
    pub shutdown: CancellationToken,
    /// What the feed's readers and its head probe hold, shared.
    pub budget: Arc<Budget>,
    /// Changes when the live stream says the feed moved (`live = "sse"`).
    pub moved: Option<watch::Receiver<u64>>,
}

/// Why `follow` stopped following the feed.
enum Interruption {
    Shutdown,
    /// The feed was paused; the batch in flight has been settled.
    Paused,
    /// A batch did not commit (the database failed): start again from the committed
    /// checkpoints after a delay.
    CommitFailed(String),
    /// The feed cannot be read correctly any more; an operator must look.
    Halted(String),
    /// A projection halted: start again at once for the others.
    MemberHalted,
    /// Every projection this reader applies has halted: there is nothing left to read for.
    AllMembersHalted,
}

impl FeedReader {
    pub fn new(
        feed: String,
        client: FeedClient,
        policy: ReadPolicy,
        writer: WriterHandle,
        members: Vec<Member>,
        steering: Steering,
    ) -> FeedReader {
        let reader = steering.monitor.add_reader();
        let passed_over_counter = crate::metrics::metrics()
            .events_passed_over
            .get_or_create(&crate::metrics::FeedLabels { feed: feed.clone() })
            .clone();
        FeedReader {
            feed,
            client,
            policy,
            writer,
            members,
            paused: steering.paused,
            monitor: steering.monitor,
            reader,
            shutdown: steering.shutdown,
            budget: steering.budget,
            moved: steering.moved,
            passed_over: 0,
            passed_over_counter,
            batches: 0,
            failures_seen: 0,
            applied: 0,
        }
    }

    pub async fn run(mut self) {
        let mut resyncs = 0;
        let final_phase = loop {
            if !self.wait_while_paused().await {
                break ReaderPhase::Stopped;
            }
            let applied_before = self.applied;
            let stop = self.follow().await;
            if self.applied > applied_before {
                // Progress was made since the last failure: back off from the start again.
                resyncs = 0;
            }
            match stop {
                Interruption::Shutdown => break ReaderPhase::Stopped,
                Interruption::Paused | Interruption::MemberHalted => continue,
                Interruption::Halted(reason) => {
                    tracing::error!(feed = %self.feed, "feed halted: {reason}");
                    break ReaderPhase::Halted(reason);
                }
                Interruption::AllMembersHalted => {
                    tracing::warn!(feed = %self.feed, "every projection this reader applied has halted on a poison event; it stops reading (`projector ctl status` shows which)");
                    break ReaderPhase::ProjectionsHalted;
                }
                Interruption::CommitFailed(reason) if self.shutdown.is_cancelled() => {
                    tracing::warn!(feed = %self.feed, "batch not committed while stopping, nothing of it applied; it is read again at the next start: {reason}");
                    break ReaderPhase::Stopped;
                }
                Interruption::CommitFailed(reason) => {
                    let delay = self.policy.backoff.delay(resyncs, None);
                    resyncs = resyncs.saturating_add(1);
                    tracing::error!(feed = %self.feed, ?delay, "batch not committed, nothing of it applied; retrying from the checkpoints: {reason}");
                    self.monitor
                        .commit_failed(format!("batch not committed: {reason}"));
                    // A pause ends the wait early; the top of the loop parks.
                    if let Some(Interruption::Shutdown) = self.sleep(delay).await {
                        break ReaderPhase::Stopped;
                    }
                }
            }
        };
        self.monitor.set_phase(self.reader, final_phase);
        tracing::info!(
            feed = %self.feed,
            applied = self.applied,
            passed_over = self.passed_over,
            batches = self.batches,
            "feed reader stopped"
        );
    }

    /// Waits `delay`, unless the daemon shuts down or the feed is paused first.
    async fn sleep(&self, delay: Duration) -> Option<Interruption> {
        let mut paused = self.paused.clone();
        tokio::select! {
            _ = self.shutdown.cancelled() => Some(Interruption::Shutdown),
            _ = paused.wait_for(|&p| p) => Some(Interruption::Paused),
            _ = tokio::time::sleep(delay) => None,
        }
    }

    /// Parks while the feed is paused. False if the daemon is shutting down.
    async fn wait_while_paused(&mut self) -> bool {
        if !*self.paused.borrow() {
            return true;
        }
        self.monitor.set_phase(self.reader, ReaderPhase::Paused);
        tracing::info!(feed = %self.feed, "paused");
        let shutdown = self.shutdown.clone();
        tokio::select! {
            _ = shutdown.cancelled() => false,
            // The supervisor holds the sender as long as the reader runs.
            resumed = self.paused.wait_for(|&p| !p) => {
                if resumed.is_ok() {
                    tracing::info!(feed = %self.feed, "resumed");
                }
                resumed.is_ok()
            }
        }
    }

    /// The lowest checkpoint's previous event is read again, so the writer can check that the
    /// feed still has the event the checkpoint recorded.
    fn start_offset(&self) -> u64 {
        self.members
            .iter()
            .map(|member| member.next_offset)
            .min()
            .unwrap_or(0)
            .saturating_sub(1)
    }

    /// On a feed paged by links or cursors, the page to read from: the one holding the event
    /// before the lowest checkpoint, if a checkpoint knows it (else the feed's first).
    fn start_page(&self) -> Option<PagePlace> {
        let start = self.start_offset();
        self.members
            .iter()
            .filter(|member| member.next_offset == start + 1)
            .filter_map(|member| member.page.clone())
            .find(|page| page.first_offset <= start)
    }

    async fn follow(&mut self) -> Interruption {
        if self.members.is_empty() {
            return Interruption::AllMembersHalted;
        }
        self.monitor.set_phase(self.reader, ReaderPhase::CatchingUp);
        let known_end = self.members.iter().map(|m| m.next_offset).max();
        let (pages, mut page_reading) = PageReader::new(
            self.feed.clone(),
            self.client.clone(),
            (self.monitor.clone(), self.reader),
            self.policy.clone(),
            self.budget.clone(),
            (
                self.start_offset(),
                known_end.unwrap_or(0),
                self.start_page(),
            ),
            self.moved.clone(),
        )
        .spawn();
        let bodies = BodyReader {
            client: self.client.clone(),
            monitor: self.monitor.clone(),
            backoff: self.policy.backoff,
            members: self.members.clone(),
        };
        let mut reads = Box::pin(bodies::ordered_reads(
            pages,
            bodies,
            self.policy.body_concurrency,
            self.budget.clone(),
        ));
        let mut gathering = Gathering::default();
        let mut pending: Option<PendingBatch> = None;
        self.failures_seen = self.monitor.streak_failures();
        let shutdown = self.shutdown.clone();
        let mut paused = self.paused.clone();
        let stop = 'read: loop {
            // Take what has been read already, then hand the batch to the writer if it is due
            // and the writer has committed the previous one.
            while gathering.has_room() {
                let Some(next) = reads.next().now_or_never() else {
                    break;
                };
                if let Err(stop) = self.take(next, &mut gathering) {
                    break 'read stop;
                }
            }
            if pending.is_none() && gathering.is_due(Instant::now()) {
                self.note_recovery();
                pending = Some(self.submit(gathering.take()).await);
            }
            let waiting_for_more = pending.is_none() && !gathering.is_empty();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Interruption::Shutdown,
                // Mapped: the guard it returns must not be held while the loop goes on.
                _ = paused.wait_for(|&p| p).map(|_| ()) => break Interruption::Paused,
                outcome = committed(&mut pending), if pending.is_some() => {
                    pending = None;
                    let members = self.members.len();
                    if let Err(stop) = self.settle(outcome) {
                        break stop;
                    }
                    if self.members.len() != members {
                        // A projection halted: read on for the others alone.
                        break Interruption::MemberHalted;
                    }
                }
                next = reads.next(), if gathering.has_room() => {
                    if let Err(stop) = self.take(next, &mut gathering) {
                        break stop;
                    }
                }
                _ = tokio::time::sleep_until(gathering.deadline()), if waiting_for_more => {}
            }
        };
        // Dropping the fetches in flight is safe: nothing of them was applied. No request
        // starts while the batch in flight settles: the page reader's task may be in the middle
        // of a request, so it is waited for until it has stopped.
        drop(reads);
        page_reading.abort();
        let _ = (&mut page_reading).await;
        self.finish(pending, stop).await
    }

    /// Takes what the feed stream yielded into account.
    fn take(
        &mut self,
        next: Option<Result<Read, FetchError>>,
        gathering: &mut Gathering,
    ) -> Result<(), Interruption> {
        let fetched = match next {
            Some(Ok(Read::Event(fetched))) => fetched,
            Some(Ok(Read::Head)) => {
                gathering.at_head = true;
                self.note_recovery();
                return Ok(());
            }
            // Only an error that is not retried ends the stream.
            Some(Err(err)) => return Err(Interruption::Halted(err.to_string())),
            None => {
                return Err(Interruption::Halted(
                    "the feed reader ended unexpectedly (a bug)".into(),
                ))
            }
        };
        let event = &fetched.event;
        // The event read again before the lowest checkpoint was counted already.
        let first_new = self.members.iter().map(|m| m.next_offset).min();
        let handled = self
            .members
            .iter()
            .any(|m| m.event_types.contains(&event.meta.event_type));
        if !handled && first_new.is_some_and(|first| event.offset >= first) {
            self.passed_over += 1;
            self.passed_over_counter.inc();
        }
        gathering.push(fetched);
        Ok(())
    }

    /// A batch's worth of reading, or a poll, without a new failure: the feed works again.
    fn note_recovery(&mut self) {
        let failures = self.monitor.streak_failures();
        if failures == self.failures_seen {
            self.monitor.recovered();
        }
        self.failures_seen = failures;
    }

    async fn submit(&self, events: Vec<Event>) -> PendingBatch {
        let batch = Batch {
            feed: self.feed.clone(),
            projections: self.members.iter().map(|m| m.projection.clone()).collect(),
            events,
        };
        self.writer.submit(batch).await
    }

    /// Ends `follow` with `stop`, once the batch in flight has committed (or failed, which
    /// then says how to go on).
    async fn finish(&mut self, pending: Option<PendingBatch>, stop: Interruption) -> Interruption {
        if let Some(mut pending) = pending {
            if let Err(failed) = self.settle(pending.outcome().await) {
                return failed;
            }
        }
        stop
    }

    /// Takes a batch's outcome into account.
    fn settle(&mut self, outcome: Result<BatchOutcome, ApplyError>) -> Result<(), Interruption> {
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(err @ ApplyError::FeedRewritten { .. }) => {
                return Err(Interruption::Halted(err.to_string()))
            }
            Err(err) => return Err(Interruption::CommitFailed(err.to_string())),
        };
        self.applied += outcome.applied as u64;
        self.batches += 1;
        self.monitor.committed(&outcome);
        if outcome.dead_lettered > 0 {
            tracing::warn!(
                feed = %self.feed,
                count = outcome.dead_lettered,
                "events could not be applied and were recorded in projector_dead_letters"
            );
        }
        for done in &outcome.projections {
            if let Some(member) = self
                .members
                .iter_mut()
                .find(|m| m.projection == done.projection)
            {
                member.next_offset = done.checkpoint.next_offset;
                member.page = done.checkpoint.page.clone();
            }
        }
        for halt in &outcome.halted {
            tracing::error!(
                feed = %self.feed,
                projection = %halt.projection,
                offset = halt.offset,
                event_id = %crate::shown::shortened(&halt.event_id, crate::shown::ID_SHOWN),
                event_type = %crate::shown::shortened(&halt.event_type, crate::shown::ID_SHOWN),
                "projection halted (on_error = \"stop\"): {}",
                crate::shown::shortened(&halt.error, crate::shown::ERROR_SHOWN)
            );
            self.members.retain(|m| m.projection != halt.projection);
        }
        Ok(())
    }
}

/// The outcome of the batch in flight; never ready when there is none.
async fn committed(pending: &mut Option<PendingBatch>) -> Result<BatchOutcome, ApplyError> {
    match pending {
        Some(batch) => batch.outcome().await,
        None => std::future::pending().await,
    }
}
