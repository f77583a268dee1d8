//! `projector dead-letters`: the events projections could not apply under `on_error = "skip"`,
//! listed, shown, retried (applied again to their projection, now) or discarded. It works on
//! the database directly, daemon or not: SQLite lets one writer at a time in, so a retry
//! commits between the daemon's batches.

use std::path::Path;

use anyhow::Context;
use clap::Subcommand;
use rusqlite::TransactionBehavior;

use super::exit::{Exit, UsageError};
use crate::config::Config;
use crate::shown::{escaped, shortened, ERROR_SHOWN};
use crate::store::{self, dead_letters, dead_letters::StoredLetter};

#[derive(Debug, Subcommand)]
pub enum Action {
    /// The letters waiting for an operator: id, projection, offset, event id, type, error, time.
    List {
        /// Also the letters already retried or discarded.
        #[arg(long)]
        all: bool,
    },
    /// One letter whole, with its payload.
    Show { id: i64 },
    /// Apply letters again to their projection, now: one by id, or every waiting one.
    Retry {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        /// Every letter waiting (of --projection's projection, if given), oldest first.
        #[arg(long)]
        all: bool,
    },
    /// Record a letter as discarded: it is kept, with the time, and no longer listed.
    Discard { id: i64 },
}

pub fn dead_letters(
    config_path: &Path,
    projection: Option<&str>,
    json: bool,
    action: Action,
) -> anyhow::Result<Exit> {
    let config = Config::load(config_path)?;
    let database = config.daemon.sqlite_file("`projector dead-letters`")?;
    if !database.exists() {
        anyhow::bail!(
            "database {} does not exist (has the daemon run yet?)",
            database.display()
        );
    }
    match action {
        Action::List { all } => {
            let conn = store::open_reader(database)?;
            let letters = dead_letters::list(&conn, projection, all)?;
            if json {
                // One object per line, without the payload (`show` has it).
                for letter in &letters {
                    let mut listed = letter.clone();
                    listed.payload = None;
                    say!("{}", serde_json::to_string(&listed)?);
                }
            } else {
                say_partly!("{}", render_list(&letters));
            }
            Ok(Exit::Success)
        }
        Action::Show { id } => {
            let conn = store::open_reader(database)?;
            let letter = find(&conn, id)?;
            if json {
                say!("{}", serde_json::to_string_pretty(&letter)?);
            } else {
                say_partly!("{}", render_one(&letter));
            }
            Ok(Exit::Success)
        }
        Action::Discard { id } => {
            let conn = store::open_writer(database, config.daemon.synchronous)?;
            let letter = find(&conn, id)?;
            if let Some(resolution) = &letter.resolution {
                anyhow::bail!("dead letter {id} was {resolution} already");
            }
            dead_letters::resolve(&conn, id, "discarded")?;
            say!(
                "dead letter {id} (offset {} of feed {}, projection {}) discarded",
                letter.offset,
                escaped(&letter.feed),
                escaped(&letter.projection)
            );
            Ok(Exit::Success)
        }
        Action::Retry { id, all } => {
            let mut conn = store::open_writer(database, config.daemon.synchronous)?;
            let letters = match (id, all) {
                (Some(id), _) => {
                    let letter = find(&conn, id)?;
                    if let Some(resolution) = &letter.resolution {
                        anyhow::bail!("dead letter {id} was {resolution} already");
                    }
                    vec![letter]
                }
                (None, _) => dead_letters::list(&conn, projection, false)?,
            };
            if letters.is_empty() {
                say!("no dead letters wait");
                return Ok(Exit::Success);
            }
            let projections = crate::projection::build_all(&config)?;
            let mut failed = 0;
            for letter in &letters {
                // Retried already, as released by an earlier letter of its aggregate?
                let Some(letter) = dead_letters::get(&conn, letter.id)? else {
                    continue;
                };
                if letter.resolution.is_some() {
                    continue;
                }
                match retry(&mut conn, &projections, &letter) {
                    Ok(Retried {
                        held_back_by: Some(first),
                        ..
                    }) => {
                        // With --all, the first letter was retried before it.
                        if !all {
                            failed += 1;
                            complain!(
                                "projector: dead letter {first} holds dead letter {}'s aggregate back: retry {first}, which releases {} after it",
                                letter.id,
                                letter.id
                            );
                        }
                    }
                    Ok(retried) => {
                        if retried.applied > 0 {
                            say!(
                                "dead letter {} (offset {}) applied to {}{}",
                                letter.id,
                                letter.offset,
                                escaped(&letter.projection),
                                match retried.applied {
                                    1 => String::new(),
                                    n => format!(", releasing {} parked after it", n - 1),
                                }
                            );
                        }
                        if let Some((id, error)) = retried.failed {
                            failed += 1;
                            complain!(
                                "projector: dead letter {id} still fails for {}: {}",
                                escaped(&letter.projection),
                                escaped(&shortened(&error, ERROR_SHOWN))
                            );
                        }
                    }
                    Err(err) => {
                        failed += 1;
                        complain!(
                            "projector: dead letter {}: {}",
                            letter.id,
                            escaped(&shortened(&format!("{err:#}"), ERROR_SHOWN))
                        );
                    }
                }
            }
            Ok(if failed == 0 {
                Exit::Success
            } else {
                Exit::Failure
            })
        }
    }
}

fn find(conn: &rusqlite::Connection, id: i64) -> anyhow::Result<StoredLetter> {
    dead_letters::get(conn, id)?
        .ok_or_else(|| UsageError(format!("there is no dead letter {id}")).into())
}

/// What a retry did.
struct Retried {
    /// Letters applied: the one retried, then those of its aggregate it released.
    applied: usize,
    /// The letter that failed, with its error; it and those after it keep waiting.
    failed: Option<(i64, String)>,
    /// Not tried: this earlier letter of its aggregate holds it back.
    held_back_by: Option<i64>,
}

/// Applies `letter` to its projection, then, if it parked its aggregate, the letters waiting
/// behind it, in order, in one transaction; each in a savepoint, so that one that fails again
/// leaves nothing behind and keeps waiting (with the new error), with the letters after it.
fn retry(
    conn: &mut rusqlite::Connection,
    projections: &[crate::projection::ConfiguredProjection],
    letter: &StoredLetter,
) -> anyhow::Result<Retried> {
    let projection = projections
        .iter()
        .find(|p| p.name == letter.projection)
        .with_context(|| {
            format!(
                "projection {:?} is not in the configuration any more",
                letter.projection
            )
        })?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut run = vec![letter.clone()];
    if let Some(aggregate) = &letter.parks {
        if let Some(first) = dead_letters::parked_behind(&tx, &letter.projection, aggregate)? {
            if first != letter.id {
                return Ok(Retried {
                    applied: 0,
                    failed: None,
                    held_back_by: Some(first),
                });
            }
        }
        run.extend(dead_letters::parked_after(&tx, letter)?);
    }
    let mut retried = Retried {
        applied: 0,
        failed: None,
        held_back_by: None,
    };
    for letter in &run {
        let event = letter.event().map_err(anyhow::Error::msg)?;
        tx.execute_batch("SAVEPOINT projector_retry")?;
        match projection.projection.apply(&tx, &event) {
            Ok(()) => {
                tx.execute_batch("RELEASE projector_retry")?;
                dead_letters::resolve(&tx, letter.id, "retried")?;
                retried.applied += 1;
            }
            Err(err) => {
                tx.execute_batch("ROLLBACK TO projector_retry; RELEASE projector_retry")?;
                dead_letters::record_error(&tx, letter.id, &err.to_string())?;
                retried.failed = Some((letter.id, err.to_string()));
                break;
            }
        }
    }
    tx.commit()?;
    Ok(retried)
}

fn render_list(letters: &[StoredLetter]) -> String {
    use std::fmt::Write as _;
    if letters.is_empty() {
        return "no dead letters wait\n".into();
    }
    let mut out = String::new();
    for letter in letters {
        let resolution = match (&letter.resolution, &letter.resolved_at) {
            (Some(what), Some(at)) => format!(" [{what} {at}]"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "{}  {}  offset {}  event {}  {}  {}{resolution}\n    {}",
            letter.id,
            escaped(&letter.projection),
            letter.offset,
            escaped(&letter.event_id),
            escaped(&letter.event_type),
            letter.recorded_at,
            escaped(&shortened(&letter.error, ERROR_SHOWN))
        );
    }
    out
}

fn render_one(letter: &StoredLetter) -> String {
    format!(
        "dead letter {}\nprojection: {}\nfeed: {}\noffset: {}\nevent id: {}\ntype: {}\nrecorded: {}\nstate: {}\nerror: {}\npayload: {}\n",
        letter.id,
        escaped(&letter.projection),
        escaped(&letter.feed),
        letter.offset,
        escaped(&letter.event_id),
        escaped(&letter.event_type),
        letter.recorded_at,
        match (&letter.resolution, &letter.resolved_at) {
            (Some(what), Some(at)) => format!("{what} {at}"),
            _ => "waiting".into(),
        },
        escaped(&letter.error),
        escaped(letter.payload.as_deref().unwrap_or("(none)"))
    )
}
