//! What an operator sees while a feed catches up and when it cannot be read at all: the head
//! found rather than guessed, the time left, progress in the log, and a hint when page requests
//! keep failing the way a mistake in the config makes them fail.

mod common;

use std::time::Duration;

use common::{wait_for, wait_for_log, Daemon, Harness};
use projector::config::FeedFormat;
use projector::demo::bank;
use projector::demo::consumer_toml::BOTH_PROJECTIONS;

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_catch_up_finds_the_head_and_says_how_long_is_left() {
    let events = bank::generate(81, 3000);
    let harness = Harness::new(events.clone()).await;
    // A feed across a network, read two bodies at a time: about half a minute of catching up.
    harness.server.set_delay(Duration::from_millis(20));
    harness.write_config(
        &harness.server.url(),
        BOTH_PROJECTIONS,
        "find_head = true\nbody_concurrency = 2",
    );
    let mut daemon = harness.spawn_running().await;
    wait_for(
        &mut daemon,
        "the head to be found while catching up",
        || {
            let feed = harness.feed_status("bank");
            feed["state"] == "catching_up" && feed["head"] == 3000 && feed["head_exact"] == true
        },
    )
    .await;
    wait_for(&mut daemon, "the time left", || {
        harness.feed_status("bank")["eta_seconds"]
            .as_u64()
            .is_some()
    })
    .await;
    let feed = harness.feed_status("bank");
    let slowest = feed["projections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["checkpoint"].as_u64())
        .min()
        .unwrap_or(0);
    assert_eq!(feed["lag"].as_u64(), Some(3000 - slowest), "{feed}");
    assert!(
        feed["events_read"].as_u64().unwrap_or(u64::MAX) <= 3000,
        "{feed}"
    );
    let text = String::from_utf8_lossy(&harness.ctl(&["status"]).stdout).into_owned();
    assert!(
        text.contains("head 3000  lag ") && text.contains(" left  read "),
        "{text}"
    );
    // Every few seconds the log says where the catch-up is, how fast, and what is left.
    wait_for_log(&mut daemon, "catching up: at offset").await;
    let log = daemon.log();
    assert!(
        log.contains(" of 3000, ") && log.contains("events/s"),
        "{log}"
    );
    assert!(daemon.terminate().await.0.success());
}

/// Waits until feed `bank` shows a hint containing `says`, and checks that the log says it.
async fn hinted(harness: &Harness, daemon: &mut Daemon, says: &str) {
    wait_for(daemon, &format!("the hint {says:?}"), || {
        let feed = harness.feed_status("bank");
        feed["state"] == "backing_off" && feed["hint"].as_str().is_some_and(|h| h.contains(says))
    })
    .await;
    wait_for_log(daemon, says).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_feed_url_that_answers_404_gets_a_hint_while_it_is_retried() {
    let harness = Harness::new(bank::generate(82, 100)).await;
    let url = format!("http://{}/no-feed-here", harness.server.addr());
    harness.write_config(&url, BOTH_PROJECTIONS, "");
    let mut daemon = harness.spawn_running().await;
    hinted(
        &harness,
        &mut daemon,
        "the feed URL answers 404 Not Found: is the URL right?",
    )
    .await;
    let text = String::from_utf8_lossy(&harness.ctl(&["status"]).stdout).into_owned();
    assert!(text.contains("  hint: the feed URL answers 404"), "{text}");
    assert!(daemon.terminate().await.0.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_of_the_other_format_get_a_hint_naming_it() {
    let events = bank::generate(83, 100);
    let harness = Harness::new(events.clone()).await;
    // The Flux feed, configured as an inline one.
    harness.write_config_in_format(
        FeedFormat::Inline,
        &harness.server.url(),
        BOTH_PROJECTIONS,
        "",
        "",
    );
    let mut daemon = harness.spawn_running().await;
    hinted(
        &harness,
        &mut daemon,
        "the feed answers pages of the flux format: is format = \"flux\" meant?",
    )
    .await;
    // Nothing was applied from pages it could not read.
    assert_eq!(harness.checkpoints().get("account_balances"), Some(&0));
    assert!(daemon.terminate().await.0.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_that_does_not_resolve_gets_a_hint() {
    let harness = Harness::new(Vec::new()).await;
    harness.write_config("http://feed.invalid/events", BOTH_PROJECTIONS, "");
    // Whatever the machine's proxy settings, the name is looked up here.
    let env: Vec<(&str, &str)> = [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .iter()
    .map(|name| (*name, ""))
    .collect();
    let mut daemon = Daemon::spawn(&harness.config_path(), harness.dir.path(), &env);
    wait_for_log(&mut daemon, "projector is running").await;
    hinted(
        &harness,
        &mut daemon,
        "the feed's host name does not resolve: is the host right?",
    )
    .await;
    assert!(daemon.terminate().await.0.success());
}
