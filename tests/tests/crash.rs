//! kill -9 of the cloud bridge in the middle of 1,000 submissions: after a restart every
//! submission that got a 2xx exists, and the device runs each exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e_tests::{BridgeProcess, Counting, Device, SOON, eventually, init_tracing};
use schemas::JobId;
use schemas::api::SubmitJob;
use schemas::job::JobState;

const JOBS: usize = 1000;
const KILL_AFTER: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_submissions_loses_no_acknowledged_job_and_runs_none_twice() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut bridge = BridgeProcess::start(dir.path(), &[]).await;
    let ep = bridge.endpoints.clone();
    let counting = Counting::default();
    let Device {
        agent, id: device, ..
    } = ep
        .online_device("SN-CRASH", Arc::new(counting.clone()), |_| {})
        .await;

    // Eight submitters share the 1,000 submissions; each records the jobs that got a 2xx.
    let next = Arc::new(AtomicUsize::new(0));
    let acked: Arc<Mutex<Vec<JobId>>> = Arc::default();
    let refused = Arc::new(AtomicUsize::new(0));
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
    let kill_tx = Arc::new(Mutex::new(Some(kill_tx)));
    let mut submitters = Vec::new();
    for _ in 0..8 {
        let (next, acked, refused, kill_tx) = (
            next.clone(),
            acked.clone(),
            refused.clone(),
            kill_tx.clone(),
        );
        let client = ep.client().with_timeout(Duration::from_secs(5));
        let device = device.clone();
        submitters.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= JOBS {
                    return;
                }
                let job = SubmitJob {
                    payload: Some(format!("job {n}")),
                    idempotency_key: Some(format!("submission-{n}")),
                    ..Default::default()
                };
                match client.submit_job(&device, &job).await {
                    Ok((view, _)) => {
                        let mut acked = acked.lock().unwrap();
                        acked.push(view.job_id);
                        if acked.len() == KILL_AFTER
                            && let Some(tx) = kill_tx.lock().unwrap().take()
                        {
                            let _ = tx.send(());
                        }
                    }
                    Err(_) => {
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    tokio::time::timeout(SOON, kill_rx).await.unwrap().unwrap();
    bridge.kill9().await;
    bridge.restart().await;
    for s in submitters {
        s.await.unwrap();
    }
    let acked: Vec<JobId> = acked.lock().unwrap().clone();
    let refused = refused.load(Ordering::SeqCst);
    assert_eq!(acked.len() + refused, JOBS);
    assert!(acked.len() >= KILL_AFTER);
    eprintln!(
        "{} submissions acknowledged, {refused} failed while the bridge was down",
        acked.len()
    );

    // Every acknowledged job exists after the restart, and all of them complete.
    let client = ep.client();
    let acked_set: HashSet<JobId> = acked.iter().cloned().collect();
    assert_eq!(
        acked_set.len(),
        acked.len(),
        "two submissions got the same job"
    );
    eventually(
        Duration::from_secs(120),
        "every acknowledged job succeeded",
        || {
            let client = client.clone();
            let acked_set = acked_set.clone();
            let device = device.clone();
            async move {
                let jobs = client.device_jobs(&device).await.unwrap_or_default();
                let done: HashSet<JobId> = jobs
                    .iter()
                    .filter(|j| j.state == JobState::Succeeded)
                    .map(|j| j.job_id.clone())
                    .collect();
                acked_set.is_subset(&done)
            }
        },
    )
    .await;
    let jobs = client.device_jobs(&device).await.unwrap();
    let existing: HashSet<JobId> = jobs.iter().map(|j| j.job_id.clone()).collect();
    assert!(acked_set.is_subset(&existing));

    // Exactly once on the device: every acknowledged job ran once, and nothing ran twice.
    let runs = counting.runs.lock().unwrap().clone();
    for id in &acked {
        assert_eq!(
            runs.get(id),
            Some(&1),
            "job {id} ran {:?} times",
            runs.get(id)
        );
    }
    assert!(runs.values().all(|&n| n == 1), "a job ran twice: {runs:?}");
    for job in &jobs {
        let succeeded = job
            .history
            .iter()
            .filter(|t| t.to == JobState::Succeeded)
            .count();
        assert!(
            succeeded <= 1,
            "job {} succeeded {succeeded} times",
            job.job_id
        );
    }
    agent.stop().await.unwrap();
}

/// The Rust client retries a submission under an idempotency key of its own: with the
/// bridge killed (-9) and restarted in the middle of 300 submissions that carry no key of
/// the caller's, every one of them succeeds and makes exactly one job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retrying_client_makes_each_job_exactly_once_across_a_kill9() {
    const SUBMISSIONS: usize = 300;
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut bridge = BridgeProcess::start(dir.path(), &[]).await;
    let ep = bridge.endpoints.clone();
    let Device {
        agent, id: device, ..
    } = ep
        .online_device("SN-RETRY", Device::simulated(), |_| {})
        .await;
    // Retries over about 12 s: room for a restart on a loaded machine.
    let client = ep
        .client()
        .with_timeout(Duration::from_secs(5))
        .with_retries(5);
    let next = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<()>();
    let kill_tx = Arc::new(Mutex::new(Some(kill_tx)));
    let mut submitters = Vec::new();
    for _ in 0..8 {
        let (client, device, next, answered, kill_tx) = (
            client.clone(),
            device.clone(),
            next.clone(),
            answered.clone(),
            kill_tx.clone(),
        );
        submitters.push(tokio::spawn(async move {
            let mut made = Vec::new();
            while next.fetch_add(1, Ordering::SeqCst) < SUBMISSIONS {
                let job = SubmitJob {
                    payload: Some("no key of mine".into()),
                    ..Default::default()
                };
                let (view, created) = client.submit_job(&device, &job).await.unwrap();
                assert!(created, "a job this call made");
                made.push(view.job_id);
                if answered.fetch_add(1, Ordering::SeqCst) + 1 == SUBMISSIONS / 3
                    && let Some(tx) = kill_tx.lock().unwrap().take()
                {
                    let _ = tx.send(());
                }
            }
            made
        }));
    }
    tokio::time::timeout(SOON, kill_rx).await.unwrap().unwrap();
    bridge.kill9().await;
    bridge.restart().await;
    let mut made = Vec::new();
    for s in submitters {
        made.extend(s.await.unwrap());
    }
    assert_eq!(made.len(), SUBMISSIONS, "every submission answered");
    let distinct: HashSet<&JobId> = made.iter().collect();
    assert_eq!(
        distinct.len(),
        SUBMISSIONS,
        "two submissions got the same job"
    );
    assert!(
        client.retried() > 0,
        "nothing was retried: the kill came too late"
    );
    let stored = ep.client().device_jobs(&device).await.unwrap();
    assert_eq!(
        stored.len(),
        SUBMISSIONS,
        "a submission made two jobs, or none"
    );
    assert!(stored.iter().all(|j| distinct.contains(&j.job_id)));
    agent.stop().await.unwrap();
}
