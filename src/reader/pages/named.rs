//! The pages of a feed paged by next links or cursors (or not paged at all: an export read
//! whole), each asked for at the place the page before it named. The page holding the last
//! event read is kept: a checkpoint keeps it, so a restart reads on from there, and each poll
//! at the head reads it again, to check that the last event is still there and to take what
//! came after it on the same page, before asking for the page it names next, if any.

use std::sync::Arc;

use super::{verified_skipped, FetchedPage, PageReader};
use crate::event::PagePlace;
use crate::feed::error::{FetchError, FetchErrorKind, FetchTarget};
use crate::feed::PageAt;
use crate::reader::retry::retry;

/// Where the reader is in a feed paged by links or cursors.
#[derive(Debug, Clone, Default)]
pub(super) struct NamedPages {
    /// The page the last event read is on; None: the feed's first page.
    holding: Option<Arc<PagePlace>>,
    /// The page after it, once a page named one.
    next: Option<Arc<PagePlace>>,
}

impl NamedPages {
    pub(super) fn starting_at(page: Option<PagePlace>) -> NamedPages {
        NamedPages {
            holding: page.map(Arc::new),
            next: None,
        }
    }
}

impl PageReader {
    /// As `next_page`, for a feed paged by links or cursors.
    pub(super) async fn next_named_page(&mut self) -> Result<FetchedPage, FetchError> {
        if self.idle {
            self.wait_at_head().await;
        }
        let mut verify = self.last_read.clone().filter(|_| self.idle);
        let mut unreadable_polls = 0u32;
        loop {
            let NamedPages { holding, next } = self.named.clone().unwrap_or_default();
            let (place, want) = match (&verify, &next) {
                (Some((at, _)), _) => (holding, *at),
                (None, Some(next)) => (Some(next.clone()), self.offset),
                (None, None) => (holding, self.offset),
            };
            let first = place.as_ref().map_or(0, |page| page.first_offset);
            if want < first {
                // A page past the event wanted (a checkpoint moved back by hand): read the
                // feed from its first page.
                self.named = Some(NamedPages::default());
                continue;
            }
            let slot = self.budget.page_slot().await;
            let client = &self.client;
            let mut page = retry(&self.monitor, &self.policy.backoff, || {
                client.fetch_page_at(PageAt::Named(place.as_deref()), None)
            })
            .await?;
            let (place, first) = match (&verify, &self.last_read, page.first_id()) {
                // A page named next that starts again with the last event read (a cursor that
                // includes its own event): the page starts one earlier than it was named.
                (None, Some((last, id)), Some(first_id))
                    if *last + 1 == first && first == want && first_id == *id =>
                {
                    let place = place.as_ref().map(|at| {
                        Arc::new(PagePlace {
                            cursor: at.cursor.clone(),
                            first_offset: *last,
                        })
                    });
                    (place, *last)
                }
                _ => (place, first),
            };
            let skip = want - first;
            let listed = page.len() as u64;
            // A page cut short at an unreadable event does not say where the page after it
            // starts; and a page naming itself names nothing new.
            let named_next = page
                .next
                .take()
                .filter(|_| page.cut.is_none())
                .filter(|cursor| place.as_ref().is_none_or(|at| at.cursor != *cursor))
                .map(|cursor| {
                    Arc::new(PagePlace {
                        cursor,
                        first_offset: first + listed,
                    })
                });
            page.skip(usize::try_from(skip).unwrap_or(usize::MAX));
            let mut first_offset = want;
            if let Some(verified) = &verify {
                if !verified_skipped(verified, &mut page)? {
                    // The page holding the last event read no longer has it.
                    drop(slot);
                    self.shrunk(want).await;
                    continue;
                }
                first_offset += 1;
            }
            if !page.is_empty() {
                self.shrunk_polls = 0;
                self.named = Some(NamedPages {
                    holding: place.clone(),
                    next: named_next,
                });
                self.reading(first_offset, &page);
                return Ok(FetchedPage {
                    first_offset,
                    page,
                    slot,
                    place,
                });
            }
            if let Some(cut) = &page.cut {
                // The next event cannot be read: reported, and asked for again.
                let err = FetchErrorKind::Unreadable(cut.clone())
                    .fetching(FetchTarget::Page, format!("page at offset {first_offset}"));
                self.monitor.failed(&err);
                drop(slot);
                let delay = self.policy.backoff.delay(unreadable_polls, None);
                unreadable_polls = unreadable_polls.saturating_add(1);
                tokio::time::sleep(delay).await;
                continue;
            }
            if first + listed < first_offset {
                // The page ends before an event it had.
                drop(slot);
                self.shrunk(first_offset).await;
                continue;
            }
            if listed > 0 {
                if let Some(named_next) = named_next {
                    // Everything on this page is read: on to the page it names.
                    self.named = Some(NamedPages {
                        holding: place,
                        next: Some(named_next),
                    });
                    verify = None;
                    continue;
                }
            }
            if verify.is_some() && next.is_some() {
                // Nothing new on the page holding the last event: on to the page after it.
                verify = None;
                continue;
            }
            if first_offset < self.known_end {
                drop(slot);
                self.shrunk(first_offset).await;
                continue;
            }
            self.shrunk_polls = 0;
            if listed == 0 && named_next.is_some() {
                // An empty page naming another: asked for at the next poll.
                self.named = Some(NamedPages {
                    holding: self.named.clone().unwrap_or_default().holding,
                    next: named_next,
                });
            }
            return Ok(self.at_head(page, slot));
        }
    }
}
