//! Feed clients, one per feed format, and what they share: the fetch error and the retry policy.
//!
//! Every fetch error is transient: the feed may come back, so the daemon retries with capped,
//! jittered exponential backoff and never advances past an event it has not applied. What makes a
//! feed halt for good (a rewritten or shrunk feed) is found by the pipeline, not here.

pub mod flux;
pub mod http;

use std::time::Duration;

/// Why one request to a feed failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct FetchError {
    /// What was being fetched, e.g. `page at offset 40 (http://…)`.
    pub what: String,
    pub reason: String,
    /// A delay the server asked for (429 or 503 with `Retry-After: <seconds>`).
    pub retry_after: Option<Duration>,
}

/// Capped exponential backoff with jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

/// A server may ask for a long pause, but never longer than this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

impl Backoff {
    /// The delay before retry number `attempt` (0 for the first retry): the capped exponential
    /// delay, jittered down by up to half so that many clients do not retry in step, and never
    /// shorter than what the server asked for.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exponential = self
            .initial
            .saturating_mul(2u32.saturating_pow(attempt.min(31)))
            .min(self.max);
        let jittered = exponential.mul_f64(0.5 + fastrand::f64() * 0.5);
        match retry_after {
            Some(asked) => jittered.max(asked.min(MAX_RETRY_AFTER)),
            None => jittered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        for attempt in 0..40 {
            let delay = backoff.delay(attempt, None);
            let ceiling = Duration::from_millis(100 * (1u64 << attempt.min(20))).min(backoff.max);
            assert!(
                delay <= ceiling && delay >= ceiling / 2,
                "{attempt}: {delay:?}"
            );
        }
        let asked = backoff.delay(0, Some(Duration::from_secs(7)));
        assert_eq!(asked, Duration::from_secs(7));
        let absurd = backoff.delay(0, Some(Duration::from_secs(86_400)));
        assert_eq!(absurd, MAX_RETRY_AFTER);
    }
}
