//! The control socket: a Unix socket speaking one JSON request per line and answering one JSON
//! reply per line, so that `projector ctl`, `socat` or any language can steer the daemon.

pub mod client;
pub mod handle;
pub mod protocol;
pub mod server;
pub mod status;
