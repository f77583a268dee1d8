//! The Flux feed's pages: entries without payloads, each with the URL of its body
//! (`GET {entry.url}`, fetched by `FeedClient::fetch_body`).
//!
//! It trusts nothing it reads: JSON shape, missing fields and repeated event ids are refused
//! with a reason. Bodies may be served as `text/plain` (Go's json.Encoder), so the content type
//! is not checked.

use std::borrow::Cow;
use std::sync::Arc;

use hyper::Uri;
use serde::Deserialize;
use url::Url;

use super::access::Access;
use super::http::parse_uri;
use super::page::{read_page, EntryBody, EntryFormat, PageEntry};
use crate::event::EventMeta;

#[derive(Deserialize)]
pub(super) struct RawEntry {
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

#[derive(Deserialize)]
struct RawList<T> {
    events: Vec<T>,
}

/// A Flux feed's entries: URLs may be absolute or relative to the feed URL, and ones that
/// `access` refuses (another origin than `body_origin` allows) make the entry unreadable.
pub struct Flux {
    pub feed_url: Url,
    pub access: Arc<Access>,
}

impl EntryFormat for Flux {
    const NAME: &'static str = "a Flux feed";
    type Raw<'a> = RawEntry;

    fn list<'a, T: Deserialize<'a>>(&self, bytes: &'a [u8]) -> Result<Vec<T>, serde_json::Error> {
        serde_json::from_slice::<RawList<T>>(bytes).map(|list| list.events)
    }

    fn id<'r>(&self, raw: &'r RawEntry) -> Cow<'r, str> {
        Cow::Borrowed(&raw.event_id)
    }

    fn entry(&self, raw: RawEntry) -> Result<PageEntry, String> {
        if raw.event_id.is_empty() || raw.event_type.is_empty() {
            return Err("the page has an entry with an empty event_id or event_type".into());
        }
        let id = crate::shown::shortened(&raw.event_id, crate::shown::ID_SHOWN);
        let url = entry_uri(&self.feed_url, &raw.url)
            .map_err(|err| format!("entry {id} has a bad url: {err}"))?;
        self.access
            .check(None, &url)
            .map_err(|reason| format!("entry {id}'s url is refused: {reason}"))?;
        Ok(PageEntry {
            meta: EventMeta {
                event_id: raw.event_id,
                event_type: raw.event_type,
                // Flux's pages do not say; payloads usually carry their aggregate's id.
                aggregate_id: String::new(),
                aggregate_name: raw.aggregate_name,
                aggregate_version: raw.aggregate_version,
                created: raw.created,
            },
            body: EntryBody::At(url),
            page: None,
        })
    }
}

/// A whole page's entries, up to its first unreadable one.
pub fn parse_page(bytes: &[u8], feed_url: &Url, access: &Access) -> Result<Vec<PageEntry>, String> {
    let flux = Flux {
        feed_url: feed_url.clone(),
        access: Arc::new(access.clone()),
    };
    let mut page = read_page(Arc::new(flux), bytes.to_vec(), usize::MAX).map_err(|e| e.reason)?;
    page.take(usize::MAX)
}

/// Where an entry's body is. Flux writes absolute URLs, taken as they are, since resolving each
/// one against the feed URL costs the reader noticeably; others are resolved.
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

    fn body_url(entry: &PageEntry) -> String {
        match &entry.body {
            EntryBody::At(url) => url.to_string(),
            EntryBody::Inline(payload) => format!("inline {}", payload.as_str()),
        }
    }

    fn feed_url() -> Url {
        Url::parse("http://127.0.0.1:3900/events").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn parses_a_real_flux_page() -> Result<(), String> {
        let body = br#"{"description":"event feed","events":[{"event_id":"5ce38b3b-e9c6-4e95-b9e5-baf4fd603320","url":"http://127.0.0.1:3900/events/5ce38b3b-e9c6-4e95-b9e5-baf4fd603320","aggregate_name":"*account.Account","aggregate_version":0,"event_type":"account.AccountCreated","created":"Sun Nov 22 19:04:21 2026"}]}"#;
        let entries = parse_page(body, &feed_url(), &Access::anywhere())?;
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].meta.event_type, "account.AccountCreated");
        assert_eq!(entries[0].meta.created, "Sun Nov 22 19:04:21 2026");
        assert_eq!(
            body_url(&entries[0]),
            "http://127.0.0.1:3900/events/5ce38b3b-e9c6-4e95-b9e5-baf4fd603320"
        );
        assert!(parse_page(br#"{"events":[]}"#, &feed_url(), &Access::anywhere())?.is_empty());
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
                parse_page(body, &feed_url(), &Access::anywhere()).is_err(),
                "accepted {}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn relative_entry_urls_resolve_against_the_feed() -> Result<(), String> {
        let body = br#"{"events":[{"event_id":"a","url":"/events/a","event_type":"t"},{"event_id":"b","url":"http://127.0.0.1:3900/events/b c","event_type":"t"}]}"#;
        let entries = parse_page(body, &feed_url(), &Access::anywhere())?;
        assert_eq!(body_url(&entries[0]), "http://127.0.0.1:3900/events/a");
        // Absolute, but not sendable as written: resolved, which escapes the space.
        assert_eq!(body_url(&entries[1]), "http://127.0.0.1:3900/events/b%20c");
        let bad = br#"{"events":[{"event_id":"a","url":"http://[::1/events/a","event_type":"t"}]}"#;
        let err = parse_page(bad, &feed_url(), &Access::anywhere())
            .err()
            .unwrap_or_default();
        assert!(err.contains("entry a has a bad url"), "{err}");
        // Behind a good entry, a bad one ends the page instead.
        let behind = br#"{"events":[{"event_id":"z","url":"/events/z","event_type":"t"},{"event_id":"a","url":"http://[::1/events/a","event_type":"t"}]}"#;
        let entries = parse_page(behind, &feed_url(), &Access::anywhere())?;
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].meta.event_id, "z");
        Ok(())
    }
}
