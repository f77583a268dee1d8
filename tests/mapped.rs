//! Feeds of other shapes, read with only a `[feed.mapping]` in the config, against the real
//! binary: a feed paged by opaque cursors with its own field names, one paged by relative next
//! links, and a JSON-lines export read whole. Each is applied exactly, across restarts (one of
//! them a SIGKILL, with every fifth page request failing, and a rebuild), and a restart reads on
//! from the page its checkpoint kept, not from the first;
//! an event rewritten under the daemon halts the feed.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use common::{output_text, Harness};
use projector::config::FeedFormat;
use projector::demo::bank;
use projector::demo::consumer_toml::BOTH_PROJECTIONS;
use projector::demo::feed_server::StoredEvent;

const BOTH: &[&str] = &["account_balances", "account_ledger"];

/// A feed server of ours: the same events in three shapes of its own, and every query string
/// it was asked, by path.
#[derive(Clone, Default)]
struct OtherFeeds {
    events: Arc<Mutex<Vec<StoredEvent>>>,
    asked: Arc<Mutex<Vec<Asked>>>,
    /// Whether every fifth request to the cursor feed fails (503).
    flaky: Arc<AtomicBool>,
    /// The position of an event served without its payload, for now.
    hidden_body: Arc<Mutex<Option<usize>>>,
    /// How the cursor feed names the next page (see `NextStyle`).
    next_style: Arc<AtomicU8>,
}

/// How a cursor feed names the page after one; feeds do it each of these ways.
#[derive(Clone, Copy)]
#[repr(u8)]
enum NextStyle {
    /// After any page with events: the cursor past its last event; none on an empty page.
    AfterEvents = 0,
    /// Only after a full page.
    WhenFull = 1,
    /// Always, an empty page at the head naming its own cursor.
    Always = 2,
    /// The cursor of its last event, which the next page starts with again (an inclusive
    /// cursor); an empty page names its own.
    Inclusive = 3,
}

/// A request's path and query parameters.
type Asked = (String, HashMap<String, String>);

impl OtherFeeds {
    async fn start(events: Vec<StoredEvent>) -> (OtherFeeds, SocketAddr) {
        let feeds = OtherFeeds {
            events: Arc::new(Mutex::new(events)),
            ..OtherFeeds::default()
        };
        let app = Router::new()
            .route("/api/stream", get(cursor_page))
            .route("/linked", get(linked_page))
            .route("/export.jsonl", get(export))
            .with_state(feeds.clone());
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (feeds, addr)
    }

    fn note(&self, path: &str, query: &HashMap<String, String>) -> Vec<StoredEvent> {
        self.asked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((path.to_string(), query.clone()));
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn append(&self, more: &[StoredEvent]) {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.extend_from_slice(more);
    }

    /// The query strings `path` was asked with.
    fn asked(&self, path: &str) -> Vec<HashMap<String, String>> {
        let asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
        asked
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, query)| query.clone())
            .collect()
    }
}

/// An opaque cursor for the page starting at `position`.
fn cursor(position: usize) -> String {
    format!("c{:x}", position * 7919)
}

fn position_of(cursor: &str) -> Option<usize> {
    let scaled = usize::from_str_radix(cursor.strip_prefix('c')?, 16).ok()?;
    (scaled % 7919 == 0).then_some(scaled / 7919)
}

/// An event with names of its own: `{"meta": {"seq", "kind", "stream", "v", "at"}, "body"}`.
fn own_shape(position: usize, event: &StoredEvent) -> Value {
    json!({
        "meta": {
            "seq": position + 1,
            "eventId": event.id,
            "kind": event.event_type,
            "stream": event.aggregate_id,
            "v": event.aggregate_version,
            "at": event.created,
        },
        "body": serde_json::from_str::<Value>(&event.body).unwrap_or(Value::Null),
    })
}

/// `GET /api/stream?after=CURSOR&count=N`: the events after the cursor (from the first
/// without one), and the cursor after the page's last event, or null on an empty page.
async fn cursor_page(
    State(feeds): State<OtherFeeds>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<String, StatusCode> {
    let events = feeds.note("/api/stream", &query);
    if feeds.flaky.load(Ordering::Relaxed) && feeds.asked("/api/stream").len() % 5 == 4 {
        return Err(StatusCode::SERVICE_UNAVAILABLE);
    }
    let start = match query.get("after") {
        Some(after) => position_of(after).unwrap_or(usize::MAX),
        None => 0,
    }
    .min(events.len());
    let count: usize = query
        .get("count")
        .and_then(|c| c.parse().ok())
        .unwrap_or(10);
    let end = (start + count).min(events.len());
    let items: Vec<Value> = (start..end).map(|at| own_shape(at, &events[at])).collect();
    let next = match feeds.next_style.load(Ordering::Relaxed) {
        0 => (end > start).then(|| cursor(end)),
        1 => (end - start == count).then(|| cursor(end)),
        2 => Some(cursor(end)),
        _ => Some(cursor(end.saturating_sub(1).max(start))),
    };
    Ok(json!({"data": {"items": items}, "paging": {"next_cursor": next}}).to_string())
}

/// `GET /linked?page=N`: pages of 40, each full one with a relative link to the next.
async fn linked_page(
    State(feeds): State<OtherFeeds>,
    Query(query): Query<HashMap<String, String>>,
) -> String {
    let events = feeds.note("/linked", &query);
    let page: usize = query.get("page").and_then(|p| p.parse().ok()).unwrap_or(0);
    let start = (page * 40).min(events.len());
    let end = (start + 40).min(events.len());
    let hidden = *feeds.hidden_body.lock().unwrap_or_else(|e| e.into_inner());
    let items: Vec<Value> = (start..end)
        .map(|at| match own_shape(at, &events[at]) {
            mut event if Some(at) == hidden => {
                event["body"] = Value::Null;
                event
            }
            event => event,
        })
        .collect();
    let next = (end - start == 40).then(|| format!("linked?page={}", page + 1));
    json!({"events": items, "links": {"next": next}}).to_string()
}

/// `GET /export.jsonl`: every event, one a line.
async fn export(
    State(feeds): State<OtherFeeds>,
    Query(query): Query<HashMap<String, String>>,
) -> String {
    let events = feeds.note("/export.jsonl", &query);
    let mut text = String::new();
    for (at, event) in events.iter().enumerate() {
        text.push_str(&own_shape(at, event).to_string());
        text.push('\n');
    }
    text
}

/// The mapping of `own_shape`'s fields, and the paging lines.
fn mapping(paging: &str) -> String {
    format!(
        r#"
[feed.mapping]
id = "/meta/eventId"
type = "/meta/kind"
aggregate_id = "/meta/stream"
version = "/meta/v"
created = "/meta/at"
payload = "/body"
{paging}
"#
    )
}

async fn harness_for(url: &str, feed_keys: &str) -> Harness {
    let harness = Harness::new(Vec::new()).await;
    harness.write_config_in_format(FeedFormat::Inline, url, BOTH_PROJECTIONS, feed_keys, "");
    harness
}

/// The cursor a projection's checkpoint keeps.
fn kept_cursor(harness: &Harness, projection: &str) -> Option<String> {
    let conn = rusqlite::Connection::open(harness.database()).unwrap_or_else(|e| panic!("{e}"));
    conn.query_row(
        "SELECT page_cursor FROM projector_checkpoints WHERE projection = ?1",
        [projection],
        |row| row.get(0),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cursor_paged_feed_of_its_own_shape_is_applied_exactly_across_a_kill() {
    let all = bank::generate(70, 900);
    let (feeds, addr) = OtherFeeds::start(all[..400].to_vec()).await;
    feeds.flaky.store(true, Ordering::Relaxed);
    let paging = r#"events = "/data/items"
paging = "cursor"
next = "/paging/next_cursor"
cursor_param = "after"
limit_param = "count"
page_size = 25"#;
    let harness = harness_for(&format!("http://{addr}/api/stream"), &mapping(paging)).await;

    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 400).await;
    harness.assert_exact(&all[..400]);
    // The page the last event is on: it starts at 375.
    assert_eq!(kept_cursor(&harness, "account_balances"), Some(cursor(375)));
    // Killed at whatever point it reached while catching up with the next events.
    feeds.append(&all[400..700]);
    common::wait_for(&mut daemon, "events past 400 applied", || {
        harness.checkpoints().values().all(|&offset| offset > 420)
    })
    .await;
    daemon.kill();

    let first_pages = |feeds: &OtherFeeds| {
        feeds
            .asked("/api/stream")
            .iter()
            .filter(|query| !query.contains_key("after"))
            .count()
    };
    let before_restart = first_pages(&feeds);
    feeds.append(&all[700..]);
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 900).await;
    harness.assert_exact(&all);
    // Read on from the kept cursor: the first page was never asked for again.
    assert_eq!(first_pages(&feeds), before_restart);
    assert!(feeds
        .asked("/api/stream")
        .iter()
        .all(|query| query.get("count").map(String::as_str) == Some("25")));
    // The failed requests were retried, not passed over.
    assert!(daemon.log().contains("503"), "{}", daemon.log());
    // A rebuild reads the feed from its first page, and its checkpoint keeps its cursor too.
    let output = harness.run(&["rebuild", "account_ledger"]);
    assert!(output.status.success(), "{}", output_text(&output));
    common::wait_for_log(&mut daemon, "rebuilt: the new tables replaced the old ones").await;
    harness.assert_exact(&all);
    assert_eq!(kept_cursor(&harness, "account_ledger"), Some(cursor(875)));
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
}

/// For every way of naming the next page (one naming a page that starts again with the last
/// event of the one before), and pages of several sizes: events appended in
/// chunks, some one at a time, the daemon stopped or killed between them. Exact at the end, and
/// no restart reads the feed's first page again.
#[tokio::test(flavor = "multi_thread")]
async fn cursor_feeds_of_every_next_style_are_exact_across_restarts() {
    let styles = [
        (NextStyle::AfterEvents, 7),
        (NextStyle::WhenFull, 25),
        (NextStyle::Always, 40),
        (NextStyle::Inclusive, 10),
    ];
    for (index, (style, page_size)) in styles.into_iter().enumerate() {
        let all = bank::generate(80 + index as u64, 600);
        let (feeds, addr) = OtherFeeds::start(all[..100].to_vec()).await;
        feeds.next_style.store(style as u8, Ordering::Relaxed);
        let paging = format!(
            "events = \"/data/items\"\npaging = \"cursor\"\nnext = \"/paging/next_cursor\"\ncursor_param = \"after\"\nlimit_param = \"count\"\npage_size = {page_size}"
        );
        let harness = harness_for(&format!("http://{addr}/api/stream"), &mapping(&paging)).await;
        let mut daemon = harness.spawn();
        let mut first_pages = None;
        let boundaries = [100, 230, 231, 232, 400, 600];
        for (at, pair) in boundaries.windows(2).enumerate() {
            harness
                .wait_for_checkpoints(&mut daemon, BOTH, pair[0] as u64)
                .await;
            if at % 2 == 0 {
                daemon.kill();
            } else {
                let (status, log) = daemon.terminate().await;
                assert!(status.success(), "{log}");
            }
            let asked_first = feeds
                .asked("/api/stream")
                .iter()
                .filter(|query| !query.contains_key("after"))
                .count();
            assert_eq!(*first_pages.get_or_insert(asked_first), asked_first);
            feeds.append(&all[pair[0]..pair[1]]);
            daemon = harness.spawn();
        }
        harness.wait_for_checkpoints(&mut daemon, BOTH, 600).await;
        harness.assert_exact(&all);
        let (status, log) = daemon.terminate().await;
        assert!(status.success(), "{log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_feed_paged_by_relative_next_links_is_followed_and_read_on_after_a_restart() {
    let all = bank::generate(71, 500);
    let (feeds, addr) = OtherFeeds::start(all[..230].to_vec()).await;
    let paging = "paging = \"link\"\nnext = \"/links/next\"";
    let harness = harness_for(&format!("http://{addr}/linked"), &mapping(paging)).await;
    let check = harness.run(&["check", "--probe"]);
    let said = output_text(&check);
    assert!(check.status.success(), "{said}");
    assert!(
        said.contains("read 230 events from the first 6 pages; head at 230"),
        "{said}"
    );
    // An event on the second page without its payload: the page is applied up to it, and the
    // reader waits there, not following the page's next link, until the payload is served.
    *feeds.hidden_body.lock().unwrap_or_else(|e| e.into_inner()) = Some(50);
    let mut daemon = harness.spawn_running().await;
    harness
        .wait_for_backoff(&mut daemon, &["has no payload at \"/body\""])
        .await;
    harness.wait_for_checkpoints(&mut daemon, BOTH, 50).await;
    assert_eq!(harness.feed_status("bank")["state"], "backing_off");
    *feeds.hidden_body.lock().unwrap_or_else(|e| e.into_inner()) = None;
    harness.wait_for_checkpoints(&mut daemon, BOTH, 230).await;
    // New events on the last page, short until now, and on the pages it then links to.
    feeds.append(&all[230..300]);
    harness.wait_for_checkpoints(&mut daemon, BOTH, 300).await;
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
    assert_eq!(
        kept_cursor(&harness, "account_ledger"),
        Some(format!("http://{addr}/linked?page=7"))
    );

    feeds.append(&all[300..]);
    let asked_before = feeds.asked("/linked").len();
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 500).await;
    harness.assert_exact(&all);
    let pages_after: Vec<String> = feeds.asked("/linked")[asked_before..]
        .iter()
        .map(|query| query.get("page").cloned().unwrap_or_default())
        .collect();
    assert!(
        pages_after
            .iter()
            .all(|page| page.parse::<u32>().unwrap_or(0) >= 7),
        "{pages_after:?}"
    );
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_json_lines_export_is_read_whole_and_its_new_lines_applied_once() {
    let all = bank::generate(72, 300);
    let (feeds, addr) = OtherFeeds::start(all[..120].to_vec()).await;
    let paging = "encoding = \"json-lines\"\npaging = \"none\"";
    let harness = harness_for(&format!("http://{addr}/export.jsonl"), &mapping(paging)).await;
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 120).await;
    feeds.append(&all[120..200]);
    harness.wait_for_checkpoints(&mut daemon, BOTH, 200).await;
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
    feeds.append(&all[200..]);
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 300).await;
    harness.assert_exact(&all);
    // The export has no pages: nothing but its own URL was asked.
    assert!(feeds.asked("/export.jsonl").iter().all(HashMap::is_empty));
    // Each poll checks the last event applied: another one in its place halts the feed.
    feeds.events.lock().unwrap_or_else(|e| e.into_inner())[299].id = "rewritten".into();
    common::wait_for_log(&mut daemon, "the feed was rewritten").await;
    harness.assert_exact(&all);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mapping_that_cannot_work_is_refused_at_its_feed() {
    let harness = Harness::new(Vec::new()).await;
    let cases = [
        ("paging = \"cursor\"", "need `next`"),
        ("next = \"/next\"", "`next` is read only with paging"),
        ("id = \"meta/id\"", "is not a JSON pointer"),
        (
            "encoding = \"json-lines\"\nevents = \"/items\"",
            "`events` does not apply",
        ),
        ("paging = \"none\"\nunknown = 1", "unknown field `unknown`"),
    ];
    for (keys, says) in cases {
        harness.write_config_in_format(
            FeedFormat::Inline,
            &harness.server.inline_url(),
            BOTH_PROJECTIONS,
            &format!("[feed.mapping]\n{keys}\n"),
            "",
        );
        let output = harness.run(&["check"]);
        let text = output_text(&output);
        assert!(
            !output.status.success() && text.contains(says),
            "{keys}: {text}"
        );
        assert!(text.contains("consumer.toml:"), "{keys}: {text}");
    }
    // On a Flux feed, and with long-poll on a feed paged by cursors.
    harness.write_config(
        &harness.server.url(),
        BOTH_PROJECTIONS,
        "[feed.mapping]\nid = \"/id\"\n",
    );
    let text = output_text(&harness.run(&["check"]));
    assert!(text.contains("a mapping reads inline feeds"), "{text}");
    harness.write_config_in_format(
        FeedFormat::Inline,
        &harness.server.inline_url(),
        BOTH_PROJECTIONS,
        "live = \"long-poll\"\n[feed.mapping]\npaging = \"none\"\n",
        "",
    );
    let text = output_text(&harness.run(&["check"]));
    assert!(
        text.contains("live = \"long-poll\" asks for the page"),
        "{text}"
    );
}

#[test]
fn the_readmes_mapping_examples_are_valid_configs() {
    let readme = include_str!("../README.md");
    let blocks: Vec<&str> = readme
        .split("```toml\n")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .filter(|block| block.lines().any(|line| line == "[feed.mapping]"))
        .collect();
    assert_eq!(blocks.len(), 3);
    for block in blocks {
        let feed = match block.contains("[[feed]]") {
            true => String::new(),
            false => {
                "[[feed]]\nname = \"f\"\nurl = \"https://feed.internal/\"\nformat = \"inline\"\n"
                    .to_string()
            }
        };
        let text = format!(
            "[daemon]\ndatabase = \"p.db\"\ncontrol_socket = \"p.sock\"\n{feed}{block}\n[[projection]]\nname = \"p\"\nfeed = \"{}\"\nmodule = \"account_ledger\"\n",
            block
                .lines()
                .find_map(|line| line.strip_prefix("name = \""))
                .and_then(|rest| rest.strip_suffix('"'))
                .unwrap_or("f")
        );
        let parsed =
            projector::config::Config::parse(std::path::Path::new("/etc/consumer.toml"), text);
        assert!(parsed.is_ok(), "{block}: {:?}", parsed.err());
    }
}
