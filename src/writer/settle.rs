//! What a store does, at open, about a projection whose tables an earlier definition built or
//! whose rebuild is in progress: run it, rebuild it (afresh or on from where its shadow is),
//! drop a rebuild towards a definition no longer configured, or refuse (`on_change`).

use crate::config::OnChange;
use crate::projection::ConfiguredProjection;
use crate::store::lifecycle::{self, Definition};

/// What opening does about a projection, given the definition its tables were built by.
pub(super) struct Settled {
    /// Its definition changed: its tables are served as they are until its rebuild is done.
    pub frozen: bool,
    /// It is being rebuilt; true if its shadow starts again from nothing.
    pub shadow: Option<bool>,
    /// A rebuild towards another definition was dropped: to end in the store.
    pub dropped: bool,
    /// A rebuild starts (again), for this reason: to record in the store.
    pub start: Option<String>,
}

/// Decides whether `projection` runs, is rebuilt (its rebuild started afresh or not), or is
/// refused (`on_change = "refuse"`), against the definition `recorded` and the `rebuild` in
/// progress. The same on every store; the caller records the rebuild that starts or ends.
pub(super) fn settle(
    projection: &ConfiguredProjection,
    recorded: Option<&Definition>,
    rebuild: Option<&lifecycle::Rebuild>,
) -> anyhow::Result<Settled> {
    let name = &projection.name;
    let version = &projection.version;
    let changed_from = recorded
        .map(|r| r.version.clone())
        .filter(|old| old != version);
    let building_current = rebuild.is_some_and(|r| r.version == *version);
    let restart_reason = match (&changed_from, rebuild) {
        _ if building_current => None,
        (Some(old), _) => match projection.on_change {
            OnChange::Refuse => anyhow::bail!(
                "projection {name:?}'s definition changed since its tables were built (version {old}, now {version}), and its on_change is \"refuse\": run `projector rebuild {name}` to rebuild it from the feed's start (its current tables are served until the rebuild replaces them), or put the previous definition back"
            ),
            OnChange::Rebuild => {
                tracing::warn!(
                    projection = %name,
                    "the definition changed since the tables were built (version {old}, now {version}): rebuilding from the feed's start; the current tables are served as they are until the rebuild replaces them"
                );
                Some(format!("the definition changed from version {old}"))
            }
        },
        // Rebuilding a definition that has changed since: start again with this one.
        (None, Some(rebuild)) if rebuild.reason.starts_with(lifecycle::ASKED) => {
            Some(format!("{}; the definition changed during it", lifecycle::ASKED))
        }
        (None, Some(rebuild)) => {
            tracing::info!(
                projection = %name,
                "the definition is the one the tables were built by again: dropping the rebuild towards version {}",
                rebuild.version
            );
            return Ok(Settled {
                frozen: false,
                shadow: None,
                dropped: true,
                start: None,
            });
        }
        (None, None) => None,
    };
    let fresh = restart_reason.is_some();
    Ok(Settled {
        frozen: changed_from.is_some(),
        shadow: (rebuild.is_some() || fresh).then_some(fresh),
        dropped: false,
        start: restart_reason,
    })
}
