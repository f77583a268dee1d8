//! Inline feeds of any JSON shape, read through their `[feed.mapping]`: JSON pointers say where
//! a page's events are and where each event's id, type, aggregate, version, time and payload
//! are; a page may also say where the next one is (a link or a cursor).
//!
//! As in `inline.rs`: ids and times may be integers, taken as their decimal text; the payload is
//! the page's own text of it; an event without an id, a type or a payload ends the page before
//! it.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::page::{EntryBody, EntryFormat, PageEntry};
use crate::config::mapping::{Encoding, Mapping, Paging};
use crate::event::{EventMeta, Payload};
use crate::json_pointer::{JsonPointer, Parsed};

/// A feed's events as its mapping reads them.
pub struct Mapped {
    pub mapping: Mapping,
}

impl EntryFormat for Mapped {
    const NAME: &'static str = "a mapped feed's";
    type Raw<'a> = Parsed<'a>;

    fn list<'a, T: Deserialize<'a>>(&self, bytes: &'a [u8]) -> Result<Vec<T>, serde_json::Error> {
        use serde::de::Error as _;
        match (self.mapping.encoding, &self.mapping.events) {
            (Encoding::JsonLines, _) => serde_json::Deserializer::from_slice(bytes)
                .into_iter::<T>()
                .collect(),
            // Without a mapped `events`, listed as inline pages are.
            (Encoding::Json, None) => super::inline::listed(bytes),
            (Encoding::Json, Some(pointer)) => match pointer.find_in(bytes)? {
                Some(events) => serde_json::from_str(events.get()),
                None => Err(serde_json::Error::custom(format!(
                    "it has no events at {pointer}"
                ))),
            },
        }
    }

    fn id<'r>(&self, raw: &'r Parsed<'_>) -> Cow<'r, str> {
        text_at(raw, &self.mapping.id)
            .ok()
            .flatten()
            .map_or(Cow::Borrowed(""), Cow::Owned)
    }

    fn entry(&self, raw: Parsed<'_>) -> Result<PageEntry, String> {
        let raw = &raw;
        let mapping = &self.mapping;
        let required = |pointer: &JsonPointer, what: &str| match text_at(raw, pointer) {
            Ok(Some(text)) if !text.is_empty() => Ok(text),
            Ok(_) => Err(format!("the page has an event with no {what} at {pointer}")),
            Err(reason) => Err(format!("the page has an event whose {what} {reason}")),
        };
        let event_id = required(&mapping.id, "id")?;
        let shown = crate::shown::shortened(&event_id, crate::shown::ID_SHOWN);
        let optional = |pointer: &JsonPointer, what: &str| {
            text_at(raw, pointer)
                .map(Option::unwrap_or_default)
                .map_err(|reason| format!("event {shown}'s {what} {reason}"))
        };
        let event_type = required(&mapping.event_type, "type")?;
        let aggregate_version = match found(raw, &mapping.version)? {
            None => 0,
            Some(version) => serde_json::from_str::<i64>(version.get()).map_err(|_| {
                format!(
                    "event {shown}'s version at {} is not an integer: {}",
                    mapping.version,
                    crate::shown::shortened(version.get(), crate::shown::ID_SHOWN)
                )
            })?,
        };
        let data = found(raw, &mapping.payload)?.ok_or_else(|| {
            format!(
                "event {shown} has no payload at {} (missing or null)",
                mapping.payload
            )
        })?;
        let payload = Payload::from_raw(data)
            .map_err(|err| format!("event {shown} has an unreadable payload: {err}"))?;
        Ok(PageEntry {
            meta: EventMeta {
                aggregate_id: optional(&mapping.aggregate_id, "aggregate id")?,
                aggregate_name: optional(&mapping.aggregate_name, "aggregate name")?,
                created: optional(&mapping.created, "time")?,
                event_id,
                event_type,
                aggregate_version,
            },
            body: EntryBody::Inline(payload),
            page: None,
        })
    }

    fn next(&self, bytes: &[u8]) -> Result<Option<String>, String> {
        let (Paging::Link | Paging::Cursor, Some(pointer)) =
            (self.mapping.paging, &self.mapping.next)
        else {
            return Ok(None);
        };
        let whole: &RawValue = serde_json::from_slice(bytes).map_err(|err| err.to_string())?;
        let whole = Parsed::new(whole).map_err(|err| err.to_string())?;
        text_at(&whole, pointer)
            .map(|next| next.filter(|next| !next.is_empty()))
            .map_err(|reason| format!("the page's next page {reason}"))
    }
}

/// A whole page's events, up to its first unreadable one, and the next page it names.
pub fn parse_page(
    mapping: &Mapping,
    bytes: &[u8],
) -> Result<(Vec<PageEntry>, Option<String>), String> {
    let format = std::sync::Arc::new(Mapped {
        mapping: mapping.clone(),
    });
    let mut page = super::page::read_page(format, bytes.to_vec(), usize::MAX)
        .map_err(|unread| unread.reason)?;
    Ok((page.take(usize::MAX)?, page.next.take()))
}

/// The value at `pointer` in `raw`, unless it is missing or null.
fn found<'a>(raw: &Parsed<'a>, pointer: &JsonPointer) -> Result<Option<&'a RawValue>, String> {
    let value = pointer
        .find_parsed(raw)
        .map_err(|err| format!("the page has an event that is not JSON: {err}"))?;
    Ok(value.filter(|value| value.get() != "null"))
}

/// The text at `pointer` in `raw`: a string, or an integer as its decimal text; None if it is
/// missing or null; an error (to follow the field's name) if it is anything else.
fn text_at(raw: &Parsed<'_>, pointer: &JsonPointer) -> Result<Option<String>, String> {
    let Some(value) = found(raw, pointer)? else {
        return Ok(None);
    };
    let text = value.get();
    if text.starts_with('"') {
        return serde_json::from_str::<String>(text)
            .map(Some)
            .map_err(|err| format!("at {pointer} is not readable: {err}"));
    }
    if let Ok(number) = text.parse::<i64>() {
        return Ok(Some(number.to_string()));
    }
    if let Ok(number) = text.parse::<u64>() {
        return Ok(Some(number.to_string()));
    }
    Err(format!(
        "at {pointer} is neither a string nor an integer: {}",
        crate::shown::shortened(text, crate::shown::ID_SHOWN)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feed::page::read_page;
    use std::sync::Arc;

    fn mapping(toml_text: &str) -> Mapping {
        toml::from_str(toml_text).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The entries of `body` read whole and read lazily (they must agree), and the next page.
    fn read(mapping: Mapping, body: &str) -> Result<(Vec<PageEntry>, Option<String>), String> {
        let format = Arc::new(Mapped { mapping });
        let mut results = Vec::new();
        for lazy_from in [usize::MAX, 0] {
            let mut page = read_page(format.clone(), body.as_bytes().to_vec(), lazy_from)
                .map_err(|unread| unread.reason)?;
            results.push((page.take(usize::MAX)?, page.next.clone()));
        }
        let lazy = results.pop();
        let whole = results.pop();
        assert_eq!(whole, lazy, "{body}");
        whole.ok_or_else(|| "no result".to_string())
    }

    fn payload(entry: &PageEntry) -> &str {
        match &entry.body {
            EntryBody::Inline(payload) => payload.as_str(),
            EntryBody::At(url) => panic!("a URL in a mapped page: {url}"),
        }
    }

    #[test]
    fn reads_events_of_its_own_shape_through_pointers() -> Result<(), String> {
        let mapped = mapping(
            r#"
            events = "/result/items"
            id = "/meta/eventId"
            type = "/meta/kind"
            aggregate_id = "/stream/id"
            aggregate_name = "/stream/type"
            version = "/stream/position"
            created = "/meta/at"
            payload = "/body"
            paging = "cursor"
            next = "/result/next"
            "#,
        );
        let body = r#"{"result": {"next": "c2", "items": [
            {"meta": {"eventId": 17, "kind": "Credited", "at": "2026-12-02T10:00:00Z"},
             "stream": {"id": "acc-1", "type": "Account", "position": 3},
             "body": {"amount": 12345678901234567890.5}}
        ]}}"#;
        let (entries, next) = read(mapped.clone(), body)?;
        assert_eq!(next.as_deref(), Some("c2"));
        let meta = &entries[0].meta;
        assert_eq!(
            (
                meta.event_id.as_str(),
                meta.event_type.as_str(),
                meta.aggregate_id.as_str(),
                meta.aggregate_name.as_str(),
                meta.aggregate_version,
                meta.created.as_str()
            ),
            (
                "17",
                "Credited",
                "acc-1",
                "Account",
                3,
                "2026-12-02T10:00:00Z"
            )
        );
        // The payload's text as the page has it: no number is rounded.
        assert_eq!(
            payload(&entries[0]),
            r#"{"amount": 12345678901234567890.5}"#
        );
        let (empty, none) = read(mapped, r#"{"result": {"items": [], "next": null}}"#)?;
        assert!(empty.is_empty() && none.is_none());
        Ok(())
    }

    #[test]
    fn reads_json_lines_and_whole_events_as_payloads() -> Result<(), String> {
        let mapped = mapping(
            r#"
            encoding = "json-lines"
            id = "/seq"
            type = "/event"
            payload = ""
            "#,
        );
        let body = "{\"seq\":1,\"event\":\"A\"}\n\n{\"seq\":2,\"event\":\"B\",\"x\":[1]}\n";
        let (entries, _) = read(mapped, body)?;
        let ids: Vec<&str> = entries.iter().map(|e| e.meta.event_id.as_str()).collect();
        assert_eq!(ids, ["1", "2"]);
        assert_eq!(payload(&entries[1]), r#"{"seq":2,"event":"B","x":[1]}"#);
        Ok(())
    }

    #[test]
    fn without_pointers_it_reads_as_an_inline_feed_does() -> Result<(), String> {
        let event = r#"{"id":"e1","type":"T","aggregate_id":"a","aggregate_type":"Acc","version":2,"data":{"k":1}}"#;
        for body in [format!("[{event}]"), format!(r#"{{"events":[{event}]}}"#)] {
            let (entries, _) = read(Mapping::default(), &body)?;
            let inline = crate::feed::inline::parse_page(body.as_bytes())?;
            assert_eq!(entries, inline);
        }
        Ok(())
    }

    #[test]
    fn says_which_field_is_wrong_and_where() {
        let mapped = mapping(r#"events = "/items""#);
        let cases = [
            (r#"{"things": []}"#, "no events at \"/items\""),
            (r#"{"items": [{"type":"T","data":1}]}"#, "no id at \"/id\""),
            (
                r#"{"items": [{"id":"a","data":1}]}"#,
                "no type at \"/type\"",
            ),
            (
                r#"{"items": [{"id":"a","type":"T"}]}"#,
                "event a has no payload at \"/data\"",
            ),
            (
                r#"{"items": [{"id":[1],"type":"T","data":1}]}"#,
                "id at \"/id\" is neither a string nor an integer",
            ),
            (
                r#"{"items": [{"id":"a","type":"T","version":"2","data":1}]}"#,
                "version at \"/version\" is not an integer",
            ),
            (
                r#"{"items": [{"id":"a","type":"T","data":1},{"id":"a","type":"T","data":2}]}"#,
                "lists event id a twice",
            ),
        ];
        for (body, expected) in cases {
            let err = read(mapped.clone(), body).err().unwrap_or_default();
            assert!(err.contains(expected), "{body}: {err}");
        }
        // A bad event after good ones ends the page before it.
        let (entries, _) = read(
            mapped,
            r#"{"items": [{"id":"a","type":"T","data":1},{"id":"b","type":"T"}]}"#,
        )
        .unwrap_or_default();
        assert_eq!(entries.len(), 1);
    }
}
