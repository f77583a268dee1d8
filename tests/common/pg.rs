//! The PostgreSQL side of the tests: a schema of the test's own on the machine's server
//! (`PROJECTOR_TEST_POSTGRES`, by default postgres://postgres@127.0.0.1:5432/test, plain on
//! loopback), dropped
//! when the test ends, and readers of what the daemons wrote there.
//!
//! The blocking client cannot run on the test's async runtime: each query runs on a thread of
//! its own, with a connection of its own.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};

use projector::demo::feed_server::StoredEvent;

/// The server the tests use.
pub fn url() -> String {
    std::env::var("PROJECTOR_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test?sslmode=disable".into())
}

/// Runs `work` with a connection whose search_path is `schema`, on a thread of its own.
pub fn with_client<T: Send>(
    schema: &str,
    work: impl FnOnce(&mut postgres::Client) -> T + Send,
) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut client = postgres::Client::connect(&url(), postgres::NoTls)
                    .unwrap_or_else(|e| panic!("connecting to {}: {e}", url()));
                client
                    .batch_execute(&format!("SET search_path TO {schema}"))
                    .unwrap_or_else(|e| panic!("{e}"));
                work(&mut client)
            })
            .join()
            .unwrap_or_else(|_| panic!("a PostgreSQL query panicked"))
    })
}

/// A schema of this test's own, dropped at the end.
pub struct Schema {
    pub name: String,
}

impl Schema {
    pub fn new() -> Schema {
        static SCHEMAS: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "projector_test_{}_{}",
            std::process::id(),
            SCHEMAS.fetch_add(1, Ordering::Relaxed)
        );
        let schema = Schema { name };
        schema.drop_schema();
        schema
    }

    /// Drops the schema, and the schemas of its rebuilds in progress.
    fn drop_schema(&self) {
        let name = self.name.clone();
        with_client("public", move |client| {
            let rebuilds: Vec<String> = client
                .query(
                    "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE $1 || '\\_rebuild\\_%'",
                    &[&name],
                )
                .unwrap_or_else(|e| panic!("{e}"))
                .iter()
                .map(|row| row.get(0))
                .collect();
            for schema in rebuilds.iter().chain([&name]) {
                client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        });
    }

    /// The `[daemon]` keys that put a daemon on this schema, leases timing out after
    /// `lease_timeout`.
    pub fn daemon_keys(&self, lease_timeout: &str) -> String {
        format!(
            "schema = \"{}\"\nlease_timeout = \"{lease_timeout}\"\n",
            self.name
        )
    }

    pub fn query<T: Send>(&self, work: impl FnOnce(&mut postgres::Client) -> T + Send) -> T {
        with_client(&self.name, work)
    }

    /// Every projection's next offset; none before the daemon has made the tables.
    pub fn checkpoints(&self) -> HashMap<String, u64> {
        self.query(|client| {
            client
                .query(
                    "SELECT projection, next_offset FROM projector_checkpoints",
                    &[],
                )
                .map(|rows| {
                    rows.iter()
                        .map(|row| (row.get(0), row.get::<_, i64>(1) as u64))
                        .collect()
                })
                .unwrap_or_default()
        })
    }

    /// The daemon holding `feed`'s lease, if a live session does.
    pub fn lease_holder(&self, feed: &str) -> Option<String> {
        let feed = feed.to_string();
        self.query(move |client| {
            client
                .query_opt(
                    "SELECT l.holder FROM projector_leases l
                     JOIN pg_stat_activity a ON a.pid = l.backend_pid AND a.application_name = l.holder
                     WHERE l.feed = $1",
                    &[&feed],
                )
                .ok()
                .flatten()
                .map(|row| row.get(0))
        })
    }

    /// Each projection's read model is the fold of the feed up to its checkpoint, and the
    /// checkpoint's event id is the feed's at that offset: read in one snapshot.
    pub fn assert_consistent(&self, events: &[StoredEvent], context: &str) {
        let events = events.to_vec();
        let context = context.to_string();
        let schema = self.name.clone();
        self.query(move |client| {
            let mut tx = client
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .unwrap_or_else(|e| panic!("{context}: {e}"));
            let made: bool = tx
                .query_one(
                    "SELECT to_regclass('projector_checkpoints') IS NOT NULL",
                    &[],
                )
                .map(|row| row.get(0))
                .unwrap_or_else(|e| panic!("{context}: {e:?}"));
            if !made {
                // Killed before it set the schema up.
                return;
            }
            let rows = tx
                .query(
                    "SELECT projection, next_offset, last_event_id FROM projector_checkpoints",
                    &[],
                )
                .unwrap_or_else(|e| panic!("{context}: {e:?}"));
            for row in rows {
                let projection: String = row.get(0);
                let applied = row.get::<_, i64>(1) as usize;
                let last_id: Option<String> = row.get(2);
                assert!(
                    applied <= events.len(),
                    "{context}: {projection} is past the feed"
                );
                let expected_id = applied.checked_sub(1).map(|i| events[i].id.clone());
                assert_eq!(
                    last_id, expected_id,
                    "{context}: {projection}'s checkpoint names the wrong event"
                );
                let prefix = &events[..applied];
                // A rebuild's shadow has its tables in a schema of its own.
                let (name, tables) = match projection.strip_suffix("@rebuild") {
                    Some(live) => (
                        live,
                        format!(
                            "{}.",
                            projector::store::postgres::shadow_schema(&schema, live)
                        ),
                    ),
                    None => (projection.as_str(), String::new()),
                };
                match name {
                    "account_balances" => assert_eq!(
                        balances_in(&mut tx, &tables),
                        projector::demo::bank::expected_balances(prefix),
                        "{context}: {projection}'s balances at offset {applied}"
                    ),
                    "account_ledger" => assert_eq!(
                        count_in(
                            &mut tx,
                            &format!("SELECT count(*) FROM {tables}account_ledger_entries")
                        ),
                        super::credits_and_debits(prefix),
                        "{context}: {projection}'s ledger entries at offset {applied}"
                    ),
                    other => panic!("unexpected projection {other}"),
                }
            }
        });
    }

    /// `account_balances`, by account.
    pub fn balances(&self) -> BTreeMap<String, i64> {
        self.query(|client| {
            let mut tx = client.transaction().unwrap_or_else(|e| panic!("{e}"));
            balances_in(&mut tx, "")
        })
    }

    /// The one number `sql` selects.
    pub fn count(&self, sql: &str) -> i64 {
        self.query(|client| {
            client
                .query_one(sql, &[])
                .map(|row| row.get::<_, i64>(0))
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        })
    }

    /// Both shipped read models hold exactly the fold of `events`.
    pub fn assert_exact(&self, events: &[StoredEvent]) {
        let (balances, entries) = self.query(|client| {
            let mut tx = client.transaction().unwrap_or_else(|e| panic!("{e}"));
            (
                balances_in(&mut tx, ""),
                count_in(&mut tx, "SELECT count(*) FROM account_ledger_entries"),
            )
        });
        assert_eq!(balances, projector::demo::bank::expected_balances(events));
        assert_eq!(entries, super::credits_and_debits(events));
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        self.drop_schema();
    }
}

/// The balances of `account_balances` in the schema `tables` names (`name.`, or the
/// search_path's for "").
fn balances_in(tx: &mut postgres::Transaction, tables: &str) -> BTreeMap<String, i64> {
    tx.query(
        &format!("SELECT account_id, balance FROM {tables}account_balances"),
        &[],
    )
    .map(|rows| rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    .unwrap_or_default()
}

fn count_in(tx: &mut postgres::Transaction, sql: &str) -> i64 {
    tx.query_one(sql, &[])
        .map(|row| row.get(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}
