//! When a step of the feed stream may request its body, so that a slow answer holds one
//! request, not all of them, and large answers do not pile up while they wait their turn.

use std::sync::{Mutex, PoisonError};

use tokio::sync::{Notify, Semaphore, SemaphorePermit};

/// When a step of the feed stream may request its body. At most `body_concurrency` requests
/// are in flight. A step among the `body_concurrency` after the one the feed waits for may
/// always start; one further ahead (the ordered window is larger: see `bodies.rs`) only while
/// the answers waiting in order hold less than `max_bytes_ahead`. So small bodies get the whole
/// window, and large ones hold about what they held when the window was the requests in flight.
/// The step the feed waits for is always admitted, and a request slot is only ever held by a
/// request under way, so the stream cannot wait on itself.
pub(super) struct RequestGate {
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
    pub(super) fn new(concurrency: usize, max_bytes_ahead: usize) -> RequestGate {
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
    pub(super) async fn enter(&self, step: u64) -> Option<SemaphorePermit<'_>> {
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
    pub(super) fn answered(&self, bytes: usize) {
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        window.bytes_waiting += bytes;
    }

    /// `step`, whose answer held `bytes` (0 if it made no request), has been yielded.
    pub(super) fn yielded(&self, step: u64, bytes: usize) {
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
    use futures_util::FutureExt;

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
}
