//! Crash consistency: the real binary is killed with SIGKILL at seeded random moments while it
//! catches up on a growing, faulty feed, and restarted each time. After every kill the read
//! model must be exactly the fold of the events up to each checkpoint, and every checkpoint must
//! name the event id the feed has at its offset; at the end the fold of the whole feed.
//!
//! `cargo test --test crash` runs 24 kills. More on demand, with the seed printed:
//! `PROJECTOR_CRASH_KILLS=300 PROJECTOR_CRASH_SEED=7 cargo test --release --test crash -- --nocapture`

mod common;

use std::time::Duration;

use common::{assert_consistent, Harness, Store};
use projector::demo::bank;
use projector::demo::consumer_toml::BOTH_PROJECTIONS;

const BOTH: &[&str] = &["account_balances", "account_ledger"];

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

on_both_stores! {
    sigkill_at_random_moments =>
        sigkill_at_random_moments_of_a_faulty_catch_up_leaves_the_read_model_exact,
        sigkill_at_random_moments_of_a_faulty_catch_up_on_postgres_leaves_the_read_models_exact;
}

async fn sigkill_at_random_moments(store: Store) {
    let kills = env_number("PROJECTOR_CRASH_KILLS", 24);
    let seed = env_number("PROJECTOR_CRASH_SEED", 20_261_122);
    eprintln!(
        "crash test: seed {seed}, {kills} kills (PROJECTOR_CRASH_SEED, PROJECTOR_CRASH_KILLS)"
    );
    let chunk = 300;
    let all = bank::generate(seed, 3000 + chunk * kills as usize);
    let mut served = 3000;
    let harness = Harness::on(store, all[..served].to_vec()).await;
    harness.write_config(&harness.server.url(), BOTH_PROJECTIONS, "");
    harness.server.random_faults(seed, 0.05);
    let mut moments = fastrand::Rng::with_seed(seed);

    for kill in 1..=kills {
        let mut daemon = harness.spawn();
        // A random moment: start-up, mid-page, mid-commit or idle at the head.
        tokio::time::sleep(Duration::from_millis(moments.u64(5..400))).await;
        if let Ok(Some(status)) = daemon.child.try_wait() {
            panic!(
                "seed {seed}, kill {kill}: the daemon exited by itself ({status}):\n{}",
                daemon.log()
            );
        }
        daemon.kill();
        let reached = harness.checkpoints().values().min().copied().unwrap_or(0);
        eprintln!("kill {kill}: checkpoints at {reached} of {served} events");
        assert_consistent(
            &harness,
            &all[..served],
            &format!("seed {seed}, after kill {kill}"),
        );
        harness.server.append(all[served..served + chunk].to_vec());
        served += chunk;
    }

    // Before the feed itself gets clean, the faulty one must still converge.
    let mut daemon = harness.spawn();
    harness
        .wait_for_checkpoints(&mut daemon, BOTH, all.len() as u64)
        .await;
    harness.assert_exact(&all);
    assert_consistent(&harness, &all, &format!("seed {seed}, at the end"));
    let (status, log) = daemon.terminate().await;
    assert!(status.success(), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}
