//! Several daemons on one PostgreSQL schema. Each feed is applied by the one daemon holding its
//! lease (an advisory lock on that daemon's writer connection); the others stand by. A round,
//! every quarter of `lease_timeout`, keeps this daemon's session alive, takes the leases it may
//! (up to its share of the feeds), hands back what it holds beyond its share when another
//! daemon holds less, and picks up what was done through any daemon: pauses, rebuilds begun or
//! ended, checkpoints an operator changed.
//!
//! Each feed has a controller: when its lease is taken it starts the feed's readers from the
//! checkpoints as committed (by whichever daemon), and when the lease is lost or handed back it
//! stops them, their batches in flight committed or rolled back whole. A rebuild that begins or
//! ends, or a checkpoint an operator changed (here or through another daemon), starts them
//! again, a rebuild's shadow's reader with them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::engine::{
    points_of, CarriedMonitors, Engine, EngineParts, FeedPlan, FeedRuntime, Readers,
};
use super::lease_state::{Lease, LeaseView};
use crate::config::{Config, PostgresStore};
use crate::projection::ConfiguredProjection;
use crate::writer::{LeaseRequest, PostgresWriter, StartingPoint, WriterHandle};

/// This daemon's id among those sharing the schema: its host and process.
pub fn daemon_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", std::process::id())
}

/// Opens the PostgreSQL writer and starts a controller per feed and the lease rounds.
pub(super) async fn start(
    config: &Config,
    store: &PostgresStore,
    projections: Vec<ConfiguredProjection>,
    carried: &CarriedMonitors,
) -> anyhow::Result<Engine> {
    let id = daemon_id();
    let opened = {
        let (store, id) = (store.clone(), id.clone());
        tokio::task::spawn_blocking(move || PostgresWriter::open(&store, &id, projections))
            .await
            .context("the database opener panicked")??
    };
    let starting_points = opened.starting_points();
    let paused_feeds = opened.paused_feeds();
    let restarts = opened.restarts();
    let (writer, writer_thread) = opened.spawn().context("starting the writer thread")?;
    let tasks = TaskTracker::new();
    let stop = CancellationToken::new();
    let mut feeds = BTreeMap::new();
    let mut leased = Vec::new();
    for feed in &config.feeds {
        let points = points_of(&starting_points, feed.name());
        let mut runtime = FeedRuntime::new(
            feed,
            &points,
            paused_feeds.contains(feed.name()),
            carried.get(feed.name()),
        );
        let plan = FeedPlan::new(feed, &config.source, &points)?;
        if plan.is_read() {
            let (lease, watching) = watch::channel(Lease::Standby);
            runtime.lease = Some(watching.clone());
            tasks.spawn(control_feed(
                plan,
                runtime.clone(),
                (watching, restarts.clone()),
                writer.clone(),
                stop.clone(),
            ));
            leased.push(FeedLease {
                feed: feed.name().to_string(),
                lease,
                paused: runtime.paused.clone(),
            });
        }
        feeds.insert(feed.name().to_string(), runtime);
    }
    let (view, leases) = watch::channel(LeaseView {
        this: id.clone(),
        ..LeaseView::default()
    });
    tracing::info!(daemon = %id, feeds = leased.len(), "standing by for the feeds' leases");
    tasks.spawn(lease_rounds(
        writer.clone(),
        leased,
        paused_feeds,
        (store.lease_timeout / 4).max(Duration::from_millis(250)),
        stop.clone(),
        view,
    ));
    tasks.close();
    Ok(Engine::assemble(EngineParts {
        writer,
        writer_thread,
        stop_timeout: config.daemon.stop_timeout.0,
        readers: tasks,
        stop_readers: stop,
        feeds,
        leases,
    }))
}

/// A feed whose lease the rounds look after.
struct FeedLease {
    feed: String,
    lease: watch::Sender<Lease>,
    paused: watch::Sender<bool>,
}

/// A round every `every` until `stop`: see the module's comment.
async fn lease_rounds(
    writer: WriterHandle,
    feeds: Vec<FeedLease>,
    mut paused_seen: BTreeSet<String>,
    every: Duration,
    stop: CancellationToken,
    view: watch::Sender<LeaseView>,
) {
    let request = LeaseRequest {
        feeds: feeds.iter().map(|f| f.feed.clone()).collect(),
    };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let report = match writer.leases(request.clone()).await {
            Ok(report) => report,
            Err(err) => {
                // No round, no lease: a connection that failed took the leases with it.
                tracing::warn!("the lease round failed, standing by on every feed: {err}");
                for feed in &feeds {
                    feed.lease.send_if_modified(|lease| {
                        std::mem::replace(lease, Lease::Standby) != Lease::Standby
                    });
                }
                view.send_modify(|view| {
                    view.daemons.clear();
                    view.error = Some(err.to_string());
                });
                continue;
            }
        };
        for feed in &feeds {
            let now = if !report.held.contains(&feed.feed) {
                Lease::Standby
            } else if report.surplus.contains(&feed.feed)
                || *feed.lease.borrow() == Lease::HandingBack
            {
                Lease::HandingBack
            } else {
                Lease::Held
            };
            feed.lease
                .send_if_modified(|lease| std::mem::replace(lease, now) != now);
            // Only a change in the database is taken: a pause made here is already applied,
            // and a round that read the table before it must not undo it.
            let paused = report.paused.contains(&feed.feed);
            if paused != paused_seen.contains(&feed.feed) {
                feed.paused.send_replace(paused);
                tracing::info!(
                    feed = %feed.feed,
                    "{} (recorded in the database by a daemon)",
                    if paused { "paused" } else { "resumed" }
                );
            }
        }
        paused_seen = report.paused;
        view.send_modify(|view| {
            view.daemons = report.daemons;
            view.error = None;
        });
    }
}

/// Runs `plan`'s readers while this daemon holds the feed's lease, starting them again when a
/// rebuild begins or ends or a checkpoint is changed: see the module's comment.
async fn control_feed(
    plan: FeedPlan,
    runtime: FeedRuntime,
    (mut lease, mut restarts): (watch::Receiver<Lease>, watch::Receiver<u64>),
    writer: WriterHandle,
    stop: CancellationToken,
) {
    let feed = plan.name.clone();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            held = lease.wait_for(|lease| *lease == Lease::Held) => if held.is_err() { return },
        }
        // A rebuild that begins or ends from here on starts the readers again.
        restarts.mark_unchanged();
        let points = match writer.starting_points_of(feed.clone()).await {
            Ok(points) => points,
            Err(err) => {
                tracing::warn!(feed = %feed, "could not read where the feed's projections stand (tried again at the next lease round): {err}");
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = lease.changed() => continue,
                }
            }
        };
        let points: Vec<&StartingPoint> = points.iter().collect();
        runtime.monitor.start_over(&points);
        let readers = Readers {
            writer: writer.clone(),
            tasks: TaskTracker::new(),
            stop: stop.child_token(),
        };
        readers.start(&plan, &points, &runtime);
        readers.tasks.close();
        let restarted = tokio::select! {
            () = stop.cancelled() => false,
            _ = lease.wait_for(|lease| *lease != Lease::Held) => false,
            changed = restarts.changed() => changed.is_ok(),
        };
        readers.stop.cancel();
        readers.tasks.wait().await;
        if stop.is_cancelled() {
            return;
        }
        if restarted {
            tracing::info!(feed = %feed, "a rebuild began or ended, or a checkpoint was changed: reading again from the checkpoints");
        } else if *lease.borrow() == Lease::HandingBack {
            if let Err(err) = writer.release(feed.clone()).await {
                tracing::warn!(feed = %feed, "could not hand the feed's lease back: {err}");
            }
        } else {
            tracing::warn!(feed = %feed, "lost the feed's lease: standing by");
        }
    }
}
