//! The same GETs as `mod.rs`, made with reqwest: pooled client, whole-request timeout,
//! redirects, gzip and proxies from the environment are reqwest's; the size cap, Retry-After and
//! the loopback bypass are kept. Chosen with `PROJECTOR_HTTP_CLIENT=reqwest`, for the A/B in
//! `cargo bench -- --http-ab`.

use std::time::Duration;

use hyper::Uri;

use super::HttpSettings;
use crate::feed::error::{with_causes, FetchErrorKind};

const MAX_REDIRECTS: usize = 10;
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const USER_AGENT: &str = concat!("projector/", env!("CARGO_PKG_VERSION"));

#[derive(Clone)]
pub struct ReqwestClient {
    client: reqwest::Client,
    settings: HttpSettings,
}

impl ReqwestClient {
    pub fn new(settings: HttpSettings) -> Result<ReqwestClient, String> {
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|err| err.to_string())?
        .with_root_certificates(rustls::RootCertStore::from_iter(
            webpki_roots::TLS_SERVER_ROOTS.iter().cloned(),
        ))
        .with_no_client_auth();
        let mut builder = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .user_agent(USER_AGENT)
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.request_timeout)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(settings.idle_connections)
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS));
        for proxy in env_proxies() {
            builder = builder.proxy(proxy);
        }
        let client = builder.build().map_err(|err| err.to_string())?;
        Ok(ReqwestClient { client, settings })
    }

    pub async fn get(&self, url: &Uri) -> Result<Vec<u8>, FetchErrorKind> {
        let limit = self.settings.max_response_bytes;
        let mut response = self
            .client
            .get(url.to_string())
            .send()
            .await
            .map_err(describe)?;
        let status = response.status();
        if !status.is_success() {
            return Err(super::refused(status, response.headers()));
        }
        if let Some(length) = response.content_length().filter(|&l| l > limit as u64) {
            return Err(FetchErrorKind::TooLarge(format!(
                "the response is {length} bytes, over the limit of {limit} (max_response_bytes)"
            )));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(describe)? {
            if body.len() + chunk.len() > limit {
                return Err(FetchErrorKind::TooLarge(format!(
                    "the response grew over the limit of {limit} bytes (max_response_bytes)"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

fn describe(err: reqwest::Error) -> FetchErrorKind {
    let causes = std::error::Error::source(&err);
    if err.is_connect() {
        return FetchErrorKind::Connect(with_causes("", causes).trim_start_matches(": ").into());
    }
    let what = if err.is_timeout() {
        "timed out"
    } else if err.is_redirect() {
        "too many redirects"
    } else {
        "the request failed"
    };
    FetchErrorKind::Transfer(with_causes(what, causes))
}

/// The proxies the environment names, as curl reads them, with loopback always direct.
fn env_proxies() -> Vec<reqwest::Proxy> {
    let variable = |names: [&str; 2]| {
        names
            .iter()
            .find_map(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))
    };
    let no_proxy = {
        let mut list = variable(["NO_PROXY", "no_proxy"]).unwrap_or_default();
        list.push_str(",localhost,127.0.0.0/8,::1");
        reqwest::NoProxy::from_string(&list)
    };
    let mut proxies = Vec::new();
    if let Some(url) = variable(["HTTP_PROXY", "http_proxy"]) {
        proxies.extend(reqwest::Proxy::http(url).ok());
    }
    if let Some(url) = variable(["HTTPS_PROXY", "https_proxy"]) {
        proxies.extend(reqwest::Proxy::https(url).ok());
    }
    if let Some(url) = variable(["ALL_PROXY", "all_proxy"]) {
        proxies.extend(reqwest::Proxy::all(url).ok());
    }
    proxies
        .into_iter()
        .map(|proxy| proxy.no_proxy(no_proxy.clone()))
        .collect()
}
