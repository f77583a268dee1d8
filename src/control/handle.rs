//! The one way into a running daemon: signals, the control socket and the demo all send their
//! requests through a [`DaemonHandle`], and the supervisor answers them from its [`Inbox`] in the
//! order they came.

use tokio::sync::{mpsc, oneshot};

use super::protocol::{Reply, Request};

/// A request and where its reply goes.
pub struct Command {
    pub request: Request,
    reply: oneshot::Sender<Reply>,
}

impl Command {
    /// Sends the reply; a requester that has gone away is no matter.
    pub fn answer(self, reply: Reply) {
        let _ = self.reply.send(reply);
    }
}

/// Sends requests to a running daemon; cheap to clone. Signals, the control socket and the demo
/// steer the daemon through it.
#[derive(Clone)]
pub struct DaemonHandle {
    commands: mpsc::Sender<Command>,
}

impl DaemonHandle {
    pub async fn request(&self, request: Request) -> Reply {
        self.submit(request).await.await
    }

    /// Queues a request (requests are handled in the order queued) and returns its reply
    /// to await.
    pub async fn submit(&self, request: Request) -> impl std::future::Future<Output = Reply> {
        let (reply, answer) = oneshot::channel();
        let sent = self.commands.send(Command { request, reply }).await.is_ok();
        async move {
            if !sent {
                return Reply::error("the daemon has stopped");
            }
            answer
                .await
                .unwrap_or_else(|_| Reply::error("the daemon stopped before answering"))
        }
    }

    /// Resolves once the daemon has finished (its supervisor has returned).
    pub async fn finished(&self) {
        self.commands.closed().await
    }
}

/// The supervisor's end of the channel.
pub struct Inbox {
    commands: mpsc::Receiver<Command>,
    handle: DaemonHandle,
}

impl Inbox {
    /// A handle to this inbox, for the control socket's clients.
    pub fn handle(&self) -> DaemonHandle {
        self.handle.clone()
    }

    /// The next request, in the order they were queued. Never None while the inbox keeps its
    /// own handle.
    pub async fn next(&mut self) -> Option<Command> {
        self.commands.recv().await
    }
}

pub fn channel() -> (DaemonHandle, Inbox) {
    let (commands, receiver) = mpsc::channel(64);
    let handle = DaemonHandle { commands };
    let inbox = Inbox {
        commands: receiver,
        handle: handle.clone(),
    };
    (handle, inbox)
}
