//! Unix signals, turned into the requests the control socket takes, so that each behaviour has
//! one code path: SIGTERM and SIGINT stop, SIGUSR1 pauses every feed, SIGUSR2 resumes them,
//! SIGHUP reloads the configuration. A second SIGTERM or SIGINT while stopping exits at once,
//! which is safe: a batch not committed is simply not applied. Stop signals that arrive together
//! (`timeout` and some supervisors send two) are one stop: only one that comes a moment later,
//! as a second Ctrl-C does, forces the exit.

use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;

use crate::control::handle::DaemonHandle;
use crate::control::protocol::{Reply, Request};

/// A stop signal this long or longer after the first forces the exit; sooner, it is the same stop.
const SECOND_STOP_AFTER: Duration = Duration::from_secs(1);

/// Installs the handlers (so a signal sent from now on is never lost) and forwards signals to
/// the daemon from a task.
pub fn forward(daemon: DaemonHandle) -> std::io::Result<JoinHandle<()>> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut pause = signal(SignalKind::user_defined1())?;
    let mut resume = signal(SignalKind::user_defined2())?;
    let mut reload = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        let mut stopping_since: Option<Instant> = None;
        loop {
            let (name, request) = tokio::select! {
                _ = terminate.recv() => ("SIGTERM", Request::Stop),
                _ = interrupt.recv() => ("SIGINT", Request::Stop),
                _ = pause.recv() => ("SIGUSR1", Request::Pause { feed: None }),
                _ = resume.recv() => ("SIGUSR2", Request::Resume { feed: None }),
                _ = reload.recv() => ("SIGHUP", Request::Reload),
            };
            if request == Request::Stop {
                match stopping_since {
                    Some(since) if since.elapsed() >= SECOND_STOP_AFTER => {
                        tracing::warn!("{name} received again while stopping: exiting now");
                        crate::logging::flush();
                        std::process::exit(1);
                    }
                    Some(_) => {
                        tracing::info!("{name} received again at once: the same stop");
                        continue;
                    }
                    None => stopping_since = Some(Instant::now()),
                }
            }
            tracing::info!("{name} received");
            // Queued in order, answered in its own task, so that a second signal is seen while
            // this one is handled.
            let answer = daemon.submit(request).await;
            tokio::spawn(async move {
                let reply: Reply = answer.await;
                if let Some(error) = reply.error {
                    tracing::error!("{name}: {error}");
                }
            });
        }
    }))
}
