//! `[daemon] metrics_listen`: `GET /metrics` in the OpenMetrics text format (which Prometheus
//! reads), `GET /healthz` and
//! `GET /readyz` (200, or 503 with a JSON body naming the reasons). Each answer asks the daemon
//! for its status through the same handle as the control socket.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::control::handle::DaemonHandle;
use crate::control::protocol::{DaemonStatus, Request as ControlRequest};

/// Binds `address`, so that a taken port stops the start with a message naming it.
pub async fn bind(address: &str) -> anyhow::Result<TcpListener> {
    let address: SocketAddr = address
        .parse()
        .with_context(|| format!("metrics_listen {address:?}"))?;
    TcpListener::bind(address)
        .await
        .with_context(|| format!("listening for metrics on {address}"))
}

/// Serves until `stop`.
pub async fn serve(
    listener: TcpListener,
    daemon: DaemonHandle,
    stuck_after: Duration,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!("metrics: accepting a connection failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let daemon = daemon.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let daemon = daemon.clone();
                async move { Ok::<_, Infallible>(answer(request, &daemon, stuck_after).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = connection => {}
            }
        });
    }
}

async fn answer<B>(
    request: Request<B>,
    daemon: &DaemonHandle,
    stuck_after: Duration,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    let path = request.uri().path().to_string();
    if !matches!(path.as_str(), "/metrics" | "/healthz" | "/readyz") {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz and /readyz are served here\n".into(),
        );
    }
    let Some(status) = daemon.request(ControlRequest::Status).await.status else {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon did not answer\n".into(),
        );
    };
    match path.as_str() {
        "/metrics" => {
            let mut response = plain(StatusCode::OK, super::metrics().render(&status));
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        "/healthz" => judged(super::health::unhealthy(&status, stuck_after), &status),
        _ => judged(super::health::not_ready(&status), &status),
    }
}

/// 200 `{"ok":true}` without reasons, else 503 with them.
fn judged(reasons: Vec<String>, status: &DaemonStatus) -> Response<Full<Bytes>> {
    let ok = reasons.is_empty();
    let body = serde_json::json!({
        "ok": ok,
        "reasons": reasons,
        "stopping": status.stopping,
    });
    let mut response = plain(
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        format!("{body}\n"),
    );
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
