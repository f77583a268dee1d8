//! The control plane, against the real binary: pause and resume by socket and by signal on a
//! growing feed, stop, status, a pause surviving a restart, SIGHUP reloads, one daemon per
//! socket, stale sockets, bad control input, systemd notifications and log formats, and a batch
//! that never ends: shown by `status`, interrupted by a stop after `stop_timeout`, cut short by a
//! second SIGTERM.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::{Duration, Instant};

use common::{wait_for, wait_for_log, Daemon, Harness, Store, DEADLINE};
use projector::demo::bank;
use projector::demo::consumer_toml::BOTH_PROJECTIONS;
use projector::demo::faults::{Fault, Target};

const BOTH: &[&str] = &["account_balances", "account_ledger"];

/// Several poll intervals (50 ms in the tests): long enough for a daemon that ignored a pause
/// to show it. Waiting for something not to happen needs some time; no test passes by it.
const QUIET_PERIOD: Duration = Duration::from_millis(500);

// The tests of steering that apply to either store, run on both.
on_both_stores! {
    pause_and_resume_by_socket_and_by_signal_freeze_and_restore_a_growing_feed_in_store => pause_and_resume_by_socket_and_by_signal_freeze_and_restore_a_growing_feed, pause_and_resume_by_socket_and_by_signal_freeze_and_restore_a_growing_feed_on_postgres;
    a_feed_backing_off_after_errors_stops_retrying_when_paused_in_store => a_feed_backing_off_after_errors_stops_retrying_when_paused, a_feed_backing_off_after_errors_stops_retrying_when_paused_on_postgres;
    stop_by_socket_exits_0_after_the_daemon_is_gone_and_removes_the_socket_in_store => stop_by_socket_exits_0_after_the_daemon_is_gone_and_removes_the_socket, stop_by_socket_exits_0_after_the_daemon_is_gone_and_removes_the_socket_on_postgres;
    a_stop_interrupts_a_batch_that_has_not_committed_after_stop_timeout_in_store => a_stop_interrupts_a_batch_that_has_not_committed_after_stop_timeout, a_stop_interrupts_a_batch_that_has_not_committed_after_stop_timeout_on_postgres;
    a_second_sigterm_while_a_batch_is_stuck_exits_at_once_and_loses_nothing_in_store => a_second_sigterm_while_a_batch_is_stuck_exits_at_once_and_loses_nothing, a_second_sigterm_while_a_batch_is_stuck_exits_at_once_and_loses_nothing_on_postgres;
    status_reports_state_checkpoints_head_lag_retries_and_the_last_error_in_store => status_reports_state_checkpoints_head_lag_retries_and_the_last_error, status_reports_state_checkpoints_head_lag_retries_and_the_last_error_on_postgres;
    status_names_a_halted_projection_and_its_poison_event_in_store => status_names_a_halted_projection_and_its_poison_event, status_names_a_halted_projection_and_its_poison_event_on_postgres;
    a_pause_survives_a_restart_until_resumed_in_store => a_pause_survives_a_restart_until_resumed, a_pause_survives_a_restart_until_resumed_on_postgres;
    sighup_adds_a_projection_and_a_broken_config_is_refused_while_the_old_one_runs_in_store => sighup_adds_a_projection_and_a_broken_config_is_refused_while_the_old_one_runs, sighup_adds_a_projection_and_a_broken_config_is_refused_while_the_old_one_runs_on_postgres;
    a_reload_that_cannot_start_brings_the_previous_configuration_back_in_store => a_reload_that_cannot_start_brings_the_previous_configuration_back, a_reload_that_cannot_start_brings_the_previous_configuration_back_on_postgres;
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// While the feed grows by `more`, nothing is requested or written: the read model is frozen.
async fn assert_frozen(harness: &Harness, more: Vec<projector::demo::feed_server::StoredEvent>) {
    let checkpoints = harness.checkpoints();
    let balances = harness.balances();
    let pages = harness.server.page_requests();
    harness.server.append(more);
    tokio::time::sleep(QUIET_PERIOD).await;
    assert_eq!(
        harness.server.page_requests(),
        pages,
        "requests while paused"
    );
    assert_eq!(harness.checkpoints(), checkpoints, "writes while paused");
    assert_eq!(harness.balances(), balances);
}

async fn pause_and_resume_by_socket_and_by_signal_freeze_and_restore_a_growing_feed_in_store(
    store: Store,
) {
    let events = bank::generate(30, 3000);
    let harness = Harness::on(store, events[..1000].to_vec()).await;
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 1000).await;

    let paused = harness.ctl(&["pause"]);
    assert!(paused.status.success(), "{}", stderr(&paused));
    assert_eq!(stdout(&paused).trim(), "paused bank");
    // Pausing is idempotent.
    assert!(harness.ctl(&["pause", "bank"]).status.success());
    let status = harness.feed_status("bank");
    assert_eq!(status["state"], "paused", "{status}");
    assert_eq!(status["paused"], true);
    assert_frozen(&harness, events[1000..1500].to_vec()).await;

    let resumed = harness.ctl(&["resume", "bank"]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert_eq!(stdout(&resumed).trim(), "resumed bank");
    assert!(harness.ctl(&["resume"]).status.success());
    harness.wait_for_checkpoints(&mut daemon, BOTH, 1500).await;
    harness.assert_exact(&events[..1500]);

    daemon.signal("USR1");
    wait_for(&mut daemon, "SIGUSR1 to pause the feed", || {
        harness.feed_status("bank")["state"] == "paused"
    })
    .await;
    assert_frozen(&harness, events[1500..].to_vec()).await;
    daemon.signal("USR2");
    harness.wait_for_checkpoints(&mut daemon, BOTH, 3000).await;
    harness.assert_exact(&events);

    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
    assert!(log.contains("SIGUSR1 received") && log.contains("SIGUSR2 received"));
}

async fn a_feed_backing_off_after_errors_stops_retrying_when_paused_in_store(store: Store) {
    let events = bank::generate(42, 300);
    let harness = Harness::on(store, events.clone()).await;
    // Failing until the test clears it, however long the test takes to look.
    harness
        .server
        .inject(Target::Pages, Fault::Status(503), 1_000_000);
    let mut daemon = harness.spawn_running().await;
    wait_for(&mut daemon, "the feed to back off", || {
        harness.feed_status("bank")["state"] == "backing_off"
    })
    .await;
    assert!(harness.ctl(&["pause"]).status.success());
    let pages = harness.server.page_requests();
    tokio::time::sleep(QUIET_PERIOD).await;
    assert_eq!(
        harness.server.page_requests(),
        pages,
        "retries while paused"
    );
    assert_eq!(harness.feed_status("bank")["state"], "paused");

    harness.server.clear_faults();
    assert!(harness.ctl(&["resume"]).status.success());
    harness.wait_for_checkpoints(&mut daemon, BOTH, 300).await;
    harness.assert_exact(&events);
    assert!(daemon.terminate().await.0.success());
}

async fn stop_by_socket_exits_0_after_the_daemon_is_gone_and_removes_the_socket_in_store(
    store: Store,
) {
    let events = bank::generate(31, 400);
    let harness = Harness::on(store, events.clone()).await;
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 400).await;
    assert!(harness.socket().exists());

    let stopped = harness.ctl(&["stop"]);
    assert!(stopped.status.success(), "{}", stderr(&stopped));
    assert_eq!(stdout(&stopped), "stopping\nstopped\n");
    let status = daemon.wait_exit().await;
    assert!(status.success(), "exit {status}; log:\n{}", daemon.log());
    assert!(!harness.socket().exists(), "the socket is removed on stop");
    harness.assert_exact(&events);
}

/// A declarative projection whose statement never ends: the batch holding the first
/// statement request never commits, so a stop waits on it until `stop_timeout`.
const ENDLESS_PROJECTION: &str = r#"
[[projection]]
name = "endless"
feed = "bank"
file = "endless.toml"
"#;

const ENDLESS_STATEMENT: &str = r#"
schema = "CREATE TABLE IF NOT EXISTS endless (n INTEGER)"

[on."account.StatementRequested"]
sql = '''
INSERT INTO endless (n)
WITH RECURSIVE forever(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM forever)
SELECT count(*) FROM forever
'''
"#;

/// A daemon whose writer is running the endless statement, with `stop_timeout` as given; the
/// events, and how many of them were committed before the endless batch.
async fn daemon_stuck_in_a_batch(
    store: Store,
    stop_timeout: &str,
) -> (
    Harness,
    Daemon,
    Vec<projector::demo::feed_server::StoredEvent>,
    u64,
) {
    let events = bank::generate(36, 600);
    let first_request = events
        .iter()
        .position(|e| e.event_type == bank::STATEMENT_REQUESTED)
        .unwrap_or_else(|| panic!("the feed has no statement request"));
    assert!(first_request > 0, "the committed part must not be empty");
    let (before, from_request) = events.split_at(first_request);
    let harness = Harness::on(store, before.to_vec()).await;
    std::fs::write(harness.dir.path().join("endless.toml"), ENDLESS_STATEMENT)
        .unwrap_or_else(|e| panic!("{e}"));
    harness.write_config_with_daemon(
        &harness.server.url(),
        &format!("{BOTH_PROJECTIONS}{ENDLESS_PROJECTION}"),
        "",
        &format!("stop_timeout = {stop_timeout:?}"),
    );
    let mut daemon = harness.spawn();
    let committed = before.len() as u64;
    let all = ["account_balances", "account_ledger", "endless"];
    harness
        .wait_for_checkpoints(&mut daemon, &all, committed)
        .await;

    harness.server.append(from_request.to_vec());
    // `status` names the batch the writer has been on for a second or more, and where in it.
    wait_for(&mut daemon, "status to show the endless statement", || {
        let slow = &harness.status()["slow_batch"];
        slow["feed"] == "bank"
            && slow["projection"] == "endless"
            && slow["offset"] == first_request as u64
    })
    .await;
    let shown = stdout(&harness.ctl(&["status"]));
    let expected = format!("now projection endless at offset {first_request}");
    assert!(
        shown.contains("writer on feed bank's batch for") && shown.contains(&expected),
        "{shown}"
    );
    (harness, daemon, events, committed)
}

/// Nothing of the endless batch was applied, and without the endless projection a restart
/// applies the rest once.
async fn assert_nothing_of_the_batch_applied(
    harness: &Harness,
    events: &[projector::demo::feed_server::StoredEvent],
    committed: u64,
) {
    let checkpoints = harness.checkpoints();
    for name in ["account_balances", "account_ledger", "endless"] {
        assert_eq!(checkpoints[name], committed, "{name}");
    }
    assert_eq!(harness.count("SELECT count(*) FROM endless"), 0);
    harness.write_config(&harness.server.url(), BOTH_PROJECTIONS, "");
    let mut daemon = harness.spawn();
    harness
        .wait_for_checkpoints(&mut daemon, BOTH, events.len() as u64)
        .await;
    harness.assert_exact(events);
    assert!(daemon.terminate().await.0.success());
}

async fn a_stop_interrupts_a_batch_that_has_not_committed_after_stop_timeout_in_store(
    store: Store,
) {
    let (harness, mut daemon, events, committed) = daemon_stuck_in_a_batch(store, "300ms").await;
    daemon.signal("TERM");
    let status = daemon.wait_exit().await;
    let log = daemon.log();
    assert!(status.success(), "exit {status}; log:\n{log}");
    assert!(
        log.contains("has not committed after 300ms (stop_timeout): interrupting it"),
        "{log}"
    );
    assert_nothing_of_the_batch_applied(&harness, &events, committed).await;
}

async fn a_second_sigterm_while_a_batch_is_stuck_exits_at_once_and_loses_nothing_in_store(
    store: Store,
) {
    // The stop would wait an hour for the batch.
    let (harness, mut daemon, events, committed) = daemon_stuck_in_a_batch(store, "1h").await;
    daemon.signal("TERM");
    wait_for_log(
        &mut daemon,
        "stopping: letting the batches in flight finish",
    )
    .await;
    // While it stops, it still answers status, which says so.
    let status = harness.status();
    assert_eq!(status["stopping"], true, "{status}");
    let text = stdout(&harness.ctl(&["status"]));
    assert!(text.contains("stopping: "), "{text}");
    let paused = harness.ctl(&["pause"]);
    assert!(
        !paused.status.success() && stderr(&paused).contains("projector is stopping"),
        "{paused:?}"
    );
    // A second signal a moment after the first forces the exit (one sent with it would not).
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    daemon.signal("TERM");
    let status = daemon.wait_exit().await;
    let log = daemon.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("SIGTERM received again while stopping: exiting now"),
        "{log}"
    );
    assert_nothing_of_the_batch_applied(&harness, &events, committed).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_sigterms_sent_together_are_one_graceful_stop() {
    // The stop interrupts the stuck batch after 300 ms and exits 0.
    let (harness, mut daemon, events, committed) =
        daemon_stuck_in_a_batch(Store::Sqlite, "300ms").await;
    // As `timeout` and some supervisors do: two signals at once. (Sent while the first is
    // pending, the kernel would merge them: the second goes once the first is taken.)
    daemon.signal("TERM");
    wait_for_log(&mut daemon, "SIGTERM received").await;
    daemon.signal("TERM");
    let status = daemon.wait_exit().await;
    let log = daemon.log();
    assert!(status.success(), "exit {status}; log:\n{log}");
    assert!(
        log.contains("SIGTERM received again at once: the same stop"),
        "{log}"
    );
    assert_nothing_of_the_batch_applied(&harness, &events, committed).await;
}

async fn status_reports_state_checkpoints_head_lag_retries_and_the_last_error_in_store(
    store: Store,
) {
    let events = bank::generate(32, 600);
    let harness = Harness::on(store, events.clone()).await;
    harness.server.inject(Target::Pages, Fault::Status(500), 3);
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 600).await;
    wait_for(&mut daemon, "the feed to be live", || {
        harness.feed_status("bank")["state"] == "live"
    })
    .await;

    let status = harness.status();
    assert_eq!(status["pid"], daemon.child.id());
    assert!(status["config"]
        .as_str()
        .is_some_and(|c| c.ends_with("consumer.toml") && c.starts_with('/')));
    let feed = harness.feed_status("bank");
    assert_eq!(feed["url"], harness.server.url());
    assert_eq!(feed["head"], 600);
    assert_eq!(feed["lag"], 0);
    assert_eq!(feed["events_read"], 600);
    assert_eq!(feed["retries"], 3);
    assert!(feed["events_per_second"].as_f64().is_some_and(|r| r > 0.0));
    let last_error = &feed["last_error"];
    assert!(
        last_error["message"]
            .as_str()
            .is_some_and(|m| m.contains("500")),
        "{feed}"
    );
    assert!(last_error["at"]
        .as_str()
        .is_some_and(|at| at.ends_with('Z')));
    for (projection, name) in feed["projections"]
        .as_array()
        .into_iter()
        .flatten()
        .zip(BOTH)
    {
        assert_eq!(projection["name"], *name);
        assert_eq!(projection["checkpoint"], 600);
        assert_eq!(projection["lag"], 0);
        assert!(projection["halted"].is_null());
    }

    // The readable form carries the same facts.
    let text = stdout(&harness.ctl(&["status"]));
    assert!(text.contains("feed bank: live"), "{text}");
    assert!(text.contains("head 600  lag 0"), "{text}");
    assert!(text.contains("retries 3"), "{text}");
    assert!(text.contains("account_ledger"), "{text}");
    assert!(daemon.terminate().await.0.success());
}

async fn status_names_a_halted_projection_and_its_poison_event_in_store(store: Store) {
    let mut events = bank::generate(33, 200);
    let poison = common::poison_first_credit(&mut events);
    let harness = Harness::on(store, events).await;
    let mut daemon = harness.spawn_running().await;
    wait_for(&mut daemon, "the ledger to halt", || {
        let feed = harness.feed_status("bank");
        feed["projections"][1]["halted"].is_string()
    })
    .await;
    let feed = harness.feed_status("bank");
    let halted = feed["projections"][1]["halted"]
        .as_str()
        .unwrap_or_default();
    assert!(halted.contains(&format!("offset {poison}")), "{halted}");
    assert!(daemon.terminate().await.0.success());
}

async fn a_pause_survives_a_restart_until_resumed_in_store(store: Store) {
    let events = bank::generate(34, 1200);
    let harness = Harness::on(store, events[..400].to_vec()).await;
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 400).await;
    assert!(harness.ctl(&["pause", "bank"]).status.success());
    assert!(daemon.terminate().await.0.success());

    harness.server.append(events[400..].to_vec());
    let pages = harness.server.page_requests();
    let mut daemon = harness.spawn_running().await;
    let feed = harness.feed_status("bank");
    assert_eq!(feed["state"], "paused", "{feed}");
    tokio::time::sleep(QUIET_PERIOD).await;
    assert_eq!(
        harness.server.page_requests(),
        pages,
        "requests while paused"
    );
    assert_eq!(harness.checkpoints()["account_balances"], 400);

    assert!(harness.ctl(&["resume", "bank"]).status.success());
    harness.wait_for_checkpoints(&mut daemon, BOTH, 1200).await;
    harness.assert_exact(&events);
    assert!(daemon.terminate().await.0.success());

    // Resumed is remembered too.
    let mut daemon = harness.spawn_running().await;
    wait_for(&mut daemon, "the feed to be live", || {
        harness.feed_status("bank")["state"] == "live"
    })
    .await;
    assert!(daemon.terminate().await.0.success());
}

async fn sighup_adds_a_projection_and_a_broken_config_is_refused_while_the_old_one_runs_in_store(
    store: Store,
) {
    let events = bank::generate(35, 1000);
    let harness = Harness::on(store, events[..600].to_vec()).await;
    let balances_only = r#"
[[projection]]
name = "account_balances"
feed = "bank"
file = "account_balances.toml"
"#;
    let url = harness.server.url();
    harness.write_config(&url, balances_only, "");
    let mut daemon = harness.spawn();
    harness
        .wait_for_checkpoints(&mut daemon, &["account_balances"], 600)
        .await;
    assert!(!harness.checkpoints().contains_key("account_ledger"));

    harness.write_config(&url, BOTH_PROJECTIONS, "");
    daemon.signal("HUP");
    wait_for_log(&mut daemon, "configuration reloaded").await;
    harness.server.append(events[600..].to_vec());
    harness.wait_for_checkpoints(&mut daemon, BOTH, 1000).await;
    harness.assert_exact(&events);
    // The feed's counters carry over the reload.
    let feed = harness.feed_status("bank");
    assert!(feed["events_read"].as_u64() >= Some(1000), "{feed}");
    assert!(harness.status()["reloaded_at"].is_string());

    // A config that does not validate: refused, logged, and the running one goes on.
    std::fs::write(
        harness.config_path(),
        "[daemon]\ndatabase = \"projector.db\"\ncontrol_socket = \"projector.sock\"\n[[feed]]\nname = 7\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    daemon.signal("HUP");
    wait_for_log(&mut daemon, "reload refused").await;
    assert!(
        daemon.log().contains("consumer.toml:5:8:"),
        "{}",
        daemon.log()
    );
    let reload = harness.ctl(&["reload"]);
    assert_eq!(reload.status.code(), Some(1));
    assert!(
        stderr(&reload).contains("reload refused"),
        "{}",
        stderr(&reload)
    );
    let feed = harness.feed_status("bank");
    assert_eq!(feed["projections"].as_array().map(Vec::len), Some(2));

    // A change the running daemon cannot take is refused the same way.
    harness.write_config_with_daemon(&url, BOTH_PROJECTIONS, "", "log_format = \"json\"");
    let reload = harness.ctl(&["reload"]);
    assert_eq!(reload.status.code(), Some(1));
    assert!(stderr(&reload).contains("daemon.log_format cannot change"));

    // And a projection removed by reload stops being read; its tables stay.
    harness.write_config(&url, balances_only, "");
    let reload = harness.ctl(&["reload"]);
    assert!(reload.status.success(), "{}", stderr(&reload));
    let feed = harness.feed_status("bank");
    assert_eq!(feed["projections"].as_array().map(Vec::len), Some(1));
    assert!(harness.count("SELECT count(*) FROM account_ledger_entries") > 0);
    assert!(daemon.terminate().await.0.success());
}

async fn a_reload_that_cannot_start_brings_the_previous_configuration_back_in_store(store: Store) {
    let events = bank::generate(41, 800);
    let harness = Harness::on(store, events[..300].to_vec()).await;
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 300).await;

    // Valid on its own, but its schema collides with a table the database already has: only
    // starting it finds that out.
    std::fs::write(
        harness.dir.path().join("clash.toml"),
        "schema = \"CREATE TABLE account_balances (other TEXT);\"\n\
         [on.\"account.AccountCreated\"]\nsql = \"INSERT INTO account_balances VALUES (:account_id)\"\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let clash = format!(
        "{BOTH_PROJECTIONS}\n[[projection]]\nname = \"clash\"\nfeed = \"bank\"\nfile = \"clash.toml\"\n"
    );
    harness.write_config(&harness.server.url(), &clash, "");
    assert!(common::projector(&[
        "check",
        "--config",
        harness.config_path().to_str().unwrap_or_default()
    ])
    .status
    .success());
    let reload = harness.ctl(&["reload"]);
    assert_eq!(reload.status.code(), Some(1));
    assert!(
        stderr(&reload).contains("the previous one runs again")
            && stderr(&reload).contains("already exists"),
        "{}",
        stderr(&reload)
    );

    harness.server.append(events[300..].to_vec());
    harness.wait_for_checkpoints(&mut daemon, BOTH, 800).await;
    harness.assert_exact(&events);
    assert!(!harness.checkpoints().contains_key("clash"));
    assert!(daemon.terminate().await.0.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_daemon_on_the_same_socket_is_refused_and_a_stale_socket_is_cleaned_up() {
    let events = bank::generate(36, 300);
    let harness = Harness::new(events.clone()).await;
    let mut first = harness.spawn();
    harness.wait_for_checkpoints(&mut first, BOTH, 300).await;

    // Another database, the same socket.
    let other = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = std::fs::read_to_string(harness.config_path())
        .unwrap_or_else(|e| panic!("{e}"))
        .replace(
            "database = \"projector.db\"",
            &format!("database = {:?}", other.path().join("other.db")),
        )
        .replace(
            "file = \"account_balances.toml\"",
            &format!(
                "file = {:?}",
                harness.dir.path().join("account_balances.toml")
            ),
        )
        .replace(
            "control_socket = \"projector.sock\"",
            &format!("control_socket = {:?}", harness.socket()),
        );
    let other_config = other.path().join("consumer.toml");
    std::fs::write(&other_config, config).unwrap_or_else(|e| panic!("{e}"));
    let mut second = Daemon::spawn(&other_config, other.path(), &[]);
    let status = second.wait_exit().await;
    assert_eq!(status.code(), Some(1));
    assert!(
        second.log().contains("already running") && second.log().contains("projector.sock"),
        "{}",
        second.log()
    );
    assert!(
        harness.ctl(&["status"]).status.success(),
        "the first is untouched"
    );

    // A crash leaves the socket file behind: the next start replaces it.
    first.kill();
    assert!(harness.socket().exists());
    let stale = harness.ctl(&["status"]);
    assert_eq!(stale.status.code(), Some(3));
    assert!(stderr(&stale).contains("not running"), "{}", stderr(&stale));
    let restarted = harness.spawn_running().await;
    assert!(restarted.log().contains("removing a stale control socket"));
    assert!(harness.ctl(&["status"]).status.success());
    assert!(restarted.terminate().await.0.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn ctl_says_clearly_when_no_daemon_runs() {
    let harness = Harness::new(Vec::new()).await;
    let output = harness.ctl(&["status"]);
    assert_eq!(output.status.code(), Some(3));
    assert!(
        stderr(&output).contains("projector is not running: there is no control socket at"),
        "{}",
        stderr(&output)
    );
    let output = common::projector(&["ctl", "--socket", "/nonexistent/x.sock", "pause"]);
    assert_eq!(output.status.code(), Some(3));
    let output = common::projector(&["ctl", "--config", "/nonexistent.toml", "status"]);
    assert_eq!(output.status.code(), Some(2));
    // Options after the subcommand too; with --json, the error is JSON, on stdout.
    let output = common::projector(&["ctl", "status", "--socket", "/nonexistent/x.sock", "--json"]);
    assert_eq!(output.status.code(), Some(3));
    let reply: serde_json::Value =
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {output:?}"));
    assert_eq!(reply["ok"], false);
    assert!(
        reply["error"]
            .as_str()
            .is_some_and(|e| e.contains("projector is not running")),
        "{reply}"
    );
    // A path that is not a socket is named as such.
    let config = harness.config_path();
    let config = config.to_string_lossy();
    let output = common::projector(&["ctl", "pause", "--socket", &config]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("is not a socket"), "{output:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ctl_status_watch_refreshes_until_stopped() {
    use std::io::{BufRead, BufReader};
    let harness = Harness::new(bank::generate(38, 100)).await;
    let daemon = harness.spawn_running().await;
    let config = harness.config_path();
    let mut watch = std::process::Command::new(env!("CARGO_BIN_EXE_projector"))
        .args(["ctl", "status", "--watch", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let stdout = watch.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let mut lines = BufReader::new(stdout).lines();
    let mut refreshes = 0;
    while refreshes < 2 {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("ctl status --watch ended early"))
            .unwrap_or_else(|e| panic!("{e}"));
        if line.starts_with("(every 2s") {
            refreshes += 1;
        }
    }
    assert!(daemon.terminate().await.0.success());
    // The daemon gone, the watch says so and ends by itself.
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|line| line == "projector has stopped"),
        "{rest:?}"
    );
    assert!(watch.wait().is_ok_and(|status| status.success()));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_socket_is_owner_only_unless_a_mode_is_configured() {
    let harness = Harness::new(bank::generate(37, 40)).await;
    let daemon = harness.spawn_running().await;
    let mode = |harness: &Harness| {
        std::fs::metadata(harness.socket())
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or_else(|e| panic!("{e}"))
    };
    assert_eq!(mode(&harness), 0o600);
    let other_user = ctl_as_nobody(&harness);
    if let Some(output) = &other_user {
        assert_eq!(output.status.code(), Some(1));
        assert!(
            stderr(output).contains("permission denied"),
            "{}",
            stderr(output)
        );
    }
    assert!(daemon.terminate().await.0.success());

    let url = harness.server.url();
    harness.write_config_with_daemon(&url, BOTH_PROJECTIONS, "", "control_socket_mode = \"0666\"");
    let daemon = harness.spawn_running().await;
    assert_eq!(mode(&harness), 0o666);
    if let Some(output) = ctl_as_nobody(&harness) {
        // The same user is let in once the mode allows it: the mode is what kept it out.
        assert!(output.status.success(), "{}", stderr(&output));
    }
    assert!(daemon.terminate().await.0.success());
}

/// `ctl status` run as the user nobody, when the tests run as root (root itself ignores file
/// modes, so only another user can show what the mode does); None otherwise.
fn ctl_as_nobody(harness: &Harness) -> Option<std::process::Output> {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !root || which("runuser").is_err() {
        eprintln!(
            "not root or no runuser: the socket's mode is checked, not tried by another user"
        );
        return None;
    }
    // The temporary folder is owner-only; open it so that only the socket's mode decides.
    std::fs::set_permissions(harness.dir.path(), std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("{e}"));
    let output = std::process::Command::new("runuser")
        .args([
            "-u",
            "nobody",
            "--",
            env!("CARGO_BIN_EXE_projector"),
            "ctl",
            "--socket",
        ])
        .arg(harness.socket())
        .arg("status")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    Some(output)
}

/// Sends raw bytes, returns the reply line (empty if the daemon hung up without one).
fn raw_exchange(socket: &std::path::Path, request: &[u8]) -> String {
    let mut stream = UnixStream::connect(socket).unwrap_or_else(|e| panic!("{e}"));
    stream
        .set_read_timeout(Some(DEADLINE))
        .unwrap_or_else(|e| panic!("{e}"));
    // The daemon may hang up before reading everything (an overlong line): that is fine.
    let _ = stream.write_all(request);
    let mut reply = String::new();
    let _ = BufReader::new(stream).read_line(&mut reply);
    reply
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_control_input_gets_an_error_reply_and_consumption_goes_on() {
    let events = bank::generate(38, 4000);
    let harness = Harness::new(events[..2000].to_vec()).await;
    let mut daemon = harness.spawn_running().await;
    let socket = harness.socket();

    // A client that connects and says nothing holds nobody up.
    let silent = UnixStream::connect(&socket).unwrap_or_else(|e| panic!("{e}"));

    for (request, says) in [
        (&b"this is not json\n"[..], "bad request"),
        (b"{\"command\":\"explode\"}\n", "unknown command"),
        (
            b"{\"command\":\"pause\",\"feed\":\"nope\"}\n",
            "no feed named \\\"nope\\\"",
        ),
        (b"{\"command\":\"status\",\"extra\":1}\n", "unknown field"),
        (b"\n", "bad request"),
        (b"\xff\xfe\n", "UTF-8"),
    ] {
        let reply = raw_exchange(&socket, request);
        let parsed: serde_json::Value =
            serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{reply:?}: {e}"));
        assert_eq!(parsed["ok"], false, "{reply}");
        assert!(reply.contains(says), "{request:?}: {reply}");
    }
    let overlong = vec![b'x'; 200 * 1024];
    let reply = raw_exchange(&socket, &overlong);
    assert!(reply.contains("longer than"), "{reply}");

    // Several requests on one connection, one reply per line.
    let mut stream = UnixStream::connect(&socket).unwrap_or_else(|e| panic!("{e}"));
    stream
        .write_all(b"{\"command\":\"status\"}\n{\"command\":\"nope\"}\n{\"command\":\"status\"}\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let mut lines = BufReader::new(stream.try_clone().unwrap_or_else(|e| panic!("{e}"))).lines();
    let oks: Vec<bool> = (0..3)
        .map(|_| {
            let line = lines.next().and_then(Result::ok).unwrap_or_default();
            line.starts_with("{\"ok\":true")
        })
        .collect();
    assert_eq!(oks, [true, false, true]);

    // Hundreds of clients at once: each gets a reply (or the busy error), none hurts the daemon.
    harness.server.append(events[2000..].to_vec());
    let socket_path = socket.clone();
    let replies = tokio::task::spawn_blocking(move || {
        let clients: Vec<_> = (0..300)
            .map(|_| {
                let socket = socket_path.clone();
                std::thread::spawn(move || raw_exchange(&socket, b"{\"command\":\"status\"}\n"))
            })
            .collect();
        clients
            .into_iter()
            .map(|client| client.join().unwrap_or_default())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let answered = replies
        .iter()
        .filter(|r| r.starts_with("{\"ok\":true") || r.contains("busy"))
        .count();
    assert_eq!(
        answered,
        300,
        "{:?}",
        replies.iter().find(|r| !r.starts_with("{\"ok\":true"))
    );

    harness.wait_for_checkpoints(&mut daemon, BOTH, 4000).await;
    harness.assert_exact(&events);
    assert!(harness.ctl(&["status"]).status.success());
    drop(silent);
    assert!(daemon.terminate().await.0.success());
}

/// Reads systemd notifications sent to `socket` until `wanted` arrives; returns all of them.
fn notifications_until(socket: &UnixDatagram, wanted: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + DEADLINE;
    let mut buffer = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buffer) {
            let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
            let found = message.lines().any(|line| line == wanted);
            seen.push(message);
            if found {
                return;
            }
        }
    }
    panic!("no {wanted} from the daemon; got {seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_hears_ready_status_watchdog_reloading_and_stopping() {
    let harness = Harness::new(bank::generate(39, 200)).await;
    let notify_path = harness.dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap_or_else(|e| panic!("{e}"));
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap_or_else(|e| panic!("{e}"));
    let notify_env = notify_path.to_str().unwrap_or_default();
    let mut daemon = Daemon::spawn(
        &harness.config_path(),
        harness.dir.path(),
        &[("NOTIFY_SOCKET", notify_env), ("WATCHDOG_USEC", "400000")],
    );
    let mut seen = Vec::new();
    notifications_until(&notify, "READY=1", &mut seen);
    assert!(
        harness.socket().exists(),
        "READY comes once the socket listens"
    );
    harness.wait_for_checkpoints(&mut daemon, BOTH, 200).await;
    notifications_until(&notify, "WATCHDOG=1", &mut seen);
    let mut status_seen = Vec::new();
    while !status_seen
        .iter()
        .any(|s: &String| s.contains("bank: live"))
    {
        notifications_until(&notify, "WATCHDOG=1", &mut status_seen);
    }
    daemon.signal("HUP");
    notifications_until(&notify, "RELOADING=1", &mut seen);
    notifications_until(&notify, "READY=1", &mut seen);
    daemon.signal("TERM");
    notifications_until(&notify, "STOPPING=1", &mut seen);
    assert!(daemon.wait_exit().await.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_suit_journald_and_json_shippers() {
    use std::os::unix::fs::MetadataExt;
    let harness = Harness::new(bank::generate(40, 100)).await;

    // Under systemd, stderr is the stream JOURNAL_STREAM names: no colours, no timestamps.
    let log_path = harness.dir.path().join("journal.log");
    let log = std::fs::File::create(&log_path).unwrap_or_else(|e| panic!("{e}"));
    let meta = log.metadata().unwrap_or_else(|e| panic!("{e}"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_projector"))
        .args(["run", "--config"])
        .arg(harness.config_path())
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + DEADLINE;
    let mut text = String::new();
    while !text.contains("projector is running") {
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        text = std::fs::read_to_string(&log_path).unwrap_or_default();
    }
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    assert!(child.wait().is_ok_and(|s| s.success()));
    // Each line starts with its syslog priority, which journald takes as the entry's priority.
    for line in text.lines() {
        let (priority, rest) = line.split_once('>').unwrap_or_default();
        let level = rest.split_whitespace().next().unwrap_or_default();
        let expected = match level {
            "ERROR" => "<3",
            "WARN" => "<4",
            "INFO" => "<6",
            _ => "<7",
        };
        assert_eq!(priority, expected, "{line}");
    }
    assert!(!text.contains('\u{1b}'), "no ANSI escapes: {text}");

    // log_format = "json": one object per line.
    let url = harness.server.url();
    harness.write_config_with_daemon(&url, BOTH_PROJECTIONS, "", "log_format = \"json\"");
    let daemon = harness.spawn_running().await;
    let (status, text) = daemon.terminate().await;
    assert!(status.success());
    for line in text.lines() {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert!(
            object["timestamp"].is_string() && object["level"].is_string(),
            "{line}"
        );
    }
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd/projector.service");
    let text = std::fs::read_to_string(&unit).unwrap_or_else(|e| panic!("{}: {e}", unit.display()));
    for needed in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=projector",
        "RuntimeDirectory=projector",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "DynamicUser=yes",
        "WatchdogSec=",
    ] {
        assert!(text.contains(needed), "the unit lacks {needed}");
    }
    let Ok(analyze) = which("systemd-analyze") else {
        // .ci/run installs systemd, so CI always runs the check below.
        eprintln!("systemd-analyze is not installed; only the unit's text was checked");
        return;
    };
    // verify checks that ExecStart exists: point it at the binary under test.
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let copy = dir.path().join("projector.service");
    let text = text.replace("/usr/local/bin/projector", env!("CARGO_BIN_EXE_projector"));
    std::fs::write(&copy, text).unwrap_or_else(|e| panic!("{e}"));
    let output = std::process::Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut complaints = String::from_utf8_lossy(&output.stderr).into_owned();
    complaints.push_str(&String::from_utf8_lossy(&output.stdout));
    // Without a running systemd (a container), verify cannot reach the manager; that is not
    // the unit's fault, but every complaint about the unit itself is.
    let about_the_unit: Vec<&str> = complaints
        .lines()
        .filter(|line| line.contains("projector.service"))
        .collect();
    assert!(
        output.status.success() && about_the_unit.is_empty(),
        "systemd-analyze verify: {complaints}"
    );
}

fn which(program: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .ok_or(())
}
