//! The leases of several daemons on one schema, as the writer takes and gives them back on its
//! own connection.

use super::{Connection, PostgresWriter};
use crate::store::postgres as pg;
use crate::writer::requests::{LeaseReport, LeaseRequest};
use crate::writer::ApplyError;

impl PostgresWriter {
    /// Keeps this daemon's session alive and takes the leases it may, up to its share of the
    /// feeds; says which it holds beyond its share while another daemon holds less.
    pub(super) fn lease_round(
        &mut self,
        request: &LeaseRequest,
    ) -> Result<LeaseReport, ApplyError> {
        let schema = self.store.schema.clone();
        let id = self.id.clone();
        self.connection()?;
        let Some(Connection { client, .. }) = self.conn.as_mut() else {
            return Err(ApplyError::Internal("no connection".into()));
        };
        let mut daemons = pg::cluster(client).map_err(ApplyError::postgres)?;
        let share = request.feeds.len().div_ceil(daemons.len().max(1));
        let mut taken = false;
        // Each daemon tries the feeds in an order of its own, so that daemons starting together
        // spread over the feeds rather than race for the first.
        let mut order = request.feeds.clone();
        order.sort_by_key(|feed| spread_key(&id, feed));
        for feed in order {
            if self.held.len() >= share {
                break;
            }
            if !self.held.contains(&feed)
                && pg::try_lease(client, &schema, &feed, &id).map_err(ApplyError::postgres)?
            {
                tracing::info!(feed = %feed, "took the feed's lease: applying it here");
                self.held.insert(feed);
                taken = true;
            }
        }
        if taken {
            daemons = pg::cluster(client).map_err(ApplyError::postgres)?;
        }
        let others_short = daemons
            .iter()
            .any(|(daemon, feeds)| *daemon != id && feeds.len() < share);
        let surplus = if others_short && self.held.len() > share {
            self.held
                .iter()
                .rev()
                .take(self.held.len() - share)
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        Ok(LeaseReport {
            held: self.held.clone(),
            surplus,
            paused: pg::paused_feeds(client).map_err(ApplyError::postgres)?,
            daemons,
        })
    }

    /// Gives `feed`'s lease back, once its readers have stopped.
    pub(super) fn give_back(&mut self, feed: &str) -> Result<(), ApplyError> {
        if !self.held.remove(feed) {
            return Ok(());
        }
        let schema = self.store.schema.clone();
        let conn = self.connection()?;
        pg::release_lease(&mut conn.client, &schema, feed).map_err(ApplyError::postgres)?;
        tracing::info!(feed, "handed the feed's lease back");
        Ok(())
    }
}

/// A key ordering `feed` for daemon `id`: stable for the pair, different between daemons.
fn spread_key(id: &str, feed: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (id, feed).hash(&mut hasher);
    hasher.finish()
}
