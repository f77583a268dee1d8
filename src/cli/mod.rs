//! The command line: clap derive structs whose doc comments are the help text, and one file per
//! subcommand.
//!
//! Output goes through `say!` (stdout) and `complain!` (stderr), never `println!`: a reader that
//! went away (`projector ctl status | head -1`, a closed log pipe) is not a panic.

/// println!, except that a reader gone away is not a panic: the command finishes its work
/// without printing.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// print!, likewise.
macro_rules! say_partly {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

/// eprintln!, likewise.
macro_rules! complain {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod check;
mod ctl;
mod dead_letters;
#[cfg(feature = "demo")]
mod demo;
pub mod exit;
mod projections;
mod query;
mod rebuild;
mod repair;
mod run;

use std::path::PathBuf;

use exit::Exit;

use clap::{Parser, Subcommand};

/// Projector: folds event feeds into SQLite read models, exactly once.
#[derive(Debug, Parser)]
#[command(name = "projector", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: poll the feeds and keep the read models current until SIGTERM or SIGINT.
    Run {
        /// The configuration file.
        #[arg(long, short, default_value = "consumer.toml")]
        config: PathBuf,
    },
    /// Validate a configuration and its projections without running anything; warn of
    /// projection tables the database has with other columns.
    Check {
        #[arg(long, short, default_value = "consumer.toml")]
        config: PathBuf,
        /// Also read each feed's first pages and find its head, compare the event types seen
        /// with those the projections apply, and try whether the database can be written.
        #[arg(long)]
        probe: bool,
    },
    /// Steer a running daemon through its control socket.
    Ctl {
        /// The configuration whose control socket to use.
        #[arg(
            long,
            short,
            global = true,
            default_value = "consumer.toml",
            conflicts_with = "socket"
        )]
        config: PathBuf,
        /// Use this control socket instead of the configured one.
        #[arg(long, global = true)]
        socket: Option<PathBuf>,
        /// Print the daemon's JSON reply instead of a readable answer.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: ctl::Action,
    },
    /// Query the read-model database (read-only) and print the rows.
    Query {
        /// The SQL to run, e.g. "SELECT * FROM account_balances".
        sql: String,
        /// The configuration whose database to query.
        #[arg(
            long,
            short,
            default_value = "consumer.toml",
            conflicts_with = "database"
        )]
        config: PathBuf,
        /// Query this database file instead of the configured one.
        #[arg(long)]
        database: Option<PathBuf>,
        /// How to print the rows. Large results stream; a table sizes its columns by the
        /// first 1,000 rows.
        #[arg(long, value_enum, default_value = "table")]
        format: query::Format,
        /// Short for --format json.
        #[arg(long, conflicts_with = "format")]
        json: bool,
        /// A value for the query's :NAME parameter, as NAME=VALUE (repeatable). Bound as a
        /// parameter, never pasted into the SQL.
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
    },
    /// Each projection: feed, definition and version, checkpoint, lag, state (running, paused,
    /// halted, rebuilding, removed from the configuration) and dead letters. Read from the
    /// database, so it works with or without a running daemon.
    Projections {
        #[arg(long, short, default_value = "consumer.toml")]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a projection from the feed's start without downtime: a shadow copy is built
    /// beside the live tables, which stay queryable (and current) until the shadow has caught
    /// up and replaces them in one transaction. Through the running daemon, or on its own
    /// until done when none runs (Ctrl-C stops it; it goes on at the next start).
    Rebuild {
        /// The projection's name.
        name: String,
        #[arg(long, short, default_value = "consumer.toml")]
        config: PathBuf,
        /// Drop the rebuild in progress instead; the live tables stay as they are.
        #[arg(long)]
        cancel: bool,
    },
    /// Move the one event a halted projection (`on_error = "stop"`) stopped at into the dead
    /// letters, and let it go on from the next. Through the running daemon, or directly.
    Skip {
        /// The projection's name.
        name: String,
        #[arg(long, short, default_value = "consumer.toml")]
        config: PathBuf,
    },
    /// Move a projection's checkpoint to OFFSET, to apply the feed again from there without a
    /// shadow. It undoes nothing: the projection's tables keep what the events from OFFSET on
    /// wrote, and those events are applied again on top (right for upserts that set values,
    /// wrong for sums and counts: use `rebuild` for those); its dead letters stay. A reset
    /// past the checkpoint skips the events in between. Asks for confirmation unless --yes.
    Reset {
        /// The projection's name.
        name: String,
        /// The offset of the first event to apply again.
        #[arg(long = "to", value_name = "OFFSET")]
        to: u64,
        #[arg(long, short, default_value = "consumer.toml")]
        config: PathBuf,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// The events projections could not apply (`on_error = "skip"`): list, show, retry or
    /// discard them. A retry applies the event to its projection now, out of its place in the
    /// feed: safe for a projection whose events commute (sums, counts), wrong for one that
    /// depends on order (the last value wins).
    DeadLetters {
        #[arg(long, short, global = true, default_value = "consumer.toml")]
        config: PathBuf,
        /// Only this projection's letters.
        #[arg(long, global = true)]
        projection: Option<String>,
        /// Print JSON instead of text.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: Option<dead_letters::Action>,
    },
    /// Start an embedded bank feed, run the real daemon pipeline over it, and show the result.
    #[cfg(feature = "demo")]
    Demo {
        /// How many events the embedded feed holds.
        #[arg(long, default_value_t = 5000)]
        events: usize,
        /// The fraction of feed requests that fail (0 to 0.5), to watch the daemon retry.
        #[arg(long, default_value_t = 0.0)]
        fault_rate: f64,
        /// The feed format the embedded feed is read in.
        #[arg(long, value_enum, default_value = "flux")]
        format: crate::config::FeedFormat,
        /// The folder for the demo's files (default: projector-demo in the temporary folder).
        /// Its consumer.toml, account_balances.toml and projector.db are replaced; nothing else
        /// in it is touched.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<Exit> {
    match cli.command {
        Command::Run { config } => run::run(&config),
        Command::Check { config, probe } => check::check(&config, probe),
        Command::Ctl {
            config,
            socket,
            json,
            action,
        } => ctl::ctl(&config, socket, json, action),
        Command::Query {
            sql,
            config,
            database,
            format,
            json,
            params,
        } => {
            let format = if json { query::Format::Json } else { format };
            query::query(&sql, &config, database.as_deref(), format, &params)
        }
        Command::Projections { config, json } => projections::projections(&config, json),
        Command::Rebuild {
            name,
            config,
            cancel,
        } => rebuild::rebuild(&config, &name, cancel),
        Command::Skip { name, config } => repair::skip(&config, &name),
        Command::Reset {
            name,
            to,
            config,
            yes,
        } => repair::reset(&config, &name, to, yes),
        Command::DeadLetters {
            config,
            projection,
            json,
            action,
        } => dead_letters::dead_letters(
            &config,
            projection.as_deref(),
            json,
            action.unwrap_or(dead_letters::Action::List { all: false }),
        ),
        #[cfg(feature = "demo")]
        Command::Demo {
            events,
            fault_rate,
            format,
            dir,
        } => demo::demo(events, fault_rate, format, dir),
    }
}

/// The daemon's runtime: one thread runs the feed readers, the control socket and the signals;
/// the writer has a thread of its own. A response then never wakes another thread to run the
/// task waiting for it, which costs less CPU an event than a worker per core; the price is that
/// all feeds read on one core (both measured in BENCHMARKS.md). So nothing on it may block:
/// SQLite work belongs on the writer's thread or in `spawn_blocking`.
fn daemon_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// The demo's runtime serves the feed as well as reading it, so it has a thread per core.
#[cfg(feature = "demo")]
fn demo_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
