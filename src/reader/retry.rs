//! Retrying a fetch: capped exponential backoff with jitter, at least the delay a server asks
//! for, each failure reported to the feed's monitor. What is retried is the fetch error's kind to
//! say; the reader never moves past an event it has not read.

use std::time::Duration;

use crate::feed::error::FetchError;
use crate::monitor::FeedMonitor;

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

/// Runs `fetch` until it succeeds or fails in a way that is not retried, waiting with backoff
/// between attempts and reporting each failure.
pub(super) async fn retry<T, F, Fut>(
    monitor: &FeedMonitor,
    backoff: &Backoff,
    fetch: F,
) -> Result<T, FetchError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, FetchError>>,
{
    let mut attempt = 0;
    loop {
        match fetch().await {
            Ok(value) => return Ok(value),
            Err(err) if !err.kind.is_retried() => return Err(err),
            Err(err) => {
                monitor.failed(&err);
                let delay = backoff.delay(attempt, err.kind.retry_after());
                attempt = attempt.saturating_add(1);
                tokio::time::sleep(delay).await;
            }
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
