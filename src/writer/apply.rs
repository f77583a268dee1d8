//! Exactly once: a batch is applied in one transaction with the checkpoints it moves. An event
//! is applied to a projection only if its offset is exactly that projection's next offset, read
//! under the write lock; passing the event just before a checkpoint, its id must be the one the
//! checkpoint recorded, or the feed was rewritten and nothing of the batch is applied.
//!
//! The rule is the same on every store; a store gives it a transaction ([`BatchTx`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::activity::WriterActivity;
use super::{ApplyError, Batch, BatchOutcome, Halt, ProjectionOutcome, Slot, SlotState};
use crate::config::OnError;
use crate::event::Event;
use crate::projection::{ConfiguredProjection, ProjectionError};
use crate::store::lifecycle::HaltedEvent;
use crate::store::{self, Checkpoint, DeadLetter};

/// A store's open transaction, as a batch uses it. Every method's error is the store's own
/// failure, which fails the batch; only [`BatchTx::apply`]'s inner error is the event's fault.
pub(super) trait BatchTx {
    /// `projection`'s committed checkpoint, read so that no other writer moves it until this
    /// transaction ends.
    fn checkpoint(&mut self, projection: &str) -> Result<Checkpoint, ApplyError>;
    fn save_checkpoint(
        &mut self,
        projection: &str,
        feed: &str,
        checkpoint: &Checkpoint,
    ) -> Result<(), ApplyError>;
    fn record_halt(&mut self, projection: &str, event: &HaltedEvent) -> Result<(), ApplyError>;
    /// The first unresolved dead letter parked for `aggregate`, if any.
    fn parked_behind(
        &mut self,
        projection: &str,
        aggregate: &str,
    ) -> Result<Option<i64>, ApplyError>;
    fn insert_dead_letter(&mut self, letter: &DeadLetter) -> Result<(), ApplyError>;
    /// Applies `event` to `projection`. The inner error is the event's fault; the outer one the
    /// store's.
    fn apply(
        &mut self,
        projection: &ConfiguredProjection,
        event: &Event,
    ) -> Result<Result<(), ProjectionError>, ApplyError>;
    /// Runs a statement without parameters (the savepoints' statements, which both stores
    /// write alike).
    fn run(&mut self, sql: &str) -> Result<(), ApplyError>;
    fn commit(self) -> Result<(), ApplyError>;
}

/// Where a store's batch transactions come from.
pub(super) trait BeginBatch {
    type Tx<'c>: BatchTx
    where
        Self: 'c;
    fn begin(&mut self) -> Result<Self::Tx<'_>, ApplyError>;
}

/// The projections a writer holds, whatever its store.
pub(super) struct Members {
    pub slots: Vec<Slot>,
    pub by_name: HashMap<String, usize>,
    pub activity: Arc<WriterActivity>,
    /// Feeds (or rebuilds) whose last batch had a poison event: their next batch starts with
    /// savepoints.
    poisoned: HashSet<String>,
}

impl Members {
    pub fn new(slots: Vec<Slot>) -> Members {
        let by_name = slots
            .iter()
            .enumerate()
            .map(|(index, slot)| (slot.projection.name.clone(), index))
            .collect();
        let activity = Arc::new(WriterActivity::new(
            slots
                .iter()
                .map(|slot| slot.projection.name.clone())
                .collect(),
        ));
        Members {
            slots,
            by_name,
            activity,
            poisoned: HashSet::new(),
        }
    }

    pub fn set_state(&mut self, name: &str, state: SlotState) {
        if let Some(&slot) = self.by_name.get(name) {
            self.slots[slot].state = state;
        }
    }

    /// A rebuild's shadow `member` has replaced `projection`'s tables (built by `version`, in
    /// `took`): the shadow is done, and the projection runs the definition it was built by.
    pub fn swapped_in(&mut self, projection: &str, member: &str, version: &str, took: Duration) {
        tracing::info!(
            projection = %projection,
            version = %version,
            swap = ?took,
            "rebuilt: the new tables replaced the old ones"
        );
        self.set_state(member, SlotState::Retired);
        self.set_state(projection, SlotState::Running);
    }

    /// Applies a batch in one transaction of `store`. On error nothing is committed and no
    /// in-memory state moves. `poison_key` names whose run of poison events this is (a feed,
    /// or a rebuild).
    ///
    /// Most batches apply cleanly, so the first attempt runs without a savepoint per event
    /// (they cost a share of the writer's time worth saving). An event that fails there may leave part
    /// of its writes behind, which only a savepoint undoes: the batch is then rolled back whole
    /// and applied again with a savepoint around each event. Poison events tend to come in
    /// runs, so after such a batch the feed's next batches start with savepoints, until one
    /// applies without a failure: a feed full of poison events is applied once, not twice.
    pub fn apply(
        &mut self,
        store: &mut impl BeginBatch,
        batch: &Batch,
        poison_key: &str,
    ) -> Result<BatchOutcome, ApplyError> {
        if self.poisoned.contains(poison_key) {
            let outcome = self.apply_with_savepoints(store, batch)?;
            if outcome.halted.is_empty() && outcome.dead_lettered == 0 {
                self.poisoned.remove(poison_key);
            }
            return Ok(outcome);
        }
        let first = self.apply_with(store.begin()?, batch, Savepoints::Off);
        match first {
            Ok(outcome) => Ok(outcome),
            Err(Attempt::Failed(err)) => Err(err),
            Err(Attempt::NeedsSavepoints) => {
                let outcome = self.apply_with_savepoints(store, batch)?;
                self.poisoned.insert(poison_key.to_string());
                Ok(outcome)
            }
        }
    }

    fn apply_with_savepoints(
        &mut self,
        store: &mut impl BeginBatch,
        batch: &Batch,
    ) -> Result<BatchOutcome, ApplyError> {
        self.apply_with(store.begin()?, batch, Savepoints::On)
            .map_err(|attempt| match attempt {
                Attempt::Failed(err) => err,
                Attempt::NeedsSavepoints => {
                    ApplyError::Internal("an event failed although it ran in a savepoint".into())
                }
            })
    }

    fn apply_with(
        &mut self,
        mut tx: impl BatchTx,
        batch: &Batch,
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

        // The checkpoints as committed, read under the write lock: the database, not this
        // thread's memory, decides what is applied, so even a second writer cannot double-apply.
        let committed: Vec<Checkpoint> = members
            .iter()
            .map(|&index| tx.checkpoint(&self.slots[index].projection.name))
            .collect::<Result<_, _>>()?;
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
                    activity: &self.activity,
                    slot: index,
                    feed: &batch.feed,
                    savepoints,
                };
                match step.fate(&mut tx, projection, event)? {
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
            let name = &self.slots[index].projection.name;
            if checkpoints[k] != committed[k] {
                tx.save_checkpoint(name, &batch.feed, &checkpoints[k])?;
            }
            if let Some(halt) = &halts[k] {
                // Recorded, so that `projector projections` can say it without the daemon.
                let event = HaltedEvent {
                    offset: halt.offset,
                    event_id: halt.event_id.clone(),
                    event_type: halt.event_type.clone(),
                    payload: halt.payload.clone(),
                    event_meta: halt.event_meta.clone(),
                    error: halt.error.clone(),
                };
                tx.record_halt(name, &event)?;
            }
        }
        tx.commit()?;

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
    fn fate(
        &self,
        tx: &mut impl BatchTx,
        projection: &ConfiguredProjection,
        event: &Event,
    ) -> Result<Fate, Attempt> {
        if !projection.handles(&event.meta.event_type) {
            return Ok(Fate::PassedOver);
        }
        self.activity.applying(self.slot, event.offset);
        let parks = match projection.on_error {
            OnError::Park => aggregate_of(event),
            OnError::Stop | OnError::Skip => None,
        };
        if let Some(aggregate) = &parks {
            // An aggregate with an event parked: this one waits behind it, in order.
            if let Some(first) = tx.parked_behind(&projection.name, aggregate)? {
                let error = format!(
                    "parked behind dead letter {first}, an earlier event of aggregate {aggregate}: retrying that one releases this one"
                );
                self.dead_letter(tx, projection, event, error, parks.clone())?;
                return Ok(Fate::DeadLettered);
            }
        }
        let err = match apply_one(tx, projection, event, self.savepoints)? {
            Ok(()) => return Ok(Fate::Applied),
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
                self.dead_letter(tx, projection, event, err.to_string(), parks)?;
                Ok(Fate::DeadLettered)
            }
        }
    }

    /// Records `event` in the dead letters with `error`; `parks` the aggregate it holds back.
    fn dead_letter(
        &self,
        tx: &mut impl BatchTx,
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
        tx.insert_dead_letter(&letter)
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
/// leaves none of its writes behind. The outer error is the store failing.
fn apply_one(
    tx: &mut impl BatchTx,
    projection: &ConfiguredProjection,
    event: &Event,
    savepoints: Savepoints,
) -> Result<Result<(), ProjectionError>, ApplyError> {
    if savepoints == Savepoints::Off {
        return tx.apply(projection, event);
    }
    tx.run("SAVEPOINT projector_event")?;
    let result = tx.apply(projection, event)?;
    if result.is_err() {
        tx.run("ROLLBACK TO SAVEPOINT projector_event")?;
    }
    tx.run("RELEASE SAVEPOINT projector_event")?;
    Ok(result)
}
