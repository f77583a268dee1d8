//! The wire limit: what the feed server answers with no daemon, for reference.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use projector::config::FeedFormat;
use projector::demo::feed_server::{FeedServer, StoredEvent, DEFAULT_INLINE_PAGE_SIZE};
use projector::feed::access::Access;
use projector::feed::http::{parse_uri, tls, HttpClient, HttpSettings};

use crate::CONNECTIONS;

/// The requests that read the feed without a daemon, for its wire limit: the body URLs of every
/// event in turn (Flux), or the pages of the whole feed in turn (inline).
pub struct WireLoad {
    /// Holds wrk's request script.
    dir: tempfile::TempDir,
    base: String,
    paths: Vec<String>,
    pub events_per_request: f64,
}

impl WireLoad {
    pub fn new(server: &FeedServer, format: FeedFormat, events: &[StoredEvent]) -> WireLoad {
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
    pub fn wrk_rate(&self) -> f64 {
        self.wrk_rate_at(CONNECTIONS)
    }

    /// The same at `connections` connections.
    pub fn wrk_rate_at(&self, connections: usize) -> f64 {
        let output = Command::new("wrk")
            .args(["-t2", &format!("-c{connections}"), "-d3s", "-s"])
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
    pub async fn client_rate(&self) -> f64 {
        self.client_rate_at(CONNECTIONS).await
    }

    /// The same at `connections` connections.
    pub async fn client_rate_at(&self, connections: usize) -> f64 {
        let client = client(connections);
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
        let workers: Vec<_> = (0..connections)
            .map(|worker| {
                let (client, urls, done) = (client.clone(), urls.clone(), done.clone());
                tokio::spawn(async move {
                    let mut index = worker;
                    while Instant::now() < deadline {
                        let url = &urls[index % urls.len()];
                        if client.get(url).await.is_ok() {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        index += connections;
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

/// The daemon's HTTP client, keeping `connections` connections.
pub fn client(connections: usize) -> HttpClient {
    let settings = HttpSettings {
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
        max_response_bytes: 64 << 20,
        idle_connections: connections,
    };
    let tls = tls::default_config().unwrap_or_else(|e| panic!("{e}"));
    HttpClient::new(settings, Access::anywhere(), tls)
}

/// Whether wrk is installed (`apt install wrk`): the wire limits are then wrk's.
pub fn wrk_installed() -> bool {
    Command::new("wrk")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}
