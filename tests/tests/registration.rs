//! Registration is idempotent for the same device: a device that got its credentials and lost
//! them before storing them (a crash, a cut connection) registers again under the registration
//! id it stored first, and is the same device, without using the enrollment token again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use device_sim::session::{DataSession, SessionSettings};
use device_sim::{AgentEvent, MemoryStateStore, SimulatedExecutor};
use e2e_tests::{InProcessBridge, SOON, device_info, wait_for_event, wait_reported};
use schemas::agent::AgentState;
use schemas::api::SubmitJob;
use schemas::data::{HelloAuth, Registration};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_lost_its_welcome_registers_again_as_the_same_device() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    // One use only: a second device could not register with it.
    let token = ep.enrollment_token(1).await;
    let registration_id = "b1c2d3e4f5a60718293a4b5c6d7e8f90".to_owned();

    // The first try: the bridge registers the device and answers; the device never keeps
    // the answer.
    let info = device_info("SN-LOST-WELCOME");
    let (session, welcome) = DataSession::connect(
        &ep.data_url,
        HelloAuth::Register(Registration {
            registration_id: Some(registration_id.clone()),
            enrollment_token: token.clone(),
            serial: info.serial.clone(),
            model: info.model.clone(),
            destination: info.destination.clone(),
            time_zone: info.time_zone.clone(),
            owner: None,
        }),
        "test",
        SessionSettings::default(),
    )
    .await
    .unwrap();
    session.close();
    let lost_secret = welcome.credentials.clone().unwrap();

    // The device comes back with what it stored before that try: its registration id.
    let state = AgentState {
        registration_id: Some(registration_id),
        ..AgentState::default()
    };
    let store = MemoryStateStore::from_state(state);
    let agent = device_sim::start(
        ep.agent_config(&token, &info.serial),
        Arc::new(SimulatedExecutor::default()),
        store.clone(),
    );
    let mut events = agent.subscribe();
    let id = wait_for_event(&mut events, SOON, |e| match e {
        AgentEvent::Registered(id) => Some(id.clone()),
        _ => None,
    })
    .await;
    assert_eq!(id, welcome.device_id, "the same device");
    let stored = store.snapshot().unwrap().credentials.unwrap();
    assert_ne!(
        stored.secret, lost_secret,
        "a new secret; the lost one is void"
    );
    let devices = ep.client().devices().await.unwrap();
    assert_eq!(
        devices.iter().filter(|d| d.serial == info.serial).count(),
        1
    );

    // And it works as any device.
    let (job, _) = ep
        .client()
        .submit_job(
            &id,
            &SubmitJob {
                payload: Some("after the lost welcome".into()),
                ..SubmitJob::default()
            },
        )
        .await
        .unwrap();
    wait_reported(&mut events, &job.job_id).await;
    agent.stop().await.unwrap();
}
