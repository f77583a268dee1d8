//! One test per feed fault, against the real binary: the fault is injected into the feed a few
//! times (or until the test clears it); the daemon must retry, apply nothing wrong or partial,
//! never panic, and end exact by itself once the fault clears. What it does for each fault is
//! listed in the README ("Feed faults").

mod common;

use common::{assert_consistent, wait_for, Harness, Store};
use projector::demo::bank;
use projector::demo::consumer_toml::BOTH_PROJECTIONS;
use projector::demo::faults::{Fault, Target};

const BOTH: &[&str] = &["account_balances", "account_ledger"];
const EVENTS: usize = 200;

/// `fault` on the next `times` requests of `target`; `feed_extra` adds feed keys.
async fn recovers_from(store: Store, target: Target, fault: Fault, times: usize, feed_extra: &str) {
    let events = bank::generate(60, EVENTS);
    let harness = Harness::on(store, events.clone()).await;
    harness.server.inject(target, fault, times);
    let extra = format!("request_timeout = \"500ms\"\n{feed_extra}");
    harness.write_config(&harness.server.url(), BOTH_PROJECTIONS, &extra);
    let mut daemon = harness.spawn();
    harness
        .wait_for_checkpoints(&mut daemon, BOTH, EVENTS as u64)
        .await;
    assert_eq!(
        harness.server.faults_injected(),
        times as u64,
        "{fault:?} was not served"
    );
    harness.assert_exact(&events);
    assert_consistent(&harness, &events, &format!("{fault:?}"));
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        log.contains("retrying with backoff"),
        "{fault:?} was not retried: {log}"
    );
}

/// Each fault's test, on SQLite; and in `on_postgres`, the same on PostgreSQL.
macro_rules! retried {
    ($($name:ident: $target:ident $fault:expr, $times:literal;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread")]
            async fn $name() {
                recovers_from(Store::Sqlite, Target::$target, $fault, $times, "").await;
            }
        )*

        mod on_postgres {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    recovers_from(Store::Postgres, Target::$target, $fault, $times, "").await;
                }
            )*
        }
    };
}

retried! {
    http_500_on_a_page: Pages Fault::Status(500), 3;
    http_500_on_a_body: Bodies Fault::Status(500), 3;
    http_502_on_a_page: Pages Fault::Status(502), 3;
    http_429_on_a_page: Pages Fault::RetryAfter { status: 429, seconds: 0 }, 3;
    http_503_with_retry_after_on_a_body: Bodies Fault::RetryAfter { status: 503, seconds: 1 }, 3;
    reset_mid_body_on_a_page: Pages Fault::ResetMidBody, 3;
    reset_mid_body_on_a_body: Bodies Fault::ResetMidBody, 3;
    no_answer_until_the_request_timeout_on_a_page: Pages Fault::Hang, 3;
    no_answer_until_the_request_timeout_on_a_body: Bodies Fault::Hang, 3;
    a_body_cut_short: Bodies Fault::Truncated, 3;
    a_page_cut_short: Pages Fault::Truncated, 3;
    invalid_json_on_a_page: Pages Fault::InvalidJson, 3;
    invalid_json_on_a_body: Bodies Fault::InvalidJson, 3;
    events_not_an_array: Pages Fault::WrongShape, 3;
    entries_missing_fields: Pages Fault::MissingFields, 3;
    entries_with_wrong_types: Pages Fault::WrongTypes, 3;
    an_html_error_page_with_status_200_for_a_page: Pages Fault::HtmlPage, 3;
    an_html_error_page_with_status_200_for_a_body: Bodies Fault::HtmlPage, 3;
    a_null_body: Bodies Fault::NullBody, 3;
    a_page_repeating_an_event_id: Pages Fault::RepeatedId, 3;
    // The client follows 10 redirects: 25 make at least two page requests fail, and 400 at
    // least one of the 32 body requests made at once.
    a_redirect_loop_on_a_page: Pages Fault::RedirectLoop, 25;
    a_redirect_loop_on_a_body: Bodies Fault::RedirectLoop, 400;
}

/// 64 MiB streamed without a Content-Length is refused as it streams: the daemon's memory stays
/// far below it.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_streamed_page_is_refused_while_it_streams() {
    recovers_from(
        Store::Sqlite,
        Target::Pages,
        Fault::Oversized,
        3,
        "max_response_bytes = 1048576",
    )
    .await;
}

/// A small gzip body that inflates to 64 MiB: the limit counts inflated bytes, as they come.
#[tokio::test(flavor = "multi_thread")]
async fn a_gzip_bomb_is_refused_while_it_inflates() {
    recovers_from(
        Store::Sqlite,
        Target::Pages,
        Fault::GzipBomb,
        2,
        "max_response_bytes = 1048576",
    )
    .await;
    recovers_from(
        Store::Sqlite,
        Target::Bodies,
        Fault::GzipBomb,
        2,
        "max_response_bytes = 1048576",
    )
    .await;
}

/// The peak memory of a daemon that refused 64 MiB responses stays small, which it could not
/// if it read them before checking their size.
#[tokio::test(flavor = "multi_thread")]
async fn refusing_huge_responses_keeps_memory_small() {
    let events = bank::generate(61, EVENTS);
    let harness = Harness::new(events.clone()).await;
    harness.server.inject(Target::Pages, Fault::Oversized, 3);
    harness.server.inject(Target::Bodies, Fault::GzipBomb, 3);
    harness.write_config(
        &harness.server.url(),
        BOTH_PROJECTIONS,
        "max_response_bytes = 1048576",
    );
    let mut daemon = harness.spawn();
    harness
        .wait_for_checkpoints(&mut daemon, BOTH, EVENTS as u64)
        .await;
    let peak_kib = common::memory_kib(daemon.child.id(), "VmHWM")
        .unwrap_or_else(|| panic!("no peak memory for the daemon"));
    assert!(peak_kib < 48 * 1024, "peak RSS {peak_kib} KiB");
    harness.assert_exact(&events);
    assert!(daemon.terminate().await.0.success());
}

/// A body that 404s for ever is never skipped: the feed waits at that event (status says why),
/// and goes on once the body is served.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_404s_for_ever_holds_the_feed_at_that_event_until_it_is_served() {
    let events = bank::generate(62, EVENTS);
    let harness = Harness::new(events.clone()).await;
    harness
        .server
        .inject(Target::Bodies, Fault::Status(404), 1_000_000);
    let mut daemon = harness.spawn_running().await;
    harness
        .wait_for_backoff(&mut daemon, &["body of", "404"])
        .await;
    // Nothing past the missing body is applied: the first event needs a body, so nothing is.
    assert_eq!(harness.checkpoints().values().max().copied(), Some(0));
    assert_consistent(&harness, &events, "while the body is missing");

    harness.server.clear_faults();
    harness
        .wait_for_checkpoints(&mut daemon, BOTH, EVENTS as u64)
        .await;
    harness.assert_exact(&events);
    assert!(daemon.terminate().await.0.success());
}

/// A feed whose head falls below a checkpoint (a feed server restarted empty, say) applies
/// nothing until its events are back, then goes on by itself.
#[tokio::test(flavor = "multi_thread")]
async fn a_feed_that_shrinks_below_a_checkpoint_waits_until_its_events_are_back() {
    let events = bank::generate(63, 400);
    let harness = Harness::new(events[..200].to_vec()).await;
    let mut daemon = harness.spawn_running().await;
    harness.wait_for_checkpoints(&mut daemon, BOTH, 200).await;

    harness.server.replace(events[..120].to_vec());
    harness
        .wait_for_backoff(&mut daemon, &["the feed shrank"])
        .await;
    assert_consistent(&harness, &events, "while the feed is short");
    assert_eq!(harness.checkpoints()["account_balances"], 200);

    harness.server.replace(events.clone());
    harness.wait_for_checkpoints(&mut daemon, BOTH, 400).await;
    harness.assert_exact(&events);
    let (status, log) = daemon.terminate().await;
    assert!(status.success() && log.contains("feed recovered"), "{log}");
}

/// A feed rewritten under a running daemon (other events at offsets it has applied) halts that
/// feed, with both event ids, before anything of the new events is applied.
#[tokio::test(flavor = "multi_thread")]
async fn a_feed_rewritten_under_a_running_daemon_halts_at_once() {
    let events = bank::generate(64, 200);
    let harness = Harness::new(events.clone()).await;
    let mut daemon = harness.spawn_running().await;
    harness.wait_for_checkpoints(&mut daemon, BOTH, 200).await;

    harness.server.replace(bank::generate(65, 300));
    wait_for(&mut daemon, "the feed to halt", || {
        harness.feed_status("bank")["state"] == "halted"
    })
    .await;
    let feed = harness.feed_status("bank");
    let reason = feed["halted_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("the feed was rewritten") && reason.contains(&events[199].id),
        "{feed}"
    );
    harness.assert_exact(&events);
    assert!(daemon.terminate().await.0.success());
}
