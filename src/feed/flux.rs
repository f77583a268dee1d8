//! The Flux feed client: `GET {feed}?offset=N` for a page of entries, `GET {entry.url}` for the
//! payload of one event.
//!
//! It trusts nothing it reads: status codes, sizes (limited while streaming), JSON shape, repeated
//! event ids and `null` bodies (Flux's answer for an unknown id) all come back as a `FetchError`.
//! Bodies may be served as `text/plain` (Go's json.Encoder), so the content type is not checked.

use std::collections::HashSet;
use std::time::Duration;

use reqwest::{header, Client, StatusCode, Url};
use serde::Deserialize;
use serde_json::Value;

use super::FetchError;
use crate::config::FeedConfig;

/// One entry of a feed page: an event without its payload.
#[derive(Debug, Clone, PartialEq)]
pub struct PageEntry {
    pub event_id: String,
    pub url: Url,
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
    http: Client,
    feed_url: Url,
    max_response_bytes: usize,
}

impl FluxClient {
    pub fn new(feed: &FeedConfig) -> Result<FluxClient, reqwest::Error> {
        let http = Client::builder()
            .user_agent(concat!("projector/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(feed.connect_timeout.0)
            .timeout(feed.request_timeout.0)
            .pool_max_idle_per_host(feed.body_concurrency.0 + 2)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()?;
        Ok(FluxClient {
            http,
            feed_url: feed.url.0.clone(),
            max_response_bytes: feed.max_response_bytes.0,
        })
    }

    /// The page of entries starting at `offset`; empty at the head of the feed.
    pub async fn fetch_page(&self, offset: u64) -> Result<Vec<PageEntry>, FetchError> {
        let mut url = self.feed_url.clone();
        url.query_pairs_mut()
            .append_pair("offset", &offset.to_string());
        let what = format!("page at offset {offset} ({url})");
        let bytes = self.get(&url, &what).await?;
        parse_page(&bytes, &self.feed_url).map_err(|reason| FetchError {
            what,
            reason,
            retry_after: None,
        })
    }

    /// The payload of one event, and the size of its body in bytes.
    pub async fn fetch_body(&self, entry: &PageEntry) -> Result<(Value, usize), FetchError> {
        let what = format!(
            "body of {} {} ({})",
            entry.event_type, entry.event_id, entry.url
        );
        let bytes = self.get(&entry.url, &what).await?;
        let fail = |reason: String| FetchError {
            what: what.clone(),
            reason,
            retry_after: None,
        };
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Null) => Err(fail(
                "the feed answered null: the body is not available (yet)".into(),
            )),
            Ok(payload) => Ok((payload, bytes.len())),
            Err(err) => Err(fail(format!("the body is not valid JSON: {err}"))),
        }
    }

    /// GETs `url` and returns the whole body of a 2xx answer, refusing to read past the limit.
    async fn get(&self, url: &Url, what: &str) -> Result<Vec<u8>, FetchError> {
        let fail = |reason: String, retry_after: Option<Duration>| FetchError {
            what: what.to_string(),
            reason,
            retry_after,
        };
        let mut response = self
            .http
            .get(url.clone())
            .send()
            .await
            .map_err(|err| fail(describe(&err), None))?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = match status {
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => response
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.trim().parse::<u64>().ok())
                    .map(Duration::from_secs),
                _ => None,
            };
            return Err(fail(format!("HTTP {status}"), retry_after));
        }
        if let Some(length) = response.content_length() {
            if length > self.max_response_bytes as u64 {
                return Err(fail(
                    format!(
                        "the response is {length} bytes, over the limit of {} (max_response_bytes)",
                        self.max_response_bytes
                    ),
                    None,
                ));
            }
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|err| fail(describe(&err), None))?
        {
            if body.len() + chunk.len() > self.max_response_bytes {
                return Err(fail(
                    format!(
                        "the response grew over the limit of {} bytes (max_response_bytes)",
                        self.max_response_bytes
                    ),
                    None,
                ));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// reqwest's top-level message is vague ("error sending request"); the cause says what happened.
fn describe(err: &reqwest::Error) -> String {
    let mut text = if err.is_timeout() {
        "timed out".to_string()
    } else if err.is_connect() {
        "could not connect".to_string()
    } else if err.is_redirect() {
        "too many redirects".to_string()
    } else if err.is_body() || err.is_decode() {
        "reading the response failed".to_string()
    } else {
        "the request failed".to_string()
    };
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Parses a page body; entry URLs may be absolute or relative to the feed URL.
pub fn parse_page(bytes: &[u8], feed_url: &Url) -> Result<Vec<PageEntry>, String> {
    let page: RawPage = serde_json::from_slice(bytes).map_err(|err| {
        let start = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned();
        format!("the page is not a Flux feed page ({err}); it starts with {start:?}")
    })?;
    let mut seen = HashSet::with_capacity(page.events.len());
    page.events
        .into_iter()
        .map(|raw| {
            if !seen.insert(raw.event_id.clone()) {
                return Err(format!("the page lists event id {} twice", raw.event_id));
            }
            if raw.event_id.is_empty() || raw.event_type.is_empty() {
                return Err("the page has an entry with an empty event_id or event_type".into());
            }
            let url = feed_url.join(&raw.url).map_err(|err| {
                format!("entry {} has a bad url {:?}: {err}", raw.event_id, raw.url)
            })?;
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
            entries[0].url.as_str(),
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
        let body = br#"{"events":[{"event_id":"a","url":"/events/a","event_type":"t"}]}"#;
        let entries = parse_page(body, &feed_url())?;
        assert_eq!(entries[0].url.as_str(), "http://127.0.0.1:3900/events/a");
        Ok(())
    }
}
