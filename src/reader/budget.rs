//! What one feed's reader holds in memory ahead of its batches, in bytes: the entries of pages
//! read ahead and the bodies that wait for their turn in feed order share one budget
//! (`max_buffered_bytes`). Pages are not read further while it is spent, and bodies past the
//! few the feed waits for are not requested; what is held is given back as it is passed on.
//!
//! Taking never waits and may pass the budget (an answer that came in, or one chunk larger
//! than the whole budget); waiting for room is what bounds it. So the reader holds about the
//! budget, plus one chunk of entries and one page's bytes.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

pub struct Budget {
    bytes: usize,
    used: Mutex<usize>,
    /// Notified each time bytes are given back.
    freed: Notify,
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
        })
    }

    fn used(&self) -> std::sync::MutexGuard<'_, usize> {
        self.used.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn has_room(&self) -> bool {
        *self.used() < self.bytes
    }

    /// Waits until some of the budget is free.
    pub async fn room(&self) {
        loop {
            // Registered before the check, so bytes given back in between are not missed.
            let mut freed = std::pin::pin!(self.freed.notified());
            freed.as_mut().enable();
            if self.has_room() {
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
}
