//! The daemon's configuration (`consumer.toml`): serde structs that refuse unknown keys, plus the
//! checks serde cannot make (duplicate names, references to missing feeds or modules).
//!
//! Every error names the file, line and column it comes from, so an operator can jump straight to
//! the mistake. Relative paths resolve against the config file's folder, as Cargo does.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;
use url::Url;

/// A place in a file, printed as `file:line:column` (or just `file` when it is the whole file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl Location {
    pub fn whole_file(file: &Path) -> Self {
        Location {
            file: file.to_path_buf(),
            line: 0,
            column: 0,
        }
    }

    /// The location of byte `offset` of `source`, the text of `file`.
    pub fn at_offset(file: &Path, source: &str, offset: usize) -> Self {
        let mut end = offset.min(source.len());
        while !source.is_char_boundary(end) {
            end -= 1;
        }
        let before = &source[..end];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Location {
            file: file.to_path_buf(),
            line,
            column,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.file.display())
        } else {
            write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
        }
    }
}

/// A configuration mistake, located. The CLI exits with status 2 on these.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{location}: {message}")]
pub struct ConfigError {
    pub location: Location,
    pub message: String,
}

impl ConfigError {
    pub fn new(location: Location, message: impl Into<String>) -> Self {
        ConfigError {
            location,
            message: message.into(),
        }
    }

    /// Turns a TOML parse or type error of `source` (the text of `file`) into a located error.
    pub fn from_toml(file: &Path, source: &str, err: &toml::de::Error) -> Self {
        let location = match err.span() {
            Some(span) => Location::at_offset(file, source, span.start),
            None => Location::whole_file(file),
        };
        ConfigError::new(location, err.message().trim().to_string())
    }
}

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
#[derive(Debug, Default, Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    pub text: String,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// The SQLite file holding the read models and the checkpoints.
    pub database: PathBuf,
    /// The control socket's path (`projector ctl` speaks to it).
    pub control_socket: PathBuf,
    /// The socket's permission bits, octal: "0600" lets only the daemon's user steer it,
    /// "0660" also its group.
    #[serde(default)]
    pub control_socket_mode: SocketMode,
    /// Caps the database file's size: past it, writes stop as on a full disk (and resume after
    /// a reload that raises it). No cap by default.
    #[serde(default)]
    pub max_database_bytes: Option<ByteLimit>,
    /// "text" (colours on a terminal, plain under systemd) or "json" (one object per line).
    #[serde(default)]
    pub log_format: LogFormat,
    /// "normal" or "full": how far each commit is pushed to disk (see [`Synchronous`]).
    #[serde(default)]
    pub synchronous: Synchronous,
    /// The most memory the writer's SQLite page cache holds. Read models larger than it are
    /// read back from the OS's cache at every batch.
    #[serde(default = "defaults::page_cache_bytes")]
    pub page_cache_bytes: ByteLimit,
    /// How long a stop or a reload waits for the batches in flight to commit. Past it, the
    /// statement running is interrupted and the batch rolls back whole, to be read again.
    #[serde(default = "defaults::stop_timeout")]
    pub stop_timeout: Interval,
}

impl DaemonConfig {
    fn resolve_paths(&mut self, dir: &Path) {
        self.database = dir.join(&self.database);
        self.control_socket = dir.join(&self.control_socket);
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// SQLite's `synchronous` in WAL mode. Normal: a commit survives the daemon crashing or being
/// killed, and the write-ahead log is synced at each checkpoint; a power loss or an OS crash may
/// drop the last commits, which are then read again from the feed and applied once. Full: each
/// commit is synced too, so it survives a power loss, at the cost of an fsync per batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    #[default]
    Normal,
    Full,
}

/// Permission bits for the control socket, written as an octal string ("0600"). The owner must
/// be able to read and write it; execute bits mean nothing on a socket and are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(pub u32);

impl Default for SocketMode {
    fn default() -> Self {
        SocketMode(0o600)
    }
}

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let mode = u32::from_str_radix(text.trim_start_matches("0o"), 8).map_err(|_| {
            serde::de::Error::custom(format!(
                "socket mode {text:?} is not an octal number like \"0600\" or \"0660\""
            ))
        })?;
        if mode > 0o777 || mode & 0o111 != 0 || mode & 0o600 != 0o600 {
            return Err(serde::de::Error::custom(format!(
                "socket mode {text:?} must give its owner read and write (0600) and no execute bits, like \"0600\" or \"0660\""
            )));
        }
        Ok(SocketMode(mode))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FeedFormat {
    /// The Flux feed: pages of entries, one more request per event body.
    Flux,
    /// Pages of events with their payloads inline (Eventhus's event shape).
    Inline,
}

impl FeedFormat {
    /// The name `consumer.toml` uses.
    pub fn name(self) -> &'static str {
        match self {
            FeedFormat::Flux => "flux",
            FeedFormat::Inline => "inline",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedConfig {
    pub name: Spanned<Name>,
    pub url: FeedUrl,
    pub format: FeedFormat,
    /// How long to wait at the head of the feed before asking again.
    #[serde(default = "defaults::poll_interval")]
    pub poll_interval: Interval,
    /// The whole of one request, connect to last byte.
    #[serde(default = "defaults::request_timeout")]
    pub request_timeout: Interval,
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: Interval,
    /// How many event bodies are fetched at once (order is kept).
    #[serde(default = "defaults::body_concurrency")]
    pub body_concurrency: Concurrency,
    /// The first retry delay after a failed request; it doubles up to `retry_max`.
    #[serde(default = "defaults::retry_initial")]
    pub retry_initial: Interval,
    #[serde(default = "defaults::retry_max")]
    pub retry_max: Interval,
    /// A response larger than this is refused while it streams in.
    #[serde(default = "defaults::max_response_bytes")]
    pub max_response_bytes: ByteLimit,
}

impl FeedConfig {
    pub fn name(&self) -> &str {
        &self.name.get_ref().0
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectionConfig {
    pub name: Spanned<Name>,
    pub feed: Spanned<Name>,
    /// A declarative projection: a TOML file of schema and per-event SQL.
    pub file: Option<Spanned<PathBuf>>,
    /// A Rust projection compiled into the binary, by its registered name.
    pub module: Option<Spanned<String>>,
    #[serde(default)]
    pub on_error: OnError,
}

impl ProjectionConfig {
    pub fn name(&self) -> &str {
        &self.name.get_ref().0
    }

    pub fn feed(&self) -> &str {
        &self.feed.get_ref().0
    }
}

/// What a projection does with an event it cannot apply (a poison event).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Halt this projection at the event, with the error, while the others go on.
    #[default]
    Stop,
    /// Record the event in `projector_dead_letters` and move on.
    Skip,
}

/// A feed or projection name: non-empty, letters, digits, `_`, `-` and `.` only, so it is safe in
/// logs, file names and control commands.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Name(pub String);

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        if name.is_empty() {
            return Err(serde::de::Error::custom("a name must not be empty"));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(serde::de::Error::custom(format!(
                "name {name:?} has the character {bad:?}; use letters, digits, '_', '-' and '.'"
            )));
        }
        Ok(Name(name))
    }
}

/// An absolute http(s) URL with a host.
#[derive(Debug, Clone)]
pub struct FeedUrl(pub Url);

impl<'de> Deserialize<'de> for FeedUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let url = Url::parse(&text)
            .map_err(|err| serde::de::Error::custom(format!("invalid URL {text:?}: {err}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(serde::de::Error::custom(format!(
                "URL {text:?} must start with http:// or https://"
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(serde::de::Error::custom(format!(
                "URL {text:?} has no host"
            )));
        }
        Ok(FeedUrl(url))
    }
}

/// A positive duration written the humantime way: `"500ms"`, `"5s"`, `"2m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval(pub Duration);

impl<'de> Deserialize<'de> for Interval {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let duration = humantime::parse_duration(&text).map_err(|err| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?}: {err} (write it like \"500ms\", \"5s\" or \"1m\")"
            ))
        })?;
        if duration.is_zero() {
            return Err(serde::de::Error::custom(format!(
                "duration {text:?} must be more than zero"
            )));
        }
        Ok(Interval(duration))
    }
}

/// How many requests may run at once: 1 to 256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concurrency(pub usize);

impl<'de> Deserialize<'de> for Concurrency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = i64::deserialize(deserializer)?;
        match usize::try_from(value) {
            Ok(n @ 1..=256) => Ok(Concurrency(n)),
            _ => Err(serde::de::Error::custom(format!(
                "concurrency {value} must be between 1 and 256"
            ))),
        }
    }
}

/// A size in bytes, at least 1 KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteLimit(pub usize);

impl<'de> Deserialize<'de> for ByteLimit {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = i64::deserialize(deserializer)?;
        match usize::try_from(value) {
            Ok(n) if n >= 1024 => Ok(ByteLimit(n)),
            _ => Err(serde::de::Error::custom(format!(
                "byte limit {value} must be at least 1024"
            ))),
        }
    }
}

/// The writer's page cache unless `[daemon] page_cache_bytes` says otherwise.
pub const PAGE_CACHE_BYTES: usize = 8 << 20;

mod defaults {
    use super::{ByteLimit, Concurrency, Interval, PAGE_CACHE_BYTES};
    use std::time::Duration;

    pub fn poll_interval() -> Interval {
        Interval(Duration::from_secs(5))
    }
    pub fn request_timeout() -> Interval {
        Interval(Duration::from_secs(10))
    }
    pub fn connect_timeout() -> Interval {
        Interval(Duration::from_secs(5))
    }
    /// 32 rather than 16: 9% faster on the Flux catch-up (6 paired runs), the feed server
    /// kept busier while the daemon works through the answers it has.
    pub fn body_concurrency() -> Concurrency {
        Concurrency(32)
    }
    pub fn retry_initial() -> Interval {
        Interval(Duration::from_millis(100))
    }
    pub fn retry_max() -> Interval {
        Interval(Duration::from_secs(30))
    }
    /// Well under the systemd unit's TimeoutStopSec (60 s); a batch commits in well under a
    /// second.
    pub fn stop_timeout() -> Interval {
        Interval(Duration::from_secs(10))
    }
    pub fn page_cache_bytes() -> ByteLimit {
        ByteLimit(PAGE_CACHE_BYTES)
    }

    pub fn max_response_bytes() -> ByteLimit {
        ByteLimit(16 * 1024 * 1024)
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
        let mut feed_names = HashSet::new();
        for feed in &self.feeds {
            if !feed_names.insert(feed.name()) {
                return Err(ConfigError::new(
                    src.locate(&feed.name),
                    format!("feed {:?} is defined twice", feed.name()),
                ));
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
                (None, Some(module)) => {
                    if crate::projections::find(module.get_ref()).is_none() {
                        let known: Vec<&str> =
                            crate::projections::all().iter().map(|m| m.name).collect();
                        return Err(ConfigError::new(
                            src.locate(module),
                            format!(
                                "no Rust projection module named {:?} (this build has: {})",
                                module.get_ref(),
                                known.join(", ")
                            ),
                        ));
                    }
                }
                (Some(_), None) => {}
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

    fn resolve_paths(&mut self) {
        let dir = self.source.dir();
        self.daemon.resolve_paths(&dir);
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
        } else if old.control_socket != new.control_socket {
            Some("daemon.control_socket")
        } else if old.control_socket_mode != new.control_socket_mode {
            Some("daemon.control_socket_mode")
        } else if old.log_format != new.log_format {
            Some("daemon.log_format")
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
    fn missing_feed_and_unknown_module_are_located() {
        let err = error_of(&VALID.replace("feed = \"bank\"", "feed = \"bnak\""));
        assert!(err.contains(":14:8:") && err.contains("\"bnak\""), "{err}");
        let err = error_of(&VALID.replace("\"account_ledger\"", "\"nope\""));
        assert!(
            err.contains(":15:10:") && err.contains("account_ledger"),
            "{err}"
        );
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
        assert_eq!(config.daemon.control_socket_mode, SocketMode(0o600));
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
        assert_eq!(config.daemon.control_socket_mode, SocketMode(0o660));
        assert_eq!(config.daemon.log_format, LogFormat::Json);
        for bad in ["\"0400\"", "\"0700\"", "\"1600\"", "\"rw\"", "600"] {
            let err = error_of(&with(&format!("control_socket_mode = {bad}")));
            assert!(err.contains(":5:23:"), "{bad}: {err}");
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
}
