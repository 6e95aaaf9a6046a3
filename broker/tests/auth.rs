#![allow(clippy::unwrap_used)]
//! The embedded broker admits a device only with its own id as client id and username and
//! its secret as password.

use std::sync::Arc;
use std::time::Duration;

use broker::{Authenticator, BrokerSettings, EmbeddedBroker, Notification};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

struct OneDevice;

impl Authenticator for OneDevice {
    fn authenticate(&self, client_id: &str, username: &str, password: &str) -> bool {
        client_id == username && username == "dev-a" && password == "right"
    }
}

fn settings() -> BrokerSettings {
    BrokerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..BrokerSettings::default()
    }
}

/// Polls until the first ConnAck or error.
async fn connect(port: u16, client_id: &str, user: &str, pass: &str) -> Result<(), String> {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_credentials(user, pass);
    opts.set_keep_alive(Duration::from_secs(10));
    let (_client, mut eventloop) = AsyncClient::new(opts, 10);
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "timed out".to_string())?
}

#[tokio::test]
async fn refuses_wrong_secret_and_foreign_client_id() {
    let (broker, _link) = EmbeddedBroker::start(&settings(), Arc::new(OneDevice)).unwrap();
    let port = broker.addr().port();
    assert_eq!(connect(port, "dev-a", "dev-a", "right").await, Ok(()));
    assert!(connect(port, "dev-a", "dev-a", "wrong").await.is_err());
    assert!(connect(port, "dev-b", "dev-a", "right").await.is_err());
}

#[tokio::test]
async fn bridge_link_publishes_to_a_device_and_receives_its_messages() {
    let (broker, link) = EmbeddedBroker::start(&settings(), Arc::new(OneDevice)).unwrap();
    let broker::BridgeLink { mut tx, mut rx } = link;
    tx.try_subscribe("devices/+/presence").unwrap();

    let mut opts = MqttOptions::new("dev-a", "127.0.0.1", broker.addr().port());
    opts.set_credentials("dev-a", "right");
    opts.set_clean_session(false);
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    client
        .subscribe("devices/dev-a/notify", QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .publish("devices/dev-a/presence", QoS::AtLeastOnce, false, "hi")
        .await
        .unwrap();

    let device = tokio::spawn(async move {
        loop {
            match eventloop.poll().await.unwrap() {
                Event::Incoming(Packet::SubAck(_)) => {
                    // Subscribed: now the bridge's hint can reach us.
                }
                Event::Incoming(Packet::Publish(p)) => return p.payload,
                _ => {}
            }
        }
    });

    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match rx.next().await.unwrap() {
                Some(Notification::Forward(f)) => return f.publish.topic,
                Some(Notification::Unschedule) => rx.wake().await.unwrap(),
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(&got[..], b"devices/dev-a/presence");

    // The device announced itself after subscribing, so its subscription is in place.
    tx.try_publish("devices/dev-a/notify", "hint").unwrap();
    let payload = tokio::time::timeout(Duration::from_secs(10), device)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&payload[..], b"hint");
}
