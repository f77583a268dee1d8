//! The feed's pages, read in order from a start offset on by a task of their own that keeps the
//! next ones ready, so that body requests never drain at a page boundary waiting for a page; at
//! the head, the feed is polled, and each poll reads the last event read again to notice a feed
//! that shrank or was rewritten under a running daemon.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use super::retry::retry;
use super::ReadPolicy;
use crate::feed::error::{FetchError, FetchErrorKind, FetchTarget};
use crate::feed::page::PageEntry;
use crate::feed::FeedClient;
use crate::monitor::{FeedMonitor, ReaderPhase};

/// How many read pages wait for the body fetches (the page reader reads one more, then waits).
const PAGES_AHEAD: usize = 2;

/// A page of the feed, each event with its offset (none at the head), or the error that ends
/// the pages.
pub(super) type PageRead = Result<Vec<(u64, PageEntry)>, FetchError>;

/// Reads a feed's pages in order, from a start offset on, and follows the feed at its head.
pub(super) struct PageReader {
    feed: String,
    client: FeedClient,
    monitor: Arc<FeedMonitor>,
    reader: usize,
    policy: ReadPolicy,
    /// The offset of the next page.
    offset: u64,
    /// The feed is known to have events below this offset (a checkpoint or a page said so); an
    /// empty page below it means the feed shrank.
    known_end: u64,
    /// The last event read. Idle at the head, each poll reads it again, so that a feed which
    /// shrank or was rewritten under a running daemon is noticed at once, not at the next
    /// restart.
    last_read: Option<(u64, String)>,
    /// Whether the last poll found nothing new.
    idle: bool,
    reported_head: bool,
    shrunk_polls: u32,
}

impl PageReader {
    /// Reads from `start` on, knowing that the feed had events below `known_end`.
    pub(super) fn new(
        feed: String,
        client: FeedClient,
        (monitor, reader): (Arc<FeedMonitor>, usize),
        policy: ReadPolicy,
        start: u64,
        known_end: u64,
    ) -> PageReader {
        PageReader {
            feed,
            client,
            monitor,
            reader,
            policy,
            offset: start,
            known_end,
            last_read: None,
            idle: false,
            reported_head: false,
            shrunk_polls: 0,
        }
    }

    /// The next page's events, each with its offset; none when the feed has nothing new (the
    /// next call then waits a poll interval). Retries failures until it has an answer; an
    /// error is one that is not retried (the feed was rewritten), and the end of the pages.
    async fn next_page(&mut self) -> PageRead {
        if self.idle {
            tokio::time::sleep(self.policy.poll_interval).await;
        }
        loop {
            let verify = self.last_read.clone().filter(|_| self.idle);
            let fetch_at = verify.as_ref().map_or(self.offset, |(at, _)| *at);
            let client = &self.client;
            let mut entries = retry(&self.monitor, &self.policy.backoff, || {
                client.fetch_page(fetch_at)
            })
            .await?;
            if entries.is_empty() && fetch_at < self.known_end {
                // Perhaps a feed server restarted and not yet reloaded: wait for the events to
                // come back. If others come back instead, the rewrite check halts.
                let shrank = FetchErrorKind::Shrunk {
                    head: fetch_at,
                    last_known: self.known_end - 1,
                }
                .fetching(FetchTarget::Page, format!("page at offset {fetch_at}"));
                self.monitor.failed(&shrank);
                let delay = self.policy.backoff.delay(self.shrunk_polls, None);
                self.shrunk_polls = self.shrunk_polls.saturating_add(1);
                tokio::time::sleep(delay).await;
                continue;
            }
            self.shrunk_polls = 0;
            let mut first_offset = fetch_at;
            if let Some((verified_offset, verified_id)) = &verify {
                match entries.first() {
                    Some(first) if first.meta.event_id != *verified_id => {
                        return Err(FetchErrorKind::Rewritten {
                            offset: *verified_offset,
                            expected: verified_id.clone(),
                            found: first.meta.event_id.clone(),
                        }
                        .fetching(
                            FetchTarget::Page,
                            format!("page at offset {verified_offset}"),
                        ));
                    }
                    Some(_) => {
                        entries.remove(0);
                        first_offset += 1;
                    }
                    // Handled above: an empty page below a known event is a shrink.
                    None => {}
                }
            }
            let Some(last) = entries.last() else {
                self.monitor.reached_head(self.offset);
                self.monitor.set_phase(self.reader, ReaderPhase::Live);
                self.idle = true;
                if !self.reported_head {
                    self.reported_head = true;
                    tracing::info!(feed = %self.feed, offset = self.offset, "at the head of the feed");
                }
                return Ok(Vec::new());
            };
            self.idle = false;
            self.offset = first_offset + entries.len() as u64;
            self.known_end = self.known_end.max(self.offset);
            self.last_read = Some((self.offset - 1, last.meta.event_id.clone()));
            self.monitor.saw_feed_up_to(self.offset);
            if self.reported_head {
                // New events after the head: reading them counts as catching up.
                self.monitor.set_phase(self.reader, ReaderPhase::CatchingUp);
            }
            return Ok((first_offset..).zip(entries).collect());
        }
    }
}

impl PageReader {
    /// Reads pages in a task of its own, keeping up to PAGES_AHEAD of them ready. The pages end
    /// after an error. The task ends when the receiver goes or its handle is dropped.
    pub(super) fn spawn(mut self) -> (mpsc::Receiver<PageRead>, AbortOnDropHandle<()>) {
        let (sender, receiver) = mpsc::channel(PAGES_AHEAD);
        let task = tokio::spawn(async move {
            loop {
                let page = self.next_page().await;
                let last = page.is_err();
                if sender.send(page).await.is_err() || last {
                    break;
                }
            }
        });
        (receiver, AbortOnDropHandle::new(task))
    }
}
