//! `[feed.mapping]`: how an inline feed of any JSON shape is read: where its events and their
//! fields are (JSON pointers), how a page is asked for (query parameter names, page size), and
//! how the next page is found (offsets, next links, next cursors, or none).

use std::num::NonZeroU32;

use serde::Deserialize;

use crate::json_pointer::JsonPointer;

/// The query parameter that carries the offset, unless a mapping names another.
pub const OFFSET_PARAM: &str = "offset";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// How a page's body holds its events: a JSON document, or one event per line.
    #[serde(default)]
    pub encoding: Encoding,
    /// Where the array of events is in a page. Unset: the page itself if it is an array,
    /// else its `events` member, as without a mapping.
    pub events: Option<JsonPointer>,
    #[serde(default = "defaults::id")]
    pub id: JsonPointer,
    #[serde(rename = "type", default = "defaults::event_type")]
    pub event_type: JsonPointer,
    #[serde(default = "defaults::aggregate_id")]
    pub aggregate_id: JsonPointer,
    #[serde(default = "defaults::aggregate_name")]
    pub aggregate_name: JsonPointer,
    #[serde(default = "defaults::version")]
    pub version: JsonPointer,
    #[serde(default = "defaults::created")]
    pub created: JsonPointer,
    #[serde(default = "defaults::payload")]
    pub payload: JsonPointer,
    #[serde(default)]
    pub paging: Paging,
    /// With `paging = "link"` or `"cursor"`: where a page says its next link or cursor.
    pub next: Option<JsonPointer>,
    /// The query parameter that carries the offset (`paging = "offset"`).
    #[serde(default = "defaults::offset_param")]
    pub offset_param: String,
    /// The query parameter that carries a next cursor (`paging = "cursor"`).
    #[serde(default = "defaults::cursor_param")]
    pub cursor_param: String,
    /// The query parameter that carries `page_size`.
    #[serde(default = "defaults::limit_param")]
    pub limit_param: String,
    /// How many events a page is asked for; unset, the feed decides and no limit is sent.
    pub page_size: Option<NonZeroU32>,
}

/// How a page's body holds its events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encoding {
    #[default]
    Json,
    /// One JSON event per line (an export): `events` and `next` do not apply.
    JsonLines,
}

/// How the next page is asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Paging {
    /// `?offset=N`: the page starting at the Nth event of the feed.
    #[default]
    Offset,
    /// Each page gives the URL of the next one (absolute, or relative to the page's).
    Link,
    /// Each page gives a cursor, sent back as `cursor_param` for the next one.
    Cursor,
    /// The feed's URL answers all its events at once (an export): read whole at every poll.
    None,
}

impl Paging {
    /// Whether pages are found by what the previous one says, not by offset: a checkpoint then
    /// keeps where its page is.
    pub fn follows_pages(self) -> bool {
        !matches!(self, Paging::Offset)
    }
}

impl Mapping {
    /// What is wrong with the mapping as a whole, if anything.
    pub fn problem(&self) -> Option<String> {
        let needs_next = matches!(self.paging, Paging::Link | Paging::Cursor);
        if needs_next && self.next.is_none() {
            return Some(
                "paging = \"link\" and \"cursor\" need `next`, the pointer to where a page gives the next one".into(),
            );
        }
        if !needs_next && self.next.is_some() {
            return Some("`next` is read only with paging = \"link\" or \"cursor\"".into());
        }
        if self.encoding == Encoding::JsonLines {
            if self.events.is_some() {
                return Some(
                    "with encoding = \"json-lines\" each line is an event: `events` does not apply"
                        .into(),
                );
            }
            if needs_next {
                return Some("a JSON-lines page has no place for a next link or cursor: use paging = \"offset\" or \"none\"".into());
            }
        }
        if self.id.is_whole() || self.event_type.is_whole() {
            return Some("`id` and `type` point inside an event, not at the whole of it".into());
        }
        None
    }
}

impl Default for Mapping {
    /// Eventhus's names, as an inline feed without a mapping is read.
    fn default() -> Self {
        Mapping {
            encoding: Encoding::Json,
            events: None,
            id: defaults::id(),
            event_type: defaults::event_type(),
            aggregate_id: defaults::aggregate_id(),
            aggregate_name: defaults::aggregate_name(),
            version: defaults::version(),
            created: defaults::created(),
            payload: defaults::payload(),
            paging: Paging::Offset,
            next: None,
            offset_param: defaults::offset_param(),
            cursor_param: defaults::cursor_param(),
            limit_param: defaults::limit_param(),
            page_size: None,
        }
    }
}

mod defaults {
    use crate::json_pointer::JsonPointer;

    fn pointer(member: &str) -> JsonPointer {
        JsonPointer::member(member)
    }

    pub fn id() -> JsonPointer {
        pointer("id")
    }
    pub fn event_type() -> JsonPointer {
        pointer("type")
    }
    pub fn aggregate_id() -> JsonPointer {
        pointer("aggregate_id")
    }
    pub fn aggregate_name() -> JsonPointer {
        pointer("aggregate_type")
    }
    pub fn version() -> JsonPointer {
        pointer("version")
    }
    pub fn created() -> JsonPointer {
        pointer("created")
    }
    pub fn payload() -> JsonPointer {
        pointer("data")
    }
    pub fn offset_param() -> String {
        super::OFFSET_PARAM.into()
    }
    pub fn cursor_param() -> String {
        "cursor".into()
    }
    pub fn limit_param() -> String {
        "limit".into()
    }
}
