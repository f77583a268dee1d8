//! Serves a made-up Flux bank feed, so `projector run` with the shipped `consumer.toml` has
//! something to read without the Go bank example:
//!
//! ```sh
//! cargo run --release --example bank_feed -- --events 100000 --port 3000 [--fault-rate 0.1] [--grow-per-second 50]
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use projector::demo::bank;
use projector::demo::feed_server::FeedServer;

/// A Flux-compatible bank feed on 127.0.0.1.
#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    events: usize,
    #[arg(long, default_value_t = 3000)]
    port: u16,
    /// The fraction of requests that fail with a random transient fault.
    #[arg(long, default_value_t = 0.0)]
    fault_rate: f64,
    /// Append this many new events every second (0: a fixed feed).
    #[arg(long, default_value_t = 0)]
    grow_per_second: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Generate the whole (possibly growing) feed up front so that growth continues the same seed.
    let total = args.events + args.grow_per_second * 3600;
    let mut events = bank::generate(args.seed, total).into_iter();
    let server = FeedServer::start(
        SocketAddr::from(([127, 0, 0, 1], args.port)),
        events.by_ref().take(args.events).collect(),
    )
    .await?;
    if args.fault_rate > 0.0 {
        server.random_faults(args.seed, args.fault_rate);
    }
    println!("serving {} events at {}", server.len(), server.url());
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if args.grow_per_second > 0 {
            server.append(events.by_ref().take(args.grow_per_second).collect());
        }
    }
}
