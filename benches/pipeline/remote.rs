//! The remote case: the feed answers every request after a fixed delay, as a feed across a
//! network does, and the daemon's Flux catch-up is measured against the remote limit (what wrk,
//! or without it the daemon's HTTP client, reads from that feed with `body_concurrency`
//! connections, 32) and
//! against a sequential Flux consumer (a page, then each of its bodies, one request at a time).

use std::time::{Duration, Instant};

use projector::config::{FeedFormat, Synchronous};
use projector::demo::feed_server::{FeedServer, StoredEvent};
use projector::feed::http::parse_uri;

use crate::runs::{catch_up, Projections, Setup};
use crate::wire::{client, wrk_installed, WireLoad};
use crate::{median, PAGE};

/// The daemon's default `body_concurrency`.
const BODY_CONNECTIONS: usize = 32;

pub struct Remote {
    pub delay: Duration,
    pub limit: f64,
    pub sequential: f64,
    pub daemon: Vec<f64>,
    pub cpu_per_event: Vec<f64>,
}

pub async fn remote(
    binary: &std::path::Path,
    server: &FeedServer,
    events: &[StoredEvent],
    synchronous: Synchronous,
    delay: Duration,
    runs: usize,
) -> Remote {
    server.set_delay(delay);
    let load = WireLoad::new(server, FeedFormat::Flux, events);
    let limit = match wrk_installed() {
        true => load.wrk_rate_at(BODY_CONNECTIONS),
        false => load.client_rate_at(BODY_CONNECTIONS).await,
    };
    let sequential = sequential_rate(server, events).await;
    let setup = Setup {
        format: FeedFormat::Flux,
        projections: Projections::Both,
        mapping: None,
    };
    let mut daemon = Vec::new();
    let mut cpu_per_event = Vec::new();
    for run in 1..=runs {
        let (figures, _dir) = catch_up(binary, server, setup, events, synchronous).await;
        println!(
            "  {} ms, run {run}: {:.0} events/s, {:.1} µs of CPU an event",
            delay.as_millis(),
            figures.events_per_second,
            figures.cpu_seconds * 1e6 / events.len() as f64
        );
        daemon.push(figures.events_per_second);
        cpu_per_event.push(figures.cpu_seconds * 1e6 / events.len() as f64);
    }
    server.set_delay(Duration::ZERO);
    Remote {
        delay,
        limit,
        sequential,
        daemon,
        cpu_per_event,
    }
}

/// Events a second of a consumer that reads a page, then each of its bodies, one request at a
/// time, over 3 seconds.
async fn sequential_rate(server: &FeedServer, events: &[StoredEvent]) -> f64 {
    let client = client(1);
    let base = format!("http://{}", server.addr());
    let deadline = Instant::now() + Duration::from_secs(3);
    let started = Instant::now();
    let mut done = 0usize;
    'pages: for (page, chunk) in events.chunks(PAGE).enumerate() {
        let url = parse_uri(&format!("{base}/events?offset={}", page * PAGE))
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = client.get(&url).await;
        for event in chunk {
            if Instant::now() >= deadline {
                break 'pages;
            }
            let url =
                parse_uri(&format!("{base}/events/{}", event.id)).unwrap_or_else(|e| panic!("{e}"));
            if client.get(&url).await.is_ok() {
                done += 1;
            }
        }
    }
    done as f64 / started.elapsed().as_secs_f64()
}

pub fn print(remotes: &[Remote]) {
    let tool = match wrk_installed() {
        true => "wrk",
        false => "the daemon's HTTP client (install wrk for the reference figure)",
    };
    println!();
    println!("remote limit: body URLs a second read by {tool} at 32 connections");
    println!("| feed answering after | remote limit (32 connections) | daemon (median) | daemon / limit | sequential consumer | daemon / sequential | CPU an event |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for remote in remotes {
        let daemon = median(remote.daemon.clone());
        println!(
            "| {} ms | {:.0} events/s | {:.0} events/s | {:.0}% | {:.0} events/s | {:.1}x | {:.1} µs |",
            remote.delay.as_millis(),
            remote.limit,
            daemon,
            100.0 * daemon / remote.limit,
            remote.sequential,
            daemon / remote.sequential,
            median(remote.cpu_per_event.clone())
        );
    }
}
