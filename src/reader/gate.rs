//! When a step of the feed stream may request its body, so that a slow answer holds one
//! request, not all of them, and answers waiting their turn stay within the feed's budget.
//!
//! At most `body_concurrency` requests are in flight. A step among the `body_concurrency` after
//! the one the feed waits for may always start; one further ahead (the ordered window is larger:
//! see `bodies.rs`) only while the budget has room. So small bodies get the whole window, and
//! large ones hold about the budget. The step the feed waits for is always admitted, and a
//! request slot is only ever held by a request under way, so the stream cannot wait on itself.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Notify, Semaphore, SemaphorePermit};

use super::budget::Budget;

pub(super) struct RequestGate {
    in_flight: Semaphore,
    concurrency: u64,
    budget: Arc<Budget>,
    /// The step the feed waits for: the next one yielded.
    next: Mutex<u64>,
    /// Notified each time a step is yielded.
    moved: Notify,
}

impl RequestGate {
    pub(super) fn new(concurrency: usize, budget: Arc<Budget>) -> RequestGate {
        RequestGate {
            in_flight: Semaphore::new(concurrency),
            concurrency: concurrency as u64,
            budget,
            next: Mutex::new(0),
            moved: Notify::new(),
        }
    }

    /// Waits until `step` may request its body and a request slot is free; the slot is held
    /// until the returned permit is dropped.
    pub(super) async fn enter(&self, step: u64) -> Option<SemaphorePermit<'_>> {
        loop {
            // Registered before the check, so a step yielded or bytes given back in between
            // are not missed.
            let mut moved = std::pin::pin!(self.moved.notified());
            moved.as_mut().enable();
            let mut freed = std::pin::pin!(self.budget.freed());
            freed.as_mut().enable();
            if self.admits(step) {
                break;
            }
            tokio::select! {
                () = moved => {}
                () = freed => {}
            }
        }
        // Never closed, so a permit always comes.
        self.in_flight.acquire().await.ok()
    }

    fn admits(&self, step: u64) -> bool {
        let next = *self.next.lock().unwrap_or_else(PoisonError::into_inner);
        step < next + self.concurrency || self.budget.has_room()
    }

    /// `step` has been yielded.
    pub(super) fn yielded(&self, step: u64) {
        *self.next.lock().unwrap_or_else(PoisonError::into_inner) = step + 1;
        self.moved.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[test]
    fn the_gate_admits_steps_near_the_head_always_and_further_ones_while_the_budget_has_room() {
        let budget = Budget::new(100);
        let gate = RequestGate::new(2, budget.clone());
        assert!(
            gate.admits(0) && gate.admits(1) && gate.admits(7),
            "nothing held"
        );
        let answers = budget.take(100);
        assert!(
            gate.admits(0) && gate.admits(1),
            "the head and the next may always go"
        );
        assert!(!gate.admits(2) && !gate.admits(7), "the budget is spent");
        gate.yielded(0);
        assert!(gate.admits(2) && !gate.admits(3), "the head moved by one");
        drop(answers);
        assert!(gate.admits(7), "room again");
    }

    #[test]
    fn a_step_kept_out_by_the_gate_goes_once_the_head_moves_or_room_comes_back() {
        let budget = Budget::new(10);
        let gate = RequestGate::new(1, budget.clone());
        let held = budget.take(10);
        let mut far = Box::pin(gate.enter(3));
        assert!((&mut far).now_or_never().is_none(), "the budget is spent");
        gate.yielded(0);
        assert!(
            (&mut far).now_or_never().is_none(),
            "still spent and two steps ahead"
        );
        drop(held);
        let permit = (&mut far).now_or_never();
        assert!(matches!(permit, Some(Some(_))), "room: it goes");
        drop(permit);
        drop(far);
        let slots = gate.enter(4).now_or_never().flatten();
        assert!(slots.is_some(), "the request slot came back");
        assert!(
            gate.enter(4).now_or_never().is_none(),
            "one request in flight at most"
        );
    }
}
