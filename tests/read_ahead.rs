//! Pages read ahead, against the real binary: while pages come back full, up to
//! `page_lookahead` are asked for at once (and one at a time with 1), and a page that comes
//! back short ends the run without error; nothing is applied out of order or twice.

mod common;

use std::time::Duration;

use common::{wait_for, Harness};
use projector::demo::bank;
use projector::demo::consumer_toml::BOTH_PROJECTIONS;

const BOTH: &[&str] = &["account_balances", "account_ledger"];

#[tokio::test(flavor = "multi_thread")]
async fn full_pages_are_asked_for_page_lookahead_at_a_time_and_applied_exactly() {
    let events = bank::generate(50, 2000);
    for (lookahead, most) in [(4, 4), (1, 1)] {
        let harness = Harness::new(events.clone()).await;
        harness.write_config(
            &harness.server.url(),
            BOTH_PROJECTIONS,
            &format!("page_lookahead = {lookahead}\n"),
        );
        // Each answer waits, as across a network, so that pages asked for at once overlap.
        harness.server.set_delay(Duration::from_millis(2));
        let mut daemon = harness.spawn();
        harness.wait_for_checkpoints(&mut daemon, BOTH, 2000).await;
        harness.assert_exact(&events);
        let at_once = harness.server.most_pages_in_flight();
        if lookahead == 1 {
            assert_eq!(at_once, 1, "one page at a time with page_lookahead = 1");
        } else {
            assert!(
                (2..=most).contains(&at_once),
                "{at_once} pages at once with page_lookahead = {lookahead}"
            );
        }
        let (status, log) = daemon.terminate().await;
        assert!(status.success(), "{log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_page_shorter_than_the_ones_before_ends_the_run_and_nothing_is_skipped() {
    let events = bank::generate(51, 6000);
    let harness = Harness::new(events.clone()).await;
    harness.server.set_inline_page_size(100);
    harness.write_inline_config(BOTH_PROJECTIONS, "");
    harness.server.set_delay(Duration::from_millis(20));
    let mut daemon = harness.spawn();
    wait_for(&mut daemon, "the first pages", || {
        harness.server.page_requests() >= 5
    })
    .await;
    // The pages asked for ahead assumed 100 entries a page; from now on they are shorter.
    harness.server.set_inline_page_size(30);
    let reached = harness.server.page_requests();
    harness.server.set_delay(Duration::ZERO);
    harness.wait_for_checkpoints(&mut daemon, BOTH, 6000).await;
    assert!(
        harness.server.page_requests() > reached + 100,
        "the rest of the feed was not read in short pages"
    );
    harness.assert_exact(&events);
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
}
