//! The Flux feed client: `GET {feed}?offset=N` for a page of entries, `GET {entry.url}` for the
//! payload of one event.
//!
//! It trusts nothing it reads: status codes, sizes (limited while streaming), JSON shape, repeated
//! event ids and `null` bodies (Flux's answer for an unknown id) all come back as a `FetchError`.
//! Bodies may be served as `text/plain` (Go's json.Encoder), so the content type is not checked.

use std::collections::HashSet;

use hyper::Uri;
use serde::Deserialize;
use url::Url;

use super::http::{parse_uri, GetError, HttpClient, HttpSettings};
use super::FetchError;
use crate::config::FeedConfig;
use crate::event::Payload;

/// One entry of a feed page: an event without its payload.
#[derive(Debug, Clone, PartialEq)]
pub struct PageEntry {
    pub event_id: String,
    pub url: Uri,
    pub event_type: String,
    pub aggregate_name: String,
    pub aggregate_version: i64,
    pub created: String,
}

#[derive(Deserialize)]
struct RawPage {
    events: Vec<RawEntry>,
}

#[derive(Deserialize)]
struct RawEntry {
    event_id: String,
    url: String,
    event_type: String,
    #[serde(default)]
    aggregate_name: String,
    #[serde(default)]
    aggregate_version: i64,
    #[serde(default)]
    created: String,
}

/// A client for one Flux feed; cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct FluxClient {
    http: HttpClient,
    feed_url: Url,
}

impl FluxClient {
    pub fn new(feed: &FeedConfig) -> Result<FluxClient, rustls::Error> {
        let http = HttpClient::new(HttpSettings {
            connect_timeout: feed.connect_timeout.0,
            request_timeout: feed.request_timeout.0,
            max_response_bytes: feed.max_response_bytes.0,
            idle_connections: feed.body_concurrency.0 + 2,
        })?;
        Ok(FluxClient {
            http,
            feed_url: feed.url.0.clone(),
        })
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
        parse_page(&bytes, &self.feed_url).map_err(|reason| failed(what(), GetError::new(reason)))
    }

    /// The payload of one event, and the size of its body in bytes.
    pub async fn fetch_body(&self, entry: &PageEntry) -> Result<(Payload, usize), FetchError> {
        // Described only on failure: formatting it for every body cost about as much as parsing it.
        let what = || {
            format!(
                "body of {} {} ({})",
                entry.event_type, entry.event_id, entry.url
            )
        };
        let bytes = self
            .http
            .get(&entry.url)
            .await
            .map_err(|err| failed(what(), err))?;
        let size = bytes.len();
        Payload::from_json(bytes)
            .map(|payload| (payload, size))
            .map_err(|reason| failed(what(), GetError::new(reason)))
    }
}

fn failed(what: String, err: GetError) -> FetchError {
    FetchError {
        what,
        reason: err.reason,
        retry_after: err.retry_after,
    }
}

/// Parses a page body; entry URLs may be absolute or relative to the feed URL.
pub fn parse_page(bytes: &[u8], feed_url: &Url) -> Result<Vec<PageEntry>, String> {
    let page: RawPage = serde_json::from_slice(bytes).map_err(|err| {
        let start = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned();
        format!("the page is not a Flux feed page ({err}); it starts with {start:?}")
    })?;
    let mut seen = HashSet::with_capacity(page.events.len());
    if let Some(twice) = page.events.iter().find(|raw| !seen.insert(&raw.event_id)) {
        return Err(format!("the page lists event id {} twice", twice.event_id));
    }
    page.events
        .into_iter()
        .map(|raw| {
            if raw.event_id.is_empty() || raw.event_type.is_empty() {
                return Err("the page has an entry with an empty event_id or event_type".into());
            }
            let url = entry_uri(feed_url, &raw.url)
                .map_err(|err| format!("entry {} has a bad url: {err}", raw.event_id))?;
            Ok(PageEntry {
                event_id: raw.event_id,
                url,
                event_type: raw.event_type,
                aggregate_name: raw.aggregate_name,
                aggregate_version: raw.aggregate_version,
                created: raw.created,
            })
        })
        .collect()
}

/// Where an entry's body is. Flux writes absolute URLs, taken as they are: resolving each one
/// against the feed URL cost a twentieth of the reader's CPU. Others are resolved.
fn entry_uri(feed_url: &Url, url: &str) -> Result<Uri, String> {
    if let Ok(uri) = parse_uri(url) {
        return Ok(uri);
    }
    let joined = feed_url
        .join(url)
        .map_err(|err| format!("{url:?} is not a URL: {err}"))?;
    parse_uri(joined.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_url() -> Url {
        Url::parse("http://127.0.0.1:3900/events").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn parses_a_real_flux_page() -> Result<(), String> {
        let body = br#"{"description":"event feed","events":[{"event_id":"5ce38b3b-e9c6-4e95-b9e5-baf4fd603320","url":"http://127.0.0.1:3900/events/5ce38b3b-e9c6-4e95-b9e5-baf4fd603320","aggregate_name":"*account.Account","aggregate_version":0,"event_type":"account.AccountCreated","created":"Sun Nov 22 19:04:21 2026"}]}"#;
        let entries = parse_page(body, &feed_url())?;
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].event_type, "account.AccountCreated");
        assert_eq!(entries[0].created, "Sun Nov 22 19:04:21 2026");
        assert_eq!(
            entries[0].url.to_string(),
            "http://127.0.0.1:3900/events/5ce38b3b-e9c6-4e95-b9e5-baf4fd603320"
        );
        assert!(parse_page(br#"{"events":[]}"#, &feed_url())?.is_empty());
        Ok(())
    }

    #[test]
    fn refuses_pages_of_the_wrong_shape() {
        let bad: &[&[u8]] = &[
            b"<html>502 Bad Gateway</html>",
            br#"{"events": {}}"#,
            br#"{"description":"x"}"#,
            br#"{"events":[{"event_id":"a","url":"/events/a"}]}"#,
            br#"{"events":[{"event_id":"a","url":"/e/a","event_type":"t"},{"event_id":"a","url":"/e/a","event_type":"t"}]}"#,
            br#"{"events":[{"event_id":"a","url":"/e/a","event_type":"t""#,
            br#"{"message":"Invalid offset"}{"events":[]}"#,
        ];
        for body in bad {
            assert!(
                parse_page(body, &feed_url()).is_err(),
                "accepted {}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn relative_entry_urls_resolve_against_the_feed() -> Result<(), String> {
        let body = br#"{"events":[{"event_id":"a","url":"/events/a","event_type":"t"},{"event_id":"b","url":"http://127.0.0.1:3900/events/b c","event_type":"t"}]}"#;
        let entries = parse_page(body, &feed_url())?;
        assert_eq!(entries[0].url.to_string(), "http://127.0.0.1:3900/events/a");
        // Absolute, but not sendable as written: resolved, which escapes the space.
        assert_eq!(
            entries[1].url.to_string(),
            "http://127.0.0.1:3900/events/b%20c"
        );
        let bad = br#"{"events":[{"event_id":"a","url":"http://[::1/events/a","event_type":"t"}]}"#;
        let err = parse_page(bad, &feed_url()).err().unwrap_or_default();
        assert!(err.contains("entry a has a bad url"), "{err}");
        Ok(())
    }
}
