//! `projector skip NAME` and `projector reset NAME --to OFFSET`: an operator moves a
//! projection's checkpoint, through the running daemon (which stops its readers meanwhile) or,
//! with none running, directly in the database.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use super::exit::{Exit, UsageError};
use crate::config::Config;
use crate::control::client::ControlClient;
use crate::control::protocol::Request;
use crate::shown::escaped;

/// A restart of the daemon's readers fits in this.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

pub fn skip(config_path: &Path, name: &str) -> anyhow::Result<Exit> {
    let config = Config::load(config_path)?;
    let request = Request::Skip {
        projection: name.to_string(),
    };
    through_daemon_or_alone(&config, name, request, |database| {
        crate::daemon::skip_halted_event(database, name)
    })
}

pub fn reset(config_path: &Path, name: &str, offset: u64, yes: bool) -> anyhow::Result<Exit> {
    let config = Config::load(config_path)?;
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(UsageError(format!(
                "reset moves {name}'s checkpoint without undoing anything: confirm with --yes"
            ))
            .into());
        }
        say_partly!(
            "Move {name}'s checkpoint to offset {offset}? Its tables keep what the events from there wrote, and those events are applied again on top. Type the projection's name to confirm: "
        );
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if answer.trim() != name {
            say!("not confirmed: nothing changed");
            return Ok(Exit::Failure);
        }
    }
    let request = Request::Reset {
        projection: name.to_string(),
        offset,
    };
    through_daemon_or_alone(&config, name, request, |database| {
        crate::daemon::reset_checkpoint(database, name, offset)
    })
}

/// Sends `request` to the running daemon; with none running, takes the instance lock and makes
/// `change` to the database itself. Prints what was done.
pub fn through_daemon_or_alone(
    config: &Config,
    name: &str,
    request: Request,
    change: impl FnOnce(&Path) -> anyhow::Result<String>,
) -> anyhow::Result<Exit> {
    if let Some(exit) = ask_running_daemon(config, &request)? {
        return Ok(exit);
    }
    if !config.projections.iter().any(|p| p.name() == name) {
        anyhow::bail!(
            "no projection named {name:?} in {}",
            config.source.path.display()
        );
    }
    let database = config
        .daemon
        .sqlite_file("changing a checkpoint with no daemon")?;
    let _lock = crate::store::lock_instance(database, config.daemon.database_mode.0)?;
    say!("{}", change(database)?);
    Ok(Exit::Success)
}

/// Sends `request` to the daemon running on `config`'s socket and prints its answer; None if
/// no daemon runs.
pub fn ask_running_daemon(config: &Config, request: &Request) -> anyhow::Result<Option<Exit>> {
    let mut client = match ControlClient::connect(&config.daemon.control_socket, REPLY_TIMEOUT) {
        Ok(client) => client,
        Err(err) if err.is_not_running() => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    let reply = client.send(request)?;
    Ok(Some(if reply.ok {
        say!("{}", escaped(reply.message.as_deref().unwrap_or("done")));
        Exit::Success
    } else {
        let error = reply.error.unwrap_or_else(|| "the daemon refused".into());
        complain!("projector: {}", escaped(&error));
        Exit::Failure
    }))
}
