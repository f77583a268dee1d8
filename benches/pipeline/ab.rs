//! A/B: pairs of Flux catch-ups of two variants of the daemon, the order alternating from pair to
//! pair, so that the machine's drift weighs on both alike.

use projector::config::{FeedFormat, Synchronous};
use projector::demo::feed_server::{FeedServer, StoredEvent};

use crate::median_of;
use crate::runs::{catch_up_with, CatchUp, Projections, Setup, Variant};

/// Pairs of Flux catch-ups, one per variant, the order alternating from pair to pair; prints
/// each pair and the medians.
pub async fn ab(
    variants: [Variant; 2],
    server: &FeedServer,
    events: &[StoredEvent],
    synchronous: Synchronous,
    pairs: usize,
) {
    let flux = Setup {
        format: FeedFormat::Flux,
        projections: Projections::Both,
        mapping: None,
    };
    let total = events.len() as f64;
    println!(
        "A/B: {pairs} pairs of Flux catch-ups of {} events, both shipped projections: {} against {}",
        events.len(),
        variants[0].name,
        variants[1].name
    );
    let mut runs: [Vec<CatchUp>; 2] = [Vec::new(), Vec::new()];
    for pair in 0..pairs {
        let order = if pair % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let (run, _) = catch_up_with(&variants[side], server, flux, events, synchronous).await;
            runs[side].push(run);
        }
        let described: Vec<String> = (0..2)
            .map(|side| {
                let run = &runs[side][pair];
                format!(
                    "{} {:.0} events/s, {:.1} µs an event",
                    variants[side].name,
                    run.events_per_second,
                    1e6 * run.cpu_seconds / total
                )
            })
            .collect();
        println!("  pair {}: {}", pair + 1, described.join("; "));
    }
    let rate = |runs: &[CatchUp]| median_of(runs, |d| d.events_per_second);
    let cpu = |runs: &[CatchUp]| median_of(runs, |d| 1e6 * d.cpu_seconds / total);
    let first_faster = runs[0]
        .iter()
        .zip(&runs[1])
        .filter(|(a, b)| a.events_per_second > b.events_per_second)
        .count();
    println!();
    println!("| (median of {pairs} pairs) | events/s | CPU an event |");
    println!("| --- | --- | --- |");
    for side in 0..2 {
        println!(
            "| {} | {:.0} | {:.1} µs |",
            variants[side].name,
            rate(&runs[side]),
            cpu(&runs[side])
        );
    }
    println!(
        "{} reads {:.1}% fewer events/s than {} ({} faster in {first_faster} of {pairs} pairs)",
        variants[1].name,
        100.0 * (1.0 - rate(&runs[1]) / rate(&runs[0])),
        variants[0].name,
        variants[0].name,
    );
}
