//! Moving a job between printer queues: a job queued for printer A (offline, jammed) is moved to
//! printer B, which prints it; A, back later, never prints it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use admin_client::ClientError;
use device_sim::AgentEvent;
use e2e_tests::{Device, InProcessBridge, SOON, wait_for_event, wait_reported};
use hyper::StatusCode;
use schemas::Secret;
use schemas::api::SubmitJob;
use schemas::data::{ErrorCode, OwnerClaim};
use schemas::job::JobState;
use schemas::print::{Capabilities, PrintSettings};

fn printer(duplex: bool) -> Capabilities {
    Capabilities {
        media_sizes: vec!["A4".into()],
        color: true,
        duplex,
        resolutions_dpi: vec![600],
        finishing: vec![],
        max_copies: 99,
    }
}

fn pdf(print: Option<PrintSettings>) -> SubmitJob {
    SubmitJob {
        payload: Some("%PDF-1.7".into()),
        print,
        ..SubmitJob::default()
    }
}

fn refusal<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (StatusCode, ErrorCode) {
    match r {
        Err(ClientError::Api { status, error }) => (status, error.code),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_job_is_printed_by_the_new_printer_only_even_when_the_old_one_comes_back() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let admin = ep.client();
    let anna = admin.create_owner("Anna").await.unwrap();
    let as_anna = admin.with_token(anna.token.clone());
    let claim = OwnerClaim {
        owner_id: anna.owner_id.clone(),
        pin: Secret::new("1357"),
    };
    let owned = |duplex| {
        let claim = claim.clone();
        move |c: &mut device_sim::AgentConfig| {
            c.owner = Some(claim);
            c.printer = Some(printer(duplex));
        }
    };
    let a = ep
        .online_device("SN-A", Device::simulated(), owned(true))
        .await;
    let b = ep
        .online_device("SN-B", Device::simulated(), owned(true))
        .await;
    let simplex = ep
        .online_device("SN-S", Device::simulated(), owned(false))
        .await;
    let stranger = ep
        .online_device("SN-X", Device::simulated(), |c| {
            c.printer = Some(printer(true))
        })
        .await;

    // A jams and goes offline; a duplex job waits in its queue.
    let (a_config, a_store, a_id) = (a.config.clone(), a.store.clone(), a.id.clone());
    a.agent.kill();
    let duplex = PrintSettings {
        duplex: Some(true),
        ..PrintSettings::default()
    };
    let (job, _) = as_anna.submit_job(&a.id, &pdf(Some(duplex))).await.unwrap();

    // Refused: to a printer that cannot honour it, to another owner's, by the job's own queue.
    assert_eq!(
        refusal(as_anna.move_job(&job.job_id, &simplex.id).await),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::UnsupportedSetting
        )
    );
    assert_eq!(
        refusal(as_anna.move_job(&job.job_id, &stranger.id).await).1,
        ErrorCode::Forbidden
    );
    assert_eq!(
        refusal(as_anna.move_job(&job.job_id, &a.id).await).1,
        ErrorCode::BadRequest
    );

    // B is off too when the job moves to it; A comes back first. A's feed still names the job,
    // but it never takes it: a job for A sent afterwards shows A has read past that entry.
    let (b_config, b_store, b_id) = (b.config.clone(), b.store.clone(), b.id.clone());
    b.agent.kill();
    let moved = as_anna.move_job(&job.job_id, &b_id).await.unwrap();
    assert_eq!(moved.device_id, b_id);
    assert!(
        moved
            .history
            .last()
            .unwrap()
            .reason
            .as_deref()
            .unwrap()
            .contains("moved from")
    );
    let a = device_sim::start(a_config, Device::simulated(), a_store);
    let mut a_events = a.subscribe();
    let (sentinel, _) = admin.submit_job(&a_id, &pdf(None)).await.unwrap();
    wait_for_event(&mut a_events, SOON, |e| match e {
        AgentEvent::JobFetched { job_id, .. } if *job_id == job.job_id => {
            panic!("the old printer took the moved job")
        }
        AgentEvent::JobReported { job_id } if *job_id == sentinel.job_id => Some(()),
        _ => None,
    })
    .await;
    assert_eq!(
        admin.job(&job.job_id).await.unwrap().state,
        JobState::Queued
    );

    // B comes back and prints it.
    let b = device_sim::start(b_config, Device::simulated(), b_store);
    let mut b_events = b.subscribe();
    wait_reported(&mut b_events, &job.job_id).await;
    let done = admin.job(&job.job_id).await.unwrap();
    assert_eq!((done.state, &done.device_id), (JobState::Succeeded, &b_id));
    // A finished job stays where it is.
    assert_eq!(
        refusal(as_anna.move_job(&job.job_id, &a_id).await),
        (StatusCode::CONFLICT, ErrorCode::InvalidState)
    );
    assert!(
        !admin
            .device_jobs(&a_id)
            .await
            .unwrap()
            .iter()
            .any(|j| j.job_id == job.job_id)
    );
    b.stop().await.unwrap();
    a.stop().await.unwrap();
}
