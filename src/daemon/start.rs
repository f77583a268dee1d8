//! Starting an engine on the configured store: SQLite's, one daemon's alone, or PostgreSQL's,
//! shared with the other daemons by leases.

use super::engine::{CarriedMonitors, Engine};
use crate::config::Config;
use crate::projection::ConfiguredProjection;

/// Opens the store and starts the engine of `config`, each feed's monitor carrying on from
/// `carried`.
pub(super) async fn start_engine(
    config: &Config,
    projections: Vec<ConfiguredProjection>,
    carried: &CarriedMonitors,
) -> anyhow::Result<Engine> {
    match &config.daemon.postgres {
        Some(store) => super::leases::start(config, store, projections, carried).await,
        None => Engine::start_on_sqlite(config, projections, carried).await,
    }
}
