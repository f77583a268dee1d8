//! A declarative projection's named parameters: where each takes its value from (the payload,
//! through a JSON pointer, or the event's metadata), and how the value binds on each store (as
//! SQLite's own types; as text PostgreSQL reads as the parameter's type), and the `:name`s of a
//! statement numbered as PostgreSQL writes them.

use std::borrow::Cow;

use postgres::types::{to_sql_checked, Format, IsNull, ToSql, Type};
use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};
use serde_json::Value;

use crate::event::{DecodeError, Event};

/// Where a statement parameter takes its value from.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum ParamSource {
    /// A JSON pointer into the payload, e.g. `/account_id` or `/address/city`.
    Pointer(JsonPointer),
    Offset,
    EventId,
    EventType,
    AggregateId,
    AggregateName,
    AggregateVersion,
    Created,
    /// The whole payload as JSON text.
    Payload,
}

impl ParamSource {
    pub(super) const METADATA: &'static str =
        "@offset, @event_id, @event_type, @aggregate_id, @aggregate_name, @aggregate_version, @created, @payload";

    pub(super) fn parse(text: &str) -> Option<ParamSource> {
        Some(match text {
            "@offset" => ParamSource::Offset,
            "@event_id" => ParamSource::EventId,
            "@event_type" => ParamSource::EventType,
            "@aggregate_id" => ParamSource::AggregateId,
            "@aggregate_name" => ParamSource::AggregateName,
            "@aggregate_version" => ParamSource::AggregateVersion,
            "@created" => ParamSource::Created,
            "@payload" => ParamSource::Payload,
            pointer if pointer.starts_with('/') => ParamSource::Pointer(JsonPointer::new(pointer)),
            _ => return None,
        })
    }

    /// The parameter's value; `fields` is the payload parsed, when the handler reads fields.
    pub(super) fn value<'e>(
        &self,
        event: &'e Event,
        fields: Option<&'e Value>,
    ) -> Result<ToSqlOutput<'e>, DecodeError> {
        let decode_error = |reason: String| DecodeError {
            event_type: event.meta.event_type.clone(),
            reason,
        };
        Ok(match self {
            ParamSource::Offset => {
                ToSqlOutput::Owned(SqlValue::Integer(crate::store::offset_to_sql(event.offset)))
            }
            ParamSource::EventId => text(&event.meta.event_id),
            ParamSource::EventType => text(&event.meta.event_type),
            ParamSource::AggregateId => text(&event.meta.aggregate_id),
            ParamSource::AggregateName => text(&event.meta.aggregate_name),
            ParamSource::AggregateVersion => {
                ToSqlOutput::Owned(SqlValue::Integer(event.meta.aggregate_version))
            }
            ParamSource::Created => text(&event.meta.created),
            ParamSource::Payload => match &event.payload {
                Some(payload) => text(payload.as_str()),
                None => return Err(decode_error("the event has no payload".into())),
            },
            ParamSource::Pointer(pointer) => {
                let found = fields
                    .and_then(|fields| pointer.find(fields))
                    .ok_or_else(|| decode_error(format!("the payload has no field {pointer}")))?;
                json_to_sql(found).map_err(|reason| decode_error(format!("{pointer}: {reason}")))?
            }
        })
    }
}

impl ParamSource {
    /// The parameter's value as text, for PostgreSQL to read as whatever type the statement
    /// wants it as; None for SQL NULL.
    pub(super) fn text<'e>(
        &self,
        event: &'e Event,
        fields: Option<&'e Value>,
    ) -> Result<Option<Cow<'e, str>>, DecodeError> {
        let borrowed = |text: &'e str| Ok(Some(Cow::Borrowed(text)));
        match self {
            ParamSource::Offset => Ok(Some(Cow::Owned(event.offset.to_string()))),
            ParamSource::EventId => borrowed(&event.meta.event_id),
            ParamSource::EventType => borrowed(&event.meta.event_type),
            ParamSource::AggregateId => borrowed(&event.meta.aggregate_id),
            ParamSource::AggregateName => borrowed(&event.meta.aggregate_name),
            ParamSource::AggregateVersion => {
                Ok(Some(Cow::Owned(event.meta.aggregate_version.to_string())))
            }
            ParamSource::Created => borrowed(&event.meta.created),
            ParamSource::Payload => match &event.payload {
                Some(payload) => borrowed(payload.as_str()),
                None => Err(DecodeError {
                    event_type: event.meta.event_type.clone(),
                    reason: "the event has no payload".into(),
                }),
            },
            ParamSource::Pointer(pointer) => {
                let found = fields
                    .and_then(|fields| pointer.find(fields))
                    .ok_or_else(|| DecodeError {
                        event_type: event.meta.event_type.clone(),
                        reason: format!("the payload has no field {pointer}"),
                    })?;
                Ok(match found {
                    Value::Null => None,
                    Value::String(text) => Some(Cow::Borrowed(text)),
                    other => Some(Cow::Owned(other.to_string())),
                })
            }
        }
    }
}

/// A value bound as text: PostgreSQL converts it to the parameter's type, and a value that does
/// not convert fails the statement (the event's fault), as a wrong type does on SQLite.
#[derive(Debug)]
pub(super) struct TextParam<'a>(pub(super) Option<Cow<'a, str>>);

impl ToSql for TextParam<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            Some(text) => {
                out.extend_from_slice(text.as_bytes());
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    to_sql_checked!();
}

/// `sql` with its `:name` parameters numbered `$1`, `$2`... as PostgreSQL writes them, and the
/// names in number order. Quoted text, quoted names, comments, dollar quotes and `::` casts are
/// left as they are.
pub(super) fn numbered(sql: &str) -> Result<(String, Vec<String>), String> {
    let mut names: Vec<String> = Vec::new();
    let mut out = String::with_capacity(sql.len());
    let bytes = sql.as_bytes();
    let is_name_start = |b: u8| b.is_ascii_alphabetic() || b == b'_';
    let is_name = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    while i < bytes.len() {
        let rest = &sql[i..];
        // The length of what is copied as it is, from `i`.
        let verbatim = match bytes[i] {
            quote @ (b'\'' | b'"') => Some(
                rest[1..]
                    .find(quote as char)
                    .map_or(rest.len(), |end| end + 2),
            ),
            b'-' if rest.starts_with("--") => Some(rest.find('\n').unwrap_or(rest.len())),
            b'/' if rest.starts_with("/*") => Some(rest.find("*/").map_or(rest.len(), |e| e + 2)),
            b':' if rest.starts_with("::") => Some(2),
            b'$' => {
                let tag_end = rest[1..]
                    .bytes()
                    .position(|b| !is_name(b))
                    .map_or(rest.len(), |p| p + 1);
                if tag_end > 1 && rest[1..tag_end].bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!(
                        "it uses a positional parameter ({}); name it, like :account_id",
                        &rest[..tag_end]
                    ));
                }
                if rest[tag_end..].starts_with('$') {
                    let tag = &rest[..=tag_end];
                    Some(
                        rest[tag.len()..]
                            .find(tag)
                            .map_or(rest.len(), |end| tag.len() + end + tag.len()),
                    )
                } else {
                    Some(1)
                }
            }
            b':' if bytes.get(i + 1).is_some_and(|&b| is_name_start(b)) => {
                let end = rest[1..]
                    .bytes()
                    .position(|b| !is_name(b))
                    .map_or(rest.len(), |p| p + 1);
                let name = &rest[1..end];
                let number = match names.iter().position(|known| known == name) {
                    Some(index) => index + 1,
                    None => {
                        names.push(name.to_string());
                        names.len()
                    }
                };
                out.push_str(&format!("${number}"));
                i += end;
                None
            }
            _ => {
                let next = rest.chars().next().map_or(1, char::len_utf8);
                Some(next)
            }
        };
        if let Some(length) = verbatim {
            out.push_str(&rest[..length]);
            i += length;
        }
    }
    Ok((out, names))
}

/// An RFC 6901 JSON pointer, split and unescaped once when the projection loads: looking up
/// `Value::pointer` splits and unescapes the text again for every event.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct JsonPointer {
    text: String,
    tokens: Vec<String>,
}

impl JsonPointer {
    /// `text` starts with `/`.
    pub(super) fn new(text: &str) -> JsonPointer {
        JsonPointer {
            text: text.to_string(),
            tokens: text
                .split('/')
                .skip(1)
                .map(|token| token.replace("~1", "/").replace("~0", "~"))
                .collect(),
        }
    }

    /// What `Value::pointer` finds.
    fn find<'v>(&self, value: &'v Value) -> Option<&'v Value> {
        self.tokens
            .iter()
            .try_fold(value, |target, token| match target {
                Value::Object(map) => map.get(token),
                Value::Array(list) => array_index(token).and_then(|index| list.get(index)),
                _ => None,
            })
    }
}

impl std::fmt::Display for JsonPointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// An array index as RFC 6901 writes it: digits, no sign, no leading zero.
fn array_index(token: &str) -> Option<usize> {
    if token.starts_with('+') || (token.starts_with('0') && token.len() != 1) {
        return None;
    }
    token.parse().ok()
}

pub(super) fn text(value: &str) -> ToSqlOutput<'_> {
    ToSqlOutput::Borrowed(ValueRef::Text(value.as_bytes()))
}

/// JSON to SQLite: strings stay text, integers stay integers, objects and arrays become JSON text.
pub(super) fn json_to_sql(value: &Value) -> Result<ToSqlOutput<'_>, String> {
    Ok(match value {
        Value::Null => ToSqlOutput::Owned(SqlValue::Null),
        Value::Bool(b) => ToSqlOutput::Owned(SqlValue::Integer(i64::from(*b))),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => ToSqlOutput::Owned(SqlValue::Integer(i)),
            (None, _) if n.is_u64() => {
                return Err(format!("{n} is beyond SQLite's 64-bit signed integers"))
            }
            (None, Some(f)) => ToSqlOutput::Owned(SqlValue::Real(f)),
            (None, None) => return Err(format!("{n} is not a representable number")),
        },
        Value::String(s) => text(s),
        Value::Array(_) | Value::Object(_) => ToSqlOutput::Owned(SqlValue::Text(value.to_string())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_are_numbered_for_postgres_outside_quotes_comments_and_casts() {
        let (sql, names) = numbered(
            "INSERT INTO t VALUES (:a, ':b', \":c\", :a::text, $$ :d $$, $q$:e$q$) -- :f\n/* :g */ RETURNING :h",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            sql,
            "INSERT INTO t VALUES ($1, ':b', \":c\", $1::text, $$ :d $$, $q$:e$q$) -- :f\n/* :g */ RETURNING $2"
        );
        assert_eq!(names, ["a", "h"]);
        let err = numbered("SELECT $1").err().unwrap_or_default();
        assert!(err.contains("positional parameter ($1)"), "{err}");
        assert_eq!(
            numbered("SELECT 'it''s', :x_1").map(|(sql, _)| sql),
            Ok("SELECT 'it''s', $1".to_string())
        );
    }

    #[test]
    fn pointers_find_what_serde_json_finds() {
        let value = json!({
            "a": {"b/c": [10, {"d~e": "deep"}], "": 1},
            "list": [0, 1, 2],
            "01": "key",
            "n": null
        });
        let pointers = [
            "/a",
            "/a/b~1c",
            "/a/b~1c/0",
            "/a/b~1c/1/d~0e",
            "/a/",
            "/a/b~1c/01",
            "/a/b~1c/+1",
            "/a/b~1c/2",
            "/list/-",
            "/list/2",
            "/01",
            "/n",
            "/n/x",
            "/missing",
            "/a/b/c",
            "/",
            "/~01",
        ];
        for text in pointers {
            assert_eq!(
                JsonPointer::new(text).find(&value),
                value.pointer(text),
                "{text}"
            );
        }
        assert_eq!(JsonPointer::new("/a/b~1c").to_string(), "/a/b~1c");
    }

    #[test]
    fn numbers_keep_their_sqlite_type() {
        assert!(matches!(
            json_to_sql(&json!(5)),
            Ok(ToSqlOutput::Owned(SqlValue::Integer(5)))
        ));
        assert!(matches!(
            json_to_sql(&json!(1.5)),
            Ok(ToSqlOutput::Owned(SqlValue::Real(_)))
        ));
        assert!(json_to_sql(&json!(u64::MAX)).is_err());
        assert!(matches!(
            json_to_sql(&json!({"a": 1})),
            Ok(ToSqlOutput::Owned(SqlValue::Text(t))) if t == r#"{"a":1}"#
        ));
    }
}
