//! The changes an operator makes to a projection's record in the database: start or cancel a
//! rebuild, skip the event it halted on, reset its checkpoint. The daemon makes them with its
//! readers stopped (`Supervisor::restart`); with no daemon running, the command makes them
//! itself, holding the instance lock.

use std::path::Path;

use anyhow::Context;
use rusqlite::{Connection, TransactionBehavior};

use crate::config::Synchronous;
use crate::projection::ConfiguredProjection;
use crate::store::{self, lifecycle};

fn open(database: &Path) -> anyhow::Result<Connection> {
    store::open_writer(database, Synchronous::Normal)
        .with_context(|| format!("opening database {}", database.display()))
}

/// Records a rebuild of `projection` from offset 0, unless one is in progress.
pub fn begin_rebuild(database: &Path, projection: &ConfiguredProjection) -> anyhow::Result<String> {
    let name = &projection.name;
    let conn = open(database)?;
    if let Some(rebuild) = lifecycle::rebuilds(&conn)?
        .into_iter()
        .find(|r| r.projection == *name)
    {
        return Ok(format!(
            "{name} is being rebuilt already (since {}; {}): `projector projections` shows how far it is",
            rebuild.started_at, rebuild.reason
        ));
    }
    lifecycle::remove_shadow(&lifecycle::shadow_path(database, name))?;
    lifecycle::start_rebuild(
        &conn,
        name,
        &projection.feed,
        &projection.version,
        lifecycle::ASKED,
    )?;
    Ok(format!(
        "rebuilding {name} from the feed's start; its current tables are served and kept current until the rebuild replaces them (`projector projections` shows its progress)"
    ))
}

/// Drops `projection`'s rebuild in progress and its shadow; the live tables stay as they are.
pub fn cancel_rebuild(
    database: &Path,
    projection: &ConfiguredProjection,
) -> anyhow::Result<String> {
    let name = &projection.name;
    let conn = open(database)?;
    if !lifecycle::rebuilds(&conn)?
        .iter()
        .any(|r| r.projection == *name)
    {
        anyhow::bail!("{name} is not being rebuilt");
    }
    if let Some(recorded) = lifecycle::recorded_definition(&conn, name)? {
        if recorded.version != projection.version {
            anyhow::bail!(
                "{name}'s definition changed since its tables were built (version {}, now {}): its rebuild is how the new definition takes over, so it cannot be cancelled; to keep the old tables, put the previous definition back and reload, which drops the rebuild",
                recorded.version,
                projection.version
            );
        }
    }
    lifecycle::end_rebuild(&conn, name)?;
    lifecycle::remove_shadow(&lifecycle::shadow_path(database, name))?;
    Ok(format!(
        "the rebuild of {name} is cancelled and its shadow dropped; its tables are as they were"
    ))
}

/// Moves the event `projection` halted on into the dead letters, and its checkpoint past it.
pub fn skip_halted_event(database: &Path, projection: &str) -> anyhow::Result<String> {
    let mut conn = open(database)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let Some(halted) = lifecycle::halted_event(&tx, projection)? else {
        anyhow::bail!("{projection} is not halted: there is no event to skip");
    };
    let checkpoint = store::load_checkpoint(&tx, projection)?.unwrap_or_default();
    let feed = feed_of(&tx, projection)?;
    let skip =
        lifecycle::Skip::of(projection, &feed, &halted, checkpoint).map_err(anyhow::Error::msg)?;
    store::insert_dead_letter(&tx, &skip.letter)?;
    let letter = tx.last_insert_rowid();
    store::save_checkpoint(&tx, projection, &feed, &skip.past)?;
    tx.commit()?;
    Ok(skip.said(letter))
}

/// Moves `projection`'s checkpoint to `offset`: the events from there are applied again (or,
/// past the checkpoint, never). Its tables and dead letters are left as they are.
pub fn reset_checkpoint(database: &Path, projection: &str, offset: u64) -> anyhow::Result<String> {
    let mut conn = open(database)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let Some(checkpoint) = store::load_checkpoint(&tx, projection)? else {
        anyhow::bail!("the database has no projection {projection:?}");
    };
    if lifecycle::rebuilds(&tx)?
        .iter()
        .any(|r| r.projection == projection)
    {
        anyhow::bail!(
            "{projection} is being rebuilt: cancel the rebuild first (`projector rebuild {projection} --cancel`)"
        );
    }
    let feed = feed_of(&tx, projection)?;
    store::save_checkpoint(
        &tx,
        projection,
        &feed,
        &lifecycle::reset_to(&checkpoint, offset),
    )?;
    tx.commit()?;
    Ok(format!(
        "{projection}'s checkpoint moved from offset {} to {offset}",
        checkpoint.next_offset
    ))
}

/// The feed `projection`'s checkpoint is of.
fn feed_of(conn: &Connection, projection: &str) -> rusqlite::Result<String> {
    conn.query_row(
        "SELECT feed FROM projector_checkpoints WHERE projection = ?1",
        [projection],
        |row| row.get(0),
    )
}
