//! The live status of a feed, for `status`, the log's progress lines, the systemd STATUS line and
//! the pause handshake.
//!
//! A feed's readers (and its head probe) report into one [`FeedMonitor`] (a `watch` channel, so
//! that the supervisor can wait for a condition such as "every reader has parked"); the
//! supervisor turns it into a [`FeedStatus`] snapshot on demand. Nothing here decides what is
//! applied: checkpoints shown are the ones the writer reported committed.

mod hint;
mod progress;

use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use crate::control::protocol::{FeedState, FeedStatus, LastError, ProjectionStatus, RebuildStatus};
use crate::feed::error::FetchError;
use crate::metrics::{metrics, FeedLabels, ProjectionLabels};
use crate::shown::{shortened, ERROR_SHOWN, ID_SHOWN};
use crate::writer::{rebuilt_projection, BatchOutcome, StartingPoint};
pub use hint::hint_for;
pub use progress::ReaderPhase;
use progress::{rate, Progress, ProjectionProgress, Streak, RATE_WINDOW};
use prometheus_client::metrics::counter::Counter;

/// The readers of one feed report here; the supervisor reads it.
pub struct FeedMonitor {
    feed: String,
    progress: watch::Sender<Progress>,
    /// The feed's series of the process's metrics, which outlive the monitor (a reload).
    events_read: Counter,
    retries: Counter,
}

/// A projection's progress as it starts from `point`, its counters those of the process.
fn projection_progress(feed: &str, point: &StartingPoint) -> ProjectionProgress {
    let labels = ProjectionLabels {
        feed: feed.to_string(),
        projection: point.projection.clone(),
    };
    ProjectionProgress {
        next_offset: point.checkpoint.next_offset,
        frozen: point.frozen,
        dead_letters: point.dead_letters,
        // Created at 0, so that a rate over them starts from the beginning.
        applied_total: metrics().events_applied.get_or_create(&labels).clone(),
        dead_letters_total: metrics().dead_letters.get_or_create(&labels).clone(),
        ..ProjectionProgress::default()
    }
}

impl FeedMonitor {
    /// A monitor for `feed`, whose projections start at `points`.
    pub fn new(feed: &str, points: &[&StartingPoint]) -> FeedMonitor {
        let progress = Progress {
            projections: points
                .iter()
                .map(|point| (point.projection.clone(), projection_progress(feed, point)))
                .collect(),
            read_up_to: points
                .iter()
                .map(|point| point.checkpoint.next_offset)
                .min()
                .unwrap_or(0),
            // The baseline of the rate, so that the first batch counts in it.
            samples: [(Instant::now(), 0)].into(),
            moved_at: Some(Instant::now()),
            ..Progress::default()
        };
        let labels = FeedLabels {
            feed: feed.to_string(),
        };
        FeedMonitor {
            feed: feed.to_string(),
            progress: watch::Sender::new(progress),
            events_read: metrics().events_read.get_or_create(&labels).clone(),
            retries: metrics().retries.get_or_create(&labels).clone(),
        }
    }

    /// Takes over the counters of the monitor this one replaces (on reload): events read and
    /// seen, the rate's samples, retries, the last error and the projections' counters, and the
    /// head if the feed is the same one.
    pub fn carry_over(&self, previous: &FeedMonitor, same_feed: bool) {
        let old = previous.progress.borrow();
        self.progress.send_modify(|p| {
            p.events_read = old.events_read;
            p.events_seen = old.events_seen;
            p.samples = old.samples.clone();
            p.retries = old.retries;
            p.last_error = old.last_error.clone();
            for (name, projection) in &mut p.projections {
                if let Some(before) = old.projections.get(name) {
                    projection.applied = before.applied;
                    projection.last_applied_at = before.last_applied_at;
                }
            }
            if same_feed {
                p.reached_head = old.reached_head;
                p.head = old.head;
                p.head_exact = old.head_exact;
                p.read_up_to = p.read_up_to.max(old.read_up_to);
            }
        });
    }

    /// Starts the feed's progress again from `points`, with no reader (its readers stopped and
    /// others start from there: a lease taken on PostgreSQL, a rebuild begun or ended). The
    /// counters of the projections still there go on.
    pub fn start_over(&self, points: &[&StartingPoint]) {
        self.progress.send_modify(|p| {
            p.readers.clear();
            p.reached_head = false;
            let mut before = std::mem::take(&mut p.projections);
            for point in points {
                let mut projection = before
                    .remove(&point.projection)
                    .unwrap_or_else(|| projection_progress(&self.feed, point));
                projection.next_offset = point.checkpoint.next_offset;
                projection.dead_letters = point.dead_letters;
                projection.frozen = point.frozen;
                p.projections.insert(point.projection.clone(), projection);
            }
            p.read_up_to = points
                .iter()
                .map(|point| point.checkpoint.next_offset)
                .min()
                .unwrap_or(p.read_up_to);
            p.moved_at = Some(Instant::now());
        });
    }

    /// Registers a reader and returns its id.
    pub fn add_reader(&self) -> usize {
        let mut id = 0;
        self.progress.send_modify(|p| {
            id = p.readers.len();
            p.readers.push(ReaderPhase::Starting);
        });
        id
    }

    pub fn set_phase(&self, reader: usize, phase: ReaderPhase) {
        self.progress
            .send_if_modified(|p| match p.readers.get_mut(reader) {
                Some(current) if *current != phase => {
                    *current = phase;
                    if p.readers
                        .iter()
                        .all(|r| *r == ReaderPhase::Live || r.is_parked())
                        && p.readers.contains(&ReaderPhase::Live)
                    {
                        p.reached_head = true;
                    }
                    true
                }
                _ => false,
            });
    }

    /// Sets how long the checkpoints may stand still, the head ahead, before the feed is
    /// `stalled` (`stall_after`).
    pub fn set_stall_after(&self, stall_after: Duration) {
        self.progress
            .send_modify(|p| p.stall_after = Some(stall_after));
    }

    /// Waits until no reader and no head probe makes requests or writes any more.
    pub async fn parked(&self) {
        let mut receiver = self.progress.subscribe();
        // The sender lives in `self`, so this cannot fail.
        let _ = receiver
            .wait_for(|p| !p.probing && p.readers.iter().all(ReaderPhase::is_parked))
            .await;
    }

    /// Waits until some reader is catching up: the head is worth finding.
    pub async fn catching_up(&self) {
        let mut receiver = self.progress.subscribe();
        let _ = receiver
            .wait_for(|p| p.readers.contains(&ReaderPhase::CatchingUp))
            .await;
    }

    /// The head as known now: its offset, and whether it was found rather than only seen.
    pub fn head(&self) -> Option<(u64, bool)> {
        let p = self.progress.borrow();
        p.head.map(|head| (head, p.head_exact))
    }

    /// A page ending just before `end` was read: the feed has events up to there.
    pub fn saw_feed_up_to(&self, end: u64) {
        self.progress.send_if_modified(|p| {
            if p.head.is_some_and(|head| head >= end) {
                return false;
            }
            p.note_head_moving(end);
            p.head = Some(end);
            p.head_exact = false;
            true
        });
    }

    /// A reader found the head of the feed: an empty page at `head`.
    pub fn reached_head(&self, head: u64) {
        self.found_head(head);
    }

    /// The head probe is under way (true) or done (false).
    pub fn probing(&self, probing: bool) {
        self.progress.send_modify(|p| p.probing = probing);
    }

    /// The head probe found the head at `head`.
    pub fn probed_head(&self, head: u64) {
        self.found_head(head);
    }

    fn found_head(&self, head: u64) {
        self.progress.send_if_modified(|p| {
            // Below what was seen, it is out of date: a reader read past it since.
            if p.head.is_some_and(|seen| seen > head) {
                return false;
            }
            p.note_head_moving(head);
            p.head = Some(head);
            p.head_exact = true;
            true
        });
    }

    /// A batch committed.
    pub fn committed(&self, outcome: &BatchOutcome) {
        let now = Instant::now();
        let wall = SystemTime::now();
        self.progress.send_modify(|p| {
            p.commit_failing = false;
            let range = &outcome.offsets;
            let first_new = range.start.max(p.read_up_to);
            let read = range.end.saturating_sub(first_new);
            p.events_read += read;
            self.events_read.inc_by(read);
            p.read_up_to = p.read_up_to.max(range.end);
            p.events_seen += range.end - range.start;
            p.samples.push_back((now, p.events_seen));
            while p
                .samples
                .get(1)
                .is_some_and(|&(at, _)| now.duration_since(at) > RATE_WINDOW)
            {
                p.samples.pop_front();
            }
            for done in &outcome.projections {
                if let Some(projection) = p.projections.get_mut(&done.projection) {
                    projection.applied_total.inc_by(done.applied as u64);
                    projection
                        .dead_letters_total
                        .inc_by(done.dead_lettered as u64);
                    if done.checkpoint.next_offset > projection.next_offset {
                        p.moved_at = Some(now);
                    }
                    projection.next_offset = done.checkpoint.next_offset;
                    projection.applied += done.applied as u64;
                    projection.dead_letters += done.dead_lettered as u64;
                    if done.applied > 0 {
                        projection.last_applied_at = Some(wall);
                    }
                    if let Some(created) = &done.last_created {
                        projection.last_created = crate::metrics::created::parse(created);
                    }
                }
            }
            for halt in &outcome.halted {
                if let Some(projection) = p.projections.get_mut(&halt.projection) {
                    projection.halted = Some(format!(
                        "event {} ({}) at offset {}: {}",
                        shortened(&halt.event_id, ID_SHOWN),
                        shortened(&halt.event_type, ID_SHOWN),
                        halt.offset,
                        shortened(&halt.error, ERROR_SHOWN)
                    ));
                }
            }
        });
    }

    /// A request failed and will be retried.
    pub fn failed(&self, err: &FetchError) {
        let message = shortened(&err.to_string(), ERROR_SHOWN).into_owned();
        self.retries.inc();
        self.progress.send_modify(|p| {
            p.retries += 1;
            match p.streak.as_mut() {
                Some(streak) => {
                    streak.failures += 1;
                    tracing::debug!(feed = %self.feed, failures = streak.failures, "retrying: {message}");
                }
                None => {
                    tracing::warn!(feed = %self.feed, "feed request failed, retrying with backoff until it works: {message}");
                    p.streak = Some(Streak {
                        since: Instant::now(),
                        failures: 1,
                    });
                }
            }
            if let Some(hint) = p.hints.failed(err) {
                tracing::warn!(feed = %self.feed, "{hint} (still retrying: {message})");
            }
            p.last_error = Some((message, SystemTime::now()));
        });
    }

    /// A batch did not commit (the database refused it): counted, shown as the last error and
    /// as the feed's state until a batch commits; the reader logs it and retries.
    pub fn commit_failed(&self, message: String) {
        let message = shortened(&message, ERROR_SHOWN).into_owned();
        self.retries.inc();
        self.progress.send_modify(|p| {
            p.commit_failing = true;
            p.retries += 1;
            p.last_error = Some((message, SystemTime::now()));
        });
    }

    /// Failures so far in the current streak (0 when the feed is healthy).
    pub fn streak_failures(&self) -> u64 {
        self.progress
            .borrow()
            .streak
            .as_ref()
            .map_or(0, |s| s.failures)
    }

    /// A batch was fetched without any failure: a streak of failures, if any, has ended.
    pub fn recovered(&self) {
        self.progress.send_if_modified(|p| match p.streak.take() {
            Some(streak) => {
                p.hints.recovered();
                tracing::info!(
                    feed = %self.feed,
                    failures = streak.failures,
                    after = ?streak.since.elapsed(),
                    "feed recovered"
                );
                true
            }
            None => false,
        });
    }

    /// The feed as `status` shows it; `url` and `paused` are the supervisor's to know.
    pub fn snapshot(&self, url: &str, paused: bool) -> FeedStatus {
        let p = self.progress.borrow();
        let mut state = p.state(paused);
        let lag_of = |next_offset: u64| p.head.map(|head| head.saturating_sub(next_offset));
        let wall = SystemTime::now();
        // Nothing is late at the head; behind it, as old as the last event applied.
        let lag_seconds_of = |progress: &ProjectionProgress| match lag_of(progress.next_offset) {
            Some(0) => Some(0.0),
            _ => progress.last_created.map(|created| {
                wall.duration_since(created)
                    .map_or(0.0, |d| d.as_secs_f64())
            }),
        };
        let mut projections: Vec<ProjectionStatus> = p
            .projections
            .iter()
            .filter(|(name, _)| rebuilt_projection(name).is_none())
            .map(|(name, progress)| ProjectionStatus {
                name: name.clone(),
                checkpoint: progress.next_offset,
                lag: lag_of(progress.next_offset),
                lag_seconds: lag_seconds_of(progress),
                halted: progress.halted.clone(),
                applied: progress.applied,
                dead_letters: progress.dead_letters,
                last_applied_at: progress
                    .last_applied_at
                    .map(|at| humantime::format_rfc3339_seconds(at).to_string()),
                definition_changed: progress.frozen,
                rebuild: None,
            })
            .collect();
        for (member, progress) in &p.projections {
            let Some(live) = rebuilt_projection(member) else {
                continue;
            };
            if let Some(status) = projections.iter_mut().find(|pr| pr.name == live) {
                status.rebuild = Some(RebuildStatus {
                    checkpoint: progress.next_offset,
                    lag: lag_of(progress.next_offset),
                    halted: progress.halted.clone(),
                    dead_letters: progress.dead_letters,
                });
            }
        }
        // The lag of the projections still running: a halted one waits for an operator, and
        // one whose definition changed waits for its rebuild.
        let lag = projections
            .iter()
            .filter(|pr| pr.halted.is_none() && !pr.definition_changed)
            .filter_map(|pr| pr.lag)
            .max();
        let stalled_for = p.moved_at.map(|at| at.elapsed()).filter(|still| {
            let running = matches!(
                state,
                FeedState::Starting
                    | FeedState::CatchingUp
                    | FeedState::Live
                    | FeedState::BackingOff
            );
            running
                && lag.is_some_and(|lag| lag > 0)
                && p.stall_after.is_some_and(|after| *still >= after)
        });
        if stalled_for.is_some() {
            state = FeedState::Stalled;
        }
        let events_per_second = rate(&p.samples, p.events_seen, Instant::now());
        let eta_seconds = match (state, lag) {
            (FeedState::CatchingUp, Some(lag)) if p.head_exact && events_per_second >= 1.0 => {
                Some((lag as f64 / events_per_second).ceil() as u64)
            }
            _ => None,
        };
        FeedStatus {
            name: self.feed.clone(),
            url: url.to_string(),
            state,
            paused,
            halted_reason: p.halted_reason(),
            head: p.head,
            head_exact: p.head_exact,
            lag,
            events_per_second,
            eta_seconds,
            events_read: p.events_read,
            retries: p.retries,
            last_error: p.last_error.as_ref().map(|(message, at)| LastError {
                message: message.clone(),
                at: humantime::format_rfc3339_seconds(*at).to_string(),
            }),
            hint: p.hints.given.clone(),
            reached_head: p.reached_head,
            stalled_seconds: stalled_for.map(|d| d.as_secs()),
            lease_holder: None,
            projections,
        }
    }
}

#[cfg(test)]
mod tests;
