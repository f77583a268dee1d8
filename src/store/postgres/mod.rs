//! The PostgreSQL store: connecting (TLS with the system's roots), Projector's own tables in the
//! configured schema and their migrations, checkpoints, dead letters, pauses, and the leases by
//! which several daemons share the feeds.
//!
//! As on SQLite, a checkpoint is written in the transaction of the projection writes it covers,
//! and nothing here commits on its own. A lease is a session-level advisory lock held on the
//! writer's own connection: a daemon whose session ends (killed, or frozen past
//! `lease_timeout`, when the server ends its idle session) holds no lease and commits nothing.

mod leases;
mod rebuilds;

pub use leases::{cluster, register_daemon, release_lease, try_lease};
pub use rebuilds::{
    changes, count_change, drop_shadow, end_rebuild, objects_in, quoted, rebuilds, shadow_schema,
    start_rebuild,
};

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use postgres::{Client, GenericClient};

use super::lifecycle::{Definition, HaltedEvent};
use super::{offset_to_sql, Checkpoint, DeadLetter};
use crate::config::{PostgresStore, Synchronous};
use crate::event::PagePlace;

/// Projector's own tables, oldest first. Append only: `projector_migrations` records how many
/// of them a schema has run.
const MIGRATIONS: &[&str] = &[
    // 1: everything the SQLite store has after its fourth migration, and the daemons and
    // leases of several daemons sharing the schema.
    "CREATE TABLE projector_checkpoints (
        projection         TEXT PRIMARY KEY,
        feed               TEXT NOT NULL,
        next_offset        BIGINT NOT NULL,
        last_event_id      TEXT,
        page_cursor        TEXT,
        page_first_offset  BIGINT,
        updated_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
        definition_version TEXT,
        definition         TEXT,
        schema_objects     TEXT,
        halted_offset      BIGINT,
        halted_event_id    TEXT,
        halted_error       TEXT,
        halted_at          TIMESTAMPTZ,
        halted_event_type  TEXT,
        halted_payload     TEXT,
        halted_event_meta  TEXT
    );
    CREATE TABLE projector_dead_letters (
        id           BIGSERIAL PRIMARY KEY,
        projection   TEXT NOT NULL,
        feed         TEXT NOT NULL,
        event_offset BIGINT NOT NULL,
        event_id     TEXT NOT NULL,
        event_type   TEXT NOT NULL,
        payload      TEXT,
        error        TEXT NOT NULL,
        event_meta   TEXT,
        aggregate    TEXT,
        resolution   TEXT,
        resolved_at  TIMESTAMPTZ,
        recorded_at  TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE INDEX projector_dead_letters_by_projection
        ON projector_dead_letters (projection, event_offset);
    CREATE INDEX projector_dead_letters_parked
        ON projector_dead_letters (projection, aggregate) WHERE resolution IS NULL;
    CREATE TABLE projector_paused_feeds (
        feed      TEXT PRIMARY KEY,
        paused_at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE TABLE projector_rebuilds (
        projection         TEXT PRIMARY KEY,
        feed               TEXT NOT NULL,
        definition_version TEXT NOT NULL,
        reason             TEXT NOT NULL,
        started_at         TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE TABLE projector_daemons (
        id          TEXT PRIMARY KEY,
        backend_pid INTEGER NOT NULL,
        started_at  TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE TABLE projector_leases (
        feed        TEXT PRIMARY KEY,
        holder      TEXT NOT NULL,
        backend_pid INTEGER NOT NULL,
        taken_at    TIMESTAMPTZ NOT NULL DEFAULT now()
    );",
    // 2: a count of the operators' changes (a skip, a reset, a rebuild begun, cancelled or
    // swapped in), by which every daemon learns that its readers must start again.
    "CREATE TABLE projector_changes (
        id         INTEGER PRIMARY KEY CHECK (id = 1),
        generation BIGINT NOT NULL
    );
    INSERT INTO projector_changes VALUES (1, 0);",
];

/// A connection's prepared statements, by SQL text: a statement prepared once runs in one round
/// trip instead of two.
pub type StatementCache = std::collections::HashMap<String, postgres::Statement>;

/// How a connection is used: the writer's holds leases and must keep its session short-lived
/// when it stops answering; others (the CLI, tests) need not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Session {
    Writer,
    Plain,
}

/// Connects to the store, makes its schema and brings Projector's tables up to date, and sets
/// the connection's `search_path` to the schema. `name` is the connection's
/// `application_name`: the writer's is its daemon id, by which the others see it alive.
pub fn connect(store: &PostgresStore, name: &str, session: Session) -> anyhow::Result<Client> {
    let mut config: postgres::Config = store
        .url
        .parse()
        .context("[daemon] database is not a PostgreSQL URL")?;
    if let Some(password) = &store.password {
        let password = password
            .read()
            .map_err(|err| anyhow::anyhow!("[daemon] password: {err}"))?;
        config.password(password);
    }
    // An application_name is cut at 63 bytes by the server: the id must survive whole.
    config.application_name(name);
    config.connect_timeout(Duration::from_secs(10));
    config.keepalives(true);
    config.keepalives_idle((store.lease_timeout / 2).max(Duration::from_secs(1)));
    let mut client = config.connect(tls()?).map_err(|err| {
        let mut message = format!("connecting to PostgreSQL at {}: {err}", store.shown());
        if message.contains("invalid peer certificate") {
            message.push_str(" (the server's certificate must be signed by a certificate authority this machine trusts; on a network you trust, ?sslmode=disable in the URL turns TLS off)");
        }
        anyhow::anyhow!(message)
    })?;
    migrate(&mut client, &store.schema)
        .with_context(|| format!("setting up schema {} on PostgreSQL", store.schema))?;
    let mut settings = format!("SET search_path TO {}", store.schema);
    if session == Session::Writer {
        // The server ends the session of a writer that stops talking (frozen, cut off), which
        // frees its leases; a live writer talks at least every lease_timeout / 4.
        let millis = store.lease_timeout.as_millis();
        settings.push_str(&format!(
            "; SET idle_session_timeout = {millis}; SET idle_in_transaction_session_timeout = {millis}"
        ));
        // A daemon that dies while a statement runs must not leave it running, holding its
        // leases and checkpoints: the server checks the client is there while it works.
        settings.push_str(&format!(
            "; SET client_connection_check_interval = {}",
            (millis / 4).max(250)
        ));
        // As SQLite's NORMAL: a commit does not wait for the server's disk, so only a crash of
        // the server itself can drop the last commits, checkpoints with them (read again).
        if store.synchronous == Synchronous::Normal {
            settings.push_str("; SET synchronous_commit = off");
        }
    }
    client.batch_execute(&settings)?;
    Ok(client)
}

/// TLS when the URL's `sslmode` asks for it (`require`) or the server offers it (`prefer`, the
/// default), the server's certificate always verified against the system's roots (or the
/// built-in ones where the system has none); `sslmode=disable` for none.
pub fn tls() -> anyhow::Result<tokio_postgres_rustls::MakeRustlsConnect> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if roots.is_empty() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("setting up TLS")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Makes the schema and runs the migrations it has not run, one daemon at a time.
fn migrate(client: &mut Client, schema: &str) -> anyhow::Result<()> {
    let mut tx = client.transaction()?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('projector migrations'), hashtext($1))",
        &[&schema],
    )?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         SET LOCAL search_path TO {schema};
         CREATE TABLE IF NOT EXISTS projector_migrations (
             version    INTEGER PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         );"
    ))?;
    let ran: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM projector_migrations",
            &[],
        )?
        .get(0);
    let ran = usize::try_from(ran).unwrap_or(0);
    if ran > MIGRATIONS.len() {
        anyhow::bail!(
            "schema {schema} is at version {ran}, newer than this projector knows ({}); upgrade projector",
            MIGRATIONS.len()
        );
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(ran) {
        tx.batch_execute(migration)?;
        let version = i32::try_from(index + 1).unwrap_or(i32::MAX);
        tx.execute(
            "INSERT INTO projector_migrations (version) VALUES ($1)",
            &[&version],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// Serializes the daemons' setups of one schema (projection tables, definitions): two daemons
/// starting together would otherwise race at `CREATE TABLE IF NOT EXISTS`.
pub fn lock_setup(client: &mut impl GenericClient, schema: &str) -> Result<(), postgres::Error> {
    client.execute(
        "SELECT pg_advisory_xact_lock(hashtext('projector setup'), hashtext($1))",
        &[&schema],
    )?;
    Ok(())
}

/// `sql` prepared on this connection, once.
pub fn prepare_cached(
    client: &mut impl GenericClient,
    statements: &mut StatementCache,
    sql: &str,
) -> Result<postgres::Statement, postgres::Error> {
    if let Some(statement) = statements.get(sql) {
        return Ok(statement.clone());
    }
    let statement = client.prepare(sql)?;
    statements.insert(sql.to_string(), statement.clone());
    Ok(statement)
}

fn checkpoint_of(row: &postgres::Row) -> Checkpoint {
    let cursor: Option<String> = row.get(2);
    let first: Option<i64> = row.get(3);
    Checkpoint {
        next_offset: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
        last_event_id: row.get(1),
        page: cursor.zip(first).map(|(cursor, first)| PagePlace {
            cursor,
            first_offset: u64::try_from(first).unwrap_or(0),
        }),
    }
}

/// `projection`'s committed checkpoint, its row locked until the transaction ends: a second
/// writer waits here, then sees what the first committed.
pub fn lock_checkpoint(
    tx: &mut impl GenericClient,
    statements: &mut StatementCache,
    projection: &str,
) -> Result<Option<Checkpoint>, postgres::Error> {
    let statement = prepare_cached(
        tx,
        statements,
        "SELECT next_offset, last_event_id, page_cursor, page_first_offset
         FROM projector_checkpoints WHERE projection = $1 FOR UPDATE",
    )?;
    Ok(tx
        .query_opt(&statement, &[&projection])?
        .map(|row| checkpoint_of(&row)))
}

/// Every projection's checkpoint, by projection name.
pub fn read_checkpoints(
    client: &mut impl GenericClient,
) -> Result<Vec<(String, Checkpoint)>, postgres::Error> {
    let rows = client.query(
        "SELECT next_offset, last_event_id, page_cursor, page_first_offset, projection
         FROM projector_checkpoints ORDER BY projection",
        &[],
    )?;
    Ok(rows
        .iter()
        .map(|row| (row.get(4), checkpoint_of(row)))
        .collect())
}

pub fn save_checkpoint(
    tx: &mut impl GenericClient,
    statements: &mut StatementCache,
    projection: &str,
    feed: &str,
    checkpoint: &Checkpoint,
) -> Result<(), postgres::Error> {
    let statement = prepare_cached(
        tx,
        statements,
        "INSERT INTO projector_checkpoints
             (projection, feed, next_offset, last_event_id, page_cursor, page_first_offset,
              updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, now())
         ON CONFLICT (projection) DO UPDATE SET
             feed = excluded.feed, next_offset = excluded.next_offset,
             last_event_id = excluded.last_event_id, page_cursor = excluded.page_cursor,
             page_first_offset = excluded.page_first_offset, updated_at = excluded.updated_at,
             halted_offset = NULL, halted_event_id = NULL, halted_error = NULL, halted_at = NULL,
             halted_event_type = NULL, halted_payload = NULL, halted_event_meta = NULL",
    )?;
    let page = checkpoint.page.as_ref();
    tx.execute(
        &statement,
        &[
            &projection,
            &feed,
            &offset_to_sql(checkpoint.next_offset),
            &checkpoint.last_event_id,
            &page.map(|page| &page.cursor),
            &page.map(|page| offset_to_sql(page.first_offset)),
        ],
    )?;
    Ok(())
}

pub fn record_halt(
    tx: &mut impl GenericClient,
    projection: &str,
    event: &HaltedEvent,
) -> Result<(), postgres::Error> {
    tx.execute(
        "UPDATE projector_checkpoints
         SET halted_offset = $2, halted_event_id = $3, halted_error = $4, halted_at = now(),
             halted_event_type = $5, halted_payload = $6, halted_event_meta = $7
         WHERE projection = $1",
        &[
            &projection,
            &offset_to_sql(event.offset),
            &event.event_id,
            &event.error,
            &event.event_type,
            &event.payload,
            &event.event_meta,
        ],
    )?;
    Ok(())
}

/// The first unresolved dead letter of `aggregate` that `projection` parked, if any.
pub fn parked_behind(
    tx: &mut impl GenericClient,
    statements: &mut StatementCache,
    projection: &str,
    aggregate: &str,
) -> Result<Option<i64>, postgres::Error> {
    let statement = prepare_cached(
        tx,
        statements,
        "SELECT min(id) FROM projector_dead_letters
         WHERE projection = $1 AND aggregate = $2 AND resolution IS NULL",
    )?;
    Ok(tx.query_one(&statement, &[&projection, &aggregate])?.get(0))
}

/// Records `letter`; returns its id.
pub fn insert_dead_letter(
    tx: &mut impl GenericClient,
    letter: &DeadLetter,
) -> Result<i64, postgres::Error> {
    let row = tx.query_one(
        "INSERT INTO projector_dead_letters
             (projection, feed, event_offset, event_id, event_type, payload, error, event_meta,
              aggregate)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         RETURNING id",
        &[
            &letter.projection,
            &letter.feed,
            &offset_to_sql(letter.event_offset),
            &letter.event_id,
            &letter.event_type,
            &letter.payload,
            &letter.error,
            &letter.event_meta,
            &letter.parks,
        ],
    )?;
    Ok(row.get(0))
}

/// The event `projection` is halted on, if it is halted.
pub fn halted_event(
    client: &mut impl GenericClient,
    projection: &str,
) -> Result<Option<HaltedEvent>, postgres::Error> {
    let row = client.query_opt(
        "SELECT halted_offset, halted_event_id, halted_event_type, halted_payload,
                halted_event_meta, halted_error
         FROM projector_checkpoints WHERE projection = $1 AND halted_offset IS NOT NULL",
        &[&projection],
    )?;
    Ok(row.map(|row| HaltedEvent {
        offset: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
        event_id: row.get::<_, Option<String>>(1).unwrap_or_default(),
        event_type: row.get::<_, Option<String>>(2).unwrap_or_default(),
        payload: row.get(3),
        event_meta: row.get::<_, Option<String>>(4).unwrap_or_default(),
        error: row.get::<_, Option<String>>(5).unwrap_or_default(),
    }))
}

/// The feed `projection`'s checkpoint is of, if it has one.
pub fn feed_of(
    client: &mut impl GenericClient,
    projection: &str,
) -> Result<Option<String>, postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT feed FROM projector_checkpoints WHERE projection = $1",
            &[&projection],
        )?
        .map(|row| row.get(0)))
}

/// How many dead letters of `projection` wait for an operator.
pub fn count_dead_letters(
    client: &mut impl GenericClient,
    projection: &str,
) -> Result<u64, postgres::Error> {
    let count: i64 = client
        .query_one(
            "SELECT count(*) FROM projector_dead_letters
             WHERE projection = $1 AND resolution IS NULL",
            &[&projection],
        )?
        .get(0);
    Ok(u64::try_from(count).unwrap_or(0))
}

/// Records `feed` as paused or resumed, for every daemon of the schema.
pub fn set_paused(
    tx: &mut impl GenericClient,
    feed: &str,
    paused: bool,
) -> Result<(), postgres::Error> {
    if paused {
        tx.execute(
            "INSERT INTO projector_paused_feeds (feed) VALUES ($1) ON CONFLICT (feed) DO NOTHING",
            &[&feed],
        )?;
    } else {
        tx.execute(
            "DELETE FROM projector_paused_feeds WHERE feed = $1",
            &[&feed],
        )?;
    }
    Ok(())
}

pub fn paused_feeds(client: &mut impl GenericClient) -> Result<BTreeSet<String>, postgres::Error> {
    let rows = client.query("SELECT feed FROM projector_paused_feeds", &[])?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// The definition recorded for `projection`, as [`super::lifecycle::recorded_definition`].
pub fn recorded_definition(
    client: &mut impl GenericClient,
    projection: &str,
) -> Result<Option<Definition>, postgres::Error> {
    let row = client.query_opt(
        "SELECT definition_version, definition, schema_objects FROM projector_checkpoints
         WHERE projection = $1",
        &[&projection],
    )?;
    Ok(row.and_then(|row| {
        let version: Option<String> = row.get(0);
        let source: Option<String> = row.get(1);
        let objects: Option<String> = row.get(2);
        version.map(|version| Definition {
            version,
            source: source.unwrap_or_default(),
            objects: objects
                .and_then(|json| serde_json::from_str(&json).ok())
                .unwrap_or_default(),
        })
    }))
}

pub fn record_definition(
    client: &mut impl GenericClient,
    projection: &str,
    definition: &Definition,
) -> Result<(), postgres::Error> {
    let objects = serde_json::to_string(&definition.objects).unwrap_or_else(|_| "[]".into());
    client.execute(
        "UPDATE projector_checkpoints
         SET definition_version = $2, definition = $3, schema_objects = $4
         WHERE projection = $1",
        &[
            &projection,
            &definition.version,
            &definition.source,
            &objects,
        ],
    )?;
    Ok(())
}

/// True for errors of the server or the connection (it went away, it is shutting down, it is
/// out of resources, a deadlock): the batch is retried later. Anything else a projection's SQL
/// raises (a constraint, a bad value, a type it cannot convert) is the event's fault.
pub fn is_storage_failure(err: &postgres::Error) -> bool {
    if err.is_closed() {
        return true;
    }
    match err.code() {
        Some(code) => {
            let class = &code.code()[..2];
            matches!(class, "08" | "40" | "53" | "57" | "58" | "XX")
                || code == &postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION
        }
        // No SQLSTATE: an I/O failure, or a value the client could not convert.
        None => std::error::Error::source(err).is_some_and(|source| source.is::<std::io::Error>()),
    }
}
