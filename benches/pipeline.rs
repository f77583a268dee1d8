//! The end-to-end benchmark: `cargo bench` (options after `--`, e.g. `cargo bench -- --events
//! 1000000 --runs 5 --synchronous full`).
//!
//! It generates a deterministic bank feed, serves it in Flux format (20 entries a page, a body
//! request per event) from an in-process loopback server, and measures, each as the median of
//! several runs:
//! - the real `projector` binary (release build) catching up into a fresh database with the
//!   shipped projections: events per second, peak RSS, CPU seconds, requests made;
//! - the wire limit: the same server's rate for body URLs at 16 connections, measured with wrk
//!   when it is installed (`apt install wrk`), else with the daemon's HTTP client in the bench's process, which
//!   spends more of the two cores itself and so reads lower;
//! - the storage limit: the daemon's writer applying the same events in batches of the daemon's
//!   largest batch, one transaction each, with no HTTP;
//! - start-up to the first request, on a warm database;
//! - live latency: with `poll_interval = "100ms"`, from an event appearing on the feed to its
//!   checkpoint being visible to a reader, p50 and p99 over 3,000 events.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use projector::bank_feed;
use projector::config::{Config, Synchronous};
use projector::event::{Event, Payload};
use projector::feed::http::{parse_uri, HttpClient, HttpSettings};
use projector::feed_server::{FeedServer, StoredEvent};
use projector::pipeline::MAX_BATCH_EVENTS;
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
}

fn options() -> Options {
    let mut options = Options {
        events: 100_000,
        runs: 3,
        synchronous: Synchronous::Normal,
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
    let events = bank_feed::generate(2026, options.events);
    let server = runtime
        .block_on(FeedServer::start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            events.clone(),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let binary = release_binary();
    let sync = options.synchronous;
    let wrk = Wrk::find(&server, &events);
    let wire_tool = if wrk.is_some() {
        "wrk"
    } else {
        "the daemon's HTTP client in the bench's process (install wrk for the reference figure)"
    };
    println!(
        "projector benchmark: {} bank events, Flux format ({PAGE} a page, a body request per event), synchronous = {sync:?}, {} runs, {} cores",
        options.events,
        options.runs,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let mut wire = Vec::new();
    let mut storage = Vec::new();
    let mut daemon = Vec::new();
    // The last catch-up's folder: its database is the warm one start-up is timed on.
    let mut caught_up = None;
    for run in 1..=options.runs {
        wire.push(match &wrk {
            Some(wrk) => wrk.rate(),
            None => runtime.block_on(wire_limit(&server, &events)),
        });
        storage.push(storage_limit(&events, sync));
        let (run_figures, dir) = runtime.block_on(catch_up(&binary, &server, options.events, sync));
        daemon.push(run_figures);
        caught_up = Some(dir);
        let last = daemon.last().map_or(0.0, |d| d.events_per_second);
        println!(
            "  run {run}: wire {:.0} bodies/s, storage {:.0} events/s, daemon {last:.0} events/s",
            wire[run - 1],
            storage[run - 1]
        );
    }
    let warm = caught_up.unwrap_or_else(|| panic!("--runs must be at least 1"));
    let startup = runtime.block_on(start_up(&binary, &server, warm.path()));
    let live = runtime.block_on(live_latency(
        &binary,
        &events[..LIVE_EVENTS.min(events.len())],
        sync,
    ));

    let rate = median(daemon.iter().map(|d| d.events_per_second).collect());
    let wire_rate = median(wire);
    let storage_rate = median(storage);
    // A body request per event (the bank feed's types are all registered but one) and a page
    // request per 20: the wire limit in events per second.
    let bodies_per_event = daemon
        .first()
        .map_or(1.0, |d| d.body_requests as f64 / options.events as f64);
    let wire_events = wire_rate / bodies_per_event.max(1e-9);
    println!();
    println!("| measure (median of {}) | value |", options.runs);
    println!("| --- | --- |");
    println!("| daemon, first request to last commit | {rate:.0} events/s |");
    println!(
        "| wire limit: the server's body requests at {CONNECTIONS} connections, by {wire_tool} | {wire_rate:.0} requests/s ({wire_events:.0} events/s at {bodies_per_event:.2} bodies an event) |"
    );
    println!(
        "| daemon / wire limit | {:.0}% |",
        100.0 * rate / wire_events.max(1e-9)
    );
    println!(
        "| storage limit: the writer alone, {MAX_BATCH_EVENTS} events a transaction | {storage_rate:.0} events/s |"
    );
    println!(
        "| peak RSS of the daemon | {:.1} MB |",
        median(
            daemon
                .iter()
                .map(|d| d.peak_rss_kib as f64 / 1024.0)
                .collect()
        )
    );
    println!(
        "| CPU of the daemon (user + system) | {:.2} s ({:.1} µs an event) |",
        median(daemon.iter().map(|d| d.cpu_seconds).collect()),
        1e6 * median(daemon.iter().map(|d| d.cpu_seconds).collect()) / options.events as f64
    );
    if let Some(d) = daemon.first() {
        println!(
            "| requests made | {} pages, {} bodies |",
            d.page_requests, d.body_requests
        );
    }
    println!(
        "| start-up to first request, warm database | {:.1} ms |",
        startup.as_secs_f64() * 1e3
    );
    println!(
        "| live latency, poll_interval 100 ms: feed to reader, {} events | p50 {:.1} ms, p99 {:.1} ms |",
        LIVE_EVENTS.min(options.events),
        live.0.as_secs_f64() * 1e3,
        live.1.as_secs_f64() * 1e3
    );
}

/// The daemon binary as `cargo bench` built it: with the bench profile, which is the release one.
fn release_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_projector"))
}

/// wrk, set up to request the body URLs of every event in turn.
struct Wrk {
    /// Holds the request script.
    dir: tempfile::TempDir,
    url: String,
}

impl Wrk {
    /// None if wrk is not installed.
    fn find(server: &FeedServer, events: &[StoredEvent]) -> Option<Wrk> {
        let installed = Command::new("wrk")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !installed {
            return None;
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let paths: Vec<String> = events
            .iter()
            .map(|e| format!("\"/events/{}\"", e.id))
            .collect();
        let script = format!(
            "local paths = {{{}}}\nlocal n = 0\nrequest = function()\n  n = n + 1\n  return wrk.format(\"GET\", paths[(n % #paths) + 1])\nend\n",
            paths.join(",")
        );
        std::fs::write(dir.path().join("bodies.lua"), script).unwrap_or_else(|e| panic!("{e}"));
        Some(Wrk {
            dir,
            url: server.url(),
        })
    }

    /// Requests a second over 3 seconds, at CONNECTIONS connections on 2 threads.
    fn rate(&self) -> f64 {
        let output = Command::new("wrk")
            .args(["-t2", &format!("-c{CONNECTIONS}"), "-d3s", "-s"])
            .arg(self.dir.path().join("bodies.lua"))
            .arg(&self.url)
            .output()
            .unwrap_or_else(|e| panic!("running wrk: {e}"));
        let text = String::from_utf8_lossy(&output.stdout);
        text.lines()
            .find_map(|line| line.strip_prefix("Requests/sec:"))
            .and_then(|rate| rate.trim().parse().ok())
            .unwrap_or_else(|| panic!("wrk printed no rate: {text}"))
    }
}

/// The server's rate for body URLs at CONNECTIONS connections, over 3 seconds, from the daemon's
/// HTTP client in this process (when wrk is not installed).
async fn wire_limit(server: &FeedServer, events: &[StoredEvent]) -> f64 {
    let client = HttpClient::new(HttpSettings {
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
        max_response_bytes: 1 << 20,
        idle_connections: CONNECTIONS,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let base = server.url();
    let urls: Arc<Vec<hyper::Uri>> = Arc::new(
        events
            .iter()
            .map(|e| parse_uri(&format!("{base}/{}", e.id)).unwrap_or_else(|e| panic!("{e}")))
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

/// The writer alone: the same events, with payloads, in batches as large as the daemon's
/// largest, one transaction each.
fn storage_limit(stored: &[StoredEvent], synchronous: Synchronous) -> f64 {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = write_config(dir.path(), "http://127.0.0.1:1/events", synchronous);
    let config = Config::load(&config).unwrap_or_else(|e| panic!("{e}"));
    let projections = projector::projection::build_all(&config).unwrap_or_else(|e| panic!("{e}"));
    let events: Vec<Event> = stored
        .iter()
        .enumerate()
        .map(|(offset, e)| Event {
            offset: offset as u64,
            event_id: e.id.clone(),
            event_type: e.event_type.clone(),
            aggregate_name: e.aggregate_name.clone(),
            aggregate_version: e.aggregate_version,
            created: e.created.clone(),
            payload: Payload::from_json(e.body.clone().into_bytes()).ok(),
        })
        .collect();
    let names: Vec<String> = projections.iter().map(|p| p.name.clone()).collect();
    let settings = WriterSettings {
        max_bytes: None,
        synchronous,
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

fn write_config(dir: &Path, url: &str, synchronous: Synchronous) -> PathBuf {
    write_config_polling(dir, url, "50ms", synchronous)
}

fn write_config_polling(
    dir: &Path,
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
    let text = format!(
        r#"[daemon]
database = "projector.db"
control_socket = "projector.sock"
synchronous = "{synchronous}"

[[feed]]
name = "bank"
url = "{url}"
format = "flux"
poll_interval = "{poll_interval}"

[[projection]]
name = "account_balances"
feed = "bank"
file = {projection:?}

[[projection]]
name = "account_ledger"
feed = "bank"
module = "account_ledger"
"#
    );
    let path = dir.join(CONFIG_FILE);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
    path
}

fn spawn(binary: &Path, config: &Path) -> Child {
    Command::new(binary)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
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

/// A catch-up into a fresh database; returns its figures and the folder holding the database
/// and its config.
async fn catch_up(
    binary: &Path,
    server: &FeedServer,
    total: usize,
    synchronous: Synchronous,
) -> (CatchUp, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config = write_config(dir.path(), &server.url(), synchronous);
    let database = dir.path().join("projector.db");
    let pages_before = server.page_requests();
    let bodies_before = body_requests(server);
    let mut child = spawn(binary, &config);
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
        bank_feed::CREATED,
        bank_feed::CREDITED,
        bank_feed::DEBITED,
        bank_feed::STATEMENT_REQUESTED,
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
    let config = write_config_polling(dir.path(), &server.url(), "100ms", synchronous);
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
