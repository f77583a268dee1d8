//! The configuration's value types: each one parses and checks itself as serde reads it, so a
//! bad value is refused with a message at its own line and column.

use std::time::Duration;

use serde::{Deserialize, Deserializer};
use url::Url;

/// Permission bits for the control socket, written as an octal string ("0600"). The owner must
/// be able to read and write it; execute bits mean nothing on a socket and are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(pub u32);

impl Default for SocketMode {
    fn default() -> Self {
        SocketMode(0o600)
    }
}

impl<'de> Deserialize<'de> for SocketMode {
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
        Ok(SocketMode(mode))
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
        let url = Url::parse(&text)
            .map_err(|err| serde::de::Error::custom(format!("invalid URL {text:?}: {err}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(serde::de::Error::custom(format!(
                "URL {text:?} must start with http:// or https://"
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(serde::de::Error::custom(format!(
                "URL {text:?} has no host"
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
