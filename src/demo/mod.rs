//! What `projector demo` runs on, and the tests and the benchmark too: an in-process feed server
//! that serves made-up bank events in both formats and injects faults on request, the bank
//! events and the balances they fold to, and the `consumer.toml` that reads them.
//!
//! Behind the default-on cargo feature `demo`: a build without it (`--no-default-features`) is
//! the daemon alone, without axum.

pub mod bank;
pub mod consumer_toml;
pub mod faults;
pub mod feed_server;
mod tls;
