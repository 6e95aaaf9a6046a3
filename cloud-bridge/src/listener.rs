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
use std::sync::Arc;
use std::time::Duration;

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

/// Binds `addr` with a backlog as deep as the kernel allows (Linux caps it at
/// `net.core.somaxconn`). tokio's `TcpListener::bind` asks for 1,024: when a whole fleet comes
/// back at once (a restart under 8,000 devices) more connections arrive before the accept loop
/// takes them, the kernel drops the overflow, and each of those clients waits out TCP's SYN
/// retransmission (1, 3, 7, 15, 31 s) before it is seen at all. The embedded broker binds the
/// same way.
pub use broker::deep_listener as bind;

/// A connection accepted, and whether another was closed to make room for it.
#[derive(Debug)]
pub struct Admitted {
    pub accepted: Accepted,
    pub made_room: bool,
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

/// A plain or TLS connection.
pub type Connection = tls::MaybeTls;

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

    /// The next connection, once a slot is free. Never fails: errors are logged and retried.
    pub async fn accept(&self) -> Accepted {
        self.accept_or_make_room(|| false).await.accepted
    }

    /// Like [`Listener::accept`], but when every slot is taken `make_room` may close a
    /// connection (returning true) and its slot is used as soon as it is free.
    pub async fn accept_or_make_room(&self, make_room: impl Fn() -> bool) -> Admitted {
        let mut backoff = Duration::ZERO;
        let mut made_room = false;
        loop {
            let slot = match self.slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    made_room |= make_room();
                    match self.slots.clone().acquire_owned().await {
                        Ok(slot) => slot,
                        // The semaphore is never closed; wait for ever rather than spin.
                        Err(_) => return std::future::pending().await,
                    }
                }
            };
            match self.inner.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let accepted = Accepted {
                        stream,
                        peer,
                        slot,
                        tls: self.tls.clone(),
                        handshake_timeout: self.handshake_timeout,
                    };
                    return Admitted {
                        accepted,
                        made_room,
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
    /// Finishes the TLS handshake (within the deadline) when the listener has TLS. The slot
    /// comes back with the connection: hold it as long as the connection is open.
    pub async fn handshake(self) -> io::Result<(Connection, OwnedSemaphorePermit)> {
        let stream = match self.tls {
            None => Connection::Plain(self.stream),
            Some(acceptor) => {
                match tokio::time::timeout(self.handshake_timeout, acceptor.accept(self.stream))
                    .await
                {
                    Ok(Ok(tls)) => tls.into(),
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
        Ok((stream, self.slot))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// More connections than tokio's default backlog (1,024) arrive while nothing accepts: each
    /// completes its handshake in the kernel's queue at once. Past a full queue the kernel drops
    /// the SYN and the client retries only after a second, which the deadline catches.
    #[tokio::test]
    async fn a_burst_beyond_tokios_backlog_waits_in_the_kernel_queue() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        for n in 0..1_500 {
            let stream = tokio::time::timeout(Duration::from_millis(900), TcpStream::connect(addr))
                .await
                .unwrap_or_else(|_| {
                    panic!("connection {n} waited for a SYN retry: the backlog is full")
                })
                .unwrap();
            held.push(stream);
        }
        drop(listener);
    }
}
