//! The device's notification link: a persistent MQTT session on its own topic.
//!
//! Client id = username = device id; `clean_session = false` so hints published while the
//! device is briefly away are queued by the broker; re-subscribe on every ConnAck anyway (a
//! broker restart forgets sessions); announce presence after subscribing, which triggers push
//! on connect; a last will announces the device offline. TCP_NODELAY on. Reconnects with
//! exponential backoff and jitter, since rumqttc alone retries at once.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use schemas::agent::Credentials;
use schemas::hint::{Hint, MAX_HINT_BYTES, Presence};
use schemas::topics;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;

/// What the link tells the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    Up,
    Down(String),
    Hint(Hint),
}

#[derive(Debug, Clone)]
pub struct MqttSettings {
    pub host: String,
    pub port: u16,
    pub keep_alive: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

/// Runs the link until `shutdown`, reporting to `events`.
pub async fn run(
    settings: MqttSettings,
    credentials: Credentials,
    events: mpsc::Sender<LinkEvent>,
    shutdown: CancellationToken,
) {
    let id = credentials.device_id.as_str().to_owned();
    let notify = topics::notify(&credentials.device_id);
    let presence = topics::presence(&credentials.device_id);
    let offline = schemas::encode(&Presence::Offline).unwrap_or_default();
    let online = schemas::encode(&Presence::Online).unwrap_or_default();

    let mut opts = MqttOptions::new(id.clone(), settings.host.clone(), settings.port);
    opts.set_credentials(id.clone(), credentials.secret.expose().to_owned());
    opts.set_clean_session(false);
    opts.set_keep_alive(settings.keep_alive);
    opts.set_max_packet_size(4 * 1024, 4 * 1024);
    opts.set_last_will(LastWill::new(
        presence.clone(),
        offline,
        QoS::AtLeastOnce,
        false,
    ));
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(10);
    eventloop.set_network_options(net);

    let mut backoff = Backoff::new(settings.backoff_min, settings.backoff_max);
    let mut up = false;
    loop {
        let event = tokio::select! {
            e = eventloop.poll() => e,
            _ = shutdown.cancelled() => break,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                // The request queue holds 16; these two are the only requests we make.
                let _ = client.try_subscribe(notify.clone(), QoS::AtLeastOnce);
                let _ =
                    client.try_publish(presence.clone(), QoS::AtLeastOnce, false, online.clone());
                up = true;
                if events.send(LinkEvent::Up).await.is_err() {
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
            Err(e) => {
                if up {
                    up = false;
                    if events.send(LinkEvent::Down(e.to_string())).await.is_err() {
                        break;
                    }
                }
                let delay = backoff.next_delay();
                tracing::debug!(error = %e, ?delay, "MQTT link down; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    // A clean disconnect suppresses the last will; the agent is stopping on purpose.
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Ok(e) = eventloop.poll().await {
            if matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
}
