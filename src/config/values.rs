//! The configuration's value types: each one parses and checks itself as serde reads it, so a
//! bad value is refused with a message at its own line and column.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use url::Url;

/// Permission bits of a file the daemon makes (the control socket, the database), written as an
/// octal string ("0600"). The owner must be able to read and write it; execute bits are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMode(pub u32);

impl Default for FileMode {
    fn default() -> Self {
        FileMode(0o600)
    }
}

impl<'de> Deserialize<'de> for FileMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        /// The mode as written: octal text, or a number (which TOML reads as decimal).
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Text(String),
            Number(i64),
        }
        let text = match Written::deserialize(deserializer)? {
            Written::Text(text) => text,
            Written::Number(number) => {
                return Err(serde::de::Error::custom(format!(
                    "write the socket mode as a string, like control_socket_mode = \"0{number}\": a bare number is read as decimal, not octal"
                )))
            }
        };
        let mode = u32::from_str_radix(text.trim_start_matches("0o"), 8).map_err(|_| {
            serde::de::Error::custom(format!(
                "socket mode {text:?} is not an octal number like \"0600\" or \"0660\""
            ))
        })?;
        if mode > 0o777 || mode & 0o111 != 0 || mode & 0o600 != 0o600 {
            return Err(serde::de::Error::custom(format!(
                "socket mode {text:?} must give its owner read and write (0600) and no execute bits, like \"0600\" or \"0660\""
            )));
        }
        Ok(FileMode(mode))
    }
}

/// A feed or projection name: non-empty, letters, digits, `_`, `-` and `.` only, so it is safe in
/// logs, file names and control commands.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Name(pub String);

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        if name.is_empty() {
            return Err(serde::de::Error::custom("a name must not be empty"));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(serde::de::Error::custom(format!(
                "name {name:?} has the character {bad:?}; use letters, digits, '_', '-' and '.'"
            )));
        }
        Ok(Name(name))
    }
}

/// An absolute http(s) URL with a host.
#[derive(Debug, Clone)]
pub struct FeedUrl(pub Url);

impl<'de> Deserialize<'de> for FeedUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let shown = crate::shown::url_text(&text);
        let url = Url::parse(&text)
            .map_err(|err| serde::de::Error::custom(format!("invalid URL {shown:?}: {err}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(serde::de::Error::custom(format!(
                "URL {shown:?} must start with http:// or https://"
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(serde::de::Error::custom(format!(
                "URL {shown:?} has no host"
            )));
        }
        Ok(FeedUrl(url))
    }
}

/// A positive duration written the humantime way: `"500ms"`, `"5s"`, `"2m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval(pub Duration);

impl<'de> Deserialize<'de> for Interval {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let duration = humantime::parse_duration(&text).map_err(|err| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?}: {err} (write it like \"500ms\", \"5s\" or \"1m\")"
            ))
        })?;
        if duration.is_zero() {
            return Err(serde::de::Error::custom(format!(
                "duration {text:?} must be more than zero"
            )));
        }
        Ok(Interval(duration))
    }
}

/// How many requests may run at once: 1 to 256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concurrency(pub usize);

impl<'de> Deserialize<'de> for Concurrency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = i64::deserialize(deserializer)?;
        match usize::try_from(value) {
            Ok(n @ 1..=256) => Ok(Concurrency(n)),
            _ => Err(serde::de::Error::custom(format!(
                "concurrency {value} must be between 1 and 256"
            ))),
        }
    }
}

/// A size in bytes, at least 1 KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteLimit(pub usize);

impl<'de> Deserialize<'de> for ByteLimit {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = i64::deserialize(deserializer)?;
        match usize::try_from(value) {
            Ok(n) if n >= 1024 => Ok(ByteLimit(n)),
            _ => Err(serde::de::Error::custom(format!(
                "byte limit {value} must be at least 1024"
            ))),
        }
    }
}

/// A value that may be a secret: written in the config, or read at start from elsewhere so that
/// the secret stays out of `consumer.toml`: `"text"`, `{ env = "VARIABLE" }`, `{ file = "path" }`
/// (relative to the config's folder; a trailing newline is dropped) or `{ credential = "name" }`
/// (a file of systemd's `$CREDENTIALS_DIRECTORY`, from `LoadCredential=` in the unit). Its
/// `Debug` never shows the text.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    Text(String),
    Env(String),
    File(PathBuf),
    Credential(String),
}

impl SecretSource {
    /// Reads the secret from where the config says it is.
    pub fn read(&self) -> Result<String, String> {
        let read_file = |path: &Path| {
            std::fs::read_to_string(path)
                .map(|text| text.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|err| format!("cannot read {}: {err}", path.display()))
        };
        match self {
            SecretSource::Text(text) => Ok(text.clone()),
            SecretSource::Env(name) => std::env::var(name)
                .map_err(|_| format!("the environment variable {name} is not set")),
            SecretSource::File(path) => read_file(path),
            SecretSource::Credential(name) => {
                let Some(folder) = std::env::var_os("CREDENTIALS_DIRECTORY") else {
                    return Err(format!(
                        "the credential {name:?} needs systemd's $CREDENTIALS_DIRECTORY (LoadCredential={name}:... in the unit)"
                    ));
                };
                read_file(&Path::new(&folder).join(name))
            }
        }
    }
}

impl std::fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::Text(_) => f.write_str("Text(REDACTED)"),
            SecretSource::Env(name) => write!(f, "Env({name:?})"),
            SecretSource::File(path) => write!(f, "File({path:?})"),
            SecretSource::Credential(name) => write!(f, "Credential({name:?})"),
        }
    }
}

impl<'de> Deserialize<'de> for SecretSource {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Text(String),
            From(BTreeMap<String, String>),
        }
        let from = match Written::deserialize(deserializer) {
            Ok(Written::Text(text)) => return Ok(SecretSource::Text(text)),
            Ok(Written::From(from)) => from,
            Err(_) => {
                return Err(serde::de::Error::custom(
                    "write a value as a string, or as { env = \"VARIABLE\" }, { file = \"path\" } or { credential = \"name\" }",
                ))
            }
        };
        let mut entries = from.into_iter();
        match (entries.next(), entries.next()) {
            (Some((kind, name)), None) => match kind.as_str() {
                "env" => Ok(SecretSource::Env(name)),
                "file" => Ok(SecretSource::File(PathBuf::from(name))),
                "credential" => Ok(SecretSource::Credential(name)),
                other => Err(serde::de::Error::custom(format!(
                    "{other:?} is not a place to read a value from: write env, file or credential"
                ))),
            },
            _ => Err(serde::de::Error::custom(
                "read a value from one place: { env = \"VARIABLE\" }, { file = \"path\" } or { credential = \"name\" }",
            )),
        }
    }
}

/// Where a feed's bodies (Flux entry URLs) and redirects may lead: the feed's own origin (its
/// scheme, host and port), any origin, or the feed's and the origins listed. Never from https
/// to http, whatever this says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum BodyOrigin {
    #[default]
    Same,
    Any,
    /// The feed's own origin and these, each `scheme://host[:port]`.
    Listed(Vec<Url>),
}

impl<'de> Deserialize<'de> for BodyOrigin {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Word(String),
            List(Vec<String>),
        }
        let written = Written::deserialize(deserializer).map_err(|_| {
            serde::de::Error::custom(
                "write body_origin as \"same\", \"any\" or a list of origins like [\"https://cdn.example.com\"]",
            )
        })?;
        match written {
            Written::Word(word) if word == "same" => Ok(BodyOrigin::Same),
            Written::Word(word) if word == "any" => Ok(BodyOrigin::Any),
            Written::Word(word) => Err(serde::de::Error::custom(format!(
                "body_origin {word:?} is not \"same\" or \"any\"; list other origins as [\"https://cdn.example.com\"]"
            ))),
            Written::List(origins) => origins
                .iter()
                .map(|text| {
                    let url = Url::parse(text).ok().filter(|url| {
                        matches!(url.scheme(), "http" | "https")
                            && url.host_str().is_some()
                            && matches!(url.path(), "" | "/")
                            && url.query().is_none()
                            && url.username().is_empty()
                    });
                    url.ok_or_else(|| {
                        serde::de::Error::custom(format!(
                            "{text:?} is not an origin: write scheme, host and port only, like \"https://cdn.example.com:8443\""
                        ))
                    })
                })
                .collect::<Result<_, _>>()
                .map(BodyOrigin::Listed),
        }
    }
}
