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

use super::activity::WriterActivity;
use super::apply::{BatchTx, BeginBatch, Members};
use super::settle::settle;
use super::shadow::shadow_member;
use super::thread::{self, Interrupter, WriterStore};
use super::{
    ApplyError, Batch, BatchOutcome, Slot, SlotState, StartingPoint, WriterHandle, WriterThread,
};
use crate::config::PostgresStore;
use crate::event::Event;
use crate::projection::{ConfiguredProjection, PostgresTx, ProjectionError};
use crate::store::lifecycle::{self, Definition, HaltedEvent, SchemaObject};
use crate::store::postgres::{self as pg, Session, StatementCache};
use crate::store::{Checkpoint, DeadLetter};

/// What an operator asks to be done to a projection, wherever its feed is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorChange {
    Rebuild,
    CancelRebuild,
    /// Move the event it halted on into the dead letters, and its checkpoint past it.
    Skip,
    /// Move its checkpoint to this offset.
    Reset(u64),
}

/// What a lease round asks of the writer.
#[derive(Debug, Clone)]
pub struct LeaseRequest {
    /// The feeds this daemon reads (those with projections).
    pub feeds: Vec<String>,
    /// Take leases up to this daemon's share; false while it stops.
    pub take: bool,
}

/// What a lease round found.
#[derive(Debug, Clone, Default)]
pub struct LeaseReport {
    /// The feeds whose leases this daemon holds now.
    pub held: BTreeSet<String>,
    /// Held beyond this daemon's share while another daemon holds less than its own: to hand
    /// back once their readers have stopped.
    pub surplus: Vec<String>,
    /// The feeds paused, by whichever daemon.
    pub paused: BTreeSet<String>,
    /// The daemons whose sessions are alive, by id, with the feeds each holds.
    pub daemons: BTreeMap<String, Vec<String>>,
}

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
    rebuilt: tokio::sync::watch::Sender<u64>,
    /// The store's count of operators' changes, as last seen.
    changes_seen: i64,
}

/// A rebuild in progress: its tables are in a schema of their own.
struct PostgresShadow {
    /// The live projection's name.
    projection: String,
    member: String,
    /// The definition it is built by.
    version: String,
    schema: String,
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
            rebuilt: tokio::sync::watch::Sender::new(0),
            changes_seen,
        })
    }

    /// Changes each time a rebuild begins, ends or replaces a projection's tables: the feeds'
    /// readers must then start again from the checkpoints.
    pub fn rebuilds_changed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.rebuilt.subscribe()
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
        let (true, Some(conn)) = (self.held.contains(&batch.feed), self.conn.as_mut()) else {
            return Err(ApplyError::LeaseLost(batch.feed.clone()));
        };
        // A rebuild's shadow is read alone, so a batch is all live or all one shadow's.
        let shadow = self
            .shadows
            .iter()
            .position(|shadow| batch.projections.contains(&shadow.member));
        let Some(index) = shadow else {
            return self.members.apply(conn, batch, &batch.feed);
        };
        let shadow = &self.shadows[index];
        let mut in_shadow = InSchema {
            conn,
            search_path: format!("{}, {}", pg::quoted(&shadow.schema), self.store.schema),
        };
        let outcome = self.members.apply(&mut in_shadow, batch, &shadow.member)?;
        self.finish_rebuild_if_caught_up(index);
        Ok(outcome)
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
        let schema = self.store.schema.clone();
        let id = self.id.clone();
        self.connection()?;
        let Some(Connection { client, .. }) = self.conn.as_mut() else {
            return Err(ApplyError::Internal("no connection".into()));
        };
        let mut daemons = pg::cluster(client).map_err(ApplyError::postgres)?;
        let share = request.feeds.len().div_ceil(daemons.len().max(1));
        let mut taken = false;
        if request.take {
            // Each daemon tries the feeds in an order of its own, so that daemons starting
            // together spread over the feeds rather than race for the first.
            let mut order = request.feeds.clone();
            order.sort_by_key(|feed| spread_key(&id, feed));
            for feed in order {
                if self.held.len() >= share {
                    break;
                }
                if !self.held.contains(&feed)
                    && pg::try_lease(client, &schema, &feed, &id).map_err(ApplyError::postgres)?
                {
                    tracing::info!(feed = %feed, "took the feed's lease: applying it here");
                    self.held.insert(feed);
                    taken = true;
                }
            }
        }
        if taken {
            daemons = pg::cluster(client).map_err(ApplyError::postgres)?;
        }
        let others_short = daemons
            .iter()
            .any(|(daemon, feeds)| *daemon != id && feeds.len() < share);
        let surplus = if others_short && self.held.len() > share {
            self.held
                .iter()
                .rev()
                .take(self.held.len() - share)
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        Ok(LeaseReport {
            held: self.held.clone(),
            surplus,
            paused: pg::paused_feeds(client).map_err(ApplyError::postgres)?,
            daemons,
        })
    }

    fn release(&mut self, feed: &str) -> Result<(), ApplyError> {
        if !self.held.remove(feed) {
            return Ok(());
        }
        let schema = self.store.schema.clone();
        let conn = self.connection()?;
        pg::release_lease(&mut conn.client, &schema, feed).map_err(ApplyError::postgres)?;
        tracing::info!(feed, "handed the feed's lease back");
        Ok(())
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

/// Begins `projection`'s rebuild, or cancels it: what was done, or (the inner error) why not.
fn change_rebuild(
    tx: &mut postgres::Transaction,
    schema: &str,
    projection: &ConfiguredProjection,
    cancel: bool,
) -> Result<Result<String, String>, postgres::Error> {
    let name = &projection.name;
    let rebuild = pg::rebuilds(tx)?
        .into_iter()
        .find(|r| r.projection == *name);
    if !cancel {
        if let Some(rebuild) = rebuild {
            return Ok(Ok(format!(
                "{name} is being rebuilt already (since {}; {}): `projector ctl status` shows how far it is",
                rebuild.started_at, rebuild.reason
            )));
        }
        pg::start_rebuild(
            tx,
            name,
            &projection.feed,
            &projection.version,
            lifecycle::ASKED,
        )?;
        return Ok(Ok(format!(
            "rebuilding {name} from the feed's start; its current tables are served and kept current until the rebuild replaces them (`projector ctl status` shows its progress)"
        )));
    }
    if rebuild.is_none() {
        return Ok(Err(format!("{name} is not being rebuilt")));
    }
    if let Some(recorded) = pg::recorded_definition(tx, name)? {
        if recorded.version != projection.version {
            return Ok(Err(format!(
                "{name}'s definition changed since its tables were built (version {}, now {}): its rebuild is how the new definition takes over, so it cannot be cancelled; to keep the old tables, put the previous definition back and restart the daemons, which drops the rebuild",
                recorded.version, projection.version
            )));
        }
    }
    pg::end_rebuild(tx, name)?;
    pg::drop_shadow(tx, &pg::shadow_schema(schema, name), &shadow_member(name))?;
    Ok(Ok(format!(
        "the rebuild of {name} is cancelled and its shadow dropped; its tables are as they were"
    )))
}

/// Moves the event `projection` halted on into the dead letters, and its checkpoint past it.
fn skip_halted_event(
    tx: &mut postgres::Transaction,
    statements: &mut StatementCache,
    projection: &str,
) -> Result<Result<String, String>, postgres::Error> {
    let Some(halted) = pg::halted_event(tx, projection)? else {
        return Ok(Err(format!(
            "{projection} is not halted: there is no event to skip"
        )));
    };
    let checkpoint = pg::lock_checkpoint(tx, statements, projection)?.unwrap_or_default();
    let feed = pg::feed_of(tx, projection)?.unwrap_or_default();
    let skip = match lifecycle::Skip::of(projection, &feed, &halted, checkpoint) {
        Ok(skip) => skip,
        Err(refused) => return Ok(Err(refused)),
    };
    let letter = pg::insert_dead_letter(tx, &skip.letter)?;
    pg::save_checkpoint(tx, statements, projection, &feed, &skip.past)?;
    Ok(Ok(skip.said(letter)))
}

/// Moves `projection`'s checkpoint to `offset`; its tables and dead letters are left as they are.
fn reset_checkpoint(
    tx: &mut postgres::Transaction,
    statements: &mut StatementCache,
    projection: &str,
    offset: u64,
) -> Result<Result<String, String>, postgres::Error> {
    let Some(checkpoint) = pg::lock_checkpoint(tx, statements, projection)? else {
        return Ok(Err(format!("the schema has no projection {projection:?}")));
    };
    if pg::rebuilds(tx)?.iter().any(|r| r.projection == projection) {
        return Ok(Err(format!(
            "{projection} is being rebuilt: cancel the rebuild first (`projector rebuild {projection} --cancel`)"
        )));
    }
    let feed = pg::feed_of(tx, projection)?.unwrap_or_default();
    let reset = lifecycle::reset_to(&checkpoint, offset);
    pg::save_checkpoint(tx, statements, projection, &feed, &reset)?;
    Ok(Ok(format!(
        "{projection}'s checkpoint moved from offset {} to {offset}",
        checkpoint.next_offset
    )))
}

impl PostgresWriter {
    /// Builds the rebuilds recorded (by any daemon) whose definition is this daemon's, and
    /// forgets those no longer recorded (swapped in or cancelled, here or by another daemon);
    /// says so to the feeds' readers when anything changed, or an operator changed a
    /// checkpoint (through any daemon).
    fn follow_changes(&mut self) -> Result<(), ApplyError> {
        let schema = self.store.schema.clone();
        let conn = self.connection()?;
        let recorded = pg::rebuilds(&mut conn.client).map_err(ApplyError::postgres)?;
        let changes = pg::changes(&mut conn.client).map_err(ApplyError::postgres)?;
        let mut changed = changes != self.changes_seen;
        self.changes_seen = changes;
        let mut index = 0;
        while index < self.shadows.len() {
            let shadow = &self.shadows[index];
            if recorded
                .iter()
                .any(|r| r.projection == shadow.projection && r.version == shadow.version)
            {
                index += 1;
                continue;
            }
            let shadow = self.shadows.remove(index);
            self.set_state(&shadow.member, SlotState::Retired);
            let built: Option<Definition> =
                pg::recorded_definition(&mut self.connection()?.client, &shadow.projection)
                    .map_err(ApplyError::postgres)?;
            if built.is_some_and(|built| built.version == shadow.version) {
                // Another daemon swapped it in: the definition configured here is the live one.
                self.set_state(&shadow.projection, SlotState::Running);
            }
            changed = true;
        }
        for rebuild in recorded {
            let Some(&live) = self.members.by_name.get(&rebuild.projection) else {
                continue;
            };
            let projection = self.members.slots[live].projection.clone();
            if projection.version != rebuild.version
                || self.shadows.iter().any(|s| s.projection == projection.name)
            {
                continue;
            }
            let conn = self.connection()?;
            let mut tx = conn.client.transaction().map_err(ApplyError::postgres)?;
            pg::lock_setup(&mut tx, &schema).map_err(ApplyError::postgres)?;
            let shadow = begin_shadow(&mut tx, &mut conn.statements, &schema, &projection, false)
                .map_err(|err| ApplyError::Storage(format!("{err:#}")))?;
            tx.commit().map_err(ApplyError::postgres)?;
            tracing::info!(projection = %projection.name, "rebuilding from the feed's start, beside the live tables");
            self.set_state(&shadow.member, SlotState::Running);
            self.shadows.push(shadow);
            changed = true;
        }
        if changed {
            self.rebuilt.send_modify(|count| *count += 1);
        }
        Ok(())
    }

    fn set_state(&mut self, name: &str, state: SlotState) {
        if let Some(&slot) = self.members.by_name.get(name) {
            self.members.slots[slot].state = state;
        }
    }

    /// Once the shadow of rebuild `index` has caught up with the live checkpoint, its tables
    /// replace the live ones. A failure is said and tried again after the shadow's next batch.
    fn finish_rebuild_if_caught_up(&mut self, index: usize) {
        let schema = self.store.schema.clone();
        let shadow = &self.shadows[index];
        let source = self
            .members
            .by_name
            .get(&shadow.projection)
            .map(|&slot| self.members.slots[slot].projection.definition.clone())
            .unwrap_or_default();
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let started = std::time::Instant::now();
        match swap(&mut conn.client, &schema, shadow, &source) {
            Ok(false) => {}
            Ok(true) => {
                let shadow = self.shadows.remove(index);
                tracing::info!(
                    projection = %shadow.projection,
                    version = %shadow.version,
                    swap = ?started.elapsed(),
                    "rebuilt: the new tables replaced the old ones"
                );
                self.set_state(&shadow.member, SlotState::Retired);
                self.set_state(&shadow.projection, SlotState::Running);
                self.rebuilt.send_modify(|count| *count += 1);
            }
            Err(err) => tracing::error!(
                projection = %shadow.projection,
                "the rebuild caught up but could not replace the live tables (tried again after its next batch): {err:#}"
            ),
        }
    }
}

/// `projection`'s checkpoint, made at the feed's start if it has none.
fn ensure_checkpoint(
    tx: &mut postgres::Transaction,
    statements: &mut StatementCache,
    projection: &str,
    feed: &str,
) -> anyhow::Result<Checkpoint> {
    Ok(match pg::lock_checkpoint(tx, statements, projection)? {
        Some(checkpoint) => checkpoint,
        None => {
            let fresh = Checkpoint::default();
            pg::save_checkpoint(tx, statements, projection, feed, &fresh)?;
            fresh
        }
    })
}

/// The objects `projection`'s setup makes, found by running it in a scratch schema that is
/// rolled back.
fn definition_objects(
    tx: &mut postgres::Transaction,
    statements: &mut StatementCache,
    projection: &ConfiguredProjection,
) -> anyhow::Result<Vec<SchemaObject>> {
    tx.batch_execute(
        "SAVEPOINT projector_scratch;
         CREATE SCHEMA projector_scratch;
         SET LOCAL search_path TO projector_scratch",
    )?;
    let made = projection
        .projection
        .setup_postgres(&mut PostgresTx::new(tx, statements))
        .map_err(|err| anyhow::anyhow!("{err}"))
        .and_then(|()| Ok(pg::objects_in(tx, "projector_scratch")?));
    tx.batch_execute(
        "ROLLBACK TO SAVEPOINT projector_scratch; RELEASE SAVEPOINT projector_scratch",
    )?;
    // Statements prepared in the scratch schema are planned again where they run next.
    statements.clear();
    made
}

/// Sets up the shadow of `projection`'s rebuild: its schema and tables, and its checkpoint
/// (at the feed's start when `fresh`, or left where it is).
fn begin_shadow(
    tx: &mut postgres::Transaction,
    statements: &mut StatementCache,
    schema: &str,
    projection: &ConfiguredProjection,
    fresh: bool,
) -> anyhow::Result<PostgresShadow> {
    let shadow = PostgresShadow {
        projection: projection.name.clone(),
        member: shadow_member(&projection.name),
        version: projection.version.clone(),
        schema: pg::shadow_schema(schema, &projection.name),
    };
    if fresh {
        pg::drop_shadow(tx, &shadow.schema, &shadow.member)?;
    }
    let quoted = pg::quoted(&shadow.schema);
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {quoted}; SET LOCAL search_path TO {quoted}, {schema}"
    ))?;
    projection
        .projection
        .setup_postgres(&mut PostgresTx::new(tx, statements))
        .map_err(|err| anyhow::anyhow!("{err}"))
        .with_context(|| format!("setting up projection {:?} to rebuild it", projection.name))?;
    tx.batch_execute(&format!("SET LOCAL search_path TO {schema}"))?;
    ensure_checkpoint(tx, statements, &shadow.member, &projection.feed)?;
    Ok(shadow)
}

/// Replaces the live projection's objects with the shadow's (moved into the live schema), moves
/// its checkpoint and dead letters to the shadow's and ends the rebuild, in one transaction; or
/// does nothing if the shadow is behind the live checkpoint. True if it swapped.
fn swap(
    client: &mut Client,
    schema: &str,
    shadow: &PostgresShadow,
    source: &str,
) -> anyhow::Result<bool> {
    let mut statements = StatementCache::new();
    let mut tx = client.transaction()?;
    let live =
        pg::lock_checkpoint(&mut tx, &mut statements, &shadow.projection)?.unwrap_or_default();
    let rebuilt =
        pg::lock_checkpoint(&mut tx, &mut statements, &shadow.member)?.unwrap_or_default();
    if rebuilt.next_offset < live.next_offset {
        return Ok(false);
    }
    let feed: String = tx
        .query_one(
            "SELECT feed FROM projector_checkpoints WHERE projection = $1",
            &[&shadow.projection],
        )?
        .get(0);
    let old = pg::recorded_definition(&mut tx, &shadow.projection)?
        .map(|definition| definition.objects)
        .unwrap_or_default();
    let new = pg::objects_in(&mut tx, &shadow.schema)?;
    // Out with the live objects, the old definition's and any the new one would collide with:
    // views first, then tables (taking their indexes and own sequences).
    let live_objects = pg::objects_in(&mut tx, schema)?;
    for rank in ["view", "materialized view", "table", "sequence"] {
        for object in live_objects.iter().filter(|o| {
            o.kind == rank && old.iter().chain(&new).any(|doomed| doomed.name == o.name)
        }) {
            tx.batch_execute(&format!(
                "DROP {} IF EXISTS {schema}.{}",
                rank.to_uppercase(),
                pg::quoted(&object.name)
            ))?;
        }
    }
    let shadow_schema = pg::quoted(&shadow.schema);
    for object in &new {
        tx.batch_execute(&format!(
            "ALTER {} {shadow_schema}.{} SET SCHEMA {schema}",
            object.kind.to_uppercase(),
            pg::quoted(&object.name)
        ))?;
    }
    // The rebuild's dead letters are the projection's now; the old model's are moot.
    tx.execute(
        "DELETE FROM projector_dead_letters WHERE projection = $1",
        &[&shadow.projection],
    )?;
    tx.execute(
        "UPDATE projector_dead_letters SET projection = $1 WHERE projection = $2",
        &[&shadow.projection, &shadow.member],
    )?;
    pg::save_checkpoint(
        &mut tx,
        &mut statements,
        &shadow.projection,
        &feed,
        &rebuilt,
    )?;
    pg::record_definition(
        &mut tx,
        &shadow.projection,
        &Definition {
            version: shadow.version.clone(),
            source: source.to_string(),
            objects: new,
        },
    )?;
    pg::end_rebuild(&mut tx, &shadow.projection)?;
    pg::drop_shadow(&mut tx, &shadow.schema, &shadow.member)?;
    pg::count_change(&mut tx)?;
    tx.commit()?;
    Ok(true)
}

/// A store's connection whose batches run with another `search_path`: a rebuild's shadow's.
struct InSchema<'a> {
    conn: &'a mut Connection,
    search_path: String,
}

impl BeginBatch for InSchema<'_> {
    type Tx<'c>
        = PostgresBatch<'c>
    where
        Self: 'c;

    fn begin(&mut self) -> Result<PostgresBatch<'_>, ApplyError> {
        let mut tx = self
            .conn
            .client
            .transaction()
            .map_err(ApplyError::postgres)?;
        tx.batch_execute(&format!("SET LOCAL search_path TO {}", self.search_path))
            .map_err(ApplyError::postgres)?;
        Ok(PostgresBatch {
            tx,
            statements: &mut self.conn.statements,
        })
    }
}

/// A key ordering `feed` for daemon `id`: stable for the pair, different between daemons.
fn spread_key(id: &str, feed: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (id, feed).hash(&mut hasher);
    hasher.finish()
}

impl BeginBatch for Connection {
    type Tx<'c> = PostgresBatch<'c>;

    fn begin(&mut self) -> Result<PostgresBatch<'_>, ApplyError> {
        Ok(PostgresBatch {
            tx: self.client.transaction().map_err(ApplyError::postgres)?,
            statements: &mut self.statements,
        })
    }
}

/// A batch's transaction on PostgreSQL.
pub(super) struct PostgresBatch<'c> {
    tx: postgres::Transaction<'c>,
    statements: &'c mut StatementCache,
}

impl BatchTx for PostgresBatch<'_> {
    fn checkpoint(&mut self, projection: &str) -> Result<Checkpoint, ApplyError> {
        pg::lock_checkpoint(&mut self.tx, self.statements, projection)
            .map(Option::unwrap_or_default)
            .map_err(ApplyError::postgres)
    }

    fn save_checkpoint(
        &mut self,
        projection: &str,
        feed: &str,
        checkpoint: &Checkpoint,
    ) -> Result<(), ApplyError> {
        pg::save_checkpoint(&mut self.tx, self.statements, projection, feed, checkpoint)
            .map_err(ApplyError::postgres)
    }

    fn record_halt(&mut self, projection: &str, event: &HaltedEvent) -> Result<(), ApplyError> {
        pg::record_halt(&mut self.tx, projection, event).map_err(ApplyError::postgres)
    }

    fn parked_behind(
        &mut self,
        projection: &str,
        aggregate: &str,
    ) -> Result<Option<i64>, ApplyError> {
        pg::parked_behind(&mut self.tx, self.statements, projection, aggregate)
            .map_err(ApplyError::postgres)
    }

    fn insert_dead_letter(&mut self, letter: &DeadLetter) -> Result<(), ApplyError> {
        pg::insert_dead_letter(&mut self.tx, letter)
            .map(drop)
            .map_err(ApplyError::postgres)
    }

    fn apply(
        &mut self,
        projection: &ConfiguredProjection,
        event: &Event,
    ) -> Result<Result<(), ProjectionError>, ApplyError> {
        let mut writes = PostgresTx::new(&mut self.tx, self.statements);
        match projection.projection.apply_postgres(&mut writes, event) {
            Err(ProjectionError::Postgres(err)) if pg::is_storage_failure(&err) => {
                Err(ApplyError::postgres(err))
            }
            result => Ok(result),
        }
    }

    fn savepoint(&mut self) -> Result<(), ApplyError> {
        self.tx
            .batch_execute("SAVEPOINT projector_event")
            .map_err(ApplyError::postgres)
    }

    fn rollback_to_savepoint(&mut self) -> Result<(), ApplyError> {
        self.tx
            .batch_execute("ROLLBACK TO SAVEPOINT projector_event")
            .map_err(ApplyError::postgres)
    }

    fn release_savepoint(&mut self) -> Result<(), ApplyError> {
        self.tx
            .batch_execute("RELEASE SAVEPOINT projector_event")
            .map_err(ApplyError::postgres)
    }

    fn commit(self) -> Result<(), ApplyError> {
        self.tx.commit().map_err(ApplyError::postgres)
    }
}
