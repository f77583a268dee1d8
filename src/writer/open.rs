//! Opening the writer: the database, every projection's tables and checkpoint, the definition
//! each was built by (a changed one is rebuilt or refused, per `on_change`), and the shadows of
//! the rebuilds in progress.

use std::collections::HashSet;
use std::path::Path;

use anyhow::Context;
use rusqlite::TransactionBehavior;

use super::apply::Members;
use super::settle::settle;
use super::shadow::{self, Shadow};
use super::wal::WalPolicy;
use super::{Slot, SlotState, StartingPoint, Writer, WriterSettings};
use crate::projection::ConfiguredProjection;
use crate::store::lifecycle::{self, Definition};
use crate::store::{self, Checkpoint};

/// A rebuild's shadow to open once the live database is set up.
struct ShadowToOpen {
    projection: ConfiguredProjection,
    /// Start it again from nothing (a new rebuild, or the definition changed during one).
    fresh: bool,
}

impl Writer {
    /// Opens the database, sets up every projection's tables and reads their checkpoints and the
    /// paused feeds, all in one transaction, then opens the shadows of the rebuilds in progress.
    /// The caller holds the instance lock ([`store::lock_instance`]).
    pub fn open(
        path: &Path,
        settings: WriterSettings,
        projections: Vec<ConfiguredProjection>,
    ) -> anyhow::Result<Writer> {
        let mut conn = store::open_writer(path, settings.synchronous)
            .with_context(|| format!("opening database {}", path.display()))?;
        if let Some(bytes) = settings.page_cache_bytes {
            store::set_page_cache(&conn, bytes)
                .with_context(|| format!("sizing the page cache of {}", path.display()))?;
        }
        if let Some(max_bytes) = settings.max_bytes {
            store::limit_size(&conn, max_bytes)
                .with_context(|| format!("limiting the size of {}", path.display()))?;
        }
        let mut slots = Vec::with_capacity(projections.len());
        let mut starting_points = Vec::with_capacity(projections.len());
        let mut to_open = Vec::new();
        let paused_feeds;
        let rebuilding: Vec<String>;
        let mut dropped_rebuilds = Vec::new();
        {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let rebuilds = lifecycle::rebuilds(&tx)?;
            rebuilding = rebuilds.iter().map(|r| r.projection.clone()).collect();
            for projection in projections {
                let name = projection.name.clone();
                let current = Definition {
                    version: projection.version.clone(),
                    source: projection.definition.clone(),
                    objects: shadow::schema_objects(&projection)
                        .with_context(|| format!("reading projection {name:?}'s schema"))?,
                };
                let recorded = lifecycle::recorded_definition(&tx, &name)?;
                let rebuild = rebuilds.iter().find(|r| r.projection == name);
                let settled = settle(&projection, recorded.as_ref(), rebuild)?;
                if settled.dropped {
                    lifecycle::end_rebuild(&tx, &name)?;
                    dropped_rebuilds.push(name.clone());
                }
                if let Some(reason) = &settled.start {
                    lifecycle::start_rebuild(
                        &tx,
                        &name,
                        &projection.feed,
                        &projection.version,
                        reason,
                    )?;
                }
                let frozen = settled.frozen;
                if !frozen {
                    projection
                        .projection
                        .setup(&tx)
                        .with_context(|| format!("setting up projection {name:?}"))?;
                }
                let checkpoint = match store::load_checkpoint(&tx, &name)? {
                    Some(checkpoint) => checkpoint,
                    None => {
                        let fresh = Checkpoint::default();
                        store::save_checkpoint(&tx, &name, &projection.feed, &fresh)?;
                        fresh
                    }
                };
                if !frozen {
                    lifecycle::record_definition(&tx, &name, &current)?;
                }
                starting_points.push(StartingPoint {
                    projection: name.clone(),
                    feed: projection.feed.clone(),
                    event_types: projection.event_types.clone(),
                    checkpoint,
                    dead_letters: store::count_dead_letters(&tx, &name)?,
                    frozen,
                });
                if let Some(fresh) = settled.shadow {
                    to_open.push(ShadowToOpen {
                        projection: projection.clone(),
                        fresh,
                    });
                }
                slots.push(Slot {
                    projection,
                    state: if frozen {
                        SlotState::Frozen
                    } else {
                        SlotState::Running
                    },
                });
            }
            paused_feeds = store::paused_feeds(&tx)?;
            tx.commit()?;
        }

        let mut owned: HashSet<String> = rebuilding
            .into_iter()
            .filter(|name| !dropped_rebuilds.contains(name))
            .collect();
        owned.extend(to_open.iter().map(|s| s.projection.name.clone()));
        let owned: Vec<String> = owned.into_iter().collect();
        for stale in lifecycle::stale_shadows(path, &owned) {
            tracing::info!(file = %stale.display(), "removing a finished rebuild's database");
            if let Err(err) = lifecycle::remove_shadow(&stale) {
                tracing::warn!(file = %stale.display(), "could not remove it: {err}");
            }
        }
        let mut shadows = Vec::with_capacity(to_open.len());
        for ShadowToOpen { projection, fresh } in to_open {
            let shadow_path = lifecycle::shadow_path(path, &projection.name);
            if fresh {
                lifecycle::remove_shadow(&shadow_path)
                    .with_context(|| format!("removing {}", shadow_path.display()))?;
            }
            let shadow = Shadow::open(path, &projection, &projection.version, &settings)?;
            starting_points.push(StartingPoint {
                projection: shadow.member.clone(),
                feed: projection.feed.clone(),
                event_types: projection.event_types.clone(),
                checkpoint: shadow.checkpoint()?,
                dead_letters: shadow.dead_letters()?,
                frozen: false,
            });
            slots.push(Slot {
                projection: ConfiguredProjection {
                    name: shadow.member.clone(),
                    ..projection
                },
                state: SlotState::Running,
            });
            shadows.push(shadow);
        }

        Ok(Writer {
            conn,
            wal: WalPolicy::new(path),
            members: Members::new(slots),
            shadows,
            starting_points,
            paused_feeds,
            rebuilt: tokio::sync::watch::Sender::new(0),
        })
    }
}
