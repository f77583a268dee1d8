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

use postgres::types::ToSql;
use rusqlite::{Connection, Transaction};
use serde::Deserialize;
use serde_json::Value;
use toml::Spanned;

mod params;
mod version;

use params::{numbered, JsonPointer, ParamSource, TextParam};

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
}
