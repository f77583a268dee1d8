//! account_ledger: a Rust projection keeping every transaction of the bank example, and per
//! account the number and totals of credits and debits and the time of the last activity.
//!
//! It shows the typed side of the projection contract: each event type has a serde struct, and a
//! payload that does not fit it is a poison event handled by the projection's `on_error`. It runs
//! on both stores: an event is decoded and checked once (`Entry`), then written with each
//! store's SQL.

use rusqlite::{params, Transaction};
use serde::Deserialize;

use crate::event::Event;
use crate::projection::{PostgresTx, Projection, ProjectionError};

const CREATED: &str = "account.AccountCreated";
const CREDITED: &str = "account.AccountCredited";
const DEBITED: &str = "account.AccountDebited";

/// This module's definition version: change it whenever its tables or what it writes change,
/// so that databases built by the previous one are rebuilt (or refused, per `on_change`).
pub const VERSION: &str = "1";

#[derive(Debug, Deserialize)]
struct AccountCreated {
    account_id: String,
    balance: i64,
}

/// Credits and debits carry the same fields.
#[derive(Debug, Deserialize)]
struct AccountTransaction {
    account_id: String,
    transaction_id: String,
    amount: i64,
}

pub struct AccountLedger;

/// What an event does to the ledger, decoded and checked once for either store.
enum Entry {
    Opened(AccountCreated),
    Moved {
        kind: &'static str,
        change: AccountTransaction,
    },
}

impl Entry {
    /// The entry `event` makes; None for a type the ledger does not keep.
    fn of(event: &Event) -> Result<Option<Entry>, ProjectionError> {
        let moved = |kind: &'static str| -> Result<Option<Entry>, ProjectionError> {
            let change: AccountTransaction = event.decode()?;
            if change.amount < 0 {
                return Err(ProjectionError::Rejected(format!(
                    "{kind} of a negative amount ({})",
                    change.amount
                )));
            }
            Ok(Some(Entry::Moved { kind, change }))
        };
        match event.meta.event_type.as_str() {
            CREATED => Ok(Some(Entry::Opened(event.decode()?))),
            CREDITED => moved("credit"),
            DEBITED => moved("debit"),
            _ => Ok(None),
        }
    }

    /// A credit's or a debit's amount, as (credit, debit).
    fn split(kind: &str, amount: i64) -> (i64, i64) {
        if kind == "credit" {
            (amount, 0)
        } else {
            (0, amount)
        }
    }
}

/// The ledger's tables, the same on both stores but for the type of their integers.
fn tables(integer: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS account_ledger_entries (
             event_offset   {integer} PRIMARY KEY,
             account_id     TEXT NOT NULL,
             transaction_id TEXT NOT NULL,
             kind           TEXT NOT NULL CHECK (kind IN ('credit', 'debit')),
             amount         {integer} NOT NULL,
             created        TEXT NOT NULL
         );
         CREATE INDEX IF NOT EXISTS account_ledger_entries_by_account
             ON account_ledger_entries (account_id, event_offset);
         CREATE TABLE IF NOT EXISTS account_activity (
             account_id      TEXT PRIMARY KEY,
             opening_balance {integer} NOT NULL,
             credits         {integer} NOT NULL DEFAULT 0,
             debits          {integer} NOT NULL DEFAULT 0,
             credited_total  {integer} NOT NULL DEFAULT 0,
             debited_total   {integer} NOT NULL DEFAULT 0,
             opened_offset   {integer} NOT NULL,
             last_offset     {integer} NOT NULL,
             last_activity   TEXT NOT NULL
         );"
    )
}

/// The account a credit or debit names must have been opened.
fn opened(updated: u64, kind: &str, account_id: &str) -> Result<(), ProjectionError> {
    if updated != 1 {
        return Err(ProjectionError::Rejected(format!(
            "{kind} for account {account_id} which was never created"
        )));
    }
    Ok(())
}

impl Projection for AccountLedger {
    fn event_types(&self) -> Vec<String> {
        vec![CREATED.into(), CREDITED.into(), DEBITED.into()]
    }

    fn version(&self) -> String {
        VERSION.into()
    }

    fn setup(&self, tx: &Transaction) -> Result<(), ProjectionError> {
        tx.execute_batch(&tables("INTEGER"))?;
        Ok(())
    }

    fn apply(&self, tx: &Transaction, event: &Event) -> Result<(), ProjectionError> {
        let offset = crate::store::offset_to_sql(event.offset);
        let created = &event.meta.created;
        match Entry::of(event)? {
            None => Ok(()),
            Some(Entry::Opened(account)) => {
                tx.prepare_cached(
                    "INSERT INTO account_activity
                         (account_id, opening_balance, opened_offset, last_offset, last_activity)
                     VALUES (?1, ?2, ?3, ?3, ?4)",
                )?
                .execute(params![
                    account.account_id,
                    account.balance,
                    offset,
                    created
                ])?;
                Ok(())
            }
            Some(Entry::Moved { kind, change }) => {
                tx.prepare_cached(
                    "INSERT INTO account_ledger_entries
                         (event_offset, account_id, transaction_id, kind, amount, created)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    offset,
                    change.account_id,
                    change.transaction_id,
                    kind,
                    change.amount,
                    created
                ])?;
                let (credit, debit) = Entry::split(kind, change.amount);
                let updated = tx
                    .prepare_cached(
                        "UPDATE account_activity SET
                             credits = credits + (?2 > 0), debits = debits + (?3 > 0),
                             credited_total = credited_total + ?2,
                             debited_total = debited_total + ?3,
                             last_offset = ?4, last_activity = ?5
                         WHERE account_id = ?1",
                    )?
                    .execute(params![change.account_id, credit, debit, offset, created])?;
                opened(updated as u64, kind, &change.account_id)
            }
        }
    }

    fn supports_postgres(&self) -> bool {
        true
    }

    fn setup_postgres(&self, tx: &mut PostgresTx) -> Result<(), ProjectionError> {
        // PostgreSQL's INTEGER is 32 bits.
        tx.batch_execute(&tables("BIGINT"))?;
        Ok(())
    }

    fn apply_postgres(&self, tx: &mut PostgresTx, event: &Event) -> Result<(), ProjectionError> {
        let offset = crate::store::offset_to_sql(event.offset);
        let created = &event.meta.created;
        match Entry::of(event)? {
            None => Ok(()),
            Some(Entry::Opened(account)) => {
                tx.execute(
                    "INSERT INTO account_activity
                         (account_id, opening_balance, opened_offset, last_offset, last_activity)
                     VALUES ($1, $2, $3, $3, $4)",
                    &[&account.account_id, &account.balance, &offset, created],
                )?;
                Ok(())
            }
            Some(Entry::Moved { kind, change }) => {
                let (credit, debit) = Entry::split(kind, change.amount);
                // One statement, one round trip to the server: the entry, then the activity.
                let updated = tx.execute(
                    "WITH entry AS (
                         INSERT INTO account_ledger_entries
                             (event_offset, account_id, transaction_id, kind, amount, created)
                         VALUES ($1, $2, $3, $4, $5, $6)
                     )
                     UPDATE account_activity SET
                         credits = credits + (CASE WHEN $7::BIGINT > 0 THEN 1 ELSE 0 END),
                         debits = debits + (CASE WHEN $8::BIGINT > 0 THEN 1 ELSE 0 END),
                         credited_total = credited_total + $7::BIGINT,
                         debited_total = debited_total + $8::BIGINT,
                         last_offset = $1, last_activity = $6
                     WHERE account_id = $2",
                    &[
                        &offset,
                        &change.account_id,
                        &change.transaction_id,
                        &kind,
                        &change.amount,
                        created,
                        &credit,
                        &debit,
                    ],
                )?;
                opened(updated, kind, &change.account_id)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventMeta;
    use rusqlite::Connection;
    use serde_json::json;

    fn event(offset: u64, event_type: &str, payload: serde_json::Value) -> Event {
        Event {
            offset,
            meta: EventMeta {
                event_id: format!("id-{offset}"),
                event_type: event_type.into(),
                aggregate_name: "*account.Account".into(),
                created: format!("t{offset}"),
                ..EventMeta::default()
            },
            payload: Some(payload.into()),
            page: None,
        }
    }

    #[test]
    fn keeps_entries_and_activity() -> Result<(), Box<dyn std::error::Error>> {
        let mut conn = Connection::open_in_memory()?;
        let tx = conn.transaction()?;
        let ledger = AccountLedger;
        ledger.setup(&tx)?;
        ledger.apply(
            &tx,
            &event(0, CREATED, json!({"account_id": "a", "balance": 3})),
        )?;
        let credit = json!({"account_id": "a", "transaction_id": "t", "amount": 4});
        ledger.apply(&tx, &event(1, CREDITED, credit))?;
        let debit = json!({"account_id": "a", "transaction_id": "u", "amount": 1});
        ledger.apply(&tx, &event(2, DEBITED, debit))?;
        let row: (i64, i64, i64, i64, String) = tx.query_row(
            "SELECT credits, debits, credited_total, debited_total, last_activity
               FROM account_activity WHERE account_id = 'a'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )?;
        assert_eq!(row, (1, 1, 4, 1, "t2".to_string()));
        let entries: i64 =
            tx.query_row("SELECT count(*) FROM account_ledger_entries", [], |r| {
                r.get(0)
            })?;
        assert_eq!(entries, 2);

        let wrong_type = json!({"account_id": "a", "transaction_id": "v", "amount": "lots"});
        let err = ledger.apply(&tx, &event(3, CREDITED, wrong_type));
        assert!(matches!(err, Err(ProjectionError::Decode(_))), "{err:?}");
        let unknown = json!({"account_id": "nobody", "transaction_id": "w", "amount": 1});
        let err = ledger.apply(&tx, &event(4, CREDITED, unknown));
        assert!(matches!(err, Err(ProjectionError::Rejected(_))), "{err:?}");
        Ok(())
    }
}
