//! The control protocol: one JSON request per line in, one JSON reply per line out, and the
//! status a reply carries. These are the types `projector ctl`, the daemon and any other client
//! share, so they import nothing of the daemon's.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One request: `{"command": "status"}`, `{"command": "pause", "feed": "bank"}`, ...
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RequestLine", into = "RequestLine")]
pub enum Request {
    /// Every feed's state, checkpoints, head, lag, rate and last error.
    Status,
    /// Pause one feed, or all of them without `feed`. The reply comes once it has taken effect.
    Pause { feed: Option<String> },
    /// Resume one feed, or all of them without `feed`.
    Resume { feed: Option<String> },
    /// Reload the configuration file, as SIGHUP does, and say whether it was taken.
    Reload,
    /// Rebuild a projection from the feed's start into a shadow that replaces its tables once
    /// caught up; or, with `cancel`, drop the rebuild in progress.
    Rebuild { projection: String, cancel: bool },
    /// Move the event a halted projection stopped at into the dead letters, and go on.
    Skip { projection: String },
    /// Move a projection's checkpoint to `offset`, replaying from there without a shadow.
    Reset { projection: String, offset: u64 },
    /// Stop gracefully. The reply comes first; the connection closes when the daemon has exited.
    Stop,
}

/// A request as written on the wire; [`Request`] is what it must mean.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestLine {
    command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    feed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    projection: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    cancel: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
}

const COMMANDS: &str = "status, pause, resume, reload, rebuild, skip, reset, stop";

impl TryFrom<RequestLine> for Request {
    type Error = String;

    fn try_from(line: RequestLine) -> Result<Request, String> {
        let projection_request = match (line.command.as_str(), line.projection.clone()) {
            ("rebuild", Some(projection)) if line.offset.is_none() => Some(Request::Rebuild {
                projection,
                cancel: line.cancel,
            }),
            ("skip", Some(projection)) if line.offset.is_none() && !line.cancel => {
                Some(Request::Skip { projection })
            }
            ("reset", Some(projection)) if !line.cancel => line
                .offset
                .map(|offset| Request::Reset { projection, offset }),
            _ => None,
        };
        if let Some(request) = projection_request {
            return match line.feed {
                Some(_) => Err(format!("{:?} takes no feed", line.command)),
                None => Ok(request),
            };
        }
        match line.command.as_str() {
            "rebuild" => {
                return Err("\"rebuild\" takes a projection (and cancel: true to cancel)".into())
            }
            "skip" => return Err("\"skip\" takes a projection".into()),
            "reset" => return Err("\"reset\" takes a projection and an offset".into()),
            _ => {}
        }
        if line.projection.is_some() || line.cancel || line.offset.is_some() {
            return Err(format!("{:?} takes no projection", line.command));
        }
        let request = match line.command.as_str() {
            "status" => Request::Status,
            "pause" => return Ok(Request::Pause { feed: line.feed }),
            "resume" => return Ok(Request::Resume { feed: line.feed }),
            "reload" => Request::Reload,
            "stop" => Request::Stop,
            other => return Err(format!("unknown command {other:?} (commands: {COMMANDS})")),
        };
        match line.feed {
            Some(_) => Err(format!("{:?} takes no feed", line.command)),
            None => Ok(request),
        }
    }
}

impl From<Request> for RequestLine {
    fn from(request: Request) -> RequestLine {
        let line = |command: &str, feed: Option<String>| RequestLine {
            command: command.to_string(),
            feed,
            projection: None,
            cancel: false,
            offset: None,
        };
        match request {
            Request::Status => line("status", None),
            Request::Pause { feed } => line("pause", feed),
            Request::Resume { feed } => line("resume", feed),
            Request::Reload => line("reload", None),
            Request::Stop => line("stop", None),
            Request::Rebuild { projection, cancel } => RequestLine {
                projection: Some(projection),
                cancel,
                ..line("rebuild", None)
            },
            Request::Skip { projection } => RequestLine {
                projection: Some(projection),
                ..line("skip", None)
            },
            Request::Reset { projection, offset } => RequestLine {
                projection: Some(projection),
                offset: Some(offset),
                ..line("reset", None)
            },
        }
    }
}

impl Request {
    /// Parses one request line; the error says what was wrong, for the reply.
    pub fn parse(line: &[u8]) -> Result<Request, String> {
        let bad = |err: String| {
            format!("bad request: {err}; send one JSON object per line, like {{\"command\":\"status\"}}")
        };
        let text = std::str::from_utf8(line).map_err(|_| bad("the request is not UTF-8".into()))?;
        let value: serde_json::Value =
            serde_json::from_str(text.trim()).map_err(|err| bad(err.to_string()))?;
        if !value.is_object() {
            return Err(bad("the request is not a JSON object".into()));
        }
        serde_json::from_value(value).map_err(|err| bad(err.to_string()))
    }
}

/// One reply: `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What was done, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The feeds a pause or resume applied to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feeds: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DaemonStatus>,
}

impl Reply {
    pub fn done(message: impl Into<String>) -> Reply {
        Reply {
            ok: true,
            message: Some(message.into()),
            ..Reply::default()
        }
    }

    pub fn error(error: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(error.into()),
            ..Reply::default()
        }
    }

    /// The reply as one line of the protocol.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self)
            .unwrap_or_else(|_| br#"{"ok":false,"error":"reply not serialisable"}"#.to_vec());
        line.push(b'\n');
        line
    }
}

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
    fn requests_parse_and_bad_ones_say_why() {
        assert_eq!(
            Request::parse(br#"{"command":"status"}"#),
            Ok(Request::Status)
        );
        assert_eq!(
            Request::parse(b"{\"command\": \"pause\", \"feed\": \"bank\"}\n"),
            Ok(Request::Pause {
                feed: Some("bank".into())
            })
        );
        assert_eq!(
            Request::parse(br#"{"command":"resume"}"#),
            Ok(Request::Resume { feed: None })
        );
        for (bad, says) in [
            (&b"not json"[..], "bad request"),
            (
                br#"{"command":"explode"}"#,
                "unknown command \"explode\" (commands: status",
            ),
            (br#"{"feed":"bank"}"#, "command"),
            (br#"{"command":"stop","now":true}"#, "unknown field"),
            (br#"{"command":"stop","feed":"bank"}"#, "takes no feed"),
            (br#"["status"]"#, "bad request"),
            (br#"{"command":"pause","feed":7}"#, "invalid type"),
            (b"\xff\xfe", "UTF-8"),
            (b"", "bad request"),
            (br#"{"command":"rebuild"}"#, "takes a projection"),
            (br#"{"command":"reset","projection":"p"}"#, "and an offset"),
            (
                br#"{"command":"status","projection":"p"}"#,
                "takes no projection",
            ),
        ] {
            let err = Request::parse(bad).err().unwrap_or_default();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn projection_requests_round_trip() -> anyhow::Result<()> {
        for request in [
            Request::Rebuild {
                projection: "p".into(),
                cancel: true,
            },
            Request::Skip {
                projection: "p".into(),
            },
            Request::Reset {
                projection: "p".into(),
                offset: 42,
            },
        ] {
            let line = serde_json::to_string(&request)?;
            assert_eq!(Request::parse(line.as_bytes()), Ok(request), "{line}");
        }
        Ok(())
    }

    #[test]
    fn requests_round_trip_as_documented() -> anyhow::Result<()> {
        let pause = serde_json::to_string(&Request::Pause {
            feed: Some("bank".into()),
        })?;
        assert_eq!(pause, r#"{"command":"pause","feed":"bank"}"#);
        assert_eq!(
            serde_json::to_string(&Request::Stop)?,
            r#"{"command":"stop"}"#
        );
        Ok(())
    }

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
