//! Who a feed client talks to, and with what: the feed's origin (scheme, host and port), the
//! origins its Flux entry URLs and redirects may lead to (`body_origin`), and the credentials
//! (`headers`, or a user and password in the feed URL) that are sent to the feed's origin and
//! nowhere else. A feed is not trusted: an entry URL pointing at another service of the network,
//! or a redirect from https to http, is refused, and credentials never follow it.

use base64::Engine as _;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};
use hyper::Uri;
use url::Url;

use crate::config::{BodyOrigin, ConfigError, ConfigSource, FeedConfig, SecretSource};

/// A scheme, host and port: what a URL's origin is, to compare one with another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    pub fn of_url(url: &Url) -> Option<Origin> {
        Some(Origin {
            scheme: url.scheme().to_ascii_lowercase(),
            host: url.host_str()?.to_ascii_lowercase(),
            port: url.port_or_known_default()?,
        })
    }

    pub fn of_uri(uri: &Uri) -> Option<Origin> {
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let port = uri.port_u16().or(match scheme.as_str() {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        })?;
        Some(Origin {
            host: uri.host()?.to_ascii_lowercase(),
            scheme,
            port,
        })
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

/// Where a client may go and what it sends where.
#[derive(Debug, Clone)]
pub struct Access {
    /// The feed's origin; `None` when any origin is the feed's (tools, benchmarks).
    feed: Option<Origin>,
    allowed: Allowed,
    /// Sent to the feed's origin only.
    credentials: HeaderMap,
}

#[derive(Debug, Clone)]
enum Allowed {
    Same,
    Any,
    Listed(Vec<Origin>),
}

impl Access {
    /// Any origin, no credentials: for tools that read a feed without a config.
    pub fn anywhere() -> Access {
        Access {
            feed: None,
            allowed: Allowed::Any,
            credentials: HeaderMap::new(),
        }
    }

    /// The access `feed` configures, its secrets read now (from the environment, files or
    /// systemd credentials). A secret that cannot be read is a mistake of the config, located at
    /// its value; the error never holds the secret.
    pub fn for_feed(feed: &FeedConfig, source: &ConfigSource) -> Result<Access, ConfigError> {
        let url = &feed.url.0;
        let mut credentials = HeaderMap::new();
        for (name, value) in &feed.headers {
            let located = |message: String| ConfigError::new(source.locate(value), message);
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| located(format!("{name:?} is not an HTTP header name")))?;
            let text = SecretSource::read(value.get_ref())
                .map_err(|reason| located(format!("header {name}: {reason}")))?;
            let mut header_value = HeaderValue::from_str(&text).map_err(|_| {
                located(format!(
                    "header {name}: the value has characters a header cannot carry (a line break?)"
                ))
            })?;
            header_value.set_sensitive(true);
            credentials.insert(header, header_value);
        }
        if !url.username().is_empty() || url.password().is_some() {
            if credentials.contains_key(AUTHORIZATION) {
                return Err(ConfigError::new(
                    source.locate(&feed.name),
                    format!(
                        "feed {:?} has a user in its URL and an Authorization header: keep one",
                        feed.name()
                    ),
                ));
            }
            credentials.insert(AUTHORIZATION, basic_authorization(url));
        }
        let allowed = match &feed.body_origin {
            BodyOrigin::Same => Allowed::Same,
            BodyOrigin::Any => Allowed::Any,
            BodyOrigin::Listed(urls) => {
                Allowed::Listed(urls.iter().filter_map(Origin::of_url).collect())
            }
        };
        Ok(Access {
            feed: Origin::of_url(url),
            allowed,
            credentials,
        })
    }

    /// The headers a request to `uri` carries: the credentials, if `uri` is on the feed's origin.
    pub fn credentials_for(&self, uri: &Uri) -> Option<&HeaderMap> {
        let feed = self.feed.as_ref()?;
        (!self.credentials.is_empty() && Origin::of_uri(uri).as_ref() == Some(feed))
            .then_some(&self.credentials)
    }

    /// Whether a request may go to `to`, which the feed named (an entry URL, or a redirect from
    /// `from`): on an allowed origin, without credentials of its own, never from https to http.
    pub fn check(&self, from: Option<&Uri>, to: &Uri) -> Result<(), String> {
        let shown = || crate::shown::url_text(&to.to_string());
        if to.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(format!("{} carries credentials of its own", shown()));
        }
        let Some(target) = Origin::of_uri(to) else {
            return Err(format!("{} has no origin", shown()));
        };
        let from_https = match from {
            Some(from) => from.scheme_str() == Some("https"),
            None => self.feed.as_ref().is_some_and(|o| o.scheme == "https"),
        };
        if from_https && target.scheme != "https" {
            return Err(format!("{} would leave https for http", shown()));
        }
        let Some(feed) = &self.feed else {
            return Ok(());
        };
        let allowed = match &self.allowed {
            Allowed::Any => true,
            Allowed::Same => target == *feed,
            Allowed::Listed(origins) => target == *feed || origins.contains(&target),
        };
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "{} is not on the feed's origin {feed} (body_origin allows other origins)",
                shown()
            ))
        }
    }
}

/// `Authorization: Basic` for the user and password of `url`, percent-decoded.
fn basic_authorization(url: &Url) -> HeaderValue {
    let decode = |text: &str| {
        percent_encoding::percent_decode_str(text)
            .decode_utf8_lossy()
            .into_owned()
    };
    let user = decode(url.username());
    let password = url.password().map(decode).unwrap_or_default();
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    // Base64 is always a valid header value.
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Basic"));
    value.set_sensitive(true);
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn feed(extra: &str, url: &str) -> Result<(Config, Access), ConfigError> {
        let text = format!(
            "[daemon]\ndatabase = \"p.db\"\ncontrol_socket = \"p.sock\"\n[[feed]]\nname = \"bank\"\nurl = \"{url}\"\nformat = \"flux\"\n{extra}\n[[projection]]\nname = \"x\"\nfeed = \"bank\"\nmodule = \"account_ledger\"\n"
        );
        let config = Config::parse(Path::new("/etc/projector/consumer.toml"), text)?;
        let access = Access::for_feed(&config.feeds[0], &config.source)?;
        Ok((config, access))
    }

    fn uri(text: &str) -> Uri {
        text.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn credentials_go_to_the_feeds_origin_only() -> Result<(), ConfigError> {
        let (_, access) = feed(
            "headers = { Authorization = \"Bearer t0k3n\", X-Tenant = \"acme\" }",
            "https://feed.example/events",
        )?;
        let sent = access.credentials_for(&uri("https://feed.example:443/events/e1"));
        let sent = sent.map(|h| h.get(AUTHORIZATION).map(|v| v.as_bytes().to_vec()));
        assert_eq!(sent, Some(Some(b"Bearer t0k3n".to_vec())));
        for elsewhere in [
            "https://other.example/events/e1",
            "http://feed.example/events/e1",
            "https://feed.example:8443/events/e1",
        ] {
            assert!(
                access.credentials_for(&uri(elsewhere)).is_none(),
                "{elsewhere}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_user_in_the_url_is_basic_authorization() -> Result<(), ConfigError> {
        let (_, access) = feed("", "http://reader:p%40ss@127.0.0.1:3000/events")?;
        let sent = access
            .credentials_for(&uri("http://127.0.0.1:3000/events?offset=0"))
            .and_then(|h| h.get(AUTHORIZATION))
            .map(|v| v.as_bytes().to_vec());
        // base64("reader:p@ss")
        assert_eq!(sent, Some(b"Basic cmVhZGVyOnBAc3M=".to_vec()));
        let both = feed(
            "headers = { Authorization = \"Bearer x\" }",
            "http://u:p@127.0.0.1/e",
        );
        assert!(both.is_err_and(|e| e.to_string().contains("keep one")));
        Ok(())
    }

    #[test]
    fn secrets_are_read_from_the_environment_files_and_credentials_and_never_shown(
    ) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("token"), "from-a-file\n")?;
        let path = dir.path().join("token");
        let (config, access) = feed(
            &format!("headers = {{ Authorization = {{ file = {path:?} }} }}"),
            "http://127.0.0.1/events",
        )?;
        let sent = access.credentials_for(&uri("http://127.0.0.1/events"));
        assert_eq!(
            sent.and_then(|h| h.get(AUTHORIZATION))
                .map(|v| v.as_bytes()),
            Some(&b"from-a-file"[..])
        );
        let (config_with_text, _) = feed(
            "headers = { Authorization = \"Bearer v3ry-s3cr3t\" }",
            "http://127.0.0.1/events",
        )?;
        assert!(!format!("{config_with_text:?}").contains("v3ry-s3cr3t"));
        assert!(!format!("{access:?}").contains("from-a-file"));
        drop(config);
        let missing = feed(
            "headers = { Authorization = { env = \"PROJECTOR_TEST_NOT_SET\" } }",
            "http://127.0.0.1/events",
        );
        assert!(missing.is_err_and(|e| e.to_string().contains("PROJECTOR_TEST_NOT_SET is not set")));
        let credential = feed(
            "headers = { Authorization = { credential = \"feed-token\" } }",
            "http://127.0.0.1/events",
        );
        assert!(credential.is_err_and(|e| e.to_string().contains("CREDENTIALS_DIRECTORY")));
        Ok(())
    }

    #[test]
    fn entry_urls_and_redirects_stay_on_allowed_origins_and_on_https() -> Result<(), ConfigError> {
        let (_, same) = feed("", "https://feed.example/events")?;
        assert!(same
            .check(None, &uri("https://feed.example/events/e1"))
            .is_ok());
        for refused in [
            "https://10.0.0.7:8080/admin",
            "http://feed.example/events/e1",
            "https://user:pw@feed.example/events/e1",
        ] {
            assert!(same.check(None, &uri(refused)).is_err(), "{refused}");
        }
        let (_, listed) = feed(
            "body_origin = [\"https://cdn.example\"]",
            "https://feed.example/events",
        )?;
        assert!(listed.check(None, &uri("https://cdn.example/b/1")).is_ok());
        assert!(listed
            .check(None, &uri("https://cdn.example:8443/b/1"))
            .is_err());
        let (_, any) = feed("body_origin = \"any\"", "https://feed.example/events")?;
        assert!(any.check(None, &uri("https://anywhere.example/x")).is_ok());
        let err = any
            .check(
                Some(&uri("https://feed.example/e")),
                &uri("http://anywhere.example/x"),
            )
            .err()
            .unwrap_or_default();
        assert!(err.contains("would leave https for http"), "{err}");
        Ok(())
    }
}
