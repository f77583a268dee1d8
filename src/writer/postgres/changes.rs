//! The changes an operator makes to a projection through any daemon on PostgreSQL: begin or
//! cancel its rebuild, skip the event it halted on, reset its checkpoint. Each is made in one
//! transaction of the store and counted there, so that every daemon reads again from the
//! checkpoints.

use crate::projection::ConfiguredProjection;
use crate::store::lifecycle;
use crate::store::postgres::{self as pg, StatementCache};
use crate::writer::shadow::shadow_member;

/// Begins `projection`'s rebuild, or cancels it: what was done, or (the inner error) why not.
pub(super) fn change_rebuild(
    tx: &mut postgres::Transaction,
    schema: &str,
    projection: &ConfiguredProjection,
    cancel: bool,
) -> Result<Result<String, String>, postgres::Error> {
    let name = &projection.name;
    let rebuild = pg::rebuilds(tx)?
        .into_iter()
        .find(|r| r.projection == *name);
    if !cancel {
        if let Some(rebuild) = rebuild {
            return Ok(Ok(format!(
                "{name} is being rebuilt already (since {}; {}): `projector ctl status` shows how far it is",
                rebuild.started_at, rebuild.reason
            )));
        }
        pg::start_rebuild(
            tx,
            name,
            &projection.feed,
            &projection.version,
            lifecycle::ASKED,
        )?;
        return Ok(Ok(format!(
            "rebuilding {name} from the feed's start; its current tables are served and kept current until the rebuild replaces them (`projector ctl status` shows its progress)"
        )));
    }
    if rebuild.is_none() {
        return Ok(Err(format!("{name} is not being rebuilt")));
    }
    if let Some(recorded) = pg::recorded_definition(tx, name)? {
        if recorded.version != projection.version {
            return Ok(Err(format!(
                "{name}'s definition changed since its tables were built (version {}, now {}): its rebuild is how the new definition takes over, so it cannot be cancelled; to keep the old tables, put the previous definition back and restart the daemons, which drops the rebuild",
                recorded.version, projection.version
            )));
        }
    }
    pg::end_rebuild(tx, name)?;
    pg::drop_shadow(tx, &pg::shadow_schema(schema, name), &shadow_member(name))?;
    Ok(Ok(format!(
        "the rebuild of {name} is cancelled and its shadow dropped; its tables are as they were"
    )))
}

/// Moves the event `projection` halted on into the dead letters, and its checkpoint past it.
pub(super) fn skip_halted_event(
    tx: &mut postgres::Transaction,
    statements: &mut StatementCache,
    projection: &str,
) -> Result<Result<String, String>, postgres::Error> {
    let Some(halted) = pg::halted_event(tx, projection)? else {
        return Ok(Err(format!(
            "{projection} is not halted: there is no event to skip"
        )));
    };
    let checkpoint = pg::lock_checkpoint(tx, statements, projection)?.unwrap_or_default();
    let feed = pg::feed_of(tx, projection)?.unwrap_or_default();
    let skip = match lifecycle::Skip::of(projection, &feed, &halted, checkpoint) {
        Ok(skip) => skip,
        Err(refused) => return Ok(Err(refused)),
    };
    let letter = pg::insert_dead_letter(tx, &skip.letter)?;
    pg::save_checkpoint(tx, statements, projection, &feed, &skip.past)?;
    Ok(Ok(skip.said(letter)))
}

/// Moves `projection`'s checkpoint to `offset`; its tables and dead letters are left as they are.
pub(super) fn reset_checkpoint(
    tx: &mut postgres::Transaction,
    statements: &mut StatementCache,
    projection: &str,
    offset: u64,
) -> Result<Result<String, String>, postgres::Error> {
    let Some(checkpoint) = pg::lock_checkpoint(tx, statements, projection)? else {
        return Ok(Err(format!("the schema has no projection {projection:?}")));
    };
    if pg::rebuilds(tx)?.iter().any(|r| r.projection == projection) {
        return Ok(Err(format!(
            "{projection} is being rebuilt: cancel the rebuild first (`projector rebuild {projection} --cancel`)"
        )));
    }
    let feed = pg::feed_of(tx, projection)?.unwrap_or_default();
    let reset = lifecycle::reset_to(&checkpoint, offset);
    pg::save_checkpoint(tx, statements, projection, &feed, &reset)?;
    Ok(Ok(format!(
        "{projection}'s checkpoint moved from offset {} to {offset}",
        checkpoint.next_offset
    )))
}
