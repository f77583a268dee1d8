//! systemd's notify protocol (Type=notify units), through the sd-notify crate. Every call is a
//! no-op when the daemon does not run under systemd (no `NOTIFY_SOCKET`), and a failure to
//! notify is logged, never fatal: the daemon's work does not depend on systemd hearing it.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(err) = sd_notify::notify(states) {
        tracing::debug!("systemd notification failed: {err}");
    }
}

/// The database is open and the control socket listens.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The one-line summary `systemctl status` shows.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// A reload has begun; `ready` ends it.
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    send(&states);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// The unit's WatchdogSec, if it set one for this process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}
