//! Every device is potentially hostile, credentials and all. On the embedded broker, device A
//! sees nothing of device B and can forge nothing for anyone; disabling a device closes its
//! open sessions at once; a refused login gets its CONNACK return code; a broker that cannot
//! take logins turns `/v1/health` 503.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use device_sim::AgentEvent;
use device_sim::session::{DataSession, SessionError, SessionSettings};
use e2e_tests::{
    Device, Endpoints, InProcessBridge, OpsWatcher, SOON, wait_for_event, wait_reported,
};
use hyper::Method;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
    SubscribeFilter, SubscribeReasonCode,
};
use schemas::agent::Credentials;
use schemas::api::SubmitJob;
use schemas::data::{ErrorCode, HelloAuth};
use schemas::hint::{Hint, HintKind, Presence};
use schemas::ops::{Channel, OpsEvent};
use schemas::{DeviceId, FeedSeq, UnixMillis, topics};
use tokio::sync::mpsc;

fn job(text: &str) -> SubmitJob {
    SubmitJob {
        payload: Some(text.into()),
        content_type: Some("text/plain".into()),
        ..Default::default()
    }
}

fn options(ep: &Endpoints, client_id: &str, user: &str, pass: &str) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, ep.mqtt.0.clone(), ep.mqtt.1);
    opts.set_credentials(user, pass);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_max_packet_size(64 * 1024, 64 * 1024);
    opts
}

fn as_device(ep: &Endpoints, c: &Credentials) -> MqttOptions {
    options(
        ep,
        c.device_id.as_str(),
        c.device_id.as_str(),
        c.secret.expose(),
    )
}

/// The next packet from the broker, or the error that ended the connection.
async fn next_incoming(eventloop: &mut EventLoop) -> Result<Packet, ConnectionError> {
    tokio::time::timeout(SOON, async {
        loop {
            if let Event::Incoming(p) = eventloop.poll().await? {
                return Ok(p);
            }
        }
    })
    .await
    .expect("nothing from the broker in time")
}

async fn connack(eventloop: &mut EventLoop) -> Result<(), ConnectionError> {
    match next_incoming(eventloop).await? {
        Packet::ConnAck(_) => Ok(()),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// A registered device whose agent is stopped, so its credentials can be used by hand.
async fn idle_device(ep: &Endpoints, serial: &str) -> Credentials {
    let device = ep.online_device(serial, Device::simulated(), |_| {}).await;
    let credentials = device.credentials();
    device.agent.stop().await.unwrap();
    credentials
}

/// Filters an attacker holding a device's credentials would try.
const FOREIGN_FILTERS: &[&str] = &[
    "#",
    "fleet/events/#",
    "devices/+/notify",
    "+/+/+",
    "$share/g/#",
    "devices/+/presence",
    "$SYS/#",
];

/// Publishes one forged message as `attacker` and checks the broker closes the connection
/// without acknowledging it.
async fn forge(
    ep: &Endpoints,
    attacker: &Credentials,
    topic: &str,
    payload: Vec<u8>,
    retain: bool,
) {
    let (client, mut eventloop) = AsyncClient::new(as_device(ep, attacker), 10);
    connack(&mut eventloop).await.unwrap();
    client
        .publish(topic, QoS::AtLeastOnce, retain, payload)
        .await
        .unwrap();
    loop {
        match next_incoming(&mut eventloop).await {
            Ok(Packet::PubAck(_)) => panic!("the broker acknowledged a forged publish to {topic}"),
            Ok(_) => {}
            Err(ConnectionError::ConnectionRefused(code)) => {
                panic!("refused at login ({code:?}), not at the publish")
            }
            Err(_) => return,
        }
    }
}

async fn embedded_broker_metrics(ep: &Endpoints) -> serde_json::Value {
    ep.client().metrics().await.unwrap()["embedded_broker"].clone()
}

/// Disables `fence` and returns the ops events seen before its `device_disabled` event: a
/// real event after everything the test did, delivered in order on the watcher's one filter.
async fn events_until_disabled(
    ep: &Endpoints,
    ops: &mut OpsWatcher,
    fence: &DeviceId,
) -> Vec<OpsEvent> {
    ep.client().disable_device(fence).await.unwrap();
    let mut before = Vec::new();
    tokio::time::timeout(SOON, async {
        loop {
            let e = ops.events.recv().await.expect("ops watcher stopped");
            if matches!(&e, OpsEvent::DeviceDisabled { device_id, .. } if device_id == fence) {
                return;
            }
            before.push(e);
        }
    })
    .await
    .expect("the fence event did not arrive");
    before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_sees_nothing_of_another_and_forges_nothing() {
    // Departures published at once: a forged offline would show before the next fence.
    let bridge = InProcessBridge::start_with(|c| c.devices.presence_grace_ms = 0).await;
    let ep = &bridge.endpoints;
    let mut ops = OpsWatcher::start(ep).await;
    let a = idle_device(ep, "SN-A").await;
    let fences = [
        idle_device(ep, "SN-F1").await,
        idle_device(ep, "SN-F2").await,
        idle_device(ep, "SN-F3").await,
    ];

    // A, with its real credentials, subscribes to everything it can think of.
    let (spy, mut spy_loop) = AsyncClient::new(as_device(ep, &a), 64);
    connack(&mut spy_loop).await.unwrap();
    let mut filters: Vec<SubscribeFilter> = FOREIGN_FILTERS
        .iter()
        .map(|f| SubscribeFilter::new((*f).to_owned(), QoS::AtLeastOnce))
        .collect();
    filters.push(SubscribeFilter::new(
        topics::notify(&a.device_id),
        QoS::AtLeastOnce,
    ));
    spy.subscribe_many(filters).await.unwrap();
    match next_incoming(&mut spy_loop).await.unwrap() {
        Packet::SubAck(ack) => {
            let mut expected = vec![SubscribeReasonCode::Failure; FOREIGN_FILTERS.len()];
            expected.push(SubscribeReasonCode::Success(QoS::AtLeastOnce));
            assert_eq!(ack.return_codes, expected);
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let spy_task = tokio::spawn(async move {
        while let Ok(event) = spy_loop.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                let _ = seen_tx.send(p);
            }
        }
    });

    // B registers, connects, runs five jobs and reconnects.
    let b = ep.online_device("SN-B", Device::simulated(), |_| {}).await;
    let Device {
        agent,
        mut events,
        id: b_id,
        store: b_store,
        config: b_config,
    } = b;
    for n in 0..5 {
        let (submitted, _) = ep
            .client()
            .submit_job(&b_id, &job(&format!("job {n}")))
            .await
            .unwrap();
        wait_reported(&mut events, &submitted.job_id).await;
    }
    agent.stop().await.unwrap();
    let agent = device_sim::start(b_config, Device::simulated(), b_store);
    let mut events = agent.subscribe();
    wait_for_event(&mut events, SOON, |e| {
        matches!(e, AgentEvent::MqttUp { .. }).then_some(())
    })
    .await;

    // A's own hint is the first and only thing A receives: nothing of B came before it.
    let (for_a, _) = ep
        .client()
        .submit_job(&a.device_id, &job("for A"))
        .await
        .unwrap();
    let first = tokio::time::timeout(SOON, seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        first.topic,
        topics::notify(&a.device_id),
        "A received {first:?}"
    );
    assert!(seen.try_recv().is_err());
    spy_task.abort();
    drop(spy);

    // A forges: B's presence, B's hints, A's own notify, ops events (one retained), and
    // junk topics. Each closes A's connection before anything is acknowledged.
    let _ = events_until_disabled(ep, &mut ops, &fences[0].device_id).await;
    let before = embedded_broker_metrics(ep).await;
    let forged_at = UnixMillis(4242);
    let forged_hint = schemas::encode(&Hint::new(HintKind::Feed, FeedSeq(999_999))).unwrap();
    let forged_disabled = OpsEvent::DeviceDisabled {
        device_id: b_id.clone(),
        at: forged_at,
    };
    let forged_transition = OpsEvent::JobTransition {
        device_id: b_id.clone(),
        job_id: for_a.job_id.clone(),
        from: None,
        to: schemas::job::JobState::Succeeded,
        attempt: 1,
        reason: None,
        at: forged_at,
        submitted_at: forged_at,
    };
    let mut forgeries: Vec<(String, Vec<u8>, bool)> = vec![
        (
            topics::presence(&b_id),
            schemas::encode(&Presence::Offline).unwrap(),
            false,
        ),
        (topics::notify(&b_id), forged_hint.clone(), false),
        (topics::notify(&a.device_id), forged_hint, false),
        (forged_disabled.topic(), forged_disabled.to_json(), true),
        (
            forged_transition.topic(),
            forged_transition.to_json(),
            false,
        ),
        (
            topics::presence(&a.device_id),
            schemas::encode(&Presence::Online).unwrap(),
            true,
        ),
    ];
    let junk = 100;
    for n in 0..junk {
        forgeries.push((format!("junk/{n}/{}", a.device_id), b"x".to_vec(), false));
    }
    for (topic, payload, retain) in &forgeries {
        forge(ep, &a, topic, payload.clone(), *retain).await;
    }

    // No one received any of it. The ops watcher: nothing about B before the next fence.
    let leaked: Vec<OpsEvent> = events_until_disabled(ep, &mut ops, &fences[1].device_id)
        .await
        .into_iter()
        .filter(|e| match e {
            OpsEvent::DeviceDisabled { at, .. } | OpsEvent::JobTransition { at, .. } => {
                *at == forged_at
            }
            OpsEvent::DeviceOffline {
                device_id, channel, ..
            } => device_id == &b_id && *channel == Channel::Mqtt,
            _ => false,
        })
        .collect();
    assert!(leaked.is_empty(), "forged events reached ops: {leaked:?}");
    // A later watcher gets no retained forgery: its first message is a real event.
    let mut late = OpsWatcher::start(ep).await;
    let first_late = events_until_disabled(ep, &mut late, &fences[2].device_id).await;
    assert!(
        first_late.is_empty(),
        "a later watcher got {first_late:?} first"
    );
    // B acted on no forged hint: its next job comes, and no hint for seq 999999 came first.
    let (next, _) = ep
        .client()
        .submit_job(&b_id, &job("after the forgeries"))
        .await
        .unwrap();
    let mut forged_hints = 0;
    wait_for_event(&mut events, SOON, |e| match e {
        AgentEvent::HintReceived { seq, .. } if *seq == FeedSeq(999_999) => {
            forged_hints += 1;
            None
        }
        AgentEvent::JobReported { job_id } if job_id == &next.job_id => Some(()),
        _ => None,
    })
    .await;
    assert_eq!(forged_hints, 0);

    // The broker refused each forgery, counted it, and kept no topic or filter for it.
    let after = embedded_broker_metrics(ep).await;
    let refused = |m: &serde_json::Value| m["publishes_refused"].as_u64().unwrap();
    assert_eq!(refused(&after) - refused(&before), forgeries.len() as u64);
    assert_eq!(after["topics"], before["topics"], "{before} -> {after}");
    assert_eq!(after["filters"], before["filters"], "{before} -> {after}");
    assert_eq!(after["serving"], true);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_a_device_closes_its_open_sessions_within_a_second() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let device = idle_device(ep, "SN-D").await;
    let watched = ep.online_device("SN-W", Device::simulated(), |_| {}).await;

    // An open MQTT session and an open data channel, both idle.
    let mut opts = as_device(ep, &device);
    opts.set_clean_session(false);
    let (client, mut mqtt) = AsyncClient::new(opts.clone(), 10);
    connack(&mut mqtt).await.unwrap();
    client
        .subscribe(topics::notify(&device.device_id), QoS::AtLeastOnce)
        .await
        .unwrap();
    assert!(matches!(
        next_incoming(&mut mqtt).await.unwrap(),
        Packet::SubAck(_)
    ));
    let auth = HelloAuth::Device {
        device_id: device.device_id.clone(),
        secret: device.secret.clone(),
    };
    let (data, _welcome) = DataSession::connect(
        &ep.data_url,
        auth.clone(),
        "test",
        SessionSettings::default(),
    )
    .await
    .unwrap();

    let started = Instant::now();
    ep.client().disable_device(&device.device_id).await.unwrap();
    let (mqtt_end, ()) = tokio::join!(next_incoming(&mut mqtt), data.closed());
    let took = started.elapsed();
    assert!(mqtt_end.is_err(), "MQTT session still open: {mqtt_end:?}");
    assert!(took < Duration::from_secs(1), "closed after {took:?}");
    let reason = data.close_reason().unwrap_or_default();
    assert!(reason.contains("disabled"), "{reason}");

    // And it stays out: refused with the reason on both channels.
    let (_c, mut again) = AsyncClient::new(opts, 10);
    match connack(&mut again).await {
        Err(ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, ConnectReturnCode::NotAuthorized)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    match DataSession::connect(&ep.data_url, auth, "test", SessionSettings::default()).await {
        Err(e @ SessionError::Refused(_)) => assert_eq!(e.code(), Some(ErrorCode::DeviceDisabled)),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }

    // A running agent learns it as a refusal, not an outage.
    let Device {
        agent,
        mut events,
        id,
        ..
    } = watched;
    ep.client().disable_device(&id).await.unwrap();
    wait_for_event(&mut events, SOON, |e| {
        matches!(e, AgentEvent::MqttRefused(_)).then_some(())
    })
    .await;
    let _ = agent.stop().await;
}

/// Runs `mosquitto_sub` with a wrong password: it must exit with an error, not retry for ever.
async fn mosquitto_sub_with_wrong_password(ep: &Endpoints, user: &str) -> std::process::ExitStatus {
    let binary = ["/usr/bin/mosquitto_sub", "/usr/local/bin/mosquitto_sub"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("mosquitto_sub is not installed: apt-get install -y mosquitto-clients (scripts/test.sh does this)");
    let mut child = tokio::process::Command::new(binary)
        .args([
            "-h",
            &ep.mqtt.0,
            "-p",
            &ep.mqtt.1.to_string(),
            "-u",
            user,
            "-i",
            user,
            "-t",
            "x",
        ])
        .arg("-P")
        .arg("wrong")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("mosquitto_sub kept retrying a refused login")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_logins_get_their_return_code() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let a = idle_device(ep, "SN-R1").await;
    let b = idle_device(ep, "SN-R2").await;
    let refused = |result: Result<(), ConnectionError>| match result {
        Err(ConnectionError::ConnectionRefused(code)) => code,
        other => panic!("expected a CONNACK refusal, got {other:?}"),
    };
    let id = a.device_id.as_str();
    let (_c, mut l) = AsyncClient::new(options(ep, id, id, "wrong"), 10);
    assert_eq!(
        refused(connack(&mut l).await),
        ConnectReturnCode::BadUserNamePassword
    );
    let (_c, mut l) =
        AsyncClient::new(options(ep, b.device_id.as_str(), id, a.secret.expose()), 10);
    assert_eq!(
        refused(connack(&mut l).await),
        ConnectReturnCode::BadClientId
    );
    // Operations log in with an ops login of their own, not with the admin token.
    let ops = ep.client().create_ops_login("dashboard").await.unwrap();
    let user = ops.ops_id.as_str();
    for (user, pass) in [
        (user, "wrong"),
        ("ops", ep.admin_token.expose()),
        (user, ep.admin_token.expose()),
    ] {
        let (_c, mut l) = AsyncClient::new(options(ep, "watch-1", user, pass), 10);
        assert_eq!(
            refused(connack(&mut l).await),
            ConnectReturnCode::BadUserNamePassword,
            "{user}"
        );
    }
    let (_c, mut l) = AsyncClient::new(options(ep, id, user, ops.password.expose()), 10);
    assert_eq!(
        refused(connack(&mut l).await),
        ConnectReturnCode::BadClientId
    );
    let (_c, mut watching) =
        AsyncClient::new(options(ep, "watch-1", user, ops.password.expose()), 10);
    connack(&mut watching).await.unwrap();
    // Revoked: its open session closes, and it is refused from then on.
    ep.client().revoke_ops_login(&ops.ops_id).await.unwrap();
    assert!(
        next_incoming(&mut watching).await.is_err(),
        "the revoked login's session stayed open"
    );
    let (_c, mut l) = AsyncClient::new(options(ep, "watch-1", user, ops.password.expose()), 10);
    assert_eq!(
        refused(connack(&mut l).await),
        ConnectReturnCode::NotAuthorized
    );
    let listed = ep.client().ops_logins().await.unwrap();
    assert!(listed[0].revoked_at.is_some());
    ep.client().disable_device(&a.device_id).await.unwrap();
    let (_c, mut l) = AsyncClient::new(as_device(ep, &a), 10);
    assert_eq!(
        refused(connack(&mut l).await),
        ConnectReturnCode::NotAuthorized
    );
    // The right credentials still work for others.
    let (_c, mut l) = AsyncClient::new(as_device(ep, &b), 10);
    connack(&mut l).await.unwrap();

    let status = mosquitto_sub_with_wrong_password(ep, id).await;
    assert!(!status.success(), "mosquitto_sub exited with {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_cannot_take_logins_turns_health_503() {
    // The bridge's own link and one client fill the broker.
    let bridge = InProcessBridge::start_with(|c| c.broker.max_connections = 2).await;
    let ep = &bridge.endpoints;
    let (status, _) = ep
        .client()
        .raw(Method::GET, "/v1/health", None, None)
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 200);
    let ops = ep.client().create_ops_login("filler").await.unwrap();
    let (_ops, mut ops_loop) = AsyncClient::new(
        options(ep, "ops-full", ops.ops_id.as_str(), ops.password.expose()),
        10,
    );
    connack(&mut ops_loop).await.unwrap();
    let holder = tokio::spawn(async move { while ops_loop.poll().await.is_ok() {} });

    let deadline = Instant::now() + SOON;
    let body = loop {
        let (status, body) = ep
            .client()
            .raw(Method::GET, "/v1/health", None, None)
            .await
            .unwrap();
        if status.as_u16() == 503 {
            break body;
        }
        assert_eq!(status.as_u16(), 200);
        assert!(
            Instant::now() < deadline,
            "health stayed 200 with a full broker"
        );
        // The watchdog logs in every 2 s; ask again shortly.
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let health: schemas::api::Health = serde_json::from_slice(&body).unwrap();
    assert_eq!(health.status, "unavailable");
    assert!(
        health
            .problems
            .iter()
            .any(|p| p.contains("embedded MQTT broker")),
        "{:?}",
        health.problems
    );

    holder.abort();
    e2e_tests::eventually(SOON, "health back to 200", || async {
        ep.client()
            .raw(Method::GET, "/v1/health", None, None)
            .await
            .unwrap()
            .0
            .as_u16()
            == 200
    })
    .await;
}
