//! The bridge service: the sharded [`Core`], made durable and observable.
//!
//! Every change follows one pattern: [`Core`] stages it in a transaction over the shards it
//! touches and commits the batch (see `core/tx.rs`); the bridge waits until the batch is
//! durable, then acts on the [`Effects`] (wake long-polls, publish hints; the ops events go
//! out in order through the publisher in `tasks.rs`). Reads also wait for everything they saw
//! to be durable, so no one is ever shown data that a crash could take back. The MQTT side
//! (presence, broker logins) is in `mqtt.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use schemas::data::{ErrorCode, Registration, Request, Response};
use schemas::hint::HintKind;
use schemas::ops::{Channel, OpsEvent};
use schemas::records::DeviceRecord;
use schemas::{DeviceId, FeedSeq, Secret, UnixMillis};
use tokio::sync::{broadcast, watch};

use crate::clock::Clock;
#[cfg(doc)]
use crate::clock::SystemClock;
use crate::core::{AuthFailure, Core, CoreError, CoreResult, Effects};
use crate::notifier::Notifier;
use crate::sessions::{DataSession, DataSessions};
use crate::store::{Committer, Ticket};

mod mqtt;
mod tasks;

use tasks::ReaperWake;

/// Counters shown by `GET /v1/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub jobs_submitted: AtomicU64,
    pub requests: AtomicU64,
    pub request_errors: AtomicU64,
    pub data_connections: AtomicU64,
    pub data_connections_open: AtomicU64,
    pub presence_hints: AtomicU64,
    /// MQTT departures published (the device stayed away past the grace period), and those
    /// not published because the device came back within it.
    pub mqtt_offline_published: AtomicU64,
    pub mqtt_offline_withdrawn: AtomicU64,
    /// Finished jobs deleted at the end of their retention.
    pub jobs_swept: AtomicU64,
    /// Sweeps that failed (the store or the archive); the jobs stay for the next one.
    pub sweep_failures: AtomicU64,
    /// Idle admin connections closed to make room for new ones (at `admin.max_connections`).
    pub admin_evicted: Arc<AtomicU64>,
    /// Admin API connections open now.
    pub admin_open: Arc<std::sync::atomic::AtomicUsize>,
}

#[derive(Debug)]
struct Inner {
    core: Core,
    committer: Arc<Committer>,
    notifier: Notifier,
    /// Durable newest sequence number per device, for long-polls.
    feeds: Mutex<HashMap<DeviceId, watch::Sender<FeedSeq>>>,
    reaper: ReaperWake,
    metrics: Metrics,
    telemetry: crate::telemetry::counted::Telemetry,
    broker_mode: String,
    /// The embedded broker, once started (none with an external broker).
    embedded: OnceLock<broker::EmbeddedBroker>,
    data_sessions: Arc<DataSessions>,
    clock: Arc<dyn Clock>,
    /// MQTT departures waiting out their grace period (see `presence.rs`).
    departures: crate::presence::Departures,
    /// The ops events as they are published, for the console's live view; `None` once the
    /// publisher stopped, which ends every stream.
    live: Mutex<Option<broadcast::Sender<Arc<str>>>>,
    /// Presence and the last hour of job transitions, from the published events.
    watch: crate::watch::Watch,
}

/// Live events a slow console stream may fall behind by before it is told it missed some.
pub const LIVE_BACKLOG: usize = 1024;

/// Cheap to clone; all clones share one state.
#[derive(Debug, Clone)]
pub struct Bridge {
    inner: Arc<Inner>,
}

impl Bridge {
    /// A bridge over `core`, reading the time from `clock` ([`SystemClock`], or a test's). An
    /// MQTT `offline` is published once the device has stayed away `presence_grace_ms`.
    pub fn new(
        core: Core,
        committer: Arc<Committer>,
        notifier: Notifier,
        broker_mode: &str,
        clock: Arc<dyn Clock>,
        presence_grace_ms: u64,
    ) -> Bridge {
        Bridge {
            inner: Arc::new(Inner {
                core,
                committer,
                notifier,
                feeds: Mutex::new(HashMap::new()),
                reaper: ReaperWake::default(),
                metrics: Metrics::default(),
                telemetry: crate::telemetry::counted::Telemetry::default(),
                broker_mode: broker_mode.to_owned(),
                embedded: OnceLock::new(),
                data_sessions: Arc::new(DataSessions::default()),
                clock,
                departures: crate::presence::Departures::new(presence_grace_ms),
                live: Mutex::new(Some(broadcast::channel(LIVE_BACKLOG).0)),
                watch: crate::watch::Watch::default(),
            }),
        }
    }

    /// The time, as the bridge's clock says.
    pub fn now(&self) -> UnixMillis {
        self.inner.clock.now()
    }

    pub fn core(&self) -> &Core {
        &self.inner.core
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// What the metrics scrape counts as commits are applied.
    pub fn telemetry(&self) -> &crate::telemetry::counted::Telemetry {
        &self.inner.telemetry
    }

    pub fn notifier(&self) -> &Notifier {
        &self.inner.notifier
    }

    pub fn committer(&self) -> &Arc<Committer> {
        &self.inner.committer
    }

    /// The regular poll devices are asked to keep.
    pub fn poll_interval_secs(&self) -> u32 {
        self.core().policy().poll_interval_secs
    }

    pub fn broker_mode(&self) -> &str {
        &self.inner.broker_mode
    }

    /// Makes a change through `f` (a method of [`Core`] answering with its ticket, and its
    /// effects if it has any), waits until the change is durable and carries out its effects.
    pub(crate) async fn change<C: Change>(
        &self,
        f: impl FnOnce(&Core) -> CoreResult<C>,
    ) -> CoreResult<C::Answer> {
        let (answer, ticket, effects) = f(self.core())?.split();
        self.finish(ticket, effects).await?;
        Ok(answer)
    }

    /// Waits for `ticket`, then wakes long-polls, publishes hints and closes the connections
    /// of devices disabled or invalidated. The ops events go out in order through
    /// [`Bridge::run_ops_publisher`].
    pub(crate) async fn finish(&self, ticket: Ticket, effects: Effects) -> CoreResult<()> {
        self.inner.committer.wait_durable(ticket).await?;
        for (device, seq) in effects.feed_grew {
            self.feed_watch(&device).send_if_modified(|s| {
                let grew = *s < seq;
                *s = (*s).max(seq);
                grew
            });
            self.inner.notifier.hint(&device, HintKind::Feed, seq);
        }
        for event in effects.events {
            if let OpsEvent::DeviceDisabled { device_id, .. }
            | OpsEvent::DeviceInvalidated { device_id, .. } = &event
            {
                self.revoke(device_id);
            }
            if let OpsEvent::DeviceInvalidated { device_id, .. } = &event {
                // Tell the device now, so it stops and registers again: its next request is
                // refused with the reason. Its long-polls wake too.
                let watch = self.feed_watch(device_id);
                watch.send_modify(|_| {});
                let newest = *watch.borrow();
                self.inner
                    .notifier
                    .hint(device_id, HintKind::PollNow, newest);
            }
        }
        self.inner
            .reaper
            .deadline_changed(|| self.core().next_deadline());
        Ok(())
    }

    /// Closes a disabled or invalidated device's open connections: its data-channel
    /// connections (each is told why) and its MQTT session on the embedded broker, whose
    /// persistent session is forgotten. Its credentials are refused from then on.
    fn revoke(&self, device: &DeviceId) {
        let closed = self.inner.data_sessions.close_all(device);
        if let Some(embedded) = self.inner.embedded.get().cloned() {
            let device = device.clone();
            // The router's queue may be full for a moment: wait on a blocking thread.
            tokio::task::spawn_blocking(move || {
                if let Err(e) = embedded.disconnect(device.as_str()) {
                    tracing::error!(%device, error = %e, "could not close the MQTT session");
                }
            });
        }
        tracing::info!(%device, data_connections = closed, "device's connections closed");
    }

    /// The embedded broker, for session control and health (once, at start-up).
    pub fn attach_broker(&self, embedded: broker::EmbeddedBroker) {
        let _ = self.inner.embedded.set(embedded);
    }

    pub fn embedded_broker(&self) -> Option<&broker::EmbeddedBroker> {
        self.inner.embedded.get()
    }

    /// Why the MQTT broker does not serve, if it does not: the embedded broker's router or
    /// watchdog failed, or the external broker has been unreachable for 10 s.
    pub fn broker_problem(&self) -> Option<String> {
        if let Some(broker::BrokerHealth::Down(reason)) = self.embedded_broker().map(|b| b.health())
        {
            return Some(format!("embedded MQTT broker: {reason}"));
        }
        if self.broker_mode() == "external"
            && let Some((down, error)) = self
                .notifier()
                .stats()
                .external_outage(std::time::Duration::from_secs(10))
        {
            return Some(format!(
                "external MQTT broker unreachable for {} s: {error}",
                down.as_secs()
            ));
        }
        None
    }

    /// Registers an open data-channel connection of `device`, closed by [`Self::revoke`].
    pub fn data_session(&self, device: &DeviceId) -> DataSession {
        self.inner.data_sessions.open(device)
    }

    /// Why `device` may no longer use its connections, if it may not.
    pub fn refusal(&self, device: &DeviceId) -> Option<CoreError> {
        self.core().check_active(device).err()
    }

    /// Waits until everything `ticket` covers is durable (before answering a read with it).
    pub(crate) async fn durable_read(&self, ticket: Ticket) -> CoreResult<()> {
        Ok(self.inner.committer.wait_durable(ticket).await?)
    }

    /// Wakes the device's long-polls, so that they look again (a device disabled meanwhile).
    pub(crate) fn wake_long_polls(&self, device: &DeviceId) {
        self.feed_watch(device).send_modify(|_| {});
    }

    /// Closes the open MQTT sessions of a revoked ops login (on the embedded broker).
    pub(crate) async fn close_ops_sessions(&self, id: &schemas::OpsId) -> CoreResult<()> {
        let Some(embedded) = self.inner.embedded.get().cloned() else {
            return Ok(());
        };
        let login = id.as_str().to_owned();
        let closed = tokio::task::spawn_blocking(move || embedded.disconnect_login(&login))
            .await
            .map_err(|e| CoreError::new(ErrorCode::Internal, e.to_string()))?;
        match closed {
            Ok(n) => tracing::info!(ops_login = %id, sessions = n, "ops login revoked"),
            Err(e) => tracing::error!(ops_login = %id, error = %e, "could not close its sessions"),
        }
        Ok(())
    }

    pub(crate) fn feed_watch(&self, device: &DeviceId) -> watch::Sender<FeedSeq> {
        let mut feeds = self.inner.feeds.lock().unwrap_or_else(|p| p.into_inner());
        feeds
            .entry(device.clone())
            .or_insert_with(|| watch::channel(FeedSeq::ZERO).0)
            .clone()
    }

    // ---------------------------------------------------------------- registry

    /// Registers a device; returns its record and its secret (to be given to it once).
    pub async fn register(&self, reg: &Registration) -> CoreResult<(DeviceRecord, Secret)> {
        let secret = Secret::from_random(rand::random());
        let id = DeviceId::from_random(rand::random());
        let (device, ticket, effects) = self.core().register(reg, id, &secret, self.now())?;
        self.finish(ticket, effects).await?;
        Ok((device, secret))
    }

    pub fn authenticate(&self, device_id: &str, secret: &str) -> Result<DeviceRecord, AuthFailure> {
        self.core().authenticate(device_id, secret)
    }

    /// Whether a device may still use its data channel (it may be disabled meanwhile).
    pub fn is_active(&self, device_id: &DeviceId) -> bool {
        self.core().check_active(device_id).is_ok()
    }

    /// Runs a read of the core and waits until what it saw is durable.
    pub(crate) async fn read<T>(&self, f: impl FnOnce(&Core) -> CoreResult<T>) -> CoreResult<T> {
        let (value, ticket) = {
            let core = self.core();
            (f(core)?, core.read_ticket())
        };
        self.durable_read(ticket).await?;
        Ok(value)
    }

    // ---------------------------------------------------------------- data channel

    /// Serves one data-channel request of an authenticated device.
    pub async fn handle(&self, device: &DeviceId, request: Request) -> CoreResult<Response> {
        self.inner.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let result = self.handle_inner(device, request).await;
        if result.is_err() {
            self.inner
                .metrics
                .request_errors
                .fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    pub fn data_connected(&self, device: &DeviceId, up: bool) {
        let at = self.now();
        let event = if up {
            self.inner
                .metrics
                .data_connections
                .fetch_add(1, Ordering::Relaxed);
            self.inner
                .metrics
                .data_connections_open
                .fetch_add(1, Ordering::Relaxed);
            OpsEvent::DeviceOnline {
                device_id: device.clone(),
                channel: Channel::Data,
                at,
            }
        } else {
            self.inner
                .metrics
                .data_connections_open
                .fetch_sub(1, Ordering::Relaxed);
            OpsEvent::DeviceOffline {
                device_id: device.clone(),
                channel: Channel::Data,
                at,
            }
        };
        self.core().observe(event);
    }
}

/// What a change of the core answers: its answer and the ticket to wait on, and the effects
/// when it has any (see [`Bridge::change`]).
pub(crate) trait Change {
    type Answer;
    fn split(self) -> (Self::Answer, Ticket, Effects);
}

impl<T> Change for (T, Ticket) {
    type Answer = T;
    fn split(self) -> (T, Ticket, Effects) {
        (self.0, self.1, Effects::default())
    }
}

impl Change for (Ticket, Effects) {
    type Answer = ();
    fn split(self) -> ((), Ticket, Effects) {
        ((), self.0, self.1)
    }
}

impl<T> Change for (T, Ticket, Effects) {
    type Answer = T;
    fn split(self) -> (T, Ticket, Effects) {
        self
    }
}
