//! The feed client: the page request and the body request of every format, over `http/`, each
//! page parsed by its format's module (`flux.rs`, `inline.rs`) into `page.rs`'s entries.
//!
//! Every format is read the same way: `GET {feed}?offset=N` answers a page of entries starting at
//! that position. A Flux entry says where its payload is (one more request each); an inline entry
//! carries it. The reader sees only `PageEntry`, so a format is a page parser and one
//! `FeedFormat` variant.
//!
//! A feed with a `[feed.mapping]` is read by `mapped.rs`, and may be paged by next links or
//! cursors instead of offsets: its pages are then asked for at the place a previous page named.
//!
//! A fetch error says what failed and how ([`error::FetchErrorKind`]); the reader decides from
//! the kind whether to retry or halt. A shrunk or rewritten feed is found by the reader, which
//! compares pages with what it applied.

pub mod access;
pub mod error;
pub mod flux;
pub mod http;
pub mod inline;
pub mod live;
pub mod mapped;
pub mod page;

use std::sync::Arc;
use std::time::Duration;

use hyper::Uri;
use url::Url;

use crate::config::mapping::{Paging, OFFSET_PARAM};
use crate::config::{ConfigError, ConfigSource, FeedConfig, FeedFormat};
use crate::event::{PagePlace, Payload};
use access::Access;
use error::{FetchError, FetchErrorKind, FetchTarget};
use flux::Flux;
use http::{parse_uri, HttpClient, HttpSettings};
use inline::Inline;
use mapped::Mapped;
use page::{Page, PageEntry, Unread, LAZY_PAGE_BYTES};

/// The HTTP client behind a feed client: hyper-util's, or reqwest's for the A/B.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // a few per feed, never moved on the hot path
enum Http {
    Hyper(HttpClient),
    #[cfg(feature = "http-ab")]
    Reqwest(http::reqwest_client::ReqwestClient),
}

impl Http {
    async fn get(&self, url: &Uri) -> Result<Vec<u8>, FetchErrorKind> {
        match self {
            Http::Hyper(client) => client.get(url).await,
            #[cfg(feature = "http-ab")]
            Http::Reqwest(client) => client.get(url).await,
        }
    }

    /// As `get`, with `extra` more time for the answer (a long-poll's wait).
    async fn get_within(&self, url: &Uri, extra: Duration) -> Result<Vec<u8>, FetchErrorKind> {
        match self {
            Http::Hyper(client) => client.get_within(url, extra).await,
            #[cfg(feature = "http-ab")]
            Http::Reqwest(client) => client.get(url).await,
        }
    }
}

/// A client for one feed; cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct FeedClient {
    /// The feed's name, for the metrics.
    name: Arc<str>,
    http: Http,
    /// Without its user and password.
    feed_url: Url,
    format: FeedFormat,
    /// How Flux entries are read: the feed URL they may be relative to, and where they may lead.
    flux: Arc<Flux>,
    /// How an inline feed of its own shape is read, and paged.
    mapped: Option<Arc<Mapped>>,
}

/// Where a page is asked for.
#[derive(Debug, Clone, Copy)]
pub enum PageAt<'a> {
    /// The page starting at an offset.
    Offset(u64),
    /// On a feed paged by links or cursors: the page a previous one named, or the first.
    Named(Option<&'a PagePlace>),
}

impl FeedClient {
    /// The client of `feed`, its secrets read and its TLS files loaded now: one that cannot be
    /// is a mistake of the config (`source`), located.
    pub fn new(feed: &FeedConfig, source: &ConfigSource) -> Result<FeedClient, ConfigError> {
        let access = Access::for_feed(feed, source)?;
        let tls = http::tls::for_feed(feed, source)?;
        // The user and password go in an Authorization header to the feed's origin, never in
        // a request line (a proxy's) or to another host.
        let mut feed_url = feed.url.0.clone();
        let _ = feed_url.set_username("");
        let _ = feed_url.set_password(None);
        let flux = Arc::new(Flux {
            feed_url: feed_url.clone(),
            access: Arc::new(access.clone()),
        });
        let settings = HttpSettings {
            connect_timeout: feed.connect_timeout.0,
            request_timeout: feed.request_timeout.0,
            max_response_bytes: feed.max_response_bytes.0,
            idle_connections: feed.body_concurrency.0 + 2,
        };
        #[cfg(feature = "http-ab")]
        if std::env::var("PROJECTOR_HTTP_CLIENT").as_deref() == Ok("reqwest") {
            let reqwest = http::reqwest_client::ReqwestClient::new(settings)
                .map_err(|err| ConfigError::new(source.locate(&feed.name), err))?;
            return Ok(FeedClient {
                name: feed.name().into(),
                http: Http::Reqwest(reqwest),
                feed_url,
                format: feed.format,
                flux,
                mapped: None,
            });
        }
        let http = Http::Hyper(HttpClient::new(settings, access.clone(), tls));
        Ok(FeedClient {
            name: feed.name().into(),
            http,
            feed_url,
            format: feed.format,
            flux,
            mapped: feed
                .mapping
                .clone()
                .map(|mapping| Arc::new(Mapped { mapping })),
        })
    }

    /// The proxy the feed's pages go through, for the log; `None` when they go directly.
    pub fn proxy(&self) -> Option<String> {
        #[allow(irrefutable_let_patterns)] // without the http-ab feature
        let Http::Hyper(http) = &self.http
        else {
            return None;
        };
        parse_uri(self.feed_url.as_str())
            .ok()
            .and_then(|uri| http.proxy_for(&uri))
    }

    /// Opens the live stream at `url` (`live = "sse"`).
    pub async fn open_live(
        &self,
        url: &url::Url,
        last_event_id: Option<&str>,
    ) -> Result<hyper::body::Incoming, FetchErrorKind> {
        let uri = parse_uri(url.as_str()).map_err(FetchErrorKind::Unreadable)?;
        match &self.http {
            Http::Hyper(http) => http.open_event_stream(&uri, last_event_id).await,
            #[cfg(feature = "http-ab")]
            Http::Reqwest(_) => Err(FetchErrorKind::Refused(
                "the reqwest client of the A/B has no live stream".into(),
            )),
        }
    }

    /// How the feed's pages follow one another.
    pub fn paging(&self) -> Paging {
        self.mapped
            .as_ref()
            .map_or(Paging::Offset, |mapped| mapped.mapping.paging)
    }

    /// The page of entries starting at `offset`; empty at the head of the feed.
    pub async fn fetch_page(&self, offset: u64) -> Result<Page, FetchError> {
        self.fetch_page_at(PageAt::Offset(offset), None).await
    }

    /// The page at `at`, which the feed may hold for up to `wait` until it has events there
    /// (`live = "long-poll"`, `wait=SECONDS`); empty at the head, if none came. A next link
    /// the page gives is resolved against the page's URL and checked as an entry's URL is.
    pub async fn fetch_page_at(
        &self,
        at: PageAt<'_>,
        wait: Option<Duration>,
    ) -> Result<Page, FetchError> {
        let counted = crate::metrics::metrics().request(&self.name, "page");
        let page = self.fetch_page_uncounted(at, wait).await;
        counted.ended(page.as_ref().err().map(|err| &err.kind));
        page
    }

    /// The URL of the page at `at`, or why there is none.
    fn page_url(&self, at: PageAt<'_>, wait: Option<Duration>) -> Result<Url, String> {
        let mapping = self.mapped.as_ref().map(|mapped| &mapped.mapping);
        let mut url = self.feed_url.clone();
        match (at, mapping) {
            (PageAt::Offset(offset), _) => {
                let param = mapping.map_or(OFFSET_PARAM, |m| m.offset_param.as_str());
                url.query_pairs_mut()
                    .append_pair(param, &offset.to_string());
            }
            (PageAt::Named(Some(place)), Some(mapping)) => match mapping.paging {
                Paging::Link => {
                    // A link kept in a checkpoint is checked again: the config may have changed.
                    url = Url::parse(&place.cursor).map_err(|err| {
                        format!("next link {:?} is not a URL: {err}", place.cursor)
                    })?;
                    let uri = parse_uri(url.as_str())?;
                    self.flux.access.check(None, &uri).map_err(|reason| {
                        format!(
                            "the next link {} is refused: {reason}",
                            crate::shown::url(&url)
                        )
                    })?;
                }
                Paging::Cursor => {
                    url.query_pairs_mut()
                        .append_pair(&mapping.cursor_param, &place.cursor);
                }
                Paging::Offset | Paging::None => {}
            },
            // The first page of a feed paged by links or cursors, or an export.
            (PageAt::Named(_), _) => {}
        }
        if let Some(mapping) = mapping {
            // A link is asked for as the page gave it; an export has no pages to size.
            let named_link = matches!(at, PageAt::Named(Some(_))) && mapping.paging == Paging::Link;
            if let (Some(size), false) = (mapping.page_size, named_link) {
                if mapping.paging != Paging::None {
                    url.query_pairs_mut()
                        .append_pair(&mapping.limit_param, &size.to_string());
                }
            }
        }
        if let Some(wait) = wait {
            url.query_pairs_mut()
                .append_pair("wait", &wait.as_secs().max(1).to_string());
        }
        Ok(url)
    }

    async fn fetch_page_uncounted(
        &self,
        at: PageAt<'_>,
        wait: Option<Duration>,
    ) -> Result<Page, FetchError> {
        let url = self.page_url(at, wait);
        let what = || match (at, &url) {
            (PageAt::Offset(offset), Ok(url)) => {
                format!("page at offset {offset} ({})", crate::shown::url(url))
            }
            (_, Ok(url)) => format!("page at {}", crate::shown::url(url)),
            (_, Err(_)) => "page".to_string(),
        };
        let failed = |kind: FetchErrorKind| kind.fetching(FetchTarget::Page, what());
        let uri = url
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|url| parse_uri(url.as_str()))
            .map_err(|reason| failed(FetchErrorKind::Unreadable(reason)))?;
        let bytes = match wait {
            Some(wait) => self.http.get_within(&uri, wait).await,
            None => self.http.get(&uri).await,
        }
        .map_err(failed)?;
        if let Some(mapped) = &self.mapped {
            let mut page = page::read_page(mapped.clone(), bytes, LAZY_PAGE_BYTES)
                .map_err(|unread| failed(FetchErrorKind::Unreadable(unread.reason)))?;
            if let (Some(next), Paging::Link, Ok(url)) = (&page.next, self.paging(), &url) {
                page.next = Some(self.next_link(url, next).map_err(|reason| {
                    failed(FetchErrorKind::Unreadable(format!(
                        "its next link {}: {reason}",
                        crate::shown::url_text(next)
                    )))
                })?);
            }
            return Ok(page);
        }
        let unread = match self.read_page(bytes, self.format) {
            Ok(page) => return Ok(page),
            Err(unread) => unread,
        };
        let other = match self.format {
            FeedFormat::Flux => FeedFormat::Inline,
            FeedFormat::Inline => FeedFormat::Flux,
        };
        // A page of the other format is a mistake in the config, and says so.
        let kind = match self.read_page(unread.bytes, other) {
            Ok(page) if !page.is_empty() => FetchErrorKind::OtherFormat {
                configured: self.format.name(),
                reads_as: other.name(),
            },
            _ => FetchErrorKind::Unreadable(unread.reason),
        };
        Err(failed(kind))
    }

    /// A page's next link, resolved against the page's URL, if the feed's access allows it.
    fn next_link(&self, page_url: &Url, next: &str) -> Result<String, String> {
        let resolved = page_url
            .join(next)
            .map_err(|err| format!("is not a URL: {err}"))?;
        let uri = parse_uri(resolved.as_str())?;
        self.flux
            .access
            .check(None, &uri)
            .map_err(|reason| format!("is refused: {reason}"))?;
        Ok(resolved.into())
    }

    fn read_page(&self, bytes: Vec<u8>, format: FeedFormat) -> Result<Page, Unread> {
        match format {
            FeedFormat::Flux => page::read_page(self.flux.clone(), bytes, LAZY_PAGE_BYTES),
            FeedFormat::Inline => page::read_page(Arc::new(Inline), bytes, LAZY_PAGE_BYTES),
        }
    }

    /// The payload of an entry whose body is `At(url)`, and the size of the body in bytes.
    pub async fn fetch_body(
        &self,
        entry: &PageEntry,
        url: &Uri,
    ) -> Result<(Payload, usize), FetchError> {
        let counted = crate::metrics::metrics().request(&self.name, "body");
        let body = self.fetch_body_uncounted(entry, url).await;
        counted.ended(body.as_ref().err().map(|err| &err.kind));
        body
    }

    async fn fetch_body_uncounted(
        &self,
        entry: &PageEntry,
        url: &Uri,
    ) -> Result<(Payload, usize), FetchError> {
        // Described only on failure: formatting it costs about as much as parsing the body.
        let what = || {
            format!(
                "body of {} {} ({})",
                crate::shown::shortened(&entry.meta.event_type, crate::shown::ID_SHOWN),
                crate::shown::shortened(&entry.meta.event_id, crate::shown::ID_SHOWN),
                crate::shown::url_text(&url.to_string())
            )
        };
        let bytes = self
            .http
            .get(url)
            .await
            .map_err(|kind| kind.fetching(FetchTarget::Body, what()))?;
        let size = bytes.len();
        Payload::from_json(bytes)
            .map(|payload| (payload, size))
            .map_err(|reason| {
                FetchErrorKind::Unreadable(reason).fetching(FetchTarget::Body, what())
            })
    }
}
