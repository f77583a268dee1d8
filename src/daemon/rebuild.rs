//! Rebuilding a projection on an operator's word: through the running daemon (its engine stops,
//! the rebuild is recorded, and the engine starts again with the rebuild's shadow read beside
//! the live projections), or alone when no daemon runs, until the shadow has replaced the live
//! tables. The rebuild itself is the writer's (`writer/shadow.rs`).

use std::time::Duration;

use anyhow::Context;

use super::changes::{begin_rebuild, cancel_rebuild};
use super::engine::{CarriedMonitors, Engine};
use super::supervisor::Supervisor;
use crate::config::Config;
use crate::control::protocol::{FeedStatus, Reply};
use crate::projection::ConfiguredProjection;
use crate::store;

/// How often a rebuild run alone reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

impl Supervisor {
    /// Starts rebuilding `name` (or cancels its rebuild), with the readers stopped meanwhile.
    pub(super) async fn rebuild(&mut self, name: &str, cancel: bool) -> anyhow::Result<Reply> {
        let projection = match self.projection(name) {
            Ok(projection) => projection,
            Err(err) => return Ok(Reply::error(err)),
        };
        self.change(name, move |database, _| {
            if cancel {
                cancel_rebuild(database, &projection)
            } else {
                begin_rebuild(database, &projection)
            }
        })
        .await
    }
}

/// How a rebuild run alone ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RebuildEnd {
    /// The new tables replaced the old ones.
    Done,
    /// Ctrl-C: the rebuild goes on from where it is at the next start.
    Interrupted,
    /// The rebuild halted on a poison event (`on_error = "stop"`).
    Halted(String),
}

/// Rebuilds `name` with no daemon running: the database is locked as a daemon locks it, only
/// this projection's feed is read, and `report` is given the feed's status as the rebuild goes.
pub async fn rebuild_alone(
    config: Config,
    projections: Vec<ConfiguredProjection>,
    name: &str,
    mut report: impl FnMut(&FeedStatus),
) -> anyhow::Result<RebuildEnd> {
    let database = config
        .daemon
        .sqlite_file("`projector rebuild` with no daemon")?
        .to_path_buf();
    let _instance_lock = store::lock_instance(&database, config.daemon.database_mode.0)?;
    let Some(projection) = projections.into_iter().find(|p| p.name == name) else {
        anyhow::bail!(
            "no projection named {name:?} in {} (projections: {})",
            config.source.path.display(),
            super::names(config.projections.iter().map(|p| p.name()))
        );
    };
    let feed = projection.feed.clone();
    let begun = {
        let (database, projection) = (database.clone(), projection.clone());
        tokio::task::spawn_blocking(move || {
            let message = begin_rebuild(&database, &projection)?;
            let paused = store::paused_feeds(&store::open_reader(&database)?)?;
            anyhow::Ok((message, paused.contains(&projection.feed)))
        })
        .await
        .context("the rebuild's start panicked")??
    };
    if begun.1 {
        anyhow::bail!(
            "feed {feed:?} is paused: resume it (`projector ctl resume {feed}` on a running daemon) before rebuilding {name}, or rebuild through the running daemon"
        );
    }
    tracing::info!(projection = name, "{}", begun.0);
    let mut alone = config;
    alone.feeds.retain(|f| f.name() == feed);
    alone.projections.retain(|p| p.name() == name);
    let mut engine =
        Engine::start_on_sqlite(&alone, vec![projection], &CarriedMonitors::new()).await?;
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    let end = loop {
        tokio::select! {
            () = engine.rebuild_finished() => break RebuildEnd::Done,
            _ = tokio::signal::ctrl_c() => break RebuildEnd::Interrupted,
            _ = progress.tick() => {
                let Some(runtime) = engine.feeds.get(&feed) else { continue };
                let status = runtime.monitor.snapshot("", *runtime.paused.borrow());
                let halted = status
                    .projections
                    .iter()
                    .find(|p| p.name == name)
                    .and_then(|p| p.rebuild.as_ref())
                    .and_then(|rebuild| rebuild.halted.clone());
                if let Some(reason) = halted {
                    break RebuildEnd::Halted(reason);
                }
                report(&status);
            }
        }
    };
    engine.stop().await?;
    Ok(end)
}
