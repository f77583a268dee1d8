//! The client end of the control socket, for `projector ctl` and the tests: connect, send a
//! request, read its reply, and after `stop` wait for the daemon to close the connection.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::protocol::{Reply, Request};

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
    #[error("{0} is not a socket: is it the daemon's control socket ([daemon] control_socket, or --socket)?")]
    NotASocket(PathBuf),
    #[error("the process answering on {path} runs as uid {uid}, not as this user, root or the owner of the socket's folder: refusing to talk to it (another user may have taken the socket's name)")]
    Impostor { path: PathBuf, uid: u32 },
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
        use std::os::unix::fs::FileTypeExt;
        if std::fs::metadata(path).is_ok_and(|meta| !meta.file_type().is_socket()) {
            return Err(ClientError::NotASocket(path.to_path_buf()));
        }
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
        check_peer(&stream, path)?;
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

/// Whether the process at the other end of `stream` may be the daemon: it runs as this user,
/// as root, or as the owner of the socket's folder (a service user's runtime folder).
fn check_peer(stream: &std::os::unix::net::UnixStream, path: &Path) -> Result<(), ClientError> {
    use std::os::unix::fs::MetadataExt;
    let peer = rustix::net::sockopt::socket_peercred(stream).map_err(|err| ClientError::Io {
        path: path.to_path_buf(),
        source: err.into(),
    })?;
    let uid = peer.uid.as_raw();
    let folder_owner = path
        .parent()
        .map(|folder| {
            if folder.as_os_str().is_empty() {
                Path::new(".")
            } else {
                folder
            }
        })
        .and_then(|folder| std::fs::metadata(folder).ok())
        .map(|meta| meta.uid());
    if uid == rustix::process::geteuid().as_raw() || uid == 0 || Some(uid) == folder_owner {
        Ok(())
    } else {
        Err(ClientError::Impostor {
            path: path.to_path_buf(),
            uid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_say_the_daemon_is_not_running() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("ctl.sock");
        let err = ControlClient::connect(&path, Duration::from_secs(1)).err();
        assert!(err.is_some_and(|e| e.is_not_running() && e.to_string().contains("not running")));
        drop(std::os::unix::net::UnixListener::bind(&path)?);
        let err = ControlClient::connect(&path, Duration::from_secs(1)).err();
        assert!(err.is_some_and(|e| matches!(e, ClientError::Refused(_))));
        let regular = dir.path().join("consumer.toml");
        std::fs::write(&regular, "")?;
        let err = ControlClient::connect(&regular, Duration::from_secs(1)).err();
        assert!(err.is_some_and(|e| e.to_string().contains("is not a socket")));
        Ok(())
    }
}
