//! Declarative projections: a TOML file holding the schema SQL and, per event type, one SQL
//! statement whose named parameters are bound from the payload and the event's metadata.
//!
//! Values are only ever bound as SQLite parameters, never pasted into SQL text, so a payload
//! cannot change what a statement does. Every statement is prepared against the file's own
//! schema when the file loads, so `projector check` catches SQL mistakes before anything runs.
//!
//! `[on."*"]` handles every event type the file has no table of its own for (counts, audits).
//!
//! ```toml
//! schema = "CREATE TABLE IF NOT EXISTS balances (account_id TEXT PRIMARY KEY, balance INTEGER)"
//! [on."account.AccountCredited"]
//! sql = "UPDATE balances SET balance = balance + :amount WHERE account_id = :account_id"
//! expect_rows = 1                      # anything else is a poison event
//! params = { amount = "/amount" }      # default for :name is the payload field "/name"
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use std::borrow::Cow;

use postgres::types::{to_sql_checked, Format, IsNull, ToSql, Type};
use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};
use rusqlite::{Connection, Transaction};
use serde::Deserialize;
use serde_json::Value;
use toml::Spanned;

mod version;

use super::{PostgresTx, Projection, ProjectionError, EVERY_TYPE};
use crate::config::{ConfigError, Location};
use crate::event::{DecodeError, Event};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProjectionFile {
    #[serde(default)]
    #[allow(dead_code)] // documentation for readers of the file
    description: String,
    /// The definition's version, when its author names it; otherwise a hash of the SQL.
    version: Option<version::ExplicitVersion>,
    schema: Spanned<String>,
    /// The schema on PostgreSQL, where it differs from `schema`.
    postgres_schema: Option<Spanned<String>>,
    on: BTreeMap<String, HandlerFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HandlerFile {
    sql: Spanned<String>,
    /// The statement on PostgreSQL, where it differs from `sql`.
    postgres_sql: Option<Spanned<String>>,
    #[serde(default)]
    params: BTreeMap<String, Spanned<String>>,
    expect_rows: Option<usize>,
}

/// Where a statement parameter takes its value from.
#[derive(Debug, Clone, PartialEq)]
enum ParamSource {
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
    const METADATA: &'static str =
        "@offset, @event_id, @event_type, @aggregate_id, @aggregate_name, @aggregate_version, @created, @payload";

    fn parse(text: &str) -> Option<ParamSource> {
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
    fn value<'e>(
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
    fn text<'e>(
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
struct TextParam<'a>(Option<Cow<'a, str>>);

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
fn numbered(sql: &str) -> Result<(String, Vec<String>), String> {
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
struct JsonPointer {
    text: String,
    tokens: Vec<String>,
}

impl JsonPointer {
    /// `text` starts with `/`.
    fn new(text: &str) -> JsonPointer {
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

fn text(value: &str) -> ToSqlOutput<'_> {
    ToSqlOutput::Borrowed(ValueRef::Text(value.as_bytes()))
}

/// JSON to SQLite: strings stay text, integers stay integers, objects and arrays become JSON text.
fn json_to_sql(value: &Value) -> Result<ToSqlOutput<'_>, String> {
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

#[derive(Debug)]
struct Handler {
    sql: String,
    /// Parameter i + 1 of the statement takes its value from `params[i]`.
    params: Vec<ParamSource>,
    /// The statement on PostgreSQL, its `:name`s numbered.
    postgres: PostgresStatement,
    expect_rows: Option<usize>,
}

/// A handler's statement as PostgreSQL takes it: `$1`, `$2`... for the names, in first-use order.
#[derive(Debug)]
struct PostgresStatement {
    sql: String,
    /// `$i + 1` takes its value from `params[i]`.
    params: Vec<ParamSource>,
}

/// A loaded, checked declarative projection.
#[derive(Debug)]
pub struct SqlProjection {
    schema: String,
    postgres_schema: String,
    handlers: HashMap<String, Handler>,
    version: String,
}

impl SqlProjection {
    /// Parses and checks the projection file `path` whose text is `text`.
    pub fn parse(path: &Path, text: &str) -> Result<SqlProjection, ConfigError> {
        let file: ProjectionFile = toml::from_str(text).map_err(|err| {
            unquoted_dotted_type(path, text)
                .unwrap_or_else(|| ConfigError::from_toml(path, text, &err))
        })?;
        let locate = |span: std::ops::Range<usize>| Location::at_offset(path, text, span.start);
        if file.on.is_empty() {
            return Err(ConfigError::new(
                Location::whole_file(path),
                "the projection handles no event type: add an [on.\"<event type>\"] table",
            ));
        }

        // Check the SQL against the projection's own schema in a scratch database.
        let scratch = Connection::open_in_memory()
            .map_err(|err| ConfigError::new(Location::whole_file(path), err.to_string()))?;
        scratch
            .execute_batch(file.schema.get_ref())
            .map_err(|err| {
                ConfigError::new(
                    locate(file.schema.span()),
                    format!("schema SQL fails: {err}"),
                )
            })?;

        let mut handlers = HashMap::new();
        for (event_type, handler) in &file.on {
            let sql_location = locate(handler.sql.span());
            let statement = scratch.prepare(handler.sql.get_ref()).map_err(|err| {
                ConfigError::new(
                    sql_location.clone(),
                    format!("SQL for {event_type:?} fails: {err}"),
                )
            })?;
            let mut params = Vec::new();
            let mut used = Vec::new();
            let source_of = |bare: &str| {
                match handler.params.get(bare) {
                None => Ok(ParamSource::Pointer(JsonPointer::new(&format!("/{bare}")))),
                Some(source) => ParamSource::parse(source.get_ref()).ok_or_else(|| {
                    ConfigError::new(
                        locate(source.span()),
                        format!(
                            "parameter {bare:?} takes its value from {:?}: write a JSON pointer into the payload (\"/field\") or one of {}",
                            source.get_ref(),
                            ParamSource::METADATA
                        ),
                    )
                }),
            }
            };
            for index in 1..=statement.parameter_count() {
                let Some(name) = statement.parameter_name(index) else {
                    return Err(ConfigError::new(
                        sql_location,
                        format!(
                            "SQL for {event_type:?} uses a positional parameter (?); name it, like :account_id"
                        ),
                    ));
                };
                let bare = &name[1..];
                used.push(bare.to_string());
                params.push(source_of(bare)?);
            }
            let postgres_text = handler.postgres_sql.as_ref().unwrap_or(&handler.sql);
            let (postgres_sql, postgres_names) =
                numbered(postgres_text.get_ref()).map_err(|reason| {
                    ConfigError::new(
                        locate(postgres_text.span()),
                        format!("PostgreSQL SQL for {event_type:?}: {reason}"),
                    )
                })?;
            let postgres_params = postgres_names
                .iter()
                .map(|name| source_of(name))
                .collect::<Result<Vec<_>, _>>()?;
            used.extend(postgres_names);
            if let Some((unused, source)) =
                handler.params.iter().find(|(name, _)| !used.contains(name))
            {
                return Err(ConfigError::new(
                    locate(source.span()),
                    format!("parameter {unused:?} is not used by the SQL for {event_type:?}"),
                ));
            }
            handlers.insert(
                event_type.clone(),
                Handler {
                    sql: handler.sql.get_ref().clone(),
                    params,
                    postgres: PostgresStatement {
                        sql: postgres_sql,
                        params: postgres_params,
                    },
                    expect_rows: handler.expect_rows,
                },
            );
        }
        let version = version::of(&file);
        Ok(SqlProjection {
            postgres_schema: file
                .postgres_schema
                .map_or_else(|| file.schema.get_ref().clone(), Spanned::into_inner),
            schema: file.schema.into_inner(),
            handlers,
            version,
        })
    }
}

/// `[on.account.AccountCreated]` is read by TOML as the table `AccountCreated` inside the table
/// `account`: the event type's dot must be quoted. Says so, at the table, instead of TOML's
/// complaint about an unknown field.
fn unquoted_dotted_type(path: &Path, text: &str) -> Option<ConfigError> {
    let table: toml::Table = toml::from_str(text).ok()?;
    let on = table.get("on")?.as_table()?;
    for (outer, handler) in on {
        let Some(handler) = handler.as_table() else {
            continue;
        };
        if handler.contains_key("sql") {
            continue;
        }
        let Some((inner, _)) = handler.iter().find(|(_, value)| value.is_table()) else {
            continue;
        };
        let written = format!("[on.{outer}.{inner}]");
        let location = match text.find(&written) {
            Some(offset) => Location::at_offset(path, text, offset),
            None => Location::whole_file(path),
        };
        return Some(ConfigError::new(
            location,
            format!(
                "{written} is read as a table {inner:?} inside a table {outer:?}: quote an event type with a dot in it, like [on.\"{outer}.{inner}\"]"
            ),
        ));
    }
    None
}

impl Projection for SqlProjection {
    fn event_types(&self) -> Vec<String> {
        self.handlers.keys().cloned().collect()
    }

    fn version(&self) -> String {
        self.version.clone()
    }

    fn setup(&self, tx: &Transaction) -> Result<(), ProjectionError> {
        tx.execute_batch(&self.schema)?;
        Ok(())
    }

    fn apply(&self, tx: &Transaction, event: &Event) -> Result<(), ProjectionError> {
        let Some(handler) = self.handler(event) else {
            return Ok(());
        };
        let fields = fields(event, &handler.params)?;
        let mut statement = tx.prepare_cached(&handler.sql)?;
        for (index, source) in handler.params.iter().enumerate() {
            statement.raw_bind_parameter(index + 1, source.value(event, fields.as_ref())?)?;
        }
        let changed = statement.raw_execute()?;
        handler.expect(event, changed)
    }

    fn supports_postgres(&self) -> bool {
        true
    }

    /// Makes the tables, then prepares every handler's statement, so that a statement
    /// PostgreSQL refuses stops the start rather than each event.
    fn setup_postgres(&self, tx: &mut PostgresTx) -> Result<(), ProjectionError> {
        tx.batch_execute(&self.postgres_schema)?;
        let mut types: Vec<&String> = self.handlers.keys().collect();
        types.sort();
        for event_type in types {
            let statement = &self.handlers[event_type].postgres;
            tx.prepare(&statement.sql).map_err(|err| {
                ProjectionError::Rejected(format!(
                    "the PostgreSQL SQL for {event_type:?} fails: {}",
                    super::postgres_message(&err)
                ))
            })?;
        }
        Ok(())
    }

    fn apply_postgres(&self, tx: &mut PostgresTx, event: &Event) -> Result<(), ProjectionError> {
        let Some(handler) = self.handler(event) else {
            return Ok(());
        };
        let fields = fields(event, &handler.postgres.params)?;
        let values = handler
            .postgres
            .params
            .iter()
            .map(|source| source.text(event, fields.as_ref()).map(TextParam))
            .collect::<Result<Vec<_>, _>>()?;
        let params: Vec<&(dyn ToSql + Sync)> = values
            .iter()
            .map(|value| value as &(dyn ToSql + Sync))
            .collect();
        let statement = tx.prepare(&handler.postgres.sql)?;
        let changed = tx.execute_prepared(&statement, &params)?;
        handler.expect(event, usize::try_from(changed).unwrap_or(usize::MAX))
    }
}

/// The payload parsed, once for all a statement's fields; None when no parameter reads one.
fn fields(event: &Event, params: &[ParamSource]) -> Result<Option<Value>, DecodeError> {
    let reads_fields = params
        .iter()
        .any(|source| matches!(source, ParamSource::Pointer(_)));
    reads_fields.then(|| event.decode::<Value>()).transpose()
}

impl SqlProjection {
    /// The handler of `event`'s type, or of every type; None if neither.
    fn handler(&self, event: &Event) -> Option<&Handler> {
        self.handlers
            .get(&event.meta.event_type)
            .or_else(|| self.handlers.get(EVERY_TYPE))
    }
}

impl Handler {
    /// Whether `changed` rows are what the handler expects of `event`.
    fn expect(&self, event: &Event, changed: usize) -> Result<(), ProjectionError> {
        match self.expect_rows {
            Some(expected) if expected != changed => Err(ProjectionError::Rejected(format!(
                "the SQL for {} changed {changed} rows where {expected} were expected",
                event.meta.event_type
            ))),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventMeta;
    use serde_json::json;

    const BALANCES: &str = include_str!("../../projections/account_balances.toml");

    fn event(offset: u64, event_type: &str, payload: Value) -> Event {
        Event {
            offset,
            meta: EventMeta {
                event_id: format!("id-{offset}"),
                event_type: event_type.into(),
                aggregate_name: "*account.Account".into(),
                created: "Sun Nov 22 19:04:21 2026".into(),
                ..EventMeta::default()
            },
            payload: Some(payload.into()),
            page: None,
        }
    }

    fn error_of(text: &str) -> String {
        match SqlProjection::parse(Path::new("p.toml"), text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn shipped_balances_fold_the_bank_events() -> Result<(), Box<dyn std::error::Error>> {
        let projection = SqlProjection::parse(Path::new("account_balances.toml"), BALANCES)?;
        let mut conn = Connection::open_in_memory()?;
        let tx = conn.transaction()?;
        projection.setup(&tx)?;
        let created = json!({"account_id": "a", "balance": 10});
        projection.apply(&tx, &event(0, "account.AccountCreated", created))?;
        let credit = json!({"account_id": "a", "transaction_id": "t1", "amount": 5});
        projection.apply(&tx, &event(1, "account.AccountCredited", credit))?;
        let debit = json!({"account_id": "a", "transaction_id": "t2", "amount": 7});
        projection.apply(&tx, &event(2, "account.AccountDebited", debit))?;
        let (balance, offset): (i64, i64) = tx.query_row(
            "SELECT balance, updated_offset FROM account_balances WHERE account_id = 'a'",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        assert_eq!((balance, offset), (8, 2));

        // A credit to an account that was never created is refused, not silently dropped.
        let orphan = json!({"account_id": "zz", "transaction_id": "t3", "amount": 1});
        let err = projection.apply(&tx, &event(3, "account.AccountCredited", orphan));
        assert!(matches!(err, Err(ProjectionError::Rejected(_))), "{err:?}");
        // A missing field is a decode error naming the field.
        let err = projection.apply(&tx, &event(4, "account.AccountCredited", json!({})));
        assert!(
            matches!(&err, Err(ProjectionError::Decode(e)) if e.reason.contains("/amount") || e.reason.contains("/account_id")),
            "{err:?}"
        );
        Ok(())
    }

    #[test]
    fn every_type_without_a_table_of_its_own_goes_to_the_star_table(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let text = r#"
schema = "CREATE TABLE seen (event_type TEXT PRIMARY KEY, events INTEGER NOT NULL)"
[on."*"]
sql = "INSERT INTO seen VALUES (:type, 1) ON CONFLICT (event_type) DO UPDATE SET events = events + 1"
params = { type = "@event_type" }
[on.special]
sql = "INSERT INTO seen VALUES ('special!', 1) ON CONFLICT (event_type) DO UPDATE SET events = events + 1"
"#;
        let projection = SqlProjection::parse(Path::new("audit.toml"), text)?;
        let types = crate::projection::EventTypes::new(projection.event_types());
        assert!(types.is_every() && types.contains("anything") && types.contains("special"));
        let mut conn = Connection::open_in_memory()?;
        let tx = conn.transaction()?;
        projection.setup(&tx)?;
        for (offset, event_type) in ["a", "b", "a", "special"].iter().enumerate() {
            projection.apply(&tx, &event(offset as u64, event_type, json!({})))?;
        }
        let counts: Vec<(String, i64)> = tx
            .prepare("SELECT event_type, events FROM seen ORDER BY event_type")?
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?;
        assert_eq!(
            counts,
            [("a".into(), 2), ("b".into(), 1), ("special!".into(), 1)]
        );
        Ok(())
    }

    #[test]
    fn an_unquoted_dotted_event_type_is_told_to_be_quoted() {
        let text = "schema = \"CREATE TABLE t (a)\"\n\n[on.account.AccountCreated]\nsql = \"INSERT INTO t VALUES (1)\"\n";
        let err = error_of(text);
        assert!(
            err.starts_with("p.toml:3:1:") && err.contains("[on.\"account.AccountCreated\"]"),
            "{err}"
        );
    }

    #[test]
    fn hostile_payloads_are_bound_never_executed() -> Result<(), Box<dyn std::error::Error>> {
        let text = r#"
schema = "CREATE TABLE notes (id TEXT, body TEXT, raw TEXT, at INTEGER)"
[on.noted]
sql = "INSERT INTO notes VALUES (:id, :body, :raw, :at)"
params = { body = "/nested/deep/text", raw = "@payload", at = "@offset" }
"#;
        let projection = SqlProjection::parse(Path::new("p.toml"), text)?;
        let mut conn = Connection::open_in_memory()?;
        let tx = conn.transaction()?;
        projection.setup(&tx)?;
        let evil = "x'); DROP TABLE notes; --";
        let payload = json!({"id": evil, "nested": {"deep": {"text": evil}}});
        projection.apply(&tx, &event(9, "noted", payload))?;
        let (id, body, at): (String, String, i64) =
            tx.query_row("SELECT id, body, at FROM notes", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
        assert_eq!((id.as_str(), body.as_str(), at), (evil, evil, 9));
        Ok(())
    }

    #[test]
    fn mistakes_are_located_in_the_projection_file() {
        let base = "schema = \"CREATE TABLE t (a INTEGER)\"\n[on.e]\n";
        let err = error_of(&format!("{base}sql = \"INSERT INTO nope VALUES (:a)\"\n"));
        assert!(
            err.starts_with("p.toml:3:7:") && err.contains("no such table"),
            "{err}"
        );
        let err = error_of(&format!("{base}sql = \"INSERT INTO t VALUES (?)\"\n"));
        assert!(err.contains("positional"), "{err}");
        let err = error_of(&format!(
            "{base}sql = \"INSERT INTO t VALUES (:a)\"\nparams = {{ a = \"offset\" }}\n"
        ));
        assert!(
            err.starts_with("p.toml:4:16:") && err.contains("@offset"),
            "{err}"
        );
        let err = error_of(&format!(
            "{base}sql = \"INSERT INTO t VALUES (:a)\"\nparams = {{ b = \"/b\" }}\n"
        ));
        assert!(err.contains("\"b\" is not used"), "{err}");
        let err = error_of(&format!(
            "{base}sql = \"INSERT INTO t VALUES (1); DELETE FROM t\"\n"
        ));
        assert!(err.starts_with("p.toml:3:7:"), "{err}");
        let err = error_of("schema = \"CREATE TABLE\"\n[on.e]\nsql = \"SELECT 1\"\n");
        assert!(err.starts_with("p.toml:1:10:"), "{err}");
        let err = error_of("schema = \"\"\n[on.e]\nsqll = \"SELECT 1\"\n");
        assert!(err.contains("sqll"), "{err}");
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
    fn a_file_gives_postgres_its_own_statements() -> Result<(), ConfigError> {
        let base =
            "schema = \"CREATE TABLE t (a TEXT)\"\n[on.e]\nsql = \"INSERT INTO t VALUES (:a)\"\n";
        let plain = SqlProjection::parse(Path::new("p.toml"), base)?;
        assert_eq!(plain.postgres_schema, plain.schema);
        assert_eq!(
            plain.handlers["e"].postgres.sql,
            "INSERT INTO t VALUES ($1)"
        );
        let own = format!(
            "{base}postgres_sql = \"INSERT INTO t VALUES (:b::jsonb)\"\nparams = {{ b = \"@payload\" }}\n"
        )
        .replace("[on.e]", "postgres_schema = \"CREATE TABLE t (a JSONB)\"\n[on.e]");
        let own = SqlProjection::parse(Path::new("p.toml"), &own)?;
        assert_eq!(own.postgres_schema, "CREATE TABLE t (a JSONB)");
        assert_eq!(
            own.handlers["e"].postgres.sql,
            "INSERT INTO t VALUES ($1::jsonb)"
        );
        assert_eq!(own.handlers["e"].postgres.params, [ParamSource::Payload]);
        assert_ne!(own.version, plain.version);
        // A parameter only PostgreSQL's statement uses counts as used.
        assert!(own.handlers["e"].params.len() == 1);
        Ok(())
    }

    #[test]
    fn values_reach_postgres_as_text_it_converts() {
        let event = event(
            12,
            "noted",
            json!({"n": 18446744073709551615u64, "f": true, "o": {"k": [1]}, "s": "x", "z": null}),
        );
        let fields = event.decode::<Value>().ok();
        let text = |source: &str| {
            ParamSource::parse(source)
                .and_then(|s| s.text(&event, fields.as_ref()).ok())
                .flatten()
                .map(|t| t.into_owned())
        };
        assert_eq!(text("/n").as_deref(), Some("18446744073709551615"));
        assert_eq!(text("/f").as_deref(), Some("true"));
        assert_eq!(text("/o").as_deref(), Some(r#"{"k":[1]}"#));
        assert_eq!(text("/s").as_deref(), Some("x"));
        assert_eq!(text("/z"), None);
        assert_eq!(text("@offset").as_deref(), Some("12"));
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
