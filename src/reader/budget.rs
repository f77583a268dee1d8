//! What one feed's reader holds in memory ahead of its batches, in bytes: a large page being
//! read, the entries of pages read ahead and the bodies that wait for their turn in feed order
//! share one budget (`max_buffered_bytes`). Pages are not read further while it is spent, and bodies past the
//! few the feed waits for are not requested; what is held is given back as it is passed on.
//!
//! One page of the feed is fetched and held at a time (`page_slot`), the head probe's and each
//! reader's: a second page would double what a feed of large pages holds.
//!
//! Taking never waits and may pass the budget (an answer that came in, or a page larger than
//! the whole budget); waiting for room is what bounds it. So the reader holds about the budget,
//! plus one chunk of entries, or a page larger than the budget and one chunk of it.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

pub struct Budget {
    bytes: usize,
    used: Mutex<usize>,
    /// Notified each time bytes are given back.
    freed: Notify,
    /// One permit: held while a page is fetched and read.
    page: Arc<Semaphore>,
}

/// Bytes taken from a budget, given back when dropped.
pub struct Held {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Budget {
    pub fn new(bytes: usize) -> Arc<Budget> {
        Arc::new(Budget {
            bytes,
            used: Mutex::new(0),
            freed: Notify::new(),
            page: Arc::new(Semaphore::new(1)),
        })
    }

    /// Waits until no other page of the feed is being fetched or read; the next is this
    /// holder's until the returned permit is dropped.
    pub async fn page_slot(&self) -> Option<OwnedSemaphorePermit> {
        // Never closed, so a permit always comes.
        self.page.clone().acquire_owned().await.ok()
    }

    fn used(&self) -> std::sync::MutexGuard<'_, usize> {
        self.used.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn has_room(&self) -> bool {
        *self.used() < self.bytes
    }

    /// Waits until some of the budget is free.
    pub async fn room(&self) {
        self.room_besides(None).await;
    }

    /// Waits until some of the budget is free, or until nothing but `own` is held: what its
    /// holder needs to make progress never waits on itself, even if it is larger than the
    /// budget.
    pub async fn room_besides(&self, own: Option<&Held>) {
        let own = own.map_or(0, |held| held.bytes);
        loop {
            // Registered before the check, so bytes given back in between are not missed.
            let mut freed = std::pin::pin!(self.freed.notified());
            freed.as_mut().enable();
            let used = *self.used();
            if used < self.bytes || used <= own {
                return;
            }
            freed.await;
        }
    }

    /// A future that resolves the next time bytes are given back.
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }

    /// Takes `bytes`, whatever is left: held until the returned value is dropped.
    pub fn take(self: &Arc<Self>, bytes: usize) -> Held {
        *self.used() += bytes;
        Held {
            budget: self.clone(),
            bytes,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        {
            let mut used = self.budget.used();
            *used = used.saturating_sub(self.bytes);
        }
        self.budget.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[test]
    fn room_comes_back_as_held_bytes_are_given_back() {
        let budget = Budget::new(100);
        let first = budget.take(60);
        assert!(budget.has_room());
        let second = budget.take(60);
        assert!(!budget.has_room(), "taking may pass the budget");
        let mut waiting = Box::pin(budget.room());
        assert!((&mut waiting).now_or_never().is_none());
        drop(first);
        assert!((&mut waiting).now_or_never().is_some(), "60 of 100 used");
        drop(second);
        assert_eq!(*budget.used(), 0);
    }

    #[test]
    fn a_holder_larger_than_the_budget_still_has_room_once_nothing_else_is_held() {
        let budget = Budget::new(100);
        let page = budget.take(150);
        assert!(budget.room_besides(Some(&page)).now_or_never().is_some());
        let chunk = budget.take(10);
        let mut waiting = Box::pin(budget.room_besides(Some(&page)));
        assert!((&mut waiting).now_or_never().is_none(), "its chunk is held");
        drop(chunk);
        assert!(
            (&mut waiting).now_or_never().is_some(),
            "only the page is held"
        );
        assert!(budget.room().now_or_never().is_none(), "others still wait");
    }
}
