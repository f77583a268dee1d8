//! The Flux bank example's events, made up deterministically from a seed, and the balances they
//! fold to: the demo's data, and the oracle the tests and benchmarks check the read model against.
//!
//! Besides the three bank event types it mixes in `account.StatementRequested`, a type no shipped
//! projection registers, because real feeds carry such events and a consumer must pass them over.

use std::collections::BTreeMap;

use serde_json::json;

use crate::demo::feed_server::StoredEvent;

pub const CREATED: &str = "account.AccountCreated";
pub const CREDITED: &str = "account.AccountCredited";
pub const DEBITED: &str = "account.AccountDebited";
/// A type no shipped projection handles.
pub const STATEMENT_REQUESTED: &str = "account.StatementRequested";

/// 2026-11-22 19:04:21 UTC, as seconds since the Unix epoch: when the made-up events start.
const FIRST_EVENT_AT: i64 = 1_795_374_261;

/// `count` bank events from `seed`: accounts opened now and then, credits and debits on them.
pub fn generate(seed: u64, count: usize) -> Vec<StoredEvent> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut accounts: Vec<(String, i64)> = Vec::new(); // (id, next aggregate version)
    let mut events = Vec::with_capacity(count);
    for index in 0..count {
        let created = ansic(FIRST_EVENT_AT + index as i64);
        let event_id = uuid(&mut rng);
        if accounts.is_empty() || rng.u32(0..100) < 8 {
            let account_id = uuid(&mut rng);
            let body = json!({"account_id": account_id, "balance": rng.i64(0..1000)});
            accounts.push((account_id.clone(), 1));
            events.push(stored(
                event_id,
                (account_id, 0),
                CREATED,
                created,
                body.to_string(),
            ));
            continue;
        }
        let pick = rng.usize(..accounts.len());
        let (account_id, version) = &mut accounts[pick];
        let aggregate_version = *version;
        *version += 1;
        let (event_type, body) = match rng.u32(0..100) {
            0..45 => (CREDITED, transaction(&mut rng, account_id)),
            45..92 => (DEBITED, transaction(&mut rng, account_id)),
            _ => (STATEMENT_REQUESTED, json!({"account_id": account_id})),
        };
        events.push(stored(
            event_id,
            (account_id.clone(), aggregate_version),
            event_type,
            created,
            body.to_string(),
        ));
    }
    events
}

fn transaction(rng: &mut fastrand::Rng, account_id: &str) -> serde_json::Value {
    json!({"account_id": account_id, "transaction_id": uuid(rng), "amount": rng.i64(1..500)})
}

/// `aggregate` is the account's id and its version.
fn stored(
    id: String,
    aggregate: (String, i64),
    event_type: &str,
    created: String,
    body: String,
) -> StoredEvent {
    let (aggregate_id, aggregate_version) = aggregate;
    StoredEvent {
        id,
        aggregate_id,
        aggregate_name: "*account.Account".into(),
        aggregate_version,
        event_type: event_type.into(),
        created,
        body,
    }
}

/// The balance of every account after all of `events`: the read model `account_balances` must
/// hold exactly this.
pub fn expected_balances(events: &[StoredEvent]) -> BTreeMap<String, i64> {
    let mut balances = BTreeMap::new();
    for event in events {
        let Ok(body) = serde_json::from_str::<serde_json::Value>(&event.body) else {
            continue;
        };
        let account = body["account_id"].as_str().unwrap_or_default().to_string();
        match event.event_type.as_str() {
            CREATED => {
                balances.insert(account, body["balance"].as_i64().unwrap_or(0));
            }
            CREDITED => {
                *balances.entry(account).or_insert(0) += body["amount"].as_i64().unwrap_or(0)
            }
            DEBITED => {
                *balances.entry(account).or_insert(0) -= body["amount"].as_i64().unwrap_or(0)
            }
            _ => {}
        }
    }
    balances
}

/// A random (version 4 layout) UUID from the seeded generator.
fn uuid(rng: &mut fastrand::Rng) -> String {
    let bits = rng.u128(..);
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        (bits >> 96) as u32,
        (bits >> 80) as u16,
        (bits >> 68) as u16 & 0x0fff,
        ((bits >> 52) as u16 & 0x3fff) | 0x8000,
        bits as u64 & 0xffff_ffff_ffff
    )
}

/// Go's `time.ANSIC` layout, `Mon Jan _2 15:04:05 2006`, as Flux writes `created`.
pub fn ansic(unix_seconds: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{} {} {:>2} {:02}:{:02}:{:02} {}",
        DAYS[days.rem_euclid(7) as usize],
        MONTHS[(month - 1) as usize],
        day,
        secs / 3600,
        secs % 3600 / 60,
        secs % 60,
        year
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansic_matches_go() {
        assert_eq!(ansic(0), "Thu Jan  1 00:00:00 1970");
        assert_eq!(ansic(FIRST_EVENT_AT), "Sun Nov 22 19:04:21 2026");
        assert_eq!(ansic(951_782_400), "Tue Feb 29 00:00:00 2000");
    }

    #[test]
    fn generation_is_deterministic_and_folds() {
        let events = generate(7, 500);
        assert_eq!(events, generate(7, 500));
        assert_ne!(events, generate(8, 500));
        let types: std::collections::HashSet<&str> =
            events.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types.len(), 4, "{types:?}");
        let balances = expected_balances(&events);
        let created = events.iter().filter(|e| e.event_type == CREATED).count();
        assert_eq!(balances.len(), created);
    }
}
