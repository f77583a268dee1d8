//! What a daemon sharing a PostgreSQL schema knows of the leases: where it stands with each
//! feed's, and who holds what, as its last lease round found them (`leases.rs` keeps both
//! current; `status` reads them).

use std::collections::BTreeMap;

/// Where this daemon stands with a feed's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lease {
    /// Another daemon holds it, or none does yet.
    Standby,
    Held,
    /// Held beyond this daemon's share: its readers stop, then it is given back.
    HandingBack,
}

/// The leases as the last round found them, for `status`.
#[derive(Debug, Clone, Default)]
pub(super) struct LeaseView {
    /// This daemon's id.
    pub(super) this: String,
    /// The daemons whose sessions are alive, by id, with the feeds each holds.
    pub(super) daemons: BTreeMap<String, Vec<String>>,
    /// Why the last round failed, if it did.
    pub(super) error: Option<String>,
}

impl LeaseView {
    /// The daemon holding `feed`'s lease, if one does.
    pub(super) fn holder(&self, feed: &str) -> Option<&str> {
        self.daemons
            .iter()
            .find(|(_, feeds)| feeds.iter().any(|f| f == feed))
            .map(|(daemon, _)| daemon.as_str())
    }
}
