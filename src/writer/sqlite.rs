//! The SQLite store's side of a batch: its transaction (taken with the write lock, so that the
//! checkpoints read are the ones committed), and what a batch of a rebuild's shadow does once
//! the shadow has caught up.

use rusqlite::{Connection, Transaction, TransactionBehavior};

use super::apply::{BatchTx, BeginBatch};
use super::{ApplyError, Batch, BatchOutcome, Writer};
use crate::event::Event;
use crate::projection::{ConfiguredProjection, ProjectionError};
use crate::store::lifecycle::{self, HaltedEvent};
use crate::store::{self, Checkpoint, DeadLetter};

impl Writer {
    /// Applies a batch in one transaction; a rebuild's batch in its shadow's database. On error
    /// nothing is committed and no in-memory checkpoint moves.
    pub fn apply(&mut self, batch: &Batch) -> Result<BatchOutcome, ApplyError> {
        let shadow = self.shadow_of(batch);
        // A rebuild's poison events are its own, not the live projections'.
        let outcome = match shadow {
            Some(index) => {
                let shadow = &mut self.shadows[index];
                self.members
                    .apply(&mut shadow.conn, batch, &shadow.member.clone())?
            }
            None => {
                let outcome = self.members.apply(&mut self.conn, batch, &batch.feed)?;
                self.wal.keep_bounded(&self.conn);
                outcome
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
        let Some(&live) = self.members.by_name.get(&shadow.projection) else {
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
        let source = self.members.slots[live].projection.definition.clone();
        let started = std::time::Instant::now();
        match shadow.swap_into(&mut self.conn, &source) {
            Ok(false) => {}
            Ok(true) => {
                let shadow = self.shadows.remove(index);
                self.members.swapped_in(
                    &shadow.projection,
                    &shadow.member,
                    &shadow.version,
                    started.elapsed(),
                );
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
}

impl BeginBatch for Connection {
    type Tx<'c> = SqliteTx<'c>;

    /// Takes the write lock at once: the checkpoints read are then the ones committed.
    fn begin(&mut self) -> Result<SqliteTx<'_>, ApplyError> {
        self.transaction_with_behavior(TransactionBehavior::Immediate)
            .map(SqliteTx)
            .map_err(ApplyError::storage)
    }
}

/// A batch's transaction on SQLite.
pub(super) struct SqliteTx<'c>(Transaction<'c>);

impl BatchTx for SqliteTx<'_> {
    fn checkpoint(&mut self, projection: &str) -> Result<Checkpoint, ApplyError> {
        store::load_checkpoint(&self.0, projection)
            .map(Option::unwrap_or_default)
            .map_err(ApplyError::storage)
    }

    fn save_checkpoint(
        &mut self,
        projection: &str,
        feed: &str,
        checkpoint: &Checkpoint,
    ) -> Result<(), ApplyError> {
        store::save_checkpoint(&self.0, projection, feed, checkpoint).map_err(ApplyError::storage)
    }

    fn record_halt(&mut self, projection: &str, event: &HaltedEvent) -> Result<(), ApplyError> {
        lifecycle::record_halt(&self.0, projection, event).map_err(ApplyError::storage)
    }

    fn parked_behind(
        &mut self,
        projection: &str,
        aggregate: &str,
    ) -> Result<Option<i64>, ApplyError> {
        store::dead_letters::parked_behind(&self.0, projection, aggregate)
            .map_err(ApplyError::storage)
    }

    fn insert_dead_letter(&mut self, letter: &DeadLetter) -> Result<(), ApplyError> {
        store::insert_dead_letter(&self.0, letter).map_err(ApplyError::storage)
    }

    fn apply(
        &mut self,
        projection: &ConfiguredProjection,
        event: &Event,
    ) -> Result<Result<(), ProjectionError>, ApplyError> {
        match projection.projection.apply(&self.0, event) {
            // SQLite may already have rolled the whole transaction back (a full disk, an I/O
            // error): the batch fails as a whole, with this error.
            Err(ProjectionError::Sql(err)) if store::is_storage_failure(&err) => {
                Err(ApplyError::storage(err))
            }
            result => Ok(result),
        }
    }

    fn run(&mut self, sql: &str) -> Result<(), ApplyError> {
        self.0
            .prepare_cached(sql)
            .and_then(|mut statement| statement.execute([]))
            .map(drop)
            .map_err(ApplyError::storage)
    }

    fn commit(self) -> Result<(), ApplyError> {
        self.0.commit().map_err(ApplyError::storage)
    }
}
