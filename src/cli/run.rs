//! `projector run`: the daemon in the foreground, steered by signals and the control socket.

use super::exit::Exit;
use std::path::Path;

use anyhow::Context;

use crate::config::Config;

pub fn run(path: &Path) -> anyhow::Result<Exit> {
    // Absolute, so that status and reload name the same file whatever the working folder.
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let config = Config::load(&path)?;
    let projections = crate::projection::build_all(&config)?;
    crate::logging::init("info", config.daemon.log_format);
    let ran = super::daemon_runtime()?.block_on(async {
        let (control, inbox) = crate::control::handle::channel();
        crate::signals::forward(control).context("installing signal handlers")?;
        crate::daemon::run(config, projections, inbox).await
    });
    // The last lines before a failure's message, which main writes.
    crate::logging::flush();
    ran?;
    Ok(Exit::Success)
}
