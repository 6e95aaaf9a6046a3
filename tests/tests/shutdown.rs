//! SIGTERM and SIGINT stop the bridge gracefully: connected devices are told the server is
//! closing, the process exits 0, and everything is there after a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use device_sim::AgentEvent;
use e2e_tests::{BridgeProcess, Device, SOON, init_tracing, wait_for_event, wait_reported};
use schemas::api::SubmitJob;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_devices_and_exits_cleanly() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut bridge = BridgeProcess::start(dir.path(), &[]).await;
    let ep = bridge.endpoints.clone();
    // Keep the data channel open so the shutdown has a connection to close.
    let Device {
        agent,
        mut events,
        id: device,
        ..
    } = ep
        .online_device("SN-TERM", Device::simulated(), |c| {
            c.data_idle_close = std::time::Duration::from_secs(600)
        })
        .await;
    let (job, _) = ep
        .client()
        .submit_job(
            &device,
            &SubmitJob {
                payload: Some("before".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    wait_reported(&mut events, &job.job_id).await;

    bridge.signal("TERM");
    let reason = wait_for_event(&mut events, SOON, |e| match e {
        AgentEvent::DataDown(reason) => Some(reason.clone()),
        _ => None,
    })
    .await;
    assert!(
        reason.contains("server closing"),
        "device was told: {reason}"
    );
    let status = bridge.wait_exit(SOON).await;
    assert!(status.success(), "exit status {status}");

    bridge.restart().await;
    let view = ep.client().job(&job.job_id).await.unwrap();
    assert_eq!(view.state, schemas::job::JobState::Succeeded);
    agent.stop().await.unwrap();

    bridge.signal("INT");
    assert!(bridge.wait_exit(SOON).await.success());
}
