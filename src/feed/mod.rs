//! Feed clients, one page format per module, and what they share: the page request, the body
//! request, the fetch error and the retry policy.
//!
//! Every format is read the same way: `GET {feed}?offset=N` answers a page of entries starting at
//! that position. A Flux entry says where its payload is (one more request each); an inline entry
//! carries it. The pipeline sees only `PageEntry`, so a format is a page parser and one
//! `FeedFormat` variant.
//!
//! Every fetch error is transient: the feed may come back, so the daemon retries with capped,
//! jittered exponential backoff and never advances past an event it has not applied. What makes a
//! feed halt for good (a rewritten or shrunk feed) is found by the pipeline, not here.

pub mod flux;
pub mod http;
pub mod inline;
pub mod proxy;
#[cfg(feature = "http-ab")]
pub mod reqwest_http;

use std::collections::HashSet;
use std::time::Duration;

use hyper::Uri;
use url::Url;

use crate::config::{FeedConfig, FeedFormat};
use crate::event::Payload;
use http::{parse_uri, GetError, HttpClient, HttpSettings};

/// One entry of a feed page: an event's metadata, and its payload or where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct PageEntry {
    pub event_id: String,
    pub event_type: String,
    pub aggregate_id: String,
    pub aggregate_name: String,
    pub aggregate_version: i64,
    pub created: String,
    pub body: EntryBody,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EntryBody {
    /// Fetched with a request of its own, only if a projection needs it (Flux).
    At(Uri),
    /// Sent in the page (inline feeds).
    Inline(Payload),
}

/// The HTTP client behind a feed client: hyper-util's, or reqwest's for the A/B.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // a few per feed, never moved on the hot path
enum Http {
    Hyper(HttpClient),
    #[cfg(feature = "http-ab")]
    Reqwest(reqwest_http::ReqwestClient),
}

impl Http {
    async fn get(&self, url: &Uri) -> Result<Vec<u8>, GetError> {
        match self {
            Http::Hyper(client) => client.get(url).await,
            #[cfg(feature = "http-ab")]
            Http::Reqwest(client) => client.get(url).await,
        }
    }
}

/// A client for one feed; cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct FeedClient {
    http: Http,
    feed_url: Url,
    format: FeedFormat,
}

impl FeedClient {
    pub fn new(feed: &FeedConfig) -> anyhow::Result<FeedClient> {
        let settings = HttpSettings {
            connect_timeout: feed.connect_timeout.0,
            request_timeout: feed.request_timeout.0,
            max_response_bytes: feed.max_response_bytes.0,
            idle_connections: feed.body_concurrency.0 + 2,
        };
        #[cfg(feature = "http-ab")]
        if std::env::var("PROJECTOR_HTTP_CLIENT").as_deref() == Ok("reqwest") {
            let reqwest = reqwest_http::ReqwestClient::new(settings).map_err(anyhow::Error::msg)?;
            return Ok(FeedClient {
                http: Http::Reqwest(reqwest),
                feed_url: feed.url.0.clone(),
                format: feed.format,
            });
        }
        let http = Http::Hyper(HttpClient::new(settings)?);
        Ok(FeedClient {
            http,
            feed_url: feed.url.0.clone(),
            format: feed.format,
        })
    }

    /// The proxy the feed's pages go through, for the log; `None` when they go directly.
    pub fn proxy(&self) -> Option<String> {
        #[allow(irrefutable_let_patterns)] // without the http-ab feature
        let Http::Hyper(http) = &self.http
        else {
            return None;
        };
        parse_uri(self.feed_url.as_str())
            .ok()
            .and_then(|uri| http.proxy_for(&uri))
    }

    /// The page of entries starting at `offset`; empty at the head of the feed.
    pub async fn fetch_page(&self, offset: u64) -> Result<Vec<PageEntry>, FetchError> {
        let mut url = self.feed_url.clone();
        url.query_pairs_mut()
            .append_pair("offset", &offset.to_string());
        let what = || format!("page at offset {offset} ({url})");
        let uri =
            parse_uri(url.as_str()).map_err(|reason| failed(what(), GetError::new(reason)))?;
        let bytes = self
            .http
            .get(&uri)
            .await
            .map_err(|err| failed(what(), err))?;
        match self.format {
            FeedFormat::Flux => flux::parse_page(&bytes, &self.feed_url),
            FeedFormat::Inline => inline::parse_page(&bytes),
        }
        .map_err(|reason| failed(what(), GetError::new(reason)))
    }

    /// The payload of an entry whose body is `At(url)`, and the size of the body in bytes.
    pub async fn fetch_body(
        &self,
        entry: &PageEntry,
        url: &Uri,
    ) -> Result<(Payload, usize), FetchError> {
        // Described only on failure: formatting it for every body cost about as much as parsing it.
        let what = || format!("body of {} {} ({url})", entry.event_type, entry.event_id);
        let bytes = self
            .http
            .get(url)
            .await
            .map_err(|err| failed(what(), err))?;
        let size = bytes.len();
        Payload::from_json(bytes)
            .map(|payload| (payload, size))
            .map_err(|reason| failed(what(), GetError::new(reason)))
    }
}

/// Why `bytes` is not a page of the `format` named: the parser's reason, and how the body starts.
fn not_a_page(format: &str, bytes: &[u8], err: serde_json::Error) -> String {
    let start = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned();
    format!("the page is not {format} page ({err}); it starts with {start:?}")
}

/// Refuses a page that lists an event id twice: which of the two is the event is unknown.
fn check_unique_ids<'a>(ids: impl ExactSizeIterator<Item = &'a str>) -> Result<(), String> {
    let mut seen = HashSet::with_capacity(ids.len());
    for id in ids {
        if !seen.insert(id) {
            return Err(format!("the page lists event id {id} twice"));
        }
    }
    Ok(())
}

/// A page's entries up to the first one that cannot be read, or why the first one cannot. The
/// events before a bad entry are applied; the next page starts at the bad one, which is then
/// refused, reported and retried on its own.
fn readable_prefix(
    entries: impl Iterator<Item = Result<PageEntry, String>>,
) -> Result<Vec<PageEntry>, String> {
    let mut readable = Vec::with_capacity(entries.size_hint().0);
    for entry in entries {
        match entry {
            Ok(entry) => readable.push(entry),
            Err(reason) if readable.is_empty() => return Err(reason),
            Err(_) => break,
        }
    }
    Ok(readable)
}

fn failed(what: String, err: GetError) -> FetchError {
    FetchError {
        what,
        reason: err.reason,
        retry_after: err.retry_after,
    }
}

/// Why one request to a feed failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct FetchError {
    /// What was being fetched, e.g. `page at offset 40 (http://…)`.
    pub what: String,
    pub reason: String,
    /// A delay the server asked for (429 or 503 with `Retry-After: <seconds>`).
    pub retry_after: Option<Duration>,
}

/// Capped exponential backoff with jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

/// A server may ask for a long pause, but never longer than this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

impl Backoff {
    /// The delay before retry number `attempt` (0 for the first retry): the capped exponential
    /// delay, jittered down by up to half so that many clients do not retry in step, and never
    /// shorter than what the server asked for.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exponential = self
            .initial
            .saturating_mul(2u32.saturating_pow(attempt.min(31)))
            .min(self.max);
        let jittered = exponential.mul_f64(0.5 + fastrand::f64() * 0.5);
        match retry_after {
            Some(asked) => jittered.max(asked.min(MAX_RETRY_AFTER)),
            None => jittered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        for attempt in 0..40 {
            let delay = backoff.delay(attempt, None);
            let ceiling = Duration::from_millis(100 * (1u64 << attempt.min(20))).min(backoff.max);
            assert!(
                delay <= ceiling && delay >= ceiling / 2,
                "{attempt}: {delay:?}"
            );
        }
        let asked = backoff.delay(0, Some(Duration::from_secs(7)));
        assert_eq!(asked, Duration::from_secs(7));
        let absurd = backoff.delay(0, Some(Duration::from_secs(86_400)));
        assert_eq!(absurd, MAX_RETRY_AFTER);
    }
}
