//! Poison events over a read model's life, against the real binary: dead letters listed, shown,
//! retried and discarded; a halted projection resumed once its feed is repaired, and skipped;
//! `on_error = "park"` holding one aggregate back while the others go on, released in order by
//! retrying its first event; `reset --to`; and `query` for scripts (CSV, parameters).

mod common;

use common::{output_text, poison_first_credit, projector, wait_for, Harness};
use projector::demo::bank::{self, CREDITED};
use projector::demo::feed_server::StoredEvent;

fn letters(harness: &Harness, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["dead-letters", "list", "--json"];
    all.extend_from_slice(args);
    let output = harness.run(&all);
    assert!(output.status.success(), "{}", output_text(&output));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// A copy of `event` under a new id.
fn copy_of(event: &StoredEvent, id: &str) -> StoredEvent {
    StoredEvent {
        id: id.into(),
        ..event.clone()
    }
}

fn body_field(event: &StoredEvent, field: &str) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(&event.body).unwrap_or_else(|e| panic!("{e}"))[field]
        .clone()
}

const BALANCES_SKIPPING: &str = r#"
[[projection]]
name = "account_balances"
feed = "bank"
file = "account_balances.toml"
on_error = "skip"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_listed_shown_retried_late_and_discarded() {
    let mut events = bank::generate(30, 1000);
    let credit = events
        .iter()
        .find(|e| e.event_type == CREDITED)
        .cloned()
        .unwrap_or_else(|| panic!("no credit"));
    // A credit that arrives before its account exists, and one that can never apply.
    events.insert(0, copy_of(&credit, "early-credit"));
    let mut hopeless = copy_of(&credit, "hopeless-credit");
    hopeless.body = r#"{"account_id":"nobody","transaction_id":"t","amount":5}"#.into();
    events.insert(500, hopeless);
    let harness = Harness::new(events.clone()).await;
    harness.write_config(&harness.server.url(), BALANCES_SKIPPING, "");
    let mut daemon = harness.spawn_running().await;
    harness
        .wait_for_checkpoints(&mut daemon, &["account_balances"], 1002)
        .await;

    let waiting = letters(&harness, &[]);
    assert_eq!(waiting.len(), 2, "{waiting:?}");
    assert_eq!(waiting[0]["event_id"], "early-credit");
    assert_eq!(waiting[0]["offset"], 0);
    assert!(waiting[0]["error"]
        .as_str()
        .is_some_and(|e| e.contains("changed 0 rows")));
    assert!(
        waiting[0].get("payload").is_none(),
        "list leaves payloads to show"
    );
    assert_eq!(harness.projection("account_balances")["dead_letters"], 2);
    let early = waiting[0]["id"].to_string();
    let hopeless = waiting[1]["id"].to_string();
    let output = harness.run(&["dead-letters", "show", &early]);
    assert!(output.status.success(), "{}", output_text(&output));
    assert!(
        output_text(&output).contains(&credit.body),
        "{}",
        output_text(&output)
    );

    // The account exists now: the early credit applies when retried, while the daemon runs.
    // A sum commutes, so applied late it gives the balance it would have given in order.
    let output = harness.run(&["dead-letters", "retry", &early]);
    assert!(output.status.success(), "{}", output_text(&output));
    let mut expected = bank::expected_balances(&events);
    expected.remove("nobody");
    let account = body_field(&credit, "account_id")
        .as_str()
        .unwrap_or_default()
        .to_string();
    *expected.entry(account).or_default() += body_field(&credit, "amount").as_i64().unwrap_or(0);
    assert_eq!(harness.balances(), expected);

    // The hopeless one fails again, keeps waiting with its error, and is then discarded.
    let output = harness.run(&["dead-letters", "retry", "--all"]);
    assert_eq!(output.status.code(), Some(1), "{}", output_text(&output));
    assert!(
        output_text(&output).contains("still fails"),
        "{}",
        output_text(&output)
    );
    assert_eq!(letters(&harness, &[]).len(), 1);
    let output = harness.run(&["dead-letters", "discard", &hopeless]);
    assert!(output.status.success(), "{}", output_text(&output));
    assert!(letters(&harness, &[]).is_empty());
    let all = letters(&harness, &["--all"]);
    let resolutions: Vec<&str> = all
        .iter()
        .map(|l| l["resolution"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(resolutions, ["retried", "discarded"]);
    assert!(all.iter().all(|l| l["resolved_at"].is_string()));
    let output = harness.run(&["dead-letters", "discard", &hopeless]);
    assert!(!output.status.success());
    assert!(
        output_text(&output).contains("discarded already"),
        "{}",
        output_text(&output)
    );
    let output = harness.run(&["dead-letters", "show", "999"]);
    assert_eq!(output.status.code(), Some(2), "{}", output_text(&output));
    assert_eq!(harness.balances(), expected);
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
}

const LEDGER_ONLY: &str = r#"
[[projection]]
name = "account_ledger"
feed = "bank"
module = "account_ledger"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_halted_projection_is_resumed_once_its_feed_is_repaired_and_skipped_past_a_poison() {
    let all = bank::generate(31, 1300);
    let mut served = all[..1000].to_vec();
    let repaired = served.clone();
    let poison = poison_first_credit(&mut served);
    let harness = Harness::new(served.clone()).await;
    harness.write_config(&harness.server.url(), LEDGER_ONLY, "");
    let mut daemon = harness.spawn_running().await;
    wait_for(&mut daemon, "the ledger to halt", || {
        harness.projection("account_ledger")["state"] == "halted"
    })
    .await;
    let view = harness.projection("account_ledger");
    assert_eq!(view["halted"]["offset"], poison, "{view}");
    assert_eq!(
        view["halted"]["event_id"],
        served[poison].id.as_str(),
        "{view}"
    );
    assert!(view["halted"]["error"].is_string(), "{view}");
    assert_eq!(view["checkpoint"], poison, "{view}");

    // The feed is repaired at the source (same event id, a good payload); resume retries.
    harness.server.replace(repaired.clone());
    let output = harness.ctl(&["resume"]);
    assert!(output.status.success(), "{}", output_text(&output));
    assert!(
        output_text(&output).contains("retrying"),
        "{}",
        output_text(&output)
    );
    harness
        .wait_for_checkpoints(&mut daemon, &["account_ledger"], 1000)
        .await;
    assert_eq!(harness.projection("account_ledger")["state"], "running");

    // A poison that will never be repaired: skipped into the dead letters, and on it goes.
    let mut poisoned_more = all[1000..].to_vec();
    let second = poison_first_credit(&mut poisoned_more);
    harness.server.append(poisoned_more.clone());
    wait_for(&mut daemon, "the ledger to halt again", || {
        harness.projection("account_ledger")["state"] == "halted"
    })
    .await;
    let output = harness.run(&["skip", "account_ledger"]);
    assert!(output.status.success(), "{}", output_text(&output));
    assert!(
        output_text(&output).contains("moved into the dead letters"),
        "{}",
        output_text(&output)
    );
    harness
        .wait_for_checkpoints(&mut daemon, &["account_ledger"], 1300)
        .await;
    let waiting = letters(&harness, &[]);
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert_eq!(waiting[0]["offset"], 1000 + second as u64);
    assert!(waiting[0]["error"]
        .as_str()
        .is_some_and(|e| e.starts_with("skipped by an operator")));
    let mut applied = repaired;
    applied.extend(poisoned_more.iter().cloned());
    applied.remove(1000 + second);
    assert_eq!(
        harness.count("SELECT count(*) FROM account_ledger_entries"),
        common::credits_and_debits(&applied)
    );
    let output = harness.run(&["skip", "account_ledger"]);
    assert!(!output.status.success());
    assert!(
        output_text(&output).contains("not halted"),
        "{}",
        output_text(&output)
    );
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
}

/// account_balances with a bug that fails the credit of transaction `broken`, and an
/// explicit version, so that fixing the bug keeps the tables.
fn balances_with_bug(broken: &str) -> String {
    let shipped = include_str!("../projections/account_balances.toml");
    let credit = " WHERE account_id = :account_id\n\"\"\"\nparams = { offset = \"@offset\", created = \"@created\" }\n# A credit";
    assert!(shipped.contains(credit));
    format!("version = \"1\"\n{shipped}").replacen(
        credit,
        &format!(
            " WHERE account_id = :account_id AND :transaction_id != '{broken}'\n\"\"\"\nparams = {{ offset = \"@offset\", created = \"@created\" }}\n# A credit"
        ),
        1,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn park_holds_one_aggregate_back_while_the_others_go_on_and_a_retry_releases_it_in_order() {
    let all = bank::generate(32, 1500);
    let events = all[..1200].to_vec();
    let credit = events
        .iter()
        .position(|e| e.event_type == CREDITED)
        .unwrap_or_else(|| panic!("no credit"));
    let account = events[credit].aggregate_id.clone();
    let broken = body_field(&events[credit], "transaction_id");
    let broken = broken.as_str().unwrap_or_default();
    let harness = Harness::new(events.clone()).await;
    std::fs::write(
        harness.dir.path().join("account_balances.toml"),
        balances_with_bug(broken),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    harness.write_inline_config(
        r#"
[[projection]]
name = "account_balances"
feed = "bank"
file = "account_balances.toml"
on_error = "park"
"#,
        "",
    );
    let mut daemon = harness.spawn_running().await;
    harness
        .wait_for_checkpoints(&mut daemon, &["account_balances"], 1200)
        .await;

    // Every account but the parked one is exact; that one stands just before its poison.
    let balances = harness.balances();
    let expected = bank::expected_balances(&events);
    let before_poison = bank::expected_balances(&events[..credit]);
    for (id, balance) in &expected {
        if *id == account {
            assert_eq!(
                balances.get(id),
                before_poison.get(id),
                "the parked account"
            );
        } else {
            assert_eq!(balances.get(id), Some(balance), "account {id}");
        }
    }
    let parked = letters(&harness, &[]);
    let held: Vec<usize> = events
        .iter()
        .enumerate()
        .skip(credit)
        .filter(|(_, e)| e.aggregate_id == account && e.event_type != bank::STATEMENT_REQUESTED)
        .map(|(offset, _)| offset)
        .collect();
    let offsets: Vec<usize> = parked
        .iter()
        .map(|l| l["offset"].as_u64().unwrap_or_default() as usize)
        .collect();
    assert_eq!(offsets, held, "the aggregate's events, in order");
    assert!(
        held.len() > 1,
        "the test needs events parked behind the first"
    );
    assert!(parked[1]["error"]
        .as_str()
        .is_some_and(|e| e.contains("parked behind dead letter")));

    // A later one waits for the first.
    let second = parked[1]["id"].to_string();
    let output = harness.run(&["dead-letters", "retry", &second]);
    assert_eq!(output.status.code(), Some(1), "{}", output_text(&output));
    assert!(
        output_text(&output).contains("holds"),
        "{}",
        output_text(&output)
    );

    // The bug is fixed, keeping the version (the tables need no rebuild); retrying the first
    // releases the rest in order, while the daemon runs.
    std::fs::write(
        harness.dir.path().join("account_balances.toml"),
        balances_with_bug("no such transaction"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let first = parked[0]["id"].to_string();
    let output = harness.run(&["dead-letters", "retry", &first]);
    assert!(output.status.success(), "{}", output_text(&output));
    assert!(
        output_text(&output).contains(&format!("releasing {} parked after it", held.len() - 1)),
        "{}",
        output_text(&output)
    );
    assert_eq!(harness.balances(), expected);
    assert!(letters(&harness, &[]).is_empty());

    // Released, the aggregate's new events apply as they come.
    harness.server.append(all[1200..].to_vec());
    harness
        .wait_for_checkpoints(&mut daemon, &["account_balances"], 1500)
        .await;
    assert_eq!(harness.balances(), bank::expected_balances(&all));
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
}

#[test]
fn park_on_a_flux_feed_is_refused_at_the_projection() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = dir.path().join("consumer.toml");
    let mut toml = projector::demo::consumer_toml::ConsumerToml::new(
        "http://127.0.0.1:9/events",
        projector::config::FeedFormat::Flux,
    );
    toml.projections = LEDGER_ONLY.replace(
        "module = \"account_ledger\"",
        "module = \"account_ledger\"\non_error = \"park\"",
    );
    toml.write(&config).unwrap_or_else(|e| panic!("{e}"));
    let output = projector(&["check", "--config", config.to_str().unwrap_or_default()]);
    assert_eq!(output.status.code(), Some(2), "{}", output_text(&output));
    assert!(
        output_text(&output).contains("on_error = \"park\"")
            && output_text(&output).contains("Flux"),
        "{}",
        output_text(&output)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_moves_a_checkpoint_with_confirmation_alone_or_through_the_daemon() {
    let events = bank::generate(33, 500);
    let harness = Harness::new(events.clone()).await;
    harness.write_config(&harness.server.url(), LEDGER_ONLY, "");
    let mut daemon = harness.spawn_running().await;
    harness
        .wait_for_checkpoints(&mut daemon, &["account_ledger"], 500)
        .await;
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");

    let output = harness.run(&["reset", "account_ledger", "--to", "0"]);
    assert_eq!(output.status.code(), Some(2), "{}", output_text(&output));
    assert!(
        output_text(&output).contains("--yes"),
        "{}",
        output_text(&output)
    );
    assert_eq!(harness.checkpoints()["account_ledger"], 500);

    let output = harness.run(&["reset", "account_ledger", "--to", "0", "--yes"]);
    assert!(output.status.success(), "{}", output_text(&output));
    assert_eq!(harness.checkpoints()["account_ledger"], 0);
    // What reset does not undo: the ledger's rows are there, so replaying its first event
    // conflicts with them and halts it.
    let mut daemon = harness.spawn_running().await;
    wait_for(
        &mut daemon,
        "the replay to halt on the rows it did not undo",
        || harness.projection("account_ledger")["state"] == "halted",
    )
    .await;
    let output = harness.run(&["reset", "account_ledger", "--to", "500", "--yes"]);
    assert!(output.status.success(), "{}", output_text(&output));
    assert!(
        output_text(&output).contains("from offset 0 to 500"),
        "{}",
        output_text(&output)
    );
    assert_eq!(harness.checkpoints()["account_ledger"], 500);
    wait_for(&mut daemon, "the ledger to run again", || {
        harness.projection("account_ledger")["state"] == "running"
    })
    .await;
    assert_eq!(
        harness.count("SELECT count(*) FROM account_ledger_entries"),
        common::credits_and_debits(&events)
    );
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn query_prints_csv_with_named_parameters_bound() {
    let events = bank::generate(35, 300);
    let harness = Harness::new(events.clone()).await;
    let mut daemon = harness.spawn_running().await;
    harness
        .wait_for_checkpoints(&mut daemon, &["account_balances"], 300)
        .await;
    let (account, balance) = bank::expected_balances(&events)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no account"));
    let param = format!("account={account}");
    let output = harness.run(&[
        "query",
        "SELECT account_id, balance FROM account_balances WHERE account_id = :account",
        "--param",
        &param,
        "--format",
        "csv",
    ]);
    assert!(output.status.success(), "{}", output_text(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("account_id,balance\n{account},{balance}\n")
    );
    let output = harness.run(&[
        "query",
        "SELECT 'a,\"b\"' AS text, :n + 1 AS n, NULL AS missing",
        "--param",
        "n=41",
        "--format",
        "csv",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "text,n,missing\n\"a,\"\"b\"\"\",42,\n"
    );
    // A value is bound, never pasted into the SQL.
    let output = harness.run(&[
        "query",
        "SELECT count(*) AS n FROM account_balances WHERE account_id = :account",
        "--param",
        "account=' OR 1=1 --",
        "--format",
        "json",
    ]);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "{\"n\":0}\n");
    for (params, says) in [
        (&["--param", "nope=1"][..], "no parameter :nope"),
        (&[][..], "has no value"),
        (&["--param", "account"][..], "name=value"),
    ] {
        let mut args = vec![
            "query",
            "SELECT * FROM account_balances WHERE account_id = :account",
        ];
        args.extend_from_slice(params);
        let output = harness.run(&args);
        assert_eq!(output.status.code(), Some(2), "{}", output_text(&output));
        assert!(
            output_text(&output).contains(says),
            "{says}: {}",
            output_text(&output)
        );
    }
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
}
