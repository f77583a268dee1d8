//! `projector run`: the daemon in the foreground, stopped by SIGTERM or SIGINT.

use std::path::Path;
use std::process::ExitCode;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

pub fn run(path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    let projections = crate::projection::build_all(&config)?;
    super::init_logging("info");
    super::runtime()?.block_on(async {
        let shutdown = CancellationToken::new();
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let stopper = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = terminate.recv() => tracing::info!("SIGTERM received"),
                _ = interrupt.recv() => tracing::info!("SIGINT received"),
            }
            stopper.cancel();
        });
        crate::daemon::run(&config, projections, shutdown).await
    })?;
    Ok(ExitCode::SUCCESS)
}
