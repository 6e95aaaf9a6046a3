//! The same pipeline with Mosquitto as the external broker: the bridge publishes hints to it,
//! devices subscribe there, push on connect works, and Mosquitto's ACLs keep each device to
//! its own topics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use device_sim::{AgentEvent, SimulatedExecutor};
use e2e_tests::{BridgeProcess, Mosquitto, SOON, init_tracing, wait_for_event, wait_reported};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use schemas::api::SubmitJob;
use schemas::job::JobState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_works_through_mosquitto_with_acls() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut mosquitto = Mosquitto::start(dir.path(), &[Mosquitto::BRIDGE_LOGIN]).await;
    let url = format!("mqtt://127.0.0.1:{}", mosquitto.port);
    let bridge = BridgeProcess::start_external(&dir.path().join("bridge"), &url, &[]).await;
    let ep = bridge.endpoints.clone();
    assert_eq!(ep.mqtt, ("127.0.0.1".to_owned(), mosquitto.port));
    assert_eq!(ep.client().health().await.unwrap().broker, "external");

    // Two devices register over the data channel; the operator provisions their MQTT
    // credentials in Mosquitto, as a deployment with an external broker does.
    let mut devices = Vec::new();
    for serial in ["SN-M1", "SN-M2"] {
        let device = mosquitto
            .provisioned_device(&ep, serial, |c| c.mqtt_grace = Duration::from_secs(600))
            .await;
        devices.push(device);
    }

    // Online: submission → hint through Mosquitto → completion.
    let (agent, _, _, creds) = &devices[0];
    let mut events = agent.subscribe();
    let (job, _) = ep
        .client()
        .submit_job(
            &creds.device_id,
            &SubmitJob {
                payload: Some("via mosquitto".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut hinted = false;
    wait_for_event(&mut events, SOON, |e| match e {
        AgentEvent::HintReceived { .. } => {
            hinted = true;
            None
        }
        AgentEvent::JobReported { job_id } if *job_id == job.job_id => Some(()),
        _ => None,
    })
    .await;
    assert!(hinted, "the job should have come by hint");

    // Offline, then back: pushed on connect.
    let (agent, config, store, creds) = devices.remove(1);
    agent.stop().await.unwrap();
    let (job, _) = ep
        .client()
        .submit_job(
            &creds.device_id,
            &SubmitJob {
                payload: Some("while away".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let agent = device_sim::start(config, Arc::new(SimulatedExecutor::default()), store);
    let mut events = agent.subscribe();
    wait_for_event(&mut events, SOON, |e| match e {
        AgentEvent::JobStarted { .. } => panic!("started before a hint"),
        AgentEvent::HintReceived { .. } => Some(()),
        _ => None,
    })
    .await;
    wait_reported(&mut events, &job.job_id).await;
    assert_eq!(
        ep.client().job(&job.job_id).await.unwrap().state,
        JobState::Succeeded
    );

    agent.stop().await.unwrap();
    let (first_agent, _, _, first) = devices.remove(0);
    first_agent.stop().await.unwrap();

    // Mosquitto's ACL keeps a device from reading another device's hints. The intruder
    // subscribes to both topics; a hint for the victim is published before one for the
    // intruder, so receiving its own first proves the victim's was withheld.
    let mut opts = MqttOptions::new(creds.device_id.as_str(), "127.0.0.1", mosquitto.port);
    opts.set_credentials(creds.device_id.as_str(), creds.secret.expose());
    opts.set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    client
        .subscribe(schemas::topics::notify(&first.device_id), QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .subscribe(schemas::topics::notify(&creds.device_id), QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut subacks = 0;
    while subacks < 2 {
        if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.unwrap() {
            subacks += 1;
        }
    }
    let submit = SubmitJob {
        payload: Some("x".into()),
        ..Default::default()
    };
    ep.client()
        .submit_job(&first.device_id, &submit)
        .await
        .unwrap();
    ep.client()
        .submit_job(&creds.device_id, &submit)
        .await
        .unwrap();
    let topic = tokio::time::timeout(SOON, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = eventloop.poll().await.unwrap() {
                return p.topic;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        topic,
        schemas::topics::notify(&creds.device_id),
        "read another device's hint"
    );
}

/// The bridge's link to an external broker shows in `/v1/health`: down for longer than the
/// grace (10 s), health is 503 naming it; back, 200 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_an_unreachable_external_broker() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut mosquitto = Mosquitto::start(dir.path(), &[Mosquitto::BRIDGE_LOGIN]).await;
    let url = format!("mqtt://127.0.0.1:{}", mosquitto.port);
    let bridge = BridgeProcess::start_external(&dir.path().join("bridge"), &url, &[]).await;
    let ep = bridge.endpoints.clone();
    let health = || async {
        let (status, body) = ep
            .client()
            .raw(hyper::Method::GET, "/v1/health", None, None)
            .await
            .unwrap();
        (status.as_u16(), String::from_utf8_lossy(&body).into_owned())
    };
    assert_eq!(health().await.0, 200);

    mosquitto.kill().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let body = loop {
        let (status, body) = health().await;
        if status == 503 {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "health stayed {status}: {body}"
        );
        // The grace is 10 s: nothing to wait on but the clock.
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(body.contains("external MQTT broker unreachable"), "{body}");

    mosquitto.restart().await;
    e2e_tests::eventually(Duration::from_secs(40), "health back to 200", || async {
        health().await.0 == 200
    })
    .await;
}
