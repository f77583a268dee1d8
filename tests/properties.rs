//! Property tests of everything that parses outside input: the feed-page parsers (Flux, inline and mapped), JSON pointers, the declarative
//! projection loader, the configuration and the control protocol. Arbitrary input may be
//! refused, never panic; what is valid must come through unchanged.
//! More cases on demand: `PROPTEST_CASES=100000 cargo test --release --test properties`.

use std::path::Path;

use proptest::prelude::*;
use serde_json::{json, Value};
use url::Url;

use projector::config::mapping::Mapping;
use projector::config::Config;
use projector::control::protocol::Request;
use projector::feed::access::Access;
use projector::feed::flux::parse_page;
use projector::feed::page::EntryBody;
use projector::feed::{inline, mapped};
use projector::json_pointer::JsonPointer;
use projector::projection::sql::SqlProjection;

fn feed_url() -> Url {
    Url::parse("http://127.0.0.1:3000/events").unwrap_or_else(|e| panic!("{e}"))
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
            prop::collection::btree_map(".{0,8}", inner, 0..8)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// An inline event: id, type, aggregate name, version, created, aggregate id, payload.
type InlineEvent = (String, String, String, i64, String, String, Value);

/// Valid inline events with unique ids; a null payload is no payload, so each is wrapped.
fn valid_inline_events() -> impl Strategy<Value = Vec<InlineEvent>> {
    prop::collection::vec((valid_entry(), "[a-f0-9-]{0,36}", json_value()), 0..20).prop_map(
        |events| {
            events
                .into_iter()
                .enumerate()
                .map(
                    |(i, ((id, event_type, aggregate, version, created), aggregate_id, data))| {
                        let id = format!("{id}-{i}");
                        (
                            id,
                            event_type,
                            aggregate,
                            version,
                            created,
                            aggregate_id,
                            json!({ "v": data }),
                        )
                    },
                )
                .collect()
        },
    )
}

/// The inline page of `events`, in Eventhus's names.
fn inline_page(events: &[InlineEvent]) -> Value {
    let events = events.iter().map(|(id, event_type, aggregate, version, created, aggregate_id, data)| {
        json!({
            "id": id, "type": event_type, "aggregate_id": aggregate_id, "aggregate_type": aggregate,
            "version": version, "created": created, "data": data,
        })
    });
    Value::from(events.collect::<Vec<_>>())
}

/// A mapping of other names: events at `/r/items`, fields nested, one under a name with a `/`,
/// the aggregate in an array, paged by cursor.
fn other_names() -> Mapping {
    toml::from_str(
        r#"
        events = "/r/items"
        id = "/m~1e/i"
        type = "/m~1e/t"
        created = "/m~1e/at"
        aggregate_id = "/s/0"
        aggregate_name = "/s/1"
        version = "/s/2"
        payload = "/b"
        paging = "cursor"
        next = "/r/n"
        "#,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn json_lines() -> Mapping {
    toml::from_str("encoding = \"json-lines\"\npayload = \"\"").unwrap_or_else(|e| panic!("{e}"))
}

/// A page entry whose known fields hold anything, some of them missing.
fn near_entry() -> impl Strategy<Value = Value> {
    let field = prop_oneof![
        Just("event_id"),
        Just("url"),
        Just("event_type"),
        Just("aggregate_name"),
        Just("aggregate_version"),
        Just("created"),
    ];
    let plausible = prop_oneof![
        json_value(),
        "[a-z0-9-]{0,10}".prop_map(Value::from),
        "(https?://[a-z.:0-9]{0,20}/)?[a-z0-9/?=]{0,12}".prop_map(Value::from),
    ];
    prop::collection::btree_map(field, plausible, 0..7)
        .prop_map(|map| Value::Object(map.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

/// An inline event whose known fields (Eventhus's and Flux's names) hold anything.
fn near_inline_event() -> impl Strategy<Value = Value> {
    let field = prop_oneof![
        Just("id"),
        Just("event_id"),
        Just("type"),
        Just("aggregate_id"),
        Just("aggregate_type"),
        Just("version"),
        Just("created"),
        Just("data"),
        Just("payload"),
    ];
    let plausible = prop_oneof![json_value(), "[a-z0-9-]{0,10}".prop_map(Value::from)];
    prop::collection::btree_map(field, plausible, 0..9)
        .prop_map(|map| Value::Object(map.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

/// A valid entry: what a Flux server sends.
fn valid_entry() -> impl Strategy<Value = (String, String, String, i64, String)> {
    (
        "[a-f0-9-]{1,36}",
        "[a-zA-Z.]{1,30}",
        "\\*?[a-z]{1,10}\\.[A-Z][a-z]{1,10}",
        0i64..1_000_000,
        "[A-Za-z0-9 :]{0,24}",
    )
}

proptest! {
    #[test]
    fn the_page_parser_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_page(&bytes, &feed_url(), &Access::anywhere());
    }

    #[test]
    fn the_page_parser_never_panics_on_json(value in json_value()) {
        let _ = parse_page(value.to_string().as_bytes(), &feed_url(), &Access::anywhere());
    }

    #[test]
    fn the_page_parser_never_panics_on_near_pages(
        entries in prop::collection::vec(near_entry(), 0..6),
        extra in prop::option::of(json_value()),
    ) {
        let mut page = json!({ "description": "event feed", "events": entries });
        if let Some(extra) = extra {
            page["extra"] = extra;
        }
        let _ = parse_page(page.to_string().as_bytes(), &feed_url(), &Access::anywhere());
    }

    #[test]
    fn valid_pages_parse_to_their_entries(entries in prop::collection::vec(valid_entry(), 0..20)) {
        // Ids must be unique on a page; the generated ones may repeat, so make them unique.
        let entries: Vec<_> = entries
            .into_iter()
            .enumerate()
            .map(|(i, (id, event_type, aggregate, version, created))| {
                (format!("{id}-{i}"), event_type, aggregate, version, created)
            })
            .collect();
        let page = json!({
            "description": "event feed",
            "events": entries.iter().map(|(id, event_type, aggregate, version, created)| json!({
                "event_id": id,
                "url": format!("http://127.0.0.1:3000/events/{id}"),
                "aggregate_name": aggregate,
                "aggregate_version": version,
                "event_type": event_type,
                "created": created,
            })).collect::<Vec<_>>(),
        });
        let parsed = parse_page(page.to_string().as_bytes(), &feed_url(), &Access::anywhere());
        prop_assert!(parsed.is_ok(), "{parsed:?}");
        let parsed = parsed.unwrap_or_default();
        prop_assert_eq!(parsed.len(), entries.len());
        for (entry, (id, event_type, aggregate, version, created)) in parsed.iter().zip(&entries) {
            prop_assert_eq!(&entry.meta.event_id, id);
            prop_assert_eq!(&entry.meta.event_type, event_type);
            prop_assert_eq!(&entry.meta.aggregate_name, aggregate);
            prop_assert_eq!(entry.meta.aggregate_version, *version);
            prop_assert_eq!(&entry.meta.created, created);
        }
    }

    #[test]
    fn the_inline_page_parser_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        value in json_value(),
        events in prop::collection::vec(near_inline_event(), 0..6),
    ) {
        let _ = inline::parse_page(&bytes);
        let _ = inline::parse_page(value.to_string().as_bytes());
        let _ = inline::parse_page(Value::from(events.clone()).to_string().as_bytes());
        let _ = inline::parse_page(json!({ "events": events }).to_string().as_bytes());
    }

    #[test]
    fn valid_inline_pages_parse_to_their_events_and_payload_text(events in valid_inline_events()) {
        let page = inline_page(&events);
        let parsed = inline::parse_page(page.to_string().as_bytes());
        prop_assert!(parsed.is_ok(), "{parsed:?}");
        let parsed = parsed.unwrap_or_default();
        prop_assert_eq!(parsed.len(), events.len());
        for (entry, (id, event_type, aggregate, version, created, aggregate_id, data)) in parsed.iter().zip(&events) {
            prop_assert_eq!(&entry.meta.event_id, id);
            prop_assert_eq!(&entry.meta.event_type, event_type);
            prop_assert_eq!(&entry.meta.aggregate_id, aggregate_id);
            prop_assert_eq!(&entry.meta.aggregate_name, aggregate);
            prop_assert_eq!(entry.meta.aggregate_version, *version);
            prop_assert_eq!(&entry.meta.created, created);
            let text = match &entry.body {
                EntryBody::Inline(payload) => payload.as_str().to_string(),
                EntryBody::At(url) => format!("a URL: {url}"),
            };
            prop_assert_eq!(text, data.to_string());
        }
    }

    #[test]
    fn the_mapped_page_parser_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        value in json_value(),
        events in prop::collection::vec(json_value(), 0..6),
    ) {
        for mapping in [other_names(), Mapping::default(), json_lines()] {
            let _ = mapped::parse_page(&mapping, &bytes);
            let _ = mapped::parse_page(&mapping, value.to_string().as_bytes());
            let page = json!({ "r": { "items": events.clone(), "n": value.clone() } });
            let _ = mapped::parse_page(&mapping, page.to_string().as_bytes());
        }
    }

    #[test]
    fn valid_pages_read_the_same_inline_and_through_a_mapping_of_other_names(
        events in valid_inline_events(),
        next in prop::option::of("[ -~]{1,20}"),
    ) {
        let inline_page = inline_page(&events);
        let other_page = json!({ "r": {
            "items": events.iter().map(|(id, event_type, aggregate, version, created, aggregate_id, data)| json!({
                "m/e": { "i": id, "t": event_type, "at": created },
                "s": [aggregate_id, aggregate, version],
                "b": data,
            })).collect::<Vec<_>>(),
            "n": next,
        }});
        let inline = inline::parse_page(inline_page.to_string().as_bytes());
        let other = mapped::parse_page(&other_names(), other_page.to_string().as_bytes());
        prop_assert!(inline.is_ok() && other.is_ok(), "{inline:?} {other:?}");
        let (other, other_next) = other.unwrap_or_default();
        prop_assert_eq!(inline.unwrap_or_default(), other);
        prop_assert_eq!(other_next, next);
    }

    #[test]
    fn a_pointer_to_any_member_finds_its_value(
        members in prop::collection::btree_map(".{0,8}", json_value(), 1..6),
        pick in any::<prop::sample::Index>(),
    ) {
        let (name, value) = members.iter().nth(pick.index(members.len())).unwrap_or_else(|| unreachable!());
        let text = format!("/{}", name.replace('~', "~0").replace('/', "~1"));
        let pointer = JsonPointer::parse(&text);
        prop_assert_eq!(pointer.as_ref().ok(), Some(&JsonPointer::member(name)));
        let object = Value::Object(members.clone().into_iter().collect()).to_string();
        let found = pointer
            .map_err(|e| e.to_string())
            .and_then(|p| p.find_in(object.as_bytes()).map_err(|e| e.to_string()))
            .map(|raw| raw.map(|raw| raw.get().to_string()));
        // The member's own text, as the object's serialization wrote it.
        prop_assert_eq!(found, Ok(Some(value.to_string())));
    }

    #[test]
    fn the_projection_loader_never_panics_on_text(text in ".{0,400}") {
        let _ = SqlProjection::parse(Path::new("p.toml"), &text);
    }

    #[test]
    fn the_projection_loader_never_panics_on_near_projections(
        lines in prop::collection::vec(projection_line(), 0..12)
    ) {
        let _ = SqlProjection::parse(Path::new("p.toml"), &lines.join("\n"));
    }

    #[test]
    fn the_config_parser_never_panics_on_text(text in ".{0,400}") {
        let _ = Config::parse(Path::new("/etc/projector/consumer.toml"), text);
    }

    #[test]
    fn the_config_parser_never_panics_on_near_configs(
        lines in prop::collection::vec(config_line(), 0..16)
    ) {
        let _ = Config::parse(Path::new("/etc/projector/consumer.toml"), lines.join("\n"));
    }

    #[test]
    fn the_control_parser_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = Request::parse(&bytes);
    }

    #[test]
    fn the_control_parser_never_panics_on_json(value in json_value()) {
        let _ = Request::parse(value.to_string().as_bytes());
    }

    #[test]
    fn the_control_parser_never_panics_on_near_requests(
        command in prop_oneof![
            Just("status".to_string()), Just("pause".to_string()), Just("resume".to_string()),
            Just("reload".to_string()), Just("stop".to_string()), ".{0,10}"
        ],
        feed in prop::option::of(json_value()),
        extra in prop::option::of(("[a-z]{1,6}", json_value())),
    ) {
        let mut request = json!({ "command": command });
        if let Some(feed) = feed {
            request["feed"] = feed;
        }
        if let Some((key, value)) = extra {
            request[key] = value;
        }
        let _ = Request::parse(request.to_string().as_bytes());
    }

    #[test]
    fn valid_requests_round_trip(request in request()) {
        let line = serde_json::to_string(&request).unwrap_or_default();
        prop_assert_eq!(Request::parse(line.as_bytes()), Ok(request));
    }
}

fn request() -> impl Strategy<Value = Request> {
    let feed = prop::option::of(".{0,16}");
    prop_oneof![
        Just(Request::Status),
        feed.clone().prop_map(|feed| Request::Pause { feed }),
        feed.prop_map(|feed| Request::Resume { feed }),
        Just(Request::Reload),
        Just(Request::Stop),
    ]
}

/// Lines a declarative projection file is made of, right and wrong.
fn projection_line() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("schema = \"CREATE TABLE IF NOT EXISTS t (a TEXT)\"".to_string()),
        Just("schema = \"\"".to_string()),
        Just("[on.\"a.B\"]".to_string()),
        Just("[on.\"\"]".to_string()),
        Just("sql = \"INSERT INTO t (a) VALUES (:a)\"".to_string()),
        Just("sql = \"UPDATE t SET a = :a WHERE a = :b\"".to_string()),
        Just("sql = \"DROP TABLE t; SELECT 1\"".to_string()),
        Just("params = { a = \"/a\", b = \"@offset\" }".to_string()),
        Just("params = { a = \"@nonsense\", b = 7 }".to_string()),
        Just("expect_rows = 1".to_string()),
        Just("expect_rows = -1".to_string()),
        Just("description = \"x\"".to_string()),
        "[a-z_]{1,8} = \"[^\"\\\\]{0,12}\"",
        ".{0,30}",
    ]
}

/// Lines a consumer.toml is made of, right and wrong.
fn config_line() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("[daemon]".to_string()),
        Just("database = \"p.db\"".to_string()),
        Just("control_socket = \"p.sock\"".to_string()),
        Just("control_socket_mode = \"0660\"".to_string()),
        Just("max_database_bytes = 0".to_string()),
        Just("[[feed]]".to_string()),
        Just("name = \"bank\"".to_string()),
        Just("url = \"http://127.0.0.1:3000/events\"".to_string()),
        Just("url = \"http://\"".to_string()),
        Just("format = \"flux\"".to_string()),
        Just("poll_interval = \"5s\"".to_string()),
        Just("poll_interval = \"-1s\"".to_string()),
        Just("body_concurrency = 100000".to_string()),
        Just("[[projection]]".to_string()),
        Just("feed = \"bank\"".to_string()),
        Just("module = \"account_ledger\"".to_string()),
        Just("file = \"/nonexistent.toml\"".to_string()),
        Just("on_error = \"skip\"".to_string()),
        "[a-z_]{1,10} = [0-9]{1,20}",
        ".{0,30}",
    ]
}
