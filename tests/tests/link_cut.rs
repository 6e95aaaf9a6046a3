//! With its MQTT link cut, a device still learns of new work within the long-poll window and
//! still reports status, over the data channel alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use device_sim::{AgentEvent, Submitted};
use e2e_tests::{Device, InProcessBridge, SOON, TcpProxy, wait_for_event};
use schemas::api::SubmitJob;
use schemas::data::{DeviceState, DeviceStatus};
use schemas::job::JobState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_mqtt_link_falls_back_to_long_poll() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let broker_addr = format!("{}:{}", ep.mqtt.0, ep.mqtt.1).parse().unwrap();
    let proxy = TcpProxy::start(broker_addr).await.unwrap();

    let long_poll = Duration::from_secs(3);
    let Device {
        agent,
        mut events,
        id: device,
        ..
    } = ep
        .online_device("SN-CUT", Device::simulated(), |c| {
            c.endpoints.mqtt = vec![proxy.addr.to_string()];
            c.long_poll = long_poll;
        })
        .await;

    proxy.cut();
    wait_for_event(&mut events, SOON, |e| {
        matches!(e, AgentEvent::MqttDown(_)).then_some(())
    })
    .await;

    let submitted_at = Instant::now();
    let job = SubmitJob {
        payload: Some("no mqtt".into()),
        ..Default::default()
    };
    let (submitted, _) = ep.client().submit_job(&device, &job).await.unwrap();
    wait_for_event(&mut events, SOON, |e| match e {
        AgentEvent::HintReceived { .. } => panic!("a hint passed a cut link"),
        AgentEvent::JobReported { job_id } if *job_id == submitted.job_id => Some(()),
        _ => None,
    })
    .await;
    let took = submitted_at.elapsed();
    assert!(
        took < long_poll,
        "picked up after {took:?}, long-poll window is {long_poll:?}"
    );
    assert_eq!(
        ep.client().job(&submitted.job_id).await.unwrap().state,
        JobState::Succeeded
    );

    // Status still reaches the cloud.
    let status = DeviceStatus {
        state: DeviceState::Error,
        detail: "paper jam in tray 2".into(),
        observed_at: schemas::UnixMillis::now(),
    };
    let submitted = agent.report_status(status.clone()).await.unwrap();
    let Submitted::Queued(no) = submitted else {
        panic!("the device has consent; the status must be queued, got {submitted:?}")
    };
    wait_for_event(&mut events, SOON, |e| match e {
        AgentEvent::RequestDelivered { no: n, .. } if *n == no => Some(()),
        _ => None,
    })
    .await;
    let view = ep.client().device(&device).await.unwrap();
    assert_eq!(view.last_status, Some(status));

    // And when the link comes back, hints flow again.
    proxy.restore();
    wait_for_event(&mut events, SOON, |e| {
        matches!(e, AgentEvent::MqttUp { .. }).then_some(())
    })
    .await;
    let (second, _) = ep.client().submit_job(&device, &job).await.unwrap();
    let mut hinted = false;
    wait_for_event(&mut events, SOON, |e| match e {
        AgentEvent::HintReceived { .. } => {
            hinted = true;
            None
        }
        AgentEvent::JobReported { job_id } if *job_id == second.job_id => Some(()),
        _ => None,
    })
    .await;
    assert!(hinted, "after restore the job should arrive by hint");
    agent.stop().await.unwrap();
}
