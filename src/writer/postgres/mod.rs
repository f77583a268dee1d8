//! The writer on PostgreSQL: one connection, holding this daemon's leases, on which every batch
//! commits with its checkpoints (read `FOR UPDATE`, so even two daemons at once could not apply
//! an event twice). A batch of a feed whose lease this connection does not hold is refused.
//!
//! When the connection is lost, so are its leases: the next job connects again holding none,
//! and the daemon's readers of those feeds stop at the next lease round.
//!
//! A rebuild builds the projection's tables again in a schema of its own (its shadow), read from
//! the feed's start beside the live tables; once caught up, the shadow's tables replace the live
//! ones in one transaction (moved, not copied). Rebuilds are recorded in the store, so any
//! daemon may start or cancel one and whichever holds the feed builds it, from where its shadow
//! is after a failover.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use postgres::Client;

mod batch;
mod changes;
mod leases;
mod rebuild;

use changes::{change_rebuild, reset_checkpoint, skip_halted_event};
use rebuild::{begin_shadow, definition_objects, ensure_checkpoint, PostgresShadow};

use super::activity::WriterActivity;
use super::apply::Members;
use super::requests::{LeaseReport, LeaseRequest, OperatorChange};
use super::settle::settle;
use super::shadow::shadow_member;
use super::thread::{self, Interrupter, WriterStore};
use super::{
    ApplyError, Batch, BatchOutcome, Slot, SlotState, StartingPoint, WriterHandle, WriterThread,
};
use crate::config::PostgresStore;
use crate::projection::{ConfiguredProjection, PostgresTx};
use crate::store::lifecycle::Definition;
use crate::store::postgres::{self as pg, Session, StatementCache};
use crate::store::Checkpoint;

pub struct PostgresWriter {
    store: PostgresStore,
    /// This daemon's id: its connection's `application_name`, and its name in the lease table.
    id: String,
    conn: Option<Connection>,
    members: Members,
    /// The leases this connection holds.
    held: BTreeSet<String>,
    starting_points: Vec<StartingPoint>,
    paused_feeds: BTreeSet<String>,
    /// Cancels the statement running on the current connection.
    cancel: Arc<Mutex<Option<postgres::CancelToken>>>,
    /// The rebuilds this writer builds (every one recorded whose definition is this daemon's).
    shadows: Vec<PostgresShadow>,
    /// Counts the changes of rebuilds (begun, ended, swapped in) and operators' changes to
    /// checkpoints seen: the feeds' readers then start again from the checkpoints.
    restart_readers: tokio::sync::watch::Sender<u64>,
    /// The store's count of operators' changes, as last seen.
    changes_seen: i64,
}

/// The writer's connection with its prepared statements.
struct Connection {
    client: Client,
    statements: StatementCache,
}

impl PostgresWriter {
    /// Connects, brings the schema up to date, and sets up every projection's tables and
    /// checkpoint in one transaction (one daemon at a time); reads where each stands.
    pub fn open(
        store: &PostgresStore,
        id: &str,
        projections: Vec<ConfiguredProjection>,
    ) -> anyhow::Result<PostgresWriter> {
        let mut conn = connect(store, id)?;
        let mut starting_points = Vec::with_capacity(projections.len());
        if let Some(refused) = crate::projection::refused_by_postgres(&projections) {
            anyhow::bail!(refused);
        }
        let mut slots = Vec::with_capacity(2 * projections.len());
        let mut tx = conn.client.transaction()?;
        pg::lock_setup(&mut tx, &store.schema)?;
        let rebuilds = pg::rebuilds(&mut tx)?;
        let mut shadows = Vec::new();
        for projection in projections {
            let name = projection.name.clone();
            let recorded = pg::recorded_definition(&mut tx, &name)?;
            let rebuild = rebuilds.iter().find(|r| r.projection == name);
            let settled = settle(&projection, recorded.as_ref(), rebuild)?;
            let member = shadow_member(&name);
            if settled.dropped {
                pg::end_rebuild(&mut tx, &name)?;
                pg::drop_shadow(&mut tx, &pg::shadow_schema(&store.schema, &name), &member)?;
                pg::count_change(&mut tx)?;
            }
            if let Some(reason) = &settled.start {
                let version = &projection.version;
                pg::start_rebuild(&mut tx, &name, &projection.feed, version, reason)?;
                pg::count_change(&mut tx)?;
            }
            if !settled.frozen {
                let mut writes = PostgresTx::new(&mut tx, &mut conn.statements);
                projection
                    .projection
                    .setup_postgres(&mut writes)
                    .map_err(|err| anyhow::anyhow!("{err}"))
                    .with_context(|| format!("setting up projection {name:?} on PostgreSQL"))?;
            }
            let checkpoint =
                ensure_checkpoint(&mut tx, &mut conn.statements, &name, &projection.feed)?;
            if !settled.frozen {
                let definition = Definition {
                    version: projection.version.clone(),
                    source: projection.definition.clone(),
                    objects: definition_objects(&mut tx, &mut conn.statements, &projection)?,
                };
                pg::record_definition(&mut tx, &name, &definition)?;
            }
            starting_points.push(StartingPoint {
                projection: name.clone(),
                feed: projection.feed.clone(),
                event_types: projection.event_types.clone(),
                checkpoint,
                dead_letters: pg::count_dead_letters(&mut tx, &name)?,
                frozen: settled.frozen,
            });
            let shadow_state = match settled.shadow {
                Some(fresh) => {
                    let shadow = begin_shadow(
                        &mut tx,
                        &mut conn.statements,
                        &store.schema,
                        &projection,
                        fresh,
                    )?;
                    shadows.push(shadow);
                    SlotState::Running
                }
                None => SlotState::Retired,
            };
            slots.push(Slot {
                projection: ConfiguredProjection {
                    name: member,
                    ..projection.clone()
                },
                state: shadow_state,
            });
            slots.push(Slot {
                projection,
                state: if settled.frozen {
                    SlotState::Frozen
                } else {
                    SlotState::Running
                },
            });
        }
        let paused_feeds = pg::paused_feeds(&mut tx)?;
        let changes_seen = pg::changes(&mut tx)?;
        tx.commit()?;
        let cancel = Arc::new(Mutex::new(Some(conn.client.cancel_token())));
        Ok(PostgresWriter {
            store: store.clone(),
            id: id.to_string(),
            conn: Some(conn),
            members: Members::new(slots),
            held: BTreeSet::new(),
            starting_points,
            paused_feeds,
            cancel,
            shadows,
            restart_readers: tokio::sync::watch::Sender::new(0),
            changes_seen,
        })
    }

    /// Changes each time a rebuild begins, ends or replaces a projection's tables, or an
    /// operator changes a checkpoint: the feeds' readers must then start again from the
    /// checkpoints.
    pub fn restarts(&self) -> tokio::sync::watch::Receiver<u64> {
        self.restart_readers.subscribe()
    }

    pub fn starting_points(&self) -> Vec<StartingPoint> {
        self.starting_points.clone()
    }

    pub fn paused_feeds(&self) -> BTreeSet<String> {
        self.paused_feeds.clone()
    }

    /// Moves the writer to its own thread. It runs until every handle is dropped, finishing the
    /// batches already sent.
    pub fn spawn(self) -> std::io::Result<(WriterHandle, WriterThread)> {
        thread::spawn(self)
    }

    /// The connection, made again if it was lost (then holding no lease).
    fn connection(&mut self) -> Result<&mut Connection, ApplyError> {
        if self
            .conn
            .as_ref()
            .is_some_and(|conn| conn.client.is_closed())
        {
            tracing::warn!(
                leases = self.held.iter().cloned().collect::<Vec<_>>().join(", "),
                "the connection to PostgreSQL was lost, and the leases held on it with it"
            );
            self.conn = None;
            self.held.clear();
        }
        if self.conn.is_none() {
            let conn = connect(&self.store, &self.id)
                .map_err(|err| ApplyError::Storage(format!("{err:#}")))?;
            if let Ok(mut cancel) = self.cancel.lock() {
                *cancel = Some(conn.client.cancel_token());
            }
            self.conn = Some(conn);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| ApplyError::Internal("no connection".into()))
    }
}

/// Connects the writer's session and records it as daemon `id`'s.
fn connect(store: &PostgresStore, id: &str) -> anyhow::Result<Connection> {
    let mut client = pg::connect(store, id, Session::Writer)?;
    pg::register_daemon(&mut client, id).context("registering this daemon")?;
    Ok(Connection {
        client,
        statements: StatementCache::new(),
    })
}

impl WriterStore for PostgresWriter {
    fn activity(&self) -> Arc<WriterActivity> {
        self.members.activity.clone()
    }

    fn interrupter(&self) -> Interrupter {
        let cancel = self.cancel.clone();
        Box::new(move || {
            let token = cancel.lock().ok().and_then(|token| token.clone());
            if let (Some(token), Ok(tls)) = (token, pg::tls()) {
                // The blocking client runs a runtime of its own, which cannot start on the
                // caller's (async) thread.
                std::thread::spawn(move || {
                    if let Err(err) = token.cancel_query(tls) {
                        tracing::warn!("could not cancel the statement running: {err}");
                    }
                });
            }
        })
    }

    fn apply(&mut self, batch: &Batch) -> Result<BatchOutcome, ApplyError> {
        // Connecting again (the connection was lost) forgets the leases held on it.
        self.connection()?;
        if !self.held.contains(&batch.feed) {
            return Err(ApplyError::LeaseLost(batch.feed.clone()));
        }
        if let Some(index) = self.shadow_of(batch) {
            return self.apply_to_shadow(index, batch);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(ApplyError::LeaseLost(batch.feed.clone()));
        };
        self.members.apply(conn, batch, &batch.feed)
    }

    fn set_paused(&mut self, feeds: &[String], paused: bool) -> Result<(), ApplyError> {
        let conn = self.connection()?;
        let mut tx = conn.client.transaction().map_err(ApplyError::postgres)?;
        for feed in feeds {
            pg::set_paused(&mut tx, feed, paused).map_err(ApplyError::postgres)?;
        }
        tx.commit().map_err(ApplyError::postgres)
    }

    fn leases(&mut self, request: &LeaseRequest) -> Result<LeaseReport, ApplyError> {
        self.follow_changes()?;
        self.lease_round(request)
    }

    fn release(&mut self, feed: &str) -> Result<(), ApplyError> {
        self.give_back(feed)
    }

    fn starting_points_of(&mut self, feed: &str) -> Result<Vec<StartingPoint>, ApplyError> {
        let mut members = Vec::new();
        for slot in &mut self.members.slots {
            if slot.projection.feed != feed || slot.state == SlotState::Retired {
                continue;
            }
            // Its readers start again: a projection halted on a poison event tries it again.
            if slot.state == SlotState::Halted {
                slot.state = SlotState::Running;
            }
            members.push((
                slot.projection.name.clone(),
                slot.projection.event_types.clone(),
                slot.state == SlotState::Frozen,
            ));
        }
        let conn = self.connection()?;
        let checkpoints: BTreeMap<String, Checkpoint> = pg::read_checkpoints(&mut conn.client)
            .map_err(ApplyError::postgres)?
            .into_iter()
            .collect();
        members
            .into_iter()
            .map(|(projection, event_types, frozen)| {
                Ok(StartingPoint {
                    checkpoint: checkpoints.get(&projection).cloned().unwrap_or_default(),
                    dead_letters: pg::count_dead_letters(&mut conn.client, &projection)
                        .map_err(ApplyError::postgres)?,
                    projection,
                    feed: feed.to_string(),
                    event_types,
                    frozen,
                })
            })
            .collect()
    }

    fn change(
        &mut self,
        projection: &str,
        change: OperatorChange,
    ) -> Result<Result<String, String>, ApplyError> {
        let Some(&live) = self.members.by_name.get(projection) else {
            return Ok(Err(format!("no projection named {projection:?}")));
        };
        let configured = self.members.slots[live].projection.clone();
        let schema = self.store.schema.clone();
        let conn = self.connection()?;
        let mut tx = conn.client.transaction().map_err(ApplyError::postgres)?;
        pg::lock_setup(&mut tx, &schema).map_err(ApplyError::postgres)?;
        let made = match change {
            OperatorChange::Rebuild | OperatorChange::CancelRebuild => {
                let cancel = change == OperatorChange::CancelRebuild;
                change_rebuild(&mut tx, &schema, &configured, cancel)
            }
            OperatorChange::Skip => skip_halted_event(&mut tx, &mut conn.statements, projection),
            OperatorChange::Reset(offset) => {
                reset_checkpoint(&mut tx, &mut conn.statements, projection, offset)
            }
        };
        let message = match made.map_err(ApplyError::postgres)? {
            Ok(message) => message,
            Err(refused) => return Ok(Err(refused)),
        };
        pg::count_change(&mut tx).map_err(ApplyError::postgres)?;
        tx.commit().map_err(ApplyError::postgres)?;
        self.follow_changes()?;
        Ok(Ok(message))
    }
}
