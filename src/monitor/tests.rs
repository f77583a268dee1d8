use super::*;
use crate::feed::error::{FetchErrorKind, FetchTarget};
use crate::store::Checkpoint;
use crate::writer::{Halt, ProjectionOutcome};

fn point(name: &str, next_offset: u64) -> StartingPoint {
    StartingPoint {
        projection: name.into(),
        feed: "bank".into(),
        event_types: crate::projection::EventTypes::default(),
        checkpoint: Checkpoint {
            next_offset,
            last_event_id: None,
            page: None,
        },
        dead_letters: 0,
        frozen: false,
    }
}

fn monitor(points: &[(&str, u64)]) -> FeedMonitor {
    let points: Vec<StartingPoint> = points.iter().map(|(n, o)| point(n, *o)).collect();
    FeedMonitor::new("bank", &points.iter().collect::<Vec<_>>())
}

/// A batch of the events at `offsets`, leaving each projection named at `end`.
fn batch(offsets: std::ops::Range<u64>, projections: &[(&str, usize, usize)]) -> BatchOutcome {
    BatchOutcome {
        projections: projections
            .iter()
            .map(|(name, applied, dead_lettered)| ProjectionOutcome {
                projection: name.to_string(),
                checkpoint: Checkpoint {
                    next_offset: offsets.end,
                    last_event_id: Some(format!("e{}", offsets.end - 1)),
                    page: None,
                },
                applied: *applied,
                dead_lettered: *dead_lettered,
                last_created: Some("Sun Nov 22 19:04:21 2026".into()),
            })
            .collect(),
        offsets,
        ..BatchOutcome::default()
    }
}

#[test]
fn state_follows_the_readers_and_the_pause() {
    let monitor = monitor(&[("a", 0), ("b", 0)]);
    assert_eq!(monitor.snapshot("u", false).state, FeedState::Idle);
    let first = monitor.add_reader();
    let second = monitor.add_reader();
    assert_eq!(monitor.snapshot("u", false).state, FeedState::Starting);
    monitor.set_phase(first, ReaderPhase::CatchingUp);
    monitor.set_phase(second, ReaderPhase::Live);
    assert_eq!(monitor.snapshot("u", false).state, FeedState::CatchingUp);
    monitor.set_phase(first, ReaderPhase::Live);
    assert_eq!(monitor.snapshot("u", false).state, FeedState::Live);

    monitor.failed(
        &FetchErrorKind::Status {
            status: hyper::StatusCode::INTERNAL_SERVER_ERROR,
            retry_after: None,
        }
        .fetching(FetchTarget::Page, "page at offset 0".into()),
    );
    let status = monitor.snapshot("u", false);
    assert_eq!(status.state, FeedState::BackingOff);
    assert_eq!(status.retries, 1);
    assert!(status
        .last_error
        .is_some_and(|e| e.message.contains("HTTP 500")));
    monitor.recovered();
    assert_eq!(monitor.snapshot("u", false).state, FeedState::Live);
    monitor.commit_failed("batch not committed: disk full".into());
    let status = monitor.snapshot("u", false);
    assert_eq!(status.state, FeedState::CommitFailing);
    assert_eq!(status.retries, 2);
    assert!(status
        .last_error
        .is_some_and(|e| e.message.contains("disk full")));

    monitor.set_phase(first, ReaderPhase::Paused);
    assert_eq!(monitor.snapshot("u", true).state, FeedState::Pausing);
    monitor.set_phase(second, ReaderPhase::Paused);
    assert_eq!(monitor.snapshot("u", true).state, FeedState::Paused);

    monitor.set_phase(first, ReaderPhase::Halted("rewritten".into()));
    monitor.set_phase(second, ReaderPhase::Halted("rewritten".into()));
    let status = monitor.snapshot("u", false);
    assert_eq!(status.state, FeedState::Halted);
    assert_eq!(status.halted_reason.as_deref(), Some("rewritten"));
}

#[test]
fn one_halted_projection_is_its_own_not_the_feeds() {
    let monitor = monitor(&[("a", 0), ("b", 0)]);
    let both = monitor.add_reader();
    let mut outcome = batch(0..12, &[("a", 12, 0), ("b", 11, 0)]);
    outcome.halted.push(Halt {
        projection: "b".into(),
        offset: 11,
        event_id: "e11".into(),
        event_type: "t".into(),
        error: "bad".into(),
        payload: None,
        event_meta: "{}".into(),
    });
    monitor.committed(&outcome);
    monitor.set_phase(both, ReaderPhase::Live);
    let status = monitor.snapshot("u", false);
    assert_eq!(status.state, FeedState::Live);
    assert_eq!(status.halted_reason, None);
    assert!(status.projections[1]
        .halted
        .as_deref()
        .is_some_and(|h| h.contains("offset 11: bad")));

    // Once every reader has stopped on halted projections, the feed has halted, and says which.
    monitor.set_phase(both, ReaderPhase::ProjectionsHalted);
    let status = monitor.snapshot("u", false);
    assert_eq!(status.state, FeedState::Halted);
    assert_eq!(
        status.halted_reason.as_deref(),
        Some("every projection on this feed has halted on a poison event: b")
    );
}

#[test]
fn events_read_are_new_events_only_and_never_pass_the_head() {
    let monitor = monitor(&[("a", 10)]);
    // The event before the checkpoint is read again to check its id: not new.
    monitor.committed(&batch(9..30, &[("a", 20, 0)]));
    monitor.saw_feed_up_to(30);
    // A second reader reading from 0 (a projection rebuilding) reads them again.
    monitor.committed(&batch(0..30, &[("a", 0, 0)]));
    let status = monitor.snapshot("u", false);
    assert_eq!(status.events_read, 20);
    assert!(status.events_read <= status.head.unwrap_or(0));
    // ... but the rate counts all the work.
    assert!(status.events_per_second >= 51.0 - 1.0, "{status:?}");
}

#[test]
fn the_head_is_a_lower_bound_until_found_and_the_eta_needs_it() {
    let monitor = monitor(&[("a", 0), ("b", 5)]);
    let reader = monitor.add_reader();
    monitor.set_phase(reader, ReaderPhase::CatchingUp);
    monitor.saw_feed_up_to(20);
    monitor.saw_feed_up_to(10);
    monitor.committed(&batch(0..12, &[("a", 12, 0), ("b", 7, 1)]));
    let status = monitor.snapshot("u", false);
    assert_eq!((status.head, status.head_exact), (Some(20), false));
    assert_eq!(status.lag, Some(8));
    assert_eq!(status.eta_seconds, None, "no ETA to a lower bound");

    monitor.probed_head(1000);
    let status = monitor.snapshot("u", false);
    assert_eq!((status.head, status.head_exact), (Some(1000), true));
    assert_eq!(status.lag, Some(988));
    assert!(status.eta_seconds.is_some_and(|eta| eta > 0), "{status:?}");
    // A page read past the probed head makes it a lower bound again.
    monitor.saw_feed_up_to(1020);
    assert!(!monitor.snapshot("u", false).head_exact);
    // An empty page at the head: found.
    monitor.reached_head(1030);
    assert_eq!(monitor.head(), Some((1030, true)));
    // A probe behind what was read since is out of date.
    monitor.probed_head(900);
    assert_eq!(monitor.head(), Some((1030, true)));

    let b = &monitor.snapshot("u", false).projections[1];
    assert_eq!((b.applied, b.dead_letters), (7, 1));
    assert!(b.last_applied_at.is_some());
}

#[test]
fn checkpoints_standing_behind_the_head_past_stall_after_are_a_stall_with_a_lag_in_seconds() {
    let monitor = monitor(&[("a", 0)]);
    let reader = monitor.add_reader();
    monitor.set_phase(reader, ReaderPhase::CatchingUp);
    monitor.committed(&batch(0..10, &[("a", 10, 0)]));
    monitor.saw_feed_up_to(50);
    assert_eq!(monitor.snapshot("u", false).state, FeedState::CatchingUp);
    monitor.set_stall_after(Duration::ZERO);
    let status = monitor.snapshot("u", false);
    assert_eq!(status.state, FeedState::Stalled);
    assert!(status.stalled_seconds.is_some());
    let lag = status.projections[0].lag_seconds.unwrap_or_default();
    let created = crate::metrics::created::parse("Sun Nov 22 19:04:21 2026")
        .and_then(|at| SystemTime::now().duration_since(at).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    assert!((lag - created).abs() < 5.0, "{lag} {created}");
    // Paused, or at the head, is no stall; nor is it late.
    assert_eq!(monitor.snapshot("u", true).state, FeedState::Pausing);
    monitor.committed(&batch(10..50, &[("a", 40, 0)]));
    let status = monitor.snapshot("u", false);
    assert_ne!(status.state, FeedState::Stalled);
    assert_eq!(status.projections[0].lag_seconds, Some(0.0));
    assert!(!status.reached_head);
    monitor.set_phase(reader, ReaderPhase::Live);
    assert!(monitor.snapshot("u", false).reached_head);
}
