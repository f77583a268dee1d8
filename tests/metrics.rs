//! Watched from outside, against the real binary: `/metrics` read by a Prometheus text parser
//! while a faulty feed is consumed (counters exact against what the feed served), `/readyz`
//! before and after the head, `/healthz` turning 503 on a stall and on a halt and back to 200
//! once resolved, and the lag in seconds of a feed that stops answering bodies.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::{Duration, SystemTime};

use common::{poison_first_credit, projector, wait_for, wait_for_log, Daemon, Harness};
use projector::demo::bank::{self, CREATED, CREDITED, DEBITED, STATEMENT_REQUESTED};
use projector::demo::consumer_toml::BOTH_PROJECTIONS;
use projector::demo::faults::{Fault, Target};

const BOTH: &[&str] = &["account_balances", "account_ledger"];

/// The address the daemon serves metrics on, from its log.
async fn metrics_address(daemon: &mut Daemon) -> String {
    wait_for_log(daemon, "serving /metrics").await;
    let log = daemon.log();
    let line = log
        .lines()
        .find(|line| line.contains("serving /metrics"))
        .unwrap_or_default();
    line.split("address=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line}"))
        .trim_matches('"')
        .to_string()
}

/// GET `path`: the status code and the body.
fn get(address: &str, path: &str) -> (u16, String) {
    let mut stream =
        std::net::TcpStream::connect(address).unwrap_or_else(|e| panic!("{address}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("{e}"));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .unwrap_or_else(|e| panic!("{e}"));
    let code = answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (code, body)
}

/// Runs promtool (from the prometheus package, which `.ci/run` installs) with `stdin`.
fn promtool(args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = std::process::Command::new("promtool")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool (apt install prometheus): {e}"));
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
    }
    child.wait_with_output().unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_shipped_alerting_rules_are_valid() {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/prometheus/alerts.yml");
    let output = promtool(&["check", "rules", rules], "");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `/metrics`, parsed as Prometheus parses it: value by name and sorted labels.
fn scrape(address: &str) -> BTreeMap<String, f64> {
    let (code, body) = get(address, "/metrics");
    assert_eq!(code, 200, "{body}");
    let lines = body.lines().map(|line| Ok(line.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap_or_else(|e| panic!("{e}: {body}"));
    scrape
        .samples
        .into_iter()
        .filter_map(|sample| {
            let value = match sample.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => return None,
            };
            let mut labels: Vec<String> = sample
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            labels.sort();
            Some((format!("{}{{{}}}", sample.metric, labels.join(",")), value))
        })
        .collect()
}

fn value(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {:#?}", samples.keys().collect::<Vec<_>>()))
}

/// The sum of the samples of `metric` whose labels include every one of `labels`.
fn sum(samples: &BTreeMap<String, f64>, metric: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(key, _)| {
            key.starts_with(&format!("{metric}{{"))
                && labels.iter().all(|label| key.contains(label))
        })
        .map(|(_, v)| v)
        .sum()
}

fn config_with_metrics(harness: &Harness, projections: &str, feed_extra: &str) {
    harness.write_config_with_daemon(
        &harness.server.url(),
        projections,
        feed_extra,
        "metrics_listen = \"127.0.0.1:0\"\n",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_counters_are_exact_against_what_a_faulty_feed_served() {
    let events = bank::generate(40, 3000);
    let harness = Harness::new(events.clone()).await;
    config_with_metrics(&harness, BOTH_PROJECTIONS, "");
    harness.server.set_delay(Duration::from_millis(5));
    let mut daemon = harness.spawn();
    let address = metrics_address(&mut daemon).await;
    let (code, body) = get(&address, "/readyz");
    assert_eq!(code, 503, "ready before the head: {body}");
    assert!(body.contains("has not reached its head"), "{body}");
    harness.server.set_delay(Duration::ZERO);
    harness.server.random_faults(40, 0.05);
    harness.wait_for_checkpoints(&mut daemon, BOTH, 3000).await;
    wait_for(&mut daemon, "readiness", || {
        get(&address, "/readyz").0 == 200
    })
    .await;
    let (code, body) = get(&address, "/healthz");
    assert_eq!(code, 200, "{body}");

    // Paused, the daemon has no request in flight: what it counted is what the feed served.
    let output = harness.ctl(&["pause"]);
    assert!(output.status.success());
    let samples = scrape(&address);
    // Prometheus's own linter finds nothing against its naming conventions. It reads the
    // classic text format, where a counter's help is under its `_total` name; OpenMetrics (what
    // is served) gives it under the family's name, which is checked to be there instead.
    let (_, exposition) = get(&address, "/metrics");
    let lint = promtool(&["check", "metrics"], &exposition);
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    for complaint in complaints.lines().filter(|line| !line.trim().is_empty()) {
        let family = complaint
            .strip_suffix(" no help text")
            .and_then(|name| name.strip_suffix("_total"))
            .unwrap_or_else(|| panic!("promtool: {complaint}"));
        assert!(
            exposition.contains(&format!("# HELP {family} ")),
            "no help for {family}"
        );
    }
    // Every metric the shipped dashboard and alerts use is one the daemon serves.
    for file in [
        "contrib/grafana/projector.json",
        "contrib/prometheus/alerts.yml",
    ] {
        let text = std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR")))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let names = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|token| token.starts_with("projector_") || token.starts_with("process_"));
        for name in names {
            assert!(
                exposition.contains(name),
                "{file} uses {name}, which is not served"
            );
        }
    }
    let count = |types: &[&str]| {
        events
            .iter()
            .filter(|e| types.contains(&e.event_type.as_str()))
            .count() as f64
    };
    let handled = count(&[CREATED, CREDITED, DEBITED]);
    assert_eq!(
        value(&samples, "projector_events_read_total{feed=bank}"),
        3000.0
    );
    for projection in BOTH {
        assert_eq!(
            value(
                &samples,
                &format!("projector_events_applied_total{{feed=bank,projection={projection}}}")
            ),
            handled
        );
        assert_eq!(
            value(
                &samples,
                &format!("projector_checkpoint_offset{{feed=bank,projection={projection}}}")
            ),
            3000.0
        );
        assert_eq!(
            value(
                &samples,
                &format!("projector_lag_events{{feed=bank,projection={projection}}}")
            ),
            0.0
        );
        assert_eq!(
            value(
                &samples,
                &format!("projector_lag_seconds{{feed=bank,projection={projection}}}")
            ),
            0.0
        );
    }
    assert_eq!(
        value(&samples, "projector_events_passed_over_total{feed=bank}"),
        count(&[STATEMENT_REQUESTED])
    );
    let served_bodies: u64 = [CREATED, CREDITED, DEBITED, STATEMENT_REQUESTED]
        .iter()
        .map(|t| harness.server.body_requests(t))
        .sum();
    // A request dropped when the feed paused may or may not have reached the feed.
    for (kind, served) in [
        ("kind=page", harness.server.page_requests()),
        ("kind=body", served_bodies),
    ] {
        let made = sum(&samples, "projector_requests_total", &[kind]);
        let answered = made
            - sum(
                &samples,
                "projector_requests_total",
                &[kind, "outcome=cancelled"],
            );
        assert!(
            answered <= served as f64 && served as f64 <= made,
            "{kind}: the feed served {served}, the daemon counted {answered} answered of {made}"
        );
    }
    let failed = sum(&samples, "projector_requests_total", &[])
        - sum(&samples, "projector_requests_total", &["outcome=ok"])
        - sum(&samples, "projector_requests_total", &["outcome=cancelled"]);
    assert!(harness.server.faults_injected() > 0);
    assert_eq!(failed, harness.server.faults_injected() as f64);
    // Every failed body is retried; a failed page read ahead may turn out not to be needed
    // (a short page before it ended the run), and is then not asked again.
    let failed_bodies = sum(&samples, "projector_requests_total", &["kind=body"])
        - sum(
            &samples,
            "projector_requests_total",
            &["kind=body", "outcome=ok"],
        )
        - sum(
            &samples,
            "projector_requests_total",
            &["kind=body", "outcome=cancelled"],
        );
    let retries = value(&samples, "projector_retries_total{feed=bank}");
    assert!(
        failed_bodies <= retries && retries <= failed,
        "{failed_bodies} failed bodies, {retries} retries, {failed} failed requests"
    );
    assert_eq!(
        value(&samples, "projector_feed_state{feed=bank,state=paused}"),
        1.0
    );
    assert_eq!(value(&samples, "projector_paused{feed=bank}"), 1.0);
    assert_eq!(sum(&samples, "projector_feed_state", &[]), 1.0);
    assert!(sum(&samples, "projector_batch_events_count", &[]) >= 1.0);
    assert_eq!(sum(&samples, "projector_batch_events_sum", &[]), 3000.0);
    assert!(value(&samples, "process_resident_memory_bytes{}") > 1e6);
    assert!(value(&samples, "process_start_time_seconds{}") > 1.7e9);
    let (code, _) = get(&address, "/nothing");
    assert_eq!(code, 404);
    // A reload keeps the counters.
    let output = harness.ctl(&["reload"]);
    assert!(output.status.success());
    assert_eq!(
        value(&scrape(&address), "projector_events_read_total{feed=bank}"),
        3000.0
    );
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_turns_503_on_a_stall_and_a_halt_and_back_once_resolved() {
    let all = bank::generate(41, 1400);
    let harness = Harness::new(all[..1000].to_vec()).await;
    config_with_metrics(&harness, BOTH_PROJECTIONS, "stall_after = \"1s\"\n");
    let mut daemon = harness.spawn();
    let address = metrics_address(&mut daemon).await;
    harness.wait_for_checkpoints(&mut daemon, BOTH, 1000).await;
    assert_eq!(get(&address, "/healthz").0, 200);

    // The feed stops answering bodies: the checkpoints stand still behind the head.
    harness
        .server
        .inject(Target::Bodies, Fault::Status(500), 1_000_000);
    harness.server.append(all[1000..1200].to_vec());
    wait_for(&mut daemon, "the stall", || {
        get(&address, "/healthz").0 == 503
    })
    .await;
    let (_, body) = get(&address, "/healthz");
    assert!(body.contains("feed bank is stalled"), "{body}");
    let samples = scrape(&address);
    assert_eq!(
        value(&samples, "projector_feed_state{feed=bank,state=stalled}"),
        1.0
    );
    let lag = value(
        &samples,
        "projector_lag_seconds{feed=bank,projection=account_balances}",
    );
    // Entries of a type no projection applies need no body, so it may stand past 1000.
    let checkpoint = value(
        &samples,
        "projector_checkpoint_offset{feed=bank,projection=account_balances}",
    ) as usize;
    assert!((1000..1200).contains(&checkpoint), "{checkpoint}");
    let created = projector::metrics::created::parse(&all[checkpoint - 1].created)
        .unwrap_or_else(|| panic!("unreadable created"));
    let expected = SystemTime::now()
        .duration_since(created)
        .unwrap_or_default()
        .as_secs_f64();
    assert!(
        (lag - expected).abs() < 120.0,
        "lag {lag}s, expected about {expected}s"
    );
    let head = value(&samples, "projector_head_offset{feed=bank}");
    assert!(head > checkpoint as f64, "head {head}");
    assert_eq!(
        value(
            &samples,
            "projector_lag_events{feed=bank,projection=account_balances}"
        ),
        head - checkpoint as f64
    );
    let status = harness.feed_status("bank");
    assert_eq!(status["state"], "stalled", "{status}");
    wait_for_log(&mut daemon, "stalled: the checkpoints have not moved").await;

    harness.server.clear_faults();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 1200).await;
    wait_for(&mut daemon, "health again", || {
        get(&address, "/healthz").0 == 200
    })
    .await;
    wait_for_log(&mut daemon, "no longer stalled").await;
    assert_eq!(
        daemon
            .log()
            .matches("stalled: the checkpoints have not moved")
            .count(),
        1
    );

    // A poison event halts the ledger: unhealthy, until it is skipped.
    let mut more = all[1200..].to_vec();
    poison_first_credit(&mut more);
    harness.server.append(more);
    wait_for(&mut daemon, "the halt", || {
        let (code, body) = get(&address, "/healthz");
        code == 503 && body.contains("is halted")
    })
    .await;
    let (_, body) = get(&address, "/healthz");
    assert!(
        body.contains("projection account_ledger is halted"),
        "{body}"
    );
    assert_eq!(
        value(
            &scrape(&address),
            "projector_projection_halted{feed=bank,projection=account_ledger}"
        ),
        1.0
    );
    // The poison halts both shipped projections; each is skipped past it.
    let config = harness.config_path();
    for projection in BOTH {
        let output = projector(&[
            "skip",
            projection,
            "--config",
            config.to_str().unwrap_or_default(),
        ]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    harness.wait_for_checkpoints(&mut daemon, BOTH, 1400).await;
    wait_for(&mut daemon, "health after the skip", || {
        get(&address, "/healthz").0 == 200
    })
    .await;
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_figures_are_pushed_to_graphite_in_its_plaintext_protocol() {
    let events = bank::generate(42, 300);
    let harness = Harness::new(events.clone()).await;
    let graphite = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let address = graphite.local_addr().unwrap_or_else(|e| panic!("{e}"));
    harness.write_config_with_daemon(
        &harness.server.url(),
        BOTH_PROJECTIONS,
        "",
        &format!(
            "[daemon.graphite]\naddress = \"{address}\"\nprefix = \"test\"\ninterval = \"50ms\"\n"
        ),
    );
    let received = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let into = received.clone();
    std::thread::spawn(move || {
        for stream in graphite.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut text = String::new();
            let _ = stream.read_to_string(&mut text);
            into.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_str(&text);
        }
    });
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 300).await;
    let wanted = "test.bank.account_balances.checkpoint_offset 300 ";
    wait_for(&mut daemon, "the pushed checkpoint", || {
        received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(wanted)
    })
    .await;
    let text = received.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let line = text
        .lines()
        .rev()
        .find(|line| line.starts_with(wanted))
        .unwrap_or_default();
    let fields: Vec<&str> = line.split(' ').collect();
    assert_eq!(fields.len(), 3, "{line}");
    let at: u64 = fields[2].parse().unwrap_or_else(|e| panic!("{e}: {line}"));
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    assert!(now.abs_diff(at) < 60, "{line}");
    assert!(text.contains("test.bank.events_read 300 "), "{text}");
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
}
