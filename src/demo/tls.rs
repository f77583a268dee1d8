//! The embedded feed server over TLS, for the tests of private CAs and client certificates: a
//! listener whose connections are TLS handshakes done one at a time (a test server, not a
//! production one: a client that never finishes its handshake holds the others up).

use std::sync::Arc;

use axum::serve::Listener;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

pub(super) struct TlsListener<L> {
    inner: L,
    acceptor: TlsAcceptor,
}

impl<L> TlsListener<L> {
    pub(super) fn new(inner: L, config: Arc<rustls::ServerConfig>) -> TlsListener<L> {
        TlsListener {
            inner,
            acceptor: TlsAcceptor::from(config),
        }
    }
}

impl<L: Listener> Listener for TlsListener<L> {
    type Io = TlsStream<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, addr) = self.inner.accept().await;
            // A refused handshake (an untrusted client certificate, say) is the client's
            // failure to see; the server goes on.
            if let Ok(tls) = self.acceptor.accept(io).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}
