//! The storage limit: the daemon's writer alone, with no HTTP, for reference.

use std::time::Instant;

use projector::config::{Config, FeedFormat, Synchronous};
use projector::demo::feed_server::StoredEvent;
use projector::event::{Event, EventMeta, Payload};
use projector::reader::MAX_BATCH_EVENTS;
use projector::writer::{Batch, Writer, WriterSettings};

use crate::runs::{write_config, Projections, Setup};

/// The writer alone: the same events, with payloads, in batches as large as the daemon's
/// largest, one transaction each.
pub fn storage_limit(
    stored: &[StoredEvent],
    synchronous: Synchronous,
    projections: Projections,
) -> f64 {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let setup = Setup {
        format: FeedFormat::Flux,
        projections,
        mapping: None,
    };
    let config = write_config(
        dir.path(),
        setup,
        "http://127.0.0.1:1/events",
        "50ms",
        synchronous,
    );
    let config = Config::load(&config).unwrap_or_else(|e| panic!("{e}"));
    let projections = projector::projection::build_all(&config).unwrap_or_else(|e| panic!("{e}"));
    let events: Vec<Event> = stored
        .iter()
        .enumerate()
        .map(|(offset, e)| Event {
            offset: offset as u64,
            meta: EventMeta {
                event_id: e.id.clone(),
                event_type: e.event_type.clone(),
                aggregate_id: e.aggregate_id.clone(),
                aggregate_name: e.aggregate_name.clone(),
                aggregate_version: e.aggregate_version,
                created: e.created.clone(),
            },
            payload: Payload::from_json(e.body.clone().into_bytes()).ok(),
            page: None,
        })
        .collect();
    let names: Vec<String> = projections.iter().map(|p| p.name.clone()).collect();
    // As the daemon opens it.
    let settings = WriterSettings {
        max_bytes: None,
        synchronous,
        page_cache_bytes: Some(config.daemon.page_cache_bytes.0 as u64),
        file_mode: Some(config.daemon.database_mode.0),
    };
    let mut writer = Writer::open(&config.daemon.database, settings, projections)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let total = events.len();
    let mut events = events.into_iter();
    let batches: Vec<Batch> = std::iter::from_fn(|| {
        let chunk: Vec<Event> = events.by_ref().take(MAX_BATCH_EVENTS).collect();
        (!chunk.is_empty()).then(|| Batch {
            feed: "bank".into(),
            projections: names.clone(),
            events: chunk,
        })
    })
    .collect();
    let started = Instant::now();
    for batch in &batches {
        writer.apply(batch).unwrap_or_else(|e| panic!("{e}"));
    }
    total as f64 / started.elapsed().as_secs_f64()
}
