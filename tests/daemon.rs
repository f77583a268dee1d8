//! The daemon, spawned as the real binary against an in-process Flux feed: exactness, restarts,
//! crashes, feed faults, poison events, rewritten feeds and configuration errors.

mod common;

use std::net::TcpListener;

use common::{projector, wait_for_log, Daemon, Harness};
use projector::demo::bank::{
    self, expected_balances, CREATED, CREDITED, DEBITED, STATEMENT_REQUESTED,
};
use projector::demo::consumer_toml::BOTH_PROJECTIONS;
use projector::demo::faults::{Fault, Target, TRANSIENT_BODY_FAULTS, TRANSIENT_PAGE_FAULTS};

const BOTH: &[&str] = &["account_balances", "account_ledger"];

#[tokio::test(flavor = "multi_thread")]
async fn folds_the_feed_exactly_passes_over_unregistered_types_and_stops_on_sigterm() {
    let events = bank::generate(1, 1500);
    let harness = Harness::new(events.clone()).await;
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 1500).await;

    harness.assert_exact(&events);
    assert!(events.iter().any(|e| e.event_type == STATEMENT_REQUESTED));
    assert_eq!(harness.server.body_requests(STATEMENT_REQUESTED), 0);
    // Full pages were fetched back to back: 75 pages of 20, plus polls at the head.
    assert!(harness.server.page_requests() >= 76);

    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "exit {status}; log:\n{log}");
    assert!(log.contains("stopped"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_resumes_without_applying_anything_twice() {
    let events = bank::generate(2, 1300);
    let (first, more) = events.split_at(700);
    let harness = Harness::new(first.to_vec()).await;
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 700).await;
    let (status, _) = daemon.terminate().await;
    assert!(status.success());

    harness.server.append(more.to_vec());
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 1300).await;
    harness.assert_exact(&events);
    let (status, _) = daemon.terminate().await;
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_batch_loses_nothing_and_applies_nothing_twice() {
    let events = bank::generate(3, 6000);
    let harness = Harness::new(events.clone()).await;
    // Faults slow the daemon down enough that the kills land mid-way.
    harness.server.random_faults(3, 0.05);
    for threshold in [500, 2500, 4500] {
        let mut daemon = harness.spawn();
        common::wait_for(&mut daemon, "progress", || {
            harness
                .checkpoints()
                .values()
                .all(|&offset| offset >= threshold)
        })
        .await;
        daemon.kill();
    }
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 6000).await;
    harness.assert_exact(&events);
    let (status, _) = daemon.terminate().await;
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_feed_failure_is_retried_until_the_read_model_is_exact() {
    let events = bank::generate(4, 400);
    let harness = Harness::new(events.clone()).await;
    // Every transient fault twice, plus a real Retry-After delay and a server that never answers.
    let extra = [
        Fault::RetryAfter {
            status: 503,
            seconds: 1,
        },
        Fault::Hang,
    ];
    let mut injected = 0;
    for (target, faults) in [
        (Target::Pages, TRANSIENT_PAGE_FAULTS),
        (Target::Bodies, TRANSIENT_BODY_FAULTS),
    ] {
        for &fault in faults.iter().chain(&extra) {
            harness.server.inject(target, fault, 2);
            injected += 2;
        }
    }
    // A short timeout so that the hanging requests fail fast.
    harness.write_config(
        &harness.server.url(),
        BOTH_PROJECTIONS,
        "request_timeout = \"300ms\"",
    );
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 400).await;
    assert_eq!(harness.server.faults_injected(), injected);
    harness.assert_exact(&events);
    let (status, log) = daemon.terminate().await;
    assert!(status.success());
    // The failure streak was reported when it began and when it ended, not per retry.
    assert!(log.contains("feed recovered"), "{log}");
    assert!(log.matches("retrying with backoff").count() < 10, "{log}");
}

/// One body that does not come holds one of the requests at once, not the others: the answers
/// behind it wait in order (up to four times `body_concurrency` of them) while requests go on.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_does_not_come_does_not_hold_up_the_requests_behind_it() {
    // Every event's body is wanted, so every entry is a request.
    let events: Vec<_> = bank::generate(9, 200)
        .into_iter()
        .filter(|event| event.event_type != STATEMENT_REQUESTED)
        .collect();
    let harness = Harness::new(events).await;
    harness.server.inject(Target::Bodies, Fault::Hang, 1);
    harness.write_config(
        &harness.server.url(),
        BOTH_PROJECTIONS,
        "body_concurrency = 2\nrequest_timeout = \"1h\"",
    );
    let mut daemon = harness.spawn();
    let body_requests = || {
        [CREATED, CREDITED, DEBITED]
            .iter()
            .map(|event_type| harness.server.body_requests(event_type))
            .sum::<u64>()
    };
    // Had the hanging request held up the others, no more than three would have been made.
    common::wait_for(&mut daemon, "the requests behind the hanging one", || {
        body_requests() >= 8
    })
    .await;
    assert_eq!(harness.server.faults_injected(), 1);
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "exit {status}; log:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_feed_that_refuses_connections_is_read_once_it_comes_up() {
    let addr = {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        probe.local_addr().unwrap_or_else(|e| panic!("{e}"))
    };
    let events = bank::generate(5, 300);
    // The harness's own server is elsewhere; point the daemon at the closed port first.
    let harness = Harness::new(Vec::new()).await;
    let url = format!("http://{addr}/events");
    harness.write_config(&url, BOTH_PROJECTIONS, "");
    let mut daemon = harness.spawn();
    wait_for_log(&mut daemon, "could not connect").await;
    let late = projector::demo::feed_server::FeedServer::start(addr, events.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    harness.wait_for_checkpoints(&mut daemon, BOTH, 300).await;
    harness.assert_exact(&events);
    drop(late);
    let (status, _) = daemon.terminate().await;
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_feed_is_read_through_the_proxy_the_environment_names() {
    let events = bank::generate(21, 300);
    let harness = Harness::new(events.clone()).await;
    // feed.invalid does not resolve: the daemon reaches it only by asking the proxy, which is the
    // feed server itself (it answers requests that carry the whole URL). Its pages name their
    // bodies on the same host.
    harness.write_config("http://feed.invalid/events", BOTH_PROJECTIONS, "");
    let proxy = format!("http://{}", harness.server.addr());
    let mut env = vec![
        ("HTTP_PROXY", proxy.as_str()),
        ("http_proxy", proxy.as_str()),
        // Not a proxy URL: said in the log, and passed over.
        ("ALL_PROXY", "ftp://not-a-proxy.example"),
    ];
    // Whatever the machine's own settings, nothing else decides.
    for name in ["NO_PROXY", "no_proxy", "all_proxy"] {
        env.push((name, ""));
    }
    let mut daemon = Daemon::spawn(&harness.config_path(), harness.dir.path(), &env);
    harness.wait_for_checkpoints(&mut daemon, BOTH, 300).await;
    harness.assert_exact(&events);
    let log = daemon.log();
    assert!(
        log.contains("reading through a proxy") && log.contains(&proxy),
        "{log}"
    );
    assert!(
        log.contains(r#"ALL_PROXY="ftp://not-a-proxy.example" is not a proxy URL; it is ignored"#),
        "{log}"
    );
    let (status, _) = daemon.terminate().await;
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_event_halts_a_stop_projection_and_is_dead_lettered_by_a_skip_one() {
    let mut events = bank::generate(6, 300);
    let poison = common::poison_first_credit(&mut events);
    let harness = Harness::new(events.clone()).await;
    let projections = BOTH_PROJECTIONS.replace(
        "module = \"account_ledger\"",
        "module = \"account_ledger\"\non_error = \"skip\"",
    );
    harness.write_config(&harness.server.url(), &projections, "");
    let mut daemon = harness.spawn();
    harness
        .wait_for_checkpoints(&mut daemon, &["account_ledger"], 300)
        .await;
    harness
        .wait_for_checkpoints(&mut daemon, &["account_balances"], poison as u64)
        .await;
    wait_for_log(&mut daemon, "projection halted").await;
    assert_eq!(
        harness.count(&format!(
            "SELECT count(*) FROM projector_dead_letters WHERE projection = 'account_ledger' AND event_offset = {poison} AND error LIKE '%invalid type%'"
        )),
        1
    );
    // The stop projection holds exactly the events before the poison one.
    assert_eq!(harness.balances(), expected_balances(&events[..poison]));
    let (status, log) = daemon.terminate().await;
    assert!(status.success());
    assert!(log.contains(&format!("offset={poison}")), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rewritten_feed_halts_instead_of_applying_the_wrong_events() {
    let events = bank::generate(7, 200);
    let harness = Harness::new(events.clone()).await;
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 200).await;
    let (status, _) = daemon.terminate().await;
    assert!(status.success());

    harness.server.replace(bank::generate(8, 400));
    let mut daemon = harness.spawn();
    wait_for_log(&mut daemon, "the feed was rewritten").await;
    harness.assert_exact(&events);
    assert_eq!(harness.checkpoints().get("account_balances"), Some(&200));
    let (status, _) = daemon.terminate().await;
    assert!(status.success(), "a halted feed does not end the daemon");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_projection_builds_from_zero_while_the_other_goes_on() {
    let events = bank::generate(9, 900);
    let harness = Harness::new(events[..500].to_vec()).await;
    let balances_only = BOTH_PROJECTIONS
        .split("[[projection]]")
        .nth(1)
        .map(|table| format!("[[projection]]{table}"))
        .unwrap_or_default();
    harness.write_config(&harness.server.url(), &balances_only, "");
    let mut daemon = harness.spawn();
    harness
        .wait_for_checkpoints(&mut daemon, &["account_balances"], 500)
        .await;
    let (status, _) = daemon.terminate().await;
    assert!(status.success());

    harness.server.append(events[500..].to_vec());
    harness.write_config(&harness.server.url(), BOTH_PROJECTIONS, "");
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 900).await;
    harness.assert_exact(&events);
    let (status, log) = daemon.terminate().await;
    assert!(status.success());
    // Two readers: the caught-up projection did not wait for the new one.
    assert!(log.contains("next_offset=500"), "{log}");
    assert!(log.contains("next_offset=0"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn config_errors_name_file_line_and_column_and_exit_2() {
    let harness = Harness::new(Vec::new()).await;
    let config = harness.config_path();
    let config_arg = config.to_string_lossy().to_string();

    let output = projector(&["check", "--config", &config_arg]);
    assert!(output.status.success(), "{output:?}");

    let text = std::fs::read_to_string(&config).unwrap_or_else(|e| panic!("{e}"));
    let cases = [
        (
            text.replace("poll_interval = \"50ms\"", "poll_interval = \"0s\""),
            ":9:17:",
        ),
        (
            text.replace("poll_interval = \"50ms\"", "poll_interval = \"-5s\""),
            ":9:17:",
        ),
        (text.replace("[[feed]]", "[[feed]"), ":5:"),
        (
            text.replace("retry_max = \"200ms\"", "retry_max = 200"),
            ":11:13:",
        ),
        (text.replace("name = \"bank\"", "name = \"\""), ":6:8:"),
        (
            text.replace("name = \"account_ledger\"", "name = \"account_balances\""),
            ":20:8:",
        ),
        (
            text.replace(&harness.server.url(), "http://:80/events"),
            ":7:7:",
        ),
        (
            // A folder where the projection file should be: unreadable.
            text.replace("file = \"account_balances.toml\"", "file = \".\""),
            ":17:8:",
        ),
        (
            text.replace("format = \"flux\"", "format = \"atom\""),
            ":8:10:",
        ),
        (text.replace("feed = \"bank\"", "feed = \"nope\""), ":16:8:"),
        (
            text.replace("account_balances.toml", "missing.toml"),
            ":17:8:",
        ),
        (format!("{text}\nsurprise = 1\n"), ":24:1:"),
    ];
    for (bad, location) in cases {
        std::fs::write(&config, &bad).unwrap_or_else(|e| panic!("{e}"));
        for command in ["check", "run"] {
            let output = projector(&[command, "--config", &config_arg]);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{command}: {stderr}");
            assert!(
                stderr.contains(&format!("consumer.toml{location}")),
                "{command}: expected {location} in: {stderr}"
            );
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
    let output = projector(&["check", "--config", "/nonexistent/consumer.toml"]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn an_empty_query_is_a_usage_error() {
    let output = projector(&["query", "--database", "/nonexistent.db", " "]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("the query is empty"));
}

#[test]
fn demo_arguments_out_of_range_are_usage_errors_that_exit_2() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dir_arg = dir.path().to_string_lossy().to_string();
    for (args, says) in [
        (["--events", "0"], "--events must be between 1 and"),
        (
            ["--fault-rate", "0.9"],
            "--fault-rate must be between 0 and 0.5",
        ),
    ] {
        let mut all = vec!["demo", "--dir", &dir_arg];
        all.extend(args);
        let output = projector(&all);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_response_is_refused_and_retried_not_applied() {
    let events = bank::generate(10, 100);
    let harness = Harness::new(events).await;
    // A page of 20 entries is about 5 KiB: over this limit.
    harness.write_config(
        &harness.server.url(),
        BOTH_PROJECTIONS,
        "max_response_bytes = 1024",
    );
    let mut daemon = harness.spawn();
    wait_for_log(&mut daemon, "over the limit of 1024").await;
    assert_eq!(harness.checkpoints().get("account_balances"), Some(&0));
    let (status, _) = daemon.terminate().await;
    assert!(status.success());
}

#[test]
fn the_demo_runs_the_pipeline_and_checks_its_result() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dir_arg = dir.path().to_string_lossy().to_string();
    let output = projector(&[
        "demo",
        "--events",
        "400",
        "--fault-rate",
        "0.1",
        "--dir",
        &dir_arg,
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("account_balances matches the fold of the feed"),
        "{stdout}"
    );
    // What it wrote is a real config that `check` accepts and `query` reads.
    let config = dir
        .path()
        .join("consumer.toml")
        .to_string_lossy()
        .to_string();
    assert!(projector(&["check", "--config", &config]).status.success());
    let query = projector(&[
        "query",
        "--config",
        &config,
        "--json",
        "SELECT count(*) AS n FROM account_ledger_entries",
    ]);
    assert!(
        String::from_utf8_lossy(&query.stdout).starts_with("{\"n\":"),
        "{query:?}"
    );
    // The hints it prints work as they are, copied into a shell.
    let hint = stdout
        .lines()
        .find(|line| line.contains(" query --config "))
        .unwrap_or_else(|| panic!("no query hint in {stdout}"));
    let copied = std::process::Command::new("sh")
        .args(["-c", hint.trim()])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        copied.status.success() && String::from_utf8_lossy(&copied.stdout).contains("rows)"),
        "{hint}: {copied:?}"
    );
    // Its config says how to serve the same feed again, and how to run the daemon on it.
    let written = std::fs::read_to_string(&config).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        written.contains("# To run the daemon on this file again")
            && written.contains("--example bank_feed -- --events 400 --port ")
            && written.contains(&format!(
                "{} run --config {config}",
                env!("CARGO_BIN_EXE_projector")
            )),
        "{written}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reader_holding_a_transaction_open_does_not_block_the_daemon() {
    let events = bank::generate(11, 1000);
    let harness = Harness::new(events[..200].to_vec()).await;
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 200).await;

    // A reader in the middle of a long read transaction, as an operator's sqlite3 shell would be.
    let reader =
        projector::store::open_reader(&harness.database()).unwrap_or_else(|e| panic!("{e}"));
    reader
        .execute_batch("BEGIN; SELECT count(*) FROM account_balances;")
        .unwrap_or_else(|e| panic!("{e}"));
    harness.server.append(events[200..].to_vec());
    harness.wait_for_checkpoints(&mut daemon, BOTH, 1000).await;
    // The reader still sees its snapshot, and was never refused.
    let seen: i64 = reader
        .query_row(
            "SELECT next_offset FROM projector_checkpoints LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(seen, 200);
    reader
        .execute_batch("COMMIT")
        .unwrap_or_else(|e| panic!("{e}"));
    harness.assert_exact(&events);
    let (status, _) = daemon.terminate().await;
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_daemon_on_the_same_database_refuses_to_start() {
    let events = bank::generate(12, 100);
    let harness = Harness::new(events.clone()).await;
    let mut first = harness.spawn();
    harness.wait_for_checkpoints(&mut first, BOTH, 100).await;
    let config = harness.config_path().to_string_lossy().to_string();
    let second = projector(&["run", "--config", &config]);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("another projector is already running"),
        "{stderr}"
    );
    harness.assert_exact(&events);
    let (status, _) = first.terminate().await;
    assert!(status.success());
}

#[test]
fn the_demo_piped_into_a_reader_that_goes_away_finishes_without_a_panic() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_projector"))
        .args(["demo", "--events", "400", "--dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    // `| head -1`: read one line, then close the pipe.
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let mut first = String::new();
    BufReader::new(stdout)
        .read_line(&mut first)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(first.contains("Embedded Flux bank feed"), "{first}");
    let output = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_declarative_projection_on_every_type_counts_the_whole_feed() {
    let events = bank::generate(13, 700);
    let harness = Harness::new(events.clone()).await;
    std::fs::write(
        harness.dir.path().join("audit.toml"),
        r#"
schema = "CREATE TABLE IF NOT EXISTS audit (event_type TEXT PRIMARY KEY, events INTEGER NOT NULL)"
[on."*"]
sql = "INSERT INTO audit VALUES (:type, 1) ON CONFLICT (event_type) DO UPDATE SET events = events + 1"
params = { type = "@event_type" }
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let audit = "\n[[projection]]\nname = \"audit\"\nfeed = \"bank\"\nfile = \"audit.toml\"\n";
    harness.write_config(&harness.server.url(), audit, "");
    let mut daemon = harness.spawn();
    harness
        .wait_for_checkpoints(&mut daemon, &["audit"], 700)
        .await;
    for event_type in [CREATED, CREDITED, DEBITED, STATEMENT_REQUESTED] {
        let expected = events.iter().filter(|e| e.event_type == event_type).count() as i64;
        let counted = harness.count(&format!(
            "SELECT coalesce(sum(events), 0) FROM audit WHERE event_type = '{event_type}'"
        ));
        assert_eq!(counted, expected, "{event_type}");
    }
    // Every type is the projection's: every body was fetched, the unhandled type's too.
    assert!(harness.server.body_requests(STATEMENT_REQUESTED) > 0);
    let (status, _) = daemon.terminate().await;
    assert!(status.success());
}
