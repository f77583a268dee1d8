//! The tables of `consumer.toml`: `[daemon]`, `[[feed]]` and `[[projection]]`, with their
//! defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::mapping::{Mapping, Paging};
use super::values::{
    BodyOrigin, ByteLimit, Concurrency, FeedUrl, FileMode, Interval, Name, SecretSource,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// The SQLite file holding the read models and the checkpoints, or a PostgreSQL URL
    /// (`postgres://user@host/db`), whose store is then [`DaemonConfig::postgres`].
    pub database: PathBuf,
    /// PostgreSQL only: the schema the daemon keeps everything in (made if missing).
    #[serde(default)]
    pub schema: Option<Spanned<String>>,
    /// PostgreSQL only: the password, from `{ env = "..." }`, `{ file = "..." }` or
    /// `{ credential = "..." }` (or in the URL).
    #[serde(default)]
    pub password: Option<SecretSource>,
    /// PostgreSQL only: how long a daemon that stops answering (frozen, cut off) keeps its
    /// feeds' leases before the server ends its session and another daemon takes over.
    #[serde(default = "defaults::lease_timeout")]
    pub lease_timeout: Interval,
    /// The PostgreSQL store, when `database` is a PostgreSQL URL; set by `Config::parse`.
    #[serde(skip)]
    pub postgres: Option<PostgresStore>,
    /// The control socket's path (`projector ctl` speaks to it).
    pub control_socket: PathBuf,
    /// The socket's permission bits, octal: "0600" lets only the daemon's user steer it,
    /// "0660" also its group.
    #[serde(default)]
    pub control_socket_mode: FileMode,
    /// The database's permission bits (and its -wal, -shm and .lock files'): "0600" lets only
    /// the daemon's user read the read models, "0640" its group too. Never writable by others.
    #[serde(default)]
    pub database_mode: FileMode,
    /// Caps the database file's size: past it, writes stop as on a full disk (and resume after
    /// a reload that raises it). No cap by default.
    #[serde(default)]
    pub max_database_bytes: Option<Spanned<ByteLimit>>,
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
    /// Where `GET /metrics` (Prometheus), `/healthz` and `/readyz` are served, e.g.
    /// "127.0.0.1:9464". Off by default.
    #[serde(default)]
    pub metrics_listen: Option<Spanned<String>>,
    /// `/healthz` answers 503 once the writer has been on one batch this long.
    #[serde(default = "defaults::stuck_after")]
    pub stuck_after: Interval,
    /// Push the figures to Graphite too (`[daemon.graphite]`). Off by default.
    #[serde(default)]
    pub graphite: Option<GraphiteConfig>,
}

/// `[daemon.graphite]`: where and how often the figures are pushed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphiteConfig {
    /// Graphite's plaintext listener, `host:port` (usually port 2003).
    pub address: String,
    /// The first component of every path.
    #[serde(default = "defaults::graphite_prefix")]
    pub prefix: String,
    #[serde(default = "defaults::graphite_interval")]
    pub interval: Interval,
}

/// Where a PostgreSQL store is: `[daemon] database` as a URL, with its schema and password.
#[derive(Debug, Clone, PartialEq)]
pub struct PostgresStore {
    /// As written; it may hold a password, so it is shown only through [`PostgresStore::shown`].
    pub url: String,
    pub schema: String,
    pub password: Option<SecretSource>,
    pub lease_timeout: std::time::Duration,
    /// `[daemon] synchronous`: whether a commit waits for the server's disk.
    pub synchronous: Synchronous,
}

impl PostgresStore {
    /// The URL without its password, and the schema: what logs and `status` show.
    pub fn shown(&self) -> String {
        let url = url::Url::parse(&self.url)
            .map(|url| crate::shown::url(&url))
            .unwrap_or_else(|_| "postgres://(unreadable URL)".into());
        format!("{url} (schema {})", self.schema)
    }
}

/// The schema unless `[daemon] schema` says otherwise.
pub const POSTGRES_SCHEMA: &str = "projector";

/// Whether `[daemon] database` is a PostgreSQL URL rather than a file.
pub fn is_postgres_url(database: &Path) -> bool {
    let text = database.to_string_lossy();
    text.starts_with("postgres://") || text.starts_with("postgresql://")
}

impl DaemonConfig {
    pub(super) fn resolve_paths(&mut self, dir: &Path) {
        if is_postgres_url(&self.database) {
            self.postgres = Some(PostgresStore {
                url: self.database.to_string_lossy().into_owned(),
                schema: self
                    .schema
                    .as_ref()
                    .map_or(POSTGRES_SCHEMA.to_string(), |s| s.get_ref().clone()),
                password: self.password.clone().map(|password| match password {
                    SecretSource::File(path) => SecretSource::File(dir.join(path)),
                    other => other,
                }),
                lease_timeout: self.lease_timeout.0,
                synchronous: self.synchronous,
            });
        } else {
            self.database = dir.join(&self.database);
        }
        self.control_socket = dir.join(&self.control_socket);
    }

    /// Where the read models are, for people.
    pub fn database_shown(&self) -> String {
        match &self.postgres {
            Some(postgres) => postgres.shown(),
            None => self.database.display().to_string(),
        }
    }

    /// The SQLite file, for what reads or changes it directly; on PostgreSQL, why `what` cannot.
    pub fn sqlite_file(&self, what: &str) -> anyhow::Result<&Path> {
        match &self.postgres {
            Some(postgres) => anyhow::bail!(
                "{what} works on a SQLite database, and this configuration keeps its read models in PostgreSQL ({}): use psql there, or `projector ctl` against a running daemon",
                postgres.shown()
            ),
            None => Ok(&self.database),
        }
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
    /// How the reader learns, at the head, that the feed moved: by polling every
    /// `poll_interval` ("poll"), or told at once by a Server-Sent-Events stream at `live_url`
    /// ("sse"), polling as before while the stream is down.
    #[serde(default)]
    pub live: Live,
    pub live_url: Option<Spanned<FeedUrl>>,
    /// With `live = "long-poll"`: how long the feed may hold a page request at its head
    /// (sent as `wait=SECONDS`); the request's timeout is raised by as much.
    #[serde(default = "defaults::long_poll_wait")]
    pub long_poll_wait: Interval,
    /// While pages come back full, how many are asked for at once, kept in order (1: one
    /// after the other). Pages of 1 MiB or more are read one at a time.
    #[serde(default = "defaults::page_lookahead")]
    pub page_lookahead: Concurrency,
    /// The first retry delay after a failed request; it doubles up to `retry_max`.
    #[serde(default = "defaults::retry_initial")]
    pub retry_initial: Interval,
    #[serde(default = "defaults::retry_max")]
    pub retry_max: Interval,
    /// A response larger than this is refused while it streams in.
    #[serde(default = "defaults::max_response_bytes")]
    pub max_response_bytes: ByteLimit,
    /// What the reader holds in memory ahead of the writer: entries of pages read ahead and
    /// bodies waiting their turn. Reading waits while it is spent.
    #[serde(default = "defaults::max_buffered_bytes")]
    pub max_buffered_bytes: ByteLimit,
    /// While catching up, find the feed's head with a few page requests (every 30 s), so that
    /// the lag and the time left are exact. Off, the head shown is the end of the last page
    /// read until the reader reaches it.
    #[serde(default = "defaults::find_head")]
    pub find_head: bool,
    /// A feed whose checkpoints have not moved for this long while its head is ahead of them
    /// (not paused) is `stalled`, and the log says so once.
    #[serde(default = "defaults::stall_after")]
    pub stall_after: Interval,
    /// Headers sent with every request to the feed's own origin (never elsewhere), e.g.
    /// `Authorization`; values may come from the environment, a file or a systemd credential.
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<SecretSource>>,
    /// Where Flux entry URLs and redirects may lead (see [`BodyOrigin`]).
    #[serde(default)]
    pub body_origin: BodyOrigin,
    /// A PEM file of CA certificates trusted for this feed besides the built-in roots: a
    /// private CA.
    pub tls_ca: Option<Spanned<PathBuf>>,
    /// A PEM certificate chain and its private key, for feeds that ask for a client certificate.
    pub tls_client_cert: Option<Spanned<PathBuf>>,
    pub tls_client_key: Option<Spanned<PathBuf>>,
    /// How an inline feed of another shape is read (`[feed.mapping]`); Eventhus's and Flux's
    /// names without one.
    pub mapping: Option<Mapping>,
}

impl FeedConfig {
    pub fn name(&self) -> &str {
        &self.name.get_ref().0
    }

    /// How the feed's pages follow one another.
    pub fn paging(&self) -> Paging {
        self.mapping.as_ref().map_or(Paging::Offset, |m| m.paging)
    }

    /// Relative files (secrets, certificates) are the config folder's.
    pub(super) fn resolve_paths(&mut self, dir: &Path) {
        for value in self.headers.values_mut() {
            if let SecretSource::File(path) = value.get_mut() {
                *path = dir.join(&*path);
            }
        }
        for path in [
            &mut self.tls_ca,
            &mut self.tls_client_cert,
            &mut self.tls_client_key,
        ]
        .into_iter()
        .flatten()
        {
            let resolved = dir.join(path.get_ref());
            *path.get_mut() = resolved;
        }
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
    #[serde(default)]
    pub on_change: OnChange,
}

/// Where a projection's definition comes from: exactly one of `file` and `module`, as a valid
/// config has it.
#[derive(Debug, Clone, Copy)]
pub enum ProjectionSource<'a> {
    File(&'a Spanned<PathBuf>),
    Module(&'a Spanned<String>),
}

impl ProjectionConfig {
    /// The definition's source; None only in a config that did not validate.
    pub fn source(&self) -> Option<ProjectionSource<'_>> {
        match (&self.file, &self.module) {
            (Some(file), None) => Some(ProjectionSource::File(file)),
            (None, Some(module)) => Some(ProjectionSource::Module(module)),
            _ => None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name.get_ref().0
    }

    pub fn feed(&self) -> &str {
        &self.feed.get_ref().0
    }
}

/// How the reader learns that the feed moved, at its head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Live {
    #[default]
    Poll,
    Sse,
    #[serde(rename = "long-poll")]
    LongPoll,
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
    /// Record the event, and every later event of its aggregate until it is retried, in
    /// `projector_dead_letters`, in order; the other aggregates go on.
    Park,
}

/// What the daemon does with a projection whose definition changed since its tables were built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnChange {
    /// Rebuild it from the feed's start in a shadow copy, serving the old tables meanwhile.
    #[default]
    Rebuild,
    /// Refuse to start (or to reload), saying which projection changed and what to run.
    Refuse,
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
    /// 32 rather than 16: the feed server is kept busier while the daemon works through the
    /// answers it has (measured in BENCHMARKS.md).
    pub fn body_concurrency() -> Concurrency {
        Concurrency(32)
    }
    pub fn long_poll_wait() -> Interval {
        Interval(Duration::from_secs(30))
    }
    pub fn page_lookahead() -> Concurrency {
        Concurrency(4)
    }
    pub fn retry_initial() -> Interval {
        Interval(Duration::from_millis(100))
    }
    pub fn retry_max() -> Interval {
        Interval(Duration::from_secs(30))
    }
    /// Well under the systemd unit's TimeoutStopSec (60 s); a batch commits in well under a
    /// second.
    /// Long enough for a busy network, short enough that a frozen daemon's feeds move on soon.
    pub fn lease_timeout() -> Interval {
        Interval(Duration::from_secs(10))
    }
    pub fn stop_timeout() -> Interval {
        Interval(Duration::from_secs(10))
    }
    pub fn page_cache_bytes() -> ByteLimit {
        ByteLimit(PAGE_CACHE_BYTES)
    }

    pub fn find_head() -> bool {
        true
    }

    pub fn stall_after() -> Interval {
        Interval(Duration::from_secs(5 * 60))
    }

    pub fn graphite_prefix() -> String {
        "projector".into()
    }

    pub fn graphite_interval() -> Interval {
        Interval(Duration::from_secs(10))
    }

    /// Longer than any batch should take, shorter than a systemd watchdog would wait.
    pub fn stuck_after() -> Interval {
        Interval(Duration::from_secs(60))
    }

    pub fn max_response_bytes() -> ByteLimit {
        ByteLimit(16 * 1024 * 1024)
    }

    /// As large as the largest page `max_response_bytes` allows, so that one fits.
    pub fn max_buffered_bytes() -> ByteLimit {
        ByteLimit(16 * 1024 * 1024)
    }
}
