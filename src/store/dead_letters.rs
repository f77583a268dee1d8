//! The events a projection could not apply (`on_error = "skip"`), as an operator works through
//! them: listed, shown, retried or discarded. A letter is never deleted: a retry or a discard
//! is recorded on it with its time.

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::event::{Event, EventMeta, Payload};

/// One dead letter as stored.
#[derive(Debug, Clone, Serialize)]
pub struct StoredLetter {
    pub id: i64,
    pub projection: String,
    pub feed: String,
    pub offset: u64,
    pub event_id: String,
    pub event_type: String,
    pub error: String,
    pub recorded_at: String,
    /// `retried` or `discarded`; None while it waits for an operator.
    pub resolution: Option<String>,
    pub resolved_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// The aggregate it holds back, when parked (`on_error = "park"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parks: Option<String>,
    #[serde(skip)]
    event_meta: Option<String>,
}

/// The metadata a dead letter keeps besides the id and the type.
#[derive(Serialize, Deserialize, Default)]
struct StoredMeta {
    aggregate_id: String,
    aggregate_name: String,
    aggregate_version: i64,
    created: String,
}

/// `meta` as the `event_meta` column keeps it.
pub fn meta_json(meta: &EventMeta) -> String {
    serde_json::json!({
        "aggregate_id": meta.aggregate_id,
        "aggregate_name": meta.aggregate_name,
        "aggregate_version": meta.aggregate_version,
        "created": meta.created,
    })
    .to_string()
}

impl StoredLetter {
    /// The event as the feed gave it, to apply again. Letters recorded before the metadata
    /// was kept have an empty aggregate and creation time.
    pub fn event(&self) -> Result<Event, String> {
        let meta: StoredMeta = match &self.event_meta {
            Some(json) => serde_json::from_str(json).unwrap_or_default(),
            None => StoredMeta::default(),
        };
        let payload = match &self.payload {
            Some(text) => Some(Payload::from_json(text.clone().into_bytes())?),
            None => None,
        };
        Ok(Event {
            offset: self.offset,
            meta: EventMeta {
                event_id: self.event_id.clone(),
                event_type: self.event_type.clone(),
                aggregate_id: meta.aggregate_id,
                aggregate_name: meta.aggregate_name,
                aggregate_version: meta.aggregate_version,
                created: meta.created,
            },
            payload,
            // A retry moves no checkpoint.
            page: None,
        })
    }
}

const COLUMNS: &str =
    "id, projection, feed, event_offset, event_id, event_type, error, recorded_at,
     resolution, resolved_at, payload, event_meta, aggregate";

fn letter(row: &rusqlite::Row) -> rusqlite::Result<StoredLetter> {
    Ok(StoredLetter {
        id: row.get(0)?,
        projection: row.get(1)?,
        feed: row.get(2)?,
        offset: row.get::<_, i64>(3)?.try_into().unwrap_or(0),
        event_id: row.get(4)?,
        event_type: row.get(5)?,
        error: row.get(6)?,
        recorded_at: row.get(7)?,
        resolution: row.get(8)?,
        resolved_at: row.get(9)?,
        payload: row.get(10)?,
        event_meta: row.get(11)?,
        parks: row.get(12)?,
    })
}

/// The dead letters, in the order they were recorded: those waiting for an operator, or all
/// of them with `resolved`; of one projection, or of every one.
pub fn list(
    conn: &Connection,
    projection: Option<&str>,
    resolved: bool,
) -> rusqlite::Result<Vec<StoredLetter>> {
    let mut statement = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM projector_dead_letters
         WHERE (?1 IS NULL OR projection = ?1) AND (?2 OR resolution IS NULL)
         ORDER BY id"
    ))?;
    let rows = statement.query_map(params![projection, resolved], letter)?;
    rows.collect()
}

/// The letters waiting behind `first` that its aggregate holds back, in order.
pub fn parked_after(
    conn: &Connection,
    first: &StoredLetter,
) -> rusqlite::Result<Vec<StoredLetter>> {
    let mut statement = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM projector_dead_letters
         WHERE projection = ?1 AND aggregate = ?2 AND resolution IS NULL AND id > ?3
         ORDER BY id"
    ))?;
    let rows = statement.query_map(params![first.projection, first.parks, first.id], letter)?;
    rows.collect()
}

pub fn get(conn: &Connection, id: i64) -> rusqlite::Result<Option<StoredLetter>> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM projector_dead_letters WHERE id = ?1"),
        [id],
        letter,
    )
    .optional()
}

/// The first letter of `projection` that holds `aggregate` back, if one waits.
pub fn parked_behind(
    conn: &Connection,
    projection: &str,
    aggregate: &str,
) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached(
        "SELECT min(id) FROM projector_dead_letters
         WHERE projection = ?1 AND aggregate = ?2 AND resolution IS NULL",
    )?
    .query_row(params![projection, aggregate], |row| row.get(0))
}

/// Records what became of a letter: `retried` (it applied) or `discarded`.
pub fn resolve(conn: &Connection, id: i64, resolution: &str) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE projector_dead_letters
         SET resolution = ?2, resolved_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
         WHERE id = ?1",
        params![id, resolution],
    )?;
    Ok(())
}

/// A retry that failed again: the letter keeps waiting, with the new error.
pub fn record_error(conn: &Connection, id: i64, error: &str) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE projector_dead_letters SET error = ?2 WHERE id = ?1",
        params![id, error],
    )?;
    Ok(())
}
