//! Accepting connections on the bridge's own listeners (admin API, data channel).
//!
//! Each listener holds at most `max_connections` open connections: it waits for a free slot
//! before it accepts, so a flood of idle connections to one port waits in the kernel's backlog
//! and costs no descriptor, and the other listeners keep theirs. A failing `accept` (out of
//! descriptors, typically) backs off from 5 ms to 1 s instead of spinning, and repeated errors
//! are logged at a bounded rate. With TLS the handshake runs in the connection's own task,
//! under a deadline, so a client that never finishes it holds up no one else.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use broker::LogLimiter;

/// A listener with a connection cap and optional TLS.
pub struct Listener {
    inner: TcpListener,
    name: &'static str,
    slots: Arc<Semaphore>,
    tls: Option<tls::TlsAcceptor>,
    handshake_timeout: Duration,
    errors: LogLimiter,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("name", &self.name)
            .field("addr", &self.inner.local_addr().ok())
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// A connection accepted, holding its slot; [`Accepted::handshake`] finishes it.
pub struct Accepted {
    stream: TcpStream,
    pub peer: SocketAddr,
    slot: OwnedSemaphorePermit,
    tls: Option<tls::TlsAcceptor>,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for Accepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accepted")
            .field("peer", &self.peer)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// A plain or TLS connection, with the slot it holds until dropped.
#[derive(Debug)]
pub struct Connection {
    stream: Stream,
    _slot: OwnedSemaphorePermit,
}

#[derive(Debug)]
enum Stream {
    Plain(TcpStream),
    Tls(Box<tls::server::TlsStream<TcpStream>>),
}

impl Listener {
    pub fn new(
        inner: TcpListener,
        name: &'static str,
        max_connections: usize,
        tls: Option<tls::TlsAcceptor>,
        handshake_timeout: Duration,
    ) -> Listener {
        Listener {
            inner,
            name,
            slots: Arc::new(Semaphore::new(max_connections)),
            tls,
            handshake_timeout,
            errors: LogLimiter::per_second(1),
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Connections open now.
    pub fn open(&self, max_connections: usize) -> usize {
        max_connections.saturating_sub(self.slots.available_permits())
    }

    /// The next connection, once a slot is free. Never fails: errors are logged and retried.
    pub async fn accept(&self) -> Accepted {
        let mut backoff = Duration::ZERO;
        loop {
            let Ok(slot) = self.slots.clone().acquire_owned().await else {
                // The semaphore is never closed; wait for ever rather than spin.
                return std::future::pending().await;
            };
            match self.inner.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return Accepted {
                        stream,
                        peer,
                        slot,
                        tls: self.tls.clone(),
                        handshake_timeout: self.handshake_timeout,
                    };
                }
                Err(e) => {
                    drop(slot);
                    backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                    if let Some(suppressed) = self.errors.allow() {
                        tracing::warn!(listener = self.name, error = %e, ?backoff, suppressed, "accept failed; backing off");
                    }
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }
}

impl Accepted {
    /// Finishes the TLS handshake (within the deadline) when the listener has TLS.
    pub async fn handshake(self) -> io::Result<Connection> {
        let stream = match self.tls {
            None => Stream::Plain(self.stream),
            Some(acceptor) => {
                match tokio::time::timeout(self.handshake_timeout, acceptor.accept(self.stream))
                    .await
                {
                    Ok(Ok(tls)) => Stream::Tls(Box::new(tls)),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "TLS handshake timed out",
                        ));
                    }
                }
            }
        };
        Ok(Connection {
            stream,
            _slot: self.slot,
        })
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}
