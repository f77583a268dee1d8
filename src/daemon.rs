//! The supervisor: holds the instance lock and the control socket for the life of the process,
//! runs an [`Engine`] (the writer and the feed readers of one configuration), and turns every
//! request, from the socket or from a signal, into the same code path.
//!
//! A reload stops the running engine (its batches in flight commit or roll back whole) and
//! starts one from the new configuration at the committed checkpoints; if the new one cannot
//! start, the previous configuration is started again. Pauses live in the database, so they
//! survive both a reload and a restart.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::control::handle::Inbox;
use crate::control::protocol::{DaemonStatus, Reply, Request};
use crate::control::server::ControlSocket;
use crate::feed::FeedClient;
use crate::monitor::FeedMonitor;
use crate::projection::ConfiguredProjection;
use crate::reader::retry::Backoff;
use crate::reader::{FeedReader, Member, ReadPolicy, Steering};
use crate::store;
use crate::writer::{Writer, WriterHandle, WriterSettings, WriterThread};

/// How long a pause waits for the feed's batch in flight before replying anyway.
const PAUSE_SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the systemd STATUS line is refreshed.
const STATUS_REFRESH: Duration = Duration::from_secs(2);
/// `status` shows the writer's batch once it has been on it this long.
const SLOW_BATCH_SHOWN: Duration = Duration::from_secs(1);
/// The log says so once the writer has been on one batch this long.
const SLOW_BATCH_WARNED: Duration = Duration::from_secs(30);
/// How often a stop past its timeout interrupts the writer again.
const INTERRUPT_REPEAT: Duration = Duration::from_millis(100);

/// Runs until a `stop` request, then lets every batch in flight commit or roll back whole and
/// returns. A failing feed never ends it; only a database that cannot be opened does.
pub async fn run(
    config: Config,
    projections: Vec<ConfiguredProjection>,
    // A parameter, so that it is dropped after every local, the instance lock included.
    mut inbox: Inbox,
) -> anyhow::Result<()> {
    // Held until the process exits: one daemon per database. The kernel drops it even on kill -9.
    let _instance_lock = store::lock_instance(&config.daemon.database)?;
    let socket = ControlSocket::bind(
        &config.daemon.control_socket,
        config.daemon.control_socket_mode,
    )?;
    let socket_path = socket.path().to_path_buf();
    for setting in crate::feed::http::proxy::unusable_settings(|name| std::env::var(name).ok()) {
        tracing::warn!("{setting}");
    }
    let engine = Engine::start(&config, projections, &History::new()).await?;
    let mut supervisor = Supervisor {
        config,
        engine: Some(engine),
        started_at: SystemTime::now(),
        started: Instant::now(),
        reloaded_at: None,
        slow_batch_warned: None,
    };
    let stop_serving = CancellationToken::new();
    let server = tokio::spawn(socket.serve(inbox.handle(), stop_serving.clone()));
    tracing::info!(
        database = %supervisor.config.daemon.database.display(),
        socket = %socket_path.display(),
        "projector is running"
    );
    crate::notify::ready(&supervisor.status().summary());

    let result = supervisor.serve(&mut inbox).await;

    crate::notify::stopping();
    tracing::info!("stopping: letting the batches in flight finish");
    stop_serving.cancel();
    // The socket file goes when the server does, so a new daemon can start at once.
    let _ = server.await;
    let stopped = match supervisor.engine.take() {
        Some(engine) => engine.stop().await,
        None => Ok(()),
    };
    result.and(stopped)?;
    tracing::info!("stopped");
    // Dropping the inbox, last, tells a waiting `ctl stop` that the daemon has finished.
    Ok(())
}

struct Supervisor {
    config: Config,
    /// None only while a reload swaps engines.
    engine: Option<Engine>,
    started_at: SystemTime,
    started: Instant,
    reloaded_at: Option<SystemTime>,
    /// When the writer's job that was last warned about as slow started.
    slow_batch_warned: Option<Instant>,
}

impl Supervisor {
    /// Answers requests until `stop`. An error means the daemon cannot go on (a reload that
    /// could start neither the new configuration nor the old one).
    async fn serve(&mut self, inbox: &mut Inbox) -> anyhow::Result<()> {
        let watchdog = crate::notify::watchdog_interval();
        let mut refresh = tokio::time::interval(match watchdog {
            // systemd recommends pinging at half the watchdog interval.
            Some(interval) => (interval / 2).min(STATUS_REFRESH),
            None => STATUS_REFRESH,
        });
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = inbox.next() => {
                    // Every handle lives in this process; the inbox keeps one, so this is Some.
                    let Some(command) = command else { return Ok(()) };
                    let stop = command.request == Request::Stop;
                    let answer = self.handle(command.request.clone()).await?;
                    command.answer(answer);
                    if stop {
                        return Ok(());
                    }
                }
                _ = refresh.tick() => {
                    self.warn_of_a_slow_batch();
                    if let Some(interval) = watchdog {
                        if self.engine.as_ref().is_some_and(|e| e.is_healthy(interval)) {
                            crate::notify::watchdog();
                        }
                    }
                    crate::notify::status(&self.status().summary());
                }
            }
        }
    }

    /// Says once per batch, in the log, when the writer has been on one for SLOW_BATCH_WARNED:
    /// which feed, projection and event (under systemd, the watchdog may stop it soon after).
    fn warn_of_a_slow_batch(&mut self) {
        let Some(writer) = self.engine.as_ref().map(|engine| &engine.writer) else {
            return;
        };
        let Some((started, slow)) = writer.slow_batch(SLOW_BATCH_WARNED) else {
            return;
        };
        if self.slow_batch_warned != Some(started) {
            self.slow_batch_warned = Some(started);
            tracing::warn!(
                "the writer has been on {}: a projection statement that runs this long holds \
                 every feed back (status shows it as slow_batch)",
                slow.describe()
            );
        }
    }

    async fn handle(&mut self, request: Request) -> anyhow::Result<Reply> {
        let reply = match request {
            Request::Status => Reply {
                ok: true,
                status: Some(self.status()),
                ..Reply::default()
            },
            Request::Pause { feed } => self.set_paused(feed.as_deref(), true).await,
            Request::Resume { feed } => self.set_paused(feed.as_deref(), false).await,
            Request::Reload => self.reload().await?,
            Request::Stop => {
                tracing::info!("stop requested");
                Reply::done("stopping")
            }
        };
        Ok(reply)
    }

    fn status(&self) -> DaemonStatus {
        let feeds = self
            .engine
            .as_ref()
            .map(|engine| {
                engine
                    .feeds
                    .values()
                    .map(|feed| feed.monitor.snapshot(&feed.url, *feed.paused.borrow()))
                    .collect()
            })
            .unwrap_or_default();
        DaemonStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            config: self.config.source.path.display().to_string(),
            database: self.config.daemon.database.display().to_string(),
            started_at: humantime::format_rfc3339_seconds(self.started_at).to_string(),
            uptime_seconds: self.started.elapsed().as_secs(),
            reloaded_at: self
                .reloaded_at
                .map(|at| humantime::format_rfc3339_seconds(at).to_string()),
            feeds,
            slow_batch: self
                .engine
                .as_ref()
                .and_then(|engine| engine.writer.slow_batch(SLOW_BATCH_SHOWN))
                .map(|(_, slow)| slow),
            log_lines_dropped: crate::logging::lines_dropped(),
        }
    }

    /// Pauses or resumes one feed (or all): recorded in the database first, so that a crash
    /// right after cannot forget it, then applied. A pause replies once the feed's readers
    /// have parked.
    async fn set_paused(&self, feed: Option<&str>, paused: bool) -> Reply {
        let verb = if paused { "paused" } else { "resumed" };
        let Some(engine) = self.engine.as_ref() else {
            return Reply::error("internal error: no engine is running");
        };
        let names: Vec<String> = match feed {
            Some(name) if engine.feeds.contains_key(name) => vec![name.to_string()],
            Some(name) => {
                let known: Vec<&str> = engine.feeds.keys().map(String::as_str).collect();
                return Reply::error(format!(
                    "no feed named {name:?} (feeds: {})",
                    known.join(", ")
                ));
            }
            None => engine.feeds.keys().cloned().collect(),
        };
        if let Err(err) = engine.writer.set_paused(names.clone(), paused).await {
            tracing::error!("could not record feeds as {verb}: {err}");
            return Reply::error(format!("could not record the feeds as {verb}: {err}"));
        }
        let mut changed = Vec::new();
        for name in &names {
            if let Some(runtime) = engine.feeds.get(name) {
                if runtime.paused.send_replace(paused) != paused {
                    changed.push(name.as_str());
                }
            }
        }
        if !changed.is_empty() {
            tracing::info!(feeds = changed.join(", "), "{verb}");
        }
        let mut message = format!("{verb} {}", names.join(", "));
        if paused {
            let parked = futures_util::future::join_all(
                names
                    .iter()
                    .filter_map(|name| engine.feeds.get(name))
                    .map(|runtime| runtime.monitor.parked()),
            );
            if tokio::time::timeout(PAUSE_SETTLE_TIMEOUT, parked)
                .await
                .is_err()
            {
                message.push_str(
                    " (recorded; a batch in flight is still finishing, `status` shows when it has)",
                );
            }
        }
        Reply {
            ok: true,
            message: Some(message),
            feeds: Some(names),
            ..Reply::default()
        }
    }

    /// Reloads the configuration file. A configuration that does not validate is refused and
    /// the running one goes on; one that validates replaces it.
    async fn reload(&mut self) -> anyhow::Result<Reply> {
        let path = self.config.source.path.clone();
        tracing::info!(config = %path.display(), "reloading the configuration");
        let refuse = |reason: String| {
            tracing::error!("reload refused, the running configuration stays: {reason}");
            Ok(Reply::error(format!(
                "reload refused, the running configuration stays: {reason}"
            )))
        };
        let config = match Config::load(&path) {
            Ok(config) => config,
            Err(err) => return refuse(err.to_string()),
        };
        if let Some(setting) = self.config.fixed_setting_changed(&config) {
            return refuse(format!(
                "{setting} cannot change while projector runs; restart it to change that"
            ));
        }
        let projections = match crate::projection::build_all(&config) {
            Ok(projections) => projections,
            Err(err) => return refuse(format!("{err:#}")),
        };
        crate::notify::reloading();
        let mut history = History::new();
        if let Some(engine) = self.engine.take() {
            history = engine.history();
            engine.stop().await?;
        }
        let reply = match Engine::start(&config, projections, &history).await {
            Ok(engine) => {
                self.engine = Some(engine);
                self.config = config;
                self.reloaded_at = Some(SystemTime::now());
                tracing::info!(
                    feeds = names(self.config.feeds.iter().map(|f| f.name())),
                    projections = names(self.config.projections.iter().map(|p| p.name())),
                    "configuration reloaded"
                );
                Reply::done("configuration reloaded")
            }
            Err(err) => {
                let reason = format!("{err:#}");
                tracing::error!("the new configuration could not start ({reason}); starting the previous one again");
                let projections = crate::projection::build_all(&self.config)
                    .context("rebuilding the previous configuration's projections")?;
                self.engine = Some(
                    Engine::start(&self.config, projections, &history)
                        .await
                        .context("restarting the previous configuration")?,
                );
                Reply::error(format!(
                    "the new configuration could not start, the previous one runs again: {reason}"
                ))
            }
        };
        crate::notify::ready(&self.status().summary());
        Ok(reply)
    }
}

fn names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names.collect::<Vec<_>>().join(", ")
}

/// The writer and the feed readers of one configuration.
struct Engine {
    writer: WriterHandle,
    writer_thread: WriterThread,
    /// How long a stop waits for the batches in flight before interrupting them.
    stop_timeout: Duration,
    readers: TaskTracker,
    stop_readers: CancellationToken,
    /// By feed name, in name order.
    feeds: BTreeMap<String, FeedRuntime>,
}

/// The monitors of a stopped engine, by feed name with its URL, so that a reload keeps each
/// feed's counters.
type History = BTreeMap<String, (String, Arc<FeedMonitor>)>;

/// What the supervisor holds of a running feed.
struct FeedRuntime {
    url: String,
    paused: watch::Sender<bool>,
    monitor: Arc<FeedMonitor>,
}

impl Engine {
    /// Opens the database (setting up new projections), then starts a reader for each group of
    /// a feed's projections that stand at the same checkpoint. A projection that stands
    /// elsewhere (new, or halted last time) gets a reader of its own, so it rebuilds from its
    /// own offset while the others go on.
    async fn start(
        config: &Config,
        projections: Vec<ConfiguredProjection>,
        history: &History,
    ) -> anyhow::Result<Engine> {
        let database = config.daemon.database.clone();
        let settings = WriterSettings {
            max_bytes: config.daemon.max_database_bytes.map(|limit| limit.0 as u64),
            synchronous: config.daemon.synchronous,
            page_cache_bytes: Some(config.daemon.page_cache_bytes.0 as u64),
        };
        let writer =
            tokio::task::spawn_blocking(move || Writer::open(&database, settings, projections))
                .await
                .context("the database opener panicked")??;
        let starting_points = writer.starting_points();
        let paused_feeds = writer.paused_feeds();
        let (writer, writer_thread) = writer.spawn().context("starting the writer thread")?;

        let readers = TaskTracker::new();
        let stop_readers = CancellationToken::new();
        let mut feeds = BTreeMap::new();
        for feed in &config.feeds {
            let points: Vec<_> = starting_points
                .iter()
                .filter(|p| p.feed == feed.name())
                .collect();
            let monitor = Arc::new(FeedMonitor::new(
                feed.name(),
                points
                    .iter()
                    .map(|p| (p.projection.clone(), p.checkpoint.next_offset)),
            ));
            if let Some((url, previous)) = history.get(feed.name()) {
                monitor.carry_over(previous, *url == feed.url.0.to_string());
            }
            let is_paused = paused_feeds.contains(feed.name());
            let (paused, _) = watch::channel(is_paused);
            if is_paused {
                tracing::warn!(
                    feed = feed.name(),
                    "feed is paused (recorded in the database); `projector ctl resume {}` resumes it",
                    feed.name()
                );
            }
            // Group this feed's projections by where they stand; BTreeMap keeps log order stable.
            let mut groups: BTreeMap<u64, Vec<Member>> = BTreeMap::new();
            for point in &points {
                groups
                    .entry(point.checkpoint.next_offset)
                    .or_default()
                    .push(Member {
                        projection: point.projection.clone(),
                        event_types: point.event_types.iter().cloned().collect::<HashSet<_>>(),
                        next_offset: point.checkpoint.next_offset,
                    });
            }
            if groups.is_empty() {
                tracing::warn!(
                    feed = feed.name(),
                    "no projection reads this feed; it is not polled"
                );
            } else {
                let client = FeedClient::new(feed).with_context(|| {
                    format!("building the HTTP client of feed {:?}", feed.name())
                })?;
                if let Some(proxy) = client.proxy() {
                    tracing::info!(feed = feed.name(), proxy, "reading through a proxy");
                }
                let policy = ReadPolicy {
                    poll_interval: feed.poll_interval.0,
                    body_concurrency: feed.body_concurrency.0,
                    backoff: Backoff {
                        initial: feed.retry_initial.0,
                        max: feed.retry_max.0,
                    },
                };
                for (next_offset, members) in groups {
                    tracing::info!(
                        feed = feed.name(),
                        url = %feed.url.0,
                        next_offset,
                        projections = names(members.iter().map(|m| m.projection.as_str())),
                        "reading feed"
                    );
                    let reader = FeedReader::new(
                        feed.name().to_string(),
                        client.clone(),
                        policy.clone(),
                        writer.clone(),
                        members,
                        Steering {
                            paused: paused.subscribe(),
                            monitor: monitor.clone(),
                            shutdown: stop_readers.clone(),
                        },
                    );
                    readers.spawn(reader.run());
                }
            }
            feeds.insert(
                feed.name().to_string(),
                FeedRuntime {
                    url: feed.url.0.to_string(),
                    paused,
                    monitor,
                },
            );
        }
        readers.close();
        Ok(Engine {
            writer,
            writer_thread,
            stop_timeout: config.daemon.stop_timeout.0,
            readers,
            stop_readers,
            feeds,
        })
    }

    fn history(&self) -> History {
        self.feeds
            .iter()
            .map(|(name, feed)| (name.clone(), (feed.url.clone(), feed.monitor.clone())))
            .collect()
    }

    /// The writer thread runs and is not stuck on one job for `limit` or longer (the runtime
    /// is evidently alive, since this is asked from it).
    fn is_healthy(&self, limit: Duration) -> bool {
        !self.writer_thread.join.is_finished() && self.writer.busy_for() < limit
    }

    /// Stops the readers, lets the writer finish what it was sent, and waits for both. A batch
    /// that has not committed after `stop_timeout` (a projection's statement that does not end)
    /// is interrupted: it rolls back whole and is read again at the next start.
    async fn stop(self) -> anyhow::Result<()> {
        self.stop_readers.cancel();
        // The readers wait for the outcome of their batch in flight.
        if tokio::time::timeout(self.stop_timeout, self.readers.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "a batch in flight has not committed after {} (stop_timeout): interrupting it; \
                 it rolls back and is read again at the next start",
                humantime::format_duration(self.stop_timeout)
            );
            // An interrupt stops only the statement running at that moment: repeated until
            // the readers have their outcomes.
            loop {
                self.writer_thread.interrupt();
                if tokio::time::timeout(INTERRUPT_REPEAT, self.readers.wait())
                    .await
                    .is_ok()
                {
                    break;
                }
            }
        }
        // The readers held the other writer handles; dropping the last one ends the writer
        // thread once it has finished what it was sent.
        drop(self.writer);
        let writer_thread = self.writer_thread.join;
        tokio::task::spawn_blocking(move || writer_thread.join())
            .await
            .context("waiting for the writer thread")?
            .map_err(|_| anyhow::anyhow!("the database writer thread panicked"))
    }
}
