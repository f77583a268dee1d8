//! Read models over their lifetime, against the real binary: a rebuild under a stream of
//! concurrent readers (none fails, none sees a model that is not the fold of the feed up to its
//! checkpoint), a kill mid-rebuild resumed from the rebuild's own checkpoint, `rebuild --cancel`,
//! and a changed declarative definition rebuilt or refused per `on_change`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{output_text, wait_for, wait_for_log, Harness};
use projector::demo::bank;
use projector::demo::feed_server::StoredEvent;

const BOTH: &[&str] = &["account_balances", "account_ledger"];

/// Where the rebuild of `name` stands, read from its shadow database (0 before it exists).
fn shadow_offset(harness: &Harness, name: &str) -> u64 {
    let mut path = harness.database().into_os_string();
    path.push(format!(".rebuild-{name}"));
    common::checkpoints(std::path::Path::new(&path))
        .get(&format!("{name}@rebuild"))
        .copied()
        .unwrap_or(0)
}

/// Readers that, until stopped, check in one read transaction after another that the balances
/// are exactly the fold of the feed up to the checkpoint they stand with: a half-built, empty or
/// mixed model, or a failed query, is counted as a failure with its reason.
fn start_readers(
    harness: &Harness,
    events: Arc<std::sync::Mutex<Vec<StoredEvent>>>,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<(usize, Vec<String>)>> {
    (0..2)
        .map(|_| {
            let database = harness.database();
            let events = events.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut checked = 0;
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let result = (|| -> anyhow::Result<()> {
                        let mut conn = projector::store::open_reader(&database)?;
                        let snapshot = conn.transaction()?;
                        let checkpoint: i64 = snapshot.query_row(
                            "SELECT next_offset FROM projector_checkpoints WHERE projection = 'account_balances'",
                            [],
                            |row| row.get(0),
                        )?;
                        let mut statement =
                            snapshot.prepare("SELECT account_id, balance FROM account_balances")?;
                        let balances: std::collections::BTreeMap<String, i64> = statement
                            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                            .collect::<Result<_, _>>()?;
                        let events = events.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                        let expected =
                            bank::expected_balances(&events[..usize::try_from(checkpoint)?]);
                        anyhow::ensure!(
                            balances == expected,
                            "at checkpoint {checkpoint}: {} accounts where {} were expected",
                            balances.len(),
                            expected.len()
                        );
                        Ok(())
                    })();
                    checked += 1;
                    if let Err(err) = result {
                        failures.push(format!("{err:#}"));
                    }
                }
                (checked, failures)
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_under_concurrent_readers_and_new_events_swaps_in_whole() {
    let all = bank::generate(18, 6000);
    let harness = Harness::new(all[..4000].to_vec()).await;
    let mut daemon = harness.spawn_running().await;
    harness.wait_for_checkpoints(&mut daemon, BOTH, 4000).await;

    let served = Arc::new(std::sync::Mutex::new(all[..4000].to_vec()));
    let stop = Arc::new(AtomicBool::new(false));
    let readers = start_readers(&harness, served.clone(), stop.clone());
    // Slow enough that the readers and new events overlap the rebuild.
    harness.server.set_delay(Duration::from_millis(1));
    let output = harness.run(&["rebuild", "account_balances"]);
    assert!(output.status.success(), "{}", output_text(&output));
    assert!(
        output_text(&output).contains("rebuilding account_balances"),
        "{}",
        output_text(&output)
    );
    wait_for(&mut daemon, "the rebuild to start", || {
        harness.projection("account_balances")["state"] == "rebuilding"
    })
    .await;
    // The live model keeps being updated while the rebuild runs.
    {
        let mut served = served.lock().unwrap_or_else(|e| panic!("{e}"));
        served.extend_from_slice(&all[4000..]);
    }
    harness.server.append(all[4000..].to_vec());
    wait_for_log(&mut daemon, "rebuilt: the new tables replaced the old ones").await;
    harness.server.set_delay(Duration::ZERO);
    harness.wait_for_checkpoints(&mut daemon, BOTH, 6000).await;
    stop.store(true, Ordering::Relaxed);
    let mut checked = 0;
    for reader in readers {
        let (count, failures) = reader
            .join()
            .unwrap_or_else(|_| panic!("a reader panicked"));
        assert!(failures.is_empty(), "readers saw: {failures:?}");
        checked += count;
    }
    assert!(checked > 10, "the readers checked only {checked} times");
    harness.assert_exact(&all);
    let view = harness.projection("account_balances");
    assert_eq!(view["state"], "running", "{view}");
    assert!(view.get("rebuild").is_none(), "{view}");
    assert!(
        !std::path::Path::new(&format!(
            "{}.rebuild-account_balances",
            harness.database().display()
        ))
        .exists(),
        "the shadow database is left behind"
    );
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_killed_midway_resumes_from_its_own_checkpoint_and_cancel_drops_it() {
    let all = bank::generate(19, 3000);
    let harness = Harness::new(all.clone()).await;
    let mut daemon = harness.spawn_running().await;
    harness.wait_for_checkpoints(&mut daemon, BOTH, 3000).await;

    harness.server.set_delay(Duration::from_millis(5));
    let output = harness.run(&["rebuild", "account_ledger"]);
    assert!(output.status.success(), "{}", output_text(&output));
    wait_for(&mut daemon, "the rebuild to be under way", || {
        shadow_offset(&harness, "account_ledger") > 0
    })
    .await;
    daemon.kill();
    let reached = shadow_offset(&harness, "account_ledger");
    assert!(reached < 3000, "the rebuild finished before the kill");
    harness.assert_exact(&all);

    harness.server.set_delay(Duration::ZERO);
    let mut daemon = harness.spawn_running().await;
    wait_for_log(&mut daemon, "rebuilt: the new tables replaced the old ones").await;
    let log = daemon.log();
    let resumed_at = log
        .lines()
        .find(|line| line.contains("reading feed") && line.contains("account_ledger@rebuild"))
        .unwrap_or_else(|| panic!("no reader for the rebuild; log:\n{log}"));
    assert!(
        !resumed_at.contains("next_offset=0 "),
        "the rebuild started again from 0 instead of its checkpoint ({reached}): {resumed_at}"
    );
    harness.wait_for_checkpoints(&mut daemon, BOTH, 3000).await;
    harness.assert_exact(&all);

    // Cancel: the shadow goes, the live tables stay.
    harness.server.set_delay(Duration::from_millis(5));
    let output = harness.run(&["rebuild", "account_ledger"]);
    assert!(output.status.success(), "{}", output_text(&output));
    wait_for(&mut daemon, "the second rebuild to be under way", || {
        shadow_offset(&harness, "account_ledger") > 0
    })
    .await;
    let output = harness.run(&["rebuild", "account_ledger", "--cancel"]);
    assert!(output.status.success(), "{}", output_text(&output));
    assert!(
        output_text(&output).contains("cancelled"),
        "{}",
        output_text(&output)
    );
    let view = harness.projection("account_ledger");
    assert!(view.get("rebuild").is_none(), "{view}");
    assert!(!std::path::Path::new(&format!(
        "{}.rebuild-account_ledger",
        harness.database().display()
    ))
    .exists());
    harness.assert_exact(&all);
    let output = harness.run(&["rebuild", "account_ledger", "--cancel"]);
    assert!(!output.status.success());
    assert!(
        output_text(&output).contains("not being rebuilt"),
        "{}",
        output_text(&output)
    );
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
}

/// The shipped account_balances with one more column, so that the new tables can be told
/// from the old ones.
fn changed_balances(column: &str) -> String {
    let shipped = include_str!("../projections/account_balances.toml");
    let changed = shipped.replace(
        "    updated_at     TEXT NOT NULL\n",
        &format!("    updated_at     TEXT NOT NULL,\n    {column} INTEGER NOT NULL DEFAULT 7\n"),
    );
    assert_ne!(changed, shipped);
    changed
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_definition_is_refused_or_rebuilt_per_on_change_never_mixed() {
    let all = bank::generate(20, 3000);
    let harness = Harness::new(all.clone()).await;
    let refusing = r#"
[[projection]]
name = "account_balances"
feed = "bank"
file = "account_balances.toml"
on_change = "refuse"
"#;
    harness.write_config(&harness.server.url(), refusing, "");
    let mut daemon = harness.spawn_running().await;
    harness
        .wait_for_checkpoints(&mut daemon, &["account_balances"], 3000)
        .await;
    let first_version = harness.projection("account_balances")["version"].clone();
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");

    // Reformatting the file is no change.
    let shipped = include_str!("../projections/account_balances.toml");
    std::fs::write(
        harness.dir.path().join("account_balances.toml"),
        shipped.replace(" SET ", "\n    SET  "),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let daemon = harness.spawn_running().await;
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");

    // A change of the schema is refused, with what to run.
    std::fs::write(
        harness.dir.path().join("account_balances.toml"),
        changed_balances("first_change"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let output = harness.run(&["check"]);
    assert!(
        output_text(&output).contains("its definition changed since its tables were built"),
        "{}",
        output_text(&output)
    );
    let mut refused = harness.spawn();
    let status = refused.wait_exit().await;
    let log = refused.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("account_balances")
            && log.contains("definition changed")
            && log.contains("projector rebuild account_balances"),
        "{log}"
    );
    let view = harness.projection("account_balances");
    assert_eq!(view["version"], first_version, "{view}");
    assert!(view["configured_version"].is_string(), "{view}");
    harness.assert_exact_balances(&all);

    // Rebuilt on its own, with no daemon running.
    let output = harness.run(&["rebuild", "account_balances"]);
    assert!(output.status.success(), "{}", output_text(&output));
    assert!(
        output_text(&output).contains("rebuilt"),
        "{}",
        output_text(&output)
    );
    assert_eq!(
        harness.count("SELECT min(first_change) FROM account_balances"),
        7
    );
    harness.assert_exact_balances(&all);
    let view = harness.projection("account_balances");
    assert_ne!(view["version"], first_version, "{view}");
    assert!(view.get("configured_version").is_none(), "{view}");

    // With on_change = "rebuild" (the default), the daemon rebuilds it by itself.
    harness.write_config(
        &harness.server.url(),
        &refusing.replace("on_change = \"refuse\"", ""),
        "",
    );
    std::fs::write(
        harness.dir.path().join("account_balances.toml"),
        changed_balances("second_change"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut daemon = harness.spawn_running().await;
    wait_for_log(&mut daemon, "rebuilt: the new tables replaced the old ones").await;
    assert!(
        daemon.log().contains("the definition changed"),
        "{}",
        daemon.log()
    );
    assert_eq!(
        harness.count("SELECT min(second_change) FROM account_balances"),
        7
    );
    harness
        .wait_for_checkpoints(&mut daemon, &["account_balances"], 3000)
        .await;
    harness.assert_exact_balances(&all);
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn projections_lists_each_with_and_without_a_daemon_and_a_removed_one() {
    let all = bank::generate(21, 500);
    let harness = Harness::new(all.clone()).await;
    let mut daemon = harness.spawn_running().await;
    harness.wait_for_checkpoints(&mut daemon, BOTH, 500).await;
    let views = harness.projections();
    assert_eq!(views.len(), 2, "{views:?}");
    for view in &views {
        assert_eq!(view["state"], "running", "{view}");
        assert_eq!(view["checkpoint"], 500, "{view}");
        assert_eq!(view["feed"], "bank", "{view}");
        assert_eq!(view["last_event_id"], all[499].id.as_str(), "{view}");
        assert_eq!(view["dead_letters"], 0, "{view}");
    }
    let ledger = harness.projection("account_ledger");
    assert_eq!(ledger["definition"], "module account_ledger", "{ledger}");
    assert_eq!(ledger["version"], "1", "{ledger}");
    let output = harness.run(&["projections"]);
    assert!(output.status.success(), "{}", output_text(&output));
    assert!(
        output_text(&output)
            .contains("account_ledger  feed bank  module account_ledger  version 1"),
        "{}",
        output_text(&output)
    );
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");

    assert_eq!(harness.projection("account_ledger")["state"], "stopped");
    harness.write_config(
        &harness.server.url(),
        r#"
[[projection]]
name = "account_balances"
feed = "bank"
file = "account_balances.toml"
"#,
        "",
    );
    let ledger = harness.projection("account_ledger");
    assert_eq!(ledger["state"], "removed", "{ledger}");
    assert_eq!(ledger["definition"], "module account_ledger", "{ledger}");
}

/// A projection with a full-text index (an FTS5 virtual table, whose own tables SQLite keeps
/// beside it) rebuilds and swaps in searchable, with no daemon and with one.
#[tokio::test(flavor = "multi_thread")]
async fn a_projection_with_a_full_text_index_rebuilds_and_stays_searchable() {
    let all = bank::generate(90, 600);
    let harness = Harness::new(all.clone()).await;
    let file = |version: &str| {
        format!(
            r#"version = "{version}"
schema = """
CREATE VIRTUAL TABLE IF NOT EXISTS credit_search USING fts5(account_id, transaction_id);
CREATE TABLE IF NOT EXISTS credit_count (n INTEGER NOT NULL);
"""
[on."account.AccountCredited"]
sql = "INSERT INTO credit_search (account_id, transaction_id) VALUES (:account_id, :transaction_id)"
"#
        )
    };
    std::fs::write(harness.dir.path().join("credit_search.toml"), file("1"))
        .unwrap_or_else(|e| panic!("{e}"));
    let projections = "[[projection]]\nname = \"credit_search\"\nfeed = \"bank\"\nfile = \"credit_search.toml\"\n";
    harness.write_config(&harness.server.url(), projections, "");
    let credits = all
        .iter()
        .filter(|e| e.event_type == "account.AccountCredited")
        .count() as i64;
    let some_account = all
        .iter()
        .find(|e| e.event_type == "account.AccountCredited")
        .map(|e| e.aggregate_id.clone())
        .unwrap_or_default();
    let searched = |harness: &Harness| {
        harness.count(&format!(
            "SELECT count(*) FROM credit_search WHERE credit_search MATCH '\"{some_account}\"'"
        ))
    };
    let mut daemon = harness.spawn();
    harness
        .wait_for_checkpoints(&mut daemon, &["credit_search"], 600)
        .await;
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
    assert_eq!(harness.count("SELECT count(*) FROM credit_search"), credits);
    let found = searched(&harness);
    assert!(found > 0);

    // Rebuilt with no daemon, then by the daemon after a change of version.
    let output = harness.run(&["rebuild", "credit_search"]);
    assert!(output.status.success(), "{}", output_text(&output));
    assert_eq!(harness.count("SELECT count(*) FROM credit_search"), credits);
    assert_eq!(searched(&harness), found);
    std::fs::write(harness.dir.path().join("credit_search.toml"), file("2"))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut daemon = harness.spawn();
    wait_for_log(&mut daemon, "rebuilt: the new tables replaced the old ones").await;
    assert_eq!(harness.count("SELECT count(*) FROM credit_search"), credits);
    assert_eq!(searched(&harness), found);
    assert_eq!(
        harness.count(
            "SELECT count(*) FROM credit_search WHERE credit_search MATCH 'nothing_like_this'"
        ),
        0
    );
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
}
