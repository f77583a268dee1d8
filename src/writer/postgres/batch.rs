//! A batch's transaction on PostgreSQL, on the writer's connection: in the daemon's schema, or
//! in a rebuild's shadow's (its `search_path` set for the transaction).

use super::Connection;
use crate::event::Event;
use crate::projection::{ConfiguredProjection, PostgresTx, ProjectionError};
use crate::store::lifecycle::HaltedEvent;
use crate::store::postgres::{self as pg, StatementCache};
use crate::store::{Checkpoint, DeadLetter};
use crate::writer::apply::{BatchTx, BeginBatch};
use crate::writer::ApplyError;

impl BeginBatch for Connection {
    type Tx<'c> = PostgresBatch<'c>;

    fn begin(&mut self) -> Result<PostgresBatch<'_>, ApplyError> {
        Ok(PostgresBatch {
            tx: self.client.transaction().map_err(ApplyError::postgres)?,
            statements: &mut self.statements,
        })
    }
}

/// A batch's transaction on PostgreSQL.
pub(super) struct PostgresBatch<'c> {
    tx: postgres::Transaction<'c>,
    statements: &'c mut StatementCache,
}

impl BatchTx for PostgresBatch<'_> {
    fn checkpoint(&mut self, projection: &str) -> Result<Checkpoint, ApplyError> {
        pg::lock_checkpoint(&mut self.tx, self.statements, projection)
            .map(Option::unwrap_or_default)
            .map_err(ApplyError::postgres)
    }

    fn save_checkpoint(
        &mut self,
        projection: &str,
        feed: &str,
        checkpoint: &Checkpoint,
    ) -> Result<(), ApplyError> {
        pg::save_checkpoint(&mut self.tx, self.statements, projection, feed, checkpoint)
            .map_err(ApplyError::postgres)
    }

    fn record_halt(&mut self, projection: &str, event: &HaltedEvent) -> Result<(), ApplyError> {
        pg::record_halt(&mut self.tx, projection, event).map_err(ApplyError::postgres)
    }

    fn parked_behind(
        &mut self,
        projection: &str,
        aggregate: &str,
    ) -> Result<Option<i64>, ApplyError> {
        pg::parked_behind(&mut self.tx, self.statements, projection, aggregate)
            .map_err(ApplyError::postgres)
    }

    fn insert_dead_letter(&mut self, letter: &DeadLetter) -> Result<(), ApplyError> {
        pg::insert_dead_letter(&mut self.tx, letter)
            .map(drop)
            .map_err(ApplyError::postgres)
    }

    fn apply(
        &mut self,
        projection: &ConfiguredProjection,
        event: &Event,
    ) -> Result<Result<(), ProjectionError>, ApplyError> {
        let mut writes = PostgresTx::new(&mut self.tx, self.statements);
        match projection.projection.apply_postgres(&mut writes, event) {
            Err(ProjectionError::Postgres(err)) if pg::is_storage_failure(&err) => {
                Err(ApplyError::postgres(err))
            }
            result => Ok(result),
        }
    }

    fn run(&mut self, sql: &str) -> Result<(), ApplyError> {
        self.tx.batch_execute(sql).map_err(ApplyError::postgres)
    }

    fn commit(self) -> Result<(), ApplyError> {
        self.tx.commit().map_err(ApplyError::postgres)
    }
}

/// A store's connection whose batches run with another `search_path`: a rebuild's shadow's.
pub(super) struct InSchema<'a> {
    pub(super) conn: &'a mut Connection,
    pub(super) search_path: String,
}

impl BeginBatch for InSchema<'_> {
    type Tx<'c>
        = PostgresBatch<'c>
    where
        Self: 'c;

    fn begin(&mut self) -> Result<PostgresBatch<'_>, ApplyError> {
        let mut tx = self
            .conn
            .client
            .transaction()
            .map_err(ApplyError::postgres)?;
        tx.batch_execute(&format!("SET LOCAL search_path TO {}", self.search_path))
            .map_err(ApplyError::postgres)?;
        Ok(PostgresBatch {
            tx,
            statements: &mut self.conn.statements,
        })
    }
}
