//! A device that takes a job and dies gives it back when its lease runs out; the job runs
//! again and completes; a job whose lease keeps running out fails at its attempt limit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use device_sim::session::{DataSession, SessionSettings};
use device_sim::{AgentEvent, SimulatedExecutor};
use e2e_tests::{Device, InProcessBridge, OpsWatcher, SOON, wait_for_event, wait_reported};
use schemas::api::SubmitJob;
use schemas::data::{HelloAuth, Request, Response};
use schemas::job::JobState;
use schemas::ops::OpsEvent;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_devices_job_comes_back_and_the_attempt_limit_holds() {
    let bridge = InProcessBridge::start_with(|c| c.jobs.lease_secs = 30).await;
    let ep = &bridge.endpoints;
    // Register the device, then stop its agent.
    let registered = ep
        .online_device("SN-LEASE", Device::simulated(), |_| {})
        .await;
    let credentials = registered.credentials();
    let Device {
        agent,
        id: device,
        store,
        config,
        ..
    } = registered;
    agent.stop().await.unwrap();
    let mut ops = OpsWatcher::start(ep).await;

    let submit = |max_attempts| SubmitJob {
        payload: Some("lease".into()),
        max_attempts: Some(max_attempts),
        ..Default::default()
    };
    let (retried, _) = ep.client().submit_job(&device, &submit(2)).await.unwrap();
    let (doomed, _) = ep.client().submit_job(&device, &submit(1)).await.unwrap();

    // The device takes both jobs and dies without a word.
    let auth = HelloAuth::Device {
        device_id: credentials.device_id.clone(),
        secret: credentials.secret.clone(),
    };
    let (session, _) = DataSession::connect(
        &ep.data_url,
        auth,
        "dying-device",
        SessionSettings::default(),
    )
    .await
    .unwrap();
    let mut leased_until = schemas::UnixMillis(0);
    for job in [&retried, &doomed] {
        let Response::Job(offer) = session
            .request(Request::FetchJob {
                job_id: job.job_id.clone(),
                start: false,
            })
            .await
            .unwrap()
        else {
            panic!("expected a job");
        };
        assert_eq!(offer.attempt, 1);
        leased_until = leased_until.max(offer.lease_until);
    }
    session.close();
    // Time passes: the leases run out (no waiting for the wall clock).
    bridge.clock.advance_past(leased_until);

    // Leases run out: one job goes back to the queue, the other has no attempts left.
    // Both leases run out in the same pass of the reaper, in either order.
    let (mut requeued, mut exhausted) = (false, false);
    ops.wait_for(SOON, |e| {
        if let OpsEvent::JobTransition {
            job_id, to, reason, ..
        } = e
        {
            let lease = reason.as_deref().is_some_and(|r| r.contains("lease"));
            requeued |= *job_id == retried.job_id && *to == JobState::Queued && lease;
            exhausted |= *job_id == doomed.job_id && *to == JobState::Failed && lease;
        }
        (requeued && exhausted).then_some(())
    })
    .await;
    let failed = ep.client().job(&doomed.job_id).await.unwrap();
    assert_eq!(failed.state, JobState::Failed);
    assert!(failed.outcome.unwrap().contains("attempt 1 of 1"));

    // The device comes back (its agent) and runs the returned job to completion.
    let agent = device_sim::start(config, Arc::new(SimulatedExecutor::default()), store);
    let mut events = agent.subscribe();
    let attempt = wait_for_event(&mut events, SOON, |e| match e {
        AgentEvent::JobStarted { job_id, attempt } if *job_id == retried.job_id => Some(*attempt),
        AgentEvent::JobStarted { job_id, .. } if *job_id == doomed.job_id => {
            panic!("a failed job was handed out")
        }
        _ => None,
    })
    .await;
    assert_eq!(attempt, 2);
    wait_reported(&mut events, &retried.job_id).await;
    let done = ep.client().job(&retried.job_id).await.unwrap();
    assert_eq!(done.state, JobState::Succeeded);
    let states: Vec<JobState> = done.history.iter().map(|t| t.to).collect();
    assert_eq!(
        states,
        [
            JobState::Queued,
            JobState::Delivered,
            JobState::Queued,
            JobState::Delivered,
            JobState::InProgress,
            JobState::Succeeded
        ]
    );
    agent.stop().await.unwrap();
}
