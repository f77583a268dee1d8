//! What the store records of rebuilds on PostgreSQL: the rebuilds in progress, the schema each
//! builds its shadow in and the objects there, and the count of operators' changes every daemon
//! follows.

use postgres::GenericClient;

use crate::store::lifecycle::{Rebuild, SchemaObject};

/// The rebuilds in progress, by projection.
pub fn rebuilds(client: &mut impl GenericClient) -> Result<Vec<Rebuild>, postgres::Error> {
    let rows = client.query(
        "SELECT projection, feed, definition_version, reason, started_at::text
         FROM projector_rebuilds ORDER BY projection",
        &[],
    )?;
    Ok(rows
        .iter()
        .map(|row| Rebuild {
            projection: row.get(0),
            feed: row.get(1),
            version: row.get(2),
            reason: row.get(3),
            started_at: row.get(4),
        })
        .collect())
}

/// Records a rebuild as started (replacing one of the projection that was in progress).
pub fn start_rebuild(
    client: &mut impl GenericClient,
    projection: &str,
    feed: &str,
    version: &str,
    reason: &str,
) -> Result<(), postgres::Error> {
    client.execute(
        "INSERT INTO projector_rebuilds (projection, feed, definition_version, reason)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (projection) DO UPDATE SET
             feed = excluded.feed, definition_version = excluded.definition_version,
             reason = excluded.reason, started_at = now()",
        &[&projection, &feed, &version, &reason],
    )?;
    Ok(())
}

pub fn end_rebuild(
    client: &mut impl GenericClient,
    projection: &str,
) -> Result<(), postgres::Error> {
    client.execute(
        "DELETE FROM projector_rebuilds WHERE projection = $1",
        &[&projection],
    )?;
    Ok(())
}

/// Forgets a rebuild's shadow: its checkpoint and dead letters, and its schema with its tables.
pub fn drop_shadow(
    client: &mut impl GenericClient,
    shadow_schema: &str,
    member: &str,
) -> Result<(), postgres::Error> {
    client.execute(
        "DELETE FROM projector_checkpoints WHERE projection = $1",
        &[&member],
    )?;
    client.execute(
        "DELETE FROM projector_dead_letters WHERE projection = $1",
        &[&member],
    )?;
    client.batch_execute(&format!(
        "DROP SCHEMA IF EXISTS {} CASCADE",
        quoted(shadow_schema)
    ))
}

/// The schema a rebuild of `projection` builds its tables in, beside the daemon's `schema`
/// (at most 40 characters, so this is at most 61): named by a hash of the projection's name,
/// which may be longer than a PostgreSQL name or hold characters it would quote.
pub fn shadow_schema(schema: &str, projection: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(projection);
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("{schema}_rebuild_{hex}")
}

/// The tables, views and sequences of `schema` that are not Projector's own, tables first
/// (their indexes, constraints and own sequences go with them).
pub fn objects_in(
    client: &mut impl GenericClient,
    schema: &str,
) -> Result<Vec<SchemaObject>, postgres::Error> {
    let rows = client.query(
        "SELECT CASE c.relkind WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view'
                    WHEN 'S' THEN 'sequence' ELSE 'table' END, c.relname::text
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
           AND c.relname NOT LIKE 'projector\\_%'
           AND NOT EXISTS (SELECT 1 FROM pg_depend d
                           WHERE d.objid = c.oid AND d.deptype IN ('a', 'i'))
           AND NOT c.relispartition
         ORDER BY c.relkind NOT IN ('r', 'p'), c.oid",
        &[&schema],
    )?;
    Ok(rows
        .iter()
        .map(|row| SchemaObject {
            kind: row.get(0),
            name: row.get(1),
        })
        .collect())
}

/// A PostgreSQL name, quoted.
pub fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Counts an operator's change, for every daemon to see at its next round.
pub fn count_change(client: &mut impl GenericClient) -> Result<(), postgres::Error> {
    client.execute(
        "UPDATE projector_changes SET generation = generation + 1 WHERE id = 1",
        &[],
    )?;
    Ok(())
}

/// How many changes operators have made.
pub fn changes(client: &mut impl GenericClient) -> Result<i64, postgres::Error> {
    Ok(client
        .query_one("SELECT generation FROM projector_changes WHERE id = 1", &[])?
        .get(0))
}
