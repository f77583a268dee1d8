//! Logs on stderr, in the form whoever reads them wants: colours on a terminal; under systemd
//! (stderr is the journal stream) no colours, no timestamps (journald stamps each line) and a
//! `<N>` priority prefix so that `journalctl -p warning` works; one JSON object per line for log
//! shippers (`log_format = "json"`).
//!
//! Lines reach stderr through a queue ([`StderrQueue`]): a log pipe that closes or fills up
//! costs log lines, never the daemon's reading, committing or stopping.

mod stderr_queue;

use std::fmt;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;
use stderr_queue::StderrQueue;

/// How long an exit waits for the queued log lines to reach stderr.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// The process's log queue, once `init` has installed it.
static QUEUE: OnceLock<StderrQueue> = OnceLock::new();

/// Installs the process's logger; `RUST_LOG` picks the level (`default_level` without it).
/// Only the first call in a process installs one; later calls change nothing.
pub fn init(default_level: &str, format: LogFormat) {
    use std::io::IsTerminal;
    let journal = format == LogFormat::Text && stderr_is_journal();
    let notice = match (format, journal) {
        (LogFormat::Json, _) => json_notice,
        (LogFormat::Text, true) => journal_notice,
        (LogFormat::Text, false) => text_notice,
    };
    let Ok(queue) = StderrQueue::start(std::io::stderr(), notice) else {
        // Without a thread for it there is nowhere safe to log to.
        return;
    };
    if QUEUE.set(queue.clone()).is_err() {
        return;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(queue)
        .log_internal_errors(false)
        .fmt_fields(EscapedFields::default());
    let _ = match format {
        LogFormat::Json => logs.json().with_current_span(false).try_init(),
        LogFormat::Text if journal => {
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

/// Waits (briefly) until the lines logged so far have reached stderr: before the process exits.
pub fn flush() {
    if let Some(queue) = QUEUE.get() {
        queue.flush(FLUSH_TIMEOUT);
    }
}

/// Log lines lost since start because stderr was closed or full.
pub fn lines_dropped() -> u64 {
    QUEUE.get().map_or(0, StderrQueue::lines_dropped)
}

fn dropped_message(lost: u64) -> String {
    format!("{lost} log lines were dropped: stderr could not be written (closed, or full with nobody reading it)")
}

fn text_notice(lost: u64) -> String {
    let now = humantime::format_rfc3339_micros(SystemTime::now());
    format!(
        "{now}  WARN projector::logging: {}\n",
        dropped_message(lost)
    )
}

fn journal_notice(lost: u64) -> String {
    format!(
        "<{}> WARN projector::logging: {}\n",
        syslog_priority(Level::WARN),
        dropped_message(lost)
    )
}

fn json_notice(lost: u64) -> String {
    let line = serde_json::json!({
        "timestamp": humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
        "level": "WARN",
        "fields": {"message": dropped_message(lost), "lines_dropped": lost},
        "target": "projector::logging",
    });
    format!("{line}\n")
}

/// The default field formatting with control characters escaped: an event id or an answer of
/// the feed with a newline or an escape sequence in it can neither forge a log line (or a
/// journal entry) nor reach the terminal raw. The JSON format escapes by itself.
#[derive(Default)]
struct EscapedFields(tracing_subscriber::fmt::format::DefaultFields);

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: Writer<'w>,
        fields: R,
    ) -> fmt::Result {
        let mut plain = String::new();
        self.0.format_fields(Writer::new(&mut plain), fields)?;
        writer.write_str(&crate::shown::escaped(&plain))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dropped_lines_notice_is_a_line_of_the_logs_own_format() {
        let json: serde_json::Value =
            serde_json::from_str(json_notice(3).trim_end()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(json["level"], "WARN");
        assert_eq!(json["fields"]["lines_dropped"], 3);
        assert!(journal_notice(3).starts_with("<4> WARN "));
        assert!(text_notice(3).contains("  WARN projector::logging: 3 log lines were dropped"));
        for notice in [json_notice(3), journal_notice(3), text_notice(3)] {
            assert_eq!(notice.matches('\n').count(), 1, "{notice}");
            assert!(notice.ends_with('\n'));
        }
    }
}
