//! Projector: a read-model daemon. It polls event feeds over HTTP, folds their events into
//! read models in SQLite through pluggable projections, and keeps each projection's offset in the
//! same transaction as its writes, so every event is applied exactly once.
//!
//! Data flows one way: feed -> pipeline -> writer (projections, checkpoints) -> commit.
#![deny(clippy::unwrap_used)]

/// The command-line interface, one file per subcommand.
pub mod cli;
/// `consumer.toml`: parsing and validation with file:line:column errors.
pub mod config;
/// The control socket: its JSON-lines protocol, the server, the client `ctl` uses, and the
/// handle every request reaches the daemon through.
pub mod control;
/// The supervisor: readers and the writer, pause, resume, reload, status, shutdown.
pub mod daemon;
/// The embedded bank feed (server, faults, events, config) that `demo`, the tests and the
/// benchmark run the daemon against; behind the default-on `demo` feature.
#[cfg(feature = "demo")]
pub mod demo;
/// The Event a feed yields.
pub mod event;
/// Feed clients (one per format), fetch errors and backoff.
pub mod feed;
/// The files and folders the daemon makes, guarded from the other users of the machine.
pub mod files;
/// JSON pointers, as a feed's mapping names its events' fields.
pub mod json_pointer;
/// Logs: text with colours on a terminal, journald-ready under systemd, or JSON.
pub mod logging;
/// Prometheus metrics, health and readiness.
pub mod metrics;
/// The live status of each feed: reader phases, head, lag, rate, errors.
pub mod monitor;
/// systemd's notify protocol: READY, STATUS, WATCHDOG, RELOADING, STOPPING.
pub mod notify;
/// The projection contract, declarative SQL projections, building projections from the config.
pub mod projection;
/// The projection modules that ship (declarative files and Rust modules).
#[path = "../projections/mod.rs"]
pub mod projections;
/// One feed's reader: pages, bodies, batches handed to the writer, retries.
pub mod reader;
/// Text shown to people: URLs without their secrets, control characters escaped, long text cut.
pub mod shown;
/// Unix signals turned into the same requests the control socket takes.
pub mod signals;
/// The SQLite database: pragmas, migrations, checkpoints, dead letters, paused feeds.
pub mod store;
/// The single database writer thread: one transaction per batch.
pub mod writer;
