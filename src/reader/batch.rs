//! Gathering the feed's events into batches for the writer.
//!
//! A batch is handed to the writer once it is due: full, or the reader has reached the head of
//! the feed, or its first event has waited MAX_BATCH_WAIT. So a reader that is behind commits in
//! large transactions (each page of the read models written once for many events), and one at the
//! head commits each new event at once.

use std::time::Duration;

use tokio::time::Instant;

use super::bodies::Fetched;
use crate::event::Event;

/// The most events committed in one transaction. Larger transactions write each page of the
/// read models once for more events (see BENCHMARKS.md); this bounds the memory of a batch and
/// the time a pause or a stop waits for the batch in flight.
pub const MAX_BATCH_EVENTS: usize = 8000;
/// The most bytes of bodies in one batch, for feeds with large events.
pub(super) const MAX_BATCH_BYTES: usize = 8 << 20;
/// How long the first event of a batch waits for more while the feed is read (at the head of
/// the feed a batch goes at once): a slow or failing feed still commits what it has read. Long
/// enough for a reader catching up to fill a batch.
pub(super) const MAX_BATCH_WAIT: Duration = Duration::from_millis(500);

/// The events gathered for the next batch.
#[derive(Default)]
pub(super) struct Gathering {
    events: Vec<Event>,
    body_bytes: usize,
    /// When the first event was gathered.
    since: Option<Instant>,
    /// The reader reached the head of the feed since the last batch.
    pub(super) at_head: bool,
}

impl Gathering {
    pub(super) fn push(&mut self, fetched: Fetched) {
        self.since.get_or_insert_with(Instant::now);
        self.body_bytes += fetched.body_bytes;
        self.events.push(fetched.event);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub(super) fn has_room(&self) -> bool {
        self.events.len() < MAX_BATCH_EVENTS && self.body_bytes < MAX_BATCH_BYTES
    }

    pub(super) fn deadline(&self) -> Instant {
        self.since.unwrap_or_else(Instant::now) + MAX_BATCH_WAIT
    }

    pub(super) fn is_due(&self, now: Instant) -> bool {
        !self.is_empty() && (!self.has_room() || self.at_head || now >= self.deadline())
    }

    pub(super) fn take(&mut self) -> Vec<Event> {
        let events = std::mem::take(&mut self.events);
        *self = Gathering::default();
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventMeta;

    fn fetched(offset: u64, body_bytes: usize) -> Fetched {
        Fetched {
            event: Event {
                offset,
                meta: EventMeta {
                    event_id: format!("e{offset}"),
                    event_type: "t".into(),
                    ..EventMeta::default()
                },
                payload: None,
                page: None,
            },
            body_bytes,
        }
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
