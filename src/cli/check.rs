//! `projector check`: validates a config, reads the feeds' secrets and TLS files, and builds its
//! projections (declarative SQL is prepared against its schema), and warns of projection tables the database already has with other
//! columns. With `--probe` it also reads each feed's first pages, finds the head, compares the
//! event types seen with those the projections apply, and tries whether the database can be
//! written: the mistakes a first run would otherwise show only in its log.

use std::collections::BTreeMap;
use std::path::Path;

use super::exit::Exit;
use crate::config::{Config, ConfigSource, FeedConfig};
use crate::event::PagePlace;
use crate::feed::{FeedClient, PageAt};
use crate::projection::{shape, ConfiguredProjection};

/// How far `--probe` reads each feed: its first pages, up to this many events.
const PROBE_EVENTS: u64 = 1000;
const PROBE_PAGES: usize = 50;

pub fn check(path: &Path, probe: bool) -> anyhow::Result<Exit> {
    let config = Config::load(path)?;
    let projections = crate::projection::build_all(&config)?;
    if config.daemon.postgres.is_some() {
        if let Some(refused) = crate::projection::refused_by_postgres(&projections) {
            anyhow::bail!(refused);
        }
    }
    // Secrets read and TLS files loaded as the daemon would at start.
    for feed in &config.feeds {
        FeedClient::new(feed, &config.source)?;
    }
    say!(
        "{}: ok ({} feed{}, {} projection{})",
        path.display(),
        config.feeds.len(),
        if config.feeds.len() == 1 { "" } else { "s" },
        projections.len(),
        if projections.len() == 1 { "" } else { "s" },
    );
    for projection in &projections {
        let mut types = projection.event_types.names();
        if projection.event_types.is_every() {
            types.push("every other type (*)");
        }
        say!(
            "  {} on feed {}: {}",
            projection.name,
            projection.feed,
            types.join(", ")
        );
    }
    warn_of_other_shapes(&config, &projections)?;
    if !probe {
        return Ok(Exit::Success);
    }
    say!("probe:");
    let shown = config.daemon.database_shown();
    let writable = match &config.daemon.postgres {
        Some(store) => postgres_reachable(store),
        None => database_writable(&config.daemon.database),
    };
    let mut fine = match writable {
        Ok(how) => {
            say!("  database {shown}: {how}");
            true
        }
        Err(why) => {
            say!("  database {shown}: {why}");
            false
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for feed in &config.feeds {
        let on_feed: Vec<&ConfiguredProjection> = projections
            .iter()
            .filter(|p| p.feed == feed.name())
            .collect();
        fine &= runtime.block_on(probe_feed(feed, &config.source, &on_feed))?;
    }
    Ok(if fine { Exit::Success } else { Exit::Failure })
}

/// Says which projections' definitions changed since their tables were built (the next start
/// rebuilds or refuses them, per `on_change`), and warns of each table the database has with
/// other columns than an unchanged projection's setup makes (`CREATE TABLE IF NOT EXISTS` would
/// keep it, and the statements fail).
fn warn_of_other_shapes(
    config: &Config,
    projections: &[ConfiguredProjection],
) -> anyhow::Result<()> {
    if config.daemon.postgres.is_some() {
        // The daemon checks a PostgreSQL schema's tables as it sets them up.
        return Ok(());
    }
    let database = &config.daemon.database;
    if !database.exists() {
        return Ok(());
    }
    let conn = crate::store::open_reader(database)?;
    for projection in projections {
        // A database from before versions were recorded has none to compare.
        let recorded = crate::store::lifecycle::recorded_definition(&conn, &projection.name)
            .ok()
            .flatten();
        if let Some(recorded) = recorded.filter(|r| r.version != projection.version) {
            let next = match projection.on_change {
                crate::config::OnChange::Rebuild => {
                    "the next start or reload rebuilds it, serving its current tables meanwhile"
                }
                crate::config::OnChange::Refuse => {
                    "its on_change is \"refuse\": run `projector rebuild` for it"
                }
            };
            say!(
                "note: projection {}: its definition changed since its tables were built (version {}, now {}); {next}",
                projection.name,
                recorded.version,
                projection.version
            );
            continue;
        }
        for mismatch in shape::mismatches(&*projection.projection, &conn)? {
            say!(
                "warning: projection {}: {} has a table {} with columns ({}), but the projection makes it with ({}); it keeps the table as it is, so its statements may fail",
                projection.name,
                database.display(),
                mismatch.table,
                mismatch.found.join(", "),
                mismatch.made.join(", ")
            );
        }
    }
    Ok(())
}

/// Whether the daemon could write the database: the file if it exists, else the folder it
/// would be created in (or the nearest existing folder above, which it would create).
fn database_writable(database: &Path) -> Result<String, String> {
    if database.exists() {
        return std::fs::OpenOptions::new()
            .write(true)
            .open(database)
            .map(|_| "exists, and can be written".to_string())
            .map_err(|err| format!("cannot be written: {err}"));
    }
    let mut folder = database.parent().unwrap_or(Path::new("."));
    while !folder.exists() {
        folder = folder.parent().unwrap_or(Path::new("."));
    }
    let trial = folder.join(format!(".projector-check-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&trial)
        .map_err(|err| {
            format!(
                "cannot be created: {} is not writable: {err}",
                folder.display()
            )
        })?;
    let _ = std::fs::remove_file(&trial);
    Ok(format!(
        "does not exist yet; it will be created ({} is writable)",
        folder.display()
    ))
}

/// Whether the daemon could connect to its PostgreSQL store and set up its schema.
fn postgres_reachable(store: &crate::config::PostgresStore) -> Result<String, String> {
    use crate::store::postgres::{connect, read_checkpoints, Session};
    let mut client =
        connect(store, "projector check", Session::Plain).map_err(|err| format!("{err:#}"))?;
    let projections = read_checkpoints(&mut client).map_err(|err| err.to_string())?;
    Ok(format!(
        "reachable; schema {} is set up, with {} projection checkpoint{}",
        store.schema,
        projections.len(),
        if projections.len() == 1 { "" } else { "s" }
    ))
}

/// Reads the feed's first pages and finds its head; says what it saw, and warns of event types
/// the projections apply that the feed's first events never have. False if the feed cannot be
/// read.
async fn probe_feed(
    feed: &FeedConfig,
    source: &ConfigSource,
    projections: &[&ConfiguredProjection],
) -> anyhow::Result<bool> {
    let client = FeedClient::new(feed, source)?;
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut read = 0u64;
    let mut pages = 0;
    let mut at_head = false;
    let named = client.paging().follows_pages();
    // On a feed paged by links or cursors, the page the last one named.
    let mut next: Option<PagePlace> = None;
    while pages < PROBE_PAGES && read < PROBE_EVENTS {
        let at = match named {
            true => PageAt::Named(next.as_ref()),
            false => PageAt::Offset(read),
        };
        let mut page = match client.fetch_page_at(at, None).await {
            Ok(page) => page,
            Err(err) => {
                say!("  feed {} cannot be read: {err}", feed.name());
                if let Some(hint) = crate::monitor::hint_for(&err) {
                    say!("    hint: {hint}");
                }
                return Ok(false);
            }
        };
        if page.is_empty() {
            at_head = true;
            break;
        }
        let entries = page.take(usize::MAX).map_err(anyhow::Error::msg)?;
        for entry in &entries {
            *seen.entry(entry.meta.event_type.clone()).or_default() += 1;
        }
        read += entries.len() as u64;
        pages += 1;
        if named {
            match page.next.take() {
                Some(cursor) => {
                    next = Some(PagePlace {
                        cursor,
                        first_offset: read,
                    })
                }
                None => {
                    at_head = true;
                    break;
                }
            }
        }
    }
    let head = if at_head {
        Some(read)
    } else if named {
        None
    } else {
        crate::reader::find_head(&client, read).await.ok()
    };
    let head = match head {
        Some(head) => format!("head at {head}"),
        // Finding the head asks for pages by offset.
        None if named => {
            "its head is further on (not probed: its pages are found by links or cursors)"
                .to_string()
        }
        None => "head not found".to_string(),
    };
    say!(
        "  feed {} ({}): read {read} events from the first {pages} pages; {head}",
        feed.name(),
        crate::shown::url(&feed.url.0)
    );
    let counted: Vec<String> = seen.iter().map(|(t, n)| format!("{t} ({n})")).collect();
    say!(
        "    types seen: {}",
        if counted.is_empty() {
            "none".to_string()
        } else {
            counted.join(", ")
        }
    );
    let passed_over: Vec<&str> = seen
        .keys()
        .filter(|t| !projections.iter().any(|p| p.event_types.contains(t)))
        .map(String::as_str)
        .collect();
    if !passed_over.is_empty() {
        say!(
            "    passed over (no projection on this feed applies them): {}",
            passed_over.join(", ")
        );
    }
    if read == 0 {
        return Ok(true);
    }
    for projection in projections {
        for event_type in projection.event_types.names() {
            if seen.contains_key(event_type) {
                continue;
            }
            let nearest = seen
                .keys()
                .map(|t| (edit_distance(t, event_type), t))
                .filter(|(distance, _)| *distance <= 3)
                .min();
            let suggestion =
                nearest.map_or(String::new(), |(_, t)| format!(" (did you mean {t}?)"));
            say!(
                "warning: projection {} applies {event_type}, which none of the first {read} events of feed {} has{suggestion}",
                projection.name,
                feed.name()
            );
        }
    }
    Ok(true)
}

/// How many single-character edits turn `a` into `b` (Levenshtein), for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    #[test]
    fn edit_distance_counts_single_character_edits() {
        use super::edit_distance;
        assert_eq!(
            edit_distance("account.AccountCreatd", "account.AccountCreated"),
            1
        );
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }
}
