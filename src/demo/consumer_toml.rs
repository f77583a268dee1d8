//! The `consumer.toml` that reads the embedded bank feed: `projector demo` writes one, and so do
//! the tests and the benchmark, each with its own settings on top.
//!
//! The layout is fixed (a `[daemon]` table, one `[[feed]]` named `bank`, the projections), so that
//! tests can name the line and column of a key they break.

use std::fmt::Write as _;
use std::path::Path;

use crate::config::FeedFormat;

/// The two shipped projections on feed `bank`, `account_balances` read from a file of that name
/// beside the config.
pub const BOTH_PROJECTIONS: &str = r#"
[[projection]]
name = "account_balances"
feed = "bank"
file = "account_balances.toml"

[[projection]]
name = "account_ledger"
feed = "bank"
module = "account_ledger"
"#;

/// A config for feed `bank`; fields are public so each caller sets what it needs.
#[derive(Debug, Clone)]
pub struct ConsumerToml {
    /// A comment at the top, without its `#`s; one line of it a line of the file.
    pub comment: Option<String>,
    pub feed_url: String,
    pub format: FeedFormat,
    pub poll_interval: String,
    /// `retry_initial` and `retry_max`, when not the defaults.
    pub retry: Option<(String, String)>,
    /// `[daemon] database`: a file beside the config, or a PostgreSQL URL.
    pub database: String,
    /// Extra `[daemon]` lines, as written.
    pub daemon_keys: String,
    /// Extra `[[feed]]` lines, as written.
    pub feed_keys: String,
    /// The `[[projection]]` tables, as written.
    pub projections: String,
}

impl ConsumerToml {
    /// Feed `bank` at `feed_url`, polled every 100 ms, retried from 10 ms to 1 s, with both
    /// shipped projections.
    pub fn new(feed_url: &str, format: FeedFormat) -> ConsumerToml {
        ConsumerToml {
            comment: None,
            feed_url: feed_url.to_string(),
            format,
            poll_interval: "100ms".into(),
            retry: Some(("10ms".into(), "1s".into())),
            database: "projector.db".into(),
            daemon_keys: String::new(),
            feed_keys: String::new(),
            projections: BOTH_PROJECTIONS.into(),
        }
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        for line in self.comment.iter().flat_map(|comment| comment.lines()) {
            let _ = writeln!(text, "# {line}");
        }
        let _ = write!(
            text,
            "[daemon]\ndatabase = \"{}\"\ncontrol_socket = \"projector.sock\"\n{}",
            self.database,
            lines(&self.daemon_keys)
        );
        let _ = write!(
            text,
            "\n[[feed]]\nname = \"bank\"\nurl = \"{}\"\nformat = \"{}\"\npoll_interval = \"{}\"\n",
            self.feed_url,
            self.format.name(),
            self.poll_interval
        );
        if let Some((initial, max)) = &self.retry {
            let _ = write!(
                text,
                "retry_initial = \"{initial}\"\nretry_max = \"{max}\"\n"
            );
        }
        let _ = write!(text, "{}{}", lines(&self.feed_keys), self.projections);
        text
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.render())
    }
}

/// `keys` as whole lines: a newline added unless empty or already there.
fn lines(keys: &str) -> String {
    match keys {
        "" => String::new(),
        keys if keys.ends_with('\n') => keys.to_string(),
        keys => format!("{keys}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn what_it_writes_is_a_valid_config() -> anyhow::Result<()> {
        let mut toml = ConsumerToml::new("http://127.0.0.1:3000/events", FeedFormat::Inline);
        toml.comment = Some("a comment".into());
        toml.daemon_keys = "synchronous = \"full\"".into();
        toml.feed_keys = "body_concurrency = 4\n".into();
        let text = toml.render();
        assert!(text.starts_with("# a comment\n[daemon]\n"), "{text}");
        let config = Config::parse(Path::new("/tmp/consumer.toml"), text)?;
        assert_eq!(config.feeds[0].format, FeedFormat::Inline);
        assert_eq!(config.feeds[0].body_concurrency.0, 4);
        assert_eq!(config.projections.len(), 2);
        Ok(())
    }
}
