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
//! - live latency: with `poll_interval = "100ms"`, from an event appearing on the (Flux) feed to
//!   its checkpoint being visible to a reader, p50 and p99 over 3,000 events.
//!
//! `cargo bench --features http-ab -- --http-ab 6` measures only the HTTP clients against each
//! other: pairs of Flux catch-ups, one with hyper-util's client and one with reqwest's, the order
//! alternating from pair to pair, and the medians of events/s and CPU an event for each.
//! `cargo bench -- --against OTHER-BINARY --runs 6` does the same for this build against another
//! build of the daemon (an A/B of a change).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use projector::config::{Config, FeedFormat, Synchronous};
use projector::demo::bank;
use projector::demo::consumer_toml::ConsumerToml;
use projector::demo::feed_server::{FeedServer, StoredEvent, DEFAULT_INLINE_PAGE_SIZE};
use projector::event::{Event, EventMeta, Payload};
use projector::feed::http::{parse_uri, HttpClient, HttpSettings};
use projector::reader::MAX_BATCH_EVENTS;
use projector::writer::{Batch, Writer, WriterSettings};

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
}

fn options() -> Options {
    let mut options = Options {
        events: 100_000,
        runs: 3,
        synchronous: Synchronous::Normal,
        http_ab: 0,
        against: None,
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
    let wrk_installed = Command::new("wrk")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
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
    };
    let inline = Setup {
        format: FeedFormat::Inline,
        projections: Projections::Both,
    };
    let inline_balances = Setup {
        format: FeedFormat::Inline,
        projections: Projections::BalancesOnly,
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
    let live = runtime.block_on(live_latency(
        &binary,
        &events[..LIVE_EVENTS.min(events.len())],
        sync,
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

/// What a daemon run reads, and with which projections.
#[derive(Clone, Copy)]
struct Setup {
    format: FeedFormat,
    projections: Projections,
}

#[derive(Clone, Copy, PartialEq)]
enum Projections {
    /// `account_balances` (declarative SQL) and `account_ledger` (Rust).
    Both,
    BalancesOnly,
}

/// The daemon binary as `cargo bench` built it: with the bench profile, which is the release one.
fn release_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_projector"))
}

/// The requests that read the feed without a daemon, for its wire limit: the body URLs of every
/// event in turn (Flux), or the pages of the whole feed in turn (inline).
struct WireLoad {
    /// Holds wrk's request script.
    dir: tempfile::TempDir,
    base: String,
    paths: Vec<String>,
    events_per_request: f64,
}

impl WireLoad {
    fn new(server: &FeedServer, format: FeedFormat, events: &[StoredEvent]) -> WireLoad {
        let (paths, events_per_request): (Vec<String>, f64) = match format {
            FeedFormat::Flux => (
                events.iter().map(|e| format!("/events/{}", e.id)).collect(),
                1.0,
            ),
            FeedFormat::Inline => {
                let pages = events.len().div_ceil(DEFAULT_INLINE_PAGE_SIZE).max(1);
                let paths = (0..pages)
                    .map(|page| format!("/inline?offset={}", page * DEFAULT_INLINE_PAGE_SIZE))
                    .collect();
                (paths, events.len() as f64 / pages as f64)
            }
        };
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let quoted: Vec<String> = paths.iter().map(|path| format!("{path:?}")).collect();
        let script = format!(
            "local paths = {{{}}}\nlocal n = 0\nrequest = function()\n  n = n + 1\n  return wrk.format(\"GET\", paths[(n % #paths) + 1])\nend\n",
            quoted.join(",")
        );
        std::fs::write(dir.path().join("requests.lua"), script).unwrap_or_else(|e| panic!("{e}"));
        WireLoad {
            dir,
            base: format!("http://{}", server.addr()),
            paths,
            events_per_request,
        }
    }

    /// Requests a second by wrk over 3 seconds, at CONNECTIONS connections on 2 threads.
    fn wrk_rate(&self) -> f64 {
        let output = Command::new("wrk")
            .args(["-t2", &format!("-c{CONNECTIONS}"), "-d3s", "-s"])
            .arg(self.dir.path().join("requests.lua"))
            .arg(&self.base)
            .output()
            .unwrap_or_else(|e| panic!("running wrk: {e}"));
        let text = String::from_utf8_lossy(&output.stdout);
        text.lines()
            .find_map(|line| line.strip_prefix("Requests/sec:"))
            .and_then(|rate| rate.trim().parse().ok())
            .unwrap_or_else(|| panic!("wrk printed no rate: {text}"))
    }

    /// Requests a second over 3 seconds, at CONNECTIONS connections, from the daemon's HTTP
    /// client in this process (when wrk is not installed).
    async fn client_rate(&self) -> f64 {
        let client = HttpClient::new(HttpSettings {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            max_response_bytes: 64 << 20,
            idle_connections: CONNECTIONS,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let urls: Arc<Vec<hyper::Uri>> = Arc::new(
            self.paths
                .iter()
                .map(|path| {
                    parse_uri(&format!("{}{path}", self.base)).unwrap_or_else(|e| panic!("{e}"))
                })
                .collect(),
        );
        let done = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs(3);
        let started = Instant::now();
        let workers: Vec<_> = (0..CONNECTIONS)
            .map(|worker| {
                let (client, urls, done) = (client.clone(), urls.clone(), done.clone());
                tokio::spawn(async move {
                    let mut index = worker;
                    while Instant::now() < deadline {
                        let url = &urls[index % urls.len()];
                        if client.get(url).await.is_ok() {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        index += CONNECTIONS;
                    }
                })
            })
            .collect();
        for worker in workers {
            let _ = worker.await;
        }
        done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
    }
}

/// The writer alone: the same events, with payloads, in batches as large as the daemon's
/// largest, one transaction each.
fn storage_limit(
    stored: &[StoredEvent],
    synchronous: Synchronous,
    projections: Projections,
) -> f64 {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let setup = Setup {
        format: FeedFormat::Flux,
        projections,
    };
    let config = write_config(
        dir.path(),
        setup,
        "http://127.0.0.1:1/events",
        "50ms",
        synchronous,
    );
    let config = Config::load(&config).unwrap_or_else(|e| panic!("{e}"));
    let projections = projector::projection::build_all(&config).unwrap_or_else(|e| panic!("{e}"));
    let events: Vec<Event> = stored
        .iter()
        .enumerate()
        .map(|(offset, e)| Event {
            offset: offset as u64,
            meta: EventMeta {
                event_id: e.id.clone(),
                event_type: e.event_type.clone(),
                aggregate_id: e.aggregate_id.clone(),
                aggregate_name: e.aggregate_name.clone(),
                aggregate_version: e.aggregate_version,
                created: e.created.clone(),
            },
            payload: Payload::from_json(e.body.clone().into_bytes()).ok(),
        })
        .collect();
    let names: Vec<String> = projections.iter().map(|p| p.name.clone()).collect();
    // As the daemon opens it.
    let settings = WriterSettings {
        max_bytes: None,
        synchronous,
        page_cache_bytes: Some(config.daemon.page_cache_bytes.0 as u64),
    };
    let mut writer = Writer::open(&config.daemon.database, settings, projections)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let total = events.len();
    let mut events = events.into_iter();
    let batches: Vec<Batch> = std::iter::from_fn(|| {
        let chunk: Vec<Event> = events.by_ref().take(MAX_BATCH_EVENTS).collect();
        (!chunk.is_empty()).then(|| Batch {
            feed: "bank".into(),
            projections: names.clone(),
            events: chunk,
        })
    })
    .collect();
    let started = Instant::now();
    for batch in &batches {
        writer.apply(batch).unwrap_or_else(|e| panic!("{e}"));
    }
    total as f64 / started.elapsed().as_secs_f64()
}

struct CatchUp {
    events_per_second: f64,
    peak_rss_kib: u64,
    cpu_seconds: f64,
    page_requests: u64,
    body_requests: u64,
}

fn write_config(
    dir: &Path,
    setup: Setup,
    url: &str,
    poll_interval: &str,
    synchronous: Synchronous,
) -> PathBuf {
    let synchronous = match synchronous {
        Synchronous::Normal => "normal",
        Synchronous::Full => "full",
    };
    let projection =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("projections/account_balances.toml");
    let ledger = match setup.projections {
        Projections::Both => {
            "\n[[projection]]\nname = \"account_ledger\"\nfeed = \"bank\"\nmodule = \"account_ledger\"\n"
        }
        Projections::BalancesOnly => "",
    };
    let mut toml = ConsumerToml::new(url, setup.format);
    toml.poll_interval = poll_interval.into();
    toml.retry = None;
    toml.daemon_keys = format!("synchronous = \"{synchronous}\"");
    toml.projections = format!(
        "\n[[projection]]\nname = \"account_balances\"\nfeed = \"bank\"\nfile = {projection:?}\n{ledger}"
    );
    let path = dir.join(CONFIG_FILE);
    toml.write(&path).unwrap_or_else(|e| panic!("{e}"));
    path
}

fn spawn(binary: &Path, config: &Path) -> Child {
    spawn_with(binary, config, "hyper")
}

/// Runs `binary` on `config`, telling it which HTTP client to use (a build without the `http-ab`
/// feature, or an older one, uses hyper-util's whatever it is told).
fn spawn_with(binary: &Path, config: &Path, http_client: &str) -> Child {
    Command::new(binary)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .env("PROJECTOR_HTTP_CLIENT", http_client)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn slowest_checkpoint(database: &Path) -> u64 {
    projector::store::open_reader(database)
        .and_then(|conn| projector::store::read_checkpoints(&conn))
        .map(|all| all.iter().map(|(_, c)| c.next_offset).min().unwrap_or(0))
        .unwrap_or(0)
}

/// (peak RSS KiB, CPU seconds) of a running process, from /proc.
fn usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let peak = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    (peak, ticks / 100.0)
}

/// One side of an A/B: a daemon binary, and the HTTP client it is told to use.
struct Variant {
    name: String,
    binary: PathBuf,
    http_client: &'static str,
}

/// A catch-up into a fresh database; returns its figures and the folder holding the database
/// and its config.
async fn catch_up(
    binary: &Path,
    server: &FeedServer,
    setup: Setup,
    events: &[StoredEvent],
    synchronous: Synchronous,
) -> (CatchUp, tempfile::TempDir) {
    let variant = Variant {
        name: "this build".into(),
        binary: binary.to_path_buf(),
        http_client: "hyper",
    };
    catch_up_with(&variant, server, setup, events, synchronous).await
}

/// Pairs of Flux catch-ups, one per variant, the order alternating from pair to pair; prints
/// each pair and the medians.
async fn ab(
    variants: [Variant; 2],
    server: &FeedServer,
    events: &[StoredEvent],
    synchronous: Synchronous,
    pairs: usize,
) {
    let flux = Setup {
        format: FeedFormat::Flux,
        projections: Projections::Both,
    };
    let total = events.len() as f64;
    println!(
        "A/B: {pairs} pairs of Flux catch-ups of {} events, both shipped projections: {} against {}",
        events.len(),
        variants[0].name,
        variants[1].name
    );
    let mut runs: [Vec<CatchUp>; 2] = [Vec::new(), Vec::new()];
    for pair in 0..pairs {
        let order = if pair % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let (run, _) = catch_up_with(&variants[side], server, flux, events, synchronous).await;
            runs[side].push(run);
        }
        let described: Vec<String> = (0..2)
            .map(|side| {
                let run = &runs[side][pair];
                format!(
                    "{} {:.0} events/s, {:.1} µs an event",
                    variants[side].name,
                    run.events_per_second,
                    1e6 * run.cpu_seconds / total
                )
            })
            .collect();
        println!("  pair {}: {}", pair + 1, described.join("; "));
    }
    let rate = |runs: &[CatchUp]| median_of(runs, |d| d.events_per_second);
    let cpu = |runs: &[CatchUp]| median_of(runs, |d| 1e6 * d.cpu_seconds / total);
    let first_faster = runs[0]
        .iter()
        .zip(&runs[1])
        .filter(|(a, b)| a.events_per_second > b.events_per_second)
        .count();
    println!();
    println!("| (median of {pairs} pairs) | events/s | CPU an event |");
    println!("| --- | --- | --- |");
    for side in 0..2 {
        println!(
            "| {} | {:.0} | {:.1} µs |",
            variants[side].name,
            rate(&runs[side]),
            cpu(&runs[side])
        );
    }
    println!(
        "{} reads {:.1}% fewer events/s than {} ({} faster in {first_faster} of {pairs} pairs)",
        variants[1].name,
        100.0 * (1.0 - rate(&runs[1]) / rate(&runs[0])),
        variants[0].name,
        variants[0].name,
    );
}

async fn catch_up_with(
    variant: &Variant,
    server: &FeedServer,
    setup: Setup,
    events: &[StoredEvent],
    synchronous: Synchronous,
) -> (CatchUp, tempfile::TempDir) {
    let total = events.len();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let url = server.url_in(setup.format);
    let config = write_config(dir.path(), setup, &url, "50ms", synchronous);
    let database = dir.path().join("projector.db");
    let pages_before = server.page_requests();
    let bodies_before = body_requests(server);
    let mut child = spawn_with(&variant.binary, &config, variant.http_client);
    // From the first request the daemon makes.
    while server.page_requests() == pages_before {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let started = Instant::now();
    while slowest_checkpoint(&database) < total as u64 {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the daemon exited: {status}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let (peak_rss_kib, cpu_seconds) = usage(child.id());
    stop(child);
    let figures = CatchUp {
        events_per_second: total as f64 / elapsed.as_secs_f64(),
        peak_rss_kib,
        cpu_seconds,
        page_requests: server.page_requests() - pages_before,
        body_requests: body_requests(server) - bodies_before,
    };
    (figures, dir)
}

fn body_requests(server: &FeedServer) -> u64 {
    [
        bank::CREATED,
        bank::CREDITED,
        bank::DEBITED,
        bank::STATEMENT_REQUESTED,
    ]
    .iter()
    .map(|t| server.body_requests(t))
    .sum()
}

fn stop(mut child: Child) {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
}

/// Start-up to the first request on a warm database: `caught_up` holds a config and its
/// database, caught up with the feed.
async fn start_up(binary: &Path, server: &FeedServer, caught_up: &Path) -> Duration {
    let config = caught_up.join(CONFIG_FILE);
    let mut times = Vec::new();
    for _ in 0..5 {
        let before = server.page_requests();
        let started = Instant::now();
        let child = spawn(binary, &config);
        while server.page_requests() == before {
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        times.push(started.elapsed().as_secs_f64());
        stop(child);
    }
    Duration::from_secs_f64(median(times))
}

/// Events appended one by one at random moments to a feed the daemon follows with a 100 ms poll
/// interval; for each, the time until a reader sees its checkpoint. Returns (p50, p99).
async fn live_latency(
    binary: &Path,
    events: &[StoredEvent],
    synchronous: Synchronous,
) -> (Duration, Duration) {
    let server = FeedServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), Vec::new())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let flux = Setup {
        format: FeedFormat::Flux,
        projections: Projections::Both,
    };
    let config = write_config(dir.path(), flux, &server.url(), "100ms", synchronous);
    let database = dir.path().join("projector.db");
    let child = spawn(binary, &config);
    // Wait until the daemon polls the (empty) feed.
    while server.page_requests() < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let total = events.len();
    let appended: Arc<std::sync::Mutex<Vec<Option<Instant>>>> =
        Arc::new(std::sync::Mutex::new(vec![None; total]));
    // The reader: one connection, a query a millisecond.
    let watcher = {
        let (appended, database) = (appended.clone(), database.clone());
        std::thread::spawn(move || {
            let mut latencies = Vec::with_capacity(total);
            let mut seen = 0usize;
            let mut conn = None;
            while seen < total {
                if conn.is_none() {
                    conn = projector::store::open_reader(&database).ok();
                }
                let reached = conn
                    .as_ref()
                    .and_then(|c| {
                        c.query_row(
                            "SELECT min(next_offset) FROM projector_checkpoints",
                            [],
                            |row| row.get::<_, Option<i64>>(0),
                        )
                        .ok()
                        .flatten()
                    })
                    .unwrap_or(0) as usize;
                let now = Instant::now();
                let appended = appended.lock().unwrap_or_else(|p| p.into_inner());
                while seen < reached.min(total) {
                    if let Some(at) = appended[seen] {
                        latencies.push(now.duration_since(at));
                    }
                    seen += 1;
                }
                drop(appended);
                std::thread::sleep(Duration::from_millis(1));
            }
            latencies
        })
    };
    let mut moments = fastrand::Rng::with_seed(7);
    for (offset, event) in events.iter().enumerate() {
        // 10 ms apart on average: several to a poll interval, at random moments within it.
        tokio::time::sleep(Duration::from_millis(moments.u64(0..20))).await;
        appended.lock().unwrap_or_else(|p| p.into_inner())[offset] = Some(Instant::now());
        server.append(vec![event.clone()]);
    }
    let mut latencies = tokio::task::spawn_blocking(move || watcher.join())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|_| panic!("the watcher panicked"));
    stop(child);
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    (at(0.50), at(0.99))
}
