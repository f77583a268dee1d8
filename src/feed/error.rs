//! Why reading a feed failed, as a kind the reader acts on: every kind but a rewritten feed is
//! retried with backoff (the feed may come back, or serve the event whole next time); a
//! rewritten feed halts it, since no retry can make the events it applied the feed's again.

use std::time::Duration;

use hyper::StatusCode;

/// One failed fetch: what was being fetched, and how it failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{what}: {kind}")]
pub struct FetchError {
    pub target: FetchTarget,
    /// What was being fetched, e.g. `page at offset 40 (http://…)`.
    pub what: String,
    pub kind: FetchErrorKind,
}

/// What a fetch asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchTarget {
    Page,
    Body,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FetchErrorKind {
    /// No connection: refused, a host that does not resolve, a TLS handshake refused.
    #[error("could not connect: {0}")]
    Connect(String),
    /// An answer whose status is not 2xx; 429 and 503 may say when to ask again.
    #[error("HTTP {status}")]
    Status {
        status: StatusCode,
        retry_after: Option<Duration>,
    },
    /// The exchange did not complete: a timeout, a reset, a body cut short, a redirect loop.
    #[error("{0}")]
    Transfer(String),
    /// An answer larger than `max_response_bytes`, as received or once inflated.
    #[error("{0}")]
    TooLarge(String),
    /// A whole answer that is not what the format promises: not a page, not JSON, `null`, an
    /// entry that cannot be read.
    #[error("{0}")]
    Unreadable(String),
    /// A URL the feed sent the reader to that it may not follow (`body_origin`), or a redirect
    /// from https to http.
    #[error("refused: {0}")]
    Refused(String),
    /// A page that is not of the configured format, but reads as a page of the other one.
    #[error("the page is not a page of the {configured} format, but reads as one of the {reads_as} format")]
    OtherFormat {
        configured: &'static str,
        reads_as: &'static str,
    },
    /// The feed's head is below events it had (a server restarted empty, a replica behind):
    /// waited out, nothing applied until the events are back.
    #[error("the feed shrank: its head is at offset {head}, but it had events up to offset {last_known}; nothing is applied until they are back")]
    Shrunk { head: u64, last_known: u64 },
    /// Another event stands where one was applied: the feed was rewritten or reset.
    #[error("the feed was rewritten: it had event {expected} at offset {offset}, and now has {found} there")]
    Rewritten {
        offset: u64,
        expected: String,
        found: String,
    },
}

impl FetchErrorKind {
    /// A short name of the failure, for the requests metric's `outcome` label.
    pub fn label(&self) -> &'static str {
        match self {
            FetchErrorKind::Connect(_) => "connect",
            FetchErrorKind::Status { .. } => "status",
            FetchErrorKind::Transfer(_) => "transfer",
            FetchErrorKind::TooLarge(_) => "too_large",
            FetchErrorKind::Unreadable(_) => "unreadable",
            FetchErrorKind::Refused(_) => "refused",
            FetchErrorKind::OtherFormat { .. } => "other_format",
            FetchErrorKind::Shrunk { .. } => "shrunk",
            FetchErrorKind::Rewritten { .. } => "rewritten",
        }
    }

    /// Whether reading goes on by retrying; false when an operator must decide.
    pub fn is_retried(&self) -> bool {
        !matches!(self, FetchErrorKind::Rewritten { .. })
    }

    /// A delay the server asked for (429 or 503 with `Retry-After: <seconds>`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FetchErrorKind::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// This kind, with what was being fetched.
    pub fn fetching(self, target: FetchTarget, what: String) -> FetchError {
        FetchError {
            target,
            what,
            kind: self,
        }
    }
}

/// `what`, then each cause of a failure in turn: the causes say what happened.
pub fn with_causes(what: &str, mut cause: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut text = what.to_string();
    while let Some(err) = cause {
        text.push_str(": ");
        text.push_str(&err.to_string());
        cause = err.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_rewritten_feed_is_not_retried_and_messages_read_as_before() {
        let status = FetchErrorKind::Status {
            status: StatusCode::SERVICE_UNAVAILABLE,
            retry_after: Some(Duration::from_secs(3)),
        };
        assert_eq!(status.retry_after(), Some(Duration::from_secs(3)));
        let error = status.fetching(
            FetchTarget::Page,
            "page at offset 0 (http://feed/events?offset=0)".into(),
        );
        assert_eq!(
            error.to_string(),
            "page at offset 0 (http://feed/events?offset=0): HTTP 503 Service Unavailable"
        );
        assert!(error.kind.is_retried());
        let rewritten = FetchErrorKind::Rewritten {
            offset: 7,
            expected: "a".into(),
            found: "b".into(),
        };
        assert!(!rewritten.is_retried());
        assert!(FetchErrorKind::Shrunk {
            head: 3,
            last_known: 9
        }
        .is_retried());
    }
}
