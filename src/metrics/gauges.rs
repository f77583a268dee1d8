//! The gauges: where each feed and projection stands, set from the daemon's status at each
//! scrape (so they say what `ctl status` says, from the same code path).

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use super::{FeedLabels, ProjectionLabels};
use crate::control::protocol::{DaemonStatus, FeedState};
use prometheus_client::encoding::EncodeLabelSet;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub feed: String,
    pub state: String,
}

#[derive(Default)]
pub struct Gauges {
    checkpoint_offset: Family<ProjectionLabels, Gauge>,
    head_offset: Family<FeedLabels, Gauge>,
    lag_events: Family<ProjectionLabels, Gauge>,
    lag_seconds: Family<ProjectionLabels, Gauge<f64, AtomicU64>>,
    feed_state: Family<StateLabels, Gauge>,
    projection_halted: Family<ProjectionLabels, Gauge>,
    paused: Family<FeedLabels, Gauge>,
    rebuild_offset: Family<ProjectionLabels, Gauge>,
}

impl Gauges {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "checkpoint_offset",
            "The offset of the next event a projection applies",
            self.checkpoint_offset.clone(),
        );
        registry.register(
            "head_offset",
            "The feed's head: found, or the end of the last page read",
            self.head_offset.clone(),
        );
        registry.register(
            "lag_events",
            "Events between a projection's checkpoint and the feed's head",
            self.lag_events.clone(),
        );
        registry.register_with_unit(
            "lag",
            "How old the last event a projection applied is, 0 at the head (where the feed gives event times)",
            Unit::Seconds,
            self.lag_seconds.clone(),
        );
        registry.register(
            "feed_state",
            "1 for the feed's current state, 0 for the others",
            self.feed_state.clone(),
        );
        registry.register(
            "projection_halted",
            "1 while a projection is halted on a poison event",
            self.projection_halted.clone(),
        );
        registry.register("paused", "1 while a feed is paused", self.paused.clone());
        registry.register(
            "rebuild_offset",
            "The offset of the next event a projection's rebuild applies, while it rebuilds",
            self.rebuild_offset.clone(),
        );
    }

    /// Sets every gauge from `status`; series of feeds and projections gone are dropped.
    pub fn set_from(&self, status: &DaemonStatus) {
        self.checkpoint_offset.clear();
        self.head_offset.clear();
        self.lag_events.clear();
        self.lag_seconds.clear();
        self.feed_state.clear();
        self.projection_halted.clear();
        self.paused.clear();
        self.rebuild_offset.clear();
        for feed in &status.feeds {
            let feed_labels = FeedLabels {
                feed: feed.name.clone(),
            };
            if let Some(head) = feed.head {
                self.head_offset
                    .get_or_create(&feed_labels)
                    .set(to_i64(head));
            }
            self.paused
                .get_or_create(&feed_labels)
                .set(i64::from(feed.paused));
            for state in FeedState::ALL {
                self.feed_state
                    .get_or_create(&StateLabels {
                        feed: feed.name.clone(),
                        state: state.label(),
                    })
                    .set(i64::from(state == feed.state));
            }
            for projection in &feed.projections {
                let labels = ProjectionLabels {
                    feed: feed.name.clone(),
                    projection: projection.name.clone(),
                };
                self.checkpoint_offset
                    .get_or_create(&labels)
                    .set(to_i64(projection.checkpoint));
                if let Some(lag) = projection.lag {
                    self.lag_events.get_or_create(&labels).set(to_i64(lag));
                }
                if let Some(seconds) = projection.lag_seconds {
                    self.lag_seconds.get_or_create(&labels).set(seconds);
                }
                self.projection_halted
                    .get_or_create(&labels)
                    .set(i64::from(projection.halted.is_some()));
                if let Some(rebuild) = &projection.rebuild {
                    self.rebuild_offset
                        .get_or_create(&labels)
                        .set(to_i64(rebuild.checkpoint));
                }
            }
        }
    }
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
