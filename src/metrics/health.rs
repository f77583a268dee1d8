//! Health and readiness, judged from the daemon's status. Healthy: every feed running, paused
//! or catching up; not when a feed or a projection is halted, commits are failing, a feed is
//! stalled, or the writer has been on one batch for `stuck_after`. Ready: every feed has
//! reached its head once since start (for deploys that wait for a warm read model).

use std::time::Duration;

use crate::control::protocol::{DaemonStatus, FeedState};

/// Why the daemon is not healthy; empty when it is.
pub fn unhealthy(status: &DaemonStatus, stuck_after: Duration) -> Vec<String> {
    let mut reasons = Vec::new();
    for feed in &status.feeds {
        match feed.state {
            FeedState::Halted => reasons.push(format!(
                "feed {} is halted: {}",
                feed.name,
                feed.halted_reason.as_deref().unwrap_or("see projector ctl status")
            )),
            FeedState::CommitFailing => reasons.push(format!(
                "feed {}: batches are not committing: {}",
                feed.name,
                feed.last_error
                    .as_ref()
                    .map_or("see projector ctl status", |e| e.message.as_str())
            )),
            FeedState::Stalled => reasons.push(format!(
                "feed {} is stalled: its checkpoints have not moved for {}s while its head is ahead",
                feed.name,
                feed.stalled_seconds.unwrap_or_default()
            )),
            _ => {}
        }
        for projection in &feed.projections {
            if let Some(halted) = &projection.halted {
                reasons.push(format!(
                    "projection {} is halted at {halted}",
                    projection.name
                ));
            }
        }
    }
    if let Some(slow) = &status.slow_batch {
        if Duration::from_secs(slow.seconds) >= stuck_after {
            reasons.push(format!(
                "the writer has been on one batch for {}s (stuck_after is {}s): {}",
                slow.seconds,
                stuck_after.as_secs(),
                slow.describe()
            ));
        }
    }
    reasons
}

/// The feeds that have not reached their head once since start.
pub fn not_ready(status: &DaemonStatus) -> Vec<String> {
    status
        .feeds
        .iter()
        // A feed another daemon applies is that daemon's to be ready for.
        .filter(|feed| {
            !feed.reached_head && !matches!(feed.state, FeedState::Idle | FeedState::Standby)
        })
        .map(|feed| format!("feed {} has not reached its head yet", feed.name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{FeedStatus, ProjectionStatus};

    fn status(state: FeedState, halted: Option<&str>, reached_head: bool) -> DaemonStatus {
        let feed: FeedStatus = serde_json::from_value(serde_json::json!({
            "name": "bank", "url": "u", "state": state, "paused": false, "halted_reason": null,
            "head": 10, "head_exact": true, "lag": 0, "events_per_second": 0.0,
            "eta_seconds": null, "events_read": 10, "retries": 0, "last_error": null,
            "hint": null, "reached_head": reached_head, "projections": []
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let mut feed = feed;
        feed.projections.push(ProjectionStatus {
            name: "p".into(),
            checkpoint: 10,
            lag: Some(0),
            lag_seconds: Some(0.0),
            halted: halted.map(str::to_string),
            applied: 10,
            dead_letters: 0,
            last_applied_at: None,
            definition_changed: false,
            rebuild: None,
        });
        serde_json::from_value(serde_json::json!({
            "pid": 1, "version": "v", "config": "c", "database": "d", "started_at": "s",
            "uptime_seconds": 1, "reloaded_at": null, "feeds": [feed], "slow_batch": null,
            "log_lines_dropped": 0, "stopping": false
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_halt_or_a_stall_is_unhealthy_catching_up_and_paused_are_not() {
        let stuck = Duration::from_secs(60);
        assert!(unhealthy(&status(FeedState::CatchingUp, None, false), stuck).is_empty());
        assert!(unhealthy(&status(FeedState::Paused, None, true), stuck).is_empty());
        let halted = unhealthy(
            &status(FeedState::Live, Some("event e at offset 3: bad"), true),
            stuck,
        );
        assert_eq!(
            halted,
            ["projection p is halted at event e at offset 3: bad"]
        );
        assert_eq!(
            unhealthy(&status(FeedState::Stalled, None, true), stuck).len(),
            1
        );
        assert_eq!(
            not_ready(&status(FeedState::CatchingUp, None, false)).len(),
            1
        );
        assert!(not_ready(&status(FeedState::Live, None, true)).is_empty());
    }
}
