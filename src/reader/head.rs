//! Finding the head of a feed whose pages do not say where it is (neither format does): the
//! offset of the first empty page. While a feed catches up, its head is probed with a few page
//! requests (offsets tried exponentially further on, then the gap bisected) and probed again now
//! and then, so that the lag and the time left that `status` shows are true, not the end of the
//! last page read.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::feed::error::FetchError;
use crate::feed::FeedClient;
use crate::monitor::FeedMonitor;

use super::budget::Budget;

/// How often the head is probed again while the feed catches up.
const PROBE_EVERY: Duration = Duration::from_secs(30);
/// The first step beyond what is known, in events.
const FIRST_STEP: u64 = 1024;

/// What finding the head needs to ask of the feed: the number of events on the page at an
/// offset (0 at or past the head).
#[allow(async_fn_in_trait)] // used with concrete types only
pub trait PageCount {
    async fn events_at(&self, offset: u64) -> Result<u64, FetchError>;
}

impl PageCount for FeedClient {
    async fn events_at(&self, offset: u64) -> Result<u64, FetchError> {
        Ok(self.fetch_page(offset).await?.len() as u64)
    }
}

/// The daemon's probe: its pages take their turn with the readers' (`Budget::page_slot`).
struct Probe<'a> {
    client: &'a FeedClient,
    budget: &'a Budget,
}

impl PageCount for Probe<'_> {
    async fn events_at(&self, offset: u64) -> Result<u64, FetchError> {
        let _slot = self.budget.page_slot().await;
        self.client.events_at(offset).await
    }
}

/// The head of the feed: the first offset whose page is empty, given that the feed has events
/// below `known` (0 if nothing is known).
///
/// The pages are probed at `known + 1024`, `+ 2048`, ... until one is empty, then the gap is
/// bisected. A page shorter than the longest seen usually ends at the head, so the page just
/// after it is tried next: most feeds answer full pages until the head.
pub async fn find_head(feed: &impl PageCount, known: u64) -> Result<u64, FetchError> {
    // The head is at or past `low` and at or before `high`, once `high` is known.
    let mut low = known;
    let mut high: Option<u64> = None;
    let mut longest = 0;
    let mut step = FIRST_STEP;
    loop {
        let probe = match high {
            None => low + step,
            Some(high) if low >= high => return Ok(low),
            Some(high) => low + (high - low) / 2,
        };
        let events = feed.events_at(probe).await?;
        if events == 0 {
            high = Some(probe);
            continue;
        }
        let end = probe + events;
        low = low.max(end);
        if events < longest {
            // A short page: the head is likely just after it.
            if feed.events_at(end).await? == 0 {
                return Ok(end);
            }
        }
        longest = longest.max(events);
        if high.is_none() {
            step = step.saturating_mul(2);
        }
    }
}

/// Probes the head of one feed whenever one of its readers is catching up, and every
/// PROBE_EVERY while that lasts, until `shutdown`. Nothing is probed while the feed is paused;
/// a probe under way is dropped when it is paused, and shows in the monitor until then, so that
/// a pause waits for it as for the readers.
pub async fn follow_head(
    client: FeedClient,
    budget: Arc<Budget>,
    monitor: Arc<FeedMonitor>,
    mut paused: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            () = monitor.catching_up() => {}
        }
        if *paused.borrow() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                resumed = paused.wait_for(|&p| !p) => if resumed.is_err() { return },
            }
            continue;
        }
        let known = monitor.head().map_or(0, |(head, _)| head);
        let probe = Probe {
            client: &client,
            budget: &budget,
        };
        monitor.probing(true);
        let found = tokio::select! {
            _ = shutdown.cancelled() => None,
            _ = paused.wait_for(|&p| p) => None,
            found = find_head(&probe, known) => Some(found),
        };
        monitor.probing(false);
        match found {
            Some(Ok(head)) => monitor.probed_head(head),
            // Reading retries and reports failures; the probe tries again next time.
            Some(Err(err)) => tracing::debug!("probing the head of the feed failed: {err}"),
            None => continue,
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PROBE_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A feed of `head` events served `page` at a time, counting the requests.
    struct Feed {
        head: u64,
        page: u64,
        requests: AtomicU64,
    }

    impl PageCount for Feed {
        async fn events_at(&self, offset: u64) -> Result<u64, FetchError> {
            self.requests.fetch_add(1, Ordering::Relaxed);
            Ok(self.head.saturating_sub(offset).min(self.page))
        }
    }

    fn find(head: u64, page: u64, known: u64) -> (u64, u64) {
        let feed = Feed {
            head,
            page,
            requests: AtomicU64::new(0),
        };
        let found = futures_util::FutureExt::now_or_never(find_head(&feed, known))
            .and_then(Result::ok)
            .unwrap_or(u64::MAX);
        (found, feed.requests.load(Ordering::Relaxed))
    }

    #[test]
    fn the_head_is_found_exactly_in_a_few_requests() {
        for head in [0, 1, 19, 20, 21, 1023, 1024, 1025, 8980, 100_000, 1_234_567] {
            for page in [1, 20, 1000] {
                for known in [0, head / 3, head] {
                    let (found, requests) = find(head, page, known);
                    assert_eq!(found, head, "head {head}, page {page}, known {known}");
                    // Doubling up to past the head, then bisecting the last step.
                    let bits = 64 - head.max(FIRST_STEP).leading_zeros() as u64;
                    assert!(
                        requests <= 2 * bits + 2,
                        "head {head}, page {page}, known {known}: {requests} requests"
                    );
                }
            }
        }
        // A feed of 100,000 Flux events (20 a page) costs about twenty page requests.
        let (_, requests) = find(100_000, 20, 0);
        assert!(requests <= 20, "{requests}");
    }

    /// A feed whose pages are sometimes short before the head (a server that caps pages by
    /// bytes): the short page is checked, never taken for the head.
    struct Ragged {
        head: u64,
    }

    impl PageCount for Ragged {
        async fn events_at(&self, offset: u64) -> Result<u64, FetchError> {
            let full = if offset % 7 == 3 { 5 } else { 20 };
            Ok(self.head.saturating_sub(offset).min(full))
        }
    }

    #[test]
    fn a_short_page_before_the_head_is_not_taken_for_it() {
        for head in [50, 1000, 4321, 99_999] {
            let found = futures_util::FutureExt::now_or_never(find_head(&Ragged { head }, 0))
                .and_then(Result::ok);
            assert_eq!(found, Some(head));
        }
    }
}
