//! A hint is recorded on the device when it arrives: a device that dies between the hint and
//! the fetch fetches after it restarts, without waiting for another hint.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use device_sim::AgentEvent;
use e2e_tests::{Device, InProcessBridge, SOON, TcpProxy, socket_addr, wait_for_event};
use schemas::api::SubmitJob;
use schemas::job::JobState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_killed_after_hint_fetches_after_restart() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let data_proxy = TcpProxy::start(socket_addr(&ep.data_url)).await.unwrap();
    let Device {
        agent,
        mut events,
        id: device,
        store,
        mut config,
    } = ep
        .online_device("SN-RECEIPT", Device::simulated(), |c| {
            c.endpoints.data = vec![format!("ws://{}", data_proxy.addr)];
        })
        .await;

    // The data channel is down, the notification channel up: the hint arrives, the fetch
    // cannot happen.
    data_proxy.cut();
    let job = SubmitJob {
        payload: Some("fetch me after the reboot".into()),
        ..Default::default()
    };
    let (submitted, _) = ep.client().submit_job(&device, &job).await.unwrap();
    wait_for_event(&mut events, SOON, |e| {
        matches!(e, AgentEvent::HintReceived { .. }).then_some(())
    })
    .await;
    agent.kill();
    assert_eq!(
        ep.client().job(&submitted.job_id).await.unwrap().state,
        JobState::Queued,
        "the device must die before it fetched"
    );

    // Restart with the data channel back and the notification channel unreachable, and a
    // grace long enough that only the recorded hint can explain a prompt fetch.
    data_proxy.restore();
    let dead_broker = TcpProxy::start(socket_addr(&ep.data_url)).await.unwrap();
    dead_broker.cut();
    config.endpoints.mqtt = vec![dead_broker.addr.to_string()];
    config.mqtt_grace = Duration::from_secs(120);
    config.poll_interval = Some(Duration::from_secs(3600));
    let agent = device_sim::start(config, Device::simulated(), store);
    let mut events = agent.subscribe();
    wait_for_event(&mut events, Duration::from_secs(20), |e| match e {
        AgentEvent::HintReceived { .. } => panic!("no hint can reach the restarted device"),
        AgentEvent::JobReported { job_id } if *job_id == submitted.job_id => Some(()),
        _ => None,
    })
    .await;
    assert_eq!(
        ep.client().job(&submitted.job_id).await.unwrap().state,
        JobState::Succeeded
    );
    agent.stop().await.unwrap();
}
