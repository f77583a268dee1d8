//! The status a `status` reply carries: the daemon's, each feed's and each projection's, as
//! `projector ctl status`, `/metrics` and systemd's STATUS line show them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A feed's state as `status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedState {
    /// No projection reads the feed, so it is not polled.
    Idle,
    Starting,
    CatchingUp,
    Live,
    /// Asked to pause; the batch in flight is finishing.
    Pausing,
    Paused,
    /// Requests are failing and being retried with backoff.
    BackingOff,
    /// Batches are not committing (the database is full, read-only or failing): retried
    /// with backoff.
    CommitFailing,
    /// Every reader stopped: a poison event under `on_error = "stop"`, or a rewritten feed.
    Halted,
    /// The checkpoints have not moved for `stall_after` while the head is ahead of them.
    Stalled,
    /// Another daemon on the same PostgreSQL schema holds the feed's lease and applies it; this
    /// one takes over if that one goes.
    Standby,
}

impl FeedState {
    pub fn as_str(self) -> &'static str {
        match self {
            FeedState::Idle => "idle",
            FeedState::Starting => "starting",
            FeedState::CatchingUp => "catching up",
            FeedState::Live => "live",
            FeedState::Pausing => "pausing",
            FeedState::Paused => "paused",
            FeedState::BackingOff => "backing off",
            FeedState::CommitFailing => "commit failing",
            FeedState::Halted => "halted",
            FeedState::Stalled => "stalled",
            FeedState::Standby => "standby",
        }
    }

    /// Every state, for the metric that has one series per state.
    pub const ALL: [FeedState; 11] = [
        FeedState::Idle,
        FeedState::Starting,
        FeedState::CatchingUp,
        FeedState::Live,
        FeedState::Pausing,
        FeedState::Paused,
        FeedState::BackingOff,
        FeedState::CommitFailing,
        FeedState::Halted,
        FeedState::Stalled,
        FeedState::Standby,
    ];

    /// As JSON writes it (`catching_up`), for labels.
    pub fn label(self) -> String {
        self.as_str().replace(' ', "_")
    }
}

/// The whole daemon, as the `status` command reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub version: String,
    pub config: String,
    pub database: String,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub uptime_seconds: u64,
    /// The time of the last configuration reload (SIGHUP or `reload`), if any.
    pub reloaded_at: Option<String>,
    pub feeds: Vec<FeedStatus>,
    /// The batch the writer has been applying for a second or more, if any.
    #[serde(default)]
    pub slow_batch: Option<SlowBatch>,
    /// Log lines lost since start because stderr was closed or full.
    #[serde(default)]
    pub log_lines_dropped: u64,
    /// The daemon is stopping: the batches in flight are finishing.
    #[serde(default)]
    pub stopping: bool,
    /// On PostgreSQL: the daemons sharing the schema and the feeds each holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

/// The daemons sharing one PostgreSQL schema, as this daemon's last lease round found them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This daemon's id (`host:pid`).
    pub this: String,
    /// Every daemon whose session is alive, this one included, by id.
    pub daemons: Vec<ClusterDaemon>,
    /// Why the last lease round failed, if it did (this daemon then holds no lease).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterDaemon {
    pub id: String,
    /// The feeds whose leases it holds; none for a daemon standing by on every feed.
    pub feeds: Vec<String>,
}

/// A batch the writer has been on for a while: its feed, and the projection and event being
/// applied (none while it takes the write lock or commits).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlowBatch {
    pub feed: String,
    pub seconds: u64,
    pub projection: Option<String>,
    pub offset: Option<u64>,
}

impl SlowBatch {
    /// E.g. `feed bank's batch for 45s, now projection endless at offset 13`.
    pub fn describe(&self) -> String {
        let mut text = format!(
            "feed {}'s batch for {}",
            self.feed,
            humantime::format_duration(Duration::from_secs(self.seconds))
        );
        match (&self.projection, self.offset) {
            (Some(projection), Some(offset)) => {
                text.push_str(&format!(", now projection {projection} at offset {offset}"));
            }
            _ => {
                text.push_str(", now outside the projections (taking the write lock or committing)")
            }
        }
        text
    }
}

impl DaemonStatus {
    /// One line for systemd's STATUS=, e.g. `bank: live, lag 0, 312 ev/s; audit: paused`.
    pub fn summary(&self) -> String {
        if self.feeds.is_empty() {
            return "no feeds".into();
        }
        let feeds: Vec<String> = self
            .feeds
            .iter()
            .map(|feed| {
                let mut line = format!("{}: {}", feed.name, feed.state.as_str());
                if let Some(lag) = feed.lag.filter(|_| !feed.paused) {
                    line.push_str(&format!(", lag {lag}"));
                }
                if feed.events_per_second >= 0.5 {
                    line.push_str(&format!(", {:.0} ev/s", feed.events_per_second));
                }
                if let Some(eta) = feed.eta_seconds {
                    line.push_str(&format!(", {} left", eta_text(eta)));
                }
                line
            })
            .collect();
        match &self.slow_batch {
            Some(slow) => format!("writer on {}; {}", slow.describe(), feeds.join("; ")),
            None => feeds.join("; "),
        }
    }
}

/// A time left, rounded to what a person reads: `42s`, `3m 20s`, `2h 5m`.
pub fn eta_text(seconds: u64) -> String {
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m {}s", seconds / 60, seconds % 60),
        _ => format!("{}h {}m", seconds / 3600, seconds % 3600 / 60),
    }
}

/// One feed, as the `status` command reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FeedStatus {
    pub name: String,
    pub url: String,
    pub state: FeedState,
    pub paused: bool,
    /// Why the feed halted, when it did.
    pub halted_reason: Option<String>,
    /// The end of the feed: the offset after its last event.
    pub head: Option<u64>,
    /// Whether `head` was found (an empty page read at it, or probed while catching up) rather
    /// than only seen: false means a lower bound, the end of the last page read.
    #[serde(default)]
    pub head_exact: bool,
    /// Events between the head and the running projection furthest behind.
    pub lag: Option<u64>,
    /// Events the readers went through per second over the last ten seconds (0 when idle).
    pub events_per_second: f64,
    /// Seconds until caught up at the current rate, while catching up to an exact head.
    #[serde(default)]
    pub eta_seconds: Option<u64>,
    /// Events read for the first time since the daemon started (never past the head; a
    /// rebuilding projection's reader reads some again).
    pub events_read: u64,
    /// Failed requests (and batches the database refused) retried since start.
    pub retries: u64,
    pub last_error: Option<LastError>,
    /// What to look at when page requests keep failing the same way (a URL that answers 404, a
    /// host that does not resolve, pages of the other format).
    #[serde(default)]
    pub hint: Option<String>,
    /// Every reader of the feed has been at its head once since the daemon started.
    #[serde(default)]
    pub reached_head: bool,
    /// How long the checkpoints have not moved while the head is ahead of them, once it is
    /// `stall_after` or more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled_seconds: Option<u64>,
    /// On PostgreSQL: the daemon holding the feed's lease (this one, or another), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_holder: Option<String>,
    pub projections: Vec<ProjectionStatus>,
}

impl FeedStatus {
    /// Says where the feed's lease (PostgreSQL) leaves it here: held, its readers starting
    /// until they say more; or held by another daemon, which applies it and reports its lag (the
    /// lag this daemon last saw is not the feed's, so no alert fires on it here). A pause is the
    /// feed's, wherever it runs, and said first.
    pub fn under_lease(&mut self, held_here: bool) {
        let paused_or = |other| {
            if self.paused {
                FeedState::Paused
            } else {
                other
            }
        };
        if held_here {
            if self.state == FeedState::Idle {
                self.state = paused_or(FeedState::Starting);
            }
            return;
        }
        self.state = paused_or(FeedState::Standby);
        self.lag = None;
        self.eta_seconds = None;
        self.stalled_seconds = None;
        for projection in &mut self.projections {
            projection.lag = None;
            projection.lag_seconds = None;
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastError {
    pub message: String,
    /// RFC 3339, UTC.
    pub at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProjectionStatus {
    pub name: String,
    /// The offset of the next event this projection applies (= events applied or passed).
    pub checkpoint: u64,
    pub lag: Option<u64>,
    /// How old the last event it applied is (now minus the event's `created`), 0 at the head;
    /// None where the feed gives no time it can read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
    /// The poison event and error that halted it, when it is halted.
    pub halted: Option<String>,
    /// Events it applied since the daemon started.
    #[serde(default)]
    pub applied: u64,
    /// Its events recorded in `projector_dead_letters`, in all.
    #[serde(default)]
    pub dead_letters: u64,
    /// When it last applied an event (RFC 3339, UTC), since the daemon started.
    #[serde(default)]
    pub last_applied_at: Option<String>,
    /// Its definition changed since its tables were built: they are served as they are, not
    /// updated, until its rebuild replaces them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub definition_changed: bool,
    /// The rebuild in progress, if one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<RebuildStatus>,
}

/// A rebuild's progress: its shadow replaces the live tables once it reaches the live
/// checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RebuildStatus {
    /// The offset of the next event the rebuild applies.
    pub checkpoint: u64,
    /// Events left to the feed's head, once the head is known.
    pub lag: Option<u64>,
    /// The poison event and error that halted the rebuild, when it is halted.
    pub halted: Option<String>,
    #[serde(default)]
    pub dead_letters: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_batch_says_where_the_writer_is_and_leads_the_systemd_status() {
        let mut slow = SlowBatch {
            feed: "bank".into(),
            seconds: 45,
            projection: Some("endless".into()),
            offset: Some(13),
        };
        assert_eq!(
            slow.describe(),
            "feed bank's batch for 45s, now projection endless at offset 13"
        );
        slow.projection = None;
        slow.offset = None;
        assert_eq!(
            slow.describe(),
            "feed bank's batch for 45s, now outside the projections (taking the write lock or committing)"
        );

        let status = DaemonStatus {
            pid: 1,
            version: "0".into(),
            config: "c".into(),
            database: "d".into(),
            started_at: "s".into(),
            uptime_seconds: 0,
            reloaded_at: None,
            feeds: vec![FeedStatus {
                name: "bank".into(),
                url: "http://feed.example/events".into(),
                state: FeedState::CatchingUp,
                paused: false,
                halted_reason: None,
                head: None,
                head_exact: false,
                lag: None,
                events_per_second: 0.0,
                eta_seconds: None,
                events_read: 0,
                retries: 0,
                last_error: None,
                hint: None,
                reached_head: false,
                stalled_seconds: None,
                lease_holder: None,
                projections: Vec::new(),
            }],
            slow_batch: Some(slow),
            log_lines_dropped: 0,
            stopping: false,
            cluster: None,
        };
        let summary = status.summary();
        assert!(
            summary.starts_with("writer on feed bank's batch for 45s, now outside")
                && summary.contains("committing); bank: "),
            "{summary}"
        );
    }
}
