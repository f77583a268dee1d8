//! An event's `created` time as feeds write it: RFC 3339 (`2026-11-22T19:04:21Z`), Go's ANSIC
//! layout that Flux writes (`Sun Nov 22 19:04:21 2026`, no zone: taken as UTC), or seconds since
//! the Unix epoch. What none of these reads gives no time, and no lag in seconds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn parse(created: &str) -> Option<SystemTime> {
    let created = created.trim();
    if let Ok(seconds) = created.parse::<u64>() {
        return UNIX_EPOCH.checked_add(Duration::from_secs(seconds));
    }
    if let Ok(time) = humantime::parse_rfc3339_weak(created) {
        return Some(time);
    }
    let naive = chrono::NaiveDateTime::parse_from_str(created, "%a %b %e %H:%M:%S %Y").ok()?;
    let seconds = u64::try_from(naive.and_utc().timestamp()).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_ways_feeds_write_it_are_read() {
        let at = |s: &str| {
            parse(s)
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
        };
        assert_eq!(at("Sun Nov 22 19:04:21 2026"), Some(1_795_374_261));
        assert_eq!(at("Mon Nov  2 19:04:21 2026"), Some(1_793_646_261));
        assert_eq!(at("2026-11-22T19:04:21Z"), Some(1_795_374_261));
        assert_eq!(at("1795374261"), Some(1_795_374_261));
        assert_eq!(at("yesterday"), None);
        assert_eq!(at(""), None);
    }
}
