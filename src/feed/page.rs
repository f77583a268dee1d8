//! A feed page as the formats' parsers make it: entries in feed order, each with its event's
//! metadata and its payload or where to fetch it, and what every format's pages are checked
//! for: JSON of the format's shape, no event id listed twice, and entries up to the first one
//! that cannot be read.

use std::borrow::Cow;
use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::ops::Range;
use std::sync::Arc;

use hyper::Uri;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::event::{EventMeta, PagePlace, Payload};

/// One entry of a feed page: an event's metadata, and its payload or where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct PageEntry {
    pub meta: EventMeta,
    pub body: EntryBody,
    /// Where its page is, on a feed paged by links or cursors (set by the reader).
    pub page: Option<Arc<PagePlace>>,
}

impl PageEntry {
    /// About the bytes the entry holds, for the reader's budget.
    pub fn weight(&self) -> usize {
        let meta = &self.meta;
        let body = match &self.body {
            EntryBody::At(uri) => {
                uri.authority().map_or(0, |a| a.as_str().len())
                    + uri.path_and_query().map_or(0, |p| p.as_str().len())
            }
            EntryBody::Inline(payload) => payload.as_str().len(),
        };
        std::mem::size_of::<(u64, PageEntry)>()
            + meta.event_id.len()
            + meta.event_type.len()
            + meta.aggregate_id.len()
            + meta.aggregate_name.len()
            + meta.created.len()
            + body
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum EntryBody {
    /// Fetched with a request of its own, only if a projection needs it (Flux).
    At(Uri),
    /// Sent in the page (inline feeds).
    Inline(Payload),
}

/// What a feed format says of its pages; `read_page` does the rest.
pub(super) trait EntryFormat: Send + Sync + 'static {
    /// As a page error says it: "a Flux feed".
    const NAME: &'static str;
    /// An entry as the page has it: the shape is checked, the values not yet.
    type Raw<'a>: Deserialize<'a>;

    /// A page's entries, as `T`: raw entries, or their JSON text.
    fn list<'a, T: Deserialize<'a>>(&self, bytes: &'a [u8]) -> Result<Vec<T>, serde_json::Error>;
    /// The entry's id; empty if it has none (`entry` then says why it cannot be read).
    fn id<'r>(&self, raw: &'r Self::Raw<'_>) -> Cow<'r, str>;
    /// The entry, or why it cannot be read.
    fn entry(&self, raw: Self::Raw<'_>) -> Result<PageEntry, String>;
    /// The link or cursor the page gives to the page after it, for feeds paged that way.
    fn next(&self, _bytes: &[u8]) -> Result<Option<String>, String> {
        Ok(None)
    }
}

/// Pages this large or larger are kept as their bytes, their entries made a chunk at a time as
/// the reader takes them: a page of a hundred thousand tiny entries then costs its bytes, not
/// the several times as much its parsed entries would.
pub const LAZY_PAGE_BYTES: usize = 1 << 20;

/// A page that could not be read: why, and its bytes, for a caller that tries another format.
pub struct Unread {
    pub reason: String,
    pub bytes: Vec<u8>,
}

/// Reads and checks a page: an error if it is not a page of the format, lists an event id
/// twice, or its first entry cannot be read; otherwise its entries up to the first one that
/// cannot be read (the next page starts there, and is refused, reported and retried). Pages of
/// `lazy_from` bytes or more are kept as their bytes, their entries made as they are taken.
pub(super) fn read_page<F: EntryFormat>(
    format: Arc<F>,
    bytes: Vec<u8>,
    lazy_from: usize,
) -> Result<Page, Unread> {
    if bytes.len() < lazy_from {
        // One pass over the whole page: small pages are most pages.
        let parsed = format
            .list::<F::Raw<'_>>(&bytes)
            .map_err(|err| not_a_page::<F>(&bytes, err));
        let read = parsed.and_then(|raws| {
            let mut ids = HashSet::with_capacity(raws.len());
            if let Some(twice) = raws
                .iter()
                .map(|raw| format.id(raw))
                .find(|id| !id.is_empty() && !ids.insert(id.clone()))
            {
                return Err(listed_twice(&twice));
            }
            let mut check = Check::default();
            let mut entries = VecDeque::with_capacity(raws.len());
            for raw in raws {
                if let Some(entry) = check.next(&*format, raw) {
                    entries.push_back(entry);
                }
            }
            let cut = check.finish()?;
            Ok((Entries::Parsed(entries), cut))
        });
        let next = read.and_then(|read| Ok((read, format.next(&bytes)?)));
        return match next {
            Ok(((entries, cut), next)) => Ok(Page { entries, cut, next }),
            Err(reason) => Err(Unread { reason, bytes }),
        };
    }
    let ranges = {
        let texts = format
            .list::<&RawValue>(&bytes)
            .map_err(|err| not_a_page::<F>(&bytes, err));
        texts.and_then(|texts| {
            let start = bytes.as_ptr() as usize;
            let ids = RandomState::new();
            let mut id_hashes = Vec::with_capacity(texts.len());
            let mut check = Check::default();
            let mut ranges = VecDeque::new();
            for (index, text) in texts.iter().enumerate() {
                let text = text.get();
                let offset = text.as_ptr() as usize - start;
                let raw = serde_json::from_str::<F::Raw<'_>>(text)
                    .map_err(|err| not_a_page::<F>(&bytes, in_page(&bytes, offset, &err)))?;
                let id = format.id(&raw);
                if !id.is_empty() {
                    id_hashes.push((ids.hash_one(&*id), index));
                }
                if check.next(&*format, raw).is_some() {
                    ranges.push_back(offset..offset + text.len());
                }
            }
            let id_at = |index: usize| {
                serde_json::from_str::<F::Raw<'_>>(texts[index].get())
                    .map(|raw| format.id(&raw).into_owned())
                    .unwrap_or_default()
            };
            if let Some(twice) = first_repeated(&mut id_hashes, id_at) {
                return Err(listed_twice(&twice));
            }
            let cut = check.finish()?;
            let next = format.next(&bytes)?;
            Ok((ranges, cut, next))
        })
    };
    match ranges {
        Ok((ranges, cut, next)) => Ok(Page {
            cut,
            next,
            entries: Entries::Lazy {
                parse: Arc::new(move |text: &str| {
                    let raw =
                        serde_json::from_str::<F::Raw<'_>>(text).map_err(|e| e.to_string())?;
                    format.entry(raw)
                }),
                bytes,
                ranges,
            },
        }),
        Err(reason) => Err(Unread { reason, bytes }),
    }
}

/// Why `bytes` is not a page of the format: the parser's reason, and how the body starts.
fn not_a_page<F: EntryFormat>(bytes: &[u8], err: impl std::fmt::Display) -> String {
    let start = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned();
    format!(
        "the page is not {} page ({err}); it starts with {start:?}",
        F::NAME
    )
}

/// The parser's reason for an entry that starts at `offset`, placed in the whole page as the
/// whole page's parser would place it.
fn in_page(bytes: &[u8], offset: usize, err: &serde_json::Error) -> String {
    let said = err.to_string();
    let Some(reason) =
        said.strip_suffix(&format!(" at line {} column {}", err.line(), err.column()))
    else {
        return said;
    };
    let before = &bytes[..offset];
    let lines_before = before.iter().filter(|&&b| b == b'\n').count();
    let column = if err.line() == 1 {
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |at| at + 1);
        offset - line_start + err.column()
    } else {
        err.column()
    };
    format!(
        "{reason} at line {} column {column}",
        lines_before + err.line()
    )
}

/// The first id an earlier entry has too, as a set filled in order finds it, from the ids'
/// hashes (with each entry's index) and the id at an index: a large page's ids stay in its text.
fn first_repeated(
    id_hashes: &mut [(u64, usize)],
    id_at: impl Fn(usize) -> String,
) -> Option<String> {
    id_hashes.sort_unstable();
    let mut first: Option<usize> = None;
    for same_hash in id_hashes.chunk_by(|a, b| a.0 == b.0) {
        for (later, &(_, index)) in same_hash.iter().enumerate().skip(1) {
            if first.is_some_and(|first| first < index) {
                break;
            }
            let id = id_at(index);
            if same_hash[..later]
                .iter()
                .any(|&(_, earlier)| id_at(earlier) == id)
            {
                first = Some(index);
                break;
            }
        }
    }
    first.map(id_at)
}

fn listed_twice(id: &str) -> String {
    format!("the page lists event id {id} twice")
}

/// A page's entries read one at a time, in order, up to the first that cannot be read.
#[derive(Default)]
struct Check {
    readable: usize,
    /// Why the first entry that cannot be read cannot.
    unreadable: Option<String>,
}

impl Check {
    /// The entry if it is part of the readable prefix.
    fn next<F: EntryFormat>(&mut self, format: &F, raw: F::Raw<'_>) -> Option<PageEntry> {
        if self.unreadable.is_some() {
            return None;
        }
        match format.entry(raw) {
            Ok(entry) => {
                self.readable += 1;
                Some(entry)
            }
            Err(reason) => {
                self.unreadable = Some(reason);
                None
            }
        }
    }

    /// An error if the page's first entry cannot be read; otherwise why the page was cut
    /// short, if it was.
    fn finish(self) -> Result<Option<String>, String> {
        match self.unreadable {
            Some(reason) if self.readable == 0 => Err(reason),
            cut => Ok(cut),
        }
    }
}

/// Makes one entry from its JSON text, as it was made when the page was checked.
type EntryParser = Arc<dyn Fn(&str) -> Result<PageEntry, String> + Send + Sync>;

/// A page of a feed, read and checked: its entries in feed order (up to its first unreadable
/// one), taken from the front.
pub struct Page {
    entries: Entries,
    /// Why the page's entries end before its last one: an entry that cannot be read.
    pub cut: Option<String>,
    /// The link or cursor to the next page, for feeds that give one.
    pub next: Option<String>,
}

enum Entries {
    Parsed(VecDeque<PageEntry>),
    Lazy {
        bytes: Vec<u8>,
        /// Where each entry not yet taken is in `bytes`, in order.
        ranges: VecDeque<Range<usize>>,
        parse: EntryParser,
    },
}

impl Page {
    /// The entries not taken yet.
    pub fn len(&self) -> usize {
        match &self.entries {
            Entries::Parsed(entries) => entries.len(),
            Entries::Lazy { ranges, .. } => ranges.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes a page kept as its bytes holds until it is dropped; none for a parsed page,
    /// whose entries are counted as they are taken.
    pub fn bytes_held(&self) -> usize {
        match &self.entries {
            Entries::Parsed(_) => 0,
            Entries::Lazy { bytes, ranges, .. } => {
                bytes.capacity() + ranges.capacity() * std::mem::size_of::<Range<usize>>()
            }
        }
    }

    /// The id of the first entry not taken yet.
    pub fn first_id(&self) -> Option<String> {
        match &self.entries {
            Entries::Parsed(entries) => entries.front().map(|e| e.meta.event_id.clone()),
            Entries::Lazy {
                bytes,
                ranges,
                parse,
            } => {
                let range = ranges.front()?.clone();
                entry_at(bytes, range, parse).ok().map(|e| e.meta.event_id)
            }
        }
    }

    /// The id of the last entry.
    pub fn last_id(&self) -> Option<String> {
        match &self.entries {
            Entries::Parsed(entries) => entries.back().map(|e| e.meta.event_id.clone()),
            Entries::Lazy {
                bytes,
                ranges,
                parse,
            } => {
                let range = ranges.back()?.clone();
                entry_at(bytes, range, parse).ok().map(|e| e.meta.event_id)
            }
        }
    }

    /// Drops up to `count` entries from the front, unread.
    pub fn skip(&mut self, count: usize) {
        match &mut self.entries {
            Entries::Parsed(entries) => drop(entries.drain(..count.min(entries.len()))),
            Entries::Lazy { ranges, .. } => drop(ranges.drain(..count.min(ranges.len()))),
        }
    }

    /// Takes up to `max` entries from the front. An entry that no longer reads as it did when
    /// the page was checked is a bug, said as an error.
    pub fn take(&mut self, max: usize) -> Result<Vec<PageEntry>, String> {
        match &mut self.entries {
            Entries::Parsed(entries) => {
                let count = max.min(entries.len());
                Ok(entries.drain(..count).collect())
            }
            Entries::Lazy {
                bytes,
                ranges,
                parse,
            } => {
                let count = max.min(ranges.len());
                ranges
                    .drain(..count)
                    .map(|range| entry_at(bytes, range, parse))
                    .collect()
            }
        }
    }
}

fn entry_at(bytes: &[u8], range: Range<usize>, parse: &EntryParser) -> Result<PageEntry, String> {
    let text = bytes
        .get(range)
        .and_then(|raw| std::str::from_utf8(raw).ok())
        .ok_or_else(|| {
            "an entry of a checked page is no longer where it was (a bug)".to_string()
        })?;
    parse(text)
        .map_err(|reason| format!("an entry of a checked page no longer reads (a bug): {reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feed::access::Access;
    use crate::feed::flux::Flux;
    use crate::feed::inline::Inline;

    /// The page read both ways: whole, and kept as its bytes and taken a few entries at a time.
    fn both_ways<F: EntryFormat>(format: F, body: &str) -> [Result<Vec<PageEntry>, String>; 2] {
        let format = Arc::new(format);
        let whole = read_page(format.clone(), body.as_bytes().to_vec(), usize::MAX)
            .map_err(|unread| unread.reason)
            .and_then(|mut page| page.take(usize::MAX));
        let lazy = read_page(format, body.as_bytes().to_vec(), 0)
            .map_err(|unread| unread.reason)
            .and_then(|mut page| {
                assert!(matches!(page.entries, Entries::Lazy { .. }));
                let mut entries = Vec::new();
                while !page.is_empty() {
                    entries.extend(page.take(2)?);
                }
                Ok(entries)
            });
        [whole, lazy]
    }

    #[test]
    fn a_large_page_kept_as_its_bytes_reads_as_a_small_one_does() {
        let inline_pages = [
            r#"[{"id":"a","type":"t","data":1},{"id":"b","type":"t","data":{"x":[1,"é"]}},{"id":"c","type":"t","data":3}]"#,
            r#"{"events":[{"id":"a","type":"t","data":1},{"id":"b","type":"t"},{"id":"c","type":"t","data":3}]}"#,
            r#"[{"id":"a","type":"t"},{"id":"b","type":"t","data":2}]"#,
            r#"[{"id":"a","type":"t","data":1},{"id":"b","type":"t"},{"id":"a","type":"t","data":3}]"#,
            r#"[{"id":"a","type":"t","data":1},{"id":"b","data":2}]"#,
            r#"[{"id":"a","type":"t","data":1},{"id":"b","type":"t","data":1},{"id":"b","type":"t","data":1},{"id":"a","type":"t","data":1}]"#,
            r#"[{"id":"a","type":"t","data":1},{"id":"a","type":"t","data":1},{"id":"b"}]"#,
            r#"[{"id":"a","type":"t","data":1},"#,
            "[\n {\"id\":\"a\",\"type\":\"t\",\"data\":1},\n  {\"id\":\"b\",\n \"data\":2}]",
            "[\n {\"id\":\"a\",\"type\":\"t\",\"data\":1},\n  {\"id\":\"b\", \"data\":2}]",
            "[]",
        ];
        for body in inline_pages {
            let [whole, lazy] = both_ways(Inline, body);
            assert_eq!(whole, lazy, "{body}");
        }
        let flux = || Flux {
            feed_url: url::Url::parse("http://127.0.0.1:3900/events")
                .unwrap_or_else(|e| panic!("{e}")),
            access: Arc::new(Access::anywhere()),
        };
        let flux_pages = [
            r#"{"events":[{"event_id":"a","url":"/events/a","event_type":"t"},{"event_id":"b","url":"http://127.0.0.1:3900/events/b","event_type":"t","aggregate_version":2}]}"#,
            r#"{"events":[{"event_id":"a","url":"/events/a","event_type":"t"},{"event_id":"b","url":"http://[::1/b","event_type":"t"}]}"#,
            r#"{"events":[{"event_id":"a","url":"/events/a","event_type":"t"},{"event_id":"a","url":"/events/a","event_type":"t"}]}"#,
            r#"{"events":[{"event_id":"a","url":"/events/a"}]}"#,
        ];
        for body in flux_pages {
            let [whole, lazy] = both_ways(flux(), body);
            assert_eq!(whole, lazy, "{body}");
        }
    }

    #[test]
    fn a_page_is_read_up_to_its_first_unreadable_entry_and_checked_whole() {
        let ids = |body: &str| {
            both_ways(Inline, body)[1].clone().map(|entries| {
                entries
                    .into_iter()
                    .map(|e| e.meta.event_id)
                    .collect::<Vec<_>>()
            })
        };
        let prefix = ids(
            r#"[{"id":"a","type":"t","data":1},{"id":"b","type":"t"},{"id":"c","type":"t","data":3}]"#,
        );
        assert_eq!(prefix, Ok(vec!["a".to_string()]));
        let first = ids(r#"[{"id":"a","type":"t"},{"id":"b","type":"t","data":2}]"#);
        assert!(first.is_err_and(|e| e.contains("event a has no data")));
        let twice = ids(
            r#"[{"id":"a","type":"t","data":1},{"id":"b","type":"t"},{"id":"a","type":"t","data":3}]"#,
        );
        assert!(twice.is_err_and(|e| e.contains("lists event id a twice")));
        let shape = ids(r#"[{"id":"a","type":"t","data":1},{"id":"b","data":2}]"#);
        assert!(shape.is_err_and(|e| e.contains("not an inline feed page")));
    }

    #[test]
    fn the_repeated_id_found_is_the_one_a_set_filled_in_order_finds_whatever_the_hashes() {
        let ids = ["a", "b", "c", "b", "a", "c"];
        let id_at = |index: usize| ids[index].to_string();
        // Every hash the same: only the ids tell.
        let mut colliding: Vec<(u64, usize)> = (0..ids.len()).map(|index| (7, index)).collect();
        assert_eq!(first_repeated(&mut colliding, id_at), Some("b".into()));
        let mut distinct: Vec<(u64, usize)> = (0..3).map(|index| (7, index)).collect();
        assert_eq!(first_repeated(&mut distinct, id_at), None);
        let hashes = RandomState::new();
        let mut hashed: Vec<(u64, usize)> = (0..ids.len())
            .map(|index| (hashes.hash_one(ids[index]), index))
            .collect();
        assert_eq!(first_repeated(&mut hashed, id_at), Some("b".into()));
    }

    #[test]
    fn a_lazy_page_says_its_first_and_last_ids_as_entries_are_taken() -> Result<(), String> {
        let body = r#"[{"id":"a","type":"t","data":1},{"id":"b","type":"t","data":2},{"id":"c","type":"t","data":3}]"#;
        let mut page = read_page(Arc::new(Inline), body.as_bytes().to_vec(), 0)
            .map_err(|unread| unread.reason)?;
        assert_eq!(
            (page.first_id(), page.last_id()),
            (Some("a".into()), Some("c".into()))
        );
        page.skip(1);
        assert_eq!(page.take(1)?.len(), 1);
        assert_eq!((page.len(), page.first_id()), (1, Some("c".into())));
        assert_eq!(page.take(5)?.len(), 1);
        assert!(page.is_empty() && page.first_id().is_none());
        Ok(())
    }
}
