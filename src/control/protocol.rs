//! The control protocol: one JSON request per line in, one JSON reply per line out, and the
//! status a reply carries (`status.rs`). These are the types `projector ctl`, the daemon and any
//! other client share, so they import nothing of the daemon's.

use serde::{Deserialize, Serialize};

pub use super::status::{
    eta_text, ClusterDaemon, ClusterStatus, DaemonStatus, FeedState, FeedStatus, LastError,
    ProjectionStatus, RebuildStatus, SlowBatch,
};

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
}
