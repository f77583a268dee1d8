//! The daemon: it holds the instance lock and the control socket for the life of the process,
//! runs an [`Engine`](engine) (the writer and the feed readers of one configuration), and turns
//! every request, from the socket or from a signal, into the same code path (`supervisor.rs`).
//!
//! A reload stops the running engine (its batches in flight commit or roll back whole) and
//! starts one from the new configuration at the committed checkpoints; if the new one cannot
//! start, the previous configuration is started again. Pauses live in the database, so they
//! survive both a reload and a restart.

mod changes;
mod engine;
mod lease_state;
mod leases;
mod rebuild;
mod start;
mod supervisor;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::handle::Inbox;
use crate::control::server::ControlSocket;
use crate::projection::ConfiguredProjection;
use crate::store;
use engine::CarriedMonitors;
use supervisor::Supervisor;

pub use changes::{cancel_rebuild, reset_checkpoint, skip_halted_event};
pub use rebuild::{rebuild_alone, RebuildEnd};

/// Runs until a `stop` request, then lets every batch in flight commit or roll back whole and
/// returns. A failing feed never ends it; only a database that cannot be opened does.
pub async fn run(
    config: Config,
    projections: Vec<ConfiguredProjection>,
    // A parameter, so that it is dropped after every local, the instance lock included.
    mut inbox: Inbox,
) -> anyhow::Result<()> {
    // Held until the process exits: one daemon per SQLite database (on PostgreSQL, leases
    // share the feeds out). The kernel drops it even on kill -9.
    let _instance_lock = match &config.daemon.postgres {
        Some(_) => None,
        None => Some(store::lock_instance(
            &config.daemon.database,
            config.daemon.database_mode.0,
        )?),
    };
    let socket = ControlSocket::bind(
        &config.daemon.control_socket,
        config.daemon.control_socket_mode,
    )?;
    let socket_path = socket.path().to_path_buf();
    for setting in crate::feed::http::proxy::unusable_settings(|name| std::env::var(name).ok()) {
        tracing::warn!("{setting}");
    }
    let metrics_listener = match &config.daemon.metrics_listen {
        Some(address) => Some(crate::metrics::server::bind(address.get_ref()).await?),
        None => None,
    };
    let engine = start::start_engine(&config, projections.clone(), &CarriedMonitors::new()).await?;
    let mut supervisor = Supervisor::new(config, projections, engine);
    let stop_serving = CancellationToken::new();
    let server = tokio::spawn(socket.serve(inbox.handle(), stop_serving.clone()));
    if let Some(graphite) = supervisor.config.daemon.graphite.clone() {
        tracing::info!(address = %graphite.address, "pushing to graphite every {}", humantime::format_duration(graphite.interval.0));
        tokio::spawn(crate::metrics::graphite::push(
            graphite.address,
            graphite.prefix,
            graphite.interval.0,
            inbox.handle(),
            stop_serving.clone(),
        ));
    }
    if let Some(listener) = metrics_listener {
        let address = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        tracing::info!(address, "serving /metrics, /healthz and /readyz");
        tokio::spawn(crate::metrics::server::serve(
            listener,
            inbox.handle(),
            supervisor.config.daemon.stuck_after.0,
            stop_serving.clone(),
        ));
    }
    tracing::info!(
        database = %supervisor.config.daemon.database_shown(),
        socket = %socket_path.display(),
        "projector is running"
    );
    crate::notify::ready(&supervisor.status().summary());

    let result = supervisor.serve(&mut inbox).await;

    crate::notify::stopping();
    tracing::info!("stopping: letting the batches in flight finish");
    let stopped = supervisor.stop(&mut inbox).await;
    stop_serving.cancel();
    // The socket file goes when the server does, so a new daemon can start at once.
    let _ = server.await;
    result.and(stopped)?;
    tracing::info!("stopped");
    // Dropping the inbox, last, tells a waiting `ctl stop` that the daemon has finished.
    Ok(())
}

fn names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names.collect::<Vec<_>>().join(", ")
}
