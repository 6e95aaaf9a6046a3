//! The bridge's long-running tasks: the reaper (leases and TTLs as they fall due), MQTT
//! departures after their grace period, and the ops publisher (each event once its change is
//! durable, to MQTT, the metrics, the console's overview and its live streams).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use schemas::UnixMillis;
use schemas::ops::{Channel, OpsEvent};
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use super::Bridge;

impl Bridge {
    /// Publishes the MQTT departures whose grace period has ended (see `presence.rs`), until
    /// `shutdown`.
    pub async fn run_departures(self, shutdown: CancellationToken) {
        let departures = &self.inner.departures;
        loop {
            let (gone, next) = departures.due(self.now());
            for (device_id, at) in gone {
                self.inner
                    .metrics
                    .mqtt_offline_published
                    .fetch_add(1, Ordering::Relaxed);
                self.core().observe(OpsEvent::DeviceOffline {
                    device_id,
                    channel: Channel::Mqtt,
                    at,
                });
            }
            let wait = next.map_or(Duration::from_secs(3600), |t| {
                Duration::from_millis(t.0.saturating_sub(self.now().0))
            });
            // Not woken by a test's clock jump: the reaper is that clock's one waiter, and a
            // departure is at most one grace period late in real time.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = departures.added.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Applies leases and TTLs as they fall due, until `shutdown`.
    pub async fn run_reaper(self, shutdown: CancellationToken) {
        let wake = &self.inner.reaper;
        loop {
            let next = wake.next_deadline(|| self.core().next_deadline());
            let now = self.now();
            let wait = next.map(|t| Duration::from_millis(t.0.saturating_sub(now.0)));
            if wait != Some(Duration::ZERO) {
                let wait = wait.unwrap_or(Duration::from_secs(3600));
                wake.sleeping_until(now.saturating_add_ms(wait.as_millis() as u64));
                let sleep = tokio::time::sleep(wait);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = wake.notify.notified() => continue,
                    _ = self.inner.clock.jumped() => continue,
                    _ = sleep => {}
                }
            }
            let result = self.core().expire_due(self.now());
            match result {
                Ok((Some(ticket), effects)) => {
                    if let Err(e) = self.finish(ticket, effects).await {
                        tracing::error!(error = %e, "lease/TTL changes not durable");
                    }
                }
                Ok((None, _)) => {}
                Err(e) => tracing::error!(error = %e, "lease/TTL processing failed"),
            }
        }
    }

    /// Publishes the ops events of committed changes in the order of the changes, each once
    /// its change is durable (see `core/events.rs`), until `shutdown` or a failed flush
    /// (after which nothing more becomes durable, so nothing more is published).
    pub async fn run_ops_publisher(self, shutdown: CancellationToken) {
        self.publish_ops(shutdown).await;
        // The last sender goes: the console's streams end.
        self.inner
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    fn live_sender(&self) -> Option<broadcast::Sender<Arc<str>>> {
        self.inner
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Presence and recent job transitions, as the console's overview shows them.
    pub fn watch(&self) -> &crate::watch::Watch {
        &self.inner.watch
    }

    /// The ops events from now on, as they are published, each as JSON `{"topic": ...,
    /// "payload": ...}` (the MQTT topic and payload); `None` once the publisher has stopped.
    pub fn live_events(&self) -> Option<broadcast::Receiver<Arc<str>>> {
        self.live_sender().map(|s| s.subscribe())
    }

    async fn publish_ops(&self, shutdown: CancellationToken) {
        let queue = self.core().ops_queue();
        let live = self.live_sender();
        loop {
            let covering = tokio::select! {
                _ = shutdown.cancelled() => return,
                t = queue.next() => t,
            };
            let durable = tokio::select! {
                _ = shutdown.cancelled() => return,
                d = self.inner.committer.wait_durable(covering) => d,
            };
            if let Err(e) = durable {
                tracing::error!(error = %e, "ops events held back: the store stopped");
                return;
            }
            for event in queue.release(covering) {
                self.inner.telemetry.applied(&event);
                self.inner.watch.observe(&event);
                self.inner.notifier.ops(&event);
                if let Some(live) = live.as_ref().filter(|l| l.receiver_count() > 0) {
                    let line = serde_json::json!({ "topic": event.topic(), "payload": event });
                    // No receiver left since the check is no error worth a word.
                    let _ = live.send(Arc::from(line.to_string()));
                }
            }
        }
    }
}

/// Wakes the reaper when a deadline earlier than the one it sleeps towards appears, and only
/// then: most changes (a job fetched, a lease renewed) move no deadline before it, and waking
/// it for each cost a task switch per durable change.
#[derive(Debug)]
pub(super) struct ReaperWake {
    notify: Notify,
    /// What the reaper sleeps towards (ms); `u64::MAX` while it is awake and looking.
    sleeps_until: AtomicU64,
}

impl Default for ReaperWake {
    fn default() -> Self {
        ReaperWake {
            notify: Notify::new(),
            sleeps_until: AtomicU64::new(u64::MAX),
        }
    }
}

impl ReaperWake {
    /// The reaper's look at the deadlines. Marks it awake first, so that a deadline installed
    /// while it looks wakes it again rather than being missed.
    fn next_deadline(&self, deadlines: impl FnOnce() -> Option<UnixMillis>) -> Option<UnixMillis> {
        self.sleeps_until.store(u64::MAX, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        deadlines()
    }

    fn sleeping_until(&self, until: UnixMillis) {
        self.sleeps_until.store(until.0, Ordering::SeqCst);
    }

    /// After a change was installed (its deadlines are in the core's atomics).
    pub(super) fn deadline_changed(&self, deadlines: impl FnOnce() -> Option<UnixMillis>) {
        std::sync::atomic::fence(Ordering::SeqCst);
        let next = deadlines().map_or(u64::MAX, |t| t.0);
        let until = self.sleeps_until.load(Ordering::SeqCst);
        // While it looks, it may have read the deadlines before this change: a permit makes
        // it look once more.
        if until == u64::MAX || next < until {
            self.notify.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    fn woken(wake: &ReaperWake) -> bool {
        wake.notify.notified().now_or_never().is_some()
    }

    #[test]
    fn the_reaper_is_woken_only_by_an_earlier_deadline_or_while_it_looks() {
        let wake = ReaperWake::default();
        // Looking: any change wakes it once more, a deadline or none.
        assert_eq!(wake.next_deadline(|| None), None);
        wake.deadline_changed(|| None);
        assert!(woken(&wake));
        // Asleep until 1000: a later or equal deadline does not wake it, an earlier one does.
        wake.sleeping_until(UnixMillis(1000));
        wake.deadline_changed(|| Some(UnixMillis(1000)));
        wake.deadline_changed(|| Some(UnixMillis(5000)));
        wake.deadline_changed(|| None);
        assert!(!woken(&wake));
        wake.deadline_changed(|| Some(UnixMillis(999)));
        assert!(woken(&wake));
        // Once it looks again, it is awake until it sleeps.
        wake.next_deadline(|| Some(UnixMillis(999)));
        wake.deadline_changed(|| Some(UnixMillis(5000)));
        assert!(woken(&wake));
    }
}
