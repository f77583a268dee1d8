//! The database under stress, against the real binary: full (by `max_database_bytes`, and on a
//! real small file system when the tests run as root), and read by long-running readers while
//! the daemon writes.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_consistent, wait_for, wait_for_log, Harness};
use projector::demo::bank;
use projector::demo::consumer_toml::BOTH_PROJECTIONS;

const BOTH: &[&str] = &["account_balances", "account_ledger"];

/// The database refuses batches: the daemon says so in the log and in `status`, applies nothing
/// partial, keeps the file intact, and carries on once there is room (here: a reload raising
/// the cap).
#[tokio::test(flavor = "multi_thread")]
async fn a_full_database_stops_writes_intact_and_they_resume_once_there_is_room() {
    let events = bank::generate(50, 3000);
    let harness = Harness::new(events.clone()).await;
    let url = harness.server.url();
    harness.write_config_with_daemon(&url, BOTH_PROJECTIONS, "", "max_database_bytes = 196608");
    let mut daemon = harness.spawn_running().await;
    wait_for(&mut daemon, "the database to fill up", || {
        harness.feed_status("bank")["state"] == "commit_failing"
    })
    .await;
    wait_for_log(&mut daemon, "database or disk is full").await;
    let feed = harness.feed_status("bank");
    let last_error = feed["last_error"]["message"].as_str().unwrap_or_default();
    assert!(last_error.contains("max_database_bytes"), "{feed}");
    let reached = harness.checkpoints()["account_ledger"];
    assert!(reached < 3000, "the cap was never reached");
    assert_consistent(&harness, &events, "while full");

    harness.write_config(&url, BOTH_PROJECTIONS, "");
    daemon.signal("HUP");
    harness.wait_for_checkpoints(&mut daemon, BOTH, 3000).await;
    harness.assert_exact(&events);
    assert_consistent(&harness, &events, "after room was made");
    assert_eq!(harness.feed_status("bank")["state"], "live");
    let (status, log) = daemon.terminate().await;
    assert!(status.success() && !log.contains("panicked"), "{log}");
}

/// A tmpfs mounted over a folder, unmounted when dropped.
struct SmallFileSystem<'a>(&'a Path);

impl Drop for SmallFileSystem<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).status();
    }
}

fn mount_small_file_system(dir: &Path, bytes: u64) -> Option<SmallFileSystem<'_>> {
    let mounted = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={bytes},mode=0700"),
            "tmpfs",
        ])
        .arg(dir)
        .output()
        .is_ok_and(|output| output.status.success());
    mounted.then_some(SmallFileSystem(dir))
}

/// The same with a real file system that fills up (root only: it mounts an 8 MiB tmpfs; the
/// space comes back when a filler file is deleted).
#[tokio::test(flavor = "multi_thread")]
async fn a_real_full_file_system_stops_writes_intact_and_they_resume_when_space_is_freed() {
    let events = bank::generate(51, 6000);
    let harness = Harness::new(events.clone()).await;
    let dir = harness.dir.path();
    let Some(_mounted) = mount_small_file_system(dir, 8 << 20) else {
        eprintln!(
            "cannot mount a tmpfs (not root?): the full disk is covered by max_database_bytes only"
        );
        return;
    };
    // The mount hid the harness's files: write them again, then fill most of the space.
    let projection =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("projections/account_balances.toml");
    std::fs::copy(projection, dir.join("account_balances.toml")).unwrap_or_else(|e| panic!("{e}"));
    harness.write_config(&harness.server.url(), BOTH_PROJECTIONS, "");
    let filler = dir.join("filler");
    std::fs::write(&filler, vec![0u8; 7 << 20]).unwrap_or_else(|e| panic!("{e}"));

    let mut daemon = harness.spawn_running().await;
    wait_for(&mut daemon, "the file system to fill up", || {
        harness.feed_status("bank")["state"] == "commit_failing"
    })
    .await;
    wait_for_log(&mut daemon, "database or disk is full").await;
    assert!(harness.checkpoints()["account_ledger"] < 6000);
    assert_consistent(&harness, &events, "while the disk is full");

    std::fs::remove_file(&filler).unwrap_or_else(|e| panic!("{e}"));
    harness.wait_for_checkpoints(&mut daemon, BOTH, 6000).await;
    harness.assert_exact(&events);
    assert_consistent(&harness, &events, "after space was freed");
    let (status, log) = daemon.terminate().await;
    assert!(status.success() && !log.contains("panicked"), "{log}");
}

/// Readers that hold read transactions (150 ms each), one after another with short gaps, while
/// the daemon writes: neither side sees SQLITE_BUSY, and the write-ahead log stays bounded
/// (without the writer's truncation it grew to 76 MB here).
#[tokio::test(flavor = "multi_thread")]
async fn long_readers_never_block_the_daemon_and_the_wal_stays_bounded() {
    const TOTAL: u64 = 16_000;
    const CHUNK: usize = 200;
    let events = bank::generate(52, TOTAL as usize);
    let harness = Harness::new(events[..2000].to_vec()).await;
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 2000).await;

    let database = harness.database();
    // Each read says when it holds its snapshot; a chunk of events is appended then, and the
    // next only once the daemon has committed it. So each chunk is a commit of its own, made
    // while readers hold the log, however fast the daemon is: it takes many commits to grow the
    // log past the writer's truncation size.
    let (holding, mut reads_holding) = tokio::sync::mpsc::unbounded_channel();
    let readers = tokio::task::spawn_blocking(move || {
        let mut largest_wal = 0;
        let mut reads = 0;
        let wal = wal_path(&database);
        let deadline = Instant::now() + Duration::from_secs(60);
        while checkpoint_of(&database) < TOTAL {
            assert!(
                Instant::now() < deadline,
                "the daemon stalled under readers"
            );
            let mut conn =
                projector::store::open_reader(&database).unwrap_or_else(|e| panic!("{e}"));
            let tx = conn.transaction().unwrap_or_else(|e| panic!("{e}"));
            // A read, then the transaction held open as a slow report would.
            let _: i64 = tx
                .query_row("SELECT count(*) FROM account_ledger_entries", [], |row| {
                    row.get(0)
                })
                .unwrap_or_else(|e| panic!("the reader failed: {e}"));
            let _ = holding.send(());
            std::thread::sleep(Duration::from_millis(150));
            drop(tx);
            reads += 1;
            largest_wal = largest_wal.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
            // Readers come and go: a gap lets a checkpoint finish.
            std::thread::sleep(Duration::from_millis(2));
        }
        (reads, largest_wal)
    });
    for chunk_end in (2000 + CHUNK..=TOTAL as usize).step_by(CHUNK) {
        while reads_holding.try_recv().is_ok() {} // from reads that may have ended
        reads_holding.recv().await;
        harness
            .server
            .append(events[chunk_end - CHUNK..chunk_end].to_vec());
        harness
            .wait_for_checkpoints(&mut daemon, BOTH, chunk_end as u64)
            .await;
    }
    let (reads, largest_wal) = readers.await.unwrap_or_else(|e| panic!("{e}"));
    harness.wait_for_checkpoints(&mut daemon, BOTH, TOTAL).await;
    harness.assert_exact(&events);
    eprintln!("{reads} long reads; the WAL peaked at {largest_wal} bytes");
    // SQLite checkpoints every 1000 pages (4 MiB); a WAL that could not be reset would grow
    // with every batch instead.
    assert!(
        largest_wal < 24 << 20,
        "the WAL grew to {largest_wal} bytes; log:\n{}",
        daemon.log()
    );
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
    assert!(
        log.contains("write-ahead log checkpointed and truncated"),
        "{log}"
    );
    for busy in ["database is locked", "SQLITE_BUSY", "batch not committed"] {
        assert!(!log.contains(busy), "{busy}: {log}");
    }
}

fn wal_path(database: &Path) -> std::path::PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push("-wal");
    name.into()
}

fn checkpoint_of(database: &Path) -> u64 {
    common::checkpoints(database)
        .values()
        .min()
        .copied()
        .unwrap_or(0)
}

/// The `sqlite3` shell holding a read transaction open, and a query that runs for seconds, while
/// the daemon catches up: the shell keeps its snapshot, neither side reports a locked database,
/// and the daemon commits throughout. (Needs the sqlite3 shell; `.ci/run` installs it.)
#[tokio::test(flavor = "multi_thread")]
async fn the_sqlite3_shell_and_a_long_query_read_while_the_daemon_writes() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    if Command::new("sqlite3").arg("--version").output().is_err() {
        eprintln!("no sqlite3 shell: the long readers are covered by the rusqlite test only");
        return;
    }
    let events = bank::generate(53, 6000);
    let harness = Harness::new(events[..1000].to_vec()).await;
    let mut daemon = harness.spawn();
    harness.wait_for_checkpoints(&mut daemon, BOTH, 1000).await;
    let entries_then = harness.count("SELECT count(*) FROM account_ledger_entries");

    let mut shell = Command::new("sqlite3")
        .arg(harness.database())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut input = shell.stdin.take().unwrap_or_else(|| panic!("no stdin"));
    let mut output = BufReader::new(shell.stdout.take().unwrap_or_else(|| panic!("no stdout")));
    let mut ask = |sql: &str| {
        writeln!(input, "{sql}").unwrap_or_else(|e| panic!("{e}"));
        input.flush().unwrap_or_else(|e| panic!("{e}"));
        let mut line = String::new();
        output
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("{e}"));
        line.trim().to_string()
    };
    let seen = ask("BEGIN; SELECT count(*) FROM account_ledger_entries;");
    assert_eq!(seen, entries_then.to_string());

    // A query that reads the database for seconds, in another process.
    let long_query = Command::new("sqlite3")
        .arg(harness.database())
        .arg(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 5000000) \
             SELECT count(*) FROM c, (SELECT count(*) FROM account_ledger_entries);",
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));

    harness.server.append(events[1000..].to_vec());
    harness.wait_for_checkpoints(&mut daemon, BOTH, 6000).await;
    // The shell still sees its snapshot, while the daemon has committed everything since.
    assert_eq!(ask("SELECT count(*) FROM account_ledger_entries;"), seen);
    assert_ne!(
        ask("COMMIT; SELECT count(*) FROM account_ledger_entries;"),
        seen
    );
    drop(input);
    let shell = shell.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    let shell_errors = String::from_utf8_lossy(&shell.stderr);
    assert!(shell_errors.is_empty(), "the shell failed: {shell_errors}");
    let long_query = long_query
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        long_query.status.success() && long_query.stderr.is_empty(),
        "the long query failed: {}",
        String::from_utf8_lossy(&long_query.stderr)
    );

    harness.assert_exact(&events);
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
    for busy in ["database is locked", "batch not committed"] {
        assert!(!log.contains(busy), "{busy}: {log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_already_over_max_database_bytes_is_refused_at_start() {
    let events = bank::generate(29, 300);
    let harness = Harness::new(events).await;
    let mut daemon = harness.spawn();
    harness
        .wait_for_checkpoints(&mut daemon, &["account_balances", "account_ledger"], 300)
        .await;
    assert!(daemon.terminate().await.0.success());
    let url = harness.server.url();
    harness.write_config_with_daemon(&url, BOTH_PROJECTIONS, "", "max_database_bytes = 4096");
    let config = harness.config_path();
    let output = common::projector(&["run", "--config", &config.to_string_lossy()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("consumer.toml:4:22:") && stderr.contains("over max_database_bytes (4096)"),
        "{stderr}"
    );
}
