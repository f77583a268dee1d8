//! `projector demo`: a bank feed on a loopback port, the real daemon reading it over HTTP into a
//! fresh database with the shipped projections, progress while it runs, and the result checked
//! against the fold of the feed.
//!
//! It writes a real `consumer.toml` next to the database, so what it did can be inspected, queried
//! and rerun with `projector run`.

use super::exit::{Exit, UsageError};
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::config::{Config, FeedFormat};
use crate::demo::bank;
use crate::demo::consumer_toml::ConsumerToml;
use crate::demo::feed_server::FeedServer;

/// The files the demo writes; only these are removed when it starts again.
const DEMO_FILES: &[&str] = &[
    "consumer.toml",
    "account_balances.toml",
    "projector.db",
    "projector.db-wal",
    "projector.db-shm",
];

/// Give up when nothing moves for this long (a halted projection, a broken machine).
const STALL_LIMIT: Duration = Duration::from_secs(60);

pub fn demo(
    events: usize,
    fault_rate: f64,
    format: FeedFormat,
    dir: Option<PathBuf>,
) -> anyhow::Result<Exit> {
    if events == 0 || events > 10_000_000 {
        return Err(UsageError("--events must be between 1 and 10000000".into()).into());
    }
    if !(0.0..=0.5).contains(&fault_rate) {
        return Err(UsageError("--fault-rate must be between 0 and 0.5".into()).into());
    }
    let dir = dir.unwrap_or_else(|| std::env::temp_dir().join("projector-demo"));
    prepare_dir(&dir)?;
    // The progress line is the demo's output; warnings and errors still show.
    crate::logging::init("warn", crate::config::LogFormat::Text);
    let result = super::demo_runtime()?.block_on(run_demo(events, fault_rate, format, &dir));
    crate::logging::flush();
    result
}

fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for name in DEMO_FILES {
        match std::fs::remove_file(dir.join(name)) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                return Err(err).with_context(|| format!("removing {}", dir.join(name).display()))
            }
            _ => {}
        }
    }
    std::fs::write(
        dir.join("account_balances.toml"),
        crate::projections::ACCOUNT_BALANCES_TOML,
    )
    .context("writing the demo's projection file")
}

async fn run_demo(
    events: usize,
    fault_rate: f64,
    format: FeedFormat,
    dir: &Path,
) -> anyhow::Result<Exit> {
    let feed = bank::generate(42, events);
    let expected = bank::expected_balances(&feed);
    let server = FeedServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), feed)
        .await
        .context("starting the embedded feed")?;
    if fault_rate > 0.0 {
        server.random_faults(7, fault_rate);
    }
    let config_path = dir.join("consumer.toml");
    let url = server.url_in(format);
    let mut toml = ConsumerToml::new(&url, format);
    let port = server.addr().port();
    toml.comment = Some(format!(
        "Written by `projector demo` for its embedded feed, which stopped when the demo ended.\n\
         To run the daemon on this file again, serve the same events on the same port first:\n  \
         cargo run --release --example bank_feed -- --events {events} --port {port}\n  \
         {} run --config {}",
        program(),
        config_path.display()
    ));
    toml.write(&config_path)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let config = Config::load(&config_path)?;
    let projections = crate::projection::build_all(&config)?;
    let database = config.daemon.database.clone();

    let described = match format {
        FeedFormat::Flux => "Flux bank feed",
        FeedFormat::Inline => "bank feed, inline format,",
    };
    say!("Embedded {described} {events} events at {url}");
    if fault_rate > 0.0 {
        say!(
            "  failing {:.0}% of its requests on purpose",
            fault_rate * 100.0
        );
    }
    say!("Config: {}", config_path.display());
    say!("Running the daemon with projections account_balances (declarative SQL) and account_ledger (Rust)...");

    let (control, inbox) = crate::control::handle::channel();
    let started = Instant::now();
    let mut daemon = tokio::spawn(crate::daemon::run(config, projections, inbox));
    let target = events as u64;
    let mut last_progress = (0, Instant::now());
    let terminal = std::io::stdout().is_terminal();
    let mut last_line = Instant::now();
    loop {
        tokio::select! {
            result = &mut daemon => {
                result.context("the daemon task failed")??;
                bail!("the daemon stopped before reaching the head of the feed");
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        let done = slowest_checkpoint(&database).unwrap_or(0);
        if done != last_progress.0 {
            last_progress = (done, Instant::now());
        } else if last_progress.1.elapsed() > STALL_LIMIT {
            bail!("no progress for {STALL_LIMIT:?}; see the log above");
        }
        let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
        if terminal {
            say_partly!("\r  {done}/{target} events applied ({rate:.0} events/s)   ");
            std::io::stdout().flush().ok();
        } else if last_line.elapsed() >= Duration::from_secs(1) || done == target {
            say!("  {done}/{target} events applied ({rate:.0} events/s)");
            last_line = Instant::now();
        }
        if done >= target {
            break;
        }
    }
    let elapsed = started.elapsed();
    let stopping = control
        .request(crate::control::protocol::Request::Stop)
        .await;
    if let Some(error) = stopping.error {
        bail!("stopping the daemon: {error}");
    }
    daemon.await.context("the daemon task failed")??;
    if terminal {
        say!("");
    }
    say!(
        "Caught up in {:.2}s: {:.0} events/s, {} page requests, {} injected faults retried.",
        elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64(),
        server.page_requests(),
        server.faults_injected()
    );

    let conn = crate::store::open_reader(&database)?;
    let mut statement = conn.prepare("SELECT account_id, balance FROM account_balances")?;
    let actual: std::collections::BTreeMap<String, i64> = statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let top = "SELECT account_id, balance, transactions FROM account_balances ORDER BY balance DESC LIMIT 5";
    let mut statement = conn.prepare(top)?;
    let columns: Vec<String> = statement.column_names().map(|c| c.to_string()).collect();
    let rows: Vec<Vec<String>> = statement
        .query_map([], |row| {
            Ok(vec![
                row.get::<_, String>(0)?,
                row.get::<_, i64>(1)?.to_string(),
                row.get::<_, i64>(2)?.to_string(),
            ])
        })?
        .collect::<Result<_, _>>()?;
    say!("\nThe five largest balances:\n");
    say_partly!("{}", super::query::format_table(&columns, &rows));

    let exact = actual == expected;
    say!(
        "\naccount_balances {} the fold of the feed ({} accounts).",
        if exact { "matches" } else { "DOES NOT match" },
        expected.len()
    );
    say!("\nQuery the read models yourself:");
    say!(
        "  {} query --config {} \"SELECT * FROM account_activity ORDER BY last_offset DESC LIMIT 5\"",
        program(),
        config_path.display()
    );
    say!(
        "  sqlite3 {} \"SELECT count(*), sum(balance) FROM account_balances\"",
        database.display()
    );
    Ok(if exact { Exit::Success } else { Exit::Failure })
}

/// The lowest checkpoint of all projections: how far the whole read model has come.
fn slowest_checkpoint(database: &Path) -> Option<u64> {
    let conn = crate::store::open_reader(database).ok()?;
    let checkpoints = crate::store::read_checkpoints(&conn).ok()?;
    checkpoints.iter().map(|(_, c)| c.next_offset).min()
}

/// The command that runs this program, for hints the user can copy: the path of the running
/// binary (`cargo run` puts it under target/, not on the PATH).
fn program() -> String {
    std::env::current_exe()
        .map(|path| path.display().to_string())
        .unwrap_or_else(|_| "projector".into())
}
