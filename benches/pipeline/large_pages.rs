//! The largest pages the defaults allow: pages just under `max_response_bytes` (16 MiB), what a
//! feed that ignores page sizes sends. The daemon's peak RSS over the catch-up, once with bank
//! events (applied) and once with tiny events of a type no projection applies (passed over).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use projector::config::{FeedFormat, Synchronous};
use projector::demo::bank;
use projector::demo::feed_server::{FeedServer, StoredEvent};

use crate::runs::{slowest_checkpoint, spawn, stop, usage, write_config, Projections, Setup};

/// A page of this many bank events (about 350 bytes each inline) or tiny ones (about 100) is a
/// little under 16 MiB.
const BANK_PER_PAGE: usize = 46_000;
const TINY_PER_PAGE: usize = 150_000;
const PAGES: usize = 4;
/// `max_response_bytes`' default.
const LIMIT: usize = 16 << 20;

pub struct LargePages {
    pub events_per_page: usize,
    pub page_bytes: usize,
    pub peak_rss_kib: u64,
    pub seconds: f64,
}

/// Both cases: (bank events, tiny events).
pub async fn large_pages(binary: &Path, synchronous: Synchronous) -> (LargePages, LargePages) {
    let bank_events = bank::generate(7, BANK_PER_PAGE * PAGES);
    let tiny: Vec<StoredEvent> = (0..TINY_PER_PAGE * PAGES)
        .map(|i| StoredEvent {
            id: i.to_string(),
            aggregate_id: String::new(),
            aggregate_name: String::new(),
            aggregate_version: 0,
            event_type: "x.Noise".into(),
            created: String::new(),
            body: "{}".into(),
        })
        .collect();
    (
        run(binary, synchronous, bank_events, BANK_PER_PAGE).await,
        run(binary, synchronous, tiny, TINY_PER_PAGE).await,
    )
}

async fn run(
    binary: &Path,
    synchronous: Synchronous,
    events: Vec<StoredEvent>,
    per_page: usize,
) -> LargePages {
    let total = events.len() as u64;
    let server = FeedServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), events)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    server.set_inline_page_size(per_page);
    let page_bytes = first_page_bytes(&server).await;
    assert!(
        page_bytes <= LIMIT,
        "a page of {per_page} events is {page_bytes} bytes, over max_response_bytes: fewer a page"
    );
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let setup = Setup {
        format: FeedFormat::Inline,
        projections: Projections::Both,
        mapping: None,
    };
    let config = write_config(dir.path(), setup, &server.inline_url(), "50ms", synchronous);
    let database = dir.path().join("projector.db");
    let mut child = spawn(binary, &config);
    let started = Instant::now();
    while slowest_checkpoint(&database) < total {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the daemon exited: {status}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (peak_rss_kib, _) = usage(child.id());
    stop(child);
    LargePages {
        events_per_page: per_page,
        page_bytes,
        peak_rss_kib,
        seconds,
    }
}

/// The size of the feed's first page, read over a plain TCP request.
async fn first_page_bytes(server: &FeedServer) -> usize {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.addr())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let request = format!(
        "GET /inline?offset=0 HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        server.addr()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let head_end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(0, |i| i + 4);
    answer.len() - head_end
}
