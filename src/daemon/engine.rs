//! The writer and the feed readers of one configuration: started together from the committed
//! checkpoints, stopped together once the batches in flight have committed or rolled back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::lease_state::{Lease, LeaseView};
use crate::config::{Config, ConfigError, ConfigSource, FeedConfig};
use crate::feed::FeedClient;
use crate::monitor::FeedMonitor;
use crate::projection::ConfiguredProjection;
use crate::reader::budget::Budget;
use crate::reader::retry::Backoff;
use crate::reader::{follow_head, FeedReader, Member, ReadPolicy, Steering};
use crate::writer::{StartingPoint, Writer, WriterHandle, WriterSettings, WriterThread};

/// How often a stop past its timeout interrupts the writer again.
const INTERRUPT_REPEAT: Duration = Duration::from_millis(100);

/// The writer and the feed readers of one configuration.
pub(super) struct Engine {
    pub(super) writer: WriterHandle,
    writer_thread: WriterThread,
    /// How long a stop waits for the batches in flight before interrupting them.
    stop_timeout: Duration,
    readers: TaskTracker,
    stop_readers: CancellationToken,
    /// By feed name, in name order.
    pub(super) feeds: BTreeMap<String, FeedRuntime>,
    /// Changes when a rebuild has finished: the engine must then start again.
    rebuilds_finished: watch::Receiver<u64>,
    /// On PostgreSQL: this daemon's id and the leases as the last round found them.
    pub(super) leases: Option<watch::Receiver<LeaseView>>,
}

/// The monitors of a stopped engine, by feed name with its URL, so that a reload keeps each
/// feed's counters.
pub(super) type CarriedMonitors = BTreeMap<String, (url::Url, Arc<FeedMonitor>)>;

/// What the supervisor holds of a running feed.
#[derive(Clone)]
pub(super) struct FeedRuntime {
    pub(super) url: url::Url,
    pub(super) paused: watch::Sender<bool>,
    pub(super) monitor: Arc<FeedMonitor>,
    /// On PostgreSQL: whether this daemon holds the feed's lease.
    pub(super) lease: Option<watch::Receiver<Lease>>,
}

impl Engine {
    /// Opens the database (setting up new projections), then starts a reader for each group of
    /// a feed's projections that stand at the same checkpoint. A projection that stands
    /// elsewhere (new, or halted last time) gets a reader of its own, so it rebuilds from its
    /// own offset while the others go on.
    pub(super) async fn start_on_sqlite(
        config: &Config,
        projections: Vec<ConfiguredProjection>,
        carried: &CarriedMonitors,
    ) -> anyhow::Result<Engine> {
        let opened = open_writer(config, projections).await?;
        let starting_points = opened.starting_points();
        let paused_feeds = opened.paused_feeds();
        let rebuilds_finished = opened.rebuilds_finished();
        let (writer, writer_thread) = opened.spawn().context("starting the writer thread")?;
        let readers = Readers {
            writer: writer.clone(),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        };
        let mut feeds = BTreeMap::new();
        for feed in &config.feeds {
            let points = points_of(&starting_points, feed.name());
            let runtime = FeedRuntime::new(
                feed,
                &points,
                paused_feeds.contains(feed.name()),
                carried.get(feed.name()),
            );
            let plan = FeedPlan::new(feed, &config.source, &points)?;
            readers.start(&plan, &points, &runtime);
            feeds.insert(feed.name().to_string(), runtime);
        }
        readers.tasks.close();
        Ok(Engine {
            writer,
            writer_thread,
            stop_timeout: config.daemon.stop_timeout.0,
            readers: readers.tasks,
            stop_readers: readers.stop,
            feeds,
            rebuilds_finished,
            leases: None,
        })
    }

    /// An engine of `parts` whose writer is on its thread and whose readers run in `readers`.
    pub(super) fn assemble(parts: EngineParts) -> Engine {
        Engine {
            writer: parts.writer,
            writer_thread: parts.writer_thread,
            stop_timeout: parts.stop_timeout,
            readers: parts.readers,
            stop_readers: parts.stop_readers,
            feeds: parts.feeds,
            // No rebuild finishes on this store.
            rebuilds_finished: watch::channel(0).1,
            leases: Some(parts.leases),
        }
    }

    /// Returns once a rebuild has replaced a projection's tables (the new tables' projection,
    /// or a frozen one, needs its readers started again).
    pub(super) async fn rebuild_finished(&mut self) {
        if self.rebuilds_finished.changed().await.is_err() {
            // The writer has stopped: no rebuild finishes any more.
            std::future::pending::<()>().await;
        }
    }

    /// The feeds' monitors, to carry over to the next engine.
    pub(super) fn carried_monitors(&self) -> CarriedMonitors {
        self.feeds
            .iter()
            .map(|(name, feed)| (name.clone(), (feed.url.clone(), feed.monitor.clone())))
            .collect()
    }

    /// The writer thread runs and is not stuck on one job for `limit` or longer (the runtime
    /// is evidently alive, since this is asked from it).
    pub(super) fn is_healthy(&self, limit: Duration) -> bool {
        !self.writer_thread.join.is_finished() && self.writer.busy_for() < limit
    }

    /// Stops the readers, lets the writer finish what it was sent, and waits for both. A batch
    /// that has not committed after `stop_timeout` (a projection's statement that does not end)
    /// is interrupted: it rolls back whole and is read again at the next start.
    pub(super) async fn stop(self) -> anyhow::Result<()> {
        self.stop_readers().await;
        self.finish().await
    }

    /// Stops the readers and waits until each has the outcome of its batch in flight. A batch
    /// that has not committed after `stop_timeout` is interrupted.
    pub(super) async fn stop_readers(&self) {
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
    }

    /// Once the readers have stopped: lets the writer finish what it was sent, and waits for it.
    pub(super) async fn finish(self) -> anyhow::Result<()> {
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

/// Opens the database off the runtime's thread: opening runs every projection's setup.
async fn open_writer(
    config: &Config,
    projections: Vec<ConfiguredProjection>,
) -> anyhow::Result<Writer> {
    let database = config.daemon.database.clone();
    let max_bytes = config
        .daemon
        .max_database_bytes
        .as_ref()
        .map(|limit| limit.get_ref().0 as u64);
    if let (Some(limit), Some(spanned)) = (max_bytes, &config.daemon.max_database_bytes) {
        // A database already over its cap could never write again: said now, not per batch.
        let size = std::fs::metadata(&database).map_or(0, |meta| meta.len());
        if size > limit {
            return Err(ConfigError::new(
                config.source.locate(spanned),
                format!(
                    "the database {} is {size} bytes, over max_database_bytes ({limit}): no write would fit; raise max_database_bytes",
                    database.display()
                ),
            )
            .into());
        }
    }
    let settings = WriterSettings {
        max_bytes,
        synchronous: config.daemon.synchronous,
        page_cache_bytes: Some(config.daemon.page_cache_bytes.0 as u64),
        file_mode: Some(config.daemon.database_mode.0),
    };
    tokio::task::spawn_blocking(move || Writer::open(&database, settings, projections))
        .await
        .context("the database opener panicked")?
}

/// What an engine is assembled from on a store with leases.
pub(super) struct EngineParts {
    pub(super) writer: WriterHandle,
    pub(super) writer_thread: WriterThread,
    pub(super) stop_timeout: Duration,
    pub(super) readers: TaskTracker,
    pub(super) stop_readers: CancellationToken,
    pub(super) feeds: BTreeMap<String, FeedRuntime>,
    pub(super) leases: watch::Receiver<LeaseView>,
}

/// The starting points of `feed`'s projections.
pub(super) fn points_of<'p>(points: &'p [StartingPoint], feed: &str) -> Vec<&'p StartingPoint> {
    points.iter().filter(|p| p.feed == feed).collect()
}

impl FeedRuntime {
    /// `feed`'s monitor (with the counters of the one it replaces, if any) and pause switch.
    pub(super) fn new(
        feed: &FeedConfig,
        points: &[&StartingPoint],
        is_paused: bool,
        carried: Option<&(url::Url, Arc<FeedMonitor>)>,
    ) -> FeedRuntime {
        let monitor = Arc::new(FeedMonitor::new(feed.name(), points));
        monitor.set_stall_after(feed.stall_after.0);
        if let Some((url, previous)) = carried {
            monitor.carry_over(previous, *url == feed.url.0);
        }
        let (paused, _) = watch::channel(is_paused);
        if is_paused {
            tracing::warn!(
                feed = feed.name(),
                "feed is paused (recorded in the database); `projector ctl resume {}` resumes it",
                feed.name()
            );
        }
        FeedRuntime {
            url: feed.url.0.clone(),
            paused,
            monitor,
            lease: None,
        }
    }
}

/// What reading a feed needs, made once per engine: its client (none if no projection reads
/// it), its buffer budget and how it is read.
#[derive(Clone)]
pub(super) struct FeedPlan {
    pub(super) name: String,
    client: Option<FeedClient>,
    budget: Arc<Budget>,
    policy: ReadPolicy,
    follows_head: bool,
    live_url: Option<url::Url>,
}

impl FeedPlan {
    pub(super) fn new(
        feed: &FeedConfig,
        source: &ConfigSource,
        points: &[&StartingPoint],
    ) -> anyhow::Result<FeedPlan> {
        let client = if points.is_empty() {
            tracing::warn!(
                feed = feed.name(),
                "no projection reads this feed; it is not polled"
            );
            None
        } else {
            let client = FeedClient::new(feed, source)?;
            if let Some(proxy) = client.proxy() {
                tracing::info!(feed = feed.name(), proxy, "reading through a proxy");
            }
            Some(client)
        };
        Ok(FeedPlan {
            name: feed.name().to_string(),
            client,
            budget: Budget::new(feed.max_buffered_bytes.0),
            policy: read_policy(feed),
            // Probing for the head asks for pages by offset.
            follows_head: feed.find_head && !feed.paging().follows_pages(),
            live_url: match (&feed.live, &feed.live_url) {
                (crate::config::Live::Sse, Some(live_url)) => Some(live_url.get_ref().0.clone()),
                _ => None,
            },
        })
    }

    /// Whether some projection reads the feed.
    pub(super) fn is_read(&self) -> bool {
        self.client.is_some()
    }
}

/// What starting a feed's readers needs of the engine.
pub(super) struct Readers {
    pub(super) writer: WriterHandle,
    pub(super) tasks: TaskTracker,
    pub(super) stop: CancellationToken,
}

impl Readers {
    /// Starts the readers of the feed of `plan`, whose projections stand at `points`: its head
    /// probe, its live stream, and a reader per group.
    pub(super) fn start(&self, plan: &FeedPlan, points: &[&StartingPoint], runtime: &FeedRuntime) {
        let Some(client) = &plan.client else {
            return;
        };
        let monitor = &runtime.monitor;
        let paused = &runtime.paused;
        if plan.follows_head {
            self.tasks.spawn(follow_head(
                client.clone(),
                plan.budget.clone(),
                monitor.clone(),
                paused.subscribe(),
                self.stop.clone(),
            ));
        }
        let moved = plan.live_url.as_ref().map(|live_url| {
            let (moved, watching) = watch::channel(0);
            self.tasks.spawn(crate::feed::live::follow(
                client.clone(),
                live_url.clone(),
                moved,
                plan.policy.backoff,
                self.stop.clone(),
            ));
            watching
        });
        for ((next_offset, _), members) in groups_by_checkpoint(points) {
            tracing::info!(
                feed = %plan.name,
                url = %crate::shown::url(&runtime.url),
                next_offset,
                projections = super::names(members.iter().map(|m| m.projection.as_str())),
                "reading feed"
            );
            let reader = FeedReader::new(
                plan.name.clone(),
                client.clone(),
                plan.policy.clone(),
                self.writer.clone(),
                members,
                Steering {
                    paused: paused.subscribe(),
                    monitor: monitor.clone(),
                    shutdown: self.stop.clone(),
                    budget: plan.budget.clone(),
                    moved: moved.clone(),
                },
            );
            self.tasks.spawn(reader.run());
        }
    }
}

/// A feed's projections grouped by where they stand, in offset order (a stable log order). A
/// rebuild's shadow is read alone, since it is written in a database of its own; a projection
/// whose definition changed is not read until its rebuild is done.
fn groups_by_checkpoint(points: &[&StartingPoint]) -> BTreeMap<(u64, String), Vec<Member>> {
    let mut groups: BTreeMap<(u64, String), Vec<Member>> = BTreeMap::new();
    for point in points.iter().filter(|point| !point.frozen) {
        let shadow = match crate::writer::rebuilt_projection(&point.projection) {
            Some(_) => point.projection.clone(),
            None => String::new(),
        };
        groups
            .entry((point.checkpoint.next_offset, shadow))
            .or_default()
            .push(Member {
                projection: point.projection.clone(),
                event_types: point.event_types.clone(),
                next_offset: point.checkpoint.next_offset,
                page: point.checkpoint.page.clone(),
            });
    }
    groups
}

fn read_policy(feed: &FeedConfig) -> ReadPolicy {
    ReadPolicy {
        poll_interval: feed.poll_interval.0,
        body_concurrency: feed.body_concurrency.0,
        page_lookahead: feed.page_lookahead.0,
        long_poll: (feed.live == crate::config::Live::LongPoll).then_some(feed.long_poll_wait.0),
        backoff: Backoff {
            initial: feed.retry_initial.0,
            max: feed.retry_max.0,
        },
    }
}
