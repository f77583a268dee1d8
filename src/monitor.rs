//! The live status of a feed, for `status`, the systemd STATUS line and the pause handshake.
//!
//! A feed's readers report into one [`FeedMonitor`] (a `watch` channel, so that the supervisor
//! can wait for a condition such as "every reader has parked"); the supervisor turns it into a
//! [`FeedStatus`] snapshot on demand. Nothing here decides what is applied: checkpoints shown are
//! the ones the writer reported committed.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use crate::control::protocol::{FeedState, FeedStatus, LastError, ProjectionStatus};
use crate::feed::error::FetchError;
use crate::store::Checkpoint;
use crate::writer::Halt;

/// The window the recent rate is measured over.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// What one reader of a feed is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReaderPhase {
    Starting,
    CatchingUp,
    Live,
    Paused,
    Halted(String),
    Stopped,
}

impl ReaderPhase {
    /// A reader in this phase makes no requests and no writes.
    fn is_parked(&self) -> bool {
        matches!(
            self,
            ReaderPhase::Paused | ReaderPhase::Halted(_) | ReaderPhase::Stopped
        )
    }
}

/// The readers of one feed report here; the supervisor reads it.
pub struct FeedMonitor {
    feed: String,
    progress: watch::Sender<Progress>,
}

#[derive(Debug, Default)]
struct Progress {
    readers: Vec<ReaderPhase>,
    projections: BTreeMap<String, ProjectionProgress>,
    head: Option<u64>,
    events_read: u64,
    /// (when, events_read then), oldest first, covering a little more than RATE_WINDOW.
    samples: VecDeque<(Instant, u64)>,
    retries: u64,
    streak: Option<Streak>,
    /// The last batch was refused by the database; the next commit clears it.
    commit_failing: bool,
    last_error: Option<(String, SystemTime)>,
}

#[derive(Debug, Default)]
struct ProjectionProgress {
    next_offset: u64,
    halted: Option<String>,
}

/// A run of failed requests, logged when it starts and when it ends rather than per retry.
#[derive(Debug)]
struct Streak {
    since: Instant,
    failures: u64,
}

impl FeedMonitor {
    /// A monitor for `feed`, whose projections start at the given checkpoints.
    pub fn new(feed: &str, projections: impl IntoIterator<Item = (String, u64)>) -> FeedMonitor {
        let progress = Progress {
            projections: projections
                .into_iter()
                .map(|(name, next_offset)| {
                    let progress = ProjectionProgress {
                        next_offset,
                        halted: None,
                    };
                    (name, progress)
                })
                .collect(),
            // The baseline of the rate, so that the first batch counts in it.
            samples: [(Instant::now(), 0)].into(),
            ..Progress::default()
        };
        FeedMonitor {
            feed: feed.to_string(),
            progress: watch::Sender::new(progress),
        }
    }

    /// Takes over the counters of the monitor this one replaces (on reload): events read, the
    /// rate's samples, retries and the last error, and the head if the feed is the same one.
    pub fn carry_over(&self, previous: &FeedMonitor, same_feed: bool) {
        let old = previous.progress.borrow();
        self.progress.send_modify(|p| {
            p.events_read = old.events_read;
            p.samples = old.samples.clone();
            p.retries = old.retries;
            p.last_error = old.last_error.clone();
            if same_feed {
                p.head = old.head;
            }
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
                    true
                }
                _ => false,
            });
    }

    /// Waits until no reader makes requests or writes any more.
    pub async fn parked(&self) {
        let mut receiver = self.progress.subscribe();
        // The sender lives in `self`, so this cannot fail.
        let _ = receiver
            .wait_for(|p| p.readers.iter().all(ReaderPhase::is_parked))
            .await;
    }

    /// A page ending just before `end` was read (`end` is the offset of the head when the page
    /// was empty).
    pub fn saw_feed_up_to(&self, end: u64) {
        self.progress.send_if_modified(|p| {
            if p.head.is_some_and(|head| head >= end) {
                return false;
            }
            p.head = Some(end);
            true
        });
    }

    /// A batch of `events` events committed, leaving these projections at these checkpoints.
    pub fn committed(&self, events: usize, checkpoints: &[(String, Checkpoint)], halts: &[Halt]) {
        let now = Instant::now();
        self.progress.send_modify(|p| {
            p.commit_failing = false;
            p.events_read += events as u64;
            p.samples.push_back((now, p.events_read));
            while p
                .samples
                .get(1)
                .is_some_and(|&(at, _)| now.duration_since(at) > RATE_WINDOW)
            {
                p.samples.pop_front();
            }
            for (name, checkpoint) in checkpoints {
                if let Some(projection) = p.projections.get_mut(name) {
                    projection.next_offset = checkpoint.next_offset;
                }
            }
            for halt in halts {
                if let Some(projection) = p.projections.get_mut(&halt.projection) {
                    projection.halted = Some(format!(
                        "event {} ({}) at offset {}: {}",
                        halt.event_id, halt.event_type, halt.offset, halt.error
                    ));
                }
            }
        });
    }

    /// A request failed and will be retried.
    pub fn failed(&self, err: &FetchError) {
        let message = err.to_string();
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
            p.last_error = Some((message, SystemTime::now()));
        });
    }

    /// A batch did not commit (the database refused it): counted, shown as the last error and
    /// as the feed's state until a batch commits; the reader logs it and retries.
    pub fn commit_failed(&self, message: String) {
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
        let halted_reason = p.readers.iter().find_map(|phase| match phase {
            ReaderPhase::Halted(reason) => Some(reason.clone()),
            _ => None,
        });
        let all_halted = !p.readers.is_empty()
            && p.readers
                .iter()
                .all(|phase| matches!(phase, ReaderPhase::Halted(_)));
        let state = if p.readers.is_empty() {
            FeedState::Idle
        } else if paused {
            if p.readers.iter().all(ReaderPhase::is_parked) {
                FeedState::Paused
            } else {
                FeedState::Pausing
            }
        } else if all_halted {
            FeedState::Halted
        } else if p.commit_failing {
            FeedState::CommitFailing
        } else if p.streak.is_some() {
            FeedState::BackingOff
        } else if p.readers.contains(&ReaderPhase::CatchingUp) {
            FeedState::CatchingUp
        } else if p.readers.contains(&ReaderPhase::Starting) {
            FeedState::Starting
        } else {
            FeedState::Live
        };
        let lag_of = |next_offset: u64| p.head.map(|head| head.saturating_sub(next_offset));
        let projections: Vec<ProjectionStatus> = p
            .projections
            .iter()
            .map(|(name, progress)| ProjectionStatus {
                name: name.clone(),
                checkpoint: progress.next_offset,
                lag: lag_of(progress.next_offset),
                halted: progress.halted.clone(),
            })
            .collect();
        let lag = projections.iter().filter_map(|pr| pr.lag).max();
        FeedStatus {
            name: self.feed.clone(),
            url: url.to_string(),
            state,
            paused,
            halted_reason,
            head: p.head,
            lag,
            events_per_second: rate(&p.samples, p.events_read, Instant::now()),
            events_read: p.events_read,
            retries: p.retries,
            last_error: p.last_error.as_ref().map(|(message, at)| LastError {
                message: message.clone(),
                at: humantime::format_rfc3339_seconds(*at).to_string(),
            }),
            projections,
        }
    }
}

/// Events per second over the last RATE_WINDOW, from cumulative samples (oldest first).
fn rate(samples: &VecDeque<(Instant, u64)>, events_now: u64, now: Instant) -> f64 {
    // The baseline is the newest sample at least a window old, or the oldest one there is.
    let baseline = samples
        .iter()
        .rev()
        .find(|(at, _)| now.duration_since(*at) >= RATE_WINDOW)
        .or_else(|| samples.front());
    let Some(&(since, events_then)) = baseline else {
        return 0.0;
    };
    // At least a second, so that the first batch after start does not read as a huge rate.
    let span = now.duration_since(since).max(Duration::from_secs(1));
    events_now.saturating_sub(events_then) as f64 / span.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(next_offset: u64) -> Checkpoint {
        Checkpoint {
            next_offset,
            last_event_id: Some(format!("e{}", next_offset - 1)),
        }
    }

    #[test]
    fn state_follows_the_readers_and_the_pause() {
        let monitor = FeedMonitor::new("bank", [("a".to_string(), 0), ("b".to_string(), 0)]);
        assert_eq!(monitor.snapshot("u", false).state, FeedState::Idle);
        let first = monitor.add_reader();
        let second = monitor.add_reader();
        assert_eq!(monitor.snapshot("u", false).state, FeedState::Starting);
        monitor.set_phase(first, ReaderPhase::CatchingUp);
        monitor.set_phase(second, ReaderPhase::Live);
        assert_eq!(monitor.snapshot("u", false).state, FeedState::CatchingUp);
        monitor.set_phase(first, ReaderPhase::Live);
        assert_eq!(monitor.snapshot("u", false).state, FeedState::Live);

        monitor.failed(
            &crate::feed::error::FetchErrorKind::Status {
                status: hyper::StatusCode::INTERNAL_SERVER_ERROR,
                retry_after: None,
            }
            .fetching("page at offset 0".into()),
        );
        let status = monitor.snapshot("u", false);
        assert_eq!(status.state, FeedState::BackingOff);
        assert_eq!(status.retries, 1);
        assert!(status
            .last_error
            .is_some_and(|e| e.message.contains("HTTP 500")));
        monitor.recovered();
        assert_eq!(monitor.snapshot("u", false).state, FeedState::Live);
        monitor.commit_failed("batch not committed: disk full".into());
        let status = monitor.snapshot("u", false);
        assert_eq!(status.state, FeedState::CommitFailing);
        assert_eq!(status.retries, 2);
        assert!(status
            .last_error
            .is_some_and(|e| e.message.contains("disk full")));

        monitor.set_phase(first, ReaderPhase::Paused);
        assert_eq!(monitor.snapshot("u", true).state, FeedState::Pausing);
        monitor.set_phase(second, ReaderPhase::Paused);
        assert_eq!(monitor.snapshot("u", true).state, FeedState::Paused);

        monitor.set_phase(first, ReaderPhase::Halted("rewritten".into()));
        monitor.set_phase(second, ReaderPhase::Halted("rewritten".into()));
        let status = monitor.snapshot("u", false);
        assert_eq!(status.state, FeedState::Halted);
        assert_eq!(status.halted_reason.as_deref(), Some("rewritten"));
    }

    #[test]
    fn lag_is_measured_from_the_furthest_head_seen() {
        let monitor = FeedMonitor::new("bank", [("a".to_string(), 0), ("b".to_string(), 5)]);
        assert_eq!(monitor.snapshot("u", false).lag, None);
        monitor.saw_feed_up_to(20);
        monitor.saw_feed_up_to(10);
        let halt = Halt {
            projection: "b".into(),
            offset: 12,
            event_id: "e12".into(),
            event_type: "t".into(),
            error: "bad".into(),
        };
        monitor.committed(
            12,
            &[("a".into(), checkpoint(12)), ("b".into(), checkpoint(12))],
            &[halt],
        );
        let status = monitor.snapshot("u", false);
        assert_eq!(status.head, Some(20));
        assert_eq!(status.lag, Some(8));
        assert_eq!(status.events_read, 12);
        assert!(status.projections[1]
            .halted
            .as_deref()
            .is_some_and(|h| h.contains("offset 12: bad")));
    }

    #[test]
    fn rate_covers_the_last_window_and_falls_to_zero_when_idle() {
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let samples: VecDeque<_> = [(at(0), 0), (at(10), 1000), (at(20), 3000)].into();
        assert_eq!(rate(&samples, 3000, at(20)), 200.0);
        assert_eq!(rate(&VecDeque::new(), 0, at(5)), 0.0);
        // Nothing read for a long time: the baseline is the last sample, so the rate is 0.
        assert_eq!(rate(&samples, 3000, at(100)), 0.0);
    }
}
