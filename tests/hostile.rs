//! Hostile event content, against the real binary: SQL in ids and payloads, huge strings and
//! deep nesting are stored as data, never executed; a payload the daemon cannot read (nested
//! past the JSON parser's limit, not UTF-8) is refused: the feed waits at that event, says why
//! in `status`, applies nothing past it, and goes on once the feed serves it readably.

mod common;

use common::{assert_consistent, Harness};
use projector::demo::bank;
use projector::demo::consumer_toml::BOTH_PROJECTIONS;
use projector::demo::faults::{Fault, Target};
use projector::demo::feed_server::StoredEvent;
use serde_json::Value;

const BOTH: &[&str] = &["account_balances", "account_ledger"];

/// The account id of the first event (an AccountCreated).
fn first_account(events: &[StoredEvent]) -> String {
    let body: Value = serde_json::from_str(&events[0].body).unwrap_or_default();
    body["account_id"].as_str().unwrap_or_default().to_string()
}

/// Replaces an account id everywhere in the bodies (ids are JSON strings there).
fn rename_account(events: &mut [StoredEvent], from: &str, to: &str) {
    let escaped = serde_json::to_string(to).unwrap_or_default();
    let bare = &escaped[1..escaped.len() - 1];
    for event in events {
        event.body = event.body.replace(from, bare);
    }
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// Adds `"meta": <value>` to the body of event `index`.
fn with_meta(event: &mut StoredEvent, meta: &str) {
    let body = event.body.trim_end().trim_end_matches('}').to_string();
    event.body = format!("{body},\"meta\":{meta}}}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sql_huge_strings_and_deep_nesting_are_stored_as_data_never_executed() {
    let mut events = bank::generate(70, 400);
    let sql = "x'); DROP TABLE account_balances; DELETE FROM projector_checkpoints; --";
    let first = first_account(&events);
    rename_account(&mut events, &first, sql);
    let second = events
        .iter()
        .skip(1)
        .find(|e| e.event_type == bank::CREATED)
        .map(|e| {
            let body: Value = serde_json::from_str(&e.body).unwrap_or_default();
            body["account_id"].as_str().unwrap_or_default().to_string()
        })
        .unwrap_or_default();
    let huge = "\u{e9}".repeat(100_000);
    rename_account(&mut events, &second, &huge);
    events[3].id = "e'); DROP TABLE account_ledger_entries; --".into();
    with_meta(&mut events[5], &nested(100));
    with_meta(
        &mut events[6],
        &format!("\"{}\"", "\\u0000\\\"';--".repeat(1000)),
    );

    let harness = Harness::new(events.clone()).await;
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 400).await;
    harness.assert_exact(&events);
    assert_consistent(&harness, &events, "hostile content");
    let balances = harness.balances();
    assert!(balances.contains_key(sql) && balances.contains_key(&huge));
    let (status, log) = daemon.terminate().await;
    assert!(status.success() && !log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payload_nested_past_the_parser_limit_is_refused_and_the_feed_waits_at_it() {
    let events = bank::generate(71, 300);
    let mut hostile = events.clone();
    // A credit, whose body a projection needs (a passed-over type's body is never fetched).
    let at = (40..)
        .find(|&i| events[i].event_type == bank::CREDITED)
        .unwrap_or(40);
    with_meta(&mut hostile[at], &nested(100_000));
    let harness = Harness::new(hostile).await;
    let mut daemon = harness.spawn_running().await;
    harness
        .wait_for_backoff(&mut daemon, &["body of", "recursion limit"])
        .await;
    assert!(harness
        .checkpoints()
        .values()
        .all(|&offset| offset <= at as u64));
    assert_consistent(&harness, &events, "held at the deep payload");

    harness.server.replace(events.clone());
    harness.wait_for_checkpoints(&mut daemon, BOTH, 300).await;
    harness.assert_exact(&events);
    assert!(daemon.terminate().await.0.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payload_that_is_not_utf8_is_refused_and_the_feed_waits_at_it() {
    let events = bank::generate(72, 300);
    let harness = Harness::new(events.clone()).await;
    harness
        .server
        .inject(Target::Bodies, Fault::NotUtf8, 1_000_000);
    let mut daemon = harness.spawn_running().await;
    harness
        .wait_for_backoff(&mut daemon, &["body of", "not valid JSON"])
        .await;
    assert_eq!(harness.checkpoints().values().max().copied(), Some(0));

    harness.server.clear_faults();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 300).await;
    harness.assert_exact(&events);
    assert!(daemon.terminate().await.0.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn escape_sequences_from_the_feed_are_shown_escaped_and_kept_exact_in_json() {
    let mut events = bank::generate(75, 300);
    let poison = common::poison_first_credit(&mut events);
    // An id that would clear the operator's screen and forge a journal entry of its own.
    let hostile = "e\u{1b}[2J\u{1b}[31mgotcha\n<3>forged entry\r";
    events[poison].id = hostile.to_string();
    let harness = Harness::new(events.clone()).await;
    let projections = BOTH_PROJECTIONS.replace(
        "module = \"account_ledger\"",
        "module = \"account_ledger\"\non_error = \"skip\"",
    );
    harness.write_inline_config(&projections, "");
    let mut daemon = harness.spawn_running().await;
    harness
        .wait_for_checkpoints(&mut daemon, &["account_ledger"], 300)
        .await;
    common::wait_for(&mut daemon, "account_balances to halt", || {
        harness.feed_status("bank")["projections"][0]["halted"].is_string()
    })
    .await;

    let text = String::from_utf8_lossy(&harness.ctl(&["status"]).stdout).into_owned();
    assert!(!text.contains('\u{1b}') && !text.contains('\r'), "{text:?}");
    assert!(
        text.contains("e\\u{1b}[2J\\u{1b}[31mgotcha\\n<3>forged entry\\r"),
        "{text}"
    );
    // JSON is exact: the id as the feed sent it.
    let halted = harness.feed_status("bank")["projections"][0]["halted"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(halted.contains(hostile), "{halted:?}");

    let config = harness.config_path().to_string_lossy().to_string();
    let query = "SELECT event_id FROM projector_dead_letters";
    let table = common::projector(&["query", "--config", &config, query]);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        !table.contains('\u{1b}') && table.contains("e\\u{1b}[2J"),
        "{table:?}"
    );
    let json = common::projector(&["query", "--config", &config, "--json", query]);
    let row: Value = serde_json::from_slice(&json.stdout).unwrap_or_default();
    assert_eq!(row["event_id"], hostile);

    let (status, log) = daemon.terminate().await;
    assert!(status.success());
    assert!(
        !log.contains('\u{1b}') && !log.contains('\r'),
        "raw escape in the log"
    );
    assert!(
        !log.lines().any(|line| line.starts_with("<3>forged")),
        "a forged log line"
    );
    assert!(log.contains("gotcha\\n<3>forged entry"), "{log}");
}

#[test]
fn query_writes_nothing_not_even_a_copy_of_the_database() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let database = dir.path().join("projector.db");
    rusqlite::Connection::open(&database)
        .and_then(|c| c.execute_batch("CREATE TABLE t (a)"))
        .unwrap_or_else(|e| panic!("{e}"));
    let copy = dir.path().join("copy.db");
    let database = database.to_string_lossy().to_string();
    for sql in [
        format!("VACUUM INTO '{}'", copy.display()),
        "INSERT INTO t VALUES (1)".to_string(),
        "DROP TABLE t".to_string(),
    ] {
        let output = common::projector(&["query", "--database", &database, &sql]);
        assert_eq!(output.status.code(), Some(1), "{sql}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("projector query only reads"),
            "{sql}: {stderr}"
        );
    }
    assert!(!copy.exists());
}
