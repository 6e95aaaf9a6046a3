//! A flush that fails under load, with the whole bridge: everything acknowledged before it is
//! on disk, nothing is acknowledged after it, and memory stays what the store accepted.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use schemas::admin::{ListDevices, SubmitJobOp};
use schemas::api::SubmitJob;
use schemas::data::{Registration, Request, Response};
use schemas::job::{JobState, JobUpdate};
use schemas::{DeviceId, JobId, Secret, UnixMillis};
use tokio_util::sync::CancellationToken;

use crate::admin::AppState;
use crate::admin::serve::{Call, Serve};
use crate::bridge::Bridge;
use crate::core::{Core, JobPolicy, Principal};
use crate::notifier::Notifier;
use crate::store::{Committer, FailingStore, Store};

/// Submits a job as the administrator would over HTTP.
async fn submit(state: &AppState, device: &DeviceId, payload: &str) -> Option<JobId> {
    let call = Call {
        principal: Principal::Admin,
        params: device.clone(),
        query: (),
        body: SubmitJob {
            payload: Some(payload.into()),
            ..SubmitJob::default()
        },
    };
    let reply = SubmitJobOp::serve(state, call).await.ok()?;
    Some(reply.answer.job_id)
}

/// One device's work, until the first refusal: submit a job, take it, finish it. Every
/// acknowledged step is recorded as (job, state).
async fn device_loop(
    state: AppState,
    device: DeviceId,
    acked: Arc<std::sync::Mutex<Vec<(JobId, JobState)>>>,
    count: Arc<AtomicUsize>,
) {
    let note = |job: &JobId, state| {
        acked.lock().unwrap().push((job.clone(), state));
        count.fetch_add(1, Ordering::SeqCst);
    };
    let bridge = &state.bridge;
    loop {
        let Some(job) = submit(&state, &device, "%PDF").await else {
            return;
        };
        note(&job, JobState::Queued);
        let fetch = Request::FetchJob {
            job_id: job.clone(),
            start: true,
        };
        let Ok(Response::Job(offer)) = bridge.handle(&device, fetch).await else {
            return;
        };
        note(&job, JobState::InProgress);
        let done = Request::JobUpdate {
            job_id: job.clone(),
            attempt: offer.attempt,
            update: JobUpdate::Succeeded { detail: None },
        };
        let Ok(Response::JobState { state, .. }) = bridge.handle(&device, done).await else {
            return;
        };
        note(&job, state);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failed_flush_nothing_more_is_acknowledged_and_what_was_is_on_disk() {
    let store = Arc::new(FailingStore::default());
    // A paced flusher, so that batches wait for flushes in groups as under load.
    let committer = Committer::new(store.clone(), Duration::from_millis(2));
    let shutdown = CancellationToken::new();
    let flusher = tokio::spawn(committer.clone().run_flusher(shutdown.clone()));
    let core = Core::load(committer.clone(), JobPolicy::default(), 4).unwrap();
    let clock = Arc::new(crate::clock::SystemClock);
    let bridge = Bridge::new(
        core,
        committer.clone(),
        Notifier::new(1 << 16),
        "embedded",
        clock,
        0,
    );
    let state = AppState::new(bridge.clone(), Secret::new("admin"), false);
    let token = Secret::new("enrol");
    let now = UnixMillis::now();
    let (_, ticket) = bridge
        .core()
        .create_enrollment(token.clone(), "acme".into(), 8, 60_000, now)
        .unwrap();
    committer.wait_durable(ticket).await.unwrap();
    let mut devices = Vec::new();
    for n in 0..8 {
        let reg = Registration {
            registration_id: None,
            enrollment_token: token.clone(),
            serial: format!("SN{n}"),
            model: "MFP-1".into(),
            destination: "EU".into(),
            time_zone: "UTC".into(),
            owner: None,
        };
        devices.push(bridge.register(&reg).await.unwrap().0.device_id);
    }

    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = devices
        .iter()
        .map(|d| {
            let work = device_loop(state.clone(), d.clone(), acked.clone(), count.clone());
            tokio::spawn(work)
        })
        .collect();
    // The flush fails in the middle of the traffic.
    let mut progress = tokio::time::interval(Duration::from_millis(5));
    tokio::time::timeout(Duration::from_secs(30), async {
        while count.load(Ordering::SeqCst) < 300 {
            progress.tick().await;
        }
    })
    .await
    .expect("300 steps were acknowledged");
    store.fail_flushes.store(true, Ordering::SeqCst);
    for w in workers {
        tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .expect("every device's work stops at a refusal")
            .unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    // Nothing more is acknowledged, reads included, and nothing more is accepted.
    assert!(committer.failure().is_some());
    assert_eq!(submit(&state, &devices[0], "late").await, None);
    let list = Call {
        principal: Principal::Admin,
        params: (),
        query: schemas::api::DevicesQuery::default(),
        body: (),
    };
    assert!(
        ListDevices::serve(&state, list).await.is_err(),
        "a read was answered"
    );

    // Memory is what the store holds (every batch the store accepted, durable or not).
    let reloaded = Core::load(
        Committer::new(store.clone(), Duration::ZERO),
        JobPolicy::default(),
        4,
    )
    .unwrap();
    assert_eq!(bridge.core().snapshot(), reloaded.snapshot());

    // What a restart finds holds everything that was acknowledged.
    let disk: Arc<dyn Store> = Arc::new(store.durable());
    let restarted = Core::load(
        Committer::new(disk, Duration::ZERO),
        JobPolicy::default(),
        4,
    )
    .unwrap();
    for (job, state) in &acked {
        let found = restarted
            .job(job)
            .unwrap_or_else(|e| panic!("acknowledged job {job} is not on disk: {e}"));
        assert!(
            found.history.iter().any(|t| t.to == *state),
            "job {job} was acknowledged {state:?}, on disk it is {:?}",
            found.history
        );
    }
    shutdown.cancel();
    flusher.await.unwrap();
}
