//! Serving the admin API's router on a [`Listener`] with hyper's HTTP/1.1 server.
//!
//! axum's own `serve` has no header-read timeout and no TLS, and keeps idle keep-alive
//! connections open for ever (each cost ~50 KB and a descriptor). Here every connection holds
//! one of the listener's slots; its request headers, and the next request on an idle keep-alive
//! connection, must arrive within `header_timeout` (hyper closes it otherwise); a request must
//! be answered within the request timeout ([`crate::admin::with_request_timeout`]). On shutdown
//! each connection finishes the request in hand and closes.

use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::listener::Listener;

/// How the admin API treats its connections.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub header_timeout: Duration,
}

/// Serves `app` until `shutdown`; connection tasks go on `tracker`.
pub async fn serve(
    listener: Listener,
    app: Router,
    settings: HttpSettings,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let failures = broker::LogLimiter::per_second(1);
    let failures = std::sync::Arc::new(failures);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => return,
        };
        let app = app.clone();
        let shutdown = shutdown.clone();
        let settings = settings.clone();
        let failures = failures.clone();
        tracker.spawn(async move {
            let peer = accepted.peer;
            let (connection, _slot) = match accepted.handshake().await {
                Ok(c) => c,
                Err(e) => {
                    if let Some(suppressed) = failures.allow() {
                        tracing::debug!(%peer, error = %e, suppressed, "admin connection failed before HTTP");
                    }
                    return;
                }
            };
            let service = TowerToHyperService::new(app);
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
            };
            if let Err(e) = result
                && let Some(suppressed) = failures.allow()
            {
                tracing::debug!(%peer, error = %e, suppressed, "admin connection ended");
            }
        });
    }
}
