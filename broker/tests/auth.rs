#![allow(clippy::unwrap_used)]
//! The embedded broker admits a device only with its own id as client id and username and its
//! secret as password, answers every refusal with its CONNACK return code, lets each login do
//! only what is its own, closes a session on request, and says when it cannot serve.

use std::sync::Arc;
use std::time::Duration;

use broker::{
    Authenticator, BrokerHealth, BrokerSettings, EmbeddedBroker, Login, Notification, Refusal,
};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
    SubscribeReasonCode,
};

/// Devices `dev-a` and `dev-b` (secret `right`), `dev-off` (disabled), and `ops` (`ops-pass`).
struct Fleet;

impl Authenticator for Fleet {
    fn authenticate(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> Result<Login, Refusal> {
        match (username, password) {
            ("ops", "ops-pass") => Ok(Login::Ops("ops".into())),
            ("dev-off", "right") => Err(Refusal::NotAuthorized),
            ("dev-a" | "dev-b", "right") if client_id == username => {
                Ok(Login::Device(username.to_owned()))
            }
            ("dev-a" | "dev-b", "right") => Err(Refusal::IdentifierRejected),
            _ => Err(Refusal::BadCredentials),
        }
    }
}

fn settings() -> BrokerSettings {
    BrokerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        health_interval: Duration::from_millis(100),
        ..BrokerSettings::default()
    }
}

fn options(port: u16, client_id: &str, user: &str, pass: &str) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_credentials(user, pass);
    opts.set_keep_alive(Duration::from_secs(10));
    opts
}

/// Polls until the first ConnAck or error.
async fn first_answer(eventloop: &mut EventLoop) -> Result<bool, ConnectionError> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => return Ok(ack.session_present),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("no answer to CONNECT within 10 s")
}

async fn connect(
    port: u16,
    client_id: &str,
    user: &str,
    pass: &str,
) -> Result<bool, ConnectionError> {
    let (_client, mut eventloop) = AsyncClient::new(options(port, client_id, user, pass), 10);
    first_answer(&mut eventloop).await
}

fn refused_with(result: Result<bool, ConnectionError>) -> ConnectReturnCode {
    match result {
        Err(ConnectionError::ConnectionRefused(code)) => code,
        other => panic!("expected a CONNACK refusal, got {other:?}"),
    }
}

/// The next packet the broker sends, skipping our own outgoing events.
async fn next_incoming(eventloop: &mut EventLoop) -> Result<Packet, ConnectionError> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await? {
                Event::Incoming(p) => return Ok(p),
                Event::Outgoing(_) => {}
            }
        }
    })
    .await
    .expect("nothing from the broker within 10 s")
}

#[tokio::test]
async fn refusals_are_answered_with_their_connack_return_code() {
    let (broker, _link) = EmbeddedBroker::start(&settings(), Arc::new(Fleet)).unwrap();
    let port = broker.addr().port();
    let session_present = connect(port, "dev-a", "dev-a", "right").await.unwrap();
    assert!(!session_present);
    assert_eq!(
        refused_with(connect(port, "dev-a", "dev-a", "wrong").await),
        ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(
        refused_with(connect(port, "dev-b", "dev-a", "right").await),
        ConnectReturnCode::BadClientId
    );
    assert_eq!(
        refused_with(connect(port, "dev-off", "dev-off", "right").await),
        ConnectReturnCode::NotAuthorized
    );
    assert_eq!(
        broker
            .stats()
            .connects_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
}

#[tokio::test]
async fn a_last_will_on_a_foreign_topic_is_refused_at_connect() {
    let (broker, _link) = EmbeddedBroker::start(&settings(), Arc::new(Fleet)).unwrap();
    let port = broker.addr().port();
    for (topic, retain) in [
        ("fleet/events/devices/disabled", false),
        ("devices/dev-b/presence", false),
        ("devices/dev-a/presence", true),
    ] {
        let mut opts = options(port, "dev-a", "dev-a", "right");
        opts.set_last_will(rumqttc::LastWill::new(topic, "x", QoS::AtLeastOnce, retain));
        let (_c, mut eventloop) = AsyncClient::new(opts, 10);
        assert_eq!(
            refused_with(first_answer(&mut eventloop).await),
            ConnectReturnCode::NotAuthorized,
            "{topic} retain {retain}"
        );
    }
    let mut opts = options(port, "dev-a", "dev-a", "right");
    opts.set_last_will(rumqttc::LastWill::new(
        "devices/dev-a/presence",
        "x",
        QoS::AtLeastOnce,
        false,
    ));
    let (_c, mut eventloop) = AsyncClient::new(opts, 10);
    assert!(first_answer(&mut eventloop).await.is_ok());
}

/// Every filter an attacker with device A's credentials would try.
const FOREIGN_FILTERS: &[&str] = &[
    "#",
    "fleet/events/#",
    "devices/+/notify",
    "+/+/+",
    "$share/g/#",
    "devices/+/presence",
    "devices/dev-b/notify",
    "$SYS/#",
];

#[tokio::test]
async fn a_device_reads_only_its_hints_and_publishes_only_its_presence() {
    let (broker, link) = EmbeddedBroker::start(&settings(), Arc::new(Fleet)).unwrap();
    let port = broker.addr().port();
    let broker::BridgeLink { mut tx, mut rx } = link;
    tx.try_subscribe("devices/+/presence").unwrap();

    // A subscribes to every foreign filter and its own: only its own is granted.
    let (a, mut a_loop) = AsyncClient::new(options(port, "dev-a", "dev-a", "right"), 32);
    first_answer(&mut a_loop).await.unwrap();
    let mut filters: Vec<rumqttc::SubscribeFilter> = FOREIGN_FILTERS
        .iter()
        .map(|f| rumqttc::SubscribeFilter::new((*f).to_owned(), QoS::AtLeastOnce))
        .collect();
    filters.push(rumqttc::SubscribeFilter::new(
        "devices/dev-a/notify".into(),
        QoS::AtLeastOnce,
    ));
    a.subscribe_many(filters).await.unwrap();
    let codes = match next_incoming(&mut a_loop).await.unwrap() {
        Packet::SubAck(ack) => ack.return_codes,
        other => panic!("expected SUBACK, got {other:?}"),
    };
    let mut expected = vec![SubscribeReasonCode::Failure; FOREIGN_FILTERS.len()];
    expected.push(SubscribeReasonCode::Success(QoS::AtLeastOnce));
    assert_eq!(codes, expected);

    // Ops may watch ops events only.
    let (ops, mut ops_loop) = AsyncClient::new(options(port, "watch-1", "ops", "ops-pass"), 10);
    first_answer(&mut ops_loop).await.unwrap();
    ops.subscribe_many(
        [
            "fleet/events/#",
            "devices/+/notify",
            "$share/g/fleet/events/#",
        ]
        .map(|f| rumqttc::SubscribeFilter::new(f.to_owned(), QoS::AtLeastOnce)),
    )
    .await
    .unwrap();
    match next_incoming(&mut ops_loop).await.unwrap() {
        Packet::SubAck(ack) => assert_eq!(
            ack.return_codes,
            [
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Failure
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }

    // B's hint reaches A's subscriptions nowhere; A's own hint reaches A.
    tx.try_publish("devices/dev-b/notify", "for-b").unwrap();
    tx.try_publish("devices/dev-a/notify", "for-a").unwrap();
    match next_incoming(&mut a_loop).await.unwrap() {
        Packet::Publish(p) => {
            assert_eq!(p.topic, "devices/dev-a/notify");
            assert_eq!(&p.payload[..], b"for-a");
        }
        other => panic!("expected A's hint, got {other:?}"),
    }

    // A forged publish (to B's presence, B's hints, ops events, junk) closes A's connection
    // and reaches no one; the broker keeps no new topic for it.
    let sizes_before = broker.sizes();
    let forged = [
        ("devices/dev-b/presence", false),
        ("devices/dev-b/notify", false),
        ("fleet/events/devices/disabled", true),
        ("junk/1", false),
        ("devices/dev-a/presence", true),
    ];
    for (topic, retain) in forged {
        let (a, mut a_loop) = AsyncClient::new(options(port, "dev-a", "dev-a", "right"), 10);
        first_answer(&mut a_loop).await.unwrap();
        a.publish(topic, QoS::AtLeastOnce, retain, "forged")
            .await
            .unwrap();
        let ended = loop {
            match next_incoming(&mut a_loop).await {
                Ok(Packet::PubAck(_)) => panic!("forged publish to {topic} acknowledged"),
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(
            !matches!(ended, ConnectionError::ConnectionRefused(_)),
            "{ended:?}"
        );
    }
    let refused = broker
        .stats()
        .publishes_refused
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(refused, forged.len() as u64);
    assert_eq!(broker.sizes(), sizes_before);

    // The ops watcher saw none of it; the bridge's presence subscription saw none of it.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), next_incoming(&mut ops_loop))
            .await
            .is_err(),
        "the ops watcher received a forged event"
    );
    // A real presence from A passes; it is the first thing the bridge receives.
    let (a, mut a_loop) = AsyncClient::new(options(port, "dev-a", "dev-a", "right"), 10);
    first_answer(&mut a_loop).await.unwrap();
    a.publish("devices/dev-a/presence", QoS::AtLeastOnce, false, "real")
        .await
        .unwrap();
    tokio::spawn(async move { while a_loop.poll().await.is_ok() {} });
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match rx.next().await.unwrap() {
                Some(Notification::Forward(f)) => return f.publish,
                Some(Notification::Unschedule) => rx.wake().await.unwrap(),
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(&got.topic[..], b"devices/dev-a/presence");
    assert_eq!(&got.payload[..], b"real");
}

/// A persistent session with a `$share` subscription, a QoS 1 message left unacknowledged, and
/// a dropped connection: upstream rumqttd's router panicked ("group must exists"). Run against
/// rumqttd itself, without our authorizer, because the authorizer refuses `$share` anyway.
#[tokio::test]
async fn a_dropped_shared_subscription_does_not_stop_the_router() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut v4 = std::collections::HashMap::new();
    v4.insert(
        "t".to_owned(),
        rumqttd::ServerSettings {
            name: "t".into(),
            listen: ([127, 0, 0, 1], port).into(),
            tls: None,
            next_connection_delay_ms: 1,
            connections: rumqttd::ConnectionSettings {
                connection_timeout_ms: 5000,
                max_payload_size: 4096,
                max_inflight_count: 100,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
            stream_wrapper: None,
            max_connections: None,
        },
    );
    let config = rumqttd::Config {
        router: rumqttd::RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 200,
            max_segment_size: 1024 * 1024,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(v4),
        ..Default::default()
    };
    let mut raw = rumqttd::Broker::new(config);
    let health = raw.router_health();
    let (mut tx, _rx) = raw.link("publisher").unwrap();
    std::thread::spawn(move || {
        if let Err(e) = raw.start() {
            panic!("rumqttd stopped: {e}");
        }
    });

    // Wait until the listener answers.
    let mut attempts = 0;
    let (sharer, mut sharer_loop) = loop {
        let mut opts = MqttOptions::new("sharer", "127.0.0.1", port);
        opts.set_clean_session(false);
        opts.set_manual_acks(true);
        let (c, mut l) = AsyncClient::new(opts, 10);
        match tokio::time::timeout(Duration::from_secs(2), first_answer(&mut l)).await {
            Ok(Ok(_)) => break (c, l),
            _ if attempts < 50 => attempts += 1,
            other => panic!("broker did not come up: {other:?}"),
        }
        // rumqttd binds its listener on a thread of its own and says nothing when it is up:
        // there is no event to wait on, only the port to try again.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    sharer
        .subscribe("$share/g/work", QoS::AtLeastOnce)
        .await
        .unwrap();
    assert!(matches!(
        next_incoming(&mut sharer_loop).await.unwrap(),
        Packet::SubAck(_)
    ));
    tx.try_publish("work", "unacked").unwrap();
    match next_incoming(&mut sharer_loop).await.unwrap() {
        Packet::Publish(p) => assert_eq!(&p.payload[..], b"unacked"),
        other => panic!("expected the shared message, got {other:?}"),
    }
    // Drop the TCP connection with the message unacknowledged.
    drop(sharer_loop);
    drop(sharer);

    // The router still serves: a new client gets its CONNACK and a message.
    let (c, mut l) = AsyncClient::new(MqttOptions::new("healthy", "127.0.0.1", port), 10);
    first_answer(&mut l).await.unwrap();
    c.subscribe("check", QoS::AtLeastOnce).await.unwrap();
    assert!(matches!(
        next_incoming(&mut l).await.unwrap(),
        Packet::SubAck(_)
    ));
    tx.try_publish("check", "alive").unwrap();
    match next_incoming(&mut l).await.unwrap() {
        Packet::Publish(p) => assert_eq!(&p.payload[..], b"alive"),
        other => panic!("expected a message, got {other:?}"),
    }
    assert_eq!(health.stopped(), None);

    // And the sharer may come back to its persistent session.
    let mut opts = MqttOptions::new("sharer", "127.0.0.1", port);
    opts.set_clean_session(false);
    let (_c, mut l) = AsyncClient::new(opts, 10);
    first_answer(&mut l).await.unwrap();
    assert_eq!(health.stopped(), None);
}

#[tokio::test]
async fn disconnect_closes_a_session_and_forgets_it() {
    let (broker, _link) = EmbeddedBroker::start(&settings(), Arc::new(Fleet)).unwrap();
    let port = broker.addr().port();
    let mut opts = options(port, "dev-a", "dev-a", "right");
    opts.set_clean_session(false);
    let (a, mut a_loop) = AsyncClient::new(opts.clone(), 10);
    first_answer(&mut a_loop).await.unwrap();
    a.subscribe("devices/dev-a/notify", QoS::AtLeastOnce)
        .await
        .unwrap();
    assert!(matches!(
        next_incoming(&mut a_loop).await.unwrap(),
        Packet::SubAck(_)
    ));

    let started = std::time::Instant::now();
    broker.disconnect("dev-a").unwrap();
    let ended = next_incoming(&mut a_loop).await;
    assert!(ended.is_err(), "still connected: {ended:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // Its persistent session is gone: coming back finds none.
    let (_a, mut a_loop) = AsyncClient::new(opts, 10);
    let session_present = first_answer(&mut a_loop).await.unwrap();
    assert!(!session_present, "the session survived disconnect()");
}

#[tokio::test]
async fn a_broker_that_cannot_take_logins_reports_it() {
    // Room for the bridge's link and one client: once a device holds the last slot, the
    // watchdog's logins go unanswered.
    let settings = BrokerSettings {
        max_connections: 2,
        ..settings()
    };
    let (broker, _link) = EmbeddedBroker::start(&settings, Arc::new(Fleet)).unwrap();
    assert_eq!(broker.health(), BrokerHealth::Serving);
    let port = broker.addr().port();
    let (_a, mut a_loop) = AsyncClient::new(options(port, "dev-a", "dev-a", "right"), 10);
    first_answer(&mut a_loop).await.unwrap();
    let a_task = tokio::spawn(async move { while a_loop.poll().await.is_ok() {} });
    let down = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let BrokerHealth::Down(reason) = broker.health() {
                return reason;
            }
            // Health is state the watchdog updates every 100 ms here; ask it again.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("health still Serving with no room for a login");
    assert!(down.contains("logins"), "{down}");

    // Room again: serving again.
    a_task.abort();
    tokio::time::timeout(Duration::from_secs(10), async {
        while broker.health() != BrokerHealth::Serving {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("health did not recover");
}

#[tokio::test]
async fn bridge_link_publishes_to_a_device_and_receives_its_messages() {
    let (broker, link) = EmbeddedBroker::start(&settings(), Arc::new(Fleet)).unwrap();
    let broker::BridgeLink { mut tx, mut rx } = link;
    tx.try_subscribe("devices/+/presence").unwrap();

    let mut opts = options(broker.addr().port(), "dev-a", "dev-a", "right");
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
            if let Event::Incoming(Packet::Publish(p)) = eventloop.poll().await.unwrap() {
                return p.payload;
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

/// A fleet reconnecting at once (the broker restarted under it): 2,000 connections opened
/// together are all taken, none left to TCP's SYN retry (a dropped SYN is retried only after
/// a second). Upstream's backlog of 1,024 and 1 ms pause per accept dropped the overflow.
#[tokio::test]
async fn a_burst_of_connections_is_taken_without_syn_retries() {
    let (broker, _link) = EmbeddedBroker::start(&settings(), Arc::new(Fleet)).unwrap();
    let addr = broker.addr();
    let mut burst = tokio::task::JoinSet::new();
    for n in 0..2_000 {
        burst.spawn(async move {
            let connected = tokio::time::timeout(
                Duration::from_millis(900),
                tokio::net::TcpStream::connect(addr),
            )
            .await;
            (n, connected)
        });
    }
    let mut held = Vec::new();
    while let Some(done) = burst.join_next().await {
        let (n, connected) = done.unwrap();
        let stream = connected
            .unwrap_or_else(|_| panic!("connection {n} waited for a SYN retry"))
            .unwrap();
        held.push(stream);
    }
    assert_eq!(held.len(), 2_000);
}

/// rumqttd patch 11: the router swaps a connection's incoming buffer for a spare one and hands
/// the drained buffer to the next connection that sends. A buffer grown by one backlog (the
/// bridge's own link, thousands of publishes between two turns of the router) must not be
/// what it hands on, or every connection ends up holding one.
#[test]
fn a_backlog_on_one_link_does_not_grow_the_buffer_handed_to_others() {
    use rumqttd::protocol::{Packet as RawPacket, Publish};
    let config = rumqttd::Config {
        router: rumqttd::RouterConfig {
            max_connections: 10,
            max_outgoing_packet_count: 200,
            max_segment_size: 1024 * 1024,
            max_segment_count: 10,
            ..Default::default()
        },
        ..Default::default()
    };
    let raw = rumqttd::Broker::new(config);
    let health = raw.router_health();
    let (mut tx, _rx) = raw.link("publisher").unwrap();
    // 5,000 publishes waiting before the router looks once.
    {
        let mut buffer = tx.buffer();
        for n in 0..5_000 {
            let publish = Publish::new("burst".to_owned(), format!("{n}"), false);
            buffer.push_back(RawPacket::Publish(publish, None));
        }
        assert!(buffer.capacity() >= 5_000);
    }
    tx.publish("burst", "last").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while health.spare_buffer_capacity() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the router never handled the burst"
        );
        std::thread::yield_now();
    }
    let spare = health.spare_buffer_capacity();
    assert!(
        (1..=200).contains(&spare),
        "the router hands on a buffer of {spare} packets"
    );
}
