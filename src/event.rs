//! The Event a feed yields: its position in the feed, its metadata and, when some projection
//! registered its type, its payload.
//!
//! `offset` is the event's position counted from the start of the whole feed, so the event at
//! offset N is followed by the one at N + 1; checkpoints rely on that.

use serde::de::DeserializeOwned;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub offset: u64,
    pub event_id: String,
    pub event_type: String,
    pub aggregate_name: String,
    pub aggregate_version: i64,
    /// As the feed wrote it (Flux: Go's ANSIC layout, server-local time, no zone).
    pub created: String,
    /// `None` when no projection on the feed handles this type: its body is never fetched.
    pub payload: Option<Value>,
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
            event_type: self.event_type.clone(),
            reason: "the event has no payload".to_string(),
        })?;
        T::deserialize(payload).map_err(|err| DecodeError {
            event_type: self.event_type.clone(),
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

    fn event(payload: Option<Value>) -> Event {
        Event {
            offset: 3,
            event_id: "e".into(),
            event_type: "account.AccountCredited".into(),
            aggregate_name: "*account.Account".into(),
            aggregate_version: 1,
            created: String::new(),
            payload,
        }
    }

    #[test]
    fn decodes_typed_payloads_and_explains_mismatches() {
        let good = event(Some(serde_json::json!({"account_id": "a", "amount": 5})));
        assert_eq!(
            good.decode::<Credited>().ok(),
            Some(Credited {
                account_id: "a".into(),
                amount: 5
            })
        );
        let bad = event(Some(serde_json::json!({"account_id": "a", "amount": "5"})));
        let err = bad.decode::<Credited>().err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("invalid type")));
        assert!(event(None).decode::<Credited>().is_err());
    }
}
