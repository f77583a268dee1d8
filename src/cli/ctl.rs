//! `projector ctl`: steer a running daemon through its control socket (status, pause, resume,
//! reload, stop). Exit status: 0 done, 1 the daemon refused or failed, 2 a usage or config
//! error, 3 the daemon is not running.

use super::exit::Exit;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;

use crate::config::Config;
use crate::control::client::{ClientError, ControlClient};
use crate::control::protocol::{
    eta_text, ClusterStatus, DaemonStatus, FeedState, FeedStatus, Reply, Request,
};
use crate::shown::escaped;

/// How long a reply may take: a pause waits for the batch in flight, a reload restarts the
/// readers.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `stop` waits for the daemon to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Subcommand)]
pub enum Action {
    /// Each feed's state, head, lag, rate, time left, retries and last error; each projection's
    /// checkpoint, events applied, dead letters and last apply.
    Status {
        /// Refresh every two seconds, in place on a terminal, until the daemon stops or Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
    /// Pause one feed, or every feed: no more requests, no more writes. Kept across restarts.
    Pause {
        /// The feed to pause (all feeds if omitted).
        feed: Option<String>,
    },
    /// Resume one feed, or every feed, at its exact next offset.
    Resume {
        /// The feed to resume (all feeds if omitted).
        feed: Option<String>,
    },
    /// Reload the configuration file (as SIGHUP does) and say whether it was taken.
    Reload,
    /// Stop the daemon gracefully and wait until it has exited.
    Stop,
}

/// How often `status --watch` asks again.
const WATCH_EVERY: Duration = Duration::from_secs(2);

pub fn ctl(
    config: &Path,
    socket: Option<PathBuf>,
    json: bool,
    action: Action,
) -> anyhow::Result<Exit> {
    let socket = match socket {
        Some(socket) => socket,
        None => Config::daemon_section(config)?.control_socket,
    };
    let request = match action {
        Action::Status { watch: true } => return watch_status(&socket, json),
        Action::Status { watch: false } => Request::Status,
        Action::Pause { feed } => Request::Pause { feed },
        Action::Resume { feed } => Request::Resume { feed },
        Action::Reload => Request::Reload,
        Action::Stop => Request::Stop,
    };
    let exchange = ControlClient::connect(&socket, REPLY_TIMEOUT)
        .and_then(|mut client| client.send(&request).map(|reply| (client, reply)));
    let (mut client, reply) = match exchange {
        Ok(exchanged) => exchanged,
        Err(err) => return Ok(fail(json, &err.to_string(), exit_for(&err))),
    };
    if json {
        say!("{}", serde_json::to_string(&reply)?);
    }
    if !reply.ok {
        let error = reply
            .error
            .as_deref()
            .unwrap_or("the daemon refused without a reason");
        // With --json the reply, printed above, says it already.
        if !json {
            complain!("projector: {}", escaped(error));
        }
        return Ok(Exit::Failure);
    }
    if !json {
        match &reply.status {
            Some(status) => say_partly!("{}", render_status(status)),
            None => say!("{}", escaped(&describe(&reply))),
        }
    }
    if request == Request::Stop {
        if !client.wait_until_closed(STOP_TIMEOUT) {
            let message = format!(
                "asked to stop, but it is still stopping after {}s",
                STOP_TIMEOUT.as_secs()
            );
            return Ok(fail(json, &message, Exit::Failure));
        }
        if !json {
            say!("stopped");
        }
    }
    Ok(Exit::Success)
}

/// Says why `ctl` failed: on stderr, or as the protocol's error reply on stdout with `--json`,
/// so that a script reads every outcome the same way.
fn fail(json: bool, error: &str, exit: Exit) -> Exit {
    if json {
        say!("{}", serde_json::json!({"ok": false, "error": error}));
    } else {
        complain!("projector: {}", escaped(error));
    }
    exit
}

/// `status --watch`: the status again every WATCH_EVERY, over one connection, until the daemon
/// goes away.
fn watch_status(socket: &Path, json: bool) -> anyhow::Result<Exit> {
    use std::io::IsTerminal;
    let mut client = match ControlClient::connect(socket, REPLY_TIMEOUT) {
        Ok(client) => client,
        Err(err) => return Ok(fail(json, &err.to_string(), exit_for(&err))),
    };
    let terminal = !json && std::io::stdout().is_terminal();
    loop {
        let reply = match client.send(&Request::Status) {
            Ok(reply) => reply,
            // It answered before: it has stopped since.
            Err(_) => {
                if !json {
                    say!("projector has stopped");
                }
                return Ok(Exit::Success);
            }
        };
        match (&reply.status, json) {
            (_, true) => say!("{}", serde_json::to_string(&reply)?),
            (Some(status), false) => {
                if terminal {
                    // Home and clear: the new status replaces the old in place.
                    say_partly!("\x1b[H\x1b[2J");
                }
                say_partly!("{}", render_status(status));
                say!(
                    "\n(every {}s; Ctrl-C to stop watching)",
                    WATCH_EVERY.as_secs()
                );
            }
            (None, false) => {
                let error = reply
                    .error
                    .unwrap_or_else(|| "no status in the reply".into());
                return Ok(fail(false, &error, Exit::Failure));
            }
        }
        std::thread::sleep(WATCH_EVERY);
    }
}

fn exit_for(err: &ClientError) -> Exit {
    if err.is_not_running() {
        Exit::NotRunning
    } else {
        Exit::Failure
    }
}

fn describe(reply: &Reply) -> String {
    reply.message.clone().unwrap_or_else(|| "done".into())
}

/// The status for people: a header, then a block per feed with a line per projection.
pub fn render_status(status: &DaemonStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "projector {} (pid {}), up {}, config {}",
        status.version,
        status.pid,
        humantime::format_duration(Duration::from_secs(status.uptime_seconds)),
        escaped(&status.config)
    );
    let _ = writeln!(out, "database {}", escaped(&status.database));
    if status.stopping {
        let _ = writeln!(out, "stopping: the batches in flight are finishing");
    }
    if let Some(at) = &status.reloaded_at {
        let _ = writeln!(out, "reloaded at {at}");
    }
    if let Some(slow) = &status.slow_batch {
        let _ = writeln!(out, "writer on {}", escaped(&slow.describe()));
    }
    if let Some(cluster) = &status.cluster {
        render_cluster(&mut out, cluster);
    }
    if status.log_lines_dropped > 0 {
        let _ = writeln!(
            out,
            "log lines dropped: {} (stderr closed or full)",
            status.log_lines_dropped
        );
    }
    for feed in &status.feeds {
        out.push('\n');
        render_feed(&mut out, feed);
    }
    out
}

/// Who shares the PostgreSQL schema, and which feeds each applies.
fn render_cluster(out: &mut String, cluster: &ClusterStatus) {
    let _ = writeln!(out, "this daemon {}", escaped(&cluster.this));
    if let Some(error) = &cluster.error {
        let _ = writeln!(
            out,
            "  lease round failing, standing by on every feed: {}",
            escaped(error)
        );
    }
    for daemon in &cluster.daemons {
        let role = if daemon.feeds.is_empty() {
            "stands by".to_string()
        } else {
            format!("holds {}", daemon.feeds.join(", "))
        };
        let here = if daemon.id == cluster.this {
            " (this one)"
        } else {
            ""
        };
        let _ = writeln!(out, "  daemon {}{here}: {role}", escaped(&daemon.id));
    }
}

fn render_feed(out: &mut String, feed: &FeedStatus) {
    let _ = writeln!(
        out,
        "feed {}: {}  ({})",
        feed.name,
        feed.state.as_str(),
        escaped(&feed.url)
    );
    if let Some(holder) = &feed.lease_holder {
        let _ = writeln!(out, "  lease held by {}", escaped(holder));
    } else if feed.state == FeedState::Standby {
        let _ = writeln!(
            out,
            "  lease free: the first daemon to take it applies the feed"
        );
    }
    if let Some(reason) = &feed.halted_reason {
        let _ = writeln!(out, "  halted: {}", escaped(reason));
    }
    if let Some(seconds) = feed.stalled_seconds {
        let _ = writeln!(
            out,
            "  stalled: the checkpoints have not moved for {} while the head is ahead",
            eta_text(seconds)
        );
    }
    let known = |value: Option<u64>| value.map_or("unknown".to_string(), |v| v.to_string());
    let head = match (feed.head, feed.head_exact) {
        (Some(head), true) => head.to_string(),
        // Only the end of the last page read: the head is at least there.
        (Some(head), false) => format!(">={head}"),
        (None, _) => "unknown".into(),
    };
    let lag = match (feed.lag, feed.head_exact) {
        (Some(lag), false) => format!(">={lag}"),
        (lag, _) => known(lag),
    };
    let mut line = format!(
        "  head {head}  lag {lag}  rate {:.0} events/s",
        feed.events_per_second
    );
    if let Some(eta) = feed.eta_seconds {
        let _ = write!(line, "  about {} left", eta_text(eta));
    }
    let _ = writeln!(
        out,
        "{line}  read {}  retries {}",
        feed.events_read, feed.retries
    );
    if let Some(error) = &feed.last_error {
        let _ = writeln!(
            out,
            "  last error at {}: {}",
            error.at,
            escaped(&error.message)
        );
    }
    if let Some(hint) = &feed.hint {
        let _ = writeln!(out, "  hint: {}", escaped(hint));
    }
    let width = feed
        .projections
        .iter()
        .map(|p| p.name.len())
        .max()
        .unwrap_or(0)
        .max("projection".len());
    let _ = writeln!(
        out,
        "  {:width$}  {:>10}  {:>8}  {:>9}  {:>12}  {:<20}  state",
        "projection", "checkpoint", "lag", "applied", "dead letters", "last applied"
    );
    for projection in &feed.projections {
        let mut state = match &projection.halted {
            Some(reason) => format!("halted at {}", escaped(reason)),
            None if projection.definition_changed => {
                "definition changed: old tables served until the rebuild replaces them".into()
            }
            None => "ok".to_string(),
        };
        if let Some(seconds) = projection.lag_seconds.filter(|s| *s >= 1.0) {
            let _ = write!(state, "; {} behind in time", eta_text(seconds as u64));
        }
        if let Some(rebuild) = &projection.rebuild {
            let _ = write!(
                state,
                "; rebuilding: at offset {}{}{}",
                rebuild.checkpoint,
                rebuild
                    .lag
                    .map_or(String::new(), |lag| format!(", {lag} to go")),
                rebuild
                    .halted
                    .as_ref()
                    .map_or(String::new(), |reason| format!(
                        ", halted at {}",
                        escaped(reason)
                    ))
            );
        }
        let _ = writeln!(
            out,
            "  {:width$}  {:>10}  {:>8}  {:>9}  {:>12}  {:<20}  {state}",
            projection.name,
            projection.checkpoint,
            known(projection.lag),
            projection.applied,
            projection.dead_letters,
            projection.last_applied_at.as_deref().unwrap_or("-"),
        );
    }
}
