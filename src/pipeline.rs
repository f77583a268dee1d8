//! One feed's loop: fetch a page, fetch the bodies its projections need, hand the batch to the
//! writer, and fetch the next page while the writer commits.
//!
//! The pipeline never decides what is applied: it starts from the committed checkpoints, and after
//! any failure it starts again from them. Fetch failures, and a feed that shrank below a
//! checkpoint, are retried forever with backoff; only a feed that contradicts a checkpoint (the
//! event there has another id: rewritten) halts the pipeline.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{stream, StreamExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::event::Event;
use crate::feed::flux::{FluxClient, PageEntry};
use crate::feed::{Backoff, FetchError};
use crate::status::{FeedMonitor, ReaderPhase};
use crate::writer::{ApplyError, Batch, PendingBatch, WriterHandle};

/// A projection read by this pipeline, as far as the pipeline needs to know it.
#[derive(Debug, Clone)]
pub struct Member {
    pub projection: String,
    pub event_types: HashSet<String>,
    pub next_offset: u64,
}

/// How a feed is read.
#[derive(Debug, Clone)]
pub struct ReadPolicy {
    pub poll_interval: Duration,
    pub body_concurrency: usize,
    pub backoff: Backoff,
}

pub struct Pipeline {
    feed: String,
    client: FluxClient,
    policy: ReadPolicy,
    writer: WriterHandle,
    members: Vec<Member>,
    /// Whether the feed is paused; the supervisor owns the value.
    paused: watch::Receiver<bool>,
    monitor: Arc<FeedMonitor>,
    /// This reader's id in `monitor`.
    reader: usize,
    shutdown: CancellationToken,
    passed_over: u64,
    applied: u64,
}

/// The pipeline's links to the rest of the daemon: how it is steered and where it reports.
pub struct Steering {
    pub paused: watch::Receiver<bool>,
    pub monitor: Arc<FeedMonitor>,
    pub shutdown: CancellationToken,
}

/// Why `follow` returned.
enum Stop {
    Shutdown,
    /// The feed was paused; the batch in flight has been settled.
    Paused,
    /// Start again from the committed checkpoints after a delay (the database failed).
    Resync(String),
    /// The feed cannot be read correctly any more; an operator must look.
    Halt(String),
}

impl Pipeline {
    pub fn new(
        feed: String,
        client: FluxClient,
        policy: ReadPolicy,
        writer: WriterHandle,
        members: Vec<Member>,
        steering: Steering,
    ) -> Pipeline {
        let reader = steering.monitor.add_reader();
        Pipeline {
            feed,
            client,
            policy,
            writer,
            members,
            paused: steering.paused,
            monitor: steering.monitor,
            reader,
            shutdown: steering.shutdown,
            passed_over: 0,
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
                Stop::Shutdown => break ReaderPhase::Stopped,
                Stop::Paused => continue,
                Stop::Halt(reason) => {
                    tracing::error!(feed = %self.feed, "feed halted: {reason}");
                    break ReaderPhase::Halted(reason);
                }
                Stop::Resync(reason) => {
                    let delay = self.policy.backoff.delay(resyncs, None);
                    resyncs = resyncs.saturating_add(1);
                    tracing::error!(feed = %self.feed, ?delay, "batch not committed, nothing of it applied; retrying from the checkpoints: {reason}");
                    self.monitor
                        .commit_failed(format!("batch not committed: {reason}"));
                    // A pause ends the wait early; the top of the loop parks.
                    if let Some(Stop::Shutdown) = self.sleep(delay).await {
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
            "feed reader stopped"
        );
    }

    /// Waits `delay`, unless the daemon shuts down or the feed is paused first.
    async fn sleep(&self, delay: Duration) -> Option<Stop> {
        let mut paused = self.paused.clone();
        tokio::select! {
            _ = self.shutdown.cancelled() => Some(Stop::Shutdown),
            _ = paused.wait_for(|&p| p) => Some(Stop::Paused),
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
            // The supervisor holds the sender as long as the pipeline runs.
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

    async fn follow(&mut self) -> Stop {
        let mut offset = self.start_offset();
        let mut pending: Option<PendingBatch> = None;
        let mut reported_head = false;
        let mut shrunk_polls = 0;
        // The last event read, and whether the last poll found nothing new. Idle at the head,
        // each poll reads that event again, so that a feed which shrank or was rewritten under
        // a running daemon is noticed at once, not at the next restart.
        let mut last_read: Option<(u64, String)> = None;
        let mut idle = false;
        self.monitor.set_phase(self.reader, ReaderPhase::CatchingUp);
        loop {
            let verify = match &last_read {
                Some((last_offset, id)) if idle => Some((*last_offset, id.clone())),
                _ => None,
            };
            let fetch_at = verify.as_ref().map_or(offset, |(at, _)| *at);
            let shutdown = self.shutdown.clone();
            let mut paused = self.paused.clone();
            // Dropping the fetch on shutdown or pause is safe: nothing of it was applied.
            let fetched = tokio::select! {
                _ = shutdown.cancelled() => Err(Stop::Shutdown),
                _ = paused.wait_for(|&p| p) => Err(Stop::Paused),
                events = self.fetch_events(fetch_at) => Ok(events),
            };
            if let Some(batch) = pending.take() {
                if let Err(stop) = self.settle(batch).await {
                    return stop;
                }
            }
            let mut events = match fetched {
                Ok(events) => events,
                Err(stop) => return stop,
            };
            if self.members.is_empty() {
                return Stop::Halt("every projection on this feed has halted".into());
            }
            if events.is_empty() {
                if let Some(ahead) = self.members.iter().find(|m| m.next_offset > fetch_at) {
                    // Perhaps a feed server restarted and not yet reloaded: wait for the events
                    // to come back. If others come back instead, the rewrite check halts.
                    let shrank = FetchError {
                        what: format!("page at offset {fetch_at}"),
                        reason: format!(
                            "the feed shrank: its head is at offset {fetch_at}, but projection {:?} has applied events up to offset {}; nothing is applied until they are back",
                            ahead.projection,
                            ahead.next_offset - 1
                        ),
                        retry_after: None,
                    };
                    self.monitor.failed(&shrank);
                    let delay = self.policy.backoff.delay(shrunk_polls, None);
                    shrunk_polls = shrunk_polls.saturating_add(1);
                    match self.sleep(delay).await {
                        Some(stop) => return stop,
                        None => continue,
                    }
                }
            }
            if let Some((verified_offset, verified_id)) = &verify {
                match events.first() {
                    Some(first) if first.event_id != *verified_id => {
                        return Stop::Halt(format!(
                            "the feed was rewritten: it had event {verified_id} at offset {verified_offset}, and now has {} there",
                            first.event_id
                        ));
                    }
                    Some(_) => {
                        events.remove(0);
                    }
                    // Handled above: an empty page below a checkpoint is a shrink.
                    None => {}
                }
            }
            let Some(last) = events.last() else {
                self.monitor.saw_feed_up_to(offset);
                self.monitor.set_phase(self.reader, ReaderPhase::Live);
                idle = true;
                if !reported_head {
                    reported_head = true;
                    tracing::info!(
                        feed = %self.feed,
                        offset,
                        applied = self.applied,
                        passed_over = self.passed_over,
                        "at the head of the feed"
                    );
                }
                match self.sleep(self.policy.poll_interval).await {
                    Some(stop) => return stop,
                    None => continue,
                }
            };
            idle = false;
            offset = last.offset + 1;
            last_read = Some((last.offset, last.event_id.clone()));
            self.monitor.saw_feed_up_to(offset);
            if reported_head {
                // New events after the head: reading them counts as catching up.
                self.monitor.set_phase(self.reader, ReaderPhase::CatchingUp);
            }
            let batch = Batch {
                feed: self.feed.clone(),
                projections: self.members.iter().map(|m| m.projection.clone()).collect(),
                events,
            };
            pending = Some(self.writer.submit(batch).await);
        }
    }

    /// Waits for a batch's commit and takes its outcome into account.
    async fn settle(&mut self, pending: PendingBatch) -> Result<(), Stop> {
        let outcome = match pending.outcome().await {
            Ok(outcome) => outcome,
            Err(err @ ApplyError::FeedRewritten { .. }) => return Err(Stop::Halt(err.to_string())),
            Err(err) => return Err(Stop::Resync(err.to_string())),
        };
        self.applied += outcome.applied as u64;
        self.monitor
            .committed(outcome.events, &outcome.checkpoints, &outcome.halted);
        if outcome.dead_lettered > 0 {
            tracing::warn!(
                feed = %self.feed,
                count = outcome.dead_lettered,
                "events could not be applied and were recorded in projector_dead_letters"
            );
        }
        for (projection, checkpoint) in &outcome.checkpoints {
            if let Some(member) = self
                .members
                .iter_mut()
                .find(|m| &m.projection == projection)
            {
                member.next_offset = checkpoint.next_offset;
            }
        }
        for halt in &outcome.halted {
            tracing::error!(
                feed = %self.feed,
                projection = %halt.projection,
                offset = halt.offset,
                event_id = %halt.event_id,
                event_type = %halt.event_type,
                "projection halted (on_error = \"stop\"): {}",
                halt.error
            );
            self.members.retain(|m| m.projection != halt.projection);
        }
        Ok(())
    }

    /// The events from `offset` on, one page of them, with the bodies some member still needs.
    /// Retries every failure until it succeeds; cancelled by dropping.
    async fn fetch_events(&mut self, offset: u64) -> Vec<Event> {
        let failures_before = self.monitor.streak_failures();
        let entries = self.retry(|| self.client.fetch_page(offset)).await;
        let members = &self.members;
        let needs_body = |event_offset: u64, event_type: &str| {
            members
                .iter()
                .any(|m| event_offset >= m.next_offset && m.event_types.contains(event_type))
        };
        let handled_anywhere =
            |event_type: &str| members.iter().any(|m| m.event_types.contains(event_type));
        // Entries read again (to check the event before a checkpoint) were counted already.
        let first_new = members.iter().map(|m| m.next_offset).min().unwrap_or(0);
        self.passed_over += entries
            .iter()
            .enumerate()
            .filter(|(index, entry)| {
                offset + *index as u64 >= first_new && !handled_anywhere(&entry.event_type)
            })
            .count() as u64;
        let this = &*self;
        let events = stream::iter(entries.into_iter().enumerate())
            .map(|(index, entry)| {
                let event_offset = offset + index as u64;
                let wanted = needs_body(event_offset, &entry.event_type);
                async move {
                    let payload = if wanted {
                        Some(this.retry(|| this.client.fetch_body(&entry)).await)
                    } else {
                        None
                    };
                    into_event(event_offset, entry, payload)
                }
            })
            .buffered(self.policy.body_concurrency)
            .collect::<Vec<_>>()
            .await;
        if self.monitor.streak_failures() == failures_before {
            self.monitor.recovered();
        }
        events
    }

    /// Runs `fetch` until it succeeds, waiting with backoff between attempts.
    async fn retry<T, F, Fut>(&self, fetch: F) -> T
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, FetchError>>,
    {
        let mut attempt = 0;
        loop {
            match fetch().await {
                Ok(value) => return value,
                Err(err) => {
                    self.monitor.failed(&err);
                    let delay = self.policy.backoff.delay(attempt, err.retry_after);
                    attempt = attempt.saturating_add(1);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

fn into_event(offset: u64, entry: PageEntry, payload: Option<serde_json::Value>) -> Event {
    Event {
        offset,
        event_id: entry.event_id,
        event_type: entry.event_type,
        aggregate_name: entry.aggregate_name,
        aggregate_version: entry.aggregate_version,
        created: entry.created,
        payload,
    }
}
