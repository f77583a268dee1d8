//! The writer's unit tests: exactly-once apply, poison events under both policies, savepoints
//! after a poison batch, a rewritten feed and a gap refused, and how the database is opened.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rusqlite::Transaction;
use serde_json::json;

use super::*;
use crate::config::{OnError, Synchronous};
use crate::event::EventMeta;
use crate::projection::{EventTypes, Projection, ProjectionError};

/// Sums `amount` into one row per projection; refuses negative amounts.
struct Summer(&'static str);

impl Projection for Summer {
    fn event_types(&self) -> Vec<String> {
        vec!["add".into()]
    }
    fn version(&self) -> String {
        "1".into()
    }
    fn setup(&self, tx: &Transaction) -> Result<(), ProjectionError> {
        tx.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {0} (total INTEGER NOT NULL, applied INTEGER NOT NULL);
             INSERT INTO {0} SELECT 0, 0 WHERE NOT EXISTS (SELECT 1 FROM {0});",
            self.0
        ))?;
        Ok(())
    }
    fn apply(&self, tx: &Transaction, event: &Event) -> Result<(), ProjectionError> {
        #[derive(serde::Deserialize)]
        struct Add {
            amount: i64,
        }
        let add: Add = event.decode()?;
        tx.execute(
            &format!(
                "UPDATE {} SET total = total + ?1, applied = applied + 1",
                self.0
            ),
            [add.amount],
        )?;
        if add.amount < 0 {
            return Err(ProjectionError::Rejected("negative".into()));
        }
        Ok(())
    }
}

fn configured(name: &'static str, on_error: OnError) -> ConfiguredProjection {
    ConfiguredProjection {
        name: name.into(),
        feed: "f".into(),
        on_error,
        on_change: Default::default(),
        event_types: EventTypes::new(["add".to_string()]),
        definition: "module summer".into(),
        version: "1".into(),
        projection: Arc::new(Summer(name)),
    }
}

fn event(offset: u64, event_type: &str, amount: i64) -> Event {
    Event {
        offset,
        meta: EventMeta {
            event_id: format!("id-{offset}"),
            event_type: event_type.into(),
            ..EventMeta::default()
        },
        payload: Some(json!({ "amount": amount }).into()),
        page: None,
    }
}

fn batch(events: Vec<Event>) -> Batch {
    Batch {
        feed: "f".into(),
        projections: vec!["a".into(), "b".into()],
        events,
    }
}

fn total(path: &Path, table: &str) -> (i64, i64) {
    let conn = store::open_reader(path).unwrap_or_else(|e| panic!("{e}"));
    conn.query_row(&format!("SELECT total, applied FROM {table}"), [], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The committed next offsets of `a` and `b`.
fn committed(path: &Path) -> Vec<u64> {
    let conn = store::open_reader(path).unwrap_or_else(|e| panic!("{e}"));
    let checkpoints = store::read_checkpoints(&conn).unwrap_or_else(|e| panic!("{e}"));
    checkpoints.iter().map(|(_, c)| c.next_offset).collect()
}

fn open(path: &Path, b_on_error: OnError) -> Writer {
    Writer::open(
        path,
        WriterSettings::default(),
        vec![configured("a", OnError::Stop), configured("b", b_on_error)],
    )
    .unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn replayed_events_are_not_applied_twice_even_after_reopening() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("db");
    let mut writer = open(&path, OnError::Stop);
    writer.apply(&batch(vec![event(0, "add", 1), event(1, "skip-me", 0)]))?;
    drop(writer);
    let mut writer = open(&path, OnError::Stop);
    assert_eq!(writer.starting_points()[0].checkpoint.next_offset, 2);
    // The same events again, then new ones: only the new ones count.
    let outcome = writer.apply(&batch(vec![
        event(1, "skip-me", 0),
        event(2, "add", 10),
        event(3, "add", 100),
    ]))?;
    assert_eq!(outcome.applied, 4);
    assert_eq!(total(&path, "a"), (111, 3));
    assert_eq!(total(&path, "b"), (111, 3));
    Ok(())
}

#[test]
fn a_poison_event_halts_stop_and_dead_letters_skip() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("db");
    let mut writer = open(&path, OnError::Skip);
    let outcome = writer.apply(&batch(vec![
        event(0, "add", 1),
        event(1, "add", -5),
        event(2, "add", 2),
    ]))?;
    assert_eq!(outcome.halted.len(), 1);
    assert_eq!(outcome.halted[0].projection, "a");
    assert_eq!(outcome.halted[0].offset, 1);
    assert_eq!(outcome.dead_lettered, 1);
    // `a` stopped before the poison event, none of whose writes survive anywhere.
    assert_eq!(total(&path, "a"), (1, 1));
    assert_eq!(total(&path, "b"), (3, 2));
    assert_eq!(committed(&path), [1, 3]);
    let conn = store::open_reader(&path)?;
    let (offset, error): (i64, String) = conn.query_row(
        "SELECT event_offset, error FROM projector_dead_letters WHERE projection = 'b'",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    assert_eq!(offset, 1);
    assert!(error.contains("negative"), "{error}");
    Ok(())
}

/// Rejects negative amounts, counting every call, rolled back or not.
struct Counting(Arc<AtomicUsize>);

impl Projection for Counting {
    fn event_types(&self) -> Vec<String> {
        vec!["add".into()]
    }
    fn version(&self) -> String {
        "1".into()
    }
    fn setup(&self, _: &Transaction) -> Result<(), ProjectionError> {
        Ok(())
    }
    fn apply(&self, _: &Transaction, event: &Event) -> Result<(), ProjectionError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        #[derive(serde::Deserialize)]
        struct Add {
            amount: i64,
        }
        match event.decode::<Add>()?.amount {
            amount if amount < 0 => Err(ProjectionError::Rejected("negative".into())),
            _ => Ok(()),
        }
    }
}

#[test]
fn after_a_batch_with_a_poison_event_the_next_ones_start_with_savepoints_until_one_is_clean(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let calls = Arc::new(AtomicUsize::new(0));
    let mut writer = Writer::open(
        &dir.path().join("db"),
        WriterSettings::default(),
        vec![ConfiguredProjection {
            name: "counting".into(),
            feed: "f".into(),
            on_error: OnError::Skip,
            on_change: Default::default(),
            event_types: EventTypes::new(["add".to_string()]),
            definition: "module counting".into(),
            version: "1".into(),
            projection: Arc::new(Counting(calls.clone())),
        }],
    )?;
    let mut offset = 0;
    let mut apply = |amounts: &[i64]| -> anyhow::Result<usize> {
        let events = amounts
            .iter()
            .map(|&amount| {
                offset += 1;
                event(offset - 1, "add", amount)
            })
            .collect();
        let before = calls.load(Ordering::Relaxed);
        writer.apply(&Batch {
            feed: "f".into(),
            projections: vec!["counting".into()],
            events,
        })?;
        Ok(calls.load(Ordering::Relaxed) - before)
    };
    // Up to the poison event without savepoints, then all three with them.
    assert_eq!(apply(&[1, -1, 1])?, 2 + 3);
    // With savepoints from the start: once each.
    assert_eq!(apply(&[1, -1, 1])?, 3);
    // Still with savepoints; this batch is clean, so the next starts without.
    assert_eq!(apply(&[1, 1])?, 2);
    assert_eq!(apply(&[-1, 1])?, 1 + 2);
    Ok(())
}

#[test]
fn a_rewritten_feed_is_refused_whole() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("db");
    let mut writer = open(&path, OnError::Stop);
    writer.apply(&batch(vec![event(0, "add", 1), event(1, "add", 2)]))?;
    let mut replaced = event(1, "add", 2);
    replaced.meta.event_id = "someone-else".into();
    let result = writer.apply(&batch(vec![replaced, event(2, "add", 4)]));
    assert!(
        matches!(&result, Err(ApplyError::FeedRewritten { offset: 1, .. })),
        "{result:?}"
    );
    assert_eq!(total(&path, "a"), (3, 2));
    assert_eq!(committed(&path)[0], 2);
    Ok(())
}

#[test]
fn the_committed_checkpoint_decides_not_the_writers_memory() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("db");
    let mut writer = open(&path, OnError::Stop);
    // Another writer commits behind this one's back (here: the checkpoints moved on).
    let mut conn = store::open_writer(&path, Synchronous::Normal)?;
    let tx = conn.transaction()?;
    for name in ["a", "b"] {
        let moved = Checkpoint {
            next_offset: 1,
            last_event_id: Some("id-0".into()),
            page: None,
        };
        store::save_checkpoint(&tx, name, "f", &moved)?;
    }
    tx.commit()?;
    let outcome = writer.apply(&batch(vec![event(0, "add", 1), event(1, "add", 2)]))?;
    assert_eq!(outcome.applied, 2, "only offset 1, for a and b");
    assert_eq!(total(&path, "a"), (2, 1));
    Ok(())
}

#[test]
fn a_gap_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut writer = open(&dir.path().join("db"), OnError::Stop);
    let result = writer.apply(&batch(vec![event(5, "add", 1)]));
    assert!(matches!(result, Err(ApplyError::Internal(_))), "{result:?}");
    Ok(())
}

fn open_without_projections(path: &Path) -> Writer {
    Writer::open(path, WriterSettings::default(), Vec::new()).unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn synchronous_is_normal_unless_full_is_asked_for() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("db");
    let synchronous = |writer: &Writer| -> rusqlite::Result<i64> {
        writer
            .conn
            .query_row("PRAGMA synchronous", [], |row| row.get(0))
    };
    // SQLite's numbers: 1 is NORMAL, 2 is FULL.
    assert_eq!(synchronous(&open_without_projections(&path))?, 1);
    let full = WriterSettings {
        synchronous: Synchronous::Full,
        ..WriterSettings::default()
    };
    assert_eq!(synchronous(&Writer::open(&path, full, Vec::new())?)?, 2);
    Ok(())
}

#[test]
fn the_page_cache_is_sized_as_configured() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let settings = WriterSettings {
        page_cache_bytes: Some(12 << 20),
        ..WriterSettings::default()
    };
    let writer = Writer::open(&dir.path().join("db"), settings, Vec::new())?;
    let cache_size: i64 = writer
        .conn
        .query_row("PRAGMA cache_size", [], |row| row.get(0))?;
    // Negative: KiB.
    assert_eq!(cache_size, -12 * 1024);
    Ok(())
}
