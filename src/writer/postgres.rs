//! The writer on PostgreSQL: one connection, holding this daemon's leases, on which every batch
//! commits with its checkpoints (read `FOR UPDATE`, so even two daemons at once could not apply
//! an event twice). A batch of a feed whose lease this connection does not hold is refused.
//!
//! When the connection is lost, so are its leases: the next job connects again holding none,
//! and the daemon's readers of those feeds stop at the next lease round.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use postgres::Client;

use super::activity::WriterActivity;
use super::apply::{BatchTx, BeginBatch, Members};
use super::thread::{self, Interrupter, WriterStore};
use super::{
    ApplyError, Batch, BatchOutcome, Slot, SlotState, StartingPoint, WriterHandle, WriterThread,
};
use crate::config::{OnChange, PostgresStore};
use crate::event::Event;
use crate::projection::{ConfiguredProjection, PostgresTx, ProjectionError};
use crate::store::lifecycle::{Definition, HaltedEvent};
use crate::store::postgres::{self as pg, Session, StatementCache};
use crate::store::{Checkpoint, DeadLetter};

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
        let mut slots = Vec::with_capacity(projections.len());
        if let Some(refused) = crate::projection::refused_by_postgres(&projections) {
            anyhow::bail!(refused);
        }
        let mut tx = conn.client.transaction()?;
        pg::lock_setup(&mut tx, &store.schema)?;
        for projection in projections {
            let name = projection.name.clone();
            if let Some(recorded) = pg::recorded_definition(&mut tx, &name)? {
                if recorded.version != projection.version {
                    let old = &recorded.version;
                    let version = &projection.version;
                    match projection.on_change {
                        OnChange::Refuse => anyhow::bail!(
                            "projection {name:?}'s definition changed since its tables were built (version {old}, now {version}), and its on_change is \"refuse\": put the previous definition back"
                        ),
                        OnChange::Rebuild => anyhow::bail!(
                            "projection {name:?}'s definition changed since its tables were built (version {old}, now {version}); on PostgreSQL, Projector does not rebuild a projection yet: put the previous definition back, or drop its tables and delete its row of {}.projector_checkpoints to build it again from the feed's start",
                            store.schema
                        ),
                    }
                }
            }
            let mut writes = PostgresTx::new(&mut tx, &mut conn.statements);
            projection
                .projection
                .setup_postgres(&mut writes)
                .map_err(|err| anyhow::anyhow!("{err}"))
                .with_context(|| format!("setting up projection {name:?} on PostgreSQL"))?;
            let checkpoint = match pg::lock_checkpoint(&mut tx, &mut conn.statements, &name)? {
                Some(checkpoint) => checkpoint,
                None => {
                    let fresh = Checkpoint::default();
                    pg::save_checkpoint(
                        &mut tx,
                        &mut conn.statements,
                        &name,
                        &projection.feed,
                        &fresh,
                    )?;
                    fresh
                }
            };
            let definition = Definition {
                version: projection.version.clone(),
                source: projection.definition.clone(),
                objects: Vec::new(),
            };
            pg::record_definition(&mut tx, &name, &definition)?;
            starting_points.push(StartingPoint {
                projection: name.clone(),
                feed: projection.feed.clone(),
                event_types: projection.event_types.clone(),
                checkpoint,
                dead_letters: pg::count_dead_letters(&mut tx, &name)?,
                frozen: false,
            });
            slots.push(Slot {
                projection,
                state: SlotState::Running,
            });
        }
        let paused_feeds = pg::paused_feeds(&mut tx)?;
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
        })
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
            if let Some(token) = token {
                // The blocking client runs a runtime of its own, which cannot start on the
                // caller's (async) thread.
                std::thread::spawn(move || {
                    let _ = token.cancel_query(postgres::NoTls);
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
        let members: Vec<(String, crate::projection::EventTypes)> = self
            .members
            .slots
            .iter()
            .filter(|slot| slot.projection.feed == feed)
            .map(|slot| {
                (
                    slot.projection.name.clone(),
                    slot.projection.event_types.clone(),
                )
            })
            .collect();
        let conn = self.connection()?;
        let checkpoints: BTreeMap<String, Checkpoint> = pg::read_checkpoints(&mut conn.client)
            .map_err(ApplyError::postgres)?
            .into_iter()
            .collect();
        members
            .into_iter()
            .map(|(projection, event_types)| {
                Ok(StartingPoint {
                    checkpoint: checkpoints.get(&projection).cloned().unwrap_or_default(),
                    dead_letters: pg::count_dead_letters(&mut conn.client, &projection)
                        .map_err(ApplyError::postgres)?,
                    projection,
                    feed: feed.to_string(),
                    event_types,
                    frozen: false,
                })
            })
            .collect()
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
        pg::insert_dead_letter(&mut self.tx, letter).map_err(ApplyError::postgres)
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
