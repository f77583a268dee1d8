//! Text shown to people (logs, `ctl status`, `query`'s table, error messages) comes from places
//! that are not to be trusted or not to be repeated: a feed's event ids and answers, and URLs
//! with credentials in them. Before it is shown, a URL loses its secrets, control characters are
//! escaped (a feed must not be able to clear an operator's screen or forge a journal entry), and
//! text of megabytes is shortened. JSON output is exact: JSON escapes by itself.

use std::borrow::Cow;
use std::fmt::Write as _;

use url::Url;

/// What a secret is replaced with.
const HIDDEN: &str = "REDACTED";

/// Query parameters whose values are secrets, by a part of their name (case does not matter).
const SECRET_NAMES: &[&str] = &[
    "token",
    "key",
    "secret",
    "password",
    "passwd",
    "signature",
    "sig",
    "auth",
    "credential",
];

/// `url` as it may be shown: without its user and password, and with the values of query
/// parameters named like secrets (token, key, secret, password, signature, auth) replaced.
pub fn url(url: &Url) -> String {
    let mut shown = url.clone();
    if !shown.username().is_empty() || shown.password().is_some() {
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
    }
    if shown.query().is_some() {
        let pairs: Vec<(String, String)> = shown
            .query_pairs()
            .map(|(name, value)| {
                let value = if is_secret_name(&name) {
                    HIDDEN.to_string()
                } else {
                    value.into_owned()
                };
                (name.into_owned(), value)
            })
            .collect();
        shown.query_pairs_mut().clear().extend_pairs(pairs);
    }
    shown.to_string()
}

/// A URL written as text (a config's value, a redirect's Location): shown as `url` shows it if it
/// parses, else with anything between `//` and `@` taken out.
pub fn url_text(text: &str) -> String {
    if let Ok(parsed) = Url::parse(text) {
        return url(&parsed);
    }
    match (text.find("//"), text.rfind('@')) {
        (Some(start), Some(at)) if at > start => {
            format!("{}{HIDDEN}@{}", &text[..start + 2], &text[at + 1..])
        }
        _ => text.to_string(),
    }
}

fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_NAMES.iter().any(|secret| name.contains(secret))
}

/// `text` with its control characters written as escapes (`\n`, `\u{1b}`), and the Unicode
/// characters that reorder or break lines: what a terminal or a log line may safely show.
pub fn escaped(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` cut to about `max` bytes, saying how much was left out.
pub fn shortened(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!(
        "{}… ({} more bytes)",
        &text[..end],
        text.len() - end
    ))
}

/// The longest event id shown.
pub const ID_SHOWN: usize = 200;
/// The longest error message shown.
pub const ERROR_SHOWN: usize = 2000;

/// An event id as it may be shown: shortened, with its control characters escaped.
pub fn id(id: &str) -> String {
    escaped(&shortened(id, ID_SHOWN)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials_and_secret_query_values() {
        let shown = |text: &str| url(&Url::parse(text).unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(
            shown("https://reader:hunter2@feed.example/events?offset=4&access_token=abc&Api-Key=k&page=2"),
            "https://feed.example/events?offset=4&access_token=REDACTED&Api-Key=REDACTED&page=2"
        );
        assert_eq!(
            shown("http://feed.example/events?X-Amz-Signature=s3cr3t&authority=x"),
            "http://feed.example/events?X-Amz-Signature=REDACTED&authority=REDACTED"
        );
        assert_eq!(
            shown("http://feed.example/events"),
            "http://feed.example/events"
        );
        assert_eq!(
            url_text("http://u:p@[::1/events"),
            "http://REDACTED@[::1/events"
        );
        assert_eq!(url_text("not a url"), "not a url");
    }

    #[test]
    fn control_characters_are_escaped_and_long_text_shortened() {
        assert_eq!(escaped("plain é"), "plain é");
        assert_eq!(
            escaped("a\u{1b}[2J\nb\r\u{7}\u{202e}c"),
            "a\\u{1b}[2J\\nb\\r\\u{7}\\u{202e}c"
        );
        assert_eq!(shortened("abcdef", 10), "abcdef");
        assert_eq!(shortened("abcdef", 3), "abc… (3 more bytes)");
        assert_eq!(shortened("ééé", 3), "é… (4 more bytes)");
        assert_eq!(
            id(&"x".repeat(10_000)).len(),
            ID_SHOWN + "… (9800 more bytes)".len()
        );
    }
}
