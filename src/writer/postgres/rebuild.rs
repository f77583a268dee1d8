//! Rebuilds on PostgreSQL: the shadow's tables are built in a schema of their own, beside the
//! live ones, and once caught up moved into the daemon's schema in their place, in one
//! transaction. The rebuilds are recorded in the store; every daemon follows them, and the one
//! holding the feed builds it.

use anyhow::Context;
use postgres::Client;

use super::batch::InSchema;
use super::PostgresWriter;
use crate::projection::{ConfiguredProjection, PostgresTx};
use crate::store::lifecycle::{Definition, SchemaObject};
use crate::store::postgres::{self as pg, StatementCache};
use crate::store::Checkpoint;
use crate::writer::shadow::shadow_member;
use crate::writer::{ApplyError, Batch, BatchOutcome, SlotState};

/// A rebuild in progress: its tables are in a schema of their own.
pub(super) struct PostgresShadow {
    /// The live projection's name.
    pub projection: String,
    pub member: String,
    /// The definition it is built by.
    pub version: String,
    pub schema: String,
}

impl PostgresWriter {
    /// The rebuild whose shadow `batch` is for, if it is for one (a shadow is read alone, so a
    /// batch is all live or all one shadow's).
    pub(super) fn shadow_of(&self, batch: &Batch) -> Option<usize> {
        self.shadows
            .iter()
            .position(|shadow| batch.projections.contains(&shadow.member))
    }

    /// Applies a batch of rebuild `index`'s shadow, in its schema; swaps it in once caught up.
    pub(super) fn apply_to_shadow(
        &mut self,
        index: usize,
        batch: &Batch,
    ) -> Result<BatchOutcome, ApplyError> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(ApplyError::LeaseLost(batch.feed.clone()));
        };
        let shadow = &self.shadows[index];
        let mut in_shadow = InSchema {
            conn,
            search_path: format!("{}, {}", pg::quoted(&shadow.schema), self.store.schema),
        };
        let outcome = self.members.apply(&mut in_shadow, batch, &shadow.member)?;
        self.finish_rebuild_if_caught_up(index);
        Ok(outcome)
    }

    /// Builds the rebuilds recorded (by any daemon) whose definition is this daemon's, and
    /// forgets those no longer recorded (swapped in or cancelled, here or by another daemon);
    /// says so to the feeds' readers when anything changed, or an operator changed a
    /// checkpoint (through any daemon).
    pub(super) fn follow_changes(&mut self) -> Result<(), ApplyError> {
        let schema = self.store.schema.clone();
        let conn = self.connection()?;
        let recorded = pg::rebuilds(&mut conn.client).map_err(ApplyError::postgres)?;
        let changes = pg::changes(&mut conn.client).map_err(ApplyError::postgres)?;
        let mut changed = changes != self.changes_seen;
        self.changes_seen = changes;
        let mut index = 0;
        while index < self.shadows.len() {
            let shadow = &self.shadows[index];
            if recorded
                .iter()
                .any(|r| r.projection == shadow.projection && r.version == shadow.version)
            {
                index += 1;
                continue;
            }
            let shadow = self.shadows.remove(index);
            self.members.set_state(&shadow.member, SlotState::Retired);
            let built: Option<Definition> =
                pg::recorded_definition(&mut self.connection()?.client, &shadow.projection)
                    .map_err(ApplyError::postgres)?;
            if built.is_some_and(|built| built.version == shadow.version) {
                // Another daemon swapped it in: the definition configured here is the live one.
                self.members
                    .set_state(&shadow.projection, SlotState::Running);
            }
            changed = true;
        }
        for rebuild in recorded {
            let Some(&live) = self.members.by_name.get(&rebuild.projection) else {
                continue;
            };
            let projection = self.members.slots[live].projection.clone();
            if projection.version != rebuild.version
                || self.shadows.iter().any(|s| s.projection == projection.name)
            {
                continue;
            }
            let conn = self.connection()?;
            let mut tx = conn.client.transaction().map_err(ApplyError::postgres)?;
            pg::lock_setup(&mut tx, &schema).map_err(ApplyError::postgres)?;
            let shadow = begin_shadow(&mut tx, &mut conn.statements, &schema, &projection, false)
                .map_err(|err| ApplyError::Storage(format!("{err:#}")))?;
            tx.commit().map_err(ApplyError::postgres)?;
            tracing::info!(projection = %projection.name, "rebuilding from the feed's start, beside the live tables");
            self.members.set_state(&shadow.member, SlotState::Running);
            self.shadows.push(shadow);
            changed = true;
        }
        if changed {
            self.restart_readers.send_modify(|count| *count += 1);
        }
        Ok(())
    }

    /// Once the shadow of rebuild `index` has caught up with the live checkpoint, its tables
    /// replace the live ones. A failure is said and tried again after the shadow's next batch.
    pub(super) fn finish_rebuild_if_caught_up(&mut self, index: usize) {
        let schema = self.store.schema.clone();
        let shadow = &self.shadows[index];
        let source = self
            .members
            .by_name
            .get(&shadow.projection)
            .map(|&slot| self.members.slots[slot].projection.definition.clone())
            .unwrap_or_default();
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let started = std::time::Instant::now();
        match swap(&mut conn.client, &schema, shadow, &source) {
            Ok(false) => {}
            Ok(true) => {
                let shadow = self.shadows.remove(index);
                self.members.swapped_in(
                    &shadow.projection,
                    &shadow.member,
                    &shadow.version,
                    started.elapsed(),
                );
                self.restart_readers.send_modify(|count| *count += 1);
            }
            Err(err) => tracing::error!(
                projection = %shadow.projection,
                "the rebuild caught up but could not replace the live tables (tried again after its next batch): {err:#}"
            ),
        }
    }
}

/// `projection`'s checkpoint, made at the feed's start if it has none.
pub(super) fn ensure_checkpoint(
    tx: &mut postgres::Transaction,
    statements: &mut StatementCache,
    projection: &str,
    feed: &str,
) -> anyhow::Result<Checkpoint> {
    Ok(match pg::lock_checkpoint(tx, statements, projection)? {
        Some(checkpoint) => checkpoint,
        None => {
            let fresh = Checkpoint::default();
            pg::save_checkpoint(tx, statements, projection, feed, &fresh)?;
            fresh
        }
    })
}

/// The objects `projection`'s setup makes, found by running it in a scratch schema that is
/// rolled back.
pub(super) fn definition_objects(
    tx: &mut postgres::Transaction,
    statements: &mut StatementCache,
    projection: &ConfiguredProjection,
) -> anyhow::Result<Vec<SchemaObject>> {
    tx.batch_execute(
        "SAVEPOINT projector_scratch;
         CREATE SCHEMA projector_scratch;
         SET LOCAL search_path TO projector_scratch",
    )?;
    let made = projection
        .projection
        .setup_postgres(&mut PostgresTx::new(tx, statements))
        .map_err(|err| anyhow::anyhow!("{err}"))
        .and_then(|()| Ok(pg::objects_in(tx, "projector_scratch")?));
    tx.batch_execute(
        "ROLLBACK TO SAVEPOINT projector_scratch; RELEASE SAVEPOINT projector_scratch",
    )?;
    // Statements prepared in the scratch schema are planned again where they run next.
    statements.clear();
    made
}

/// Sets up the shadow of `projection`'s rebuild: its schema and tables, and its checkpoint
/// (at the feed's start when `fresh`, or left where it is).
pub(super) fn begin_shadow(
    tx: &mut postgres::Transaction,
    statements: &mut StatementCache,
    schema: &str,
    projection: &ConfiguredProjection,
    fresh: bool,
) -> anyhow::Result<PostgresShadow> {
    let shadow = PostgresShadow {
        projection: projection.name.clone(),
        member: shadow_member(&projection.name),
        version: projection.version.clone(),
        schema: pg::shadow_schema(schema, &projection.name),
    };
    if fresh {
        pg::drop_shadow(tx, &shadow.schema, &shadow.member)?;
    }
    let quoted = pg::quoted(&shadow.schema);
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {quoted}; SET LOCAL search_path TO {quoted}, {schema}"
    ))?;
    projection
        .projection
        .setup_postgres(&mut PostgresTx::new(tx, statements))
        .map_err(|err| anyhow::anyhow!("{err}"))
        .with_context(|| format!("setting up projection {:?} to rebuild it", projection.name))?;
    tx.batch_execute(&format!("SET LOCAL search_path TO {schema}"))?;
    ensure_checkpoint(tx, statements, &shadow.member, &projection.feed)?;
    Ok(shadow)
}

/// Replaces the live projection's objects with the shadow's (moved into the live schema), moves
/// its checkpoint and dead letters to the shadow's and ends the rebuild, in one transaction; or
/// does nothing if the shadow is behind the live checkpoint. True if it swapped.
pub(super) fn swap(
    client: &mut Client,
    schema: &str,
    shadow: &PostgresShadow,
    source: &str,
) -> anyhow::Result<bool> {
    let mut statements = StatementCache::new();
    let mut tx = client.transaction()?;
    let live =
        pg::lock_checkpoint(&mut tx, &mut statements, &shadow.projection)?.unwrap_or_default();
    let rebuilt =
        pg::lock_checkpoint(&mut tx, &mut statements, &shadow.member)?.unwrap_or_default();
    if rebuilt.next_offset < live.next_offset {
        return Ok(false);
    }
    let feed: String = tx
        .query_one(
            "SELECT feed FROM projector_checkpoints WHERE projection = $1",
            &[&shadow.projection],
        )?
        .get(0);
    let old = pg::recorded_definition(&mut tx, &shadow.projection)?
        .map(|definition| definition.objects)
        .unwrap_or_default();
    let new = pg::objects_in(&mut tx, &shadow.schema)?;
    // Out with the live objects, the old definition's and any the new one would collide with:
    // views first, then tables (taking their indexes and own sequences).
    let live_objects = pg::objects_in(&mut tx, schema)?;
    for rank in ["view", "materialized view", "table", "sequence"] {
        for object in live_objects.iter().filter(|o| {
            o.kind == rank && old.iter().chain(&new).any(|doomed| doomed.name == o.name)
        }) {
            tx.batch_execute(&format!(
                "DROP {} IF EXISTS {schema}.{}",
                rank.to_uppercase(),
                pg::quoted(&object.name)
            ))?;
        }
    }
    let shadow_schema = pg::quoted(&shadow.schema);
    for object in &new {
        tx.batch_execute(&format!(
            "ALTER {} {shadow_schema}.{} SET SCHEMA {schema}",
            object.kind.to_uppercase(),
            pg::quoted(&object.name)
        ))?;
    }
    // The rebuild's dead letters are the projection's now; the old model's are moot.
    tx.execute(
        "DELETE FROM projector_dead_letters WHERE projection = $1",
        &[&shadow.projection],
    )?;
    tx.execute(
        "UPDATE projector_dead_letters SET projection = $1 WHERE projection = $2",
        &[&shadow.projection, &shadow.member],
    )?;
    pg::save_checkpoint(
        &mut tx,
        &mut statements,
        &shadow.projection,
        &feed,
        &rebuilt,
    )?;
    pg::record_definition(
        &mut tx,
        &shadow.projection,
        &Definition {
            version: shadow.version.clone(),
            source: source.to_string(),
            objects: new,
        },
    )?;
    pg::end_rebuild(&mut tx, &shadow.projection)?;
    pg::drop_shadow(&mut tx, &shadow.schema, &shadow.member)?;
    pg::count_change(&mut tx)?;
    tx.commit()?;
    Ok(true)
}
