//! The notifier: hints and ops events out to MQTT, presence announcements in.
//!
//! Hints are **coalesced, never dropped**: a hint only says "your feed now reaches seq N", so
//! the [`Outbox`] keeps at most one pending hint per device (the newest) and publishes devices in
//! the order they became dirty. Memory is bounded by the number of devices, and under overload
//! hints merge instead of piling up. Ops events are observations: they wait in a bounded queue,
//! and an overflow is **dropped and counted**.
//!
//! Two backends drain the outbox: the embedded broker's in-process link (on a thread of its
//! own, since rumqttd's publish blocks while its router is busy), or any MQTT 3.1.1 broker
//! through rumqttc. Both also deliver presence announcements to a [`PresenceSink`] (the
//! bridge).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use pacing::Backoff;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use schemas::hint::{Hint, HintKind, MAX_HINT_BYTES, Presence};
use schemas::ops::OpsEvent;
use schemas::{DeviceId, FeedSeq, topics};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One MQTT publish.
#[derive(Debug)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    /// Hints go at QoS 1 to persistent sessions; ops events at QoS 0.
    pub qos1: bool,
}

#[derive(Debug, Default)]
pub struct NotifierStats {
    pub hints_queued: AtomicU64,
    /// Hints merged into one already waiting for the same device.
    pub hints_coalesced: AtomicU64,
    pub events_queued: AtomicU64,
    pub events_dropped: AtomicU64,
    /// Publishes the broker took and did not take: hints and ops events together, then hints
    /// alone.
    pub published: AtomicU64,
    pub publish_failed: AtomicU64,
    pub hints_published: AtomicU64,
    pub hints_failed: AtomicU64,
    pub presence_received: AtomicU64,
    pub presence_dropped: AtomicU64,
    /// External broker: since when (ms since the epoch) the link has been down, 0 while it is
    /// up; and the last error.
    external_down_since: AtomicU64,
    external_error: std::sync::Mutex<Option<String>>,
}

impl NotifierStats {
    /// Counts one publish: a hint (QoS 1) or an ops event, taken by the broker or not.
    fn count_publish(&self, hint: bool, ok: bool) {
        let (all, hints) = if ok {
            (&self.published, &self.hints_published)
        } else {
            (&self.publish_failed, &self.hints_failed)
        };
        all.fetch_add(1, Ordering::Relaxed);
        if hint {
            hints.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl NotifierStats {
    fn external_down(&self, error: String) {
        let _ = self.external_down_since.compare_exchange(
            0,
            schemas::UnixMillis::now().0.max(1),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        *self
            .external_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(error);
    }

    fn external_up(&self) {
        self.external_down_since.store(0, Ordering::Release);
    }

    /// How long the link to the external broker has been down, and why, when it has been down
    /// for at least `grace` (a reconnect takes a moment; a broker restart should not page).
    pub fn external_outage(&self, grace: Duration) -> Option<(Duration, String)> {
        let since = self.external_down_since.load(Ordering::Acquire);
        if since == 0 {
            return None;
        }
        let down = Duration::from_millis(schemas::UnixMillis::now().0.saturating_sub(since));
        let error = self
            .external_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "not connected yet".into());
        (down >= grace).then_some((down, error))
    }
}

#[derive(Debug, Default)]
struct Queue {
    hints: HashMap<DeviceId, Hint>,
    dirty: VecDeque<DeviceId>,
    events: VecDeque<Outgoing>,
    closed: bool,
}

impl Queue {
    fn is_empty(&self) -> bool {
        self.dirty.is_empty() && self.events.is_empty()
    }

    /// Up to `max` publishes: waiting events first, then the oldest dirty devices' hints.
    fn take(&mut self, max: usize) -> Vec<Outgoing> {
        let mut out = Vec::with_capacity(max.min(self.events.len() + self.dirty.len()));
        while out.len() < max {
            let Some(event) = self.events.pop_front() else {
                break;
            };
            out.push(event);
        }
        while out.len() < max {
            let Some(device) = self.dirty.pop_front() else {
                break;
            };
            let Some(hint) = self.hints.remove(&device) else {
                continue;
            };
            let Ok(payload) = schemas::encode(&hint) else {
                continue;
            };
            debug_assert!(payload.len() <= MAX_HINT_BYTES);
            out.push(Outgoing {
                topic: topics::notify(&device),
                payload,
                qos1: true,
            });
        }
        out
    }
}

/// What waits to be published.
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    ready: Condvar,
    ready_async: Notify,
    event_capacity: usize,
    stats: NotifierStats,
}

/// Publishes taken from the outbox at once.
const BATCH: usize = 256;

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self) {
        self.ready.notify_one();
        self.ready_async.notify_one();
    }

    fn push_hint(&self, device: &DeviceId, hint: Hint) {
        let mut q = self.lock();
        let Queue { hints, dirty, .. } = &mut *q;
        match hints.entry(device.clone()) {
            Entry::Occupied(mut waiting) => {
                if hint.seq >= waiting.get().seq {
                    waiting.insert(hint);
                }
                self.stats.hints_coalesced.fetch_add(1, Ordering::Relaxed);
            }
            Entry::Vacant(slot) => {
                slot.insert(hint);
                dirty.push_back(device.clone());
                self.stats.hints_queued.fetch_add(1, Ordering::Relaxed);
            }
        }
        drop(q);
        self.wake();
    }

    fn push_event(&self, out: Outgoing) {
        let mut q = self.lock();
        if q.events.len() >= self.event_capacity {
            self.stats.events_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.events.push_back(out);
        self.stats.events_queued.fetch_add(1, Ordering::Relaxed);
        drop(q);
        self.wake();
    }

    /// Waits on this thread for publishes; `None` once closed and empty.
    pub fn next_blocking(&self) -> Option<Vec<Outgoing>> {
        let mut q = self.lock();
        loop {
            if !q.is_empty() {
                return Some(q.take(BATCH));
            }
            if q.closed {
                return None;
            }
            q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits for publishes; `None` once closed and empty.
    pub async fn next(&self) -> Option<Vec<Outgoing>> {
        loop {
            let notified = self.ready_async.notified();
            {
                let mut q = self.lock();
                if !q.is_empty() {
                    return Some(q.take(BATCH));
                }
                if q.closed {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Wakes the consumers to finish: what is queued is still handed out, then `None`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
        self.ready_async.notify_waiters();
        self.ready_async.notify_one();
    }
}

/// A cheap handle to the outbox.
#[derive(Debug, Clone)]
pub struct Notifier {
    outbox: Arc<Outbox>,
}

impl Notifier {
    /// `event_capacity` bounds the ops events waiting to be published.
    pub fn new(event_capacity: usize) -> Notifier {
        Notifier {
            outbox: Arc::new(Outbox {
                queue: Mutex::new(Queue::default()),
                ready: Condvar::new(),
                ready_async: Notify::new(),
                event_capacity,
                stats: NotifierStats::default(),
            }),
        }
    }

    pub fn outbox(&self) -> Arc<Outbox> {
        self.outbox.clone()
    }

    pub fn stats(&self) -> &NotifierStats {
        &self.outbox.stats
    }

    /// Waiting to be published: (devices with a hint, ops events).
    pub fn depth(&self) -> (usize, usize) {
        let queue = self.outbox.queue.lock().unwrap_or_else(|p| p.into_inner());
        (queue.hints.len(), queue.events.len())
    }

    pub fn hint(&self, device: &DeviceId, kind: HintKind, seq: FeedSeq) {
        self.outbox.push_hint(device, Hint::new(kind, seq));
    }

    pub fn ops(&self, event: &OpsEvent) {
        self.outbox.push_event(Outgoing {
            topic: event.topic(),
            payload: event.to_json(),
            qos1: false,
        });
    }
}

/// The device and presence of a message on a presence topic; `None` for anything else.
pub fn parse_presence(topic: &[u8], payload: &[u8]) -> Option<(DeviceId, Presence)> {
    let device = topics::parse_presence(std::str::from_utf8(topic).ok()?)?;
    let presence = schemas::codec::decode_limited::<Presence>(payload, MAX_HINT_BYTES).ok()?;
    Some((device, presence))
}

/// Who hears the devices' presence announcements (the bridge). Called on the MQTT reader's
/// task: it must not block.
pub trait PresenceSink: Send + Sync + 'static {
    fn presence(&self, device: &DeviceId, presence: Presence);
}

/// Hands a presence announcement on without blocking the MQTT reader.
fn deliver_presence(sink: &dyn PresenceSink, stats: &NotifierStats, topic: &[u8], payload: &[u8]) {
    stats.presence_received.fetch_add(1, Ordering::Relaxed);
    match parse_presence(topic, payload) {
        Some((device, presence)) => sink.presence(&device, presence),
        None => {
            stats.presence_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Drains the outbox into the embedded broker and reads presence from it.
pub async fn run_embedded(
    link: broker::BridgeLink,
    notifier: Notifier,
    sink: Arc<dyn PresenceSink>,
    shutdown: CancellationToken,
) {
    let broker::BridgeLink {
        tx: mut link_tx,
        rx: mut link_rx,
    } = link;
    let outbox = notifier.outbox();
    if let Err(e) = link_tx.try_subscribe(topics::PRESENCE_FILTER) {
        tracing::error!(error = %e, "cannot subscribe to presence on the embedded broker");
    }
    // Ops events are published whether or not anyone watches. Upstream rumqttd compared a topic
    // nobody subscribes to with every filter (one per device) on every publish, so the bridge
    // used to subscribe to its own ops events; the vendored rumqttd compares a new topic only
    // with the filter equal to it and the wildcard filters (vendor/rumqttd/PATCHES.md), and an
    // unwatched event costs the router no delivery at all.
    let reader_sink = sink.clone();
    let reader_outbox = outbox.clone();
    let reader_shutdown = shutdown.clone();
    let reader = tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                n = link_rx.next() => n,
                _ = reader_shutdown.cancelled() => return,
            };
            match next {
                Ok(Some(broker::Notification::Forward(f))) => deliver_presence(
                    &*reader_sink,
                    &reader_outbox.stats,
                    &f.publish.topic,
                    &f.publish.payload,
                ),
                Ok(Some(broker::Notification::Unschedule)) => {
                    if link_rx.wake().await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "embedded broker link closed");
                    return;
                }
            }
        }
    });
    // rumqttd's publish blocks while its router is busy. Run it on a thread of its own: the
    // router's backpressure then holds up only this thread while hints coalesce in the outbox.
    let writer_outbox = outbox.clone();
    let writer = std::thread::Builder::new()
        .name("hint-publisher".into())
        .spawn(move || {
            while let Some(batch) = writer_outbox.next_blocking() {
                for out in batch {
                    let hint = out.qos1;
                    let ok = link_tx.publish(out.topic, out.payload).is_ok();
                    writer_outbox.stats.count_publish(hint, ok);
                }
            }
        });
    if let Err(e) = writer {
        tracing::error!(error = %e, "cannot start the hint publisher thread");
    }
    shutdown.cancelled().await;
    outbox.close();
    reader.abort();
}

/// Where an external broker is and how to log in to it.
#[derive(Debug, Clone)]
pub struct ExternalBroker {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<schemas::Secret>,
    /// `mqtts://`: the broker is verified with this.
    pub tls: Option<std::sync::Arc<tls::rustls::ClientConfig>>,
}

/// Drains the outbox into an external MQTT broker and reads presence from it. Reconnects with
/// exponential backoff and jitter (rumqttc alone would retry at once, in a tight loop).
pub async fn run_external(
    cfg: ExternalBroker,
    notifier: Notifier,
    sink: Arc<dyn PresenceSink>,
    shutdown: CancellationToken,
) {
    let outbox = notifier.outbox();
    let mut opts = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    opts.set_max_packet_size(64 * 1024, 64 * 1024);
    if let Some(config) = &cfg.tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(config.clone()),
        ));
    }
    if let Some(user) = &cfg.username {
        let pass = cfg
            .password
            .as_ref()
            .map(|p| p.expose().to_owned())
            .unwrap_or_default();
        opts.set_credentials(user.clone(), pass);
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 1024);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(5);
    eventloop.set_network_options(net);

    let driver_shutdown = shutdown.clone();
    let driver_client = client.clone();
    let driver_outbox = outbox.clone();
    outbox.stats.external_down("not connected yet".into());
    let driver = tokio::spawn(async move {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let event = tokio::select! {
                e = eventloop.poll() => e,
                _ = driver_shutdown.cancelled() => return,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff.reset();
                    driver_outbox.stats.external_up();
                    tracing::info!(host = %cfg.host, port = cfg.port, "connected to external MQTT broker");
                    // Subscriptions do not survive a clean session: subscribe on every ConnAck.
                    if let Err(e) =
                        driver_client.try_subscribe(topics::PRESENCE_FILTER, QoS::AtLeastOnce)
                    {
                        tracing::warn!(error = %e, "cannot subscribe to presence");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    deliver_presence(&*sink, &driver_outbox.stats, p.topic.as_bytes(), &p.payload);
                }
                Ok(_) => {}
                Err(e) => {
                    let delay = backoff.next_delay();
                    driver_outbox.stats.external_down(e.to_string());
                    tracing::warn!(error = %e, ?delay, "external MQTT broker unreachable; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = driver_shutdown.cancelled() => return,
                    }
                }
            }
        }
    });
    // While the broker is unreachable rumqttc's request queue fills and `publish` waits; hints
    // meanwhile coalesce in the outbox, one per device.
    'publishing: loop {
        let batch = tokio::select! {
            batch = outbox.next() => batch,
            _ = shutdown.cancelled() => None,
        };
        let Some(batch) = batch else { break };
        for out in batch {
            let qos = if out.qos1 {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            };
            let published = tokio::select! {
                r = client.publish(out.topic, qos, false, out.payload) => r,
                _ = shutdown.cancelled() => break 'publishing,
            };
            outbox.stats.count_publish(out.qos1, published.is_ok());
        }
    }
    let _ = client.try_disconnect();
    driver.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(n: u8) -> DeviceId {
        DeviceId::from_random([n; 8])
    }

    fn decode(out: &Outgoing) -> Hint {
        schemas::decode(&out.payload).unwrap()
    }

    #[test]
    fn hints_for_one_device_coalesce_to_the_newest_in_dirty_order() {
        let notifier = Notifier::new(10);
        let (a, b) = (device(1), device(2));
        notifier.hint(&a, HintKind::Feed, FeedSeq(1));
        notifier.hint(&b, HintKind::Feed, FeedSeq(7));
        notifier.hint(&a, HintKind::Feed, FeedSeq(3));
        notifier.hint(&a, HintKind::Pending, FeedSeq(2));
        let batch = notifier.outbox().next_blocking().unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[0].topic, topics::notify(&a));
        assert_eq!(
            decode(&batch[0]).seq,
            FeedSeq(3),
            "the newest sequence number wins"
        );
        assert_eq!(decode(&batch[1]).seq, FeedSeq(7));
        assert_eq!(notifier.stats().hints_coalesced.load(Ordering::Relaxed), 2);
        // Published hints are gone; a new one dirties the device again.
        notifier.hint(&a, HintKind::Feed, FeedSeq(4));
        assert_eq!(notifier.outbox().next_blocking().unwrap().len(), 1);
    }

    #[test]
    fn events_are_bounded_and_overflow_is_counted() {
        let notifier = Notifier::new(2);
        let event = OpsEvent::DeviceDisabled {
            device_id: device(1),
            at: schemas::UnixMillis(0),
        };
        for _ in 0..5 {
            notifier.ops(&event);
        }
        assert_eq!(notifier.stats().events_dropped.load(Ordering::Relaxed), 3);
        notifier.hint(&device(9), HintKind::Feed, FeedSeq(1));
        let batch = notifier.outbox().next_blocking().unwrap();
        assert_eq!(batch.len(), 3, "two events, then the hint");
        assert!(!batch[0].qos1 && batch[2].qos1);
    }

    #[tokio::test]
    async fn close_hands_out_what_is_left_then_ends() {
        let notifier = Notifier::new(4);
        notifier.hint(&device(1), HintKind::Feed, FeedSeq(1));
        let outbox = notifier.outbox();
        outbox.close();
        assert_eq!(outbox.next().await.map(|b| b.len()), Some(1));
        assert!(outbox.next().await.is_none());
        assert!(outbox.next_blocking().is_none());
    }
}
