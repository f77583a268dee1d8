//! Prometheus metrics, through prometheus-client: counters the readers and the writer add to as
//! they work (they live as long as the process, so a reload keeps them and a restart starts them
//! again), and gauges set from the daemon's status at each scrape (`gauges.rs`), served with
//! the health and readiness checks (`server.rs`, `health.rs`).

pub mod created;
mod gauges;
pub mod graphite;
pub mod health;
mod process;
pub mod server;

pub use process::note_start;

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::feed::error::FetchErrorKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FeedLabels {
    pub feed: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProjectionLabels {
    pub feed: String,
    pub projection: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub feed: String,
    /// `page` or `body`.
    pub kind: &'static str,
    /// `ok`, or how it failed: `connect`, `status`, `transfer`, `too_large`, `unreadable`,
    /// `refused`, `other_format`, `shrunk`, `rewritten`; `cancelled` if it was dropped
    /// unfinished (a pause, a stop).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestKindLabels {
    pub feed: String,
    pub kind: &'static str,
}

/// The counters and histograms the daemon adds to as it works.
pub struct Metrics {
    pub events_read: Family<FeedLabels, Counter>,
    pub events_applied: Family<ProjectionLabels, Counter>,
    pub events_passed_over: Family<FeedLabels, Counter>,
    pub dead_letters: Family<ProjectionLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RequestKindLabels, Histogram>,
    pub retries: Family<FeedLabels, Counter>,
    pub batch_duration: Family<FeedLabels, Histogram>,
    pub batch_events: Family<FeedLabels, Histogram>,
    gauges: gauges::Gauges,
    registry: Registry,
    /// One scrape at a time sets the gauges and encodes them.
    scrape: std::sync::Mutex<()>,
}

/// A request to the feed under way, counted when it is dropped: with how it ended, or as
/// `cancelled` if it was dropped unfinished.
pub struct CountedRequest {
    metrics: &'static Metrics,
    feed: String,
    kind: &'static str,
    started: std::time::Instant,
    outcome: &'static str,
}

impl CountedRequest {
    /// The request ended: well, or with `failure`.
    pub fn ended(mut self, failure: Option<&FetchErrorKind>) {
        self.outcome = failure.map_or("ok", FetchErrorKind::label);
    }
}

impl Drop for CountedRequest {
    fn drop(&mut self) {
        let seconds = self.started.elapsed().as_secs_f64();
        self.metrics
            .count_request(&self.feed, self.kind, seconds, self.outcome);
    }
}

/// The process's metrics: one set, for as long as it runs.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let seconds = || Histogram::new(exponential_buckets(0.000_5, 2.0, 16));
        let events = || Histogram::new(exponential_buckets(1.0, 2.0, 14));
        let metrics = Metrics {
            events_read: Family::default(),
            events_applied: Family::default(),
            events_passed_over: Family::default(),
            dead_letters: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(seconds),
            retries: Family::default(),
            batch_duration: Family::new_with_constructor(seconds),
            batch_events: Family::new_with_constructor(events),
            gauges: gauges::Gauges::default(),
            registry: Registry::default(),
            scrape: std::sync::Mutex::new(()),
        };
        let mut metrics = metrics;
        metrics
            .registry
            .register_collector(Box::new(process::ProcessCollector));
        let registry = metrics.registry.sub_registry_with_prefix("projector");
        registry.register(
            "events_read",
            "Events read from the feed for the first time since start",
            metrics.events_read.clone(),
        );
        registry.register(
            "events_applied",
            "Events applied to a projection (a rebuild counts under NAME@rebuild)",
            metrics.events_applied.clone(),
        );
        registry.register(
            "events_passed_over",
            "Entries of types no projection on the feed applies",
            metrics.events_passed_over.clone(),
        );
        registry.register(
            "dead_letters",
            "Events recorded in projector_dead_letters",
            metrics.dead_letters.clone(),
        );
        registry.register(
            "requests",
            "Requests to the feed, by kind (page, body) and outcome (ok, or how they failed)",
            metrics.requests.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "How long requests to the feed took, failed ones included",
            Unit::Seconds,
            metrics.request_duration.clone(),
        );
        registry.register(
            "retries",
            "Failed requests and refused batches, each retried",
            metrics.retries.clone(),
        );
        registry.register_with_unit(
            "batch_duration",
            "How long the writer took to apply and commit a batch",
            Unit::Seconds,
            metrics.batch_duration.clone(),
        );
        registry.register(
            "batch_events",
            "Events in a committed batch",
            metrics.batch_events.clone(),
        );
        metrics.gauges.register(registry);
        metrics
    }

    /// Counts a request to the feed when it ends, or, dropped before (a pause, a stop), as
    /// `cancelled`.
    pub fn request(&'static self, feed: &str, kind: &'static str) -> CountedRequest {
        CountedRequest {
            metrics: self,
            feed: feed.to_string(),
            kind,
            started: std::time::Instant::now(),
            outcome: "cancelled",
        }
    }

    fn count_request(&self, feed: &str, kind: &'static str, seconds: f64, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestLabels {
                feed: feed.to_string(),
                kind,
                outcome,
            })
            .inc();
        self.request_duration
            .get_or_create(&RequestKindLabels {
                feed: feed.to_string(),
                kind,
            })
            .observe(seconds);
    }

    /// Counts a batch the writer committed.
    pub fn batch(&self, feed: &str, seconds: f64, events: usize) {
        let labels = FeedLabels {
            feed: feed.to_string(),
        };
        self.batch_duration.get_or_create(&labels).observe(seconds);
        self.batch_events
            .get_or_create(&labels)
            .observe(events as f64);
    }

    /// The Prometheus text exposition of everything, the gauges set from `status` first.
    pub fn render(&self, status: &crate::control::protocol::DaemonStatus) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.gauges.set_from(status);
        let mut text = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!("could not encode the metrics: {err}");
        }
        text
    }
}
