//! What a feed's readers have reported (their phases, the head, the projections' progress, the
//! failures under way), and the state, halt reason and rate it adds up to.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;

use super::hint::HintRun;
use crate::control::protocol::FeedState;

/// The window the recent rate is measured over.
pub(super) const RATE_WINDOW: Duration = Duration::from_secs(10);

/// What one reader of a feed is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReaderPhase {
    Starting,
    CatchingUp,
    Live,
    Paused,
    /// The feed cannot be read correctly any more (it was rewritten): an operator must look.
    Halted(String),
    /// Every projection this reader applied has halted on a poison event; it reads no more.
    ProjectionsHalted,
    Stopped,
}

impl ReaderPhase {
    /// A reader in this phase makes no requests and no writes.
    pub(super) fn is_parked(&self) -> bool {
        matches!(
            self,
            ReaderPhase::Paused
                | ReaderPhase::Halted(_)
                | ReaderPhase::ProjectionsHalted
                | ReaderPhase::Stopped
        )
    }

    pub(super) fn is_halted(&self) -> bool {
        matches!(
            self,
            ReaderPhase::Halted(_) | ReaderPhase::ProjectionsHalted
        )
    }
}

#[derive(Debug, Default)]
pub(super) struct Progress {
    pub(super) readers: Vec<ReaderPhase>,
    /// The head probe has a request under way.
    pub(super) probing: bool,
    pub(super) projections: BTreeMap<String, ProjectionProgress>,
    pub(super) head: Option<u64>,
    /// `head` was found (an empty page read there, or probed), not only seen.
    pub(super) head_exact: bool,
    /// The events before this offset have been read since start.
    pub(super) read_up_to: u64,
    /// Events read for the first time since start.
    pub(super) events_read: u64,
    /// Events the readers went through since start, read again or not (the rate's measure).
    pub(super) events_seen: u64,
    /// (when, events_seen then), oldest first, covering a little more than RATE_WINDOW.
    pub(super) samples: VecDeque<(Instant, u64)>,
    pub(super) retries: u64,
    pub(super) streak: Option<Streak>,
    pub(super) hints: HintRun,
    /// The last batch was refused by the database; the next commit clears it.
    pub(super) commit_failing: bool,
    pub(super) last_error: Option<(String, SystemTime)>,
    /// Every reader has been at the head at once, since start.
    pub(super) reached_head: bool,
    /// When a checkpoint last moved (or the monitor started).
    pub(super) moved_at: Option<Instant>,
    /// How long the checkpoints may stand still while the head is ahead before the feed is
    /// `stalled`.
    pub(super) stall_after: Option<Duration>,
}

#[derive(Debug, Default)]
pub(super) struct ProjectionProgress {
    pub(super) next_offset: u64,
    /// Not read until its rebuild is done (see `StartingPoint::frozen`).
    pub(super) frozen: bool,
    pub(super) halted: Option<String>,
    pub(super) applied: u64,
    pub(super) dead_letters: u64,
    pub(super) last_applied_at: Option<SystemTime>,
    /// The `created` time of the last event it went past, where the feed gives one it reads.
    pub(super) last_created: Option<SystemTime>,
    /// Its series of the process's metrics.
    pub(super) applied_total: Counter,
    pub(super) dead_letters_total: Counter,
}

/// A run of failed requests, logged when it starts and when it ends rather than per retry.
#[derive(Debug)]
pub(super) struct Streak {
    pub(super) since: Instant,
    pub(super) failures: u64,
}

impl Progress {
    /// The head moves to `head`: if the projections were all at the old one, the time they
    /// stand still behind the head starts now, not at their last move.
    pub(super) fn note_head_moving(&mut self, head: u64) {
        let caught_up = match self.head {
            None => true,
            Some(old) => self
                .projections
                .values()
                .filter(|p| p.halted.is_none() && !p.frozen)
                .all(|p| p.next_offset >= old),
        };
        if caught_up && self.head.is_none_or(|old| head > old) {
            self.moved_at = Some(Instant::now());
        }
    }

    pub(super) fn state(&self, paused: bool) -> FeedState {
        let readers = &self.readers;
        if readers.is_empty() {
            FeedState::Idle
        } else if paused {
            if readers.iter().all(ReaderPhase::is_parked) {
                FeedState::Paused
            } else {
                FeedState::Pausing
            }
        } else if readers.iter().all(ReaderPhase::is_halted) {
            FeedState::Halted
        } else if self.commit_failing {
            FeedState::CommitFailing
        } else if self.streak.is_some() {
            FeedState::BackingOff
        } else if readers.contains(&ReaderPhase::CatchingUp) {
            FeedState::CatchingUp
        } else if readers.contains(&ReaderPhase::Starting) {
            FeedState::Starting
        } else {
            FeedState::Live
        }
    }

    /// Why the feed halted: a reason of the feed's own (rewritten), or, once every reader has
    /// stopped on halted projections, which ones. A projection halted while others go on is
    /// not the feed halting: its own status says so.
    pub(super) fn halted_reason(&self) -> Option<String> {
        let own = self.readers.iter().find_map(|phase| match phase {
            ReaderPhase::Halted(reason) => Some(reason.clone()),
            _ => None,
        });
        if own.is_some() {
            return own;
        }
        if self.readers.is_empty() || !self.readers.iter().all(ReaderPhase::is_halted) {
            return None;
        }
        let halted: Vec<&str> = self
            .projections
            .iter()
            .filter(|(_, progress)| progress.halted.is_some())
            .map(|(name, _)| name.as_str())
            .collect();
        Some(format!(
            "every projection on this feed has halted on a poison event: {}",
            halted.join(", ")
        ))
    }
}

/// Events per second over the last RATE_WINDOW, from cumulative samples (oldest first).
pub(super) fn rate(samples: &VecDeque<(Instant, u64)>, events_now: u64, now: Instant) -> f64 {
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
