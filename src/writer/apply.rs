//! Exactly once: a batch is applied in one transaction with the checkpoints it moves. An event
//! is applied to a projection only if its offset is exactly that projection's next offset, read
//! under the write lock; passing the event just before a checkpoint, its id must be the one the
//! checkpoint recorded, or the feed was rewritten and nothing of the batch is applied.

use rusqlite::{Transaction, TransactionBehavior};

use super::activity::WriterActivity;
use super::{ApplyError, Batch, BatchOutcome, Halt, ProjectionOutcome, SlotState, Writer};
use crate::config::OnError;
use crate::event::Event;
use crate::projection::{ConfiguredProjection, ProjectionError};
use crate::store::{self, lifecycle, Checkpoint, DeadLetter};

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
        let shadow = self.shadow_of(batch);
        // A rebuild's poison events are its own, not the live projections'.
        let poison_key = match shadow {
            Some(index) => self.shadows[index].member.clone(),
            None => batch.feed.clone(),
        };
        let outcome = if self.poisoned.contains(&poison_key) {
            let outcome = self.apply_with_savepoints(batch, shadow)?;
            if outcome.halted.is_empty() && outcome.dead_lettered == 0 {
                self.poisoned.remove(&poison_key);
            }
            outcome
        } else {
            match self.apply_with(batch, shadow, Savepoints::Off) {
                Ok(outcome) => outcome,
                Err(Attempt::Failed(err)) => return Err(err),
                Err(Attempt::NeedsSavepoints) => {
                    let outcome = self.apply_with_savepoints(batch, shadow)?;
                    self.poisoned.insert(poison_key);
                    outcome
                }
            }
        };
        if let Some(index) = shadow {
            self.finish_rebuild_if_caught_up(index);
        }
        Ok(outcome)
    }

    /// The rebuild whose shadow `batch` is for, if it is for one (a shadow is read alone).
    fn shadow_of(&self, batch: &Batch) -> Option<usize> {
        self.shadows
            .iter()
            .position(|shadow| batch.projections.contains(&shadow.member))
    }

    /// Once a rebuild's shadow has caught up with the live checkpoint, its tables replace the
    /// live ones. A failure is said and tried again after the shadow's next batch.
    fn finish_rebuild_if_caught_up(&mut self, index: usize) {
        let shadow = &self.shadows[index];
        let Some(&live) = self.by_name.get(&shadow.projection) else {
            return;
        };
        // Most batches of a rebuild leave it behind the live checkpoint: said without
        // attaching the shadow.
        let behind = match (
            shadow.checkpoint(),
            store::load_checkpoint(&self.conn, &shadow.projection),
        ) {
            (Ok(rebuilt), Ok(live)) => rebuilt.next_offset < live.unwrap_or_default().next_offset,
            _ => false,
        };
        if behind {
            return;
        }
        let source = self.slots[live].projection.definition.clone();
        let started = std::time::Instant::now();
        match shadow.swap_into(&mut self.conn, &source) {
            Ok(false) => {}
            Ok(true) => {
                let shadow = self.shadows.remove(index);
                tracing::info!(
                    projection = %shadow.projection,
                    version = %shadow.version,
                    swap = ?started.elapsed(),
                    "rebuilt: the new tables replaced the old ones"
                );
                if let Some(&slot) = self.by_name.get(&shadow.member) {
                    self.slots[slot].state = SlotState::Retired;
                }
                let path = shadow.path.clone();
                drop(shadow);
                if let Err(err) = crate::store::lifecycle::remove_shadow(&path) {
                    tracing::warn!(file = %path.display(), "could not remove the rebuild's database: {err}");
                }
                self.rebuilt.send_modify(|count| *count += 1);
            }
            Err(err) => tracing::error!(
                projection = %shadow.projection,
                "the rebuild caught up but could not replace the live tables (tried again after its next batch): {err:#}"
            ),
        }
    }

    fn apply_with_savepoints(
        &mut self,
        batch: &Batch,
        shadow: Option<usize>,
    ) -> Result<BatchOutcome, ApplyError> {
        self.apply_with(batch, shadow, Savepoints::On)
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
        shadow: Option<usize>,
        savepoints: Savepoints,
    ) -> Result<BatchOutcome, Attempt> {
        // The batch's projections that still run, by slot.
        let members: Vec<usize> = batch
            .projections
            .iter()
            .filter_map(|name| self.by_name.get(name).copied())
            .filter(|&index| self.slots[index].state == SlotState::Running)
            .collect();
        let mut halts: Vec<Option<Halt>> = vec![None; members.len()];
        // Per member: events applied, events dead-lettered.
        let mut counts = vec![(0, 0); members.len()];
        let mut outcome = BatchOutcome {
            offsets: match (batch.events.first(), batch.events.last()) {
                (Some(first), Some(last)) => first.offset..last.offset + 1,
                _ => 0..0,
            },
            ..BatchOutcome::default()
        };

        let storage = ApplyError::storage;
        let conn = match shadow {
            Some(index) => &mut self.shadows[index].conn,
            None => &mut self.conn,
        };
        let tx = conn
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
        let mut last_created: Vec<Option<&str>> = vec![None; members.len()];
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
                    Fate::Applied => counts[k].0 += 1,
                    Fate::DeadLettered => counts[k].1 += 1,
                    Fate::PassedOver => {}
                    Fate::Halted(halt) => {
                        // Halted just before the event: its checkpoint stays where it is.
                        halts[k] = Some(halt);
                        continue;
                    }
                }
                checkpoints[k].next_offset = event.offset + 1;
                checkpoints[k].last_event_id = Some(event.meta.event_id.clone());
                checkpoints[k].page = event.page.as_deref().cloned();
                last_created[k] = Some(&event.meta.created);
            }
        }
        self.activity.committing();
        for (k, &index) in members.iter().enumerate() {
            if checkpoints[k] != committed[k] {
                let name = &self.slots[index].projection.name;
                store::save_checkpoint(&tx, name, &batch.feed, &checkpoints[k]).map_err(storage)?;
            }
            if let Some(halt) = &halts[k] {
                // Recorded, so that `projector projections` can say it without the daemon.
                let name = &self.slots[index].projection.name;
                let event = lifecycle::HaltedEvent {
                    offset: halt.offset,
                    event_id: halt.event_id.clone(),
                    event_type: halt.event_type.clone(),
                    payload: halt.payload.clone(),
                    event_meta: halt.event_meta.clone(),
                    error: halt.error.clone(),
                };
                lifecycle::record_halt(&tx, name, &event).map_err(storage)?;
            }
        }
        tx.commit().map_err(storage)?;
        if shadow.is_none() {
            self.wal.keep_bounded(&self.conn);
        }

        for ((((index, checkpoint), halt), (applied, dead_lettered)), last_created) in members
            .into_iter()
            .zip(checkpoints)
            .zip(halts)
            .zip(counts)
            .zip(last_created)
        {
            let slot = &mut self.slots[index];
            outcome.applied += applied;
            outcome.dead_lettered += dead_lettered;
            outcome.projections.push(ProjectionOutcome {
                projection: slot.projection.name.clone(),
                checkpoint,
                applied,
                dead_lettered,
                last_created: last_created.map(str::to_string),
            });
            if let Some(halt) = halt {
                slot.state = SlotState::Halted;
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
/// id must be the one the checkpoint recorded (a checkpoint an operator reset records none);
/// an event past the next offset is a gap, which the reader never sends.
fn position(
    checkpoint: &Checkpoint,
    event: &Event,
    projection: &str,
) -> Result<Position, ApplyError> {
    if event.offset < checkpoint.next_offset {
        if event.offset + 1 == checkpoint.next_offset
            && checkpoint
                .last_event_id
                .as_deref()
                .is_some_and(|id| id != event.meta.event_id)
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
        let parks = match projection.on_error {
            OnError::Park => aggregate_of(event),
            OnError::Stop | OnError::Skip => None,
        };
        if let Some(aggregate) = &parks {
            // An aggregate with an event parked: this one waits behind it, in order.
            if let Some(first) =
                store::dead_letters::parked_behind(self.tx, &projection.name, aggregate)
                    .map_err(storage)?
            {
                let error = format!(
                    "parked behind dead letter {first}, an earlier event of aggregate {aggregate}: retrying that one releases this one"
                );
                self.dead_letter(projection, event, error, parks.clone())?;
                return Ok(Fate::DeadLettered);
            }
        }
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
                payload: event.payload.as_ref().map(|p| p.as_str().to_string()),
                event_meta: store::dead_letters::meta_json(&event.meta),
            })),
            OnError::Skip | OnError::Park => {
                self.dead_letter(projection, event, err.to_string(), parks)?;
                Ok(Fate::DeadLettered)
            }
        }
    }

    /// Records `event` in the dead letters with `error`; `parks` the aggregate it holds back.
    fn dead_letter(
        &self,
        projection: &ConfiguredProjection,
        event: &Event,
        error: String,
        parks: Option<String>,
    ) -> Result<(), ApplyError> {
        let letter = DeadLetter {
            projection: &projection.name,
            feed: self.feed,
            event_offset: event.offset,
            event_id: &event.meta.event_id,
            event_type: &event.meta.event_type,
            payload: event.payload.as_ref().map(|p| p.as_str().to_string()),
            error,
            event_meta: store::dead_letters::meta_json(&event.meta),
            parks,
        };
        store::insert_dead_letter(self.tx, &letter).map_err(ApplyError::storage)
    }
}

/// The aggregate `event` belongs to, when the feed says (`name/id`).
fn aggregate_of(event: &Event) -> Option<String> {
    let meta = &event.meta;
    (!meta.aggregate_id.is_empty())
        .then(|| format!("{}/{}", meta.aggregate_name, meta.aggregate_id))
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
