//! What the daemon asks of a writer besides batches, on a store several daemons share: lease
//! rounds, and operators' changes made wherever the feed is applied.

use std::collections::{BTreeMap, BTreeSet};

/// What an operator asks to be done to a projection, wherever its feed is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorChange {
    Rebuild,
    CancelRebuild,
    /// Move the event it halted on into the dead letters, and its checkpoint past it.
    Skip,
    /// Move its checkpoint to this offset.
    Reset(u64),
}

/// What a lease round asks of the writer.
#[derive(Debug, Clone)]
pub struct LeaseRequest {
    /// The feeds this daemon reads (those with projections).
    pub feeds: Vec<String>,
}

/// What a lease round found.
#[derive(Debug, Clone, Default)]
pub struct LeaseReport {
    /// The feeds whose leases this daemon holds now.
    pub held: BTreeSet<String>,
    /// Held beyond this daemon's share while another daemon holds less than its own: to hand
    /// back once their readers have stopped.
    pub surplus: Vec<String>,
    /// The feeds paused, by whichever daemon.
    pub paused: BTreeSet<String>,
    /// The daemons whose sessions are alive, by id, with the feeds each holds.
    pub daemons: BTreeMap<String, Vec<String>>,
}
