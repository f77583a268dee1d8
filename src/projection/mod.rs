//! The contract between the daemon and a projection, and building projections from the config.
//!
//! A projection never commits: the daemon hands it an open transaction, and the projection's
//! writes commit together with its checkpoint, or not at all.

pub mod postgres;
pub mod shape;
pub mod sql;

use std::collections::HashSet;
use std::sync::Arc;

use rusqlite::Transaction;

use crate::config::{Config, ConfigError, OnChange, OnError, ProjectionConfig, ProjectionSource};
use crate::event::{DecodeError, Event};
pub use postgres::PostgresTx;

/// A read model fed by the events of one feed.
pub trait Projection: Send + Sync {
    /// The event types this projection applies; `*` stands for every type. The daemon fetches
    /// bodies only for these and passes over every other entry of the feed.
    fn event_types(&self) -> Vec<String>;

    /// The definition's version, recorded with the checkpoint: a database whose tables an
    /// earlier version built is rebuilt (or refused, per `on_change`), never silently mixed.
    fn version(&self) -> String;

    /// Creates its tables if they are missing. Runs at every start, inside a transaction.
    fn setup(&self, tx: &Transaction) -> Result<(), ProjectionError>;

    /// Applies one event of a registered type, inside the daemon's open transaction.
    fn apply(&self, tx: &Transaction, event: &Event) -> Result<(), ProjectionError>;

    /// Whether it runs on the PostgreSQL store too ([`Projection::setup_postgres`] and
    /// [`Projection::apply_postgres`]). A daemon on PostgreSQL refuses to start one that does not.
    fn supports_postgres(&self) -> bool {
        false
    }

    /// On PostgreSQL: creates its tables if they are missing, in the daemon's schema.
    fn setup_postgres(&self, _tx: &mut PostgresTx) -> Result<(), ProjectionError> {
        Err(ProjectionError::Unsupported("PostgreSQL"))
    }

    /// On PostgreSQL: applies one event of a registered type, inside the daemon's transaction.
    fn apply_postgres(&self, _tx: &mut PostgresTx, _event: &Event) -> Result<(), ProjectionError> {
        Err(ProjectionError::Unsupported("PostgreSQL"))
    }
}

/// Why a projection could not apply an event.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("SQL failed: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("SQL failed: {}", postgres_message(.0))]
    Postgres(#[from] ::postgres::Error),
    #[error("the projection does not run on {0}")]
    Unsupported(&'static str),
    #[error("{0}")]
    Rejected(String),
}

/// The server's message, with its detail when it gives one (`postgres::Error` says only "db
/// error").
pub fn postgres_message(err: &::postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{}: {detail}", db.message()),
            None => db.message().to_string(),
        },
        None => err.to_string(),
    }
}

/// The event types a projection applies: some by name, or every one (`*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventTypes {
    names: HashSet<String>,
    every: bool,
}

/// The name that stands for every event type.
pub const EVERY_TYPE: &str = "*";

impl EventTypes {
    pub fn new(names: impl IntoIterator<Item = String>) -> EventTypes {
        let mut names: HashSet<String> = names.into_iter().collect();
        let every = names.remove(EVERY_TYPE);
        EventTypes { names, every }
    }

    pub fn contains(&self, event_type: &str) -> bool {
        self.every || self.names.contains(event_type)
    }

    /// Every type, whatever its name.
    pub fn is_every(&self) -> bool {
        self.every
    }

    /// The types named, in name order (without `*`).
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.names.iter().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

/// A projection built from its `[[projection]]` table, ready to run. A rebuild applies the
/// same definition to a shadow database, so the definition is shared.
#[derive(Clone)]
pub struct ConfiguredProjection {
    pub name: String,
    pub feed: String,
    pub on_error: OnError,
    pub on_change: OnChange,
    pub event_types: EventTypes,
    /// Where the definition comes from, for people: `file projections/x.toml` or `module x`.
    pub definition: String,
    /// The definition's version, as the projection declares it.
    pub version: String,
    pub projection: Arc<dyn Projection>,
}

impl ConfiguredProjection {
    pub fn handles(&self, event_type: &str) -> bool {
        self.event_types.contains(event_type)
    }
}

/// Builds every projection of a validated config: loads and checks declarative files (their SQL
/// is prepared against their own schema) and instantiates Rust modules.
pub fn build_all(config: &Config) -> Result<Vec<ConfiguredProjection>, ConfigError> {
    config
        .projections
        .iter()
        .map(|projection| build(config, projection))
        .collect()
}

fn build(
    config: &Config,
    projection: &ProjectionConfig,
) -> Result<ConfiguredProjection, ConfigError> {
    let definition = match projection.source() {
        Some(ProjectionSource::File(file)) => format!("file {}", file.get_ref().display()),
        Some(ProjectionSource::Module(module)) => format!("module {}", module.get_ref()),
        None => String::new(),
    };
    let built: Arc<dyn Projection> = match projection.source() {
        Some(ProjectionSource::File(file)) => {
            let text = std::fs::read_to_string(file.get_ref()).map_err(|err| {
                ConfigError::new(
                    config.source.locate(file),
                    format!(
                        "cannot read projection file {}: {err}",
                        file.get_ref().display()
                    ),
                )
            })?;
            Arc::new(sql::SqlProjection::parse(file.get_ref(), &text)?)
        }
        Some(ProjectionSource::Module(module)) => {
            match crate::projections::find(module.get_ref()) {
                Some(module) => (module.build)(),
                None => {
                    let known: Vec<&str> =
                        crate::projections::all().iter().map(|m| m.name).collect();
                    return Err(ConfigError::new(
                        config.source.locate(module),
                        format!(
                            "no Rust projection module named {:?} (this build has: {})",
                            module.get_ref(),
                            known.join(", ")
                        ),
                    ));
                }
            }
        }
        // `Config::load` refuses a projection with neither or both.
        None => {
            return Err(ConfigError::new(
                config.source.locate(&projection.name),
                "a projection needs `file` or `module`, not both",
            ))
        }
    };
    Ok(ConfiguredProjection {
        name: projection.name().to_string(),
        feed: projection.feed().to_string(),
        on_error: projection.on_error,
        on_change: projection.on_change,
        event_types: EventTypes::new(built.event_types()),
        definition,
        version: built.version(),
        projection: built,
    })
}

/// Why `projections` cannot run on PostgreSQL, if one of them cannot.
pub fn refused_by_postgres(projections: &[ConfiguredProjection]) -> Option<String> {
    projections
        .iter()
        .find(|p| !p.projection.supports_postgres())
        .map(|p| {
            format!(
                "projection {:?} ({}) does not run on PostgreSQL: its module implements no setup_postgres and apply_postgres; run it on a SQLite database",
                p.name, p.definition
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn an_unknown_module_is_located_and_the_known_ones_named() -> Result<(), ConfigError> {
        let text = r#"
[daemon]
database = "projector.db"
control_socket = "projector.sock"

[[feed]]
name = "bank"
url = "http://127.0.0.1:3000/events"
format = "flux"

[[projection]]
name = "ledger"
feed = "bank"
module = "nope"
"#;
        let config = Config::parse(Path::new("/etc/projector/consumer.toml"), text.into())?;
        let err = build_all(&config)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.starts_with("/etc/projector/consumer.toml:14:10:")
                && err.contains("account_ledger"),
            "{err}"
        );
        Ok(())
    }

    /// A Rust module written for SQLite only.
    struct SqliteOnly;

    impl Projection for SqliteOnly {
        fn event_types(&self) -> Vec<String> {
            vec!["e".into()]
        }
        fn version(&self) -> String {
            "1".into()
        }
        fn setup(&self, _tx: &Transaction) -> Result<(), ProjectionError> {
            Ok(())
        }
        fn apply(&self, _tx: &Transaction, _event: &Event) -> Result<(), ProjectionError> {
            Ok(())
        }
    }

    #[test]
    fn a_module_without_postgres_methods_is_refused_on_postgres_by_name() {
        let configured = |name: &str, projection: Arc<dyn Projection>| ConfiguredProjection {
            name: name.into(),
            feed: "bank".into(),
            on_error: OnError::Stop,
            on_change: OnChange::Rebuild,
            event_types: EventTypes::new(projection.event_types()),
            definition: format!("module {name}"),
            version: projection.version(),
            projection,
        };
        let ledger = configured(
            "ledger",
            Arc::new(crate::projections::account_ledger::AccountLedger),
        );
        assert_eq!(refused_by_postgres(std::slice::from_ref(&ledger)), None);
        let old = configured("old", Arc::new(SqliteOnly));
        let refused = refused_by_postgres(&[ledger, old]).unwrap_or_default();
        assert!(
            refused.contains("\"old\" (module old) does not run on PostgreSQL"),
            "{refused}"
        );
    }
}
