//! The daemon, spawned as the real binary, reading the in-process feed in the inline format
//! (payloads in the page): exactness across pages and restarts, no body requests, page faults
//! retried, an event without its payload never applied, and `@aggregate_id` bound.

mod common;

use std::collections::BTreeMap;

use common::{wait_for_log, Harness};
use projector::demo::bank::{self, CREATED, CREDITED, DEBITED, STATEMENT_REQUESTED};
use projector::demo::consumer_toml::BOTH_PROJECTIONS;
use projector::demo::faults::{Fault, Target, TRANSIENT_PAGE_FAULTS};

const BOTH: &[&str] = &["account_balances", "account_ledger"];

fn body_requests(harness: &Harness) -> u64 {
    [CREATED, CREDITED, DEBITED, STATEMENT_REQUESTED]
        .iter()
        .map(|event_type| harness.server.body_requests(event_type))
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_inline_feed_is_folded_exactly_page_by_page_without_body_requests() {
    let events = bank::generate(21, 2600);
    let (first, more) = events.split_at(1900);
    let harness = Harness::new(first.to_vec()).await;
    harness.server.set_inline_page_size(300);
    harness.write_inline_config(BOTH_PROJECTIONS, "");
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 1900).await;
    harness.assert_exact(first);
    // 1,900 events in pages of 300: at least 7 pages, and no request per event.
    assert!(harness.server.page_requests() >= 7);
    assert_eq!(body_requests(&harness), 0);
    let (status, _) = daemon.terminate().await;
    assert!(status.success());

    // A restart resumes mid-page: the next page starts at the checkpoint, not at a page
    // boundary of the server's.
    harness.server.append(more.to_vec());
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 2600).await;
    harness.assert_exact(&events);
    assert_eq!(body_requests(&harness), 0);
    let (status, _) = daemon.terminate().await;
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn faults_on_inline_pages_are_retried_until_the_read_model_is_exact() {
    let events = bank::generate(22, 900);
    let harness = Harness::new(events.clone()).await;
    harness.server.set_inline_page_size(100);
    for &fault in TRANSIENT_PAGE_FAULTS.iter().chain(&[
        Fault::MissingFields,
        Fault::WrongTypes,
        Fault::RepeatedId,
        Fault::NotUtf8,
    ]) {
        harness.server.inject(Target::Pages, fault, 2);
    }
    harness.write_inline_config(BOTH_PROJECTIONS, "");
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 900).await;
    harness.assert_exact(&events);
    let (status, _) = daemon.terminate().await;
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_without_its_payload_holds_the_feed_at_itself_until_the_feed_has_it() {
    let events = bank::generate(23, 300);
    let mut broken = events.clone();
    // Served as `"data": null`.
    broken[120].body = "not JSON".into();
    let harness = Harness::new(broken).await;
    harness.server.set_inline_page_size(50);
    harness.write_inline_config(BOTH_PROJECTIONS, "");
    let mut daemon = harness.spawn_running().await;
    let says = format!("event {} has no data", events[120].id);
    harness
        .wait_for_backoff(&mut daemon, &["page at offset 120", &says])
        .await;
    // Every event before it is applied, none after it.
    harness.wait_for_checkpoints(&mut daemon, BOTH, 120).await;
    harness.assert_exact(&events[..120]);

    harness.server.replace(events.clone());
    harness.wait_for_checkpoints(&mut daemon, BOTH, 300).await;
    harness.assert_exact(&events);
    let (status, _) = daemon.terminate().await;
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_declarative_projection_reads_the_aggregate_id_an_inline_feed_sends() {
    let events = bank::generate(24, 700);
    let harness = Harness::new(events.clone()).await;
    let projection = r#"
schema = "CREATE TABLE IF NOT EXISTS account_events (account_id TEXT PRIMARY KEY, events INTEGER NOT NULL)"

[on."account.AccountCreated"]
sql = "INSERT INTO account_events (account_id, events) VALUES (:aggregate, 1)"
params = { aggregate = "@aggregate_id" }

[on."account.AccountCredited"]
sql = "UPDATE account_events SET events = events + 1 WHERE account_id = :aggregate"
params = { aggregate = "@aggregate_id" }
expect_rows = 1

[on."account.AccountDebited"]
sql = "UPDATE account_events SET events = events + 1 WHERE account_id = :aggregate"
params = { aggregate = "@aggregate_id" }
expect_rows = 1
"#;
    std::fs::write(harness.dir.path().join("account_events.toml"), projection)
        .unwrap_or_else(|e| panic!("{e}"));
    harness.write_inline_config(
        r#"
[[projection]]
name = "account_events"
feed = "bank"
file = "account_events.toml"
"#,
        "",
    );
    let mut daemon = harness.spawn();
    harness
        .wait_for_checkpoints(&mut daemon, &["account_events"], 700)
        .await;
    wait_for_log(&mut daemon, "at the head of the feed").await;

    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for event in &events {
        if event.event_type != STATEMENT_REQUESTED {
            *expected.entry(event.aggregate_id.clone()).or_default() += 1;
        }
    }
    let conn = projector::store::open_reader(&harness.database()).unwrap_or_else(|e| panic!("{e}"));
    let mut statement = conn
        .prepare("SELECT account_id, events FROM account_events")
        .unwrap_or_else(|e| panic!("{e}"));
    let found: BTreeMap<String, i64> = statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .and_then(|rows| rows.collect())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(found, expected);
    let (status, _) = daemon.terminate().await;
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_of_megabytes_are_read_a_chunk_at_a_time_within_a_small_budget_and_stop_at_a_bad_event(
) {
    let events = bank::generate(25, 14_000);
    let mut broken = events.clone();
    // In the second page, served as `"data": null`.
    broken[9_000].body = "not JSON".into();
    let harness = Harness::new(broken).await;
    // About 2 MB a page: kept as its bytes, its entries made a chunk at a time.
    harness.server.set_inline_page_size(6_000);
    harness.write_inline_config(BOTH_PROJECTIONS, "max_buffered_bytes = 65536");
    let mut daemon = harness.spawn_running().await;
    let says = format!("event {} has no data", events[9_000].id);
    harness
        .wait_for_backoff(&mut daemon, &["page at offset 9000", &says])
        .await;
    harness.wait_for_checkpoints(&mut daemon, BOTH, 9_000).await;
    harness.assert_exact(&events[..9_000]);

    harness.server.replace(events.clone());
    harness
        .wait_for_checkpoints(&mut daemon, BOTH, 14_000)
        .await;
    harness.assert_exact(&events);
    assert_eq!(body_requests(&harness), 0);
    let (status, _) = daemon.terminate().await;
    assert!(status.success());
}
