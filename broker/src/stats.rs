//! What the broker refused, counted, and logged at a bounded rate.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rumqttd::protocol::QoS;

use crate::Refusal;

/// Lets through at most a number of log lines per second, and counts the rest: for events a
/// peer can cause at will (refusals, accept errors), so that the log grows at a bounded rate.
#[derive(Debug)]
pub struct LogLimiter {
    per_second: u32,
    started: Instant,
    /// Start of the current one-second window (ms since `started`), lines let through in it,
    /// and lines held back since the last one let through.
    window: Mutex<(u64, u32, u64)>,
    suppressed_total: AtomicU64,
}

impl LogLimiter {
    pub fn per_second(per_second: u32) -> LogLimiter {
        LogLimiter {
            per_second,
            started: Instant::now(),
            window: Mutex::new((0, 0, 0)),
            suppressed_total: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being how many were held back since the
    /// last one; `None` when this one is held back.
    pub fn allow(&self) -> Option<u64> {
        let now = self.started.elapsed().as_millis() as u64;
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if now.saturating_sub(w.0) >= 1000 {
            w.0 = now;
            w.1 = 0;
        }
        if w.1 < self.per_second {
            w.1 += 1;
            Some(std::mem::take(&mut w.2))
        } else {
            w.2 += 1;
            self.suppressed_total.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// Lines held back since the start.
    pub fn suppressed(&self) -> u64 {
        self.suppressed_total.load(Ordering::Relaxed)
    }
}

/// What the broker refused, since it started.
#[derive(Debug)]
pub struct BrokerStats {
    pub connects_refused: AtomicU64,
    pub subscribes_refused: AtomicU64,
    pub publishes_refused: AtomicU64,
    log: LogLimiter,
}

impl BrokerStats {
    /// Refusals logged per second at most; the rest are only counted.
    pub(crate) const LOG_PER_SECOND: u32 = 10;

    pub(crate) fn new() -> BrokerStats {
        BrokerStats {
            connects_refused: AtomicU64::new(0),
            subscribes_refused: AtomicU64::new(0),
            publishes_refused: AtomicU64::new(0),
            log: LogLimiter::per_second(Self::LOG_PER_SECOND),
        }
    }

    /// Refusals not logged because too many came at once.
    pub fn refusals_not_logged(&self) -> u64 {
        self.log.suppressed()
    }

    pub(crate) fn may_log(&self) -> bool {
        self.log.allow().is_some()
    }

    pub(crate) fn refused_subscribe(&self, who: &str, filter: &str) {
        self.subscribes_refused.fetch_add(1, Ordering::Relaxed);
        if self.may_log() {
            tracing::warn!(client = who, filter, "MQTT subscribe refused");
        }
    }

    pub(crate) fn refused_publish(&self, who: &str, topic: &str, qos: QoS, retain: bool) {
        self.publishes_refused.fetch_add(1, Ordering::Relaxed);
        if self.may_log() {
            tracing::warn!(
                client = who,
                topic,
                ?qos,
                retain,
                "MQTT publish refused; disconnecting"
            );
        }
    }

    pub(crate) fn refused_connect(&self, client_id: &str, refusal: Refusal) {
        self.connects_refused.fetch_add(1, Ordering::Relaxed);
        if self.may_log() {
            tracing::info!(%client_id, reason = refusal.as_str(), "MQTT connect refused");
        }
    }
}
