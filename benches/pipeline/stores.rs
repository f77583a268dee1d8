//! The two stores side by side: pairs of catch-ups of the same feed with both shipped
//! projections, one into a fresh SQLite file and one into a fresh PostgreSQL schema (on the
//! server at `PROJECTOR_BENCH_POSTGRES`, by default the machine's on 127.0.0.1:5432), the order
//! alternating from pair to pair, per format.

use std::time::{Duration, Instant};

use projector::config::{FeedFormat, Synchronous};
use projector::demo::feed_server::{FeedServer, StoredEvent};

use crate::median_of;
use crate::runs::{catch_up, spawn, stop, usage, write_config, CatchUp, Projections, Setup};

fn postgres_url() -> String {
    std::env::var("PROJECTOR_BENCH_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test?sslmode=disable".into())
}

/// Prints each pair and the medians of events/s, CPU an event and peak RSS, per format.
pub async fn stores(
    binary: &std::path::Path,
    server: &FeedServer,
    events: &[StoredEvent],
    synchronous: Synchronous,
    pairs: usize,
) {
    let total = events.len() as f64;
    println!(
        "stores: {pairs} pairs of catch-ups of {} events, both shipped projections, into SQLite and into PostgreSQL ({})",
        events.len(),
        projector::shown::url_text(&postgres_url())
    );
    println!();
    println!("| (median of {pairs} pairs) | events/s | daemon's CPU an event | peak RSS |");
    println!("| --- | --- | --- | --- |");
    for format in [FeedFormat::Flux, FeedFormat::Inline] {
        let setup = Setup {
            format,
            projections: Projections::Both,
            mapping: None,
        };
        let mut sqlite = Vec::new();
        let mut postgres = Vec::new();
        for pair in 0..pairs {
            for side in if pair % 2 == 0 { [0, 1] } else { [1, 0] } {
                if side == 0 {
                    sqlite.push(catch_up(binary, server, setup, events, synchronous).await.0);
                } else {
                    postgres.push(catch_up_postgres(binary, server, setup, events, pair).await);
                }
            }
        }
        for (store, runs) in [("SQLite", &sqlite), ("PostgreSQL", &postgres)] {
            println!(
                "| {}, {store} | {:.0} | {:.1} µs | {:.1} MB |",
                format.name(),
                median_of(runs, |d| d.events_per_second),
                median_of(runs, |d| 1e6 * d.cpu_seconds / total),
                median_of(runs, |d| d.peak_rss_kib as f64 / 1024.0)
            );
        }
    }
}

/// A catch-up into a fresh schema, dropped afterwards.
async fn catch_up_postgres(
    binary: &std::path::Path,
    server: &FeedServer,
    setup: Setup,
    events: &[StoredEvent],
    run: usize,
) -> CatchUp {
    let total = events.len() as i64;
    let schema = format!("projector_bench_{}_{run}", std::process::id());
    query(&schema, |client| {
        client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
    });
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = write_config(
        dir.path(),
        setup,
        &server.url_in(setup.format),
        "50ms",
        Synchronous::Normal,
    );
    let text = std::fs::read_to_string(&config).unwrap_or_else(|e| panic!("{e}"));
    let text = text
        .replace(
            "database = \"projector.db\"",
            &format!("database = \"{}\"\nschema = \"{schema}\"", postgres_url()),
        )
        .replace("synchronous = \"normal\"\n", "");
    std::fs::write(&config, text).unwrap_or_else(|e| panic!("{e}"));
    let pages_before = server.page_requests();
    let child = spawn(binary, &config);
    while server.page_requests() == pages_before {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let started = Instant::now();
    // The checkpoints are watched from a thread of its own: the blocking client cannot run on
    // the bench's runtime.
    let watched = schema.clone();
    let caught_up = tokio::task::spawn_blocking(move || {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut client = connect(&watched);
                    loop {
                        let slowest: Option<i64> = client
                            .query_one("SELECT min(next_offset) FROM projector_checkpoints", &[])
                            .ok()
                            .and_then(|row| row.get(0));
                        if slowest.is_some_and(|at| at >= total) {
                            return Instant::now();
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                })
                .join()
                .unwrap_or_else(|_| panic!("the watcher panicked"))
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let elapsed = caught_up - started;
    let (peak_rss_kib, cpu_seconds) = usage(child.id());
    stop(child);
    query(&schema, |client| {
        client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
    });
    CatchUp {
        events_per_second: events.len() as f64 / elapsed.as_secs_f64(),
        peak_rss_kib,
        cpu_seconds,
        page_requests: 0,
        body_requests: 0,
    }
}

fn connect(schema: &str) -> postgres::Client {
    let mut client = postgres::Client::connect(&postgres_url(), postgres::NoTls)
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", postgres_url()));
    client
        .batch_execute(&format!("SET search_path TO {schema}"))
        .unwrap_or_else(|e| panic!("{e}"));
    client
}

/// Runs `work` on a connection of its own, on a thread of its own.
fn query(
    schema: &str,
    work: impl FnOnce(&mut postgres::Client) -> Result<(), postgres::Error> + Send,
) {
    std::thread::scope(|scope| {
        scope
            .spawn(|| work(&mut connect(schema)).unwrap_or_else(|e| panic!("{e}")))
            .join()
            .unwrap_or_else(|_| panic!("a query panicked"))
    });
}
