//! Inline feeds: pages whose events carry their payloads, so one request reads a whole page of
//! events (Eventhus and most event stores publish events this way).
//!
//! A page is `{"events": [...]}` or a bare `[...]`; each event is Eventhus's shape:
//! `{"id", "type", "aggregate_id", "aggregate_type", "version", "data"}`, plus an optional
//! `created`. Flux's names (`event_id`, `event_type`, `aggregate_name`, `aggregate_version`,
//! `payload`) are read too, so a Flux-like server that inlines its bodies needs no other format.
//! `id`, `aggregate_id` and `created` may be integers, taken as their decimal text.
//! Offsets are positions, as in Flux: the next page starts at `offset + len(events)`, and the
//! server decides the page size.
//!
//! The payload is kept as the page's JSON text and checked as a body is. An event whose `data`
//! is missing, `null` or nested too deep ends the page before it: the events before it are
//! applied, and the next page, which starts with it, is refused and retried. It is never applied
//! without its payload.

use serde::Deserialize;
use serde_json::value::RawValue;

use std::borrow::Cow;
use std::sync::Arc;

use super::page::{read_page, EntryBody, EntryFormat, PageEntry};
use crate::event::EventMeta;
use crate::event::Payload;

#[derive(Deserialize)]
pub(super) struct RawEvent<'a> {
    #[serde(alias = "event_id", deserialize_with = "text_or_number")]
    id: String,
    #[serde(rename = "type", alias = "event_type")]
    event_type: String,
    #[serde(default, deserialize_with = "text_or_number")]
    aggregate_id: String,
    #[serde(default, alias = "aggregate_name")]
    aggregate_type: String,
    #[serde(default, alias = "aggregate_version")]
    version: i64,
    #[serde(default, deserialize_with = "text_or_number")]
    created: String,
    /// `None` for `null` as well as for a missing field.
    #[serde(borrow, alias = "payload")]
    data: Option<&'a RawValue>,
}

/// Ids and times are text to Projector, but many stores number them: a sequence number for an
/// id, seconds since the epoch for a time. An integer is taken as its decimal text.
fn text_or_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    struct TextOrNumber;

    impl serde::de::Visitor<'_> for TextOrNumber {
        type Value = String;

        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter.write_str("a string or an integer")
        }
        fn visit_str<E>(self, text: &str) -> Result<String, E> {
            Ok(text.to_string())
        }
        fn visit_string<E>(self, text: String) -> Result<String, E> {
            Ok(text)
        }
        fn visit_i64<E>(self, number: i64) -> Result<String, E> {
            Ok(number.to_string())
        }
        fn visit_u64<E>(self, number: u64) -> Result<String, E> {
            Ok(number.to_string())
        }
    }

    deserializer.deserialize_any(TextOrNumber)
}

#[derive(Deserialize)]
struct RawList<T> {
    events: Vec<T>,
}

/// A page's events as `T`: a bare array, or the `events` member of an object.
pub(super) fn listed<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<Vec<T>, serde_json::Error> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        serde_json::from_slice(bytes)
    } else {
        serde_json::from_slice::<RawList<T>>(bytes).map(|list| list.events)
    }
}

/// Inline feeds' events.
pub struct Inline;

impl EntryFormat for Inline {
    const NAME: &'static str = "an inline feed";
    type Raw<'a> = RawEvent<'a>;

    fn list<'a, T: Deserialize<'a>>(&self, bytes: &'a [u8]) -> Result<Vec<T>, serde_json::Error> {
        listed(bytes)
    }

    fn id<'r>(&self, raw: &'r RawEvent<'_>) -> Cow<'r, str> {
        Cow::Borrowed(&raw.id)
    }

    fn entry(&self, raw: RawEvent<'_>) -> Result<PageEntry, String> {
        if raw.id.is_empty() || raw.event_type.is_empty() {
            return Err("the page has an event with an empty id or type".into());
        }
        let data = raw
            .data
            .ok_or_else(|| format!("event {} has no data (missing or null)", raw.id))?;
        let payload = Payload::from_raw(data)
            .map_err(|err| format!("event {} has unreadable data: {err}", raw.id))?;
        Ok(PageEntry {
            meta: EventMeta {
                event_id: raw.id,
                event_type: raw.event_type,
                aggregate_id: raw.aggregate_id,
                aggregate_name: raw.aggregate_type,
                aggregate_version: raw.version,
                created: raw.created,
            },
            body: EntryBody::Inline(payload),
            page: None,
        })
    }
}

/// A whole page's events, up to its first unreadable one.
pub fn parse_page(bytes: &[u8]) -> Result<Vec<PageEntry>, String> {
    let mut page = read_page(Arc::new(Inline), bytes.to_vec(), usize::MAX).map_err(|e| e.reason)?;
    page.take(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(entry: &PageEntry) -> &str {
        match &entry.body {
            EntryBody::Inline(payload) => payload.as_str(),
            EntryBody::At(url) => panic!("a URL in an inline page: {url}"),
        }
    }

    #[test]
    fn parses_eventhus_events_in_a_page_or_a_bare_array() -> Result<(), String> {
        let event = r#"{"id": "e1", "aggregate_id": "a1", "aggregate_type": "Account", "version": 1, "type": "AccountCreated", "data": {"owner": "mishudark", "tags": [1, "\u00e9"]}}"#;
        for body in [
            format!(r#"{{"events": [{event}], "next": "ignored"}}"#),
            format!(" [{event}]"),
        ] {
            let entries = parse_page(body.as_bytes())?;
            assert_eq!(entries.len(), 1);
            let entry = &entries[0];
            assert_eq!(
                (
                    entry.meta.event_id.as_str(),
                    entry.meta.event_type.as_str(),
                    entry.meta.aggregate_id.as_str(),
                    entry.meta.aggregate_name.as_str(),
                    entry.meta.aggregate_version,
                    entry.meta.created.as_str()
                ),
                ("e1", "AccountCreated", "a1", "Account", 1, "")
            );
            // The payload is the page's own text of it.
            assert_eq!(
                payload(entry),
                r#"{"owner": "mishudark", "tags": [1, "\u00e9"]}"#
            );
        }
        assert!(parse_page(b"[]")?.is_empty());
        assert!(parse_page(br#"{"events": []}"#)?.is_empty());
        Ok(())
    }

    #[test]
    fn numbered_ids_and_times_are_taken_as_text() -> Result<(), String> {
        let body = br#"[{"id":42,"type":"t","aggregate_id":7,"created":1795374261,"data":{}},{"id":18446744073709551615,"type":"t","data":{}}]"#;
        let entries = parse_page(body)?;
        assert_eq!(
            (
                entries[0].meta.event_id.as_str(),
                entries[0].meta.aggregate_id.as_str(),
                entries[0].meta.created.as_str()
            ),
            ("42", "7", "1795374261")
        );
        assert_eq!(entries[1].meta.event_id, u64::MAX.to_string());
        let err = parse_page(br#"[{"id":1.5,"type":"t","data":{}}]"#).err();
        assert!(err.is_some_and(|e| e.contains("not an inline feed page")));
        Ok(())
    }

    #[test]
    fn a_page_ends_before_its_first_unreadable_event() -> Result<(), String> {
        let body = br#"[{"id":"a","type":"t","data":1},{"id":"b","type":"t","data":2},{"id":"c","type":"t"},{"id":"d","type":"t","data":4}]"#;
        let entries = parse_page(body)?;
        let ids: Vec<&str> = entries.iter().map(|e| e.meta.event_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        // The next page starts at the bad event: refused, with the reason.
        let next = br#"[{"id":"c","type":"t"},{"id":"d","type":"t","data":4}]"#;
        let err = parse_page(next).err().unwrap_or_default();
        assert!(err.contains("event c has no data"), "{err}");
        Ok(())
    }

    #[test]
    fn reads_flux_names_too() -> Result<(), String> {
        let body = br#"{"events":[{"event_id":"e","event_type":"account.AccountCredited","aggregate_name":"*account.Account","aggregate_version":3,"created":"Sun Nov 22 19:04:21 2026","payload":{"amount":1}}]}"#;
        let entries = parse_page(body)?;
        assert_eq!(entries[0].meta.event_id, "e");
        assert_eq!(entries[0].meta.aggregate_name, "*account.Account");
        assert_eq!(entries[0].meta.aggregate_version, 3);
        assert_eq!(entries[0].meta.created, "Sun Nov 22 19:04:21 2026");
        assert_eq!(payload(&entries[0]), r#"{"amount":1}"#);
        Ok(())
    }

    #[test]
    fn refuses_pages_it_cannot_apply_exactly() {
        let deep = format!(
            r#"[{{"id":"a","type":"t","data":{}{}}}]"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        let cases: &[(&[u8], &str)] = &[
            (b"<html>502 Bad Gateway</html>", "not an inline feed page"),
            (br#"{"events": {}}"#, "not an inline feed page"),
            (br#"{"description":"x"}"#, "not an inline feed page"),
            (br#"[{"id":"a","data":{}}]"#, "not an inline feed page"),
            (
                br#"[{"id":"a","type":"t","data":{}"#,
                "not an inline feed page",
            ),
            (
                br#"[{"id":"a","type":"t","version":"2","data":{}}]"#,
                "not an inline feed page",
            ),
            (br#"[{"id":"a","type":"t"}]"#, "event a has no data"),
            (
                br#"[{"id":"a","type":"t","data":null}]"#,
                "event a has no data",
            ),
            (br#"[{"id":"","type":"t","data":{}}]"#, "empty id or type"),
            (
                br#"[{"id":"a","type":"t","data":1},{"id":"a","type":"t","data":2}]"#,
                "lists event id a twice",
            ),
            (deep.as_bytes(), "event a has unreadable data"),
            (br#"{"message":"x"}[]"#, "not an inline feed page"),
        ];
        for (body, expected) in cases {
            let err = parse_page(body).err().unwrap_or_default();
            assert!(
                err.contains(expected),
                "{}: {err:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
