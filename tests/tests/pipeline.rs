//! A job goes from submission to completion, by push while online and by push on connect
//! while offline; its history records every transition with its time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use device_sim::{AgentEvent, MemoryStateStore, SimulatedExecutor};
use e2e_tests::{Device, InProcessBridge, OpsWatcher, SOON, wait_for_event};
use schemas::api::SubmitJob;
use schemas::hint::HintKind;
use schemas::job::JobState;
use schemas::ops::OpsEvent;

/// The transitions of a job that succeeds at its first attempt.
const ONE_RUN: [JobState; 4] = [
    JobState::Queued,
    JobState::Delivered,
    JobState::InProgress,
    JobState::Succeeded,
];

fn job(text: &str) -> SubmitJob {
    SubmitJob {
        payload: Some(text.into()),
        content_type: Some("text/plain".into()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_device_is_hinted_and_completes_the_job() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let Device {
        agent,
        mut events,
        id: device,
        ..
    } = ep.online_device("SN-1", Device::simulated(), |_| {}).await;
    let mut ops = OpsWatcher::start(ep).await;

    let (submitted, created) = ep
        .client()
        .submit_job(&device, &job("hello"))
        .await
        .unwrap();
    assert!(created);
    wait_for_event(&mut events, SOON, |e| match e {
        AgentEvent::HintReceived {
            kind: HintKind::Feed,
            seq,
        } if seq.0 >= 1 => Some(()),
        _ => None,
    })
    .await;
    let done = wait_for_event(&mut events, SOON, |e| match e {
        AgentEvent::JobReported { job_id } => Some(job_id.clone()),
        _ => None,
    })
    .await;
    assert_eq!(done, submitted.job_id);
    let view = ep.client().job(&submitted.job_id).await.unwrap();
    assert_eq!(view.state, JobState::Succeeded);

    // Operations saw the transitions on MQTT.
    ops.wait_for(SOON, |e| match e {
        OpsEvent::JobTransition {
            job_id,
            to: JobState::Succeeded,
            ..
        } if *job_id == submitted.job_id => Some(()),
        _ => None,
    })
    .await;
    agent.stop().await.unwrap();
}

/// Jobs for several devices at once, each in its own transactions on its own shard: the
/// watcher of `fleet/events/#` sees every job's transitions in the order they were made, and
/// a device's registration before its first job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_events_of_concurrent_jobs_arrive_in_the_order_of_the_changes() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let mut ops = OpsWatcher::start(ep).await;
    let mut devices = Vec::new();
    for n in 0..4 {
        devices.push(
            ep.online_device(&format!("SN-ORDER-{n}"), Device::simulated(), |_| {})
                .await,
        );
    }
    let client = ep.client();
    let submissions = devices.iter().flat_map(|d| {
        let client = client.clone();
        (0..10).map(move |i| {
            let client = client.clone();
            let device = d.id.clone();
            async move {
                let (submitted, _) = client
                    .submit_job(&device, &job(&format!("{i}")))
                    .await
                    .unwrap();
                submitted.job_id
            }
        })
    });
    let jobs: std::collections::HashSet<_> = futures_util::future::join_all(submissions)
        .await
        .into_iter()
        .collect();

    let mut seen: std::collections::HashMap<_, Vec<JobState>> = Default::default();
    let mut registered = std::collections::HashSet::new();
    let mut finished = 0;
    ops.wait_for(SOON, |e| {
        match e {
            OpsEvent::DeviceRegistered { device_id, .. } => {
                registered.insert(device_id.clone());
            }
            OpsEvent::JobTransition {
                device_id,
                job_id,
                to,
                ..
            } if jobs.contains(job_id) => {
                assert!(
                    registered.contains(device_id),
                    "a job of {device_id} before its registration"
                );
                seen.entry(job_id.clone()).or_default().push(*to);
                if to.is_terminal() {
                    finished += 1;
                }
            }
            _ => {}
        }
        (finished == jobs.len()).then_some(())
    })
    .await;
    for (job, states) in &seen {
        assert_eq!(states, &ONE_RUN, "job {job}");
    }
    for d in devices {
        d.agent.stop().await.unwrap();
    }
}

/// Registers a device, stops it, and submits a job while it is away. With `mqtt_before` false
/// the device never had an MQTT session, so no broker has a hint queued for it.
async fn job_for_offline_device(
    ep: &e2e_tests::Endpoints,
    serial: &str,
    mqtt_before: bool,
) -> (
    device_sim::AgentConfig,
    MemoryStateStore,
    schemas::api::JobView,
) {
    let token = ep.enrollment_token(1).await;
    let store = MemoryStateStore::default();
    let mut config = ep.agent_config(&token, serial);
    // Longer than the test's deadline: the device must be pushed, it will not poll.
    config.mqtt_grace = std::time::Duration::from_secs(600);
    let mut first = config.clone();
    if !mqtt_before {
        first.endpoints.mqtt.clear();
    }
    let agent = device_sim::start(first, Arc::new(SimulatedExecutor::default()), store.clone());
    let mut events = agent.subscribe();
    wait_for_event(&mut events, SOON, |e| match e {
        AgentEvent::MqttUp { .. } if mqtt_before => Some(()),
        AgentEvent::DataUp { .. } if !mqtt_before => Some(()),
        _ => None,
    })
    .await;
    // Stopped only once it has nothing of its own left to send (registration confirmed, outbox
    // delivered): otherwise it would sync at its next start and fetch the job unasked, and
    // the test would not show the push.
    e2e_tests::eventually(SOON, "the agent has nothing left to send", || async {
        store
            .snapshot()
            .is_some_and(|s| s.registration_completed && s.outbox.is_empty())
    })
    .await;
    let device = agent.device_id().unwrap();
    agent.stop().await.unwrap();
    let (submitted, _) = ep
        .client()
        .submit_job(&device, &job("while you were away"))
        .await
        .unwrap();
    assert_eq!(submitted.state, JobState::Queued);
    (config, store, submitted)
}

/// Waits for the job to be done and checks it was pushed: a hint came before the job started.
async fn completes_after_hint(
    events: &mut tokio::sync::broadcast::Receiver<AgentEvent>,
    job_id: &schemas::JobId,
    expected_kind: Option<HintKind>,
) {
    let mut hinted = false;
    wait_for_event(events, SOON, |e| match e {
        AgentEvent::HintReceived { kind, .. } if expected_kind.is_none_or(|k| k == *kind) => {
            hinted = true;
            None
        }
        AgentEvent::JobStarted { .. } => {
            assert!(hinted, "job started before any hint: the device polled");
            None
        }
        AgentEvent::JobReported { job_id: done } if done == job_id => Some(()),
        _ => None,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_device_gets_its_job_pushed_on_connect() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let (config, store, submitted) = job_for_offline_device(ep, "SN-2", true).await;

    // Back online: the hint queued in its persistent session arrives, and the job completes.
    let agent = device_sim::start(config, Arc::new(SimulatedExecutor::default()), store);
    let mut events = agent.subscribe();
    completes_after_hint(&mut events, &submitted.job_id, None).await;

    let view = ep.client().job(&submitted.job_id).await.unwrap();
    let states: Vec<JobState> = view.history.iter().map(|t| t.to).collect();
    assert_eq!(states, ONE_RUN);
    assert!(
        view.history.windows(2).all(|w| w[0].at <= w[1].at),
        "times go forward"
    );
    assert!(view.history.iter().all(|t| t.at.0 > 0));
    assert_eq!(view.outcome.as_deref(), Some("printed 19 bytes"));
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_triggers_a_push_when_no_hint_was_queued() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let (config, store, submitted) = job_for_offline_device(ep, "SN-3", false).await;

    // First MQTT connection ever: only the cloud's answer to its presence can tell it.
    let agent = device_sim::start(config, Arc::new(SimulatedExecutor::default()), store);
    let mut events = agent.subscribe();
    completes_after_hint(&mut events, &submitted.job_id, Some(HintKind::Pending)).await;
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_job_and_a_dead_device_is_announced_offline() {
    let bridge = InProcessBridge::start_with(|c| c.jobs.lease_secs = 2).await;
    let ep = &bridge.endpoints;
    // A long print: the agent renews its lease every ~0.6 s while it runs.
    let slow = Arc::new(SimulatedExecutor {
        duration: std::time::Duration::from_secs(120),
        ..SimulatedExecutor::default()
    });
    let Device {
        agent,
        mut events,
        id: device,
        ..
    } = ep.online_device("SN-CANCEL", slow, |_| {}).await;
    let mut ops = OpsWatcher::start(ep).await;

    let (submitted, _) = ep.client().submit_job(&device, &job("long")).await.unwrap();
    wait_for_event(&mut events, SOON, |e| match e {
        AgentEvent::JobStarted { job_id, .. } if *job_id == submitted.job_id => Some(()),
        _ => None,
    })
    .await;
    let canceled = ep
        .client()
        .cancel_job(&submitted.job_id, Some("wrong document".into()))
        .await
        .unwrap();
    assert_eq!(canceled.state, JobState::Canceled);
    assert_eq!(canceled.outcome.as_deref(), Some("wrong document"));
    wait_for_event(&mut events, SOON, |e| match e {
        AgentEvent::JobCanceled { job_id } if *job_id == submitted.job_id => Some(()),
        AgentEvent::JobFinished { .. } => panic!("a canceled job ran to the end"),
        _ => None,
    })
    .await;
    // Canceling twice is refused with a clear code.
    let again = ep
        .client()
        .cancel_job(&submitted.job_id, None)
        .await
        .unwrap_err();
    assert_eq!(again.status().map(|s| s.as_u16()), Some(409));

    // The device dies without a goodbye: its last will tells operations.
    agent.kill();
    ops.wait_for(SOON, |e| match e {
        OpsEvent::DeviceOffline {
            device_id,
            channel: schemas::ops::Channel::Mqtt,
            ..
        } if *device_id == device => Some(()),
        _ => None,
    })
    .await;
}
