//! `projector projections`: every projection as the database records it (feed, definition and
//! version, checkpoint, halt, rebuild, dead letters), with the configuration beside it and, when
//! a daemon runs, its live figures (the feed's head, so the lag).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use super::exit::Exit;
use crate::config::Config;
use crate::control::client::ControlClient;
use crate::control::protocol::{DaemonStatus, Request};
use crate::shown::escaped;
use crate::store::{self, lifecycle};

/// A status from a running daemon is worth waiting this long for.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// One projection, as `projections` shows it.
#[derive(Debug, Serialize)]
pub struct ProjectionView {
    pub name: String,
    pub feed: String,
    /// `file PATH` or `module NAME`, as configured (or as recorded, once removed).
    pub definition: Option<String>,
    /// The version the tables were built by.
    pub version: Option<String>,
    /// The configured definition's version, when it differs: a rebuild replaces the tables.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub configured_version: Option<String>,
    pub checkpoint: u64,
    pub last_event_id: Option<String>,
    pub lag: Option<u64>,
    /// `running`, `stopped` (no daemon runs), `paused`, `halted`, `rebuilding` or `removed`
    /// (recorded, no longer configured).
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub halted: Option<lifecycle::HaltRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<RebuildView>,
    /// Dead letters waiting for an operator.
    pub dead_letters: u64,
}

#[derive(Debug, Serialize)]
pub struct RebuildView {
    pub checkpoint: u64,
    /// Where the live tables stand: the rebuild replaces them once it gets there.
    pub live_checkpoint: u64,
    pub version: String,
    pub reason: String,
    pub started_at: String,
}

pub fn projections(config_path: &Path, json: bool) -> anyhow::Result<Exit> {
    let config = Config::load(config_path)?;
    let configured = crate::projection::build_all(&config)?;
    let database = config.daemon.sqlite_file("`projector projections`")?;
    if !database.exists() {
        anyhow::bail!(
            "database {} does not exist (has the daemon run yet?)",
            database.display()
        );
    }
    let conn =
        store::open_reader(database).with_context(|| format!("opening {}", database.display()))?;
    let records = lifecycle::projection_records(&conn)?;
    let rebuilds = lifecycle::rebuilds(&conn)?;
    let paused = store::paused_feeds(&conn)?;
    let daemon = running_status(&config);

    let mut views: BTreeMap<String, ProjectionView> = BTreeMap::new();
    for record in &records {
        let configured = configured.iter().find(|p| p.name == record.projection);
        let rebuild = rebuilds.iter().find(|r| r.projection == record.projection);
        let head = daemon.as_ref().and_then(|status| {
            status
                .feeds
                .iter()
                .find(|f| f.name == record.feed)
                .and_then(|f| f.head)
        });
        let live_halt = daemon.as_ref().and_then(|status| {
            status
                .feeds
                .iter()
                .flat_map(|f| &f.projections)
                .find(|p| p.name == record.projection)
                .and_then(|p| p.halted.clone())
        });
        let rebuild = rebuild.map(|rebuild| RebuildView {
            checkpoint: shadow_checkpoint(database, &record.projection).unwrap_or(0),
            live_checkpoint: record.next_offset,
            version: rebuild.version.clone(),
            reason: rebuild.reason.clone(),
            started_at: rebuild.started_at.clone(),
        });
        let halted = record.halted.clone();
        let state = if configured.is_none() {
            "removed"
        } else if halted.is_some() || live_halt.is_some() {
            "halted"
        } else if rebuild.is_some() {
            "rebuilding"
        } else if paused.contains(&record.feed) {
            "paused"
        } else if daemon.is_some() {
            "running"
        } else {
            "stopped"
        };
        let configured_version = configured
            .map(|p| p.version.clone())
            .filter(|version| Some(version) != record.version.as_ref());
        views.insert(
            record.projection.clone(),
            ProjectionView {
                name: record.projection.clone(),
                feed: record.feed.clone(),
                definition: configured
                    .map(|p| p.definition.clone())
                    .or_else(|| record.source.clone()),
                version: record.version.clone(),
                configured_version,
                checkpoint: record.next_offset,
                last_event_id: record.last_event_id.clone(),
                lag: head.map(|head| head.saturating_sub(record.next_offset)),
                state: state.into(),
                halted,
                rebuild,
                dead_letters: store::count_dead_letters(&conn, &record.projection)?,
            },
        );
    }
    for projection in &configured {
        views
            .entry(projection.name.clone())
            .or_insert_with(|| ProjectionView {
                name: projection.name.clone(),
                feed: projection.feed.clone(),
                definition: Some(projection.definition.clone()),
                version: None,
                configured_version: Some(projection.version.clone()),
                checkpoint: 0,
                last_event_id: None,
                lag: None,
                state: "new (starts at the next start or reload)".into(),
                halted: None,
                rebuild: None,
                dead_letters: 0,
            });
    }
    let views: Vec<ProjectionView> = views.into_values().collect();
    if json {
        say!("{}", serde_json::to_string_pretty(&views)?);
    } else {
        say_partly!("{}", render(&views, daemon.is_some()));
    }
    Ok(Exit::Success)
}

/// The running daemon's status, if one answers on the configured socket.
fn running_status(config: &Config) -> Option<DaemonStatus> {
    let mut client = ControlClient::connect(&config.daemon.control_socket, STATUS_TIMEOUT).ok()?;
    client.send(&Request::Status).ok()?.status
}

/// Where the rebuild of `projection` stands, read from its shadow database.
fn shadow_checkpoint(database: &Path, projection: &str) -> Option<u64> {
    let path = lifecycle::shadow_path(database, projection);
    let conn = store::open_reader(&path).ok()?;
    let member = crate::writer::shadow_member(projection);
    store::read_checkpoints(&conn)
        .ok()?
        .into_iter()
        .find(|(name, _)| *name == member)
        .map(|(_, checkpoint)| checkpoint.next_offset)
}

fn render(views: &[ProjectionView], daemon_runs: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if views.is_empty() {
        out.push_str("no projections\n");
    }
    for view in views {
        let version = match (&view.version, &view.configured_version) {
            (Some(built), Some(configured)) => {
                format!("version {built} (configured: {configured})")
            }
            (Some(built), None) => format!("version {built}"),
            (None, Some(configured)) => format!("version {configured}"),
            (None, None) => "version unknown".into(),
        };
        let _ = writeln!(
            out,
            "{}  feed {}  {}  {}",
            escaped(&view.name),
            escaped(&view.feed),
            escaped(view.definition.as_deref().unwrap_or("-")),
            escaped(&version)
        );
        let lag = match view.lag {
            Some(lag) => format!("lag {lag}"),
            None if daemon_runs => "lag unknown (head not found yet)".into(),
            None => "lag unknown (no daemon running)".into(),
        };
        let event = view
            .last_event_id
            .as_deref()
            .map(|id| format!(" (after event {})", escaped(id)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {}: checkpoint {}{event}, {lag}, {} dead letters",
            view.state, view.checkpoint, view.dead_letters
        );
        if let Some(halt) = &view.halted {
            let _ = writeln!(
                out,
                "  halted at offset {} (event {}) since {}: {}",
                halt.offset,
                escaped(&halt.event_id),
                halt.at,
                escaped(&halt.error)
            );
        }
        if let Some(rebuild) = &view.rebuild {
            let _ = writeln!(
                out,
                "  rebuilding to version {}: at offset {} of {} (started {}; {})",
                escaped(&rebuild.version),
                rebuild.checkpoint,
                rebuild.live_checkpoint,
                rebuild.started_at,
                escaped(&rebuild.reason)
            );
        }
    }
    out
}
