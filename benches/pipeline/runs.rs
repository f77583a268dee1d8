//! Runs of the real daemon binary against the bench's feed: catch-ups into a fresh database,
//! start-up on a warm one, and the latency of events appended one by one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use projector::config::{FeedFormat, Synchronous};
use projector::demo::bank;
use projector::demo::consumer_toml::ConsumerToml;
use projector::demo::feed_server::{FeedServer, StoredEvent};

use crate::{median, CONFIG_FILE};

/// What a daemon run reads, and with which projections.
#[derive(Clone, Copy)]
pub struct Setup {
    pub format: FeedFormat,
    pub projections: Projections,
    /// A `[feed.mapping]` table's keys, for an inline feed read through a mapping.
    pub mapping: Option<&'static str>,
}

#[derive(Clone, Copy, PartialEq)]
pub enum Projections {
    /// `account_balances` (declarative SQL) and `account_ledger` (Rust).
    Both,
    BalancesOnly,
}

/// The daemon binary as `cargo bench` built it: with the bench profile, which is the release one.
pub fn release_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_projector"))
}

pub struct CatchUp {
    pub events_per_second: f64,
    pub peak_rss_kib: u64,
    pub cpu_seconds: f64,
    pub page_requests: u64,
    pub body_requests: u64,
}

pub fn write_config(
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
    if let Some(mapping) = setup.mapping {
        toml.feed_keys = format!("[feed.mapping]\n{mapping}\n");
    }
    toml.projections = format!(
        "\n[[projection]]\nname = \"account_balances\"\nfeed = \"bank\"\nfile = {projection:?}\n{ledger}"
    );
    let path = dir.join(CONFIG_FILE);
    toml.write(&path).unwrap_or_else(|e| panic!("{e}"));
    path
}

pub fn spawn(binary: &Path, config: &Path) -> Child {
    spawn_with(binary, config, "hyper")
}

/// Runs `binary` on `config`, telling it which HTTP client to use (a build without the `http-ab`
/// feature, or an older one, uses hyper-util's whatever it is told).
pub fn spawn_with(binary: &Path, config: &Path, http_client: &str) -> Child {
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

pub fn slowest_checkpoint(database: &Path) -> u64 {
    projector::store::open_reader(database)
        .and_then(|conn| projector::store::read_checkpoints(&conn))
        .map(|all| all.iter().map(|(_, c)| c.next_offset).min().unwrap_or(0))
        .unwrap_or(0)
}

/// (peak RSS KiB, CPU seconds) of a running process, from /proc.
pub fn usage(pid: u32) -> (u64, f64) {
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
pub struct Variant {
    pub name: String,
    pub binary: PathBuf,
    pub http_client: &'static str,
}

/// A catch-up into a fresh database; returns its figures and the folder holding the database
/// and its config.
pub async fn catch_up(
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

pub async fn catch_up_with(
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

pub fn body_requests(server: &FeedServer) -> u64 {
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

pub fn stop(mut child: Child) {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
}

/// Start-up to the first request on a warm database: `caught_up` holds a config and its
/// database, caught up with the feed.
pub async fn start_up(binary: &Path, server: &FeedServer, caught_up: &Path) -> Duration {
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
/// interval and `live` ("poll", "sse" told by the feed's live stream, or "long-poll"); for
/// each, the time until a reader sees its checkpoint. Returns (p50, p99).
pub async fn live_latency(
    binary: &Path,
    events: &[StoredEvent],
    synchronous: Synchronous,
    live: &str,
) -> (Duration, Duration) {
    let server = FeedServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), Vec::new())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let flux = Setup {
        format: FeedFormat::Flux,
        projections: Projections::Both,
        mapping: None,
    };
    let config = write_config(dir.path(), flux, &server.url(), "100ms", synchronous);
    if live != "poll" {
        let text = std::fs::read_to_string(&config).unwrap_or_else(|e| panic!("{e}"));
        let keys = format!(
            "poll_interval = \"100ms\"\nlive = \"{live}\"\nlive_url = \"{}\"",
            server.live_url()
        );
        std::fs::write(&config, text.replace("poll_interval = \"100ms\"", &keys))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let database = dir.path().join("projector.db");
    let child = spawn(binary, &config);
    // Wait until the daemon polls the (empty) feed, and holds the live stream.
    while server.page_requests() < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    if live != "poll" {
        tokio::time::sleep(Duration::from_millis(200)).await;
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
