//! `[daemon.graphite]`: the same figures pushed to Graphite's plaintext protocol
//! (`path value timestamp` lines over TCP) every `interval`, for shops that run Graphite rather
//! than Prometheus. A Graphite that cannot be reached costs the push, said once in the log, and
//! is tried again at the next interval.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::control::handle::DaemonHandle;
use crate::control::protocol::{DaemonStatus, Request};

/// How long a push may take before it is given up until the next interval.
const PUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Pushes every `interval` until `stop`.
pub async fn push(
    address: String,
    prefix: String,
    interval: Duration,
    daemon: DaemonHandle,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let Some(status) = daemon.request(Request::Status).await.status else {
            continue;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let lines = lines(&status, &prefix, now);
        let sent = tokio::time::timeout(PUSH_TIMEOUT, async {
            let mut stream = tokio::net::TcpStream::connect(&address).await?;
            stream.write_all(lines.as_bytes()).await?;
            stream.shutdown().await
        })
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("timed out")));
        match sent {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(address, "graphite: pushing again");
            }
            Ok(()) => {}
            Err(err) if !failing => {
                failing = true;
                tracing::warn!(
                    address,
                    "graphite: the push failed, trying again every interval: {err}"
                );
            }
            Err(_) => {}
        }
    }
}

/// The status as Graphite lines: `PREFIX.FEED.NAME` and `PREFIX.FEED.PROJECTION.NAME`.
fn lines(status: &DaemonStatus, prefix: &str, now: u64) -> String {
    let mut out = String::new();
    let mut line = |path: &[&str], value: f64| {
        let path: Vec<String> = path.iter().map(|part| component(part)).collect();
        let _ = writeln!(out, "{prefix}.{} {value} {now}", path.join("."));
    };
    for feed in &status.feeds {
        let name = feed.name.as_str();
        line(&[name, "events_read"], feed.events_read as f64);
        line(&[name, "retries"], feed.retries as f64);
        line(&[name, "events_per_second"], feed.events_per_second);
        line(&[name, "paused"], f64::from(u8::from(feed.paused)));
        line(&[name, "state", &feed.state.label()], 1.0);
        if let Some(head) = feed.head {
            line(&[name, "head_offset"], head as f64);
        }
        for projection in &feed.projections {
            let p = projection.name.as_str();
            line(
                &[name, p, "checkpoint_offset"],
                projection.checkpoint as f64,
            );
            line(&[name, p, "events_applied"], projection.applied as f64);
            line(&[name, p, "dead_letters"], projection.dead_letters as f64);
            line(
                &[name, p, "halted"],
                f64::from(u8::from(projection.halted.is_some())),
            );
            if let Some(lag) = projection.lag {
                line(&[name, p, "lag_events"], lag as f64);
            }
            if let Some(seconds) = projection.lag_seconds {
                line(&[name, p, "lag_seconds"], seconds);
            }
        }
    }
    out
}

/// A name as one component of a Graphite path: its dots (and anything but letters, digits,
/// `_` and `-`) become `_`.
fn component(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_dotted_name_stays_one_component() {
        assert_eq!(super::component("orders.v2"), "orders_v2");
        assert_eq!(super::component("bank-eu"), "bank-eu");
    }
}
