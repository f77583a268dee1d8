//! The feed's pages, read in order from a start offset on by a task of their own that keeps the
//! next ones ready, so that body requests never drain at a page boundary waiting for a page; at
//! the head, the feed is polled, and each poll reads the last event read again to notice a feed
//! that shrank or was rewritten under a running daemon. Pages are handed on in chunks of at most
//! CHUNK entries, each taken from the feed's budget before it is made, as is a large page's
//! bytes while it is read; no page is read while the budget is spent.
//!
//! While pages come back full, the offsets of the next ones are known (offset + page length):
//! up to `page_lookahead` of them are asked for at once and taken in order, so that a feed
//! across a network costs a round trip per `page_lookahead` pages, not per page. A page that
//! comes back short or empty ends the run, and what was asked for past it is dropped unread.
//! Only small pages are read ahead (under 1 MiB, as the last one was), and only while the
//! budget has room.
//!
//! A feed paged by next links or cursors is read by `pages/named.rs` instead: each page is asked
//! for at the place the one before named, and the page holding the last event read is read
//! again at each poll.

mod named;

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::task::AbortOnDropHandle;

use super::budget::{Budget, Held};
use super::retry::retry;
use super::ReadPolicy;
use crate::event::PagePlace;
use crate::feed::error::{FetchError, FetchErrorKind, FetchTarget};
use crate::feed::page::{Page, PageEntry};
use crate::feed::FeedClient;
use crate::monitor::{FeedMonitor, ReaderPhase};

/// How many chunks wait for the body fetches (the page reader makes one more, then waits).
const CHUNKS_AHEAD: usize = 2;
/// The most entries in a chunk.
const CHUNK: usize = 1000;

/// Entries of a page, each with its offset, and what they hold of the budget; none at the head.
pub(super) struct Chunk {
    pub(super) entries: Vec<(u64, PageEntry)>,
    pub(super) held: Option<Held>,
}

/// A chunk of the feed, or the error that ends the pages.
pub(super) type PageRead = Result<Chunk, FetchError>;

/// Reads a feed's pages in order, from a start offset on, and follows the feed at its head.
pub(super) struct PageReader {
    feed: String,
    client: FeedClient,
    monitor: Arc<FeedMonitor>,
    reader: usize,
    policy: ReadPolicy,
    budget: Arc<Budget>,
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
    /// Pages asked for ahead, in offset order, the first at `offset`.
    ahead: VecDeque<PageAhead>,
    /// How many entries a full page of this feed has: the most a page had so far.
    full_page: usize,
    /// Changes when the live stream says the feed moved.
    moved: Option<tokio::sync::watch::Receiver<u64>>,
    /// On a feed paged by links or cursors, where its pages are.
    named: Option<named::NamedPages>,
}

/// A page read, with the offset of its first entry, the feed's page slot (held until the page
/// is read) and, on a feed paged by links or cursors, where the page is.
struct FetchedPage {
    first_offset: u64,
    page: Page,
    slot: Option<OwnedSemaphorePermit>,
    place: Option<Arc<PagePlace>>,
}

/// A page asked for before its turn.
struct PageAhead {
    offset: u64,
    fetch: AbortOnDropHandle<Result<Page, FetchError>>,
}

impl PageReader {
    /// Reads from `start` on, knowing that the feed had events below `known_end`; on a feed
    /// paged by links or cursors, from the page at `start_page` (the first if None).
    pub(super) fn new(
        feed: String,
        client: FeedClient,
        (monitor, reader): (Arc<FeedMonitor>, usize),
        policy: ReadPolicy,
        budget: Arc<Budget>,
        (start, known_end, start_page): (u64, u64, Option<PagePlace>),
        moved: Option<tokio::sync::watch::Receiver<u64>>,
    ) -> PageReader {
        let named = client
            .paging()
            .follows_pages()
            .then(|| named::NamedPages::starting_at(start_page));
        PageReader {
            feed,
            client,
            monitor,
            reader,
            policy,
            budget,
            offset: start,
            known_end,
            last_read: None,
            idle: false,
            reported_head: false,
            shrunk_polls: 0,
            ahead: VecDeque::new(),
            full_page: 0,
            moved,
            named,
        }
    }

    /// The page asked for ahead at `offset`, once it has come back; None if there is none
    /// (what was asked for at other offsets is dropped).
    async fn take_ahead(&mut self, offset: u64) -> Option<Result<Page, FetchError>> {
        while self
            .ahead
            .front()
            .is_some_and(|ahead| ahead.offset < offset)
        {
            self.ahead.pop_front();
        }
        match self.ahead.front() {
            Some(ahead) if ahead.offset == offset => {}
            _ => {
                self.ahead.clear();
                return None;
            }
        }
        let ahead = self.ahead.pop_front()?;
        // A task that did not finish (it cannot panic) is asked again in turn.
        ahead.fetch.await.ok()
    }

    /// At the head with `live = "long-poll"`: asks for the page after the head, which the feed
    /// holds until events come or `wait` passes; the page, if events came. A feed that answers
    /// at once with nothing does not hold requests: the poll interval is waited instead.
    async fn long_poll(&mut self, wait: std::time::Duration) -> Option<Page> {
        let started = tokio::time::Instant::now();
        let at = crate::feed::PageAt::Offset(self.offset);
        match self.client.fetch_page_at(at, Some(wait)).await {
            Ok(page) if !page.is_empty() => return Some(page),
            Ok(_) if started.elapsed() >= wait / 2 => return None,
            Ok(_) => {}
            Err(err) => self.monitor.failed(&err),
        }
        self.wait_at_head().await;
        None
    }

    /// After a page of `len` entries, of which `small` says it was under 1 MiB: while pages
    /// come back full, keeps up to `page_lookahead` of the next ones asked for.
    fn read_ahead(&mut self, len: usize, small: bool) {
        self.full_page = self.full_page.max(len);
        if !small || len < self.full_page || self.policy.page_lookahead <= 1 {
            // A short page: the head is near, and the offsets after it are not known.
            self.ahead.clear();
            return;
        }
        let full = self.full_page as u64;
        if self.ahead.front().is_some_and(|a| a.offset != self.offset) {
            self.ahead.clear();
        }
        let mut next = self
            .ahead
            .back()
            .map_or(self.offset, |last| last.offset + full);
        while self.ahead.len() < self.policy.page_lookahead && self.budget.has_room() {
            let client = self.client.clone();
            let fetch = tokio::spawn(async move { client.fetch_page(next).await });
            self.ahead.push_back(PageAhead {
                offset: next,
                fetch: AbortOnDropHandle::new(fetch),
            });
            next += full;
        }
    }

    /// The next page, empty when the feed has nothing new (the next call then waits a poll
    /// interval). Retries failures until it has an answer; an error is one that is not retried
    /// (the feed was rewritten), and the end of the pages.
    async fn next_page(&mut self) -> Result<FetchedPage, FetchError> {
        if self.named.is_some() {
            return self.next_named_page().await;
        }
        let mut waited = None;
        if self.idle {
            match self.policy.long_poll {
                Some(wait) => waited = self.long_poll(wait).await,
                None => self.wait_at_head().await,
            }
        }
        loop {
            // A page a long-poll brought is the next one, read without the check of the last
            // event, which the next poll at the head makes.
            let verify = self
                .last_read
                .clone()
                .filter(|_| self.idle && waited.is_none());
            let fetch_at = verify.as_ref().map_or(self.offset, |(at, _)| *at);
            let ahead = match (waited.take(), &verify) {
                (Some(page), _) => Some(Ok(page)),
                (None, Some(_)) => {
                    self.ahead.clear();
                    None
                }
                (None, None) => self.take_ahead(fetch_at).await,
            };
            let (mut page, slot) = match ahead {
                Some(Ok(page)) => (page, None),
                failed => {
                    if let Some(Err(err)) = failed {
                        if !err.kind.is_retried() {
                            return Err(err);
                        }
                        // Asked for again below, with backoff.
                        self.monitor.failed(&err);
                    }
                    let slot = self.budget.page_slot().await;
                    let client = &self.client;
                    let page = retry(&self.monitor, &self.policy.backoff, || {
                        client.fetch_page(fetch_at)
                    })
                    .await?;
                    (page, slot)
                }
            };
            if page.is_empty() && fetch_at < self.known_end {
                drop(slot);
                self.shrunk(fetch_at).await;
                continue;
            }
            self.shrunk_polls = 0;
            let mut first_offset = fetch_at;
            if let Some(verified) = &verify {
                if verified_skipped(verified, &mut page)? {
                    first_offset += 1;
                }
            }
            if page.is_empty() {
                return Ok(self.at_head(page, slot));
            }
            self.reading(first_offset, &page);
            if verify.is_none() {
                self.read_ahead(page.len(), page.bytes_held() == 0);
            }
            return Ok(FetchedPage {
                first_offset,
                page,
                slot,
                place: None,
            });
        }
    }

    /// Waits out the poll interval at the head, or until the live stream says the feed moved.
    async fn wait_at_head(&mut self) {
        crate::feed::live::wait_at_head(self.policy.poll_interval, self.moved.as_mut()).await;
    }

    /// The feed has no event at `fetch_at`, below an event it had: perhaps a feed server
    /// restarted and not yet reloaded. Reported, and waited for with backoff; if other events
    /// come back instead, the rewrite check halts.
    async fn shrunk(&mut self, fetch_at: u64) {
        let shrank = FetchErrorKind::Shrunk {
            head: fetch_at,
            last_known: self.known_end.saturating_sub(1),
        }
        .fetching(FetchTarget::Page, format!("page at offset {fetch_at}"));
        self.monitor.failed(&shrank);
        let delay = self.policy.backoff.delay(self.shrunk_polls, None);
        self.shrunk_polls = self.shrunk_polls.saturating_add(1);
        tokio::time::sleep(delay).await;
    }

    /// Nothing new: the reader is at the head.
    fn at_head(&mut self, page: Page, slot: Option<OwnedSemaphorePermit>) -> FetchedPage {
        self.monitor.reached_head(self.offset);
        self.monitor.set_phase(self.reader, ReaderPhase::Live);
        self.idle = true;
        if !self.reported_head {
            self.reported_head = true;
            tracing::info!(feed = %self.feed, offset = self.offset, "at the head of the feed");
        }
        FetchedPage {
            first_offset: self.offset,
            page,
            slot,
            place: None,
        }
    }

    /// The entries of `page`, from `first_offset` on, are the next ones read.
    fn reading(&mut self, first_offset: u64, page: &Page) {
        self.idle = false;
        self.offset = first_offset + page.len() as u64;
        self.known_end = self.known_end.max(self.offset);
        if let Some(last) = page.last_id() {
            self.last_read = Some((self.offset - 1, last));
        }
        self.monitor.saw_feed_up_to(self.offset);
        if self.reported_head {
            // New events after the head: reading them counts as catching up.
            self.monitor.set_phase(self.reader, ReaderPhase::CatchingUp);
        }
    }
}

/// Checks that `page` starts with the event last read, `verified`, and takes it off: true if it
/// did. An error if another event is there (the feed was rewritten); false if the page is empty.
fn verified_skipped(verified: &(u64, String), page: &mut Page) -> Result<bool, FetchError> {
    let (offset, id) = verified;
    match page.first_id() {
        Some(first) if first != *id => Err(FetchErrorKind::Rewritten {
            offset: *offset,
            expected: id.clone(),
            found: first,
        }
        .fetching(FetchTarget::Page, format!("page at offset {offset}"))),
        Some(_) => {
            let _ = page.take(1);
            Ok(true)
        }
        None => Ok(false),
    }
}

impl PageReader {
    /// Reads pages in a task of its own, keeping up to CHUNKS_AHEAD chunks of them ready. The
    /// chunks end after an error. The task ends when the receiver goes or its handle is dropped.
    pub(super) fn spawn(mut self) -> (mpsc::Receiver<PageRead>, AbortOnDropHandle<()>) {
        let (sender, receiver) = mpsc::channel(CHUNKS_AHEAD);
        let task = tokio::spawn(async move {
            loop {
                self.budget.room().await;
                let FetchedPage {
                    first_offset,
                    mut page,
                    slot: _slot,
                    place,
                } = match self.next_page().await {
                    Ok(read) => read,
                    Err(err) => {
                        let _ = sender.send(Err(err)).await;
                        return;
                    }
                };
                if page.is_empty() {
                    let head = Chunk {
                        entries: Vec::new(),
                        held: None,
                    };
                    if sender.send(Ok(head)).await.is_err() {
                        return;
                    }
                    continue;
                }
                // A large page's bytes are held while its entries are made.
                let page_held = self.budget.take(page.bytes_held());
                let mut offset = first_offset;
                while !page.is_empty() {
                    self.budget.room_besides(Some(&page_held)).await;
                    let chunk = match page.take(CHUNK) {
                        Ok(mut entries) => {
                            if place.is_some() {
                                for entry in &mut entries {
                                    entry.page = place.clone();
                                }
                            }
                            let weight = entries.iter().map(PageEntry::weight).sum();
                            let count = entries.len() as u64;
                            let chunk = Chunk {
                                entries: (offset..).zip(entries).collect(),
                                held: Some(self.budget.take(weight)),
                            };
                            offset += count;
                            Ok(chunk)
                        }
                        Err(reason) => Err(FetchErrorKind::Unreadable(reason)
                            .fetching(FetchTarget::Page, format!("page at offset {offset}"))),
                    };
                    let last = chunk.is_err();
                    if sender.send(chunk).await.is_err() || last {
                        return;
                    }
                }
            }
        });
        (receiver, AbortOnDropHandle::new(task))
    }
}
