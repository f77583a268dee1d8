//! The Event a feed yields: its position in the feed, its metadata and, when some projection
//! registered its type, its payload.
//!
//! `offset` is the event's position counted from the start of the whole feed, so the event at
//! offset N is followed by the one at N + 1; checkpoints rely on that.

use std::fmt;
use std::sync::Arc;

use serde::de::{DeserializeOwned, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub offset: u64,
    pub meta: EventMeta,
    /// `None` when no projection on the feed handles this type: its body is never fetched.
    pub payload: Option<Payload>,
    /// Where the page the event was read from is, on a feed paged by links or cursors; `None`
    /// on a feed paged by offsets, and on the first page.
    pub page: Option<Arc<PagePlace>>,
}

/// Where a page of a feed paged by links or cursors is: the link or cursor it was asked for
/// with, and the offset of its first event. A checkpoint keeps its last event's, so that a
/// restart reads on from that page rather than from the feed's first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagePlace {
    pub cursor: String,
    pub first_offset: u64,
}

/// What a feed's page says of an event besides its payload.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventMeta {
    pub event_id: String,
    pub event_type: String,
    /// The aggregate the event belongs to, when the feed says (inline feeds); empty for Flux,
    /// whose pages do not carry it.
    pub aggregate_id: String,
    pub aggregate_name: String,
    pub aggregate_version: i64,
    /// As the feed wrote it (Flux: Go's ANSIC layout, server-local time, no zone).
    pub created: String,
}

/// An event's payload as the feed sent it: JSON text, checked when it was read, parsed again
/// only by the projection that reads it. Kept as text, a batch of 8,000 bank events holds about
/// 1 MB of payloads instead of the 6.5 MB of the parsed maps, and the dead letters and
/// `@payload` keep the feed's own text.
#[derive(Debug, Clone, PartialEq)]
pub struct Payload(Box<str>);

impl Payload {
    /// Checks that `body` is one JSON value, not `null`, nested no deeper than serde_json reads
    /// (128 levels), without building it.
    pub fn from_json(body: Vec<u8>) -> Result<Payload, String> {
        check(serde_json::from_slice::<Option<CheckedJson>>(&body))?;
        // Valid JSON read from bytes is valid UTF-8; this only avoids an unchecked conversion.
        String::from_utf8(body)
            .map(|text| Payload(text.into_boxed_str()))
            .map_err(|err| format!("the body is not UTF-8: {err}"))
    }

    /// The same checks for a payload sent inside a page (inline feeds), which the page's
    /// parser has already found to be one JSON value. Only its nesting is left to check, and a
    /// value with fewer opening brackets than the limit cannot be nested deeper: most payloads
    /// are taken without being read again.
    pub fn from_raw(raw: &RawValue) -> Result<Payload, String> {
        let text = raw.get();
        let brackets = text.bytes().filter(|&b| b == b'[' || b == b'{').count();
        if text == "null" || brackets >= SHALLOW_BRACKETS {
            check(serde_json::from_str::<Option<CheckedJson>>(text))?;
        }
        Ok(Payload(text.into()))
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Fewer opening brackets than this (serde_json's nesting limit is 128) and a value is surely
/// shallow enough.
const SHALLOW_BRACKETS: usize = 100;

fn check(read: serde_json::Result<Option<CheckedJson>>) -> Result<(), String> {
    match read {
        Ok(Some(CheckedJson)) => Ok(()),
        Ok(None) => Err("the feed answered null: the body is not available (yet)".into()),
        Err(err) => Err(format!("the body is not valid JSON: {err}")),
    }
}

/// A payload built in code (tests, benchmarks) is the JSON text of the value.
impl From<Value> for Payload {
    fn from(value: Value) -> Payload {
        Payload(value.to_string().into_boxed_str())
    }
}

/// Reads any JSON value and keeps nothing. Unlike `IgnoredAny` it goes through
/// `deserialize_any`, so serde_json applies its nesting limit, as it does when the payload is
/// parsed later: what passes here parses there.
struct CheckedJson;

impl<'de> Deserialize<'de> for CheckedJson {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<CheckedJson, D::Error> {
        deserializer.deserialize_any(CheckedJsonVisitor)
    }
}

struct CheckedJsonVisitor;

impl<'de> Visitor<'de> for CheckedJsonVisitor {
    type Value = CheckedJson;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<CheckedJson, E> {
        Ok(CheckedJson)
    }
    fn visit_i64<E>(self, _: i64) -> Result<CheckedJson, E> {
        Ok(CheckedJson)
    }
    fn visit_u64<E>(self, _: u64) -> Result<CheckedJson, E> {
        Ok(CheckedJson)
    }
    fn visit_f64<E>(self, _: f64) -> Result<CheckedJson, E> {
        Ok(CheckedJson)
    }
    fn visit_str<E>(self, _: &str) -> Result<CheckedJson, E> {
        Ok(CheckedJson)
    }
    fn visit_unit<E>(self) -> Result<CheckedJson, E> {
        Ok(CheckedJson)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<CheckedJson, A::Error> {
        while seq.next_element::<CheckedJson>()?.is_some() {}
        Ok(CheckedJson)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<CheckedJson, A::Error> {
        while map.next_entry::<IgnoredAny, CheckedJson>()?.is_some() {}
        Ok(CheckedJson)
    }
}

/// An event whose payload is missing or does not fit the type a projection expects.
#[derive(Debug, Clone, thiserror::Error)]
#[error("payload of {event_type} does not decode: {reason}")]
pub struct DecodeError {
    pub event_type: String,
    pub reason: String,
}

impl Event {
    /// Decodes the payload into a projection's own serde type.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        let payload = self.payload.as_ref().ok_or_else(|| DecodeError {
            event_type: self.meta.event_type.clone(),
            reason: "the event has no payload".to_string(),
        })?;
        serde_json::from_str(payload.as_str()).map_err(|err| DecodeError {
            event_type: self.meta.event_type.clone(),
            reason: err.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Credited {
        account_id: String,
        amount: i64,
    }

    fn event(payload: Option<Payload>) -> Event {
        Event {
            offset: 3,
            meta: EventMeta {
                event_id: "e".into(),
                event_type: "account.AccountCredited".into(),
                aggregate_name: "*account.Account".into(),
                aggregate_version: 1,
                ..EventMeta::default()
            },
            payload,
            page: None,
        }
    }

    #[test]
    fn decodes_typed_payloads_and_explains_mismatches() {
        let good = event(Some(
            serde_json::json!({"account_id": "a", "amount": 5}).into(),
        ));
        assert_eq!(
            good.decode::<Credited>().ok(),
            Some(Credited {
                account_id: "a".into(),
                amount: 5
            })
        );
        let bad = event(Some(
            serde_json::json!({"account_id": "a", "amount": "5"}).into(),
        ));
        let err = bad.decode::<Credited>().err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("invalid type")));
        assert!(event(None).decode::<Credited>().is_err());
    }

    #[test]
    fn payloads_are_checked_as_read_and_kept_as_sent() {
        let sent = r#"{"b": 1, "a": [true, null, "\u00e9"]}"#;
        let payload = Payload::from_json(sent.as_bytes().to_vec());
        assert_eq!(payload.as_ref().map(Payload::as_str), Ok(sent));
        let refused = |body: &[u8]| Payload::from_json(body.to_vec()).err().unwrap_or_default();
        assert!(refused(b"null").contains("answered null"));
        assert!(refused(b" null ").contains("answered null"));
        assert!(refused(b"{\"a\": 1").contains("not valid JSON"));
        assert!(refused(b"{} {}").contains("not valid JSON"));
        assert!(refused(b"\"\xff\"").contains("not valid JSON"));
        // Nested as deep as the parser goes: refused here, as Value would refuse it later.
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(refused(deep.as_bytes()).contains("recursion limit"));
        let fine = format!("{}{}", "[".repeat(100), "]".repeat(100));
        // From a page: the same verdicts, with or without the full read.
        let raw = |text: &str| {
            let value: Box<RawValue> =
                serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            Payload::from_raw(&value)
        };
        assert_eq!(raw(sent).as_ref().map(Payload::as_str), Ok(sent));
        assert!(raw("null").is_err());
        assert!(raw(&deep).is_err_and(|e| e.contains("recursion limit")));
        assert!(raw(&fine).is_ok());
        let many_shallow = format!("[{}]", vec!["{}"; 300].join(","));
        assert!(raw(&many_shallow).is_ok());
        let brackets_in_strings = format!("[\"{}\"]", "[".repeat(300));
        assert!(raw(&brackets_in_strings).is_ok());
        let fine = Payload::from_json(fine.into_bytes());
        assert!(fine.is_ok_and(|p| serde_json::from_str::<Value>(p.as_str()).is_ok()));
    }
}
