//! The supervisor: opens the database, starts the readers of every feed and owns shutdown.
//!
//! Projections of one feed that stand at the same checkpoint share one reader. A projection
//! that stands elsewhere (new, or halted last time) gets a reader of its own, so it rebuilds
//! from its own offset while the others go on.

use std::collections::{BTreeMap, HashSet};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::feed::flux::FluxClient;
use crate::feed::Backoff;
use crate::pipeline::{Member, Pipeline, ReadPolicy};
use crate::projection::ConfiguredProjection;
use crate::writer::Writer;

/// Runs until `shutdown` is cancelled, then lets every batch in flight commit or roll back whole
/// and returns. A failing feed never ends it; only a database that cannot be opened does.
pub async fn run(
    config: &Config,
    projections: Vec<ConfiguredProjection>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let database = config.daemon.database.clone();
    let writer = tokio::task::spawn_blocking(move || Writer::open(&database, projections))
        .await
        .context("the database opener panicked")??;
    let starting_points = writer.starting_points();
    let (writer, writer_thread) = writer.spawn().context("starting the writer thread")?;

    let readers = TaskTracker::new();
    for feed in &config.feeds {
        // Group this feed's projections by where they stand; BTreeMap keeps log order stable.
        let mut groups: BTreeMap<u64, Vec<Member>> = BTreeMap::new();
        for point in starting_points.iter().filter(|p| p.feed == feed.name()) {
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
            continue;
        }
        let client = FluxClient::new(feed)
            .with_context(|| format!("building the HTTP client of feed {:?}", feed.name()))?;
        let policy = ReadPolicy {
            poll_interval: feed.poll_interval.0,
            body_concurrency: feed.body_concurrency.0,
            backoff: Backoff {
                initial: feed.retry_initial.0,
                max: feed.retry_max.0,
            },
        };
        for (next_offset, members) in groups {
            let names: Vec<&str> = members.iter().map(|m| m.projection.as_str()).collect();
            tracing::info!(
                feed = feed.name(),
                url = %feed.url.0,
                next_offset,
                projections = names.join(", "),
                "reading feed"
            );
            let pipeline = Pipeline::new(
                feed.name().to_string(),
                client.clone(),
                policy.clone(),
                writer.clone(),
                members,
                shutdown.clone(),
            );
            readers.spawn(pipeline.run());
        }
    }
    readers.close();
    tracing::info!(
        database = %config.daemon.database.display(),
        "projector is running"
    );

    shutdown.cancelled().await;
    tracing::info!("stopping: letting the batches in flight finish");
    readers.wait().await;
    // The readers held the other handles; dropping the last one ends the writer thread once it
    // has finished what it was sent.
    drop(writer);
    tokio::task::spawn_blocking(move || writer_thread.join())
        .await
        .context("waiting for the writer thread")?
        .map_err(|_| anyhow::anyhow!("the database writer thread panicked"))?;
    tracing::info!("stopped");
    Ok(())
}
