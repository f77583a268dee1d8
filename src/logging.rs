//! Logs on stderr, in the form whoever reads them wants: colours on a terminal; under systemd
//! (stderr is the journal stream) no colours, no timestamps (journald stamps each line) and a
//! `<N>` priority prefix so that `journalctl -p warning` works; one JSON object per line for log
//! shippers (`log_format = "json"`).

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// Installs the process's logger; `RUST_LOG` picks the level (`default_level` without it).
/// Only the first call in a process installs one; later calls change nothing.
pub fn init(default_level: &str, format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => logs.json().with_current_span(false).try_init(),
        LogFormat::Text if stderr_is_journal() => {
            let plain = tracing_subscriber::fmt::format()
                .without_time()
                .with_ansi(false);
            logs.with_ansi(false)
                .event_format(JournalPriority(plain))
                .try_init()
        }
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).try_init(),
    };
}

/// Whether stderr is the journal stream systemd connected: it names the stream's device and
/// inode in `JOURNAL_STREAM` ("dev:inode"), and a redirected stderr no longer matches it.
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some(stderr) = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .ok()
        .and_then(|fd| std::fs::File::from(fd).metadata().ok())
    else {
        return false;
    };
    stream == format!("{}:{}", stderr.dev(), stderr.ino())
}

/// Prefixes each line with its syslog priority, which journald reads from a service's stderr
/// (`SyslogLevelPrefix=`, on by default) and strips.
struct JournalPriority<F>(F);

impl<S, N, F> FormatEvent<S, N> for JournalPriority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", syslog_priority(*event.metadata().level()))?;
        self.0.format_event(context, writer, event)
    }
}

fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}
