//! `projector check`: the mistakes it catches before anything runs, with and without `--probe`.

mod common;

use common::{projector, Harness};
use projector::demo::bank;
use projector::demo::consumer_toml::BOTH_PROJECTIONS;

fn check(harness: &Harness, probe: bool) -> (Option<i32>, String) {
    let config = harness.config_path().to_string_lossy().to_string();
    let mut args = vec!["check", "--config", &config];
    if probe {
        args.push("--probe");
    }
    let output = projector(&args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn check_probe_finds_the_head_the_types_seen_and_a_misspelt_one() {
    let harness = Harness::new(bank::generate(91, 300)).await;
    std::fs::write(
        harness.dir.path().join("typo.toml"),
        r#"
schema = "CREATE TABLE IF NOT EXISTS opened (account_id TEXT)"
[on."account.AccountCreatd"]
sql = "INSERT INTO opened VALUES (:account_id)"
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let typo = "\n[[projection]]\nname = \"typo\"\nfeed = \"bank\"\nfile = \"typo.toml\"\n";
    harness.write_config(
        &harness.server.url(),
        &format!("{BOTH_PROJECTIONS}{typo}"),
        "",
    );
    let (code, text) = check(&harness, true);
    assert_eq!(code, Some(0), "{text}");
    for says in [
        "read 300 events from the first 15 pages; head at 300",
        "types seen: account.AccountCreated (",
        "passed over (no projection on this feed applies them): account.StatementRequested",
        "warning: projection typo applies account.AccountCreatd, which none of the first 300 events of feed bank has (did you mean account.AccountCreated?)",
        "does not exist yet; it will be created",
    ] {
        assert!(text.contains(says), "{says:?} in:\n{text}");
    }
    // Without --probe the feed is not asked.
    let pages = harness.server.page_requests();
    let (code, text) = check(&harness, false);
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains("probe:"), "{text}");
    assert_eq!(harness.server.page_requests(), pages);
}

#[tokio::test(flavor = "multi_thread")]
async fn check_probe_says_why_a_feed_cannot_be_read_and_exits_1() {
    let harness = Harness::new(Vec::new()).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .unwrap_or_else(|e| panic!("{e}"));
    harness.write_config(&format!("http://{closed}/events"), BOTH_PROJECTIONS, "");
    let (code, text) = check(&harness, true);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("feed bank cannot be read: page at offset 0")
            && text.contains("hint: nothing listens at the feed's address"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_warns_of_a_table_the_database_has_with_other_columns() {
    let harness = Harness::new(Vec::new()).await;
    let database = rusqlite::Connection::open(harness.database()).unwrap_or_else(|e| panic!("{e}"));
    database
        .execute_batch("CREATE TABLE account_balances (account_id TEXT PRIMARY KEY, total REAL)")
        .unwrap_or_else(|e| panic!("{e}"));
    drop(database);
    let (code, text) = check(&harness, false);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("warning: projection account_balances: ")
            && text.contains(
                "has a table account_balances with columns (account_id TEXT, total REAL)"
            ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reads_the_feeds_secrets_as_a_start_would_and_names_the_line_of_one_missing() {
    let harness = Harness::new(Vec::new()).await;
    let headers = r#"headers = { Authorization = { file = "missing.token" } }"#;
    harness.write_config(&harness.server.url(), BOTH_PROJECTIONS, headers);
    let (code, text) = check(&harness, false);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("consumer.toml:") && text.contains("header Authorization: cannot read"),
        "{text}"
    );
    std::fs::write(harness.dir.path().join("missing.token"), "Bearer x\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let (code, text) = check(&harness, false);
    assert_eq!(code, Some(0), "{text}");
}
