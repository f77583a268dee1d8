//! A feed page as the formats' parsers make it: entries in feed order, each with its event's
//! metadata and its payload or where to fetch it, and what both parsers check of a page.

use std::collections::HashSet;

use hyper::Uri;

use crate::event::{EventMeta, Payload};

/// One entry of a feed page: an event's metadata, and its payload or where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct PageEntry {
    pub meta: EventMeta,
    pub body: EntryBody,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EntryBody {
    /// Fetched with a request of its own, only if a projection needs it (Flux).
    At(Uri),
    /// Sent in the page (inline feeds).
    Inline(Payload),
}

/// Why `bytes` is not a page of the `format` named: the parser's reason, and how the body starts.
pub(super) fn not_a_page(format: &str, bytes: &[u8], err: serde_json::Error) -> String {
    let start = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned();
    format!("the page is not {format} page ({err}); it starts with {start:?}")
}

/// Refuses a page that lists an event id twice: which of the two is the event is unknown.
pub(super) fn check_unique_ids<'a>(
    ids: impl ExactSizeIterator<Item = &'a str>,
) -> Result<(), String> {
    let mut seen = HashSet::with_capacity(ids.len());
    for id in ids {
        if !seen.insert(id) {
            return Err(format!("the page lists event id {id} twice"));
        }
    }
    Ok(())
}

/// A page's entries up to the first one that cannot be read, or why the first one cannot. The
/// events before a bad entry are applied; the next page starts at the bad one, which is then
/// refused, reported and retried on its own.
pub(super) fn readable_prefix(
    entries: impl Iterator<Item = Result<PageEntry, String>>,
) -> Result<Vec<PageEntry>, String> {
    let mut readable = Vec::with_capacity(entries.size_hint().0);
    for entry in entries {
        match entry {
            Ok(entry) => readable.push(entry),
            Err(reason) if readable.is_empty() => return Err(reason),
            Err(_) => break,
        }
    }
    Ok(readable)
}
