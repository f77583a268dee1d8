//! `live = "sse"`: the publisher says "the feed moved" on a Server-Sent-Events stream, and the
//! readers waiting at the head fetch at once instead of waiting out `poll_interval`. Each message
//! counts (its `id:` is the new head offset, sent back as `Last-Event-ID` on a reconnect). The
//! stream is held with backoff; while it is down the readers poll as before, so a lost message
//! only delays, never loses.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::FeedClient;
use crate::reader::retry::Backoff;

/// Holds the stream at `url` until `stop`, counting each message in `moved`.
pub async fn follow(
    client: FeedClient,
    url: url::Url,
    moved: watch::Sender<u64>,
    backoff: Backoff,
    stop: CancellationToken,
) {
    let shown = crate::shown::url(&url);
    let mut last_id: Option<String> = None;
    let mut failures = 0u32;
    loop {
        let held = tokio::select! {
            _ = stop.cancelled() => return,
            held = hold(&client, &url, &mut last_id, &moved) => held,
        };
        let reason = match held {
            // Messages came: the stream works, and a new one starts from the first delay.
            Ok(true) => {
                failures = 0;
                "the stream ended".to_string()
            }
            Ok(false) => "the stream ended before any message".to_string(),
            Err(reason) => reason,
        };
        let delay = backoff.delay(failures, None);
        if failures == 0 {
            tracing::warn!(url = %shown, "live stream: {reason}; polling meanwhile, connecting again in {delay:?}");
        } else {
            tracing::debug!(url = %shown, failures, "live stream: {reason}");
        }
        failures = failures.saturating_add(1);
        // The readers may have missed a message while it was down: they look once more.
        moved.send_modify(|count| *count += 1);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Holds one connection of the stream; true if any message came.
async fn hold(
    client: &FeedClient,
    url: &url::Url,
    last_id: &mut Option<String>,
    moved: &watch::Sender<u64>,
) -> Result<bool, String> {
    let body = client
        .open_live(url, last_id.as_deref())
        .await
        .map_err(|err| err.to_string())?;
    tracing::debug!(url = %crate::shown::url(url), "live stream open");
    let data = http_body_util::BodyDataStream::new(body);
    let mut events = eventsource_stream::EventStream::new(data);
    let mut any = false;
    while let Some(event) = events.next().await {
        let event = event.map_err(|err| format!("reading the stream failed: {err}"))?;
        if !event.id.is_empty() {
            *last_id = Some(event.id);
        }
        any = true;
        moved.send_modify(|count| *count += 1);
    }
    Ok(any)
}

/// How long the readers wait at the head when told nothing: `poll_interval`, or less once the
/// stream says the feed moved.
pub async fn wait_at_head(poll_interval: Duration, moved: Option<&mut watch::Receiver<u64>>) {
    match moved {
        Some(moved) => {
            tokio::select! {
                _ = tokio::time::sleep(poll_interval) => {}
                changed = moved.changed() => {
                    if changed.is_err() {
                        // No stream any more: the interval, as without one.
                        tokio::time::sleep(poll_interval).await;
                    }
                }
            }
        }
        None => tokio::time::sleep(poll_interval).await,
    }
}
