//! Exactly once: a batch is applied in one transaction with the checkpoints it moves. An event
//! is applied to a projection only if its offset is exactly that projection's next offset, read
//! under the write lock; passing the event just before a checkpoint, its id must be the one the
//! checkpoint recorded, or the feed was rewritten and nothing of the batch is applied.

use rusqlite::{Transaction, TransactionBehavior};

use super::activity::WriterActivity;
use super::{ApplyError, Batch, BatchOutcome, Halt, Writer};
use crate::config::OnError;
use crate::event::Event;
use crate::projection::{ConfiguredProjection, ProjectionError};
use crate::store::{self, Checkpoint, DeadLetter};

impl Writer {
    /// Applies a batch in one transaction. On error nothing is committed and no in-memory
    /// checkpoint moves.
    ///
    /// Most batches apply cleanly, so the first attempt runs without a savepoint per event
    /// (they cost a share of the writer's time worth saving). An event that fails there may leave part
    /// of its writes behind, which only a savepoint undoes: the batch is then rolled back whole
    /// and applied again with a savepoint around each event. Poison events tend to come in
    /// runs, so after such a batch the feed's next batches start with savepoints, until one
    /// applies without a failure: a feed full of poison events is applied once, not twice.
    pub fn apply(&mut self, batch: &Batch) -> Result<BatchOutcome, ApplyError> {
        if self.poisoned_feeds.contains(&batch.feed) {
            let outcome = self.apply_with_savepoints(batch)?;
            if outcome.halted.is_empty() && outcome.dead_lettered == 0 {
                self.poisoned_feeds.remove(&batch.feed);
            }
            return Ok(outcome);
        }
        match self.apply_with(batch, Savepoints::Off) {
            Ok(outcome) => Ok(outcome),
            Err(Attempt::Failed(err)) => Err(err),
            Err(Attempt::NeedsSavepoints) => {
                let outcome = self.apply_with_savepoints(batch)?;
                self.poisoned_feeds.insert(batch.feed.clone());
                Ok(outcome)
            }
        }
    }

    fn apply_with_savepoints(&mut self, batch: &Batch) -> Result<BatchOutcome, ApplyError> {
        self.apply_with(batch, Savepoints::On)
            .map_err(|attempt| match attempt {
                Attempt::Failed(err) => err,
                Attempt::NeedsSavepoints => {
                    ApplyError::Internal("an event failed although it ran in a savepoint".into())
                }
            })
    }

    fn apply_with(
        &mut self,
        batch: &Batch,
        savepoints: Savepoints,
    ) -> Result<BatchOutcome, Attempt> {
        // The batch's projections that still run, by slot.
        let members: Vec<usize> = batch
            .projections
            .iter()
            .filter_map(|name| self.by_name.get(name).copied())
            .filter(|&index| !self.slots[index].halted)
            .collect();
        let mut halts: Vec<Option<Halt>> = vec![None; members.len()];
        let mut outcome = BatchOutcome {
            events: batch.events.len(),
            ..BatchOutcome::default()
        };

        let storage = ApplyError::storage;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(storage)?;
        // The checkpoints as committed, read under the write lock: the database, not this
        // thread's memory, decides what is applied, so even a second writer cannot double-apply.
        let committed: Vec<Checkpoint> = members
            .iter()
            .map(|&index| {
                store::load_checkpoint(&tx, &self.slots[index].projection.name)
                    .map(Option::unwrap_or_default)
            })
            .collect::<Result<_, _>>()
            .map_err(storage)?;
        let mut checkpoints = committed.clone();
        for event in &batch.events {
            for (k, &index) in members.iter().enumerate() {
                let projection = &self.slots[index].projection;
                if halts[k].is_some()
                    || position(&checkpoints[k], event, &projection.name)? == Position::Applied
                {
                    continue;
                }
                let step = Step {
                    tx: &tx,
                    activity: &self.activity,
                    slot: index,
                    feed: &batch.feed,
                    savepoints,
                };
                match step.fate(projection, event)? {
                    Fate::Applied => outcome.applied += 1,
                    Fate::DeadLettered => outcome.dead_lettered += 1,
                    Fate::PassedOver => {}
                    Fate::Halted(halt) => {
                        // Halted just before the event: its checkpoint stays where it is.
                        halts[k] = Some(halt);
                        continue;
                    }
                }
                checkpoints[k].next_offset = event.offset + 1;
                checkpoints[k].last_event_id = Some(event.meta.event_id.clone());
            }
        }
        self.activity.committing();
        for (k, &index) in members.iter().enumerate() {
            if checkpoints[k] != committed[k] {
                let name = &self.slots[index].projection.name;
                store::save_checkpoint(&tx, name, &batch.feed, &checkpoints[k]).map_err(storage)?;
            }
        }
        tx.commit().map_err(storage)?;
        self.wal.keep_bounded(&self.conn);

        for ((index, checkpoint), halt) in members.into_iter().zip(checkpoints).zip(halts) {
            let slot = &mut self.slots[index];
            outcome
                .checkpoints
                .push((slot.projection.name.clone(), checkpoint));
            if let Some(halt) = halt {
                slot.halted = true;
                outcome.halted.push(halt);
            }
        }
        Ok(outcome)
    }
}

/// Where an event stands against a projection's checkpoint.
#[derive(Debug, PartialEq, Eq)]
enum Position {
    /// Before the checkpoint: applied (or passed) already.
    Applied,
    /// Exactly the checkpoint's next offset.
    Next,
}

/// Where `event` stands against `checkpoint`. Passing the event just before the checkpoint, its
/// id must be the one the checkpoint recorded; an event past the next offset is a gap, which the
/// reader never sends.
fn position(
    checkpoint: &Checkpoint,
    event: &Event,
    projection: &str,
) -> Result<Position, ApplyError> {
    if event.offset < checkpoint.next_offset {
        if event.offset + 1 == checkpoint.next_offset
            && checkpoint.last_event_id.as_deref() != Some(event.meta.event_id.as_str())
        {
            return Err(ApplyError::FeedRewritten {
                projection: projection.to_string(),
                offset: event.offset,
                expected: checkpoint.last_event_id.clone().unwrap_or_default(),
                found: event.meta.event_id.clone(),
            });
        }
        return Ok(Position::Applied);
    }
    if event.offset > checkpoint.next_offset {
        return Err(ApplyError::Internal(format!(
            "projection {projection:?} expects offset {} but the batch jumps to {}",
            checkpoint.next_offset, event.offset
        )));
    }
    Ok(Position::Next)
}

/// What became of one event for one projection.
enum Fate {
    Applied,
    /// Not a type the projection handles.
    PassedOver,
    /// A poison event under `on_error = "skip"`.
    DeadLettered,
    /// A poison event under `on_error = "stop"`.
    Halted(Halt),
}

/// What applying one event to one projection needs of the batch.
struct Step<'a> {
    tx: &'a Transaction<'a>,
    activity: &'a WriterActivity,
    /// The projection's slot, for the activity report.
    slot: usize,
    feed: &'a str,
    savepoints: Savepoints,
}

impl Step<'_> {
    /// Applies `event` to `projection`, or settles its failure by the projection's `on_error`.
    /// A failure of the database itself fails the batch; a failure without a savepoint asks for
    /// the batch again with them.
    fn fate(&self, projection: &ConfiguredProjection, event: &Event) -> Result<Fate, Attempt> {
        if !projection.handles(&event.meta.event_type) {
            return Ok(Fate::PassedOver);
        }
        self.activity.applying(self.slot, event.offset);
        let storage = ApplyError::storage;
        let err = match apply_one(self.tx, projection, event, self.savepoints).map_err(storage)? {
            Ok(()) => return Ok(Fate::Applied),
            Err(ProjectionError::Sql(err)) if store::is_storage_failure(&err) => {
                return Err(ApplyError::storage(err).into())
            }
            // Dropping the transaction rolls it back.
            Err(_) if self.savepoints == Savepoints::Off => return Err(Attempt::NeedsSavepoints),
            Err(err) => err,
        };
        match projection.on_error {
            OnError::Stop => Ok(Fate::Halted(Halt {
                projection: projection.name.clone(),
                offset: event.offset,
                event_id: event.meta.event_id.clone(),
                event_type: event.meta.event_type.clone(),
                error: err.to_string(),
            })),
            OnError::Skip => {
                let letter = DeadLetter {
                    projection: &projection.name,
                    feed: self.feed,
                    event_offset: event.offset,
                    event_id: &event.meta.event_id,
                    event_type: &event.meta.event_type,
                    payload: event.payload.as_ref().map(|p| p.as_str().to_string()),
                    error: err.to_string(),
                };
                store::insert_dead_letter(self.tx, &letter).map_err(storage)?;
                Ok(Fate::DeadLettered)
            }
        }
    }
}

/// Whether each event runs in a savepoint of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Savepoints {
    Off,
    On,
}

/// Why an attempt at a batch did not commit.
enum Attempt {
    Failed(ApplyError),
    /// An event failed without a savepoint to undo its writes.
    NeedsSavepoints,
}

impl From<ApplyError> for Attempt {
    fn from(err: ApplyError) -> Attempt {
        Attempt::Failed(err)
    }
}

/// Applies one event to one projection; with savepoints, inside one, so that a failing event
/// leaves none of its writes behind. The outer error is the database failing the savepoint
/// itself.
fn apply_one(
    tx: &Transaction,
    projection: &ConfiguredProjection,
    event: &Event,
    savepoints: Savepoints,
) -> rusqlite::Result<Result<(), ProjectionError>> {
    if savepoints == Savepoints::Off {
        return Ok(projection.projection.apply(tx, event));
    }
    tx.prepare_cached("SAVEPOINT projector_event")?
        .execute([])?;
    let result = projection.projection.apply(tx, event);
    if let Err(ProjectionError::Sql(err)) = &result {
        if store::is_storage_failure(err) {
            // SQLite may already have rolled the whole transaction back (a full disk, an I/O
            // error), taking the savepoint with it: the batch fails as a whole, with this error.
            return Ok(result);
        }
    }
    if result.is_err() {
        tx.prepare_cached("ROLLBACK TO projector_event")?
            .execute([])?;
    }
    tx.prepare_cached("RELEASE projector_event")?.execute([])?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;
    use crate::event::EventMeta;
    use crate::projection::Projection;
    use crate::writer::WriterSettings;
    use serde_json::json;
    use std::collections::HashSet;
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Sums `amount` into one row per projection; refuses negative amounts.
    struct Summer(&'static str);

    impl Projection for Summer {
        fn event_types(&self) -> Vec<String> {
            vec!["add".into()]
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
            event_types: HashSet::from(["add".to_string()]),
            projection: Box::new(Summer(name)),
        }
    }

    fn event(offset: u64, event_type: &str, amount: i64) -> Event {
        Event {
            offset,
            meta: EventMeta {
                event_id: format!("id-{offset}"),
                event_type: event_type.into(),
                aggregate_id: String::new(),
                aggregate_name: String::new(),
                aggregate_version: 0,
                created: String::new(),
            },
            payload: Some(json!({ "amount": amount }).into()),
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
                event_types: HashSet::from(["add".to_string()]),
                projection: Box::new(Counting(calls.clone())),
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
}
