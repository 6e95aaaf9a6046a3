//! Serving the admin API's router on a [`Listener`] with hyper's HTTP/1.1 server.
//!
//! axum's own `serve` has no header-read timeout and no TLS, and keeps idle keep-alive
//! connections open for ever (each cost ~50 KB and a descriptor). Here every connection holds
//! one of the listener's slots; its request headers, and the next request on an idle keep-alive
//! connection, must arrive within `header_timeout` (hyper closes it otherwise); a request must
//! be answered within the request timeout ([`crate::admin::with_request_timeout`]).
//!
//! When every slot is taken, a new connection takes the slot of the oldest connection with no
//! request in progress (closed at once): a flood of idle connections churns among themselves
//! and cannot keep an operator's `GET /v1/health` waiting. On shutdown each connection finishes
//! the request in hand and closes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::listener::Listener;

/// How the admin API treats its connections.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub header_timeout: Duration,
    /// Counts connections closed to make room (shown in the metrics).
    pub evicted: Arc<AtomicU64>,
    /// Connections open now (shown in the metrics).
    pub open: Arc<AtomicUsize>,
}

/// Open connections, oldest first, with how many requests each has in progress.
#[derive(Debug)]
struct Open {
    next: AtomicU64,
    by_age: Mutex<BTreeMap<u64, (Arc<AtomicUsize>, CancellationToken)>>,
    evicted: Arc<AtomicU64>,
}

impl Open {
    fn add(&self) -> (u64, Arc<AtomicUsize>, CancellationToken) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let active = Arc::new(AtomicUsize::new(0));
        let close = CancellationToken::new();
        self.by_age
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (active.clone(), close.clone()));
        (id, active, close)
    }

    fn remove(&self, id: u64) {
        self.by_age
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Closes the oldest connection with no request in progress; whether there was one.
    fn evict_oldest_idle(&self) -> bool {
        let mut by_age = self.by_age.lock().unwrap_or_else(|p| p.into_inner());
        let idle = by_age
            .iter()
            .find(|(_, (active, _))| active.load(Ordering::Acquire) == 0)
            .map(|(id, _)| *id);
        match idle.and_then(|id| by_age.remove(&id)) {
            Some((_, close)) => {
                close.cancel();
                self.evicted.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

/// Counts one in `counter` while it lives: a request in progress on its connection, or an
/// open connection.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(counter: &Arc<AtomicUsize>) -> Counted {
        counter.fetch_add(1, Ordering::AcqRel);
        Counted(counter.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves `app` until `shutdown`; connection tasks go on `tracker`.
pub async fn serve(
    listener: Listener,
    app: Router,
    settings: HttpSettings,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let failures = Arc::new(broker::LogLimiter::per_second(1));
    let open = Arc::new(Open {
        next: AtomicU64::new(0),
        by_age: Mutex::new(BTreeMap::new()),
        evicted: settings.evicted.clone(),
    });
    let evictions_logged = broker::LogLimiter::per_second(1);
    loop {
        let accepted = tokio::select! {
            a = listener.accept_or_make_room(|| open.evict_oldest_idle()) => a,
            _ = shutdown.cancelled() => return,
        };
        if let Some(suppressed) = accepted
            .made_room
            .then(|| evictions_logged.allow())
            .flatten()
        {
            tracing::warn!(
                evicted_total = open.evicted.load(Ordering::Relaxed),
                suppressed,
                "admin API at max_connections: closed the oldest idle connection"
            );
        }
        let accepted = accepted.accepted;
        let app = app.clone();
        let shutdown = shutdown.clone();
        let settings = settings.clone();
        let failures = failures.clone();
        let open = open.clone();
        tracker.spawn(async move {
            let peer = accepted.peer;
            let (id, active, close) = open.add();
            let counted = Counted::new(&settings.open);
            let result =
                serve_connection(accepted, app, settings, &active, &shutdown, &close).await;
            drop(counted);
            open.remove(id);
            if let Err(e) = result
                && let Some(suppressed) = failures.allow()
            {
                tracing::debug!(%peer, error = %e, suppressed, "admin connection ended");
            }
        });
    }
}

async fn serve_connection(
    accepted: crate::listener::Accepted,
    app: Router,
    settings: HttpSettings,
    active: &Arc<AtomicUsize>,
    shutdown: &CancellationToken,
    close: &CancellationToken,
) -> Result<(), String> {
    // The TLS handshake counts as a request in progress: it has its own deadline.
    let handshake = Counted::new(active);
    let (connection, _slot) = accepted.handshake().await.map_err(|e| e.to_string())?;
    drop(handshake);
    let counter = active.clone();
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let in_progress = Counted::new(&counter);
            let mut app = app.clone();
            async move {
                let response = tower_service::Service::call(&mut app, request).await;
                drop(in_progress);
                response
            }
        });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(connection), service);
    tokio::pin!(served);
    let result = tokio::select! {
        r = served.as_mut() => r,
        _ = shutdown.cancelled() => {
            served.as_mut().graceful_shutdown();
            served.await
        }
        // Evicted with no request in progress: dropping the connection closes it.
        _ = close.cancelled() => Ok(()),
    };
    result.map_err(|e| e.to_string())
}
