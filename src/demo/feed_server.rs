//! An in-process, Flux-compatible feed server on a loopback port: the demo's bank feed, and the
//! feed the tests (and benchmarks) run the real daemon against. The same events are served as
//! an inline feed too, at `/inline` (Eventhus-shaped events with their payloads, 1,000 a page).
//!
//! It answers as a real Flux server does (pages as `application/json`, bodies as `text/plain`
//! with a trailing newline, `null` for an unknown id, 422 for a negative offset), and it can
//! inject faults on request: scripted ones for a test to provoke one failure exactly, or random
//! ones at a rate from a seed.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use super::faults::{faulty, Fault, Faults, Target};
use crate::config::FeedFormat;

/// Events a page of the inline feed holds, unless set otherwise: large pages are the point.
pub const DEFAULT_INLINE_PAGE_SIZE: usize = 1000;

/// One event as the server stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub id: String,
    pub aggregate_id: String,
    pub aggregate_name: String,
    pub aggregate_version: i64,
    pub event_type: String,
    pub created: String,
    /// The payload as JSON text.
    pub body: String,
}

#[derive(Default)]
struct Store {
    events: Vec<StoredEvent>,
    by_id: HashMap<String, usize>,
}

struct Shared {
    store: RwLock<Store>,
    /// The feed's head, changed at each append: what the live stream (`/live`) says.
    head: tokio::sync::watch::Sender<u64>,
    faults: Mutex<Faults>,
    page_size: usize,
    inline_page_size: AtomicUsize,
    page_requests: AtomicU64,
    /// Page requests being answered now, and the most there were at once.
    pages_in_flight: AtomicU64,
    most_pages_in_flight: AtomicU64,
    body_requests: Mutex<HashMap<String, u64>>,
    faults_injected: AtomicU64,
    /// How long every answer waits before it is sent, in microseconds: a feed across a network.
    delay_micros: AtomicU64,
    /// `http` or `https`: how the pages name the server in their entry URLs.
    scheme: &'static str,
    /// Where the Flux pages say the bodies are, instead of this server (a trap elsewhere).
    body_base: RwLock<Option<String>>,
    /// Where `Fault::RedirectElsewhere` sends a request.
    elsewhere: RwLock<Option<String>>,
    /// The path and the Authorization header of every request, in order.
    authorizations: Mutex<Vec<(String, Option<String>)>>,
}

impl Shared {
    /// Where this page says the bodies are: the base set, else this server as the client named
    /// it (Flux builds entry URLs from the Host header).
    fn body_base(&self, headers: &HeaderMap) -> String {
        if let Some(base) = self
            .body_base
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return base;
        }
        let host = headers
            .get(header::HOST)
            .and_then(|host| host.to_str().ok())
            .unwrap_or("localhost");
        format!("{}://{host}", self.scheme)
    }

    fn record(&self, uri: &axum::http::Uri, headers: &HeaderMap) {
        let authorization = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string);
        self.authorizations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((uri.to_string(), authorization));
    }

    /// The answer to a request that `fault` makes go wrong; `real` is the answer it replaces.
    async fn fault_answer(&self, fault: Fault, real: String, uri: &axum::http::Uri) -> Response {
        if fault != Fault::RedirectElsewhere {
            return faulty(fault, real, uri).await;
        }
        let elsewhere = self
            .elsewhere
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_default();
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        (
            StatusCode::FOUND,
            [(header::LOCATION, format!("{elsewhere}{path}"))],
            "",
        )
            .into_response()
    }

    /// Waits the delay set for every answer, if any.
    async fn delay(&self) {
        let micros = self.delay_micros.load(Ordering::Relaxed);
        if micros > 0 {
            tokio::time::sleep(std::time::Duration::from_micros(micros)).await;
        }
    }
}

impl Shared {
    fn take_fault(&self, target: Target) -> Option<Fault> {
        let fault = self
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(target);
        if fault.is_some() {
            self.faults_injected.fetch_add(1, Ordering::Relaxed);
        }
        fault
    }
}

/// A running feed server; it stops when dropped.
pub struct FeedServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FeedServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FeedServer {
    /// Serves `events` on `addr` (use port 0 for any free port), 20 per page as Flux does.
    pub async fn start(addr: SocketAddr, events: Vec<StoredEvent>) -> std::io::Result<FeedServer> {
        FeedServer::start_with(addr, events, None).await
    }

    /// As `start`, over TLS with `tls` (its certificate, and whether it asks for the client's).
    pub async fn start_tls(
        addr: SocketAddr,
        events: Vec<StoredEvent>,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<FeedServer> {
        FeedServer::start_with(addr, events, Some(tls)).await
    }

    async fn start_with(
        addr: SocketAddr,
        events: Vec<StoredEvent>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<FeedServer> {
        let shared = Arc::new(Shared {
            store: RwLock::new(Store::default()),
            head: tokio::sync::watch::Sender::new(0),
            faults: Mutex::new(Faults::default()),
            page_size: 20,
            inline_page_size: AtomicUsize::new(DEFAULT_INLINE_PAGE_SIZE),
            page_requests: AtomicU64::new(0),
            pages_in_flight: AtomicU64::new(0),
            most_pages_in_flight: AtomicU64::new(0),
            body_requests: Mutex::new(HashMap::new()),
            faults_injected: AtomicU64::new(0),
            delay_micros: AtomicU64::new(0),
            scheme: if tls.is_some() { "https" } else { "http" },
            body_base: RwLock::new(None),
            elsewhere: RwLock::new(None),
            authorizations: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let router = Router::new()
            .route("/events", get(flux_page))
            .route("/events/{id}", get(body))
            .route("/inline", get(inline_page))
            .route("/live", get(live))
            .with_state(shared.clone());
        // TCP_NODELAY on each connection, as Go's net/http and nginx set it: with Nagle on, a
        // client that pipelines requests waits for its own delayed ACKs (see BENCHMARKS.md).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let task = match tls {
            None => tokio::spawn(async move {
                if let Err(err) = axum::serve(listener, router).await {
                    tracing::error!("feed server stopped: {err}");
                }
            }),
            Some(tls) => {
                let listener = super::tls::TlsListener::new(listener, tls);
                tokio::spawn(async move {
                    if let Err(err) = axum::serve(listener, router).await {
                        tracing::error!("feed server stopped: {err}");
                    }
                })
            }
        };
        let server = FeedServer { addr, shared, task };
        server.append(events);
        Ok(server)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The feed's URL, as a consumer is configured with it.
    pub fn url(&self) -> String {
        format!("{}://{}/events", self.shared.scheme, self.addr)
    }

    /// The same feed in the inline format.
    pub fn inline_url(&self) -> String {
        format!("{}://{}/inline", self.shared.scheme, self.addr)
    }

    /// From now on the Flux pages say the bodies are at `base` (`http://host:port`), another
    /// server: what a feed that is not to be trusted does.
    pub fn set_body_base(&self, base: &str) {
        *self
            .shared
            .body_base
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(base.to_string());
    }

    /// Where `Fault::RedirectElsewhere` redirects to (`http://host:port`).
    pub fn redirect_elsewhere_to(&self, base: &str) {
        *self
            .shared
            .elsewhere
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(base.to_string());
    }

    /// The path and the Authorization header of every request so far, in order.
    pub fn authorizations(&self) -> Vec<(String, Option<String>)> {
        self.shared
            .authorizations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The feed's URL in `format`.
    pub fn url_in(&self, format: FeedFormat) -> String {
        match format {
            FeedFormat::Flux => self.url(),
            FeedFormat::Inline => self.inline_url(),
        }
    }

    /// How many events an inline page holds from now on.
    /// From now on every answer waits `delay` before it is sent, as a feed across a network
    /// answers after a round trip.
    pub fn set_delay(&self, delay: std::time::Duration) {
        let micros = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.shared.delay_micros.store(micros, Ordering::Relaxed);
    }

    pub fn set_inline_page_size(&self, size: usize) {
        self.shared
            .inline_page_size
            .store(size.max(1), Ordering::Relaxed);
    }

    pub fn append(&self, events: Vec<StoredEvent>) {
        let mut guard = self
            .shared
            .store
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let store = &mut *guard;
        for event in events {
            store.by_id.insert(event.id.clone(), store.events.len());
            store.events.push(event);
        }
        self.shared.head.send_replace(store.events.len() as u64);
    }

    /// The URL of the live stream, for `live = "sse"`.
    pub fn live_url(&self) -> String {
        format!("{}://{}/live", self.shared.scheme, self.addr)
    }

    /// Replaces the whole feed, as a producer that rewrote or reset its history would.
    pub fn replace(&self, events: Vec<StoredEvent>) {
        *self
            .shared
            .store
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Store::default();
        self.append(events);
    }

    pub fn len(&self) -> usize {
        self.shared
            .store
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .events
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next `times` requests of `target` answer with `fault`.
    pub fn inject(&self, target: Target, fault: Fault, times: usize) {
        let mut faults = self
            .shared
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        faults
            .scripted
            .extend(std::iter::repeat_n((target, fault), times));
    }

    /// Drops every scripted fault not yet served and stops random ones: the feed is healthy.
    pub fn clear_faults(&self) {
        let mut faults = self
            .shared
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        faults.scripted.clear();
        faults.random = None;
    }

    /// From now on, each request fails with a random transient fault with probability `rate`.
    pub fn random_faults(&self, seed: u64, rate: f64) {
        self.shared
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .random = Some((fastrand::Rng::with_seed(seed), rate));
    }

    pub fn page_requests(&self) -> u64 {
        self.shared.page_requests.load(Ordering::Relaxed)
    }

    /// The most page requests answered at once so far.
    pub fn most_pages_in_flight(&self) -> u64 {
        self.shared.most_pages_in_flight.load(Ordering::Relaxed)
    }

    /// How many times bodies of events of `event_type` were asked for.
    pub fn body_requests(&self, event_type: &str) -> u64 {
        self.shared
            .body_requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(event_type)
            .copied()
            .unwrap_or(0)
    }

    pub fn faults_injected(&self) -> u64 {
        self.shared.faults_injected.load(Ordering::Relaxed)
    }
}

#[derive(Serialize)]
struct PageJson<'a> {
    description: &'static str,
    events: Vec<EntryJson<'a>>,
}

#[derive(Serialize)]
struct EntryJson<'a> {
    event_id: &'a str,
    url: String,
    aggregate_name: &'a str,
    aggregate_version: i64,
    event_type: &'a str,
    created: &'a str,
}

#[derive(Serialize)]
struct InlinePageJson<'a> {
    events: Vec<InlineEventJson<'a>>,
}

/// Eventhus's event, with Flux's creation time.
#[derive(Serialize)]
struct InlineEventJson<'a> {
    id: &'a str,
    aggregate_id: &'a str,
    aggregate_type: &'a str,
    version: i64,
    #[serde(rename = "type")]
    event_type: &'a str,
    created: &'a str,
    data: &'a serde_json::value::RawValue,
}

async fn flux_page(
    State(shared): State<Arc<Shared>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    page(FeedFormat::Flux, &shared, &uri, &headers, &query).await
}

async fn inline_page(
    State(shared): State<Arc<Shared>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    page(FeedFormat::Inline, &shared, &uri, &headers, &query).await
}

/// The live stream: a Server-Sent-Event each time the feed grows, its id the new head offset.
async fn live(
    State(shared): State<Arc<Shared>>,
) -> axum::response::sse::Sse<
    impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    let head = shared.head.subscribe();
    let moves = futures_util::stream::unfold(head, |mut head| async move {
        head.changed().await.ok()?;
        let at = *head.borrow_and_update();
        let event = axum::response::sse::Event::default()
            .id(at.to_string())
            .data("moved");
        Some((Ok(event), head))
    });
    axum::response::sse::Sse::new(moves)
}

/// Counts a request out of a count of those in flight when it is answered (or dropped).
struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn page(
    format: FeedFormat,
    shared: &Shared,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Response {
    shared.page_requests.fetch_add(1, Ordering::Relaxed);
    let in_flight = shared.pages_in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    shared
        .most_pages_in_flight
        .fetch_max(in_flight, Ordering::Relaxed);
    let _answered = InFlight(&shared.pages_in_flight);
    shared.record(uri, headers);
    shared.delay().await;
    let offset = match query.get("offset").map(|text| text.parse::<i64>()) {
        None => 0,
        Some(Ok(offset)) if offset >= 0 => offset as usize,
        Some(_) => {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                [(header::CONTENT_TYPE, "application/json")],
                r#"{"message": "Invalid offset"}"#,
            )
                .into_response()
        }
    };
    // Long-poll (`wait=SECONDS`): at the head, the answer waits for events, or the time.
    if let Some(seconds) = query.get("wait").and_then(|text| text.parse::<u64>().ok()) {
        let mut head = shared.head.subscribe();
        let waited = std::time::Duration::from_secs(seconds);
        let _ = tokio::time::timeout(waited, async {
            while (*head.borrow_and_update() as usize) <= offset {
                if head.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }
    let json = {
        let store = shared.store.read().unwrap_or_else(PoisonError::into_inner);
        let page_size = match format {
            FeedFormat::Flux => shared.page_size,
            FeedFormat::Inline => shared.inline_page_size.load(Ordering::Relaxed),
        };
        let end = offset.saturating_add(page_size).min(store.events.len());
        let events = store.events.get(offset..end).unwrap_or_default();
        match format {
            FeedFormat::Flux => flux_page_json(events, &shared.body_base(headers)),
            FeedFormat::Inline => inline_page_json(events),
        }
    };
    match shared.take_fault(Target::Pages) {
        Some(fault) => shared.fault_answer(fault, json, uri).await,
        None => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
    }
}

fn flux_page_json(events: &[StoredEvent], base: &str) -> String {
    let page = PageJson {
        description: "event feed",
        events: events
            .iter()
            .map(|event| EntryJson {
                event_id: &event.id,
                url: format!("{base}/events/{}", event.id),
                aggregate_name: &event.aggregate_name,
                aggregate_version: event.aggregate_version,
                event_type: &event.event_type,
                created: &event.created,
            })
            .collect(),
    };
    serde_json::to_string(&page).unwrap_or_default()
}

/// A stored body that is not JSON is sent as `null`: a page cannot carry it.
fn inline_page_json(events: &[StoredEvent]) -> String {
    let null = serde_json::value::RawValue::NULL;
    let page = InlinePageJson {
        events: events
            .iter()
            .map(|event| InlineEventJson {
                id: &event.id,
                aggregate_id: &event.aggregate_id,
                aggregate_type: &event.aggregate_name,
                version: event.aggregate_version,
                event_type: &event.event_type,
                created: &event.created,
                data: serde_json::from_str(&event.body).unwrap_or(null),
            })
            .collect(),
    };
    serde_json::to_string(&page).unwrap_or_default()
}

async fn body(
    State(shared): State<Arc<Shared>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    shared.record(&uri, &headers);
    shared.delay().await;
    let (event_type, text) = {
        let store = shared.store.read().unwrap_or_else(PoisonError::into_inner);
        match store
            .by_id
            .get(&id)
            .and_then(|&index| store.events.get(index))
        {
            Some(event) => (event.event_type.clone(), format!("{}\n", event.body)),
            None => (String::new(), "null\n".to_string()),
        }
    };
    *shared
        .body_requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(event_type)
        .or_default() += 1;
    match shared.take_fault(Target::Bodies) {
        Some(fault) => shared.fault_answer(fault, text, &uri).await,
        None => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response(),
    }
}
