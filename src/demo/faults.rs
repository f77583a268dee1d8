//! The faults the embedded feed server injects on request: what a flaky network, a flaky server
//! and a hostile one answer. Each fault is a way to turn the real response into a wrong one.

use std::collections::VecDeque;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

/// A way for one response to go wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// This HTTP status, with a short text body.
    Status(u16),
    /// This status (429 or 503) with `Retry-After: seconds`.
    RetryAfter { status: u16, seconds: u32 },
    /// Half the real response, then the connection breaks.
    ResetMidBody,
    /// Accept the request and never answer.
    Hang,
    /// Status 200 and the first half of the real response (JSON cut short). A transport-level
    /// cut is `ResetMidBody`.
    Truncated,
    /// Status 200 and text that is not JSON.
    InvalidJson,
    /// Status 200 and JSON that is not a page (`events` is not an array).
    WrongShape,
    /// Status 200 and a page whose entries lack `event_id` and `url` (pages only).
    MissingFields,
    /// Status 200 and a page whose `aggregate_version` is a string (pages only).
    WrongTypes,
    /// Status 200 and the real page with its first entry repeated (pages only).
    RepeatedId,
    /// Status 200 and a body streamed without a Content-Length, 64 MiB of it.
    Oversized,
    /// Status 200, `Content-Encoding: gzip`, a small body that inflates to 64 MiB.
    GzipBomb,
    /// A redirect to the URL itself, for ever.
    RedirectLoop,
    /// A redirect to the same path on the server set with `FeedServer::redirect_elsewhere_to`.
    RedirectElsewhere,
    /// Status 200 and the real response with a byte that is not UTF-8 in its first string.
    NotUtf8,
    /// Status 200 and a proxy's HTML error page.
    HtmlPage,
    /// Status 200 and `null`: Flux's answer for an event id it does not know.
    NullBody,
}

/// Which requests a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Pages,
    Bodies,
}

/// Faults that clear by themselves when retried, per target: what a flaky network and a flaky
/// server do. (Not `Hang`: it costs a whole request timeout.)
pub const TRANSIENT_PAGE_FAULTS: &[Fault] = &[
    Fault::Status(500),
    Fault::Status(502),
    Fault::RetryAfter {
        status: 503,
        seconds: 0,
    },
    Fault::RetryAfter {
        status: 429,
        seconds: 0,
    },
    Fault::ResetMidBody,
    Fault::Truncated,
    Fault::InvalidJson,
    Fault::WrongShape,
    Fault::HtmlPage,
];
pub const TRANSIENT_BODY_FAULTS: &[Fault] = &[
    Fault::Status(500),
    Fault::Status(404),
    Fault::RetryAfter {
        status: 503,
        seconds: 0,
    },
    Fault::ResetMidBody,
    Fault::Truncated,
    Fault::InvalidJson,
    Fault::HtmlPage,
    Fault::NullBody,
];

/// The faults still to inject: scripted ones first, then random ones at a rate.
#[derive(Default)]
pub(super) struct Faults {
    pub(super) scripted: VecDeque<(Target, Fault)>,
    pub(super) random: Option<(fastrand::Rng, f64)>,
}

impl Faults {
    pub(super) fn take(&mut self, target: Target) -> Option<Fault> {
        if let Some(index) = self.scripted.iter().position(|(t, _)| *t == target) {
            return self.scripted.remove(index).map(|(_, fault)| fault);
        }
        let (rng, rate) = self.random.as_mut()?;
        if rng.f64() >= *rate {
            return None;
        }
        let choices = match target {
            Target::Pages => TRANSIENT_PAGE_FAULTS,
            Target::Bodies => TRANSIENT_BODY_FAULTS,
        };
        Some(choices[rng.usize(..choices.len())])
    }
}

/// The response `fault` makes of the real response text `real`.
pub(super) async fn faulty(fault: Fault, real: String, uri: &axum::http::Uri) -> Response {
    let half = real.as_bytes()[..real.len() / 2].to_vec();
    match fault {
        Fault::Status(code) => (
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "injected fault",
        )
            .into_response(),
        Fault::RetryAfter { status, seconds } => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            [(header::RETRY_AFTER, seconds.to_string())],
            "slow down",
        )
            .into_response(),
        Fault::ResetMidBody => {
            let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
                Ok(Bytes::from(half)),
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "injected reset",
                )),
            ];
            Response::new(Body::from_stream(futures_util::stream::iter(chunks)))
        }
        Fault::Hang => {
            // Long enough to outlast any client timeout; the test ends first.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        Fault::Truncated => (
            [(header::CONTENT_TYPE, "application/json")],
            Bytes::from(half),
        )
            .into_response(),
        Fault::InvalidJson => (
            [(header::CONTENT_TYPE, "application/json")],
            "{\"events\": [",
        )
            .into_response(),
        Fault::WrongShape => (
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"events": {"not": "an array"}}"#,
        )
            .into_response(),
        Fault::HtmlPage => (
            [(header::CONTENT_TYPE, "text/html")],
            "<html><body><h1>502 Bad Gateway</h1></body></html>",
        )
            .into_response(),
        Fault::NullBody => "null\n".into_response(),
        Fault::MissingFields => (
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"events": [{"event_type": "account.AccountCreated"}]}"#,
        )
            .into_response(),
        Fault::WrongTypes => (
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"events": [{"event_id": "e", "url": "http://x/e", "event_type": "t", "aggregate_version": "seven"}]}"#,
        )
            .into_response(),
        Fault::RepeatedId => {
            let mut page: serde_json::Value = serde_json::from_str(&real).unwrap_or_default();
            if let Some(events) = page["events"].as_array_mut() {
                if let Some(first) = events.first().cloned() {
                    events.push(first);
                }
            }
            ([(header::CONTENT_TYPE, "application/json")], page.to_string()).into_response()
        }
        Fault::Oversized => {
            // JSON whitespace: a client that buffered it all and parsed afterwards would accept
            // the page at the end; only a limit enforced while streaming refuses it.
            let chunk = Bytes::from(vec![b' '; 1 << 20]);
            let chunks = (0..64)
                .map(move |_| Ok::<_, std::io::Error>(chunk.clone()))
                .chain(std::iter::once(Ok(Bytes::from(real))));
            Response::new(Body::from_stream(futures_util::stream::iter(chunks)))
        }
        Fault::GzipBomb => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CONTENT_ENCODING, "gzip"),
            ],
            gzip_bomb(),
        )
            .into_response(),
        Fault::NotUtf8 => {
            let mut bytes = real.into_bytes();
            if let Some(quote) = bytes.iter().position(|&b| b == b'"') {
                bytes.insert(quote + 1, 0xFF);
            }
            (
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                Bytes::from(bytes),
            )
                .into_response()
        }
        Fault::RedirectLoop => (
            StatusCode::FOUND,
            [(header::LOCATION, uri.to_string())],
            "",
        )
            .into_response(),
        // The feed server answers this one itself: it knows where elsewhere is.
        Fault::RedirectElsewhere => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// 64 MiB of JSON whitespace, gzipped to about 64 KiB; made once.
fn gzip_bomb() -> Bytes {
    static BOMB: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    BOMB.get_or_init(|| {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let block = vec![b' '; 1 << 20];
        for _ in 0..64 {
            // Writing to a Vec cannot fail.
            let _ = encoder.write_all(&block);
        }
        Bytes::from(encoder.finish().unwrap_or_default())
    })
    .clone()
}
