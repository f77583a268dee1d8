//! The events of the feed's pages in order, with their payloads: the bodies some projection
//! needs are fetched `body_concurrency` at a time across page boundaries and yielded in feed
//! order; the entries no projection needs are passed over unread.

use std::sync::Arc;

use futures_util::{stream, Stream, StreamExt};
use tokio::sync::mpsc;

use super::budget::Budget;
use super::gate::RequestGate;
use super::pages::PageRead;
use super::retry::{retry, Backoff};
use super::Member;
use crate::event::{Event, Payload};
use crate::feed::error::FetchError;
use crate::feed::page::{EntryBody, PageEntry};
use crate::feed::FeedClient;
use crate::monitor::FeedMonitor;

/// The steps kept in order, as a multiple of `body_concurrency`, the requests in flight: the
/// answers behind a slow one at the head of the feed wait for it while new requests go out.
const ANSWERS_AHEAD: usize = 4;

/// What the feed stream yields.
pub(super) enum Read {
    Event(Fetched),
    /// A poll found nothing new: every event before this mark has been yielded.
    Head,
}

/// The feed's events in order, from the chunks of `pages`, with the bodies some member still
/// needs, and a mark each time a poll finds nothing new. Body requests run `body_concurrency` at
/// a time across page boundaries, within ANSWERS_AHEAD times as many steps kept in order while
/// the feed's budget has room (RequestGate): a slow answer holds one request, not all of them.
/// A chunk's entries and an answer's bytes are held in the budget until passed on. The stream
/// waits at the head of the feed and retries failures; it ends only with an error that is not
/// retried.
pub(super) fn ordered_reads(
    pages: mpsc::Receiver<PageRead>,
    bodies: BodyReader,
    body_concurrency: usize,
    budget: Arc<Budget>,
) -> impl Stream<Item = Result<Read, FetchError>> + Send + 'static {
    let gate = Arc::new(RequestGate::new(body_concurrency, budget.clone()));
    let bodies = Arc::new(bodies);
    let yielded = gate.clone();
    let mut next_step = 0u64;
    stream::unfold(pages, |mut pages| async move {
        pages.recv().await.map(|page| (page, pages))
    })
    .flat_map(move |chunk| {
        let (steps, held) = match chunk {
            Ok(chunk) if chunk.entries.is_empty() => (vec![Step::Head], None),
            Ok(chunk) => (bodies.steps(chunk.entries), chunk.held.map(Arc::new)),
            Err(err) => (vec![Step::Failed(err)], None),
        };
        let first = next_step;
        next_step += steps.len() as u64;
        let bodies = bodies.clone();
        let gate = gate.clone();
        let budget = budget.clone();
        stream::iter(steps.into_iter().zip(first..)).map(move |(step, index)| {
            let bodies = bodies.clone();
            let gate = gate.clone();
            let budget = budget.clone();
            // Each step keeps its chunk's entries held until it is passed on.
            let chunk_held = held.clone();
            async move {
                let (answer_held, reads) = match step {
                    Step::Ready(events) => (
                        None,
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
                        // The answer's bytes, held until it is passed on.
                        let held = fetched.as_ref().ok().map(|f| budget.take(f.body_bytes));
                        (held, vec![fetched.map(Read::Event)])
                    }
                    Step::Head => (None, vec![Ok(Read::Head)]),
                    Step::Failed(err) => (None, vec![Err(err)]),
                };
                (index, (chunk_held, answer_held), reads)
            }
        })
    })
    .buffered(body_concurrency * ANSWERS_AHEAD)
    .flat_map(move |(index, held, reads)| {
        yielded.yielded(index);
        // The closure owns `held`: given back once the step's reads have all been passed on.
        stream::iter(reads.into_iter().inspect(move |_| {
            let _held = &held;
        }))
    })
}

/// One step of reading a page, in the page's order: events whose payloads are at hand (inline,
/// or not needed), or one body to fetch. An inline page is one step, not one per event, since
/// going through the ordered futures event by event costs the reader much of its CPU.
enum Step {
    /// Each event with whether some projection needs its payload.
    Ready(Vec<(u64, PageEntry, bool)>),
    Fetch(u64, PageEntry),
    Head,
    Failed(FetchError),
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
pub(super) struct BodyReader {
    pub(super) client: FeedClient,
    pub(super) monitor: Arc<FeedMonitor>,
    pub(super) backoff: Backoff,
    pub(super) members: Vec<Member>,
}

impl BodyReader {
    fn wanted(&self, offset: u64, entry: &PageEntry) -> bool {
        self.members.iter().any(|member| {
            offset >= member.next_offset && member.event_types.contains(&entry.meta.event_type)
        })
    }

    fn steps(&self, entries: Vec<(u64, PageEntry)>) -> Vec<Step> {
        steps(entries, |offset, entry| self.wanted(offset, entry))
    }

    /// An event whose body is fetched, retried until it comes (or fails in a way that is not
    /// retried).
    async fn fetch(&self, offset: u64, entry: PageEntry) -> Result<Fetched, FetchError> {
        let fetched = match &entry.body {
            EntryBody::At(url) => Some(
                retry(&self.monitor, &self.backoff, || {
                    self.client.fetch_body(&entry, url)
                })
                .await?,
            ),
            // At hand: `steps` does not make it a fetch.
            EntryBody::Inline(_) => None,
        };
        Ok(into_fetched(offset, entry, fetched, true))
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
    let PageEntry { meta, body, page } = entry;
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
            meta,
            payload,
            page,
        },
        body_bytes,
    }
}

/// One event as read from the feed, and the size of its body.
pub(super) struct Fetched {
    pub(super) event: Event,
    pub(super) body_bytes: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventMeta;

    fn entry(event_type: &str, body: EntryBody) -> PageEntry {
        PageEntry {
            meta: EventMeta {
                event_id: format!("id-{event_type}"),
                event_type: event_type.into(),
                ..EventMeta::default()
            },
            body,
            page: None,
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
                Step::Failed(_) => "S".into(),
            })
            .collect()
    }

    #[test]
    fn a_page_is_read_in_steps_that_fetch_only_what_is_needed() {
        let wanted = |_: u64, entry: &PageEntry| entry.meta.event_type == "wanted";
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
}
