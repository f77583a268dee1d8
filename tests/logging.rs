//! Logging never takes the daemon down: a log pipe that closes (`projector run 2>&1 | head -3`,
//! a log shipper restarting) or that nobody reads any more drops lines, and the daemon goes on
//! reading, committing, answering and stopping.

mod common;

use std::io::BufRead;

use common::{wait_for, Daemon, Harness};
use projector::demo::bank;

const BOTH: &[&str] = &["account_balances", "account_ledger"];

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_log_pipe_drops_lines_while_the_daemon_reads_commits_and_stops() {
    let events = bank::generate(61, 3000);
    let harness = Harness::new(events.clone()).await;
    // Failing requests make the daemon log warnings after the pipe has closed.
    harness.server.random_faults(61, 0.05);
    let (mut daemon, stderr) =
        Daemon::spawn_with_stderr_piped(&harness.config_path(), &[("RUST_LOG", "projector=debug")]);
    // Read three lines, then close the pipe, as `| head -3` does.
    let mut lines = std::io::BufReader::new(stderr);
    for _ in 0..3 {
        let mut line = String::new();
        let read = lines.read_line(&mut line).unwrap_or(0);
        assert!(read > 0, "the daemon's stderr ended early");
    }
    drop(lines);

    harness.wait_for_checkpoints(&mut daemon, BOTH, 3000).await;
    harness.assert_exact(&events);
    let status = harness.status();
    assert!(
        status["log_lines_dropped"].as_u64().unwrap_or(0) > 0,
        "the dropped lines are counted: {status}"
    );
    assert!(harness.server.faults_injected() > 0);
    let status = daemon.terminate().await.0;
    assert!(status.success(), "SIGTERM stops it cleanly: {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_pipe_nobody_reads_never_holds_the_daemon_up() {
    let events = bank::generate(62, 3000);
    let harness = Harness::new(events.clone()).await;
    harness.server.random_faults(62, 0.05);
    // Trace level fills the pipe's buffer within the first requests; nothing reads it.
    let (mut daemon, stderr) =
        Daemon::spawn_with_stderr_piped(&harness.config_path(), &[("RUST_LOG", "trace")]);

    harness.wait_for_checkpoints(&mut daemon, BOTH, 3000).await;
    harness.assert_exact(&events);
    wait_for(&mut daemon, "log lines to be dropped", || {
        harness.status()["log_lines_dropped"].as_u64().unwrap_or(0) > 0
    })
    .await;
    let status = daemon.terminate().await.0;
    assert!(status.success(), "SIGTERM stops it cleanly: {status}");
    drop(stderr);
}
