//! The notifier: hints and ops events out to MQTT, presence announcements in.
//!
//! [`Notifier`] is a handle over a bounded queue. Overflow policy: **drop and count**. A hint
//! is never the only copy of anything (the device catches up by cursor), and an ops event is
//! an observation; neither may hold up a job submission.
//!
//! Two backends drain the queue: the embedded broker's in-process link, or any MQTT 3.1.1
//! broker through rumqttc. Both also deliver presence announcements to the bridge.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use schemas::hint::{Hint, HintKind, MAX_HINT_BYTES, Presence};
use schemas::ops::OpsEvent;
use schemas::{DeviceId, FeedSeq, topics};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bridge::Bridge;

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
    pub hints_dropped: AtomicU64,
    pub events_queued: AtomicU64,
    pub events_dropped: AtomicU64,
    pub published: AtomicU64,
    pub publish_failed: AtomicU64,
    pub presence_received: AtomicU64,
    pub presence_dropped: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct Notifier {
    tx: mpsc::Sender<Outgoing>,
    stats: Arc<NotifierStats>,
}

impl Notifier {
    pub fn channel(capacity: usize) -> (Notifier, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(capacity);
        (
            Notifier {
                tx,
                stats: Arc::new(NotifierStats::default()),
            },
            rx,
        )
    }

    pub fn stats(&self) -> &NotifierStats {
        &self.stats
    }

    pub fn hint(&self, device: &DeviceId, kind: HintKind, seq: FeedSeq) {
        let Ok(payload) = schemas::encode(&Hint::new(kind, seq)) else {
            return;
        };
        debug_assert!(payload.len() <= MAX_HINT_BYTES);
        let out = Outgoing {
            topic: topics::notify(device),
            payload,
            qos1: true,
        };
        if self.tx.try_send(out).is_ok() {
            self.stats.hints_queued.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.hints_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn ops(&self, event: &OpsEvent) {
        let out = Outgoing {
            topic: event.topic(),
            payload: event.to_json(),
            qos1: false,
        };
        if self.tx.try_send(out).is_ok() {
            self.stats.events_queued.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn parse_presence(topic: &[u8], payload: &[u8]) -> Option<(DeviceId, Presence)> {
    let device = topics::parse_presence(std::str::from_utf8(topic).ok()?)?;
    let presence = schemas::codec::decode_limited::<Presence>(payload, MAX_HINT_BYTES).ok()?;
    Some((device, presence))
}

/// Hands a presence announcement to the bridge without blocking the MQTT reader.
fn deliver_presence(bridge: &Bridge, stats: &NotifierStats, topic: &[u8], payload: &[u8]) {
    stats.presence_received.fetch_add(1, Ordering::Relaxed);
    match parse_presence(topic, payload) {
        Some((device, presence)) => bridge.on_presence(&device, presence),
        None => {
            stats.presence_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Drains the queue into the embedded broker and reads presence from it.
pub async fn run_embedded(
    link: broker::BridgeLink,
    mut rx: mpsc::Receiver<Outgoing>,
    bridge: Bridge,
    shutdown: CancellationToken,
) {
    let broker::BridgeLink {
        tx: mut link_tx,
        rx: mut link_rx,
    } = link;
    let stats = bridge.notifier().stats.clone();
    if let Err(e) = link_tx.try_subscribe(topics::PRESENCE_FILTER) {
        tracing::error!(error = %e, "cannot subscribe to presence on the embedded broker");
    }
    let reader_bridge = bridge.clone();
    let reader_stats = stats.clone();
    let reader_shutdown = shutdown.clone();
    let reader = tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                n = link_rx.next() => n,
                _ = reader_shutdown.cancelled() => return,
            };
            match next {
                Ok(Some(broker::Notification::Forward(f))) => deliver_presence(
                    &reader_bridge,
                    &reader_stats,
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
    // router's backpressure then holds up only this thread, our bounded queue absorbs bursts,
    // and only an overflow of that queue drops (and counts) anything.
    let writer_stats = stats.clone();
    let writer = std::thread::Builder::new()
        .name("hint-publisher".into())
        .spawn(move || {
            while let Some(out) = rx.blocking_recv() {
                match link_tx.publish(out.topic, out.payload) {
                    Ok(_) => writer_stats.published.fetch_add(1, Ordering::Relaxed),
                    Err(_) => writer_stats.publish_failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    if let Err(e) = writer {
        tracing::error!(error = %e, "cannot start the hint publisher thread");
    }
    shutdown.cancelled().await;
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
}

/// Drains the queue into an external MQTT broker and reads presence from it. Reconnects with
/// exponential backoff and jitter (rumqttc alone would retry at once, in a tight loop).
pub async fn run_external(
    cfg: ExternalBroker,
    mut rx: mpsc::Receiver<Outgoing>,
    bridge: Bridge,
    shutdown: CancellationToken,
) {
    let stats = bridge.notifier().stats.clone();
    let mut opts = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    opts.set_max_packet_size(64 * 1024, 64 * 1024);
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
    let driver_stats = stats.clone();
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
                    tracing::info!(host = %cfg.host, port = cfg.port, "connected to external MQTT broker");
                    // Subscriptions do not survive a clean session: subscribe on every ConnAck.
                    if let Err(e) =
                        driver_client.try_subscribe(topics::PRESENCE_FILTER, QoS::AtLeastOnce)
                    {
                        tracing::warn!(error = %e, "cannot subscribe to presence");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    deliver_presence(&bridge, &driver_stats, p.topic.as_bytes(), &p.payload);
                }
                Ok(_) => {}
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, ?delay, "external MQTT broker unreachable; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = driver_shutdown.cancelled() => return,
                    }
                }
            }
        }
    });
    loop {
        let out = tokio::select! {
            out = rx.recv() => out,
            _ = shutdown.cancelled() => None,
        };
        let Some(out) = out else { break };
        let qos = if out.qos1 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        // try_publish: while the broker is unreachable rumqttc's request queue fills, and we
        // drop (hints are not the only copy) rather than let the queue back up.
        match client.try_publish(out.topic, qos, false, out.payload) {
            Ok(()) => stats.published.fetch_add(1, Ordering::Relaxed),
            Err(_) => stats.publish_failed.fetch_add(1, Ordering::Relaxed),
        };
    }
    let _ = client.try_disconnect();
    driver.abort();
}

/// Exponential backoff with full jitter.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        self.attempt = self.attempt.saturating_add(1);
        let cap = exp.min(self.max);
        let millis = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX).max(1);
        Duration::from_millis(rand::random_range(millis / 2..=millis))
    }
}
