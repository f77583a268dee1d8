//! The writer and the feed readers of one configuration: started together from the committed
//! checkpoints, stopped together once the batches in flight have committed or rolled back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
}

/// The monitors of a stopped engine, by feed name with its URL, so that a reload keeps each
/// feed's counters.
pub(super) type CarriedMonitors = BTreeMap<String, (url::Url, Arc<FeedMonitor>)>;

/// What the supervisor holds of a running feed.
pub(super) struct FeedRuntime {
    pub(super) url: url::Url,
    pub(super) paused: watch::Sender<bool>,
    pub(super) monitor: Arc<FeedMonitor>,
}

impl Engine {
    /// Opens the database (setting up new projections), then starts a reader for each group of
    /// a feed's projections that stand at the same checkpoint. A projection that stands
    /// elsewhere (new, or halted last time) gets a reader of its own, so it rebuilds from its
    /// own offset while the others go on.
    pub(super) async fn start(
        config: &Config,
        projections: Vec<ConfiguredProjection>,
        carried: &CarriedMonitors,
    ) -> anyhow::Result<Engine> {
        let opened = open_writer(config, projections).await?;
        let starting_points = opened.starting_points();
        let paused_feeds = opened.paused_feeds();
        let rebuilds_finished = opened.rebuilds_finished();
        let (writer, writer_thread) = opened.spawn().context("starting the writer thread")?;
        let mut readers = Readers {
            writer: writer.clone(),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        };
        let mut feeds = BTreeMap::new();
        for feed in &config.feeds {
            let points: Vec<&StartingPoint> = starting_points
                .iter()
                .filter(|p| p.feed == feed.name())
                .collect();
            let paused = paused_feeds.contains(feed.name());
            let runtime = readers.start_feed(
                feed,
                &config.source,
                &points,
                paused,
                carried.get(feed.name()),
            )?;
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
        })
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

/// What starting a feed's readers needs of the engine.
struct Readers {
    writer: WriterHandle,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Readers {
    /// Starts the readers of `feed`, whose projections stand at `points`: its monitor (with
    /// the counters of the one it replaces, if any), its pause switch, and a reader per group.
    fn start_feed(
        &mut self,
        feed: &FeedConfig,
        source: &ConfigSource,
        points: &[&StartingPoint],
        is_paused: bool,
        carried: Option<&(url::Url, Arc<FeedMonitor>)>,
    ) -> anyhow::Result<FeedRuntime> {
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
        let groups = groups_by_checkpoint(points);
        if groups.is_empty() {
            tracing::warn!(
                feed = feed.name(),
                "no projection reads this feed; it is not polled"
            );
        } else {
            let client = FeedClient::new(feed, source)?;
            if let Some(proxy) = client.proxy() {
                tracing::info!(feed = feed.name(), proxy, "reading through a proxy");
            }
            let budget = Budget::new(feed.max_buffered_bytes.0);
            // Probing for the head asks for pages by offset.
            if feed.find_head && !feed.paging().follows_pages() {
                self.tasks.spawn(follow_head(
                    client.clone(),
                    budget.clone(),
                    monitor.clone(),
                    paused.subscribe(),
                    self.stop.clone(),
                ));
            }
            let policy = read_policy(feed);
            let moved = match (&feed.live, &feed.live_url) {
                (crate::config::Live::Sse, Some(live_url)) => {
                    let (moved, watching) = watch::channel(0);
                    self.tasks.spawn(crate::feed::live::follow(
                        client.clone(),
                        live_url.get_ref().0.clone(),
                        moved,
                        policy.backoff,
                        self.stop.clone(),
                    ));
                    Some(watching)
                }
                _ => None,
            };
            for ((next_offset, _), members) in groups {
                tracing::info!(
                    feed = feed.name(),
                    url = %crate::shown::url(&feed.url.0),
                    next_offset,
                    projections = super::names(members.iter().map(|m| m.projection.as_str())),
                    "reading feed"
                );
                let reader = FeedReader::new(
                    feed.name().to_string(),
                    client.clone(),
                    policy.clone(),
                    self.writer.clone(),
                    members,
                    Steering {
                        paused: paused.subscribe(),
                        monitor: monitor.clone(),
                        shutdown: self.stop.clone(),
                        budget: budget.clone(),
                        moved: moved.clone(),
                    },
                );
                self.tasks.spawn(reader.run());
            }
        }
        Ok(FeedRuntime {
            url: feed.url.0.clone(),
            paused,
            monitor,
        })
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
