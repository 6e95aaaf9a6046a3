//! The device's notification link: a persistent MQTT session on its own topic.
//!
//! Client id = username = device id; `clean_session = false` so hints published while the
//! device is briefly away are queued by the broker; re-subscribe on every ConnAck anyway (a
//! broker restart forgets sessions); announce presence after subscribing, which triggers push
//! on connect; a last will announces the device offline. TCP_NODELAY on.
//!
//! Brokers are tried in order, best first: a broker that cannot be reached is skipped for
//! the next at once; after a whole round without success, or after a working link drops,
//! the link waits with exponential backoff and jitter (rumqttc alone retries at once) and
//! starts again from the best. While connected to any but the best, it tries the better ones
//! every `probe_interval` in the background and moves over as soon as one answers, closing
//! the old link cleanly (no last will).
//!
//! A broker that refuses the login with a CONNACK return code (bad credentials, not
//! authorized, identifier rejected) has answered, not failed: the next broker is not tried,
//! the link reports [`LinkEvent::Refused`] and asks the same broker again only after the longest
//! backoff (an operator may provision the device's credentials meanwhile). The data channel
//! tells the agent why.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use pacing::{Backoff, jitter, spread};
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};
use schemas::agent::Credentials;
use schemas::hint::{Hint, MAX_HINT_BYTES, Presence};
use schemas::settings::{MqttEndpoint, parse_mqtt_endpoint};
use schemas::topics;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the link tells the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// Connected (or moved) to `endpoint`.
    Up {
        endpoint: String,
    },
    Down(String),
    /// The broker refused the login; the link asks again after the longest backoff.
    Refused(String),
    Hint(Hint),
}

#[derive(Debug, Clone)]
pub struct MqttSettings {
    /// Brokers, `host:port`, best first; at least one.
    pub endpoints: Vec<String>,
    pub keep_alive: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// After a working link drops, the first reconnect waits a random time up to this long.
    pub reconnect_spread: Duration,
    /// While on any broker but the best, how often to try the better ones.
    pub probe_interval: Duration,
    /// How `mqtts://` brokers are verified; `None`: they cannot be used.
    pub tls: Option<std::sync::Arc<tls::rustls::ClientConfig>>,
}

/// How long a connection attempt (TCP, CONNECT, CONNACK) may take. Long: a broker busy with
/// a storm of reconnects may answer late, and an attempt given up while its CONNECT still
/// waits in the broker's queue makes the broker see the client twice (a takeover, and a last
/// will announcing the device offline).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// One connection to one broker.
struct Link {
    index: usize,
    client: AsyncClient,
    eventloop: EventLoop,
    up: bool,
}

impl Link {
    fn new(settings: &MqttSettings, credentials: &Credentials, index: usize) -> Link {
        let id = credentials.device_id.as_str().to_owned();
        // Checked when the settings were applied; a bad one fails to connect and is skipped.
        let endpoint = parse_mqtt_endpoint(&settings.endpoints[index]).unwrap_or(MqttEndpoint {
            host: String::new(),
            port: 0,
            tls: false,
        });
        let offline = schemas::encode(&Presence::Offline).unwrap_or_default();
        // mqtts:// with nothing to verify the broker with (the agent logged why): port 0,
        // which fails like an unreachable broker, never a fall back to plain text.
        let tls = endpoint.tls.then(|| settings.tls.clone());
        let port = if matches!(tls, Some(None)) {
            0
        } else {
            endpoint.port
        };
        let mut opts = MqttOptions::new(id.clone(), endpoint.host.clone(), port);
        if let Some(Some(config)) = tls {
            opts.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(config),
            ));
        }
        opts.set_credentials(id, credentials.secret.expose().to_owned());
        opts.set_clean_session(false);
        opts.set_keep_alive(settings.keep_alive);
        opts.set_max_packet_size(4 * 1024, 4 * 1024);
        opts.set_last_will(LastWill::new(
            topics::presence(&credentials.device_id),
            offline,
            QoS::AtLeastOnce,
            false,
        ));
        let (client, mut eventloop) = AsyncClient::new(opts, 16);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(CONNECT_TIMEOUT.as_secs());
        eventloop.set_network_options(net);
        Link {
            index,
            client,
            eventloop,
            up: false,
        }
    }

    /// Subscribes and announces presence (which makes the cloud push what is waiting).
    fn on_connected(&mut self, credentials: &Credentials) {
        self.up = true;
        let online = schemas::encode(&Presence::Online).unwrap_or_default();
        // The request queue holds 16; these two are the only requests we make.
        let _ = self
            .client
            .try_subscribe(topics::notify(&credentials.device_id), QoS::AtLeastOnce);
        let _ = self.client.try_publish(
            topics::presence(&credentials.device_id),
            QoS::AtLeastOnce,
            false,
            online,
        );
    }

    /// Closes the link with a DISCONNECT, so the broker does not publish the last will.
    async fn close(mut self) {
        let _ = self.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Ok(e) = self.eventloop.poll().await {
                if matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// Connects to the first of `endpoints[..upto]` that answers with a CONNACK.
async fn probe_better(
    settings: MqttSettings,
    credentials: Credentials,
    upto: usize,
) -> Option<Link> {
    for index in 0..upto {
        let mut link = Link::new(&settings, &credentials, index);
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
            loop {
                match link.eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        })
        .await;
        if connected == Ok(true) {
            return Some(link);
        }
    }
    None
}

type Probe = Pin<Box<dyn Future<Output = Option<Link>> + Send>>;

/// Makes the probe's connection the link: the old one is closed cleanly in the background (if
/// it still stands), the new one subscribed and announced. Returns its endpoint.
fn adopt(
    link: &mut Link,
    better: Link,
    settings: &MqttSettings,
    credentials: &Credentials,
) -> String {
    let old = std::mem::replace(link, better);
    tokio::spawn(old.close());
    link.on_connected(credentials);
    let endpoint = settings.endpoints[link.index].clone();
    tracing::info!(%endpoint, "moved to a better broker");
    endpoint
}

/// Runs the link until `shutdown`, reporting to `events`.
pub async fn run(
    settings: MqttSettings,
    credentials: Credentials,
    events: mpsc::Sender<LinkEvent>,
    shutdown: CancellationToken,
) {
    if settings.endpoints.is_empty() {
        return;
    }
    let notify = topics::notify(&credentials.device_id);
    let mut backoff = Backoff::new(settings.backoff_min, settings.backoff_max);
    let mut link = Link::new(&settings, &credentials, 0);
    let mut probe_at: Option<Instant> = None;
    let mut probe: Option<Probe> = None;
    let schedule =
        |index: usize| (index > 0).then(|| Instant::now() + jitter(settings.probe_interval));
    loop {
        tokio::select! {
            // A better broker answered: move over before anything else (its CONNECT may have
            // taken over our session, which ends the current link).
            biased;
            _ = shutdown.cancelled() => break,
            better = async { probe.as_mut().expect("guarded").await }, if probe.is_some() => {
                probe = None;
                if let Some(better) = better {
                    let endpoint = adopt(&mut link, better, &settings, &credentials);
                    if events.send(LinkEvent::Up { endpoint }).await.is_err() {
                        break;
                    }
                }
                probe_at = schedule(link.index);
            }
            _ = async { tokio::time::sleep_until(probe_at.expect("guarded")).await }, if probe_at.is_some() && probe.is_none() => {
                probe_at = None;
                probe = Some(Box::pin(probe_better(settings.clone(), credentials.clone(), link.index)));
            }
            event = link.eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff.reset();
                    link.on_connected(&credentials);
                    probe_at = schedule(link.index);
                    let endpoint = settings.endpoints[link.index].clone();
                    if events.send(LinkEvent::Up { endpoint }).await.is_err() {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == notify => {
                    if p.payload.len() > MAX_HINT_BYTES {
                        tracing::warn!(len = p.payload.len(), "oversize hint ignored");
                        continue;
                    }
                    match schemas::codec::decode_limited::<Hint>(&p.payload, MAX_HINT_BYTES) {
                        Ok(hint) => {
                            if events.send(LinkEvent::Hint(hint)).await.is_err() {
                                break;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "undecodable hint ignored"),
                    }
                }
                Ok(_) => {}
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                    let endpoint = &settings.endpoints[link.index];
                    let reason = format!("{endpoint} refused the login: {code:?}");
                    let delay = jitter(settings.backoff_max);
                    tracing::warn!(%reason, ?delay, "MQTT login refused; trying this broker again later");
                    probe = None;
                    probe_at = None;
                    if events.send(LinkEvent::Refused(reason)).await.is_err() {
                        break;
                    }
                    // Not the next broker: this one has answered. Ask it again only after the
                    // longest backoff (an operator may provision the credentials meanwhile).
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    link = Link::new(&settings, &credentials, link.index);
                }
                Err(e) => {
                    // A probe under way may be what ended this link (a takeover of our
                    // session through another address of the same broker): let it finish.
                    if let Some(pending) = probe.take() {
                        let better = tokio::select! {
                            b = pending => b,
                            _ = shutdown.cancelled() => break,
                        };
                        if let Some(better) = better {
                            let endpoint = adopt(&mut link, better, &settings, &credentials);
                            probe_at = schedule(link.index);
                            if events.send(LinkEvent::Up { endpoint }).await.is_err() {
                                break;
                            }
                            continue;
                        }
                    }
                    probe_at = None;
                    let was_up = link.up;
                    if was_up && events.send(LinkEvent::Down(e.to_string())).await.is_err() {
                        break;
                    }
                    // After a working link drops, start again from the best; otherwise try
                    // the next, and wait only when a whole round has failed.
                    let next = if was_up { 0 } else { (link.index + 1) % settings.endpoints.len() };
                    if was_up || next == 0 {
                        let delay = if was_up {
                            // The whole fleet may have lost the broker at this instant.
                            spread(settings.reconnect_spread)
                        } else {
                            backoff.next_delay()
                        };
                        tracing::debug!(error = %e, ?delay, "MQTT link down; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = shutdown.cancelled() => break,
                        }
                    } else {
                        tracing::debug!(error = %e, endpoint = %settings.endpoints[link.index], "broker unreachable; trying the next");
                    }
                    link = Link::new(&settings, &credentials, next);
                }
            }
        }
    }
    // A clean disconnect suppresses the last will; the agent is stopping on purpose.
    link.close().await;
}
