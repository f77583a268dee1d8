//! `projector rebuild NAME [--cancel]`: through the running daemon's control socket when one
//! answers, else on its own until the rebuild has replaced the live tables, with its progress
//! as a live line on a terminal and as plain lines otherwise.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use super::exit::Exit;
use crate::config::Config;
use crate::control::protocol::{eta_text, FeedStatus, Request};
use crate::daemon::RebuildEnd;
use crate::shown::escaped;

/// How often plain (not terminal) output says how far the rebuild is.
const PLAIN_LINE_EVERY: Duration = Duration::from_secs(5);

pub fn rebuild(config_path: &Path, name: &str, cancel: bool) -> anyhow::Result<Exit> {
    let config = Config::load(config_path)?;
    let projections = crate::projection::build_all(&config)?;
    let request = Request::Rebuild {
        projection: name.to_string(),
        cancel,
    };
    if cancel {
        let Some(projection) = projections.iter().find(|p| p.name == name) else {
            anyhow::bail!("no projection named {name:?} in {}", config_path.display());
        };
        return super::repair::through_daemon_or_alone(&config, name, request, |database| {
            crate::daemon::cancel_rebuild(database, projection)
        });
    }
    if let Some(exit) = super::repair::ask_running_daemon(&config, &request)? {
        return Ok(exit);
    }
    crate::logging::init("warn", config.daemon.log_format);
    let mut progress = Progress::new(name);
    let ended = super::daemon_runtime()?.block_on(crate::daemon::rebuild_alone(
        config,
        projections,
        name,
        |status| progress.show(status),
    ));
    progress.finish_line();
    crate::logging::flush();
    match ended? {
        RebuildEnd::Done => {
            say!("{name} rebuilt: the new tables replaced the old ones");
            Ok(Exit::Success)
        }
        RebuildEnd::Interrupted => {
            say!("interrupted: the rebuild of {name} goes on from where it is at the next start (of the daemon, or of `projector rebuild {name}`)");
            Ok(Exit::Failure)
        }
        RebuildEnd::Halted(reason) => {
            complain!(
                "projector: the rebuild of {name} halted: {}; fix the cause, then run `projector rebuild {name}` again (it goes on from where it halted)",
                escaped(&reason)
            );
            Ok(Exit::Failure)
        }
    }
}

/// The rebuild's progress: a line rewritten in place on a terminal, a line every few seconds
/// otherwise.
struct Progress {
    name: String,
    terminal: bool,
    started: Instant,
    last_line: Option<Instant>,
    /// Where the rebuild was when the rate was last measured.
    sample: Option<(Instant, u64)>,
    rate: f64,
}

impl Progress {
    fn new(name: &str) -> Progress {
        Progress {
            name: name.to_string(),
            terminal: std::io::stdout().is_terminal(),
            started: Instant::now(),
            last_line: None,
            sample: None,
            rate: 0.0,
        }
    }

    fn show(&mut self, status: &FeedStatus) {
        let Some(rebuild) = status
            .projections
            .iter()
            .find(|p| p.name == self.name)
            .and_then(|p| p.rebuild.as_ref())
        else {
            return;
        };
        let now = Instant::now();
        if let Some((at, offset)) = self.sample {
            let seconds = now.duration_since(at).as_secs_f64();
            if seconds > 0.0 {
                let rate = rebuild.checkpoint.saturating_sub(offset) as f64 / seconds;
                // Smoothed, so the time left does not jump with every batch.
                self.rate = if self.rate == 0.0 {
                    rate
                } else {
                    0.7 * self.rate + 0.3 * rate
                };
            }
        }
        self.sample = Some((now, rebuild.checkpoint));
        let line = match (status.head, rebuild.lag) {
            (Some(head), Some(lag)) if head > 0 => {
                let done = rebuild.checkpoint.min(head) as f64 / head as f64;
                let filled = (done * 30.0).round() as usize;
                let eta = if self.rate >= 1.0 {
                    format!(
                        ", about {} left",
                        eta_text((lag as f64 / self.rate).ceil() as u64)
                    )
                } else {
                    String::new()
                };
                format!(
                    "[{}{}] {:>3.0}%  offset {} of {}, {:.0} events/s{eta}",
                    "#".repeat(filled),
                    "-".repeat(30 - filled.min(30)),
                    done * 100.0,
                    rebuild.checkpoint,
                    head,
                    self.rate
                )
            }
            _ => format!(
                "offset {}, {:.0} events/s (the feed's head is still being found)",
                rebuild.checkpoint, self.rate
            ),
        };
        if self.terminal {
            say_partly!("\r\x1b[2K{} {line}", self.name);
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
        } else if self
            .last_line
            .is_none_or(|at| now.duration_since(at) >= PLAIN_LINE_EVERY)
        {
            self.last_line = Some(now);
            say!(
                "rebuilding {}: {line} ({}s)",
                self.name,
                self.started.elapsed().as_secs()
            );
        }
    }

    /// Ends the live line, so that what follows starts on a line of its own.
    fn finish_line(&self) {
        if self.terminal && self.sample.is_some() {
            say!("");
        }
    }
}
