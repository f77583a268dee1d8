//! The supervisor: it answers every request, from the socket or from a signal, with one code
//! path each (status, pause, resume, reload, stop), and keeps systemd's status line and watchdog
//! current.

use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;

use super::engine::{CarriedMonitors, Engine};
use crate::config::Config;
use crate::control::handle::Inbox;
use crate::control::protocol::{
    eta_text, ClusterDaemon, ClusterStatus, DaemonStatus, FeedState, Reply, Request,
};
use crate::projection::ConfiguredProjection;
use crate::writer::OperatorChange;

/// How long a pause waits for the feed's batch in flight before replying anyway.
const PAUSE_SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the systemd STATUS line is refreshed.
const STATUS_REFRESH: Duration = Duration::from_secs(2);
/// `status` shows the writer's batch once it has been on it this long.
const SLOW_BATCH_SHOWN: Duration = Duration::from_secs(1);
/// The log says so once the writer has been on one batch this long.
const SLOW_BATCH_WARNED: Duration = Duration::from_secs(30);
/// How often the log says how a catching-up feed progresses.
const PROGRESS_LOGGED: Duration = Duration::from_secs(5);

/// A change to the database made while the engine is stopped; says what it did.
pub(super) type DatabaseChange =
    Box<dyn FnOnce(&std::path::Path) -> anyhow::Result<String> + Send + 'static>;

pub(super) struct Supervisor {
    pub(super) config: Config,
    /// The projections the engine runs, as built at the last start or reload.
    projections: Vec<ConfiguredProjection>,
    /// None only while a reload swaps engines.
    pub(super) engine: Option<Engine>,
    started_at: SystemTime,
    started: Instant,
    reloaded_at: Option<SystemTime>,
    /// When the writer's job that was last warned about as slow started.
    slow_batch_warned: Option<Instant>,
    /// When the log last said how the catching-up feeds progress.
    progress_logged: Instant,
    /// A stop was asked for: the batches in flight are finishing.
    stopping: bool,
    /// The feeds said to be stalled, so that the log says it once.
    stalled: std::collections::BTreeSet<String>,
}

impl Supervisor {
    pub(super) fn new(
        config: Config,
        projections: Vec<ConfiguredProjection>,
        engine: Engine,
    ) -> Supervisor {
        Supervisor {
            config,
            projections,
            engine: Some(engine),
            started_at: SystemTime::now(),
            started: Instant::now(),
            reloaded_at: None,
            slow_batch_warned: None,
            progress_logged: Instant::now(),
            stopping: false,
            stalled: std::collections::BTreeSet::new(),
        }
    }

    /// Answers requests until `stop`. An error means the daemon cannot go on (a reload that
    /// could start neither the new configuration nor the old one).
    pub(super) async fn serve(&mut self, inbox: &mut Inbox) -> anyhow::Result<()> {
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
                () = rebuild_finished(&mut self.engine) => {
                    let _ = self.restart(None).await?;
                }
                _ = refresh.tick() => {
                    self.warn_of_a_slow_batch();
                    self.log_progress();
                    self.log_stalls();
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

    /// Lets the batches in flight commit or roll back whole, answering `status` (which then says
    /// the daemon is stopping) and refusing other requests meanwhile.
    pub(super) async fn stop(&mut self, inbox: &mut Inbox) -> anyhow::Result<()> {
        self.stopping = true;
        if let Some(engine) = self.engine.as_ref() {
            let readers_stopped = engine.stop_readers();
            tokio::pin!(readers_stopped);
            loop {
                tokio::select! {
                    () = &mut readers_stopped => break,
                    Some(command) = inbox.next() => {
                        let answer = self.answer_while_stopping(&command.request);
                        command.answer(answer);
                    }
                }
            }
        }
        match self.engine.take() {
            Some(engine) => engine.finish().await,
            None => Ok(()),
        }
    }

    fn answer_while_stopping(&self, request: &Request) -> Reply {
        match request {
            Request::Status => Reply {
                ok: true,
                status: Some(self.status()),
                ..Reply::default()
            },
            Request::Stop => Reply::done("already stopping"),
            _ => Reply::error("projector is stopping: it takes no more requests but status"),
        }
    }

    /// Every PROGRESS_LOGGED, says in the log how each feed that is catching up progresses:
    /// where it is, how fast, and, once the head is found, how much is left and for how long.
    fn log_progress(&mut self) {
        if self.progress_logged.elapsed() < PROGRESS_LOGGED {
            return;
        }
        self.progress_logged = Instant::now();
        for feed in self.status().feeds {
            if feed.state != FeedState::CatchingUp {
                continue;
            }
            let (Some(head), Some(lag)) = (feed.head, feed.lag) else {
                continue;
            };
            let rate = feed.events_per_second;
            let at = head - lag;
            if feed.head_exact {
                let left = feed.eta_seconds.map_or(String::new(), |eta| {
                    format!(", about {} left", eta_text(eta))
                });
                tracing::info!(
                    feed = %feed.name,
                    "catching up: at offset {at} of {head}, {lag} to go, {rate:.0} events/s{left}"
                );
            } else {
                tracing::info!(
                    feed = %feed.name,
                    "catching up: at offset {at}, the head is past {head} (still being found), {rate:.0} events/s"
                );
            }
        }
    }

    /// Says in the log when a feed becomes stalled, once, and when it moves again.
    fn log_stalls(&mut self) {
        for feed in self.status().feeds {
            let stalled = feed.state == FeedState::Stalled;
            if stalled && self.stalled.insert(feed.name.clone()) {
                let last_error = feed.last_error.as_ref().map_or(String::new(), |e| {
                    format!("; the last error: {}", e.message)
                });
                tracing::warn!(
                    feed = %feed.name,
                    "stalled: the checkpoints have not moved for {}s while the head is {} events ahead{last_error}",
                    feed.stalled_seconds.unwrap_or_default(),
                    feed.lag.unwrap_or_default()
                );
            } else if !stalled && self.stalled.remove(&feed.name) {
                tracing::info!(feed = %feed.name, "no longer stalled");
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
        if self.config.daemon.postgres.is_some() {
            if let Some((projection, change)) = operator_change(&request) {
                return Ok(self.change_in_store(projection, change).await);
            }
        }
        let reply = match request {
            Request::Status => Reply {
                ok: true,
                status: Some(self.status()),
                ..Reply::default()
            },
            Request::Pause { feed } => self.set_paused(feed.as_deref(), true).await,
            Request::Resume { feed } => self.resume(feed.as_deref()).await?,
            Request::Reload => self.reload().await?,
            Request::Rebuild { projection, cancel } => self.rebuild(&projection, cancel).await?,
            Request::Skip { projection } => {
                self.change(&projection, move |database, name| {
                    super::changes::skip_halted_event(database, name)
                })
                .await?
            }
            Request::Reset { projection, offset } => {
                self.change(&projection, move |database, name| {
                    super::changes::reset_checkpoint(database, name, offset)
                })
                .await?
            }
            Request::Stop => {
                tracing::info!("stop requested");
                Reply::done("stopping")
            }
        };
        Ok(reply)
    }

    /// Makes an operator's change where the store's writer makes it (PostgreSQL): recorded in
    /// the store, the daemon applying the feed reads again from the checkpoints, without a
    /// restart here.
    async fn change_in_store(&self, name: &str, change: OperatorChange) -> Reply {
        if let Err(err) = self.projection(name) {
            return Reply::error(err);
        }
        let Some(engine) = self.engine.as_ref() else {
            return Reply::error("internal error: no engine is running");
        };
        match engine.writer.change(name.to_string(), change).await {
            Ok(message) => {
                tracing::info!(projection = name, "{message}");
                Reply::done(message)
            }
            Err(refused) => Reply::error(refused),
        }
    }

    pub(super) fn status(&self) -> DaemonStatus {
        let leases = self
            .engine
            .as_ref()
            .and_then(|engine| engine.leases.as_ref())
            .map(|leases| leases.borrow().clone());
        let feeds = self
            .engine
            .as_ref()
            .map(|engine| {
                engine
                    .feeds
                    .values()
                    .map(|feed| {
                        let url = crate::shown::url(&feed.url);
                        let mut status = feed.monitor.snapshot(&url, *feed.paused.borrow());
                        if let (Some(lease), Some(leases)) = (&feed.lease, &leases) {
                            status.lease_holder = leases.holder(&status.name).map(str::to_string);
                            let held = *lease.borrow() != super::lease_state::Lease::Standby;
                            status.under_lease(held);
                        }
                        status
                    })
                    .collect()
            })
            .unwrap_or_default();
        DaemonStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            config: self.config.source.path.display().to_string(),
            database: self.config.daemon.database_shown(),
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
            stopping: self.stopping,
            cluster: leases.map(|leases| ClusterStatus {
                this: leases.this,
                daemons: leases
                    .daemons
                    .into_iter()
                    .map(|(id, feeds)| ClusterDaemon { id, feeds })
                    .collect(),
                error: leases.error,
            }),
        }
    }

    /// Resumes one feed (or all), and retries what is halted on it: projections halted by a
    /// poison event, a feed halted as rewritten. Their cause may have been fixed (a repaired
    /// feed; a new definition is taken by a reload, which retries them too).
    async fn resume(&mut self, feed: Option<&str>) -> anyhow::Result<Reply> {
        let mut reply = self.set_paused(feed, false).await;
        if !reply.ok {
            return Ok(reply);
        }
        let halted: Vec<String> = self
            .status()
            .feeds
            .into_iter()
            .filter(|f| feed.is_none_or(|name| f.name == name))
            .flat_map(|f| {
                let feed_halted = (f.state == crate::control::protocol::FeedState::Halted)
                    .then(|| format!("feed {}", f.name));
                f.projections
                    .into_iter()
                    .filter(|p| {
                        p.halted.is_some() || p.rebuild.as_ref().is_some_and(|r| r.halted.is_some())
                    })
                    .map(|p| p.name)
                    .chain(feed_halted)
                    .collect::<Vec<_>>()
            })
            .collect();
        if halted.is_empty() {
            return Ok(reply);
        }
        let retrying = halted.join(", ");
        tracing::info!("resume: retrying what is halted ({retrying})");
        if let Err(err) = self.restart(None).await? {
            return Ok(Reply::error(err));
        }
        let message = reply.message.take().unwrap_or_default();
        reply.message = Some(format!("{message}; retrying what was halted: {retrying}"));
        Ok(reply)
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

    /// Stops the engine, makes `change` to the database (when there is one), and starts the
    /// engine again from the committed checkpoints with the running configuration: how a
    /// finished rebuild's projection, or a new one's shadow, gets its readers. A change that
    /// fails is said in the reply; the engine starts again either way, and only an engine that
    /// cannot start again is an error.
    pub(super) async fn restart(
        &mut self,
        change: Option<DatabaseChange>,
    ) -> anyhow::Result<Result<String, String>> {
        let mut carried = CarriedMonitors::new();
        if let Some(engine) = self.engine.take() {
            carried = engine.carried_monitors();
            engine.stop().await?;
        }
        let changed = match change {
            Some(change) => {
                let database = self.config.daemon.database.clone();
                tokio::task::spawn_blocking(move || change(&database))
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the change panicked")))
                    .map_err(|err| format!("{err:#}"))
            }
            None => Ok(String::new()),
        };
        self.engine = Some(
            super::start::start_engine(&self.config, self.projections.clone(), &carried)
                .await
                .context("starting the readers again")?,
        );
        Ok(changed)
    }

    /// Makes `change` to projection `name`'s record with the readers stopped, and says what
    /// it did.
    pub(super) async fn change(
        &mut self,
        name: &str,
        change: impl FnOnce(&std::path::Path, &str) -> anyhow::Result<String> + Send + 'static,
    ) -> anyhow::Result<Reply> {
        if let Err(err) = self.projection(name) {
            return Ok(Reply::error(err));
        }
        let owned = name.to_string();
        let change: DatabaseChange = Box::new(move |database| change(database, &owned));
        Ok(match self.restart(Some(change)).await? {
            Ok(message) => {
                tracing::info!(projection = name, "{message}");
                Reply::done(message)
            }
            Err(err) => Reply::error(err),
        })
    }

    /// The running configuration's projection `name`, or why there is none.
    pub(super) fn projection(&self, name: &str) -> Result<ConfiguredProjection, String> {
        match self.projections.iter().find(|p| p.name == name) {
            Some(projection) => Ok(projection.clone()),
            None => Err(format!(
                "no projection named {name:?} in the running configuration (projections: {})",
                super::names(self.projections.iter().map(|p| p.name.as_str()))
            )),
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
        let mut carried = CarriedMonitors::new();
        if let Some(engine) = self.engine.take() {
            carried = engine.carried_monitors();
            engine.stop().await?;
        }
        let reply = match super::start::start_engine(&config, projections.clone(), &carried).await {
            Ok(engine) => {
                self.engine = Some(engine);
                self.config = config;
                self.projections = projections;
                self.reloaded_at = Some(SystemTime::now());
                tracing::info!(
                    feeds = super::names(self.config.feeds.iter().map(|f| f.name())),
                    projections = super::names(self.config.projections.iter().map(|p| p.name())),
                    "configuration reloaded"
                );
                Reply::done("configuration reloaded")
            }
            Err(err) => {
                let reason = format!("{err:#}");
                tracing::error!("the new configuration could not start ({reason}); starting the previous one again");
                self.engine = Some(
                    super::start::start_engine(&self.config, self.projections.clone(), &carried)
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

/// The operator's change `request` asks for of a projection, if it asks for one.
fn operator_change(request: &Request) -> Option<(&str, OperatorChange)> {
    Some(match request {
        Request::Rebuild { projection, cancel } => (
            projection.as_str(),
            if *cancel {
                OperatorChange::CancelRebuild
            } else {
                OperatorChange::Rebuild
            },
        ),
        Request::Skip { projection } => (projection.as_str(), OperatorChange::Skip),
        Request::Reset { projection, offset } => {
            (projection.as_str(), OperatorChange::Reset(*offset))
        }
        _ => return None,
    })
}

/// Returns once the engine's rebuild has finished; never without an engine.
async fn rebuild_finished(engine: &mut Option<Engine>) {
    match engine {
        Some(engine) => engine.rebuild_finished().await,
        None => std::future::pending().await,
    }
}
