//! Proxies named by the environment, read as curl reads them (`HTTP_PROXY`, `HTTPS_PROXY`,
//! `ALL_PROXY`, `NO_PROXY`, lower case too) by hyper-util's matcher.
//!
//! A plain-HTTP URL is asked of the proxy whole (`GET http://host/path`), with
//! `Proxy-Authorization` when the proxy's URL carries a user; an HTTPS URL goes through a
//! `CONNECT` tunnel, TLS from the daemon to the feed. Loopback URLs never go through a proxy, as in
//! Go's net/http: a proxy elsewhere cannot reach this machine's loopback, and the demo, the tests
//! and the bench must not depend on the environment. Only `http://` proxies are spoken to: a
//! SOCKS or `https://` proxy fails each connection with a message saying so.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::header::HeaderValue;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::Uri;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::{Intercept, Matcher};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use crate::feed::error::with_causes;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Which proxy, if any, each URL goes through.
pub struct Proxies {
    matcher: Matcher,
}

/// The variables a proxy is named in, in the order the matcher reads them.
const PROXY_VARIABLES: [&str; 6] = [
    "ALL_PROXY",
    "all_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
];

/// The proxy variables set to something the matcher cannot use, which it passes over
/// silently: e.g. `HTTPS_PROXY=htp://proxy:3128`. Each is described without its credentials.
pub fn unusable_settings(variable: impl Fn(&str) -> Option<String>) -> Vec<String> {
    let probe = Uri::from_static("http://projector.invalid/");
    PROXY_VARIABLES
        .iter()
        .filter_map(|&name| {
            let value = variable(name).filter(|value| !value.trim().is_empty())?;
            // The matcher's own reading of the value: a usable one intercepts every URL.
            let usable = Matcher::builder()
                .all(value.clone())
                .build()
                .intercept(&probe)
                .is_some();
            let shown = match value.rsplit_once('@') {
                Some((_, host)) => format!("…@{host}"),
                None => value,
            };
            (!usable).then(|| format!("{name}={shown:?} is not a proxy URL; it is ignored"))
        })
        .collect()
}

/// How a connection to a URL is made.
#[derive(Debug)]
enum Route {
    Direct,
    /// Plain HTTP through an HTTP proxy: the proxy is asked for the whole URL.
    Forward(Intercept),
    /// HTTPS through an HTTP proxy: a `CONNECT` tunnel.
    Tunnel(Intercept),
    /// A SOCKS or `https://` proxy.
    Unsupported(Intercept),
}

impl Proxies {
    /// The proxies of the daemon's environment.
    pub fn from_env() -> Proxies {
        Proxies {
            matcher: Matcher::from_env(),
        }
    }

    /// A description of the proxy `url` goes through, for the log; `None` when it goes directly.
    pub fn describe(&self, url: &Uri) -> Option<String> {
        match self.route(url) {
            Route::Direct => None,
            Route::Forward(proxy) | Route::Tunnel(proxy) => {
                Some(crate::shown::url_text(&proxy.uri().to_string()))
            }
            Route::Unsupported(proxy) => Some(format!(
                "{} (not supported)",
                crate::shown::url_text(&proxy.uri().to_string())
            )),
        }
    }

    /// The `Proxy-Authorization` a plain-HTTP request for `url` carries.
    pub fn forward_authorization(&self, url: &Uri) -> Option<HeaderValue> {
        match self.route(url) {
            Route::Forward(proxy) => proxy.basic_auth().cloned(),
            _ => None,
        }
    }

    fn route(&self, url: &Uri) -> Route {
        if url.host().is_none_or(is_loopback) {
            return Route::Direct;
        }
        let Some(proxy) = self.matcher.intercept(url) else {
            return Route::Direct;
        };
        if proxy.uri().scheme_str() != Some("http") {
            return Route::Unsupported(proxy);
        }
        match url.scheme_str() {
            Some("https") => Route::Tunnel(proxy),
            _ => Route::Forward(proxy),
        }
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host
        .strip_prefix('[')
        .and_then(|host| host.strip_suffix(']'))
        .unwrap_or(host);
    match bare.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => {
            bare.eq_ignore_ascii_case("localhost")
                || bare
                    .get(bare.len().saturating_sub(".localhost".len())..)
                    .is_some_and(|end| end.eq_ignore_ascii_case(".localhost"))
        }
    }
}

/// Opens TCP connections for the HTTP client, through the proxy each URL's route says; TLS is
/// the wrapping connector's.
#[derive(Clone)]
pub struct ProxyConnector {
    tcp: HttpConnector,
    proxies: Arc<Proxies>,
}

impl ProxyConnector {
    pub fn new(tcp: HttpConnector, proxies: Arc<Proxies>) -> ProxyConnector {
        ProxyConnector { tcp, proxies }
    }
}

impl Service<Uri> for ProxyConnector {
    type Response = ProxiedStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<ProxiedStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, url: Uri) -> Self::Future {
        let mut tcp = self.tcp.clone();
        match self.proxies.route(&url) {
            Route::Direct => Box::pin(async move {
                let stream = tcp.call(url).await?;
                Ok(ProxiedStream::new(stream, false))
            }),
            Route::Forward(proxy) => Box::pin(async move {
                let stream = tcp
                    .call(proxy.uri().clone())
                    .await
                    .map_err(|err| through(&proxy, err.into()))?;
                Ok(ProxiedStream::new(stream, true))
            }),
            Route::Tunnel(proxy) => {
                let mut tunnel = Tunnel::new(proxy.uri().clone(), tcp);
                if let Some(authorization) = proxy.basic_auth() {
                    tunnel = tunnel.with_auth(authorization.clone());
                }
                Box::pin(async move {
                    let stream = tunnel
                        .call(url)
                        .await
                        .map_err(|err| through(&proxy, err.into()))?;
                    Ok(ProxiedStream::new(stream, false))
                })
            }
            Route::Unsupported(proxy) => Box::pin(async move {
                Err(format!(
                    "the proxy {} is not supported: the daemon speaks to http:// proxies only \
                     (set NO_PROXY to reach this feed directly)",
                    proxy.uri()
                )
                .into())
            }),
        }
    }
}

/// Says which proxy a failure happened through; the proxy's URL never carries its credentials.
fn through(proxy: &Intercept, err: BoxError) -> BoxError {
    with_causes(&format!("through the proxy {}", proxy.uri()), Some(&*err)).into()
}

/// A TCP connection, to the feed or to a proxy. `forwarding` tells hyper to send the whole URL
/// in each request, as a proxy expects.
pub struct ProxiedStream {
    stream: TokioIo<TcpStream>,
    forwarding: bool,
}

impl ProxiedStream {
    fn new(stream: TokioIo<TcpStream>, forwarding: bool) -> ProxiedStream {
        ProxiedStream { stream, forwarding }
    }
}

impl Connection for ProxiedStream {
    fn connected(&self) -> Connected {
        self.stream.connected().proxy(self.forwarding)
    }
}

impl Read for ProxiedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl Write for ProxiedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(http: &str, https: &str, no: &str) -> Proxies {
        Proxies {
            matcher: Matcher::builder().http(http).https(https).no(no).build(),
        }
    }

    fn route(proxies: &Proxies, url: &str) -> String {
        match proxies.route(&uri(url)) {
            Route::Direct => "direct".into(),
            Route::Forward(proxy) => format!("forward {}", proxy.uri()),
            Route::Tunnel(proxy) => format!("tunnel {}", proxy.uri()),
            Route::Unsupported(proxy) => format!("unsupported {}", proxy.uri()),
        }
    }

    #[test]
    fn urls_go_through_the_proxy_of_their_scheme_unless_loopback_or_no_proxy() {
        let proxies = proxies(
            "http://forward.example:3128",
            "http://tunnel.example:3129",
            "internal.example, 10.0.0.0/8",
        );
        let cases = [
            (
                "http://feed.example/events",
                "forward http://forward.example:3128/",
            ),
            (
                "https://feed.example/events",
                "tunnel http://tunnel.example:3129/",
            ),
            ("http://internal.example/events", "direct"),
            ("http://a.internal.example/events", "direct"),
            ("http://10.1.2.3/events", "direct"),
            ("http://127.0.0.1:3000/events", "direct"),
            ("http://127.8.9.10/events", "direct"),
            ("http://[::1]:3000/events", "direct"),
            ("http://localhost:3000/events", "direct"),
            ("http://feed.localhost/events", "direct"),
            (
                "http://notlocalhost/events",
                "forward http://forward.example:3128/",
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(route(&proxies, url), expected, "{url}");
        }
        let none = Proxies {
            matcher: Matcher::builder().build(),
        };
        assert_eq!(route(&none, "http://feed.example/events"), "direct");
        assert_eq!(none.describe(&uri("http://feed.example/")), None);
    }

    #[test]
    fn proxy_variables_the_matcher_cannot_use_are_named_without_credentials() {
        let variables = |name: &str| match name {
            "HTTPS_PROXY" => Some("htp://ann:secret@proxy.example:3128".to_string()),
            "http_proxy" => Some("proxy.example:3128".to_string()),
            "ALL_PROXY" => Some("socks5://proxy.example:1080".to_string()),
            "all_proxy" => Some(" ".to_string()),
            _ => None,
        };
        assert_eq!(
            unusable_settings(variables),
            vec![r#"HTTPS_PROXY="…@proxy.example:3128" is not a proxy URL; it is ignored"#]
        );
    }

    #[test]
    fn socks_and_tls_proxies_are_refused_and_credentials_become_basic_authorization() {
        let socks = proxies("socks5://socks.example:1080", "https://tls.example", "");
        assert_eq!(
            route(&socks, "http://feed.example/events"),
            "unsupported socks5://socks.example:1080/"
        );
        assert_eq!(
            route(&socks, "https://feed.example/events"),
            "unsupported https://tls.example/"
        );

        let with_user = proxies("http://ann:secret@forward.example:3128", "", "");
        let url = uri("http://feed.example/events");
        assert_eq!(
            with_user.forward_authorization(&url),
            Some(HeaderValue::from_static("Basic YW5uOnNlY3JldA=="))
        );
        // The credentials are not part of what the log shows.
        assert_eq!(
            with_user.describe(&url).as_deref(),
            Some("http://forward.example:3128/")
        );
        let loopback = uri("http://127.0.0.1/events");
        assert_eq!(with_user.forward_authorization(&loopback), None);
    }

    fn client(proxies: Proxies) -> crate::feed::http::HttpClient {
        use crate::feed::http::{HttpClient, HttpSettings};
        use std::time::Duration;
        HttpClient::with_proxies(
            HttpSettings {
                connect_timeout: Duration::from_secs(5),
                request_timeout: Duration::from_secs(5),
                max_response_bytes: 1 << 20,
                idle_connections: 1,
            },
            crate::feed::access::Access::anywhere(),
            crate::feed::http::tls::default_config().unwrap_or_else(|e| panic!("{e}")),
            proxies,
        )
    }

    fn uri(url: &str) -> Uri {
        url.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test]
    async fn a_plain_http_url_is_asked_of_the_proxy_whole_with_its_credentials() {
        use axum::http::HeaderMap;
        use std::sync::Mutex;
        // What the proxy was asked: the request's URL and its Proxy-Authorization.
        type Asked = Vec<(String, Option<String>)>;
        let seen: Arc<Mutex<Asked>> = Arc::default();
        let recorder = seen.clone();
        // The proxy: answers every request itself, recording what it was asked.
        let proxy = axum::Router::new().fallback(move |url: Uri, headers: HeaderMap| {
            let recorder = recorder.clone();
            async move {
                let authorization = headers
                    .get("proxy-authorization")
                    .and_then(|value| value.to_str().ok())
                    .map(str::to_string);
                if let Ok(mut seen) = recorder.lock() {
                    seen.push((url.to_string(), authorization));
                }
                r#"{"amount":5}"#
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let address = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move { axum::serve(listener, proxy).await });

        let client = client(proxies(&format!("http://ann:secret@{address}"), "", ""));
        // feed.invalid cannot resolve: only the proxy can answer for it.
        let body = client.get(&uri("http://feed.invalid/events/1")).await;
        assert_eq!(
            body.map_err(|e| e.to_string()),
            Ok(br#"{"amount":5}"#.to_vec())
        );
        let seen = seen.lock().map(|seen| seen.clone()).unwrap_or_default();
        assert_eq!(
            seen,
            vec![(
                "http://feed.invalid/events/1".to_string(),
                Some("Basic YW5uOnNlY3JldA==".to_string())
            )]
        );
    }

    #[tokio::test]
    async fn an_https_url_goes_through_a_connect_tunnel_and_a_refusal_says_which_proxy() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let address = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        // The proxy: reads the request head and refuses it.
        let asked = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap_or_else(|e| panic!("{e}"));
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8];
                if socket.read(&mut byte).await.unwrap_or(0) == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            let refusal =
                b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n";
            let _ = socket.write_all(refusal).await;
            String::from_utf8_lossy(&head).into_owned()
        });

        let tunneling = client(proxies("", &format!("http://ann:secret@{address}"), ""));
        let refused = tunneling.get(&uri("https://feed.invalid/events")).await;
        let reason = refused.map(|_| ()).map_err(|e| e.to_string());
        let head = asked.await.unwrap_or_else(|e| panic!("{e}"));
        assert!(
            head.starts_with("CONNECT feed.invalid:443 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.contains("Proxy-Authorization: Basic YW5uOnNlY3JldA==\r\n"),
            "{head}"
        );
        assert!(
            matches!(&reason, Err(r) if r.contains(&format!("through the proxy http://{address}/"))
                && r.contains("proxy authorization required")),
            "{reason:?}"
        );

        let socks = client(proxies("socks5://127.0.0.1:1", "", ""));
        let refused = socks.get(&uri("http://feed.invalid/events")).await;
        let reason = refused.map(|_| ()).map_err(|e| e.to_string());
        assert!(
            matches!(&reason, Err(r) if r.contains("the proxy socks5://127.0.0.1:1/ is not supported")),
            "{reason:?}"
        );
    }
}
