//! The harness the daemon tests share: an in-process Flux feed on a loopback port, a temporary
//! folder with a config, the real `projector` binary spawned on it, and readers of its database.
//! Nothing sleeps for a fixed time: every wait is for a condition, with a deadline.

#![allow(dead_code)] // each test file uses its own part of the harness

pub mod pg;
pub mod pki;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use projector::config::FeedFormat;
use projector::demo::consumer_toml::{ConsumerToml, BOTH_PROJECTIONS};
use projector::demo::feed_server::{FeedServer, StoredEvent};

pub const DEADLINE: Duration = Duration::from_secs(60);

pub struct Harness {
    pub server: FeedServer,
    pub dir: tempfile::TempDir,
    /// The PostgreSQL schema the daemon keeps everything in, when not a SQLite file.
    pub postgres: Option<pg::Schema>,
}

/// Where a test's daemon keeps its read models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Sqlite,
    Postgres,
}

/// Runs a test written for both stores as two tests: `$sqlite` and `$postgres`.
#[macro_export]
macro_rules! on_both_stores {
    ($($test:ident => $sqlite:ident, $postgres:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread")]
        async fn $sqlite() {
            $test(common::Store::Sqlite).await;
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn $postgres() {
            $test(common::Store::Postgres).await;
        }
    )*};
}

impl Harness {
    /// A feed of `events` on a free loopback port, and a folder with a config reading it.
    pub async fn new(events: Vec<StoredEvent>) -> Harness {
        Harness::on(Store::Sqlite, events).await
    }

    /// As `new`, the read models kept in `store` (PostgreSQL: a schema of the test's own).
    pub async fn on(store: Store, events: Vec<StoredEvent>) -> Harness {
        let server = FeedServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), events)
            .await
            .unwrap_or_else(|e| panic!("starting the feed server: {e}"));
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let projection =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("projections/account_balances.toml");
        std::fs::copy(projection, dir.path().join("account_balances.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let postgres = (store == Store::Postgres).then(pg::Schema::new);
        let harness = Harness {
            server,
            dir,
            postgres,
        };
        harness.write_config(&harness.server.url(), BOTH_PROJECTIONS, "");
        harness
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("consumer.toml")
    }

    pub fn database(&self) -> PathBuf {
        self.dir.path().join("projector.db")
    }

    /// Writes the config: one feed `bank` at `url` (extra feed keys in `feed_extra`) and the
    /// given `[[projection]]` tables.
    pub fn write_config(&self, url: &str, projections: &str, feed_extra: &str) {
        self.write_config_with_daemon(url, projections, feed_extra, "");
    }

    /// As `write_config`, with extra `[daemon]` keys.
    pub fn write_config_with_daemon(
        &self,
        url: &str,
        projections: &str,
        feed_extra: &str,
        daemon_extra: &str,
    ) {
        self.write_config_in_format(FeedFormat::Flux, url, projections, feed_extra, daemon_extra);
    }

    /// As `write_config`, for the same feed served in the inline format.
    pub fn write_inline_config(&self, projections: &str, feed_extra: &str) {
        let url = self.server.inline_url();
        self.write_config_in_format(FeedFormat::Inline, &url, projections, feed_extra, "");
    }

    pub fn write_config_in_format(
        &self,
        format: FeedFormat,
        url: &str,
        projections: &str,
        feed_extra: &str,
        daemon_extra: &str,
    ) {
        match &self.postgres {
            Some(schema) => {
                let keys = format!("{}{daemon_extra}", schema.daemon_keys("2s"));
                self.write_config_on(&pg::url(), format, url, projections, feed_extra, &keys)
            }
            None => self.write_config_on(
                "projector.db",
                format,
                url,
                projections,
                feed_extra,
                daemon_extra,
            ),
        }
    }

    /// As `write_config_in_format`, with `[daemon] database` = `database`.
    pub fn write_config_on(
        &self,
        database: &str,
        format: FeedFormat,
        url: &str,
        projections: &str,
        feed_extra: &str,
        daemon_extra: &str,
    ) {
        let mut toml = ConsumerToml::new(url, format);
        toml.database = database.into();
        toml.poll_interval = "50ms".into();
        toml.retry = Some(("10ms".into(), "200ms".into()));
        toml.daemon_keys = daemon_extra.into();
        // The head probe's requests would take page faults scripted for the reader: off unless a
        // test asks for it. Always a line: the location tests count on it.
        toml.feed_keys = if feed_extra.contains("find_head") {
            format!("{feed_extra}\n")
        } else {
            format!("find_head = false\n{feed_extra}")
        };
        toml.projections = projections.into();
        toml.write(&self.config_path())
            .unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn spawn(&self) -> Daemon {
        Daemon::spawn(&self.config_path(), self.dir.path(), &[])
    }

    /// Waits until feed `bank` is backing off with an error that contains every one of `says`.
    pub async fn wait_for_backoff(&self, daemon: &mut Daemon, says: &[&str]) {
        wait_for(daemon, &format!("the feed to back off on {says:?}"), || {
            let feed = self.feed_status("bank");
            let message = feed["last_error"]["message"].as_str().unwrap_or_default();
            feed["state"] == "backing_off" && says.iter().all(|part| message.contains(part))
        })
        .await;
    }

    /// Spawns the daemon and waits until its control socket answers.
    pub async fn spawn_running(&self) -> Daemon {
        let mut daemon = self.spawn();
        wait_for_log(&mut daemon, "projector is running").await;
        daemon
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("projector.sock")
    }

    /// Runs `projector ctl --config <this config> <args>` to completion.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        let config = self.config_path();
        let mut all = vec!["ctl", "--config", config.to_str().unwrap_or_default()];
        all.extend_from_slice(args);
        projector(&all)
    }

    /// Runs `projector <args> --config <this config>` to completion.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        let config = self.config_path();
        let mut all = args.to_vec();
        all.extend_from_slice(&["--config", config.to_str().unwrap_or_default()]);
        projector(&all)
    }

    /// `projector projections --json`: each projection as the database records it.
    pub fn projections(&self) -> Vec<serde_json::Value> {
        let output = self.run(&["projections", "--json"]);
        assert!(output.status.success(), "{}", output_text(&output));
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", output_text(&output)))
    }

    /// The projection `name` of `projections --json`.
    pub fn projection(&self, name: &str) -> serde_json::Value {
        self.projections()
            .into_iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no projection {name}"))
    }

    /// `ctl status --json`, parsed: the daemon's status object.
    pub fn status(&self) -> serde_json::Value {
        let output = self.ctl(&["status", "--json"]);
        assert!(
            output.status.success(),
            "ctl status failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let reply: serde_json::Value =
            serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}"));
        reply["status"].clone()
    }

    /// The status of feed `name`.
    pub fn feed_status(&self, name: &str) -> serde_json::Value {
        let status = self.status();
        let feeds = status["feeds"].as_array().cloned().unwrap_or_default();
        feeds
            .into_iter()
            .find(|feed| feed["name"] == name)
            .unwrap_or_else(|| panic!("no feed {name} in {status}"))
    }

    pub fn checkpoints(&self) -> HashMap<String, u64> {
        match &self.postgres {
            Some(schema) => schema.checkpoints(),
            None => checkpoints(&self.database()),
        }
    }

    pub fn balances(&self) -> BTreeMap<String, i64> {
        if let Some(schema) = &self.postgres {
            return schema.balances();
        }
        let conn =
            projector::store::open_reader(&self.database()).unwrap_or_else(|e| panic!("{e}"));
        balances_in(&conn)
    }

    pub fn count(&self, sql: &str) -> i64 {
        if let Some(schema) = &self.postgres {
            return schema.count(sql);
        }
        let conn =
            projector::store::open_reader(&self.database()).unwrap_or_else(|e| panic!("{e}"));
        conn.query_row(sql, [], |row| row.get(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Both shipped read models hold exactly the fold of `events`: every balance, and one ledger
    /// entry per credit or debit (an event applied twice would show in either).
    pub fn assert_exact(&self, events: &[StoredEvent]) {
        assert_eq!(
            self.balances(),
            projector::demo::bank::expected_balances(events)
        );
        assert_eq!(
            self.count("SELECT count(*) FROM account_ledger_entries"),
            credits_and_debits(events)
        );
    }

    /// `account_balances` holds exactly the fold of `events`.
    pub fn assert_exact_balances(&self, events: &[StoredEvent]) {
        assert_eq!(
            self.balances(),
            projector::demo::bank::expected_balances(events)
        );
    }

    /// Waits until every projection named has checkpointed `offset`.
    pub async fn wait_for_checkpoints(&self, daemon: &mut Daemon, names: &[&str], offset: u64) {
        let what = format!("{names:?} to reach offset {offset}");
        wait_for(daemon, &what, || {
            let checkpoints = self.checkpoints();
            names
                .iter()
                .all(|name| checkpoints.get(*name).copied() == Some(offset))
        })
        .await;
    }
}

fn balances_in(conn: &rusqlite::Connection) -> BTreeMap<String, i64> {
    let mut statement = conn
        .prepare("SELECT account_id, balance FROM account_balances")
        .unwrap_or_else(|e| panic!("{e}"));
    let rows = statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap_or_else(|e| panic!("{e}"));
    rows.collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{e}"))
}

pub fn checkpoints(database: &Path) -> HashMap<String, u64> {
    // Before the daemon has created the database there are no checkpoints yet.
    projector::store::open_reader(database)
        .and_then(|conn| projector::store::read_checkpoints(&conn))
        .map(|all| {
            all.into_iter()
                .map(|(name, c)| (name, c.next_offset))
                .collect()
        })
        .unwrap_or_default()
}

/// The real binary, running `projector run`, its log going to a file.
pub struct Daemon {
    pub child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Runs `command` (which runs the daemon somehow) with its log going to a file in `dir`.
    pub fn spawn_command(dir: &Path, command: &mut Command) -> Daemon {
        static COMMANDS: AtomicUsize = AtomicUsize::new(0);
        let log = dir.join(format!(
            "command-{}.log",
            COMMANDS.fetch_add(1, Ordering::Relaxed)
        ));
        let log_file = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
        let child = command
            .env("RUST_LOG", "projector=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning: {e}"));
        Daemon { child, log }
    }

    pub fn spawn(config: &Path, dir: &Path, env: &[(&str, &str)]) -> Daemon {
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        let log = dir.join(format!(
            "daemon-{}.log",
            RUNS.fetch_add(1, Ordering::Relaxed)
        ));
        let log_file = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
        let child = Command::new(env!("CARGO_BIN_EXE_projector"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "projector=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning projector: {e}"));
        Daemon { child, log }
    }

    /// Spawns `projector run` with its stderr a pipe this test holds, instead of a log file
    /// (`log()` is then empty): the test decides when the pipe is read, left full or closed.
    pub fn spawn_with_stderr_piped(
        config: &Path,
        env: &[(&str, &str)],
    ) -> (Daemon, std::process::ChildStderr) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_projector"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning projector: {e}"));
        let stderr = child
            .stderr
            .take()
            .unwrap_or_else(|| panic!("no stderr pipe"));
        let log = config.with_file_name("no-log-file");
        (Daemon { child, log }, stderr)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap_or_else(|e| panic!("kill: {e}"));
        assert!(status.success(), "kill -{name} failed");
    }

    /// SIGTERM, then wait for the exit.
    pub async fn terminate(mut self) -> (ExitStatus, String) {
        self.signal("TERM");
        let status = self.wait_exit().await;
        (status, self.log())
    }

    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap_or_else(|e| panic!("{e}")) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn kill(mut self) {
        self.child.kill().unwrap_or_else(|e| panic!("{e}"));
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `condition` until it holds; fails the test (with the daemon's log) at the deadline or
/// if the daemon exits.
pub async fn wait_for(daemon: &mut Daemon, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if condition() {
            return;
        }
        if let Some(status) = daemon.child.try_wait().unwrap_or_else(|e| panic!("{e}")) {
            panic!(
                "the daemon exited ({status}) while waiting for {what}; log:\n{}",
                daemon.log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for a line in the daemon's log.
pub async fn wait_for_log(daemon: &mut Daemon, needle: &str) {
    let log = daemon.log.clone();
    wait_for(daemon, &format!("{needle:?} in the log"), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(needle)
    })
    .await;
}

/// What a command printed, stdout then stderr.
pub fn output_text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs a CLI command of the real binary to completion.
pub fn projector(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_projector"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running projector: {e}"))
}

/// Each projection's read model is the fold of the feed up to its checkpoint, and the
/// checkpoint's event id is the feed's at that offset.
pub fn assert_consistent(harness: &Harness, events: &[StoredEvent], context: &str) {
    if let Some(schema) = &harness.postgres {
        return schema.assert_consistent(events, context);
    }
    // One read transaction: a snapshot, even while the daemon commits.
    let mut conn = projector::store::open_reader(&harness.database())
        .unwrap_or_else(|e| panic!("{context}: {e}"));
    let snapshot = conn
        .transaction()
        .unwrap_or_else(|e| panic!("{context}: {e}"));
    let checkpoints =
        projector::store::read_checkpoints(&snapshot).unwrap_or_else(|e| panic!("{context}: {e}"));
    for (projection, checkpoint) in &checkpoints {
        let applied = usize::try_from(checkpoint.next_offset).unwrap_or(usize::MAX);
        assert!(
            applied <= events.len(),
            "{context}: {projection} is at {applied}, past the feed's {} events",
            events.len()
        );
        let expected_id = applied.checked_sub(1).map(|i| events[i].id.clone());
        assert_eq!(
            checkpoint.last_event_id, expected_id,
            "{context}: {projection}'s checkpoint names the wrong event"
        );
        let prefix = &events[..applied];
        match projection.as_str() {
            "account_balances" => assert_eq!(
                balances_in(&snapshot),
                projector::demo::bank::expected_balances(prefix),
                "{context}: balances at offset {applied}"
            ),
            "account_ledger" => {
                let entries: i64 = snapshot
                    .query_row("SELECT count(*) FROM account_ledger_entries", [], |row| {
                        row.get(0)
                    })
                    .unwrap_or_else(|e| panic!("{context}: {e}"));
                assert_eq!(
                    entries,
                    credits_and_debits(prefix),
                    "{context}: ledger entries at offset {applied}"
                );
            }
            other => panic!("unexpected projection {other}"),
        }
    }
    let integrity: String = snapshot
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap_or_else(|e| panic!("{context}: {e}"));
    assert_eq!(integrity, "ok", "{context}");
}

/// A memory figure of a running process from /proc/<pid>/status, in KiB: `field` is "VmRSS"
/// (resident now) or "VmHWM" (the peak); None once the process is gone.
pub fn memory_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Makes the first credit of `events` a poison event (its amount is not a number) and returns
/// its offset.
pub fn poison_first_credit(events: &mut [StoredEvent]) -> usize {
    let poison = events
        .iter()
        .position(|e| e.event_type == projector::demo::bank::CREDITED)
        .unwrap_or_else(|| panic!("no credit in the feed"));
    events[poison].body = r#"{"account_id":"x","transaction_id":"y","amount":"lots"}"#.into();
    poison
}

pub fn credits_and_debits(events: &[StoredEvent]) -> i64 {
    events
        .iter()
        .filter(|e| {
            e.event_type == projector::demo::bank::CREDITED
                || e.event_type == projector::demo::bank::DEBITED
        })
        .count() as i64
}
