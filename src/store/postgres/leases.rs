//! The leases by which several daemons share a schema's feeds: session-level advisory locks on
//! each daemon's writer connection, with a table saying who took which, and the daemons whose
//! sessions are alive.

use std::collections::BTreeMap;

use postgres::Client;

/// The advisory lock key of `feed`'s lease in `schema`.
const LEASE_KEY: &str = "hashtext('projector lease ' || $1), hashtext($2)";

/// Records this connection as daemon `id`'s, forgetting daemons whose sessions have ended.
pub fn register_daemon(client: &mut Client, id: &str) -> Result<(), postgres::Error> {
    client.batch_execute(
        "DELETE FROM projector_daemons d WHERE NOT EXISTS (
             SELECT 1 FROM pg_stat_activity a
             WHERE a.pid = d.backend_pid AND a.application_name = d.id)",
    )?;
    client.execute(
        "INSERT INTO projector_daemons (id, backend_pid) VALUES ($1, pg_backend_pid())
         ON CONFLICT (id) DO UPDATE SET backend_pid = excluded.backend_pid, started_at = now()",
        &[&id],
    )?;
    Ok(())
}

/// Takes `feed`'s lease for daemon `id` on this connection if no session holds it.
pub fn try_lease(
    client: &mut Client,
    schema: &str,
    feed: &str,
    id: &str,
) -> Result<bool, postgres::Error> {
    let taken: bool = client
        .query_one(
            &format!("SELECT pg_try_advisory_lock({LEASE_KEY})"),
            &[&schema, &feed],
        )?
        .get(0);
    if taken {
        client.execute(
            "INSERT INTO projector_leases (feed, holder, backend_pid)
             VALUES ($1, $2, pg_backend_pid())
             ON CONFLICT (feed) DO UPDATE SET
                 holder = excluded.holder, backend_pid = excluded.backend_pid, taken_at = now()",
            &[&feed, &id],
        )?;
    }
    Ok(taken)
}

/// Gives `feed`'s lease back.
pub fn release_lease(client: &mut Client, schema: &str, feed: &str) -> Result<(), postgres::Error> {
    client.execute(
        "DELETE FROM projector_leases WHERE feed = $1 AND backend_pid = pg_backend_pid()",
        &[&feed],
    )?;
    client.query_one(
        &format!("SELECT pg_advisory_unlock({LEASE_KEY})"),
        &[&schema, &feed],
    )?;
    Ok(())
}

/// The daemons sharing the schema whose sessions are alive, by id, with the feeds each holds.
pub fn cluster(client: &mut Client) -> Result<BTreeMap<String, Vec<String>>, postgres::Error> {
    let rows = client.query(
        "SELECT d.id, l.feed FROM projector_daemons d
         JOIN pg_stat_activity a ON a.pid = d.backend_pid AND a.application_name = d.id
         LEFT JOIN projector_leases l ON l.holder = d.id AND l.backend_pid = d.backend_pid
         ORDER BY d.id, l.feed",
        &[],
    )?;
    let mut daemons: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for row in rows {
        let feeds = daemons.entry(row.get(0)).or_default();
        if let Some(feed) = row.get::<_, Option<String>>(1) {
            feeds.push(feed);
        }
    }
    Ok(daemons)
}
