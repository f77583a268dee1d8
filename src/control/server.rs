//! The control socket's server: it accepts clients and carries their requests to the daemon.
//!
//! The socket is the daemon's front door, so bad input must never hurt it: a request line has a
//! size limit, a client that says nothing is dropped after a timeout, and the number of clients
//! served at once is capped; each gets an error reply or is dropped, and the feeds go on. The
//! socket file appears already restricted to its mode (it is bound under a temporary name,
//! chmod-ed, then linked into place), and a stale one left by a crash is replaced only after a
//! probe finds nobody listening.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::handle::DaemonHandle;
use super::protocol::{Reply, Request};
use crate::config::FileMode;

/// The longest request line accepted, newline included.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Clients served at once; more are answered "busy" and dropped.
pub const MAX_CLIENTS: usize = 128;
/// How long a client may take to send a complete request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The bound control socket. Dropping it removes the socket file, if it is still this one's.
pub struct ControlSocket {
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file, to not remove a successor's socket.
    identity: (u64, u64),
    request_timeout: Duration,
}

impl ControlSocket {
    /// Binds the socket at `path` with `mode`, creating its folder. A live daemon on the path
    /// is an error; a stale socket file (nobody listening) is replaced; anything else that is not
    /// a socket is left alone and is an error.
    pub fn bind(path: &Path, mode: FileMode) -> anyhow::Result<ControlSocket> {
        let folder = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        crate::files::create_private_folder(folder).with_context(|| {
            format!("creating the control socket's folder {}", folder.display())
        })?;
        // Another user able to write the folder could take the socket's name first, or replace
        // it after start, and answer `ctl` in the daemon's stead.
        crate::files::check_folder(folder, "the control socket", &[], true)
            .map_err(anyhow::Error::msg)?;
        remove_stale(path)?;
        // Bound under a temporary name and restricted before it is linked into place, so that
        // the socket is never reachable with looser permissions; bound under an owner-only
        // umask, so that it is not reachable between bind and chmod either.
        let temporary = temporary_name(path);
        let _ = std::fs::remove_file(&temporary);
        let listener =
            crate::files::with_private_umask(|| std::os::unix::net::UnixListener::bind(&temporary))
                .with_context(|| format!("binding the control socket {}", temporary.display()))?;
        let placed = std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode.0))
            .with_context(|| format!("setting the mode of {}", temporary.display()))
            .and_then(|()| {
                // A hard link fails if the name exists: of two daemons starting at once, one wins.
                std::fs::hard_link(&temporary, path).map_err(|err| {
                    if err.kind() == std::io::ErrorKind::AlreadyExists {
                        anyhow::anyhow!(
                            "another projector created the control socket {} while this one was starting",
                            path.display()
                        )
                    } else {
                        anyhow::Error::new(err)
                            .context(format!("placing the control socket at {}", path.display()))
                    }
                })
            });
        let _ = std::fs::remove_file(&temporary);
        placed?;
        let metadata = std::fs::symlink_metadata(path)
            .with_context(|| format!("reading {}", path.display()))?;
        listener
            .set_nonblocking(true)
            .context("making the control socket non-blocking")?;
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
            identity: (metadata.dev(), metadata.ino()),
            request_timeout: REQUEST_TIMEOUT,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves clients until `shutdown`. Each client gets its own task; the daemon's handle
    /// carries their requests to the supervisor.
    pub async fn serve(self, daemon: DaemonHandle, shutdown: CancellationToken) {
        let listener = match self
            .listener
            .try_clone()
            .and_then(tokio::net::UnixListener::from_std)
        {
            Ok(listener) => listener,
            Err(err) => {
                tracing::error!(socket = %self.path.display(), "control socket unusable: {err}");
                return;
            }
        };
        let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let mut stream = match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors, typically: wait a little rather than spin.
                    tracing::warn!("control socket accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                let busy = Reply::error(format!(
                    "busy: {MAX_CLIENTS} control clients are connected; try again"
                ));
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        stream.write_all(&busy.to_line()),
                    )
                    .await;
                });
                continue;
            };
            let daemon = daemon.clone();
            let timeout = self.request_timeout;
            tokio::spawn(async move {
                serve_client(stream, daemon, timeout).await;
                drop(slot);
            });
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn temporary_name(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".{}", std::process::id()));
    path.with_file_name(name)
}

/// Removes a socket file nobody listens on; refuses if a daemon answers or it is not a socket.
fn remove_stale(path: &Path) -> anyhow::Result<()> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err).with_context(|| format!("checking {}", path.display())),
    };
    if !metadata.file_type().is_socket() {
        anyhow::bail!(
            "{} exists and is not a socket; refusing to replace it (set [daemon] control_socket to another path)",
            path.display()
        );
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => anyhow::bail!(
            "another projector is already running: it listens on the control socket {}",
            path.display()
        ),
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => {
            tracing::warn!(socket = %path.display(), "removing a stale control socket left by a daemon that did not stop cleanly");
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))
        }
        Err(err) => Err(err).with_context(|| format!("probing the socket {}", path.display())),
    }
}

/// Answers one client's requests, one per line, until it hangs up, goes quiet or misbehaves.
async fn serve_client(stream: UnixStream, daemon: DaemonHandle, timeout: Duration) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let mut limited = (&mut reader).take(MAX_REQUEST_BYTES as u64);
        let read = tokio::time::timeout(timeout, limited.read_until(b'\n', &mut line)).await;
        let complete = line.ends_with(b"\n");
        let request = match read {
            Err(_) => Err(format!(
                "no complete request within {}; closing",
                humantime::format_duration(timeout)
            )),
            Ok(Err(_)) | Ok(Ok(0)) => return,
            Ok(Ok(_)) if !complete && line.len() >= MAX_REQUEST_BYTES => Err(format!(
                "request longer than {MAX_REQUEST_BYTES} bytes; closing"
            )),
            Ok(Ok(_)) => Request::parse(&line),
        };
        let (reply, stopping) = match request {
            Ok(request) => {
                let stop = request == Request::Stop;
                let reply = daemon.request(request).await;
                let stopping = stop && reply.ok;
                (reply, stopping)
            }
            Err(error) => (Reply::error(error), false),
        };
        if write.write_all(&reply.to_line()).await.is_err() {
            return;
        }
        if stopping {
            // The client learns that the daemon has finished when this connection closes.
            daemon.finished().await;
            return;
        }
        if !complete {
            // A timeout, an overlong line or a last line without newline: the stream is out
            // of step or over.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("run/ctl.sock");
        let first = ControlSocket::bind(&path, FileMode(0o600))?;
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = ControlSocket::bind(&path, FileMode(0o600)).err();
        assert!(err.is_some_and(|e| e.to_string().contains("already running")));
        drop(first);
        assert!(!path.exists(), "the socket is removed on a clean stop");
        // A crash leaves the file behind with nobody listening.
        drop(std::os::unix::net::UnixListener::bind(&path)?);
        let second = ControlSocket::bind(&path, FileMode(0o660))?;
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        drop(second);

        let regular = dir.path().join("not-a-socket");
        std::fs::write(&regular, "keep me")?;
        let err = ControlSocket::bind(&regular, FileMode(0o600)).err();
        assert!(err.is_some_and(|e| e.to_string().contains("not a socket")));
        assert_eq!(std::fs::read_to_string(&regular)?, "keep me");
        Ok(())
    }

    #[tokio::test]
    async fn a_client_that_says_nothing_is_told_so_and_dropped() -> anyhow::Result<()> {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir()?;
        let mut socket = ControlSocket::bind(&dir.path().join("ctl.sock"), FileMode(0o600))?;
        socket.request_timeout = Duration::from_millis(100);
        let path = socket.path().to_path_buf();
        let (daemon, _inbox) = crate::control::handle::channel();
        let stop = CancellationToken::new();
        let server = tokio::spawn(socket.serve(daemon, stop.clone()));
        let mut silent = tokio::net::UnixStream::connect(&path).await?;
        let mut reply = String::new();
        // EOF after the error reply: the daemon hung up.
        silent.read_to_string(&mut reply).await?;
        assert!(reply.contains("no complete request within"), "{reply}");
        stop.cancel();
        server.await?;
        Ok(())
    }
}
