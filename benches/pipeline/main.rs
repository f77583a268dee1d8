//! The end-to-end benchmark: `cargo bench` (options after `--`, e.g. `cargo bench -- --events
//! 1000000 --runs 5 --synchronous full`).
//!
//! It generates a deterministic bank feed, serves it from an in-process loopback server in Flux
//! format (20 entries a page, a body request per event) and in the inline format (1,000 events a
//! page, payloads in the page), and measures, each as the median of several runs:
//! - the real `projector` binary (release build) catching up into a fresh database, per format,
//!   with both shipped projections, and in the inline format with `account_balances` alone:
//!   events per second, peak RSS, CPU seconds, requests made;
//! - the wire limit per format: the same server's rate for body URLs (Flux) or pages (inline) at
//!   16 connections, measured with wrk when it is installed (`apt install wrk`), else with the
//!   daemon's HTTP client in the bench's process, which spends more of the two cores itself and
//!   so reads lower; the daemon's share of it from the medians, and run by run;
//! - the storage limit: the daemon's writer applying the same events in batches of the daemon's
//!   largest batch, one transaction each, with no HTTP; with both projections and with
//!   `account_balances` alone;
//! - start-up to the first request, on a warm database (Flux);
//! - live latency: with `poll_interval = "100ms"`, and with `live = "sse"` besides, from an
//!   event appearing on the (Flux) feed to its checkpoint being visible to a reader, p50 and
//!   p99 over 3,000 events.
//!
//! `cargo bench -- --large-pages [--against BINARY]` runs only the case of the largest pages
//! the defaults allow (with another build too).
//! `cargo bench -- --live` runs only the live latency: polled, with `live = "sse"` and with
//! `live = "long-poll"`.
//! `cargo bench -- --remote --events 20000 [--against BINARY]` runs only the remote case: the feed answering every
//! request after 2 ms and after 5 ms, the Flux catch-up against the remote limit and against a
//! sequential consumer.
//! `cargo bench -- --mapped --runs 6` runs only the cost of a mapping: pairs of inline
//! catch-ups, read as inline and through a `[feed.mapping]` naming every field.
//! `cargo bench -- --stores --runs 3` runs only the two stores side by side: pairs of catch-ups
//! into SQLite and into PostgreSQL (`PROJECTOR_BENCH_POSTGRES`, by default the machine's
//! server on 127.0.0.1:5432), per format.
//! `cargo bench --features http-ab -- --http-ab 6` measures only the HTTP clients against each
//! other: pairs of Flux catch-ups, one with hyper-util's client and one with reqwest's, the order
//! alternating from pair to pair, and the medians of events/s and CPU an event for each.
//! `cargo bench -- --against OTHER-BINARY --runs 6` does the same for this build against another
//! build of the daemon (an A/B of a change).

mod ab;
mod large_pages;
mod mapped;
mod remote;
mod runs;
mod storage;
mod stores;
mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;

use projector::config::{FeedFormat, Synchronous};
use projector::demo::bank;
use projector::demo::feed_server::{FeedServer, DEFAULT_INLINE_PAGE_SIZE};
use projector::reader::MAX_BATCH_EVENTS;

use ab::ab;
use runs::{
    catch_up, live_latency, release_binary, start_up, CatchUp, Projections, Setup, Variant,
};
use storage::storage_limit;
use wire::WireLoad;

const CONNECTIONS: usize = 16;
/// The name of the config the bench writes in each run's folder.
const CONFIG_FILE: &str = "consumer.toml";
const PAGE: usize = 20;
/// Events appended one by one for the live latency.
const LIVE_EVENTS: usize = 3000;

struct Options {
    events: usize,
    runs: usize,
    synchronous: Synchronous,
    /// Pairs of Flux catch-ups for the HTTP client A/B; 0 for the whole benchmark.
    http_ab: usize,
    /// Another daemon binary to A/B this build against, `runs` pairs of Flux catch-ups.
    against: Option<PathBuf>,
    /// Only the largest pages case.
    large_pages: bool,
    /// Only the remote case.
    remote: bool,
    /// Only the live latency, polled and pushed.
    live: bool,
    /// Only inline catch-ups with and without a mapping, `runs` pairs.
    mapped: bool,
    /// Only catch-ups into SQLite and into PostgreSQL, `runs` pairs.
    stores: bool,
}

fn options() -> Options {
    let mut options = Options {
        events: 100_000,
        runs: 3,
        synchronous: Synchronous::Normal,
        http_ab: 0,
        against: None,
        large_pages: false,
        remote: false,
        live: false,
        mapped: false,
        stores: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{arg} needs a number"))
        };
        match arg.as_str() {
            "--events" => options.events = value(),
            "--runs" => options.runs = value(),
            "--http-ab" => options.http_ab = value(),
            "--large-pages" => options.large_pages = true,
            "--remote" => options.remote = true,
            "--live" => options.live = true,
            "--mapped" => options.mapped = true,
            "--stores" => options.stores = true,
            "--against" => {
                let path = args
                    .next()
                    .unwrap_or_else(|| panic!("--against needs a path"));
                options.against = Some(PathBuf::from(path));
            }
            "--synchronous" => {
                options.synchronous = match args.next().as_deref() {
                    Some("normal") => Synchronous::Normal,
                    Some("full") => Synchronous::Full,
                    _ => panic!("--synchronous is normal or full"),
                }
            }
            // cargo bench passes --bench; other harness flags mean nothing here.
            _ => {}
        }
    }
    options
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let options = options();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let events = bank::generate(2026, options.events);
    let server = runtime
        .block_on(FeedServer::start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            events.clone(),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let binary = release_binary();
    let sync = options.synchronous;
    if options.http_ab > 0 {
        if cfg!(feature = "http-ab") {
            let variants = [
                Variant {
                    name: "hyper-util".into(),
                    binary: binary.clone(),
                    http_client: "hyper",
                },
                Variant {
                    name: "reqwest".into(),
                    binary: binary.clone(),
                    http_client: "reqwest",
                },
            ];
            runtime.block_on(ab(variants, &server, &events, sync, options.http_ab));
        } else {
            println!(
                "--http-ab compares against a reqwest client that only `--features http-ab` builds"
            );
        }
        return;
    }
    if options.live {
        for live in ["poll", "sse", "long-poll"] {
            let (p50, p99) = runtime.block_on(live_latency(
                &binary,
                &events[..LIVE_EVENTS.min(events.len())],
                sync,
                live,
            ));
            println!(
                "live latency, poll_interval 100 ms, live = {live:?}: p50 {:.1} ms, p99 {:.1} ms",
                p50.as_secs_f64() * 1000.0,
                p99.as_secs_f64() * 1000.0
            );
        }
        return;
    }
    if options.remote {
        println!(
            "remote case: {} bank events, Flux, both shipped projections, {} runs",
            options.events, options.runs
        );
        for binary in std::iter::once(&binary).chain(&options.against) {
            println!("{}:", binary.display());
            let remotes: Vec<remote::Remote> = [2, 5]
                .into_iter()
                .map(|ms| {
                    runtime.block_on(remote::remote(
                        binary,
                        &server,
                        &events,
                        sync,
                        std::time::Duration::from_millis(ms),
                        options.runs,
                    ))
                })
                .collect();
            remote::print(&remotes);
        }
        return;
    }
    if options.mapped {
        runtime.block_on(mapped::mapped(
            &binary,
            &server,
            &events,
            sync,
            options.runs,
        ));
        return;
    }
    if options.stores {
        runtime.block_on(stores::stores(
            &binary,
            &server,
            &events,
            sync,
            options.runs,
        ));
        return;
    }
    if options.large_pages {
        for binary in std::iter::once(&binary).chain(&options.against) {
            println!("{}:", binary.display());
            let (bank, tiny) = runtime.block_on(large_pages::large_pages(binary, sync));
            print_large_pages(&bank, &tiny);
        }
        return;
    }
    if let Some(other) = &options.against {
        let variants = [
            Variant {
                name: "this build".into(),
                binary: binary.clone(),
                http_client: "hyper",
            },
            Variant {
                name: other.display().to_string(),
                binary: other.clone(),
                http_client: "hyper",
            },
        ];
        runtime.block_on(ab(variants, &server, &events, sync, options.runs));
        return;
    }
    let wrk_installed = wire::wrk_installed();
    let wire_tool = if wrk_installed {
        "wrk"
    } else {
        "the daemon's HTTP client in the bench's process (install wrk for the reference figure)"
    };
    let flux_wire = WireLoad::new(&server, FeedFormat::Flux, &events);
    let inline_wire = WireLoad::new(&server, FeedFormat::Inline, &events);
    println!(
        "projector benchmark: {} bank events; Flux format ({PAGE} a page, a body request per event) and inline format ({DEFAULT_INLINE_PAGE_SIZE} a page); synchronous = {sync:?}, {} runs, {} cores",
        options.events,
        options.runs,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let flux = Setup {
        format: FeedFormat::Flux,
        projections: Projections::Both,
        mapping: None,
    };
    let inline = Setup {
        format: FeedFormat::Inline,
        projections: Projections::Both,
        mapping: None,
    };
    let inline_balances = Setup {
        format: FeedFormat::Inline,
        projections: Projections::BalancesOnly,
        mapping: None,
    };
    let mut figures = Figures::default();
    // The last Flux catch-up's folder: its database is the warm one start-up is timed on.
    let mut caught_up = None;
    for run in 1..=options.runs {
        let wire = |load: &WireLoad| match wrk_installed {
            true => load.wrk_rate(),
            false => runtime.block_on(load.client_rate()),
        };
        figures.flux_wire.push(wire(&flux_wire));
        figures.inline_wire.push(wire(&inline_wire));
        figures
            .storage
            .push(storage_limit(&events, sync, Projections::Both));
        figures
            .balances_storage
            .push(storage_limit(&events, sync, Projections::BalancesOnly));
        let (flux_run, dir) = runtime.block_on(catch_up(&binary, &server, flux, &events, sync));
        figures.flux.push(flux_run);
        caught_up = Some(dir);
        let (inline_run, _) = runtime.block_on(catch_up(&binary, &server, inline, &events, sync));
        figures.inline.push(inline_run);
        let (balances_run, _) =
            runtime.block_on(catch_up(&binary, &server, inline_balances, &events, sync));
        figures.inline_balances.push(balances_run);
        println!(
            "  run {run}: Flux {:.0} events/s (wire {:.0} bodies/s); inline {:.0} events/s (storage {:.0}), account_balances alone {:.0} (storage {:.0})",
            figures.flux[run - 1].events_per_second,
            figures.flux_wire[run - 1],
            figures.inline[run - 1].events_per_second,
            figures.storage[run - 1],
            figures.inline_balances[run - 1].events_per_second,
            figures.balances_storage[run - 1],
        );
    }
    let warm = caught_up.unwrap_or_else(|| panic!("--runs must be at least 1"));
    let startup = runtime.block_on(start_up(&binary, &server, warm.path()));
    let (large_bank, large_tiny) = runtime.block_on(large_pages::large_pages(&binary, sync));
    let live = runtime.block_on(live_latency(
        &binary,
        &events[..LIVE_EVENTS.min(events.len())],
        sync,
        "poll",
    ));
    let live_sse = runtime.block_on(live_latency(
        &binary,
        &events[..LIVE_EVENTS.min(events.len())],
        sync,
        "sse",
    ));

    let runs = options.runs;
    let total = options.events as f64;
    let flux_rate = median_of(&figures.flux, |d| d.events_per_second);
    let flux_wire_rate = median(figures.flux_wire.clone());
    // A body request per event (the bank feed's types are all registered but one) and a page
    // request per 20: the wire limit in events per second.
    let bodies_per_event = figures
        .flux
        .first()
        .map_or(1.0, |d| d.body_requests as f64 / total);
    let flux_wire_events = flux_wire_rate / bodies_per_event.max(1e-9);
    let inline_rate = median_of(&figures.inline, |d| d.events_per_second);
    let inline_wire_events = median(figures.inline_wire.clone()) * inline_wire.events_per_request;
    let storage_rate = median(figures.storage.clone());
    let balances_rate = median_of(&figures.inline_balances, |d| d.events_per_second);
    let balances_storage_rate = median(figures.balances_storage.clone());
    let percent = |part: f64, whole: f64| 100.0 * part / whole.max(1e-9);
    println!();
    println!("| measure (median of {runs}) | Flux | inline |");
    println!("| --- | --- | --- |");
    println!(
        "| daemon, first request to last commit, both shipped projections | {flux_rate:.0} events/s | {inline_rate:.0} events/s |"
    );
    println!(
        "| wire limit: the server's rate at {CONNECTIONS} connections, by {wire_tool} | {flux_wire_rate:.0} body requests/s = {flux_wire_events:.0} events/s | {:.0} pages/s = {inline_wire_events:.0} events/s |",
        median(figures.inline_wire.clone())
    );
    println!(
        "| storage limit: the writer alone, {MAX_BATCH_EVENTS} events a transaction, both projections | {storage_rate:.0} events/s | {storage_rate:.0} events/s |"
    );
    println!(
        "| daemon / wire limit | {:.0}% | {:.0}% |",
        percent(flux_rate, flux_wire_events),
        percent(inline_rate, inline_wire_events)
    );
    // The machine drifts within minutes: each run's own pair of figures, measured a minute
    // apart, says more about the ratio than the medians taken apart.
    let per_run = |rates: &[CatchUp], limits: &[f64], per_request: f64| {
        let ratios: Vec<f64> = rates
            .iter()
            .zip(limits)
            .map(|(run, limit)| percent(run.events_per_second, limit * per_request))
            .collect();
        let listed: Vec<String> = ratios.iter().map(|r| format!("{r:.0}%")).collect();
        format!("{} (median {:.0}%)", listed.join(", "), median(ratios))
    };
    println!(
        "| daemon / wire limit, run by run | {} | {} |",
        per_run(
            &figures.flux,
            &figures.flux_wire,
            1.0 / bodies_per_event.max(1e-9)
        ),
        per_run(
            &figures.inline,
            &figures.inline_wire,
            inline_wire.events_per_request
        )
    );
    println!(
        "| daemon / storage limit | {:.0}% | {:.0}% |",
        percent(flux_rate, storage_rate),
        percent(inline_rate, storage_rate)
    );
    println!(
        "| `account_balances` alone: daemon (storage limit) | | {balances_rate:.0} events/s ({balances_storage_rate:.0}, {:.0}%) |",
        percent(balances_rate, balances_storage_rate)
    );
    let rss = |runs: &[CatchUp]| median_of(runs, |d| d.peak_rss_kib as f64 / 1024.0);
    println!(
        "| peak RSS of the daemon | {:.1} MB | {:.1} MB |",
        rss(&figures.flux),
        rss(&figures.inline)
    );
    let cpu = |runs: &[CatchUp]| {
        let seconds = median_of(runs, |d| d.cpu_seconds);
        format!("{seconds:.2} s ({:.1} µs an event)", 1e6 * seconds / total)
    };
    println!(
        "| CPU of the daemon (user + system) | {} | {} |",
        cpu(&figures.flux),
        cpu(&figures.inline)
    );
    let requests = |runs: &[CatchUp]| {
        runs.first().map_or(String::new(), |d| {
            format!("{} pages, {} bodies", d.page_requests, d.body_requests)
        })
    };
    println!(
        "| requests made | {} | {} |",
        requests(&figures.flux),
        requests(&figures.inline)
    );
    println!(
        "| start-up to first request, warm database | {:.1} ms | |",
        startup.as_secs_f64() * 1e3
    );
    println!(
        "| live latency, poll_interval 100 ms: feed to reader, {} events | p50 {:.1} ms, p99 {:.1} ms | |",
        LIVE_EVENTS.min(options.events),
        live.0.as_secs_f64() * 1e3,
        live.1.as_secs_f64() * 1e3
    );
    println!(
        "| live latency, the same with live = \"sse\" | p50 {:.1} ms, p99 {:.1} ms | |",
        live_sse.0.as_secs_f64() * 1e3,
        live_sse.1.as_secs_f64() * 1e3
    );
    print_large_pages(&large_bank, &large_tiny);
}

/// Every run's figures, per measure.
#[derive(Default)]
struct Figures {
    flux_wire: Vec<f64>,
    inline_wire: Vec<f64>,
    storage: Vec<f64>,
    balances_storage: Vec<f64>,
    flux: Vec<CatchUp>,
    inline: Vec<CatchUp>,
    inline_balances: Vec<CatchUp>,
}

fn median_of(runs: &[CatchUp], figure: impl Fn(&CatchUp) -> f64) -> f64 {
    median(runs.iter().map(figure).collect())
}

fn print_large_pages(bank: &large_pages::LargePages, tiny: &large_pages::LargePages) {
    for (what, large) in [
        ("bank events", bank),
        ("tiny events of a type no projection applies", tiny),
    ] {
        println!(
            "| largest pages the defaults allow: {} of {what} a page ({:.1} MB), {} events | peak RSS {:.1} MB, {:.1} s | |",
            large.events_per_page,
            large.page_bytes as f64 / 1e6,
            large.events_per_page * 4,
            large.peak_rss_kib as f64 / 1024.0,
            large.seconds
        );
    }
}
