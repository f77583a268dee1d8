//! One feed's reader: a stream of the feed's events (pages read in order, the bodies its
//! projections need fetched `body_concurrency` at a time across page boundaries), gathered into
//! batches that the writer commits while the next batch is read. A batch grows while the writer
//! is busy, so catching up commits large transactions and following the head commits at once.
//!
//! The pipeline never decides what is applied: it starts from the committed checkpoints, and after
//! any failure it starts again from them. Fetch failures, and a feed that shrank below a
//! checkpoint, are retried forever with backoff; only a feed that contradicts a checkpoint (the
//! event there has another id: rewritten) halts the pipeline.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::{stream, FutureExt, Stream, StreamExt};
use tokio::sync::{mpsc, watch, Notify, Semaphore, SemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::event::{Event, Payload};
use crate::feed::error::{FetchError, FetchErrorKind};
use crate::feed::page::{EntryBody, PageEntry};
use crate::feed::{Backoff, FeedClient};
use crate::monitor::{FeedMonitor, ReaderPhase};
use crate::writer::{ApplyError, Batch, BatchOutcome, PendingBatch, WriterHandle};

/// The most events committed in one transaction. Larger transactions write each page of the
/// read models once for more events (the bank projections: 33k events/s at 1,000 a
/// transaction, 65k at 8,000); this bounds the memory of a batch and the time a pause or a stop
/// waits for the batch in flight.
pub const MAX_BATCH_EVENTS: usize = 8000;
/// The most bytes of bodies in one batch, for feeds with large events.
const MAX_BATCH_BYTES: usize = 8 << 20;
/// How long the first event of a batch waits for more while the feed is read (at the head of
/// the feed a batch goes at once): a slow or failing feed still commits what it has read. Long
/// enough for a reader catching up to fill a batch.
const MAX_BATCH_WAIT: Duration = Duration::from_millis(500);

/// How many read pages wait for the body fetches (the page reader reads one more, then waits).
const PAGES_AHEAD: usize = 2;
/// The steps kept in order, as a multiple of `body_concurrency`, the requests in flight: the
/// answers behind a slow one at the head of the feed wait for it while new requests go out.
const ANSWERS_AHEAD: usize = 4;
/// Past this many bytes of answers waiting in order, only the `body_concurrency` steps after
/// the one the feed waits for start requests (see RequestGate).
const MAX_BYTES_AHEAD: usize = 8 << 20;

/// A page of the feed, each event with its offset (none at the head), or the stop that ends the
/// pages.
type PageRead = Result<Vec<(u64, PageEntry)>, Stop>;

/// A projection read by this pipeline, as far as the pipeline needs to know it.
#[derive(Debug, Clone)]
pub struct Member {
    pub projection: String,
    pub event_types: HashSet<String>,
    pub next_offset: u64,
}

/// How a feed is read.
#[derive(Debug, Clone)]
pub struct ReadPolicy {
    pub poll_interval: Duration,
    pub body_concurrency: usize,
    pub backoff: Backoff,
}

pub struct Pipeline {
    feed: String,
    client: FeedClient,
    policy: ReadPolicy,
    writer: WriterHandle,
    members: Vec<Member>,
    /// Whether the feed is paused; the supervisor owns the value.
    paused: watch::Receiver<bool>,
    monitor: Arc<FeedMonitor>,
    /// This reader's id in `monitor`.
    reader: usize,
    shutdown: CancellationToken,
    passed_over: u64,
    /// Batches committed.
    batches: u64,
    /// The feed's failures counted when the reader last took stock (see `note_recovery`).
    failures_seen: u64,
    applied: u64,
}

/// The pipeline's links to the rest of the daemon: how it is steered and where it reports.
pub struct Steering {
    pub paused: watch::Receiver<bool>,
    pub monitor: Arc<FeedMonitor>,
    pub shutdown: CancellationToken,
}

/// Why `follow` returned.
enum Stop {
    Shutdown,
    /// The feed was paused; the batch in flight has been settled.
    Paused,
    /// Start again from the committed checkpoints after a delay (the database failed).
    Resync(String),
    /// The feed cannot be read correctly any more; an operator must look.
    Halt(String),
    /// A projection halted: start again at once for the others.
    Restart,
}

impl Pipeline {
    pub fn new(
        feed: String,
        client: FeedClient,
        policy: ReadPolicy,
        writer: WriterHandle,
        members: Vec<Member>,
        steering: Steering,
    ) -> Pipeline {
        let reader = steering.monitor.add_reader();
        Pipeline {
            feed,
            client,
            policy,
            writer,
            members,
            paused: steering.paused,
            monitor: steering.monitor,
            reader,
            shutdown: steering.shutdown,
            passed_over: 0,
            batches: 0,
            failures_seen: 0,
            applied: 0,
        }
    }

    pub async fn run(mut self) {
        let mut resyncs = 0;
        let final_phase = loop {
            if !self.wait_while_paused().await {
                break ReaderPhase::Stopped;
            }
            let applied_before = self.applied;
            let stop = self.follow().await;
            if self.applied > applied_before {
                // Progress was made since the last failure: back off from the start again.
                resyncs = 0;
            }
            match stop {
                Stop::Shutdown => break ReaderPhase::Stopped,
                Stop::Paused | Stop::Restart => continue,
                Stop::Halt(reason) => {
                    tracing::error!(feed = %self.feed, "feed halted: {reason}");
                    break ReaderPhase::Halted(reason);
                }
                Stop::Resync(reason) if self.shutdown.is_cancelled() => {
                    tracing::warn!(feed = %self.feed, "batch not committed while stopping, nothing of it applied; it is read again at the next start: {reason}");
                    break ReaderPhase::Stopped;
                }
                Stop::Resync(reason) => {
                    let delay = self.policy.backoff.delay(resyncs, None);
                    resyncs = resyncs.saturating_add(1);
                    tracing::error!(feed = %self.feed, ?delay, "batch not committed, nothing of it applied; retrying from the checkpoints: {reason}");
                    self.monitor
                        .commit_failed(format!("batch not committed: {reason}"));
                    // A pause ends the wait early; the top of the loop parks.
                    if let Some(Stop::Shutdown) = self.sleep(delay).await {
                        break ReaderPhase::Stopped;
                    }
                }
            }
        };
        self.monitor.set_phase(self.reader, final_phase);
        tracing::info!(
            feed = %self.feed,
            applied = self.applied,
            passed_over = self.passed_over,
            batches = self.batches,
            "feed reader stopped"
        );
    }

    /// Waits `delay`, unless the daemon shuts down or the feed is paused first.
    async fn sleep(&self, delay: Duration) -> Option<Stop> {
        let mut paused = self.paused.clone();
        tokio::select! {
            _ = self.shutdown.cancelled() => Some(Stop::Shutdown),
            _ = paused.wait_for(|&p| p) => Some(Stop::Paused),
            _ = tokio::time::sleep(delay) => None,
        }
    }

    /// Parks while the feed is paused. False if the daemon is shutting down.
    async fn wait_while_paused(&mut self) -> bool {
        if !*self.paused.borrow() {
            return true;
        }
        self.monitor.set_phase(self.reader, ReaderPhase::Paused);
        tracing::info!(feed = %self.feed, "paused");
        let shutdown = self.shutdown.clone();
        tokio::select! {
            _ = shutdown.cancelled() => false,
            // The supervisor holds the sender as long as the pipeline runs.
            resumed = self.paused.wait_for(|&p| !p) => {
                if resumed.is_ok() {
                    tracing::info!(feed = %self.feed, "resumed");
                }
                resumed.is_ok()
            }
        }
    }

    /// The lowest checkpoint's previous event is read again, so the writer can check that the
    /// feed still has the event the checkpoint recorded.
    fn start_offset(&self) -> u64 {
        self.members
            .iter()
            .map(|member| member.next_offset)
            .min()
            .unwrap_or(0)
            .saturating_sub(1)
    }

    async fn follow(&mut self) -> Stop {
        if self.members.is_empty() {
            return Stop::Halt("every projection on this feed has halted".into());
        }
        self.monitor.set_phase(self.reader, ReaderPhase::CatchingUp);
        let (pages, mut page_reading) = self.read_pages();
        let mut reads = Box::pin(self.reads(pages));
        let mut gathering = Gathering::default();
        let mut pending: Option<PendingBatch> = None;
        self.failures_seen = self.monitor.streak_failures();
        let shutdown = self.shutdown.clone();
        let mut paused = self.paused.clone();
        let stop = 'read: loop {
            // Take what has been read already, then hand the batch to the writer if it is due
            // and the writer has committed the previous one.
            while gathering.has_room() {
                let Some(next) = reads.next().now_or_never() else {
                    break;
                };
                if let Err(stop) = self.take(next, &mut gathering) {
                    break 'read stop;
                }
            }
            if pending.is_none() && gathering.is_due(Instant::now()) {
                self.note_recovery();
                pending = Some(self.submit(gathering.take()).await);
            }
            let waiting_for_more = pending.is_none() && !gathering.is_empty();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Stop::Shutdown,
                // Mapped: the guard it returns must not be held while the loop goes on.
                _ = paused.wait_for(|&p| p).map(|_| ()) => break Stop::Paused,
                outcome = committed(&mut pending), if pending.is_some() => {
                    pending = None;
                    let members = self.members.len();
                    if let Err(stop) = self.settle(outcome) {
                        break stop;
                    }
                    if self.members.len() != members {
                        // A projection halted: read on for the others alone.
                        break Stop::Restart;
                    }
                }
                next = reads.next(), if gathering.has_room() => {
                    if let Err(stop) = self.take(next, &mut gathering) {
                        break stop;
                    }
                }
                _ = tokio::time::sleep_until(gathering.deadline()), if waiting_for_more => {}
            }
        };
        // Dropping the fetches in flight is safe: nothing of them was applied. No request
        // starts while the batch in flight settles: the page reader's task may be in the middle
        // of a request, so it is waited for until it has stopped.
        drop(reads);
        page_reading.abort();
        let _ = (&mut page_reading).await;
        self.finish(pending, stop).await
    }

    /// Reads the feed's pages from the start offset on, in a task of its own that keeps up to
    /// PAGES_AHEAD pages ready: so the body requests never drain at a page boundary waiting for
    /// the next page. The pages end after an error (a stop). The task ends when the receiver
    /// goes or its handle is dropped.
    fn read_pages(&self) -> (mpsc::Receiver<PageRead>, AbortOnDropHandle<()>) {
        let start = self.start_offset();
        let mut pages = PageReader {
            feed: self.feed.clone(),
            client: self.client.clone(),
            monitor: self.monitor.clone(),
            reader: self.reader,
            policy: self.policy.clone(),
            offset: start,
            known_end: self
                .members
                .iter()
                .map(|m| m.next_offset)
                .max()
                .unwrap_or(0),
            last_read: None,
            idle: false,
            reported_head: false,
            shrunk_polls: 0,
        };
        let (sender, receiver) = mpsc::channel(PAGES_AHEAD);
        let task = tokio::spawn(async move {
            loop {
                let page = pages.next_page().await;
                let last = page.is_err();
                if sender.send(page).await.is_err() || last {
                    break;
                }
            }
        });
        (receiver, AbortOnDropHandle::new(task))
    }

    /// The feed's events in order, from the pages read by `read_pages`, with the bodies some
    /// member still needs, and a mark each time a poll finds nothing new. Body requests run
    /// `body_concurrency` at a time across page boundaries, within ANSWERS_AHEAD times as many
    /// steps kept in order and MAX_BYTES_AHEAD of answers waiting (RequestGate): a slow answer
    /// holds one request, not all of them (with the window equal to the requests in flight, 8%
    /// slower on the Flux catch-up). The stream waits at the head of the feed and retries
    /// failures; it ends only with a stop.
    fn reads(
        &self,
        pages: mpsc::Receiver<PageRead>,
    ) -> impl Stream<Item = Result<Read, Stop>> + Send + 'static {
        let gate = Arc::new(RequestGate::new(
            self.policy.body_concurrency,
            MAX_BYTES_AHEAD,
        ));
        let bodies = Arc::new(BodyReader {
            client: self.client.clone(),
            monitor: self.monitor.clone(),
            backoff: self.policy.backoff,
            members: self.members.clone(),
        });
        let yielded = gate.clone();
        let mut next_step = 0u64;
        stream::unfold(pages, |mut pages| async move {
            pages.recv().await.map(|page| (page, pages))
        })
        .flat_map(move |page| {
            let steps = match page {
                Ok(entries) if entries.is_empty() => vec![Step::Head],
                Ok(entries) => bodies.steps(entries),
                Err(stop) => vec![Step::Stop(stop)],
            };
            let first = next_step;
            next_step += steps.len() as u64;
            let bodies = bodies.clone();
            let gate = gate.clone();
            stream::iter(steps.into_iter().zip(first..)).map(move |(step, index)| {
                let bodies = bodies.clone();
                let gate = gate.clone();
                async move {
                    // The bytes of a fetched answer, held until it is yielded.
                    let (bytes, reads) = match step {
                        Step::Ready(events) => (
                            0,
                            events
                                .into_iter()
                                .map(|(offset, entry, wanted)| {
                                    Ok(Read::Event(into_fetched(offset, entry, None, wanted)))
                                })
                                .collect(),
                        ),
                        Step::Fetch(offset, entry) => {
                            let fetched = {
                                let _request = gate.enter(index).await;
                                bodies.fetch(offset, entry).await
                            };
                            gate.answered(fetched.body_bytes);
                            (fetched.body_bytes, vec![Ok(Read::Event(fetched))])
                        }
                        Step::Head => (0, vec![Ok(Read::Head)]),
                        Step::Stop(stop) => (0, vec![Err(stop)]),
                    };
                    (index, bytes, reads)
                }
            })
        })
        .buffered(self.policy.body_concurrency * ANSWERS_AHEAD)
        .flat_map(move |(index, bytes, reads)| {
            yielded.yielded(index, bytes);
            stream::iter(reads)
        })
    }

    /// Takes what the feed stream yielded into account.
    fn take(
        &mut self,
        next: Option<Result<Read, Stop>>,
        gathering: &mut Gathering,
    ) -> Result<(), Stop> {
        let fetched = match next {
            Some(Ok(Read::Event(fetched))) => fetched,
            Some(Ok(Read::Head)) => {
                gathering.at_head = true;
                self.note_recovery();
                return Ok(());
            }
            Some(Err(stop)) => return Err(stop),
            None => {
                return Err(Stop::Halt(
                    "the feed reader ended unexpectedly (a bug)".into(),
                ))
            }
        };
        let event = &fetched.event;
        // The event read again before the lowest checkpoint was counted already.
        let first_new = self.members.iter().map(|m| m.next_offset).min();
        let handled = self
            .members
            .iter()
            .any(|m| m.event_types.contains(&event.event_type));
        if !handled && first_new.is_some_and(|first| event.offset >= first) {
            self.passed_over += 1;
        }
        gathering.push(fetched);
        Ok(())
    }

    /// A batch's worth of reading, or a poll, without a new failure: the feed works again.
    fn note_recovery(&mut self) {
        let failures = self.monitor.streak_failures();
        if failures == self.failures_seen {
            self.monitor.recovered();
        }
        self.failures_seen = failures;
    }

    async fn submit(&self, events: Vec<Event>) -> PendingBatch {
        let batch = Batch {
            feed: self.feed.clone(),
            projections: self.members.iter().map(|m| m.projection.clone()).collect(),
            events,
        };
        self.writer.submit(batch).await
    }

    /// Ends `follow` with `stop`, once the batch in flight has committed (or failed, which
    /// then says how to go on).
    async fn finish(&mut self, pending: Option<PendingBatch>, stop: Stop) -> Stop {
        if let Some(mut pending) = pending {
            if let Err(failed) = self.settle(pending.outcome().await) {
                return failed;
            }
        }
        stop
    }

    /// Takes a batch's outcome into account.
    fn settle(&mut self, outcome: Result<BatchOutcome, ApplyError>) -> Result<(), Stop> {
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(err @ ApplyError::FeedRewritten { .. }) => return Err(Stop::Halt(err.to_string())),
            Err(err) => return Err(Stop::Resync(err.to_string())),
        };
        self.applied += outcome.applied as u64;
        self.batches += 1;
        self.monitor
            .committed(outcome.events, &outcome.checkpoints, &outcome.halted);
        if outcome.dead_lettered > 0 {
            tracing::warn!(
                feed = %self.feed,
                count = outcome.dead_lettered,
                "events could not be applied and were recorded in projector_dead_letters"
            );
        }
        for (projection, checkpoint) in &outcome.checkpoints {
            if let Some(member) = self
                .members
                .iter_mut()
                .find(|m| &m.projection == projection)
            {
                member.next_offset = checkpoint.next_offset;
            }
        }
        for halt in &outcome.halted {
            tracing::error!(
                feed = %self.feed,
                projection = %halt.projection,
                offset = halt.offset,
                event_id = %halt.event_id,
                event_type = %halt.event_type,
                "projection halted (on_error = \"stop\"): {}",
                halt.error
            );
            self.members.retain(|m| m.projection != halt.projection);
        }
        Ok(())
    }
}

/// The outcome of the batch in flight; never ready when there is none.
async fn committed(pending: &mut Option<PendingBatch>) -> Result<BatchOutcome, ApplyError> {
    match pending {
        Some(batch) => batch.outcome().await,
        None => std::future::pending().await,
    }
}

/// What the feed stream yields.
enum Read {
    Event(Fetched),
    /// A poll found nothing new: every event before this mark has been yielded.
    Head,
}

/// The events gathered for the next batch.
///
/// A batch is handed to the writer once it is due: full, or the reader has reached the head of
/// the feed, or its first event has waited MAX_BATCH_WAIT. So a reader that is behind commits
/// in large transactions (each page of the read models written once for many events), and one
/// at the head commits each new event at once.
#[derive(Default)]
struct Gathering {
    events: Vec<Event>,
    body_bytes: usize,
    /// When the first event was gathered.
    since: Option<Instant>,
    /// The reader reached the head of the feed since the last batch.
    at_head: bool,
}

impl Gathering {
    fn push(&mut self, fetched: Fetched) {
        self.since.get_or_insert_with(Instant::now);
        self.body_bytes += fetched.body_bytes;
        self.events.push(fetched.event);
    }

    fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    fn has_room(&self) -> bool {
        self.events.len() < MAX_BATCH_EVENTS && self.body_bytes < MAX_BATCH_BYTES
    }

    fn deadline(&self) -> Instant {
        self.since.unwrap_or_else(Instant::now) + MAX_BATCH_WAIT
    }

    fn is_due(&self, now: Instant) -> bool {
        !self.is_empty() && (!self.has_room() || self.at_head || now >= self.deadline())
    }

    fn take(&mut self) -> Vec<Event> {
        let events = std::mem::take(&mut self.events);
        *self = Gathering::default();
        events
    }
}

/// Runs `fetch` until it succeeds, waiting with backoff between attempts and reporting each
/// failure.
async fn retry<T, F, Fut>(monitor: &FeedMonitor, backoff: &Backoff, fetch: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, FetchError>>,
{
    let mut attempt = 0;
    loop {
        match fetch().await {
            Ok(value) => return value,
            Err(err) => {
                monitor.failed(&err);
                let delay = backoff.delay(attempt, err.kind.retry_after());
                attempt = attempt.saturating_add(1);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Reads a feed's pages in order, from a start offset on, and follows the feed at its head.
struct PageReader {
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
    /// The next page's events, each with its offset; none when the feed has nothing new (the
    /// next call then waits a poll interval). Retries failures until it has an answer. An
    /// error is the end: the feed was rewritten.
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
            .await;
            if entries.is_empty() && fetch_at < self.known_end {
                // Perhaps a feed server restarted and not yet reloaded: wait for the events to
                // come back. If others come back instead, the rewrite check halts.
                let shrank = FetchErrorKind::Shrunk {
                    head: fetch_at,
                    last_known: self.known_end - 1,
                }
                .fetching(format!("page at offset {fetch_at}"));
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
                    Some(first) if first.event_id != *verified_id => {
                        return Err(Stop::Halt(format!(
                            "the feed was rewritten: it had event {verified_id} at offset {verified_offset}, and now has {} there",
                            first.event_id
                        )));
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
                self.monitor.saw_feed_up_to(self.offset);
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
            self.last_read = Some((self.offset - 1, last.event_id.clone()));
            self.monitor.saw_feed_up_to(self.offset);
            if self.reported_head {
                // New events after the head: reading them counts as catching up.
                self.monitor.set_phase(self.reader, ReaderPhase::CatchingUp);
            }
            return Ok((first_offset..).zip(entries).collect());
        }
    }
}

/// One step of reading a page, in the page's order: events whose payloads are at hand (inline,
/// or not needed), or one body to fetch. An inline page is one step, not one per event: going
/// through the ordered futures event by event cost about 15% of the reader's CPU.
enum Step {
    /// Each event with whether some projection needs its payload.
    Ready(Vec<(u64, PageEntry, bool)>),
    Fetch(u64, PageEntry),
    Head,
    Stop(Stop),
}

fn steps(entries: Vec<(u64, PageEntry)>, wanted: impl Fn(u64, &PageEntry) -> bool) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut ready = Vec::new();
    for (offset, entry) in entries {
        let wanted = wanted(offset, &entry);
        if wanted && matches!(entry.body, EntryBody::At(_)) {
            if !ready.is_empty() {
                steps.push(Step::Ready(std::mem::take(&mut ready)));
            }
            steps.push(Step::Fetch(offset, entry));
        } else {
            ready.push((offset, entry, wanted));
        }
    }
    if !ready.is_empty() {
        steps.push(Step::Ready(ready));
    }
    steps
}

/// Fetches the bodies the members need (inline ones are at hand); the others are passed over
/// unread, or dropped.
struct BodyReader {
    client: FeedClient,
    monitor: Arc<FeedMonitor>,
    backoff: Backoff,
    members: Vec<Member>,
}

impl BodyReader {
    fn wanted(&self, offset: u64, entry: &PageEntry) -> bool {
        self.members.iter().any(|member| {
            offset >= member.next_offset && member.event_types.contains(&entry.event_type)
        })
    }

    fn steps(&self, entries: Vec<(u64, PageEntry)>) -> Vec<Step> {
        steps(entries, |offset, entry| self.wanted(offset, entry))
    }

    /// An event whose body is fetched, retried until it comes.
    async fn fetch(&self, offset: u64, entry: PageEntry) -> Fetched {
        let fetched = match &entry.body {
            EntryBody::At(url) => Some(
                retry(&self.monitor, &self.backoff, || {
                    self.client.fetch_body(&entry, url)
                })
                .await,
            ),
            // At hand: `steps` does not make it a fetch.
            EntryBody::Inline(_) => None,
        };
        into_fetched(offset, entry, fetched, true)
    }
}

/// The event of `entry` at `offset`, with the payload a projection needs: the `fetched` body
/// (and its size), else the entry's own if it is `wanted`.
fn into_fetched(
    offset: u64,
    entry: PageEntry,
    fetched: Option<(Payload, usize)>,
    wanted: bool,
) -> Fetched {
    let PageEntry {
        event_id,
        event_type,
        aggregate_id,
        aggregate_name,
        aggregate_version,
        created,
        body,
    } = entry;
    let (payload, body_bytes) = match (fetched, body) {
        (Some((payload, bytes)), _) => (Some(payload), bytes),
        (None, EntryBody::Inline(payload)) if wanted => {
            let bytes = payload.as_str().len();
            (Some(payload), bytes)
        }
        _ => (None, 0),
    };
    Fetched {
        event: Event {
            offset,
            event_id,
            event_type,
            aggregate_id,
            aggregate_name,
            aggregate_version,
            created,
            payload,
        },
        body_bytes,
    }
}

/// One event as read from the feed, and the size of its body.
struct Fetched {
    event: Event,
    body_bytes: usize,
}

/// When a step of the feed stream may request its body. At most `body_concurrency` requests
/// are in flight. A step among the `body_concurrency` after the one the feed waits for may
/// always start; one further ahead (the ordered window is ANSWERS_AHEAD times larger) only while
/// the answers waiting in order hold less than `max_bytes_ahead`. So small bodies get the whole
/// window, and large ones hold about what they held when the window was the requests in flight.
/// The step the feed waits for is always admitted, and a request slot is only ever held by a
/// request under way, so the stream cannot wait on itself.
struct RequestGate {
    in_flight: Semaphore,
    concurrency: u64,
    max_bytes_ahead: usize,
    window: Mutex<Window>,
    /// Notified each time a step is yielded.
    moved: Notify,
}

#[derive(Default)]
struct Window {
    /// The step the feed waits for: the next one yielded.
    next: u64,
    /// The bytes of the answers fetched and not yet yielded.
    bytes_waiting: usize,
}

impl RequestGate {
    fn new(concurrency: usize, max_bytes_ahead: usize) -> RequestGate {
        RequestGate {
            in_flight: Semaphore::new(concurrency),
            concurrency: concurrency as u64,
            max_bytes_ahead,
            window: Mutex::new(Window::default()),
            moved: Notify::new(),
        }
    }

    /// Waits until `step` may request its body and a request slot is free; the slot is held
    /// until the returned permit is dropped.
    async fn enter(&self, step: u64) -> Option<SemaphorePermit<'_>> {
        loop {
            // Registered before the check, so a step yielded in between is not missed.
            let mut moved = std::pin::pin!(self.moved.notified());
            moved.as_mut().enable();
            if self.admits(step) {
                break;
            }
            moved.await;
        }
        // Never closed, so a permit always comes.
        self.in_flight.acquire().await.ok()
    }

    fn admits(&self, step: u64) -> bool {
        let window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        step < window.next + self.concurrency || window.bytes_waiting < self.max_bytes_ahead
    }

    /// An answer of `bytes` came in, to wait for its turn.
    fn answered(&self, bytes: usize) {
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        window.bytes_waiting += bytes;
    }

    /// `step`, whose answer held `bytes` (0 if it made no request), has been yielded.
    fn yielded(&self, step: u64, bytes: usize) {
        {
            let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
            window.next = step + 1;
            window.bytes_waiting = window.bytes_waiting.saturating_sub(bytes);
        }
        self.moved.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_admits_steps_near_the_head_always_and_further_ones_while_few_bytes_wait() {
        let gate = RequestGate::new(2, 100);
        assert!(
            gate.admits(0) && gate.admits(1) && gate.admits(7),
            "nothing waits"
        );
        gate.answered(60);
        assert!(gate.admits(7), "under the bytes ahead");
        gate.answered(40);
        assert!(
            gate.admits(0) && gate.admits(1),
            "the head and the next may always go"
        );
        assert!(!gate.admits(2) && !gate.admits(7), "100 bytes wait");
        gate.yielded(0, 0);
        assert!(gate.admits(2) && !gate.admits(3), "the head moved by one");
        gate.yielded(1, 60);
        assert!(gate.admits(7), "40 bytes wait");
    }

    #[test]
    fn a_step_kept_out_by_the_gate_goes_once_the_head_moves() {
        let gate = RequestGate::new(1, 10);
        gate.answered(10);
        let mut far = Box::pin(gate.enter(3));
        assert!((&mut far).now_or_never().is_none(), "10 bytes wait");
        gate.yielded(0, 0);
        assert!(
            (&mut far).now_or_never().is_none(),
            "still 10 bytes and two steps ahead"
        );
        gate.yielded(1, 10);
        let permit = (&mut far).now_or_never();
        assert!(matches!(permit, Some(Some(_))), "nothing waits: it goes");
        drop(permit);
        drop(far);
        let slots = gate.enter(4).now_or_never().flatten();
        assert!(slots.is_some(), "the request slot came back");
        assert!(
            gate.enter(4).now_or_never().is_none(),
            "one request in flight at most"
        );
    }

    fn fetched(offset: u64, body_bytes: usize) -> Fetched {
        Fetched {
            event: Event {
                offset,
                event_id: format!("e{offset}"),
                event_type: "t".into(),
                aggregate_id: String::new(),
                aggregate_name: String::new(),
                aggregate_version: 0,
                created: String::new(),
                payload: None,
            },
            body_bytes,
        }
    }

    fn entry(event_type: &str, body: EntryBody) -> PageEntry {
        PageEntry {
            event_id: format!("id-{event_type}"),
            event_type: event_type.into(),
            aggregate_id: String::new(),
            aggregate_name: String::new(),
            aggregate_version: 0,
            created: String::new(),
            body,
        }
    }

    /// Each step as text: `R3` for three events at hand, `F7` for a fetch at offset 7.
    fn shape(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .map(|step| match step {
                Step::Ready(events) => format!("R{}", events.len()),
                Step::Fetch(offset, _) => format!("F{offset}"),
                Step::Head => "H".into(),
                Step::Stop(_) => "S".into(),
            })
            .collect()
    }

    #[test]
    fn a_page_is_read_in_steps_that_fetch_only_what_is_needed() {
        let wanted = |_: u64, entry: &PageEntry| entry.event_type == "wanted";
        let at = || EntryBody::At(hyper::Uri::from_static("http://127.0.0.1/e"));
        let inline = || EntryBody::Inline(serde_json::json!({"a": 1}).into());
        // An inline page is one step, wanted or not.
        let page = (0..1000)
            .map(|offset| {
                let event_type = if offset % 3 == 0 { "other" } else { "wanted" };
                (offset, entry(event_type, inline()))
            })
            .collect();
        let inline_steps = steps(page, wanted);
        assert_eq!(shape(&inline_steps), ["R1000"]);
        if let Some(Step::Ready(events)) = inline_steps.first() {
            // Their payloads are kept for the wanted ones only.
            let kept = events.iter().filter(|(_, _, wanted)| *wanted).count();
            assert_eq!(kept, 666);
        }
        // A Flux page: a fetch per wanted body, the others passed over in runs, order kept.
        let page = vec![
            (0, entry("wanted", at())),
            (1, entry("other", at())),
            (2, entry("other", at())),
            (3, entry("wanted", at())),
            (4, entry("wanted", at())),
            (5, entry("other", at())),
        ];
        assert_eq!(shape(&steps(page, wanted)), ["F0", "R2", "F3", "F4", "R1"]);
    }

    #[test]
    fn a_batch_is_due_when_full_at_the_head_or_after_the_wait() {
        let mut gathering = Gathering::default();
        let now = Instant::now();
        assert!(!gathering.is_due(now + MAX_BATCH_WAIT * 10), "empty");
        gathering.push(fetched(0, 10));
        let since = gathering.since.unwrap_or(now);
        assert!(!gathering.is_due(since), "one event, still reading");
        assert!(
            gathering.is_due(since + MAX_BATCH_WAIT),
            "waited long enough"
        );

        gathering.at_head = true;
        assert!(gathering.is_due(since), "nothing more to read");
        assert_eq!(gathering.take().len(), 1);
        assert!(!gathering.at_head && gathering.since.is_none());

        for offset in 0..MAX_BATCH_EVENTS as u64 {
            assert!(gathering.has_room());
            gathering.push(fetched(offset, 1));
        }
        assert!(!gathering.has_room());
        assert!(gathering.is_due(gathering.since.unwrap_or(now)), "full");
        gathering.take();

        gathering.push(fetched(0, MAX_BATCH_BYTES));
        assert!(!gathering.has_room(), "large bodies fill a batch too");
        assert!(gathering.is_due(gathering.since.unwrap_or(now)));
    }
}
