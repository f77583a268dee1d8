//! The cost of reading an inline feed through a mapping: pairs of inline catch-ups of the same
//! pages, one read as an inline feed and one through a `[feed.mapping]` that names every field
//! with a JSON pointer, the order alternating from pair to pair.

use projector::config::{FeedFormat, Synchronous};
use projector::demo::feed_server::{FeedServer, StoredEvent};

use crate::median_of;
use crate::runs::{catch_up, CatchUp, Projections, Setup};

/// The demo's inline pages, every field named.
const EVENTHUS_MAPPING: &str = r#"events = "/events"
id = "/id"
type = "/type"
aggregate_id = "/aggregate_id"
aggregate_name = "/aggregate_type"
version = "/version"
created = "/created"
payload = "/data""#;

/// Prints each pair and the medians of events/s and CPU an event.
pub async fn mapped(
    binary: &std::path::Path,
    server: &FeedServer,
    events: &[StoredEvent],
    synchronous: Synchronous,
    pairs: usize,
) {
    let sides = [
        (
            "inline",
            Setup {
                format: FeedFormat::Inline,
                projections: Projections::Both,
                mapping: None,
            },
        ),
        (
            "mapped",
            Setup {
                format: FeedFormat::Inline,
                projections: Projections::Both,
                mapping: Some(EVENTHUS_MAPPING),
            },
        ),
    ];
    let total = events.len() as f64;
    println!(
        "mapped: {pairs} pairs of inline catch-ups of {} events, both shipped projections, read as inline and through a mapping",
        events.len()
    );
    let mut runs: [Vec<CatchUp>; 2] = [Vec::new(), Vec::new()];
    for pair in 0..pairs {
        let order = if pair % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let (run, _) = catch_up(binary, server, sides[side].1, events, synchronous).await;
            runs[side].push(run);
        }
        println!(
            "  pair {}: inline {:.0} events/s; mapped {:.0} events/s",
            pair + 1,
            runs[0][pair].events_per_second,
            runs[1][pair].events_per_second
        );
    }
    println!();
    println!("| (median of {pairs} pairs) | events/s | CPU an event | peak RSS |");
    println!("| --- | --- | --- | --- |");
    for (side, (name, _)) in sides.iter().enumerate() {
        println!(
            "| {name} | {:.0} | {:.1} µs | {:.1} MB |",
            median_of(&runs[side], |d| d.events_per_second),
            median_of(&runs[side], |d| 1e6 * d.cpu_seconds / total),
            median_of(&runs[side], |d| d.peak_rss_kib as f64 / 1024.0)
        );
    }
}
