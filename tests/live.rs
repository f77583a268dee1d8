//! `live = "sse"` and `live = "long-poll"` against the real binary: at the head, a message on
//! the publisher's event stream, or the answer to a page request the feed held, brings new
//! events at once (with an hour between polls, nothing else can have), and a stream that cannot
//! be reached leaves the feed polled as before.

mod common;

use common::{wait_for_log, Harness};
use projector::demo::bank;
use projector::demo::consumer_toml::BOTH_PROJECTIONS;

const BOTH: &[&str] = &["account_balances", "account_ledger"];

/// The harness's config with `poll_interval` replaced and `feed_keys` added.
fn config(harness: &Harness, poll_interval: &str, feed_keys: &str) {
    harness.write_config(&harness.server.url(), BOTH_PROJECTIONS, feed_keys);
    let path = harness.config_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
    let text = text.replace(
        "poll_interval = \"50ms\"",
        &format!("poll_interval = \"{poll_interval}\""),
    );
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
}

/// Appends the events of `all` after `from` one at a time, each seen applied before the next
/// (with an hour between polls, only the live mode under test can have brought it); then the
/// read model is exact and the daemon stops cleanly.
async fn see_each_event_as_it_is_appended(
    harness: &Harness,
    mut daemon: common::Daemon,
    all: &[projector::demo::feed_server::StoredEvent],
    from: usize,
) {
    for (at, event) in all[from..].iter().enumerate() {
        harness.server.append(vec![event.clone()]);
        harness
            .wait_for_checkpoints(&mut daemon, BOTH, (from + at + 1) as u64)
            .await;
    }
    harness.assert_exact(all);
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_on_the_live_stream_makes_the_reader_fetch_at_once() {
    let all = bank::generate(60, 600);
    let harness = Harness::new(all[..500].to_vec()).await;
    let live = harness.server.live_url();
    config(
        &harness,
        "1h",
        &format!("live = \"sse\"\nlive_url = \"{live}\"\n"),
    );
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 500).await;
    wait_for_log(&mut daemon, "live stream open").await;
    see_each_event_as_it_is_appended(&harness, daemon, &all, 500).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_page_request_held_at_the_head_brings_new_events_at_once() {
    let all = bank::generate(62, 560);
    let harness = Harness::new(all[..500].to_vec()).await;
    config(
        &harness,
        "1h",
        "live = \"long-poll\"\nlong_poll_wait = \"20s\"\n",
    );
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 500).await;
    see_each_event_as_it_is_appended(&harness, daemon, &all, 500).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_live_stream_that_cannot_be_reached_leaves_the_feed_polled() {
    let all = bank::generate(61, 400);
    let harness = Harness::new(all[..300].to_vec()).await;
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("{e}"));
    config(
        &harness,
        "50ms",
        &format!("live = \"sse\"\nlive_url = \"http://{closed}/live\"\n"),
    );
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 300).await;
    wait_for_log(&mut daemon, "live stream:").await;
    harness.server.append(all[300..].to_vec());
    harness.wait_for_checkpoints(&mut daemon, BOTH, 400).await;
    harness.assert_exact(&all);
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
}

#[test]
fn live_sse_without_a_url_is_refused_at_the_feed() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("consumer.toml");
    let mut toml = projector::demo::consumer_toml::ConsumerToml::new(
        "http://127.0.0.1:9/events",
        projector::config::FeedFormat::Flux,
    );
    toml.feed_keys = "live = \"sse\"\n".into();
    toml.write(&path).unwrap_or_else(|e| panic!("{e}"));
    let output = common::projector(&["check", "--config", path.to_str().unwrap_or_default()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(common::output_text(&output).contains("needs live_url"));
}
