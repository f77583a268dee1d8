//! The PostgreSQL store, against the machine's real server: exactly once across SIGKILLs, and
//! several daemons on one schema sharing the feeds by leases, taking over from one another
//! when the active one is killed, stopped or frozen. Each test has a schema of its own.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::pg::{self, Schema};
use common::{wait_for, Daemon, Harness};
use projector::config::FeedFormat;
use projector::demo::bank;
use projector::demo::consumer_toml::BOTH_PROJECTIONS;

/// How long a frozen daemon keeps its leases in these tests.
const LEASE_TIMEOUT: &str = "2s";

/// The feed `bank` of `harness`, on `schema`.
fn write_config(harness: &Harness, schema: &Schema, projections: &str, feed_extra: &str) {
    harness.write_config_on(
        &pg::url(),
        FeedFormat::Flux,
        &harness.server.url(),
        projections,
        feed_extra,
        &schema.daemon_keys(LEASE_TIMEOUT),
    );
}

/// A daemon of its own folder (its own control socket) running the harness's config.
struct Node {
    at: NodeAt,
    daemon: Daemon,
}

/// Where a node's daemon is: what the waits' conditions look at while the daemon is watched.
#[derive(Clone)]
struct NodeAt {
    dir: PathBuf,
    pid: u32,
}

impl Node {
    fn start(harness: &Harness, name: &str) -> Node {
        let dir = harness.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        for file in ["consumer.toml", "account_balances.toml"] {
            std::fs::copy(harness.dir.path().join(file), dir.join(file))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let daemon = Daemon::spawn(&dir.join("consumer.toml"), &dir, &[]);
        let pid = daemon.child.id();
        Node {
            at: NodeAt { dir, pid },
            daemon,
        }
    }

    fn is(&self, id: &str) -> bool {
        self.at.is(id)
    }
}

impl NodeAt {
    /// Whether this node is daemon `id` (`host:pid`).
    fn is(&self, id: &str) -> bool {
        id.ends_with(&format!(":{}", self.pid))
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        let config = self.dir.join("consumer.toml");
        let mut all = vec!["ctl", "--config", config.to_str().unwrap_or_default()];
        all.extend_from_slice(args);
        common::projector(&all)
    }

    fn status(&self) -> serde_json::Value {
        let output = self.ctl(&["status", "--json"]);
        let reply: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", common::output_text(&output)));
        reply["status"].clone()
    }

    /// The status of feed `name`.
    fn feed(&self, name: &str) -> serde_json::Value {
        let status = self.status();
        status["feeds"]
            .as_array()
            .and_then(|feeds| feeds.iter().find(|feed| feed["name"] == name).cloned())
            .unwrap_or_default()
    }
}

/// Waits until a live daemon that `fits` holds `feed`'s lease; returns its id.
async fn wait_for_holder(
    schema: &Schema,
    watched: &mut Daemon,
    feed: &str,
    fits: impl Fn(&str) -> bool,
) -> String {
    let mut holder = None;
    wait_for(
        watched,
        &format!("the right daemon to hold {feed}'s lease"),
        || {
            holder = schema.lease_holder(feed).filter(|id| fits(id));
            holder.is_some()
        },
    )
    .await;
    holder.unwrap_or_default()
}

/// The node that is daemon `id`.
fn node_of<'n>(nodes: &'n mut [Node], id: &str) -> &'n mut Node {
    nodes
        .iter_mut()
        .find(|node| node.is(id))
        .unwrap_or_else(|| panic!("no node is {id}"))
}

/// The smallest, middle and largest of `times`.
fn spread(times: &mut [Duration]) -> String {
    times.sort();
    match times {
        [] => "none".into(),
        [..] => format!(
            "min {:?}, median {:?}, max {:?} over {}",
            times[0],
            times[times.len() / 2],
            times[times.len() - 1],
            times.len()
        ),
    }
}

/// Waits until every projection of `schema` has checkpointed `offset`.
async fn wait_for_offset(schema: &Schema, watched: &mut Daemon, offset: u64) {
    wait_for(watched, &format!("every checkpoint at {offset}"), || {
        let checkpoints = schema.checkpoints();
        !checkpoints.is_empty() && checkpoints.values().all(|&at| at == offset)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_takes_over_when_the_active_daemon_is_killed_or_stopped() {
    let all = bank::generate(7, 3000);
    let harness = Harness::new(all[..1000].to_vec()).await;
    let schema = Schema::new();
    write_config(&harness, &schema, BOTH_PROJECTIONS, "");
    let mut a = Node::start(&harness, "a");
    let first = wait_for_holder(&schema, &mut a.daemon, "bank", |_| true).await;
    assert!(
        a.is(&first),
        "{first} holds the lease, not a ({})",
        a.at.pid
    );
    let mut b = Node::start(&harness, "b");
    wait_for_offset(&schema, &mut a.daemon, 1000).await;
    let b_at = b.at.clone();
    wait_for(
        &mut b.daemon,
        "b to stand by, naming a as the holder",
        || {
            let feed = b_at.feed("bank");
            feed["state"] == "standby" && feed["lease_holder"] == first.as_str()
        },
    )
    .await;
    let text = common::output_text(&a.at.ctl(&["status"]));
    assert!(
        text.contains(&format!("daemon {first} (this one): holds bank"))
            && text.contains("stands by")
            && text.contains(&format!("lease held by {first}")),
        "{text}"
    );

    harness.server.append(all[1000..2000].to_vec());
    let killed = Instant::now();
    a.daemon.kill();
    let second = wait_for_holder(&schema, &mut b.daemon, "bank", |id| b_at.is(id)).await;
    let after_kill = killed.elapsed();
    wait_for_offset(&schema, &mut b.daemon, 2000).await;
    schema.assert_exact(&all[..2000]);

    let mut c = Node::start(&harness, "c");
    let c_at = c.at.clone();
    wait_for(&mut c.daemon, "c to stand by", || {
        c_at.feed("bank")["lease_holder"] == second.as_str()
    })
    .await;
    harness.server.append(all[2000..].to_vec());
    let stopped = Instant::now();
    let (status, log) = b.daemon.terminate().await;
    assert!(status.success(), "{log}");
    wait_for_holder(&schema, &mut c.daemon, "bank", |id| c_at.is(id)).await;
    let after_stop = stopped.elapsed();
    wait_for_offset(&schema, &mut c.daemon, 3000).await;
    schema.assert_exact(&all);
    eprintln!("takeover: {after_kill:?} after SIGKILL, {after_stop:?} after SIGTERM");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_frozen_past_its_lease_loses_it_and_commits_nothing_when_it_wakes() {
    let all = bank::generate(11, 3000);
    let harness = Harness::new(all[..1000].to_vec()).await;
    let schema = Schema::new();
    write_config(&harness, &schema, BOTH_PROJECTIONS, "");
    let mut a = Node::start(&harness, "a");
    let a_at = a.at.clone();
    wait_for_holder(&schema, &mut a.daemon, "bank", |id| a_at.is(id)).await;
    let mut b = Node::start(&harness, "b");
    let b_at = b.at.clone();
    wait_for_offset(&schema, &mut a.daemon, 1000).await;

    a.daemon.signal("STOP");
    let frozen = Instant::now();
    harness.server.append(all[1000..2000].to_vec());
    wait_for_holder(&schema, &mut b.daemon, "bank", |id| b_at.is(id)).await;
    let takeover = frozen.elapsed();
    wait_for_offset(&schema, &mut b.daemon, 2000).await;

    // Awake again, a finds its session ended by the server and its lease gone with it.
    a.daemon.signal("CONT");
    common::wait_for_log(&mut a.daemon, "lost the feed's lease").await;
    harness.server.append(all[2000..].to_vec());
    wait_for_offset(&schema, &mut b.daemon, 3000).await;
    schema.assert_exact(&all);
    wait_for(&mut a.daemon, "a to stand by behind b", || {
        a_at.feed("bank")["state"] == "standby"
    })
    .await;
    // The lag a saw while it applied the feed is not the feed's any more: b reports that.
    let feed = a_at.feed("bank");
    assert!(
        feed["lag"].is_null() && feed["projections"][0]["lag_seconds"].is_null(),
        "{feed}"
    );
    assert!(
        takeover >= Duration::from_secs(2),
        "b took over after {takeover:?}, before a's lease could have timed out"
    );
    eprintln!("takeover of a frozen daemon: {takeover:?} (lease_timeout {LEASE_TIMEOUT})");
}

#[tokio::test(flavor = "multi_thread")]
async fn three_daemons_over_a_faulty_feed_stay_exact_while_the_active_one_is_killed_again_and_again(
) {
    let seed = 5;
    let chunk = 400;
    let rounds = 6;
    let all = bank::generate(seed, 1000 + chunk * rounds);
    let mut served = 1000;
    let harness = Harness::new(all[..served].to_vec()).await;
    let schema = Schema::new();
    write_config(&harness, &schema, BOTH_PROJECTIONS, "");
    harness.server.random_faults(seed, 0.05);
    let mut nodes: Vec<Node> = (0..3)
        .map(|n| Node::start(&harness, &format!("n{n}")))
        .collect();
    let mut takeovers = Vec::new();
    for round in 0..rounds {
        let holder = wait_for_holder(&schema, &mut nodes[0].daemon, "bank", |_| true).await;
        harness.server.append(all[served..served + chunk].to_vec());
        served += chunk;
        let index = nodes
            .iter()
            .position(|node| node.is(&holder))
            .unwrap_or_else(|| panic!("no node is {holder}"));
        let victim = nodes.remove(index);
        let killed = Instant::now();
        victim.daemon.kill();
        schema.assert_consistent(&all[..served], &format!("round {round}, after the kill"));
        nodes.push(Node::start(&harness, &format!("n{}", round + 3)));
        wait_for_holder(&schema, &mut nodes[0].daemon, "bank", |id| id != holder).await;
        takeovers.push(killed.elapsed());
    }
    let holder = wait_for_holder(&schema, &mut nodes[0].daemon, "bank", |_| true).await;
    let active = node_of(&mut nodes, &holder);
    wait_for_offset(&schema, &mut active.daemon, served as u64).await;
    schema.assert_exact(&all[..served]);
    // As an operator reads them, with psql, while the daemons run.
    let psql = std::process::Command::new("psql")
        .args([
            &pg::url(),
            "-Atc",
            &format!(
                "SELECT count(*) || ' ' || sum(balance) FROM {}.account_balances",
                schema.name
            ),
        ])
        .output()
        .unwrap_or_else(|e| panic!("psql (apt install postgresql-client): {e}"));
    let expected = bank::expected_balances(&all[..served]);
    assert_eq!(
        String::from_utf8_lossy(&psql.stdout).trim(),
        format!("{} {}", expected.len(), expected.values().sum::<i64>()),
        "{}",
        common::output_text(&psql)
    );
    eprintln!("takeover after SIGKILL: {}", spread(&mut takeovers));
}

#[tokio::test(flavor = "multi_thread")]
async fn feeds_spread_over_the_daemons_and_a_pause_through_any_daemon_holds_the_feed() {
    let all = bank::generate(3, 2000);
    let harness = Harness::new(all[..1000].to_vec()).await;
    let schema = Schema::new();
    let url = harness.server.url();
    let projections = format!(
        r#"
[[feed]]
name = "ledger"
url = "{url}"
format = "flux"
poll_interval = "50ms"
find_head = false

[[projection]]
name = "account_balances"
feed = "bank"
file = "account_balances.toml"

[[projection]]
name = "account_ledger"
feed = "ledger"
module = "account_ledger"
"#
    );
    write_config(&harness, &schema, &projections, "");
    let mut a = Node::start(&harness, "a");
    let a_at = a.at.clone();
    wait_for(&mut a.daemon, "a to hold both feeds", || {
        schema.lease_holder("bank").is_some_and(|id| a_at.is(&id))
            && schema.lease_holder("ledger").is_some_and(|id| a_at.is(&id))
    })
    .await;
    let mut b = Node::start(&harness, "b");
    let b_at = b.at.clone();
    wait_for(&mut b.daemon, "one feed each", || {
        let holders = [schema.lease_holder("bank"), schema.lease_holder("ledger")];
        holders
            .iter()
            .any(|h| h.as_deref().is_some_and(|id| a_at.is(id)))
            && holders
                .iter()
                .any(|h| h.as_deref().is_some_and(|id| b_at.is(id)))
    })
    .await;
    wait_for_offset(&schema, &mut a.daemon, 1000).await;

    // Paused through the daemon that does not hold it, the feed stops where it runs.
    let bank_holder = schema.lease_holder("bank").unwrap_or_default();
    let (holder, other) = if a.is(&bank_holder) {
        (&mut a, b_at)
    } else {
        (&mut b, a_at)
    };
    let paused = other.ctl(&["pause", "bank"]);
    assert!(paused.status.success(), "{}", common::output_text(&paused));
    let holder_at = holder.at.clone();
    wait_for(
        &mut holder.daemon,
        "the holder to park the paused feed",
        || holder_at.feed("bank")["state"] == "paused",
    )
    .await;
    harness.server.append(all[1000..].to_vec());
    wait_for(&mut holder.daemon, "the ledger to move on alone", || {
        schema.checkpoints().get("account_ledger") == Some(&2000)
    })
    .await;
    assert_eq!(schema.checkpoints().get("account_balances"), Some(&1000));
    let resumed = other.ctl(&["resume", "bank"]);
    assert!(
        resumed.status.success(),
        "{}",
        common::output_text(&resumed)
    );
    wait_for_offset(&schema, &mut holder.daemon, 2000).await;
    schema.assert_exact(&all);
}

/// An audit of every event, with PostgreSQL statements of its own: the payload kept as JSONB.
const AUDIT: &str = r#"
schema = "CREATE TABLE IF NOT EXISTS audit (event_id TEXT PRIMARY KEY, event_type TEXT, payload TEXT)"
postgres_schema = "CREATE TABLE IF NOT EXISTS audit (event_id TEXT PRIMARY KEY, event_type TEXT, payload JSONB)"

[on."*"]
sql = "INSERT INTO audit VALUES (:id, :type, :payload)"
postgres_sql = "INSERT INTO audit VALUES (:id, :type::text, :payload::jsonb)"
params = { id = "@event_id", type = "@event_type", payload = "@payload" }
"#;

#[tokio::test(flavor = "multi_thread")]
async fn declarative_files_run_their_postgres_statements_with_values_bound_never_pasted() {
    let mut events = bank::generate(9, 200);
    let hostile = "x'); DROP TABLE audit; --";
    let credit = events
        .iter()
        .position(|e| e.event_type == bank::CREDITED)
        .unwrap_or_else(|| panic!("no credit"));
    let mut body: serde_json::Value =
        serde_json::from_str(&events[credit].body).unwrap_or_else(|e| panic!("{e}"));
    body["transaction_id"] = hostile.into();
    events[credit].body = body.to_string();
    let harness = Harness::new(events.clone()).await;
    std::fs::write(harness.dir.path().join("audit.toml"), AUDIT).unwrap_or_else(|e| panic!("{e}"));
    let schema = Schema::new();
    let projections = r#"
[[projection]]
name = "audit"
feed = "bank"
file = "audit.toml"
"#;
    write_config(&harness, &schema, projections, "");
    let mut daemon = harness.spawn();
    wait_for_offset(&schema, &mut daemon, 200).await;
    let id = events[credit].id.clone();
    let (kept, count, kind) = schema.query(move |client| {
        let row = client
            .query_one(
                "SELECT payload->>'transaction_id', (SELECT count(*) FROM audit), pg_typeof(payload)::text
                 FROM audit WHERE event_id = $1",
                &[&id],
            )
            .unwrap_or_else(|e| panic!("{e}"));
        (row.get::<_, String>(0), row.get::<_, i64>(1), row.get::<_, String>(2))
    });
    assert_eq!(
        (kept.as_str(), count, kind.as_str()),
        (hostile, 200, "jsonb")
    );
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_that_read_a_sqlite_file_say_so_and_check_probes_the_server() {
    let harness = Harness::new(bank::generate(1, 50)).await;
    let schema = Schema::new();
    write_config(&harness, &schema, BOTH_PROJECTIONS, "");
    for command in [
        vec!["query", "SELECT 1"],
        vec!["projections"],
        vec!["dead-letters", "list"],
    ] {
        let output = harness.run(&command);
        let text = common::output_text(&output);
        assert!(
            !output.status.success() && text.contains("use psql") && text.contains(&schema.name),
            "{command:?}: {text}"
        );
    }
    let refused = harness.run(&["rebuild", "account_balances"]);
    let text = common::output_text(&refused);
    assert!(
        !refused.status.success() && text.contains("with no daemon works on a SQLite database"),
        "{text}"
    );
    let output = harness.run(&["check", "--probe"]);
    let text = common::output_text(&output);
    assert!(
        output.status.success()
            && text.contains(&format!("reachable; schema {} is set up", schema.name)),
        "{text}"
    );
    let mut daemon = harness.spawn_running().await;
    wait_for_offset(&schema, &mut daemon, 50).await;
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_writer_whose_session_the_server_ends_connects_again_takes_its_lease_back_and_stays_exact(
) {
    let all = bank::generate(13, 3000);
    let harness = Harness::new(all[..1000].to_vec()).await;
    let schema = Schema::new();
    write_config(&harness, &schema, BOTH_PROJECTIONS, "");
    let mut daemon = harness.spawn();
    wait_for_offset(&schema, &mut daemon, 1000).await;
    for (round, end) in [(1, 2000), (2, 3000)] {
        harness.server.append(all[end - 1000..end].to_vec());
        // What an operator's pg_terminate_backend, a server restart or a failover of the
        // server does to the daemon's connection, mid catch-up.
        let ended: i64 = schema.query(|client| {
            client
                .query_one(
                    "SELECT count(pg_terminate_backend(backend_pid)) FROM projector_daemons",
                    &[],
                )
                .map(|row| row.get(0))
                .unwrap_or_else(|e| panic!("{e}"))
        });
        assert_eq!(ended, 1, "round {round}");
        wait_for_offset(&schema, &mut daemon, end as u64).await;
        schema.assert_exact(&all[..end]);
    }
    let log = daemon.log();
    assert!(
        log.contains("the connection to PostgreSQL was lost"),
        "{log}"
    );
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_events_on_postgres_are_dead_lettered_or_halt_their_projection_until_skipped_through_any_daemon(
) {
    let mut all = bank::generate(17, 700);
    let poison = common::poison_first_credit(&mut all);
    let events = all[..600].to_vec();
    let harness = Harness::new(events.clone()).await;
    let schema = Schema::new();
    let projections = r#"
[[projection]]
name = "account_balances"
feed = "bank"
file = "account_balances.toml"
on_error = "skip"

[[projection]]
name = "account_ledger"
feed = "bank"
module = "account_ledger"
on_error = "stop"
"#;
    write_config(&harness, &schema, projections, "");
    let mut a = Node::start(&harness, "a");
    let a_at = a.at.clone();
    wait_for_holder(&schema, &mut a.daemon, "bank", |id| a_at.is(id)).await;
    let b = Node::start(&harness, "b");
    let daemon = &mut a.daemon;
    wait_for(
        daemon,
        "balances past the poison and the ledger halted at it",
        || {
            let checkpoints = schema.checkpoints();
            checkpoints.get("account_balances") == Some(&600)
                && checkpoints.get("account_ledger") == Some(&(poison as u64))
        },
    )
    .await;
    let (letters, halted_at): (Vec<(i64, String)>, Option<i64>) = schema.query(|client| {
        let letters = client
            .query(
                "SELECT event_offset, event_id FROM projector_dead_letters WHERE projection = 'account_balances'",
                &[],
            )
            .unwrap_or_else(|e| panic!("{e}"))
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let halted = client
            .query_one(
                "SELECT halted_offset FROM projector_checkpoints WHERE projection = 'account_ledger'",
                &[],
            )
            .unwrap_or_else(|e| panic!("{e}"))
            .get(0);
        (letters, halted)
    });
    assert_eq!(letters, vec![(poison as i64, events[poison].id.clone())]);
    assert_eq!(halted_at, Some(poison as i64));
    let mut without_poison = events.clone();
    without_poison.remove(poison);
    let (balances, entries) = schema.query(|client| {
        let balances: std::collections::BTreeMap<String, i64> = client
            .query("SELECT account_id, balance FROM account_balances", &[])
            .unwrap_or_else(|e| panic!("{e}"))
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let entries: i64 = client
            .query_one("SELECT count(*) FROM account_ledger_entries", &[])
            .unwrap_or_else(|e| panic!("{e}"))
            .get(0);
        (balances, entries)
    });
    assert_eq!(balances, bank::expected_balances(&without_poison));
    assert_eq!(entries, common::credits_and_debits(&events[..poison]));
    // Skipped through the daemon standing by, the halted projection goes on where it runs.
    let b_config = b.at.dir.join("consumer.toml");
    let b_config = b_config.to_str().unwrap_or_default();
    let skipped = common::projector(&["skip", "account_ledger", "--config", b_config]);
    let text = common::output_text(&skipped);
    assert!(
        skipped.status.success() && text.contains("moved into the dead letters"),
        "{text}"
    );
    wait_for(daemon, "the ledger to go on past the poison", || {
        schema.checkpoints().get("account_ledger") == Some(&600)
    })
    .await;
    let entries: i64 = schema.query(|client| {
        client
            .query_one("SELECT count(*) FROM account_ledger_entries", &[])
            .map(|row| row.get(0))
            .unwrap_or_else(|e| panic!("{e}"))
    });
    assert_eq!(entries, common::credits_and_debits(&without_poison));
    let reset = common::projector(&[
        "reset",
        "account_ledger",
        "--to",
        "600",
        "--yes",
        "--config",
        b_config,
    ]);
    let text = common::output_text(&reset);
    assert!(
        reset.status.success() && text.contains("moved from offset 600 to 600"),
        "{text}"
    );
    harness.server.append(all[600..].to_vec());
    wait_for_offset(&schema, &mut a.daemon, 700).await;
    all.remove(poison);
    schema.assert_exact(&all);
    let (status, log) = a.daemon.terminate().await;
    assert!(status.success(), "{log}");
}

/// The schemas of rebuilds in progress on the server.
fn shadow_schemas(schema: &Schema) -> i64 {
    schema.query(|client| {
        client
            .query_one(
                "SELECT count(*) FROM pg_namespace WHERE nspname LIKE $1 || '\\_rebuild\\_%'",
                &[&schema.name],
            )
            .map(|row| row.get(0))
            .unwrap_or_else(|e| panic!("{e}"))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_asked_of_a_standby_is_built_by_the_daemon_holding_the_feed_and_swapped_in() {
    let all = bank::generate(19, 3000);
    let harness = Harness::new(all[..2000].to_vec()).await;
    let schema = Schema::new();
    write_config(&harness, &schema, BOTH_PROJECTIONS, "");
    let mut a = Node::start(&harness, "a");
    let a_at = a.at.clone();
    wait_for_holder(&schema, &mut a.daemon, "bank", |id| a_at.is(id)).await;
    let b = Node::start(&harness, "b");
    wait_for_offset(&schema, &mut a.daemon, 2000).await;
    // A read model gone wrong, which a rebuild from the feed's start puts right.
    schema.query(|client| {
        client
            .batch_execute("UPDATE account_balances SET balance = -1")
            .unwrap_or_else(|e| panic!("{e}"))
    });
    let asked = common::projector(&[
        "rebuild",
        "account_balances",
        "--config",
        b.at.dir.join("consumer.toml").to_str().unwrap_or_default(),
    ]);
    let text = common::output_text(&asked);
    assert!(
        asked.status.success() && text.contains("rebuilding account_balances"),
        "{text}"
    );
    harness.server.append(all[2000..].to_vec());
    common::wait_for_log(
        &mut a.daemon,
        "rebuilt: the new tables replaced the old ones",
    )
    .await;
    wait_for_offset(&schema, &mut a.daemon, 3000).await;
    schema.assert_exact(&all);
    assert_eq!(shadow_schemas(&schema), 0);
    let left: i64 = schema.query(|client| {
        client
            .query_one(
                "SELECT (SELECT count(*) FROM projector_rebuilds)
                      + (SELECT count(*) FROM projector_checkpoints WHERE projection LIKE '%@rebuild')",
                &[],
            )
            .map(|row| row.get(0))
            .unwrap_or_else(|e| panic!("{e}"))
    });
    assert_eq!(left, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_definition_is_rebuilt_beside_the_served_tables_and_goes_on_after_a_failover() {
    let seed = 23;
    let all = bank::generate(seed, 12_000);
    let harness = Harness::new(all[..10_000].to_vec()).await;
    let schema = Schema::new();
    write_config(&harness, &schema, BOTH_PROJECTIONS, "");
    let mut first = harness.spawn();
    wait_for_offset(&schema, &mut first, 10_000).await;
    let (status, log) = first.terminate().await;
    assert!(status.success(), "{log}");

    // A new definition: the daemons rebuild it from the feed's start, serving the old tables.
    let file = harness.dir.path().join("account_balances.toml");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&file, format!("version = \"2\"\n{text}")).unwrap_or_else(|e| panic!("{e}"));
    harness.server.random_faults(seed, 0.1);
    let mut nodes = vec![Node::start(&harness, "a"), Node::start(&harness, "b")];
    let holder = wait_for_holder(&schema, &mut nodes[0].daemon, "bank", |_| true).await;
    let member = "account_balances@rebuild".to_string();
    wait_for(&mut nodes[0].daemon, "the rebuild to get going", || {
        schema.checkpoints().get(&member).is_some_and(|&at| at > 0)
    })
    .await;
    // Meanwhile the old tables are served as they were.
    schema.assert_consistent(&all[..10_000], "while rebuilding");
    let index = nodes
        .iter()
        .position(|n| n.is(&holder))
        .unwrap_or_else(|| panic!("no node is {holder}"));
    let holder_node = nodes.remove(index);
    holder_node.daemon.kill();
    let reached = schema.checkpoints().get(&member).copied().unwrap_or(0);
    let survivor = &mut nodes[0];
    let survivor_at = survivor.at.clone();
    wait_for_holder(&schema, &mut survivor.daemon, "bank", |id| {
        survivor_at.is(id)
    })
    .await;
    harness.server.append(all[10_000..].to_vec());
    // The shadow goes on from where it was, never again from the feed's start.
    let mut lowest = u64::MAX;
    let log = survivor.daemon.log_path().to_path_buf();
    wait_for(
        &mut survivor.daemon,
        "the survivor to swap the rebuild in",
        || {
            if let Some(&at) = schema.checkpoints().get(&member) {
                lowest = lowest.min(at);
            }
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("rebuilt: the new tables replaced the old ones")
        },
    )
    .await;
    assert!(
        lowest >= reached,
        "the shadow went back from {reached} to {lowest}"
    );
    wait_for_offset(&schema, &mut survivor.daemon, 12_000).await;
    schema.assert_exact(&all);
    let version: String = schema.query(|client| {
        client
            .query_one(
                "SELECT definition_version FROM projector_checkpoints WHERE projection = 'account_balances'",
                &[],
            )
            .map(|row| row.get(0))
            .unwrap_or_else(|e| panic!("{e}"))
    });
    assert_eq!(version, "2");
}
