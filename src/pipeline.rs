//! One feed's loop: fetch a page, fetch the bodies its projections need, hand the batch to the
//! writer, and fetch the next page while the writer commits.
//!
//! The pipeline never decides what is applied: it starts from the committed checkpoints, and after
//! any failure it starts again from them. Fetch failures are retried forever with backoff; only a
//! feed that contradicts a checkpoint (rewritten, or shrunk below it) halts the pipeline.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::{stream, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::event::Event;
use crate::feed::flux::{FluxClient, PageEntry};
use crate::feed::{Backoff, FetchError};
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
    shutdown: CancellationToken,
    health: Health,
    passed_over: u64,
    applied: u64,
}

/// Why `follow` returned.
enum Stop {
    Shutdown,
    /// Start again from the committed checkpoints after a pause (the database failed).
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
        shutdown: CancellationToken,
    ) -> Pipeline {
        Pipeline {
            health: Health::new(feed.clone()),
            feed,
            client,
            policy,
            writer,
            members,
            shutdown,
            passed_over: 0,
            applied: 0,
        }
    }

    pub async fn run(mut self) {
        let mut resyncs = 0;
        loop {
            let applied_before = self.applied;
            let stop = self.follow().await;
            if self.applied > applied_before {
                // Progress was made since the last failure: back off from the start again.
                resyncs = 0;
            }
            match stop {
                Stop::Shutdown => break,
                Stop::Halt(reason) => {
                    tracing::error!(feed = %self.feed, "feed halted: {reason}");
                    break;
                }
                Stop::Resync(reason) => {
                    let delay = self.policy.backoff.delay(resyncs, None);
                    resyncs = resyncs.saturating_add(1);
                    tracing::warn!(feed = %self.feed, ?delay, "batch not committed, starting again from the checkpoints: {reason}");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        tracing::info!(
            feed = %self.feed,
            applied = self.applied,
            passed_over = self.passed_over,
            "feed reader stopped"
        );
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
        loop {
            let shutdown = self.shutdown.clone();
            let fetched = tokio::select! {
                _ = shutdown.cancelled() => None,
                events = self.fetch_events(offset) => Some(events),
            };
            if let Some(batch) = pending.take() {
                if let Err(stop) = self.settle(batch).await {
                    return stop;
                }
            }
            let Some(events) = fetched else {
                return Stop::Shutdown;
            };
            if self.members.is_empty() {
                return Stop::Halt("every projection on this feed has halted".into());
            }
            let Some(last) = events.last() else {
                if let Some(ahead) = self.members.iter().find(|m| m.next_offset > offset) {
                    return Stop::Halt(format!(
                        "the feed shrank: its head is at offset {offset}, but projection {:?} has applied events up to offset {}",
                        ahead.projection,
                        ahead.next_offset - 1
                    ));
                }
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
                tokio::select! {
                    _ = self.shutdown.cancelled() => return Stop::Shutdown,
                    _ = tokio::time::sleep(self.policy.poll_interval) => continue,
                }
            };
            offset = last.offset + 1;
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
        let failures_before = self.health.failures();
        let entries = self.retry(|| self.client.fetch_page(offset)).await;
        let members = &self.members;
        let needs_body = |event_offset: u64, event_type: &str| {
            members
                .iter()
                .any(|m| event_offset >= m.next_offset && m.event_types.contains(event_type))
        };
        let handled_anywhere =
            |event_type: &str| members.iter().any(|m| m.event_types.contains(event_type));
        self.passed_over += entries
            .iter()
            .filter(|entry| !handled_anywhere(&entry.event_type))
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
        if self.health.failures() == failures_before {
            self.health.recovered();
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
                    self.health.failed(&err);
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

/// Whether the feed is failing, so that a failure streak is logged when it starts and when it
/// ends, not once per retry. A streak ends with the first batch fetched without any failure.
struct Health {
    feed: String,
    streak: Mutex<Option<Streak>>,
}

struct Streak {
    since: Instant,
    failures: u64,
}

impl Health {
    fn new(feed: String) -> Health {
        Health {
            feed,
            streak: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Streak>> {
        // The state is a counter; a panic elsewhere cannot leave it inconsistent.
        self.streak
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn failures(&self) -> u64 {
        self.lock().as_ref().map_or(0, |streak| streak.failures)
    }

    fn failed(&self, err: &FetchError) {
        let mut streak = self.lock();
        match streak.as_mut() {
            Some(streak) => {
                streak.failures += 1;
                tracing::debug!(feed = %self.feed, failures = streak.failures, "retrying: {err}");
            }
            None => {
                tracing::warn!(feed = %self.feed, "feed request failed, retrying with backoff until it works: {err}");
                *streak = Some(Streak {
                    since: Instant::now(),
                    failures: 1,
                });
            }
        }
    }

    fn recovered(&self) {
        if let Some(streak) = self.lock().take() {
            tracing::info!(
                feed = %self.feed,
                failures = streak.failures,
                after = ?streak.since.elapsed(),
                "feed recovered"
            );
        }
    }
}
