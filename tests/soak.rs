//! Soak: a long catch-up of a feed failing 5% of its requests at random. At the end the read
//! model is exact; during it the daemon's open file descriptors (sockets included) and its
//! memory are sampled, and neither may grow with the length of the feed.
//!
//! `cargo test --test soak` reads 10,000 events. The README's figures come from
//! `PROJECTOR_SOAK_EVENTS=1000000 cargo test --release --test soak -- --nocapture`.

mod common;

use std::time::Duration;

use common::{assert_consistent, Harness};
use projector::demo::bank;

const BOTH: &[&str] = &["account_balances", "account_ledger"];

/// (open file descriptors, resident KiB) of a process.
fn sample(pid: u32) -> Option<(usize, u64)> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((fds, common::memory_kib(pid, "VmRSS")?))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_faulty_catch_up_is_exact_and_leaks_no_descriptor_or_memory() {
    let total: usize = std::env::var("PROJECTOR_SOAK_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let events = bank::generate(80, total);
    let harness = Harness::new(events.clone()).await;
    harness.server.random_faults(80, 0.05);
    let mut daemon = harness.spawn();
    let pid = daemon.child.id();

    let mut samples: Vec<(u64, usize, u64)> = Vec::new(); // (progress, fds, rss KiB)
    let started = std::time::Instant::now();
    loop {
        let progress = harness.checkpoints().values().min().copied().unwrap_or(0);
        if let Some((fds, rss)) = sample(pid) {
            samples.push((progress, fds, rss));
        }
        if progress == total as u64 {
            break;
        }
        if let Ok(Some(status)) = daemon.child.try_wait() {
            panic!("the daemon exited ({status}):\n{}", daemon.log());
        }
        assert!(
            started.elapsed() < Duration::from_secs(3600),
            "no end to the soak"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    harness
        .wait_for_checkpoints(&mut daemon, BOTH, total as u64)
        .await;
    harness.assert_exact(&events);
    assert_consistent(&harness, &events, "after the soak");

    // Compare the first and the last third of the run: a leak grows with the feed.
    let third = samples.len() / 3;
    assert!(third > 0, "too few samples: {samples:?}");
    let max_of = |part: &[(u64, usize, u64)]| {
        let fds = part.iter().map(|s| s.1).max().unwrap_or(0);
        let rss = part.iter().map(|s| s.2).max().unwrap_or(0);
        (fds, rss)
    };
    let (early_fds, early_rss) = max_of(&samples[..third]);
    let (late_fds, late_rss) = max_of(&samples[samples.len() - third..]);
    let peak_rss = samples.iter().map(|s| s.2).max().unwrap_or(0);
    eprintln!(
        "soak: {total} events in {:.1}s ({:.0} events/s) with {} faults; fds early {early_fds}, late {late_fds}; RSS early {early_rss} KiB, late {late_rss} KiB, peak {peak_rss} KiB",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        harness.server.faults_injected(),
    );
    // Sockets for 32 body requests at once, the database, its WAL, the lock, the control socket.
    assert!(
        late_fds <= early_fds + 8,
        "descriptors grew: {early_fds} -> {late_fds}"
    );
    assert!(late_fds < 64, "{late_fds} descriptors open");
    assert!(
        late_rss <= early_rss + early_rss / 2 + 4096,
        "memory grew: {early_rss} KiB -> {late_rss} KiB"
    );
    let (status, log) = daemon.terminate().await;
    assert!(status.success() && !log.contains("panicked"), "{log}");
}
