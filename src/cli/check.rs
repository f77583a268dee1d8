//! `projector check`: validates a config and builds its projections (declarative SQL is prepared
//! against its schema) without touching the database or the feeds.

use super::exit::Exit;
use std::path::Path;

use crate::config::Config;

pub fn check(path: &Path) -> anyhow::Result<Exit> {
    let config = Config::load(path)?;
    let projections = crate::projection::build_all(&config)?;
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
    Ok(Exit::Success)
}
