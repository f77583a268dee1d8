//! The control socket: a Unix socket speaking one JSON request per line and answering one JSON
//! reply per line, so that `projector ctl`, `socat` or any language can steer the daemon.
//!
//! The socket is the daemon's front door, so bad input must never hurt it: a request line has a
//! size limit, a client that says nothing is dropped after a timeout, and the number of clients
//! served at once is capped; each gets an error reply or is dropped, and the feeds go on. The
//! socket file appears already restricted to its mode (it is bound under a temporary name,
//! chmod-ed, then linked into place), and a stale one left by a crash is replaced only after a
//! probe finds nobody listening.

use std::io::{BufRead, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::SocketMode;
use crate::daemon::DaemonHandle;
use crate::status::DaemonStatus;

/// The longest request line accepted, newline included.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Clients served at once; more are answered "busy" and dropped.
pub const MAX_CLIENTS: usize = 128;
/// How long a client may take to send a complete request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One request: `{"command": "status"}`, `{"command": "pause", "feed": "bank"}`, ...
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RequestLine", into = "RequestLine")]
pub enum Request {
    /// Every feed's state, checkpoints, head, lag, rate and last error.
    Status,
    /// Pause one feed, or all of them without `feed`. The reply comes once it has taken effect.
    Pause { feed: Option<String> },
    /// Resume one feed, or all of them without `feed`.
    Resume { feed: Option<String> },
    /// Reload the configuration file, as SIGHUP does, and say whether it was taken.
    Reload,
    /// Stop gracefully. The reply comes first; the connection closes when the daemon has exited.
    Stop,
}

/// A request as written on the wire; [`Request`] is what it must mean.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestLine {
    command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    feed: Option<String>,
}

const COMMANDS: &str = "status, pause, resume, reload, stop";

impl TryFrom<RequestLine> for Request {
    type Error = String;

    fn try_from(line: RequestLine) -> Result<Request, String> {
        let request = match line.command.as_str() {
            "status" => Request::Status,
            "pause" => return Ok(Request::Pause { feed: line.feed }),
            "resume" => return Ok(Request::Resume { feed: line.feed }),
            "reload" => Request::Reload,
            "stop" => Request::Stop,
            other => return Err(format!("unknown command {other:?} (commands: {COMMANDS})")),
        };
        match line.feed {
            Some(_) => Err(format!("{:?} takes no feed", line.command)),
            None => Ok(request),
        }
    }
}

impl From<Request> for RequestLine {
    fn from(request: Request) -> RequestLine {
        let (command, feed) = match request {
            Request::Status => ("status", None),
            Request::Pause { feed } => ("pause", feed),
            Request::Resume { feed } => ("resume", feed),
            Request::Reload => ("reload", None),
            Request::Stop => ("stop", None),
        };
        RequestLine {
            command: command.to_string(),
            feed,
        }
    }
}

impl Request {
    /// Parses one request line; the error says what was wrong, for the reply.
    pub fn parse(line: &[u8]) -> Result<Request, String> {
        let bad = |err: String| {
            format!("bad request: {err}; send one JSON object per line, like {{\"command\":\"status\"}}")
        };
        let text = std::str::from_utf8(line).map_err(|_| bad("the request is not UTF-8".into()))?;
        let value: serde_json::Value =
            serde_json::from_str(text.trim()).map_err(|err| bad(err.to_string()))?;
        if !value.is_object() {
            return Err(bad("the request is not a JSON object".into()));
        }
        serde_json::from_value(value).map_err(|err| bad(err.to_string()))
    }
}

/// One reply: `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What was done, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The feeds a pause or resume applied to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feeds: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DaemonStatus>,
}

impl Reply {
    pub fn done(message: impl Into<String>) -> Reply {
        Reply {
            ok: true,
            message: Some(message.into()),
            ..Reply::default()
        }
    }

    pub fn error(error: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(error.into()),
            ..Reply::default()
        }
    }

    fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self)
            .unwrap_or_else(|_| br#"{"ok":false,"error":"reply not serialisable"}"#.to_vec());
        line.push(b'\n');
        line
    }
}

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
    pub fn bind(path: &Path, mode: SocketMode) -> anyhow::Result<ControlSocket> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| {
                format!("creating the control socket's folder {}", parent.display())
            })?;
        }
        remove_stale(path)?;
        // Bound under a temporary name and restricted before it is linked into place, so that
        // the socket is never reachable with looser permissions.
        let temporary = temporary_name(path);
        let _ = std::fs::remove_file(&temporary);
        let listener = std::os::unix::net::UnixListener::bind(&temporary)
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

/// A connection to a running daemon's control socket, for `projector ctl` and tests.
pub struct ControlClient {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    path: PathBuf,
}

/// Why a request could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("projector is not running: there is no control socket at {0}")]
    NoSocket(PathBuf),
    #[error("projector is not running: nothing listens on the control socket {0} (it was left by a daemon that did not stop cleanly)")]
    Refused(PathBuf),
    #[error("permission denied on the control socket {0}: run as the daemon's user or a member of its group")]
    PermissionDenied(PathBuf),
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: the daemon closed the connection without a reply")]
    NoReply { path: PathBuf },
    #[error("control socket {path}: unreadable reply {reply:?}: {error}")]
    BadReply {
        path: PathBuf,
        reply: String,
        error: String,
    },
}

impl ClientError {
    /// True when the daemon is simply not running (for the exit status).
    pub fn is_not_running(&self) -> bool {
        matches!(self, ClientError::NoSocket(_) | ClientError::Refused(_))
    }
}

impl ControlClient {
    /// Connects, waiting at most `timeout` for each reply.
    pub fn connect(path: &Path, timeout: Duration) -> Result<ControlClient, ClientError> {
        use std::io::ErrorKind;
        let stream =
            std::os::unix::net::UnixStream::connect(path).map_err(|err| match err.kind() {
                ErrorKind::NotFound => ClientError::NoSocket(path.to_path_buf()),
                ErrorKind::ConnectionRefused => ClientError::Refused(path.to_path_buf()),
                ErrorKind::PermissionDenied => ClientError::PermissionDenied(path.to_path_buf()),
                _ => ClientError::Io {
                    path: path.to_path_buf(),
                    source: err,
                },
            })?;
        let io = |source| ClientError::Io {
            path: path.to_path_buf(),
            source,
        };
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        Ok(ControlClient {
            reader: std::io::BufReader::new(stream),
            path: path.to_path_buf(),
        })
    }

    /// Sends a request and reads its reply.
    pub fn send(&mut self, request: &Request) -> Result<Reply, ClientError> {
        let mut line = serde_json::to_vec(request).map_err(|err| self.io(err.into()))?;
        line.push(b'\n');
        self.reader
            .get_mut()
            .write_all(&line)
            .map_err(|err| self.io(err))?;
        let mut reply = String::new();
        let read = self
            .reader
            .read_line(&mut reply)
            .map_err(|err| self.io(err))?;
        if read == 0 {
            return Err(ClientError::NoReply {
                path: self.path.clone(),
            });
        }
        serde_json::from_str(&reply).map_err(|err| ClientError::BadReply {
            path: self.path.clone(),
            reply: reply.trim_end().to_string(),
            error: err.to_string(),
        })
    }

    /// After `stop`: waits until the daemon closes the connection (it has exited), for at most
    /// `timeout`. True if it did.
    pub fn wait_until_closed(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut rest = Vec::new();
        while std::time::Instant::now() < deadline {
            match self.reader.read_until(b'\n', &mut rest) {
                Ok(0) => return true,
                Ok(_) => rest.clear(),
                Err(err)
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return true,
            }
        }
        false
    }

    fn io(&self, source: std::io::Error) -> ClientError {
        ClientError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        assert_eq!(
            Request::parse(br#"{"command":"status"}"#),
            Ok(Request::Status)
        );
        assert_eq!(
            Request::parse(b"{\"command\": \"pause\", \"feed\": \"bank\"}\n"),
            Ok(Request::Pause {
                feed: Some("bank".into())
            })
        );
        assert_eq!(
            Request::parse(br#"{"command":"resume"}"#),
            Ok(Request::Resume { feed: None })
        );
        for (bad, says) in [
            (&b"not json"[..], "bad request"),
            (
                br#"{"command":"explode"}"#,
                "unknown command \"explode\" (commands: status",
            ),
            (br#"{"feed":"bank"}"#, "command"),
            (br#"{"command":"stop","now":true}"#, "unknown field"),
            (br#"{"command":"stop","feed":"bank"}"#, "takes no feed"),
            (br#"["status"]"#, "bad request"),
            (br#"{"command":"pause","feed":7}"#, "invalid type"),
            (b"\xff\xfe", "UTF-8"),
            (b"", "bad request"),
        ] {
            let err = Request::parse(bad).err().unwrap_or_default();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn requests_round_trip_as_documented() -> anyhow::Result<()> {
        let pause = serde_json::to_string(&Request::Pause {
            feed: Some("bank".into()),
        })?;
        assert_eq!(pause, r#"{"command":"pause","feed":"bank"}"#);
        assert_eq!(
            serde_json::to_string(&Request::Stop)?,
            r#"{"command":"stop"}"#
        );
        Ok(())
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("run/ctl.sock");
        let first = ControlSocket::bind(&path, SocketMode(0o600))?;
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = ControlSocket::bind(&path, SocketMode(0o600)).err();
        assert!(err.is_some_and(|e| e.to_string().contains("already running")));
        drop(first);
        assert!(!path.exists(), "the socket is removed on a clean stop");
        // A crash leaves the file behind with nobody listening.
        drop(std::os::unix::net::UnixListener::bind(&path)?);
        let second = ControlSocket::bind(&path, SocketMode(0o660))?;
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        drop(second);

        let regular = dir.path().join("not-a-socket");
        std::fs::write(&regular, "keep me")?;
        let err = ControlSocket::bind(&regular, SocketMode(0o600)).err();
        assert!(err.is_some_and(|e| e.to_string().contains("not a socket")));
        assert_eq!(std::fs::read_to_string(&regular)?, "keep me");
        Ok(())
    }

    #[tokio::test]
    async fn a_client_that_says_nothing_is_told_so_and_dropped() -> anyhow::Result<()> {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir()?;
        let mut socket = ControlSocket::bind(&dir.path().join("ctl.sock"), SocketMode(0o600))?;
        socket.request_timeout = Duration::from_millis(100);
        let path = socket.path().to_path_buf();
        let (daemon, _inbox) = crate::daemon::channel();
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

    #[test]
    fn client_errors_say_the_daemon_is_not_running() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("ctl.sock");
        let err = ControlClient::connect(&path, Duration::from_secs(1)).err();
        assert!(err.is_some_and(|e| e.is_not_running() && e.to_string().contains("not running")));
        drop(std::os::unix::net::UnixListener::bind(&path)?);
        let err = ControlClient::connect(&path, Duration::from_secs(1)).err();
        assert!(err.is_some_and(|e| matches!(e, ClientError::Refused(_))));
        Ok(())
    }
}
