//! The daemon's configuration (`consumer.toml`): serde structs that refuse unknown keys
//! (`tables.rs`), values that check themselves (`values.rs`), plus the checks serde cannot make
//! (duplicate names, references to missing feeds). Which projection modules exist is for
//! `projection::build_all` to say.
//!
//! Every error names the file, line and column it comes from, so an operator can jump straight to
//! the mistake. Relative paths resolve against the config file's folder, as Cargo does.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

mod error;
pub mod mapping;
mod tables;
mod values;

pub use error::{ConfigError, Location};
pub use tables::{
    is_postgres_url, DaemonConfig, FeedConfig, FeedFormat, Live, LogFormat, OnChange, OnError,
    PostgresStore, ProjectionConfig, ProjectionSource, Synchronous, PAGE_CACHE_BYTES,
    POSTGRES_SCHEMA,
};
pub use values::{
    BodyOrigin, ByteLimit, Concurrency, FeedUrl, FileMode, Interval, Name, SecretSource,
};

/// The whole `consumer.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub daemon: DaemonConfig,
    #[serde(default, rename = "feed")]
    pub feeds: Vec<FeedConfig>,
    #[serde(default, rename = "projection")]
    pub projections: Vec<ProjectionConfig>,
    /// Where the config came from, to locate errors found after parsing.
    #[serde(skip)]
    pub source: ConfigSource,
}

/// The file a config was read from and its text.
#[derive(Default, Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    pub text: String,
}

/// Not the text: it may hold secrets.
impl std::fmt::Debug for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSource")
            .field("path", &self.path)
            .field("bytes", &self.text.len())
            .finish()
    }
}

impl ConfigSource {
    pub fn locate<T>(&self, spanned: &Spanned<T>) -> Location {
        Location::at_offset(&self.path, &self.text, spanned.span().start)
    }

    /// The folder relative paths in the config are resolved against.
    pub fn dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            ConfigError::new(Location::whole_file(path), format!("cannot read: {err}"))
        })?;
        Config::parse(path, text)
    }

    /// Parses and validates `text` as if read from `path`.
    pub fn parse(path: &Path, text: String) -> Result<Config, ConfigError> {
        let mut config: Config =
            toml::from_str(&text).map_err(|err| ConfigError::from_toml(path, &text, &err))?;
        config.source = ConfigSource {
            path: path.to_path_buf(),
            text,
        };
        config.validate()?;
        config.resolve_paths();
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let src = &self.source;
        if self.daemon.database_mode.0 & 0o002 != 0 {
            return Err(ConfigError::new(
                Location::whole_file(&src.path),
                format!(
                    "database_mode {:04o} lets every user write the database: write it like \"0600\" or \"0640\"",
                    self.daemon.database_mode.0
                ),
            ));
        }
        self.validate_store()?;
        if let Some(listen) = &self.daemon.metrics_listen {
            if listen.get_ref().parse::<std::net::SocketAddr>().is_err() {
                return Err(ConfigError::new(
                    src.locate(listen),
                    format!(
                        "metrics_listen {:?} is not an address and port, like \"127.0.0.1:9464\"",
                        listen.get_ref()
                    ),
                ));
            }
        }
        let mut feed_names = HashSet::new();
        for feed in &self.feeds {
            if !feed_names.insert(feed.name()) {
                return Err(ConfigError::new(
                    src.locate(&feed.name),
                    format!("feed {:?} is defined twice", feed.name()),
                ));
            }
            match (&feed.tls_client_cert, &feed.tls_client_key) {
                (Some(spanned), None) | (None, Some(spanned)) => {
                    return Err(ConfigError::new(
                        src.locate(spanned),
                        format!(
                            "feed {:?}: tls_client_cert and tls_client_key go together",
                            feed.name()
                        ),
                    ))
                }
                _ => {}
            }
            if feed.live == Live::Sse && feed.live_url.is_none() {
                return Err(ConfigError::new(
                    src.locate(&feed.name),
                    format!(
                        "feed {:?}: live = \"sse\" needs live_url, the publisher's event stream",
                        feed.name()
                    ),
                ));
            }
            if let Some(mapping) = &feed.mapping {
                let long_poll_named = feed.live == Live::LongPoll && mapping.paging.follows_pages();
                let problem = match feed.format {
                    _ if long_poll_named => Some("live = \"long-poll\" asks for the page after the head by its offset: with paging by links, cursors or none, use live = \"sse\" or \"poll\"".to_string()),
                    FeedFormat::Flux => Some("a mapping reads inline feeds: set format = \"inline\"".to_string()),
                    FeedFormat::Inline => mapping.problem(),
                };
                if let Some(problem) = problem {
                    return Err(ConfigError::new(
                        src.locate(&feed.name),
                        format!("feed {:?}: [feed.mapping]: {problem}", feed.name()),
                    ));
                }
            }
            if feed.retry_max.0 < feed.retry_initial.0 {
                return Err(ConfigError::new(
                    src.locate(&feed.name),
                    format!(
                        "feed {:?}: retry_max must not be less than retry_initial",
                        feed.name()
                    ),
                ));
            }
        }
        let mut projection_names = HashSet::new();
        for projection in &self.projections {
            let name = projection.name();
            if !projection_names.insert(name) {
                return Err(ConfigError::new(
                    src.locate(&projection.name),
                    format!("projection {name:?} is defined twice"),
                ));
            }
            if !feed_names.contains(projection.feed()) {
                return Err(ConfigError::new(
                    src.locate(&projection.feed),
                    format!(
                        "projection {name:?} reads feed {:?}, which no [[feed]] defines",
                        projection.feed()
                    ),
                ));
            }
            match (&projection.file, &projection.module) {
                (Some(_), Some(module)) => {
                    return Err(ConfigError::new(
                        src.locate(module),
                        format!("projection {name:?} sets both `file` and `module`; keep one"),
                    ))
                }
                (None, None) => {
                    return Err(ConfigError::new(
                        src.locate(&projection.name),
                        format!(
                            "projection {name:?} needs `file` (a declarative projection) or `module` (a Rust projection)"
                        ),
                    ))
                }
                (Some(_), None) | (None, Some(_)) => {}
            }
            let flux = self
                .feeds
                .iter()
                .any(|f| f.name() == projection.feed() && f.format == FeedFormat::Flux);
            if projection.on_error == OnError::Park && flux {
                return Err(ConfigError::new(
                    src.locate(&projection.name),
                    format!(
                        "projection {name:?}: on_error = \"park\" parks the later events of a poison event's aggregate, and a Flux feed's pages do not say an event's aggregate; use \"skip\" or \"stop\", or an inline feed"
                    ),
                ));
            }
        }
        if self.projections.is_empty() {
            return Err(ConfigError::new(
                Location::whole_file(&src.path),
                "no [[projection]] is defined: there is nothing to do",
            ));
        }
        Ok(())
    }

    /// A PostgreSQL URL that parses, a schema that is a plain identifier, and the PostgreSQL
    /// settings only with a PostgreSQL store.
    fn validate_store(&self) -> Result<(), ConfigError> {
        let src = &self.source;
        let daemon = &self.daemon;
        let whole = || Location::whole_file(&src.path);
        if !is_postgres_url(&daemon.database) {
            if let Some(schema) = &daemon.schema {
                return Err(ConfigError::new(
                    src.locate(schema),
                    "schema is for a PostgreSQL store: set database to a postgres:// URL, or drop schema",
                ));
            }
            if daemon.password.is_some() {
                return Err(ConfigError::new(
                    whole(),
                    "[daemon] password is for a PostgreSQL store: set database to a postgres:// URL, or drop password",
                ));
            }
            return Ok(());
        }
        let url = daemon.database.to_string_lossy();
        // The parser's message never repeats the URL, which may hold a password.
        if let Err(err) = url.parse::<postgres::Config>() {
            return Err(ConfigError::new(
                whole(),
                format!(
                    "[daemon] database is not a PostgreSQL URL like postgres://user@host/db: {err}"
                ),
            ));
        }
        if let Some(schema) = &daemon.schema {
            let name = schema.get_ref();
            // Leaves room for the rebuilds' schemas, named `<schema>_rebuild_<hash>`.
            let plain = name.len() <= 40
                && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !plain {
                return Err(ConfigError::new(
                    src.locate(schema),
                    format!("schema {name:?} is not a plain PostgreSQL name: use lower-case letters, digits and _, starting with a letter (at most 40)"),
                ));
            }
        }
        if let Some(limit) = &daemon.max_database_bytes {
            return Err(ConfigError::new(
                src.locate(limit),
                "max_database_bytes caps a SQLite file; on PostgreSQL, limit the space where the server keeps its data",
            ));
        }
        if daemon.lease_timeout.0 < std::time::Duration::from_secs(1) {
            return Err(ConfigError::new(
                whole(),
                "[daemon] lease_timeout is under a second: a daemon would lose its leases to the smallest pause",
            ));
        }
        Ok(())
    }

    fn resolve_paths(&mut self) {
        let dir = self.source.dir();
        self.daemon.resolve_paths(&dir);
        for feed in &mut self.feeds {
            feed.resolve_paths(&dir);
        }
        for projection in &mut self.projections {
            if let Some(file) = &mut projection.file {
                let resolved = dir.join(file.get_ref());
                *file.get_mut() = resolved;
            }
        }
    }

    /// Only the `[daemon]` table of a config file, paths resolved, the rest unchecked: what
    /// `projector ctl` needs to find the socket, even when a projection file is broken.
    pub fn daemon_section(path: &Path) -> Result<DaemonConfig, ConfigError> {
        #[derive(Deserialize)]
        struct DaemonOnly {
            daemon: DaemonConfig,
        }
        let text = std::fs::read_to_string(path).map_err(|err| {
            ConfigError::new(Location::whole_file(path), format!("cannot read: {err}"))
        })?;
        let only: DaemonOnly =
            toml::from_str(&text).map_err(|err| ConfigError::from_toml(path, &text, &err))?;
        let source = ConfigSource {
            path: path.to_path_buf(),
            text: String::new(),
        };
        let mut daemon = only.daemon;
        daemon.resolve_paths(&source.dir());
        Ok(daemon)
    }

    /// What a reload cannot change in a running daemon, or None if `other` keeps it.
    pub fn fixed_setting_changed(&self, other: &Config) -> Option<&'static str> {
        let (old, new) = (&self.daemon, &other.daemon);
        if old.database != new.database {
            Some("daemon.database")
        } else if old.postgres != new.postgres {
            Some("daemon.schema, password or lease_timeout")
        } else if old.control_socket != new.control_socket {
            Some("daemon.control_socket")
        } else if old.control_socket_mode != new.control_socket_mode {
            Some("daemon.control_socket_mode")
        } else if old.database_mode != new.database_mode {
            Some("daemon.database_mode")
        } else if old.log_format != new.log_format {
            Some("daemon.log_format")
        } else if old.metrics_listen.as_ref().map(|l| l.get_ref())
            != new.metrics_listen.as_ref().map(|l| l.get_ref())
        {
            Some("daemon.metrics_listen")
        } else {
            None
        }
    }

    pub fn feed(&self, name: &str) -> Option<&FeedConfig> {
        self.feeds.iter().find(|feed| feed.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const VALID: &str = r#"
[daemon]
database = "data/projector.db"
control_socket = "projector.sock"

[[feed]]
name = "bank"
url = "http://127.0.0.1:3000/events"
format = "flux"
poll_interval = "2s"

[[projection]]
name = "ledger"
feed = "bank"
module = "account_ledger"
on_error = "skip"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/projector/consumer.toml"), text.to_string())
    }

    fn error_of(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("config was accepted:\n{text}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn valid_config_gets_defaults_and_resolved_paths() -> Result<(), ConfigError> {
        let config = parse(VALID)?;
        let feed = &config.feeds[0];
        assert_eq!(feed.poll_interval.0, Duration::from_secs(2));
        assert_eq!(feed.body_concurrency.0, 32);
        assert_eq!(config.daemon.stop_timeout.0, Duration::from_secs(10));
        assert_eq!(feed.max_response_bytes.0, 16 * 1024 * 1024);
        assert_eq!(
            config.daemon.database,
            PathBuf::from("/etc/projector/data/projector.db")
        );
        assert_eq!(config.projections[0].on_error, OnError::Skip);
        Ok(())
    }

    #[test]
    fn unknown_key_is_located() {
        let text = VALID.replace("poll_interval = \"2s\"", "poll_intervall = \"2s\"");
        let err = error_of(&text);
        assert!(
            err.starts_with("/etc/projector/consumer.toml:10:1:"),
            "{err}"
        );
        assert!(err.contains("poll_intervall"), "{err}");
    }

    #[test]
    fn wrong_type_and_zero_interval_are_located() {
        let err = error_of(&VALID.replace("\"2s\"", "5"));
        assert!(err.contains(":10:17:"), "{err}");
        let err = error_of(&VALID.replace("\"2s\"", "\"0s\""));
        assert!(
            err.contains(":10:17:") && err.contains("more than zero"),
            "{err}"
        );
        let err = error_of(&VALID.replace("\"2s\"", "\"-5s\""));
        assert!(err.contains(":10:17:"), "{err}");
    }

    #[test]
    fn duplicate_names_are_located_at_the_second() {
        let text = format!(
            "{VALID}\n[[projection]]\nname = \"ledger\"\nfeed = \"bank\"\nmodule = \"account_ledger\"\n"
        );
        let err = error_of(&text);
        assert!(
            err.contains(":19:8:") && err.contains("defined twice"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_feed_is_located() {
        let err = error_of(&VALID.replace("feed = \"bank\"", "feed = \"bnak\""));
        assert!(err.contains(":14:8:") && err.contains("\"bnak\""), "{err}");
    }

    #[test]
    fn bad_urls_and_names_are_refused() {
        let err = error_of(&VALID.replace("http://127.0.0.1:3000/events", "http://:3000/events"));
        assert!(err.contains(":8:7:"), "{err}");
        let err = error_of(&VALID.replace("http://127.0.0.1:3000/events", "ftp://x/events"));
        assert!(err.contains("http://"), "{err}");
        let err = error_of(&VALID.replace("name = \"bank\"", "name = \"\""));
        assert!(err.contains(":7:8:") && err.contains("empty"), "{err}");
    }

    #[test]
    fn socket_mode_log_format_and_synchronous() -> Result<(), ConfigError> {
        let config = parse(VALID)?;
        assert_eq!(config.daemon.control_socket_mode, FileMode(0o600));
        assert_eq!(config.daemon.log_format, LogFormat::Text);
        assert_eq!(config.daemon.synchronous, Synchronous::Normal);
        let with = |extra: &str| {
            VALID.replace(
                "control_socket = \"projector.sock\"",
                &format!("control_socket = \"projector.sock\"\n{extra}"),
            )
        };
        let config = parse(&with(
            "control_socket_mode = \"0660\"\nlog_format = \"json\"",
        ))?;
        assert_eq!(config.daemon.control_socket_mode, FileMode(0o660));
        assert_eq!(config.daemon.log_format, LogFormat::Json);
        for bad in ["\"0400\"", "\"0700\"", "\"1600\"", "\"rw\"", "600"] {
            let err = error_of(&with(&format!("control_socket_mode = {bad}")));
            assert!(err.contains(":5:23:"), "{bad}: {err}");
        }
        // A number is told to be written as a string, the octal one too (not TOML as it is).
        for number in ["660", "0660"] {
            let err = error_of(&with(&format!("control_socket_mode = {number}")));
            assert!(
                err.contains(":5:23:") && err.contains("control_socket_mode = \"0660\""),
                "{number}: {err}"
            );
        }
        let err = error_of(&with("log_format = \"xml\""));
        assert!(err.contains(":5:14:"), "{err}");
        let config = parse(&with("synchronous = \"full\""))?;
        assert_eq!(config.daemon.synchronous, Synchronous::Full);
        let err = error_of(&with("synchronous = \"off\""));
        assert!(err.contains(":5:15:") && err.contains("normal"), "{err}");
        assert_eq!(config.daemon.page_cache_bytes.0, PAGE_CACHE_BYTES);
        let config = parse(&with("page_cache_bytes = 33554432"))?;
        assert_eq!(config.daemon.page_cache_bytes.0, 32 << 20);
        let err = error_of(&with("page_cache_bytes = 10"));
        assert!(err.contains(":5:20:"), "{err}");
        Ok(())
    }

    #[test]
    fn malformed_toml_is_located() {
        let err = error_of("[daemon\ndatabase = 1");
        assert!(err.starts_with("/etc/projector/consumer.toml:1:"), "{err}");
    }

    #[test]
    fn location_counts_characters_not_bytes() {
        let loc = Location::at_offset(Path::new("f"), "ab\n\u{e9}\u{e9}x", 7);
        assert_eq!((loc.line, loc.column), (2, 3));
        // An offset inside a character is not a panic.
        let loc = Location::at_offset(Path::new("f"), "\u{e9}", 1);
        assert_eq!((loc.line, loc.column), (1, 1));
    }

    #[test]
    fn a_postgres_url_makes_a_postgres_store_and_its_settings_are_checked() -> anyhow::Result<()> {
        let on_postgres = |keys: &str| {
            VALID.replace(
                "database = \"data/projector.db\"",
                &format!("database = \"postgres://reader:s3cret@db.internal/read_models\"\n{keys}"),
            )
        };
        let config = parse(&on_postgres(
            "schema = \"bank_models\"\npassword = { file = \"pw\" }",
        ))?;
        let store = config
            .daemon
            .postgres
            .clone()
            .unwrap_or_else(|| panic!("no store"));
        assert_eq!(store.schema, "bank_models");
        assert_eq!(store.lease_timeout, Duration::from_secs(10));
        assert_eq!(
            store.password,
            Some(SecretSource::File(PathBuf::from("/etc/projector/pw")))
        );
        // The password in the URL is never shown.
        assert_eq!(
            config.daemon.database_shown(),
            "postgres://db.internal/read_models (schema bank_models)"
        );
        let refused = config
            .daemon
            .sqlite_file("`projector query`")
            .err()
            .map(|e| e.to_string());
        assert!(refused.is_some_and(|e| e.contains("use psql")));
        assert_eq!(
            parse(&on_postgres(""))?.daemon.postgres.map(|p| p.schema),
            Some(POSTGRES_SCHEMA.into())
        );

        let err = error_of(&on_postgres("schema = \"Bank-Models\""));
        assert!(
            err.starts_with("/etc/projector/consumer.toml:4:10:")
                && err.contains("plain PostgreSQL name"),
            "{err}"
        );
        let err = error_of(&on_postgres("max_database_bytes = 1000000"));
        assert!(
            err.contains("max_database_bytes caps a SQLite file"),
            "{err}"
        );
        let err = error_of(&on_postgres("lease_timeout = \"200ms\""));
        assert!(err.contains("lease_timeout"), "{err}");
        let err = error_of(&VALID.replace("control_socket", "schema = \"x\"\ncontrol_socket"));
        assert!(err.contains("schema is for a PostgreSQL store"), "{err}");
        let err = error_of(&VALID.replace(
            "database = \"data/projector.db\"",
            "database = \"postgres://h/db?sslmode=sometimes\"",
        ));
        assert!(err.contains("not a PostgreSQL URL"), "{err}");
        Ok(())
    }
}
