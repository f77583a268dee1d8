//! The HTTP GETs of the feed clients: pooled keep-alive connections (HTTP/1.1, or HTTP/2 when a
//! TLS server offers it), the whole answer read under a size limit, gzip inflated as it comes,
//! redirects followed, one deadline for all of it.
//!
//! Built on hyper's pooled client rather than reqwest: a body request per event makes the
//! per-request cost count, and reqwest's layers cost more than the rest of the request path
//! (measured in BENCHMARKS.md; `reqwest_client.rs` is the other side of that A/B). Proxies come
//! from the environment (`proxy.rs`), the answer's bytes are read under the size limit by
//! `body.rs`.

mod body;
pub mod proxy;
#[cfg(feature = "http-ab")]
pub mod reqwest_client;
pub mod tls;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use url::Url;

use super::access::Access;
use super::error::{with_causes, FetchErrorKind};
use body::LimitedBody;
use proxy::{Proxies, ProxyConnector};

/// Redirects followed for one request, as browsers and reqwest do.
const MAX_REDIRECTS: usize = 10;
/// Idle connections are closed after this.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const USER_AGENT: &str = concat!("projector/", env!("CARGO_PKG_VERSION"));

/// How a client connects and what it accepts.
#[derive(Debug, Clone, Copy)]
pub struct HttpSettings {
    pub connect_timeout: Duration,
    /// For the whole request: connecting, redirects and reading the answer.
    pub request_timeout: Duration,
    /// The most bytes of an answer, as received and once inflated.
    pub max_response_bytes: usize,
    /// Idle connections kept per host.
    pub idle_connections: usize,
}

/// A GET client; cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpsConnector<ProxyConnector>, Empty<Bytes>>,
    settings: HttpSettings,
    proxies: Arc<Proxies>,
    access: Arc<Access>,
}

impl HttpClient {
    /// A client that goes through the proxies the environment names, where `access` lets it,
    /// with `tls`.
    pub fn new(settings: HttpSettings, access: Access, tls: rustls::ClientConfig) -> HttpClient {
        HttpClient::with_proxies(settings, access, tls, Proxies::from_env())
    }

    pub(crate) fn with_proxies(
        settings: HttpSettings,
        access: Access,
        tls: rustls::ClientConfig,
        proxies: Proxies,
    ) -> HttpClient {
        let proxies = Arc::new(proxies);
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(settings.connect_timeout));
        http.set_nodelay(true);
        // The TLS connector decides by scheme.
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(ProxyConnector::new(http, proxies.clone()));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(settings.idle_connections)
            .build(connector);
        HttpClient {
            client,
            settings,
            proxies,
            access: Arc::new(access),
        }
    }

    /// The proxy `url` goes through, for the log; `None` when it goes directly.
    pub fn proxy_for(&self, url: &Uri) -> Option<String> {
        self.proxies.describe(url)
    }

    /// GETs `url` and returns the whole body of a 2xx answer, inflated if it was gzipped.
    pub async fn get(&self, url: &Uri) -> Result<Vec<u8>, FetchErrorKind> {
        self.get_within(url, Duration::ZERO).await
    }

    /// As `get`, with `extra` more time than `request_timeout` for the answer (the wait of a
    /// long-poll, which the feed may hold that long).
    pub async fn get_within(&self, url: &Uri, extra: Duration) -> Result<Vec<u8>, FetchErrorKind> {
        let timeout = self.settings.request_timeout + extra;
        tokio::time::timeout(timeout, self.get_following_redirects(url))
            .await
            .unwrap_or_else(|_| {
                Err(FetchErrorKind::Transfer(format!(
                    "timed out after {timeout:?}"
                )))
            })
    }

    async fn get_following_redirects(&self, url: &Uri) -> Result<Vec<u8>, FetchErrorKind> {
        let mut url = Cow::Borrowed(url);
        for _ in 0..=MAX_REDIRECTS {
            let response = self.send(&url).await?;
            let status = response.status();
            if is_followed_redirect(status) {
                if let Some(location) = response.headers().get(header::LOCATION) {
                    let target = redirect_target(&url, location)?;
                    self.access.check(Some(&url), &target).map_err(|reason| {
                        FetchErrorKind::Refused(format!("a redirect to {reason}"))
                    })?;
                    url = Cow::Owned(target);
                    continue;
                }
            }
            if !status.is_success() {
                return Err(refused(status, response.headers()));
            }
            return self.read_body(response).await;
        }
        Err(FetchErrorKind::Transfer(format!(
            "too many redirects (more than {MAX_REDIRECTS})"
        )))
    }

    /// Opens a Server-Sent-Events stream at `url` (sending `Last-Event-ID` when there is one)
    /// and returns its body as it comes, once the answer is a 2xx; no redirect is followed.
    pub async fn open_event_stream(
        &self,
        url: &Uri,
        last_event_id: Option<&str>,
    ) -> Result<Incoming, FetchErrorKind> {
        let mut extra = vec![(
            header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        )];
        if let Some(id) = last_event_id.and_then(|id| HeaderValue::from_str(id).ok()) {
            extra.push((header::HeaderName::from_static("last-event-id"), id));
        }
        let connect = self.settings.connect_timeout + self.settings.request_timeout;
        let response = tokio::time::timeout(connect, self.send_with(url, &extra))
            .await
            .unwrap_or_else(|_| {
                Err(FetchErrorKind::Transfer(format!(
                    "no answer after {connect:?}"
                )))
            })?;
        if !response.status().is_success() {
            return Err(refused(response.status(), response.headers()));
        }
        Ok(response.into_body())
    }

    async fn send(&self, url: &Uri) -> Result<Response<Incoming>, FetchErrorKind> {
        self.send_with(
            url,
            &[(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"))],
        )
        .await
    }

    async fn send_with(
        &self,
        url: &Uri,
        headers: &[(header::HeaderName, HeaderValue)],
    ) -> Result<Response<Incoming>, FetchErrorKind> {
        let mut request = Request::get(url.clone())
            .header(header::USER_AGENT, HeaderValue::from_static(USER_AGENT))
            .body(Empty::new())
            .map_err(|err| FetchErrorKind::Transfer(format!("the request is not valid: {err}")))?;
        for (name, value) in headers {
            request.headers_mut().insert(name.clone(), value.clone());
        }
        if let Some(authorization) = self.proxies.forward_authorization(url) {
            request
                .headers_mut()
                .insert(header::PROXY_AUTHORIZATION, authorization);
        }
        if let Some(credentials) = self.access.credentials_for(url) {
            for (name, value) in credentials {
                request.headers_mut().insert(name, value.clone());
            }
        }
        self.client.request(request).await.map_err(|err| {
            // The client's own message ("client error (Connect)") says less than its causes.
            let causes = with_causes("", std::error::Error::source(&err));
            let causes = causes.trim_start_matches(": ");
            match tls::explain(causes) {
                Some(meaning) => FetchErrorKind::Connect(format!("TLS: {meaning} ({causes})")),
                None if err.is_connect() => FetchErrorKind::Connect(causes.into()),
                None => FetchErrorKind::Transfer(format!("the request failed: {causes}")),
            }
        })
    }

    /// Reads the answer, refusing to read past the limit: a declared length over it fails at
    /// once, and bytes are counted as they arrive and as they inflate.
    async fn read_body(&self, response: Response<Incoming>) -> Result<Vec<u8>, FetchErrorKind> {
        let limit = self.settings.max_response_bytes;
        let declared = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if let Some(length) = declared.filter(|&length| length > limit as u64) {
            return Err(FetchErrorKind::TooLarge(format!(
                "the response is {length} bytes, over the limit of {limit} (max_response_bytes)"
            )));
        }
        let gzipped = response
            .headers()
            .get(header::CONTENT_ENCODING)
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"gzip"));
        let mut body = response.into_body();
        let mut answer = LimitedBody::new(gzipped, limit, declared);
        let mut received = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|err| {
                FetchErrorKind::Transfer(with_causes("reading the response failed", Some(&err)))
            })?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            received += data.len();
            if received > limit {
                return Err(FetchErrorKind::TooLarge(format!(
                    "the response grew over the limit of {limit} bytes (max_response_bytes)"
                )));
            }
            answer.push(&data)?;
        }
        answer.finish()
    }
}

/// The error for an answer whose status is not 2xx, with the delay a 429 or a 503 asks for
/// (`Retry-After: <seconds>`).
pub(super) fn refused(status: StatusCode, headers: &header::HeaderMap) -> FetchErrorKind {
    let retry_after = match status {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => headers
            .get(header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map(Duration::from_secs),
        _ => None,
    };
    FetchErrorKind::Status {
        status,
        retry_after,
    }
}

fn is_followed_redirect(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::MOVED_PERMANENTLY
            | StatusCode::FOUND
            | StatusCode::SEE_OTHER
            | StatusCode::TEMPORARY_REDIRECT
            | StatusCode::PERMANENT_REDIRECT
    )
}

/// Where a redirect leads: `Location` may be relative to the URL that answered.
fn redirect_target(from: &Uri, location: &HeaderValue) -> Result<Uri, FetchErrorKind> {
    let bad = |reason: String| {
        let from = crate::shown::url_text(&from.to_string());
        FetchErrorKind::Unreadable(format!("a redirect from {from} is unusable: {reason}"))
    };
    let location = location
        .to_str()
        .map_err(|_| bad("its Location is not text".into()))?;
    let target = Url::parse(&from.to_string())
        .and_then(|from| from.join(location))
        .map_err(|err| bad(format!("Location {location:?}: {err}")))?;
    if !matches!(target.scheme(), "http" | "https") {
        return Err(bad(format!("it leads to {target}, which is not HTTP")));
    }
    parse_uri(target.as_str()).map_err(bad)
}

/// An absolute URL as the client sends it.
pub fn parse_uri(url: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .parse()
        .map_err(|err| format!("the URL {url:?} is not usable: {err}"))?;
    if uri.scheme().is_none() || uri.authority().is_none() {
        return Err(format!("the URL {url:?} is not absolute"));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;
    use body::tests::gzip;

    #[test]
    fn redirects_resolve_against_the_url_that_answered() {
        let from =
            parse_uri("http://feed.example/events?offset=20").unwrap_or_else(|e| panic!("{e}"));
        let to = |location: &str| {
            redirect_target(
                &from,
                &HeaderValue::from_str(location).unwrap_or_else(|e| panic!("{e}")),
            )
            .map(|url| url.to_string())
            .map_err(|e| e.to_string())
        };
        assert_eq!(
            to("/v2/events?offset=20"),
            Ok("http://feed.example/v2/events?offset=20".into())
        );
        assert_eq!(
            to("https://other.example/e"),
            Ok("https://other.example/e".into())
        );
        assert!(matches!(to("ftp://other.example/e"), Err(r) if r.contains("not HTTP")));
    }

    /// A client with a 1 MiB limit.
    fn client() -> HttpClient {
        let settings = HttpSettings {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            max_response_bytes: 1 << 20,
            idle_connections: 1,
        };
        let tls = tls::default_config().unwrap_or_else(|e| panic!("{e}"));
        HttpClient::new(settings, Access::anywhere(), tls)
    }

    /// Serves `router` on a loopback port; returns its base URL.
    async fn serve(router: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let address = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{address}")
    }

    #[tokio::test]
    async fn gzipped_answers_inflate_redirects_are_followed_and_bombs_refused() {
        use axum::response::IntoResponse;
        use axum::routing::get;
        let gzipped = |data: Vec<u8>| {
            move || async move { ([(header::CONTENT_ENCODING, "gzip")], gzip(&data)).into_response() }
        };
        let redirect = |to: &'static str| {
            move || async move { (StatusCode::FOUND, [(header::LOCATION, to)]).into_response() }
        };
        let router = axum::Router::new()
            .route("/event", get(gzipped(br#"{"amount":5}"#.to_vec())))
            .route("/bomb", get(gzipped(vec![b' '; 2 << 20])))
            .route("/moved", get(redirect("/event")))
            .route("/loop", get(redirect("/loop")));
        let base = serve(router).await;
        let client = client();
        let get = |path: &str| {
            let url = parse_uri(&format!("{base}{path}")).unwrap_or_else(|e| panic!("{e}"));
            let client = client.clone();
            async move { client.get(&url).await.map_err(|e| e.to_string()) }
        };
        assert_eq!(get("/event").await, Ok(br#"{"amount":5}"#.to_vec()));
        assert_eq!(get("/moved").await, Ok(br#"{"amount":5}"#.to_vec()));
        let bomb = get("/bomb").await;
        assert!(
            matches!(&bomb, Err(r) if r.contains("inflates to over the limit")),
            "{bomb:?}"
        );
        let looping = get("/loop").await;
        assert!(
            matches!(&looping, Err(r) if r.contains("too many redirects")),
            "{looping:?}"
        );
        let missing = get("/nothing").await;
        assert_eq!(missing, Err("HTTP 404 Not Found".into()));
    }

    /// A TLS handshake with a server that speaks plain HTTP fails as a connection failure: the
    /// TLS stack is wired in, and says what went wrong.
    #[tokio::test]
    async fn https_to_a_plain_http_server_fails_to_connect() {
        let url = serve(axum::Router::new())
            .await
            .replacen("http://", "https://", 1);
        let client = client();
        let url = parse_uri(&url).unwrap_or_else(|e| panic!("{e}"));
        let err = client
            .get(&url)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert!(
            matches!(&err, Err(r) if r.starts_with("could not connect")),
            "{err:?}"
        );
    }
}
