//! Printer queues and capabilities: a device registers what its printer can really do; a job
//! asking for more (duplex on a simplex printer) is refused at submission with an error naming
//! the setting; jobs it can honour run with their settings.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use admin_client::ClientError;
use device_sim::executor::ExecFuture;
use device_sim::{JobExecutor, JobOutcome};
use e2e_tests::{Device, InProcessBridge, SOON, eventually, wait_reported};
use hyper::StatusCode;
use schemas::api::SubmitJob;
use schemas::data::{ErrorCode, JobOffer};
use schemas::print::{Capabilities, PrintSettings};

/// Runs every job at once and remembers the settings each came with.
#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<Option<PrintSettings>>>);

impl JobExecutor for Recorder {
    fn run(&self, job: JobOffer) -> ExecFuture {
        self.0.lock().unwrap().push(job.print);
        Box::pin(async {
            JobOutcome::Succeeded {
                detail: Some("printed".into()),
            }
        })
    }
}

fn simplex_mono() -> Capabilities {
    Capabilities {
        media_sizes: vec!["A4".into(), "Letter".into()],
        color: false,
        duplex: false,
        resolutions_dpi: vec![600],
        finishing: vec![],
        max_copies: 99,
    }
}

fn job(print: PrintSettings) -> SubmitJob {
    SubmitJob {
        payload: Some("%PDF-1.7".into()),
        content_type: Some("application/pdf".into()),
        print: Some(print),
        ..SubmitJob::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplex_job_to_a_simplex_printer_is_refused_at_submission_naming_duplex() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let admin = ep.client();
    let recorder = Arc::new(Recorder::default());
    let Device {
        agent,
        mut events,
        id,
        ..
    } = ep
        .online_device("SN-SIMPLEX", recorder.clone(), |c| {
            c.printer = Some(simplex_mono());
        })
        .await;
    eventually(SOON, "the printer queue registered", || async {
        admin
            .capabilities(&id)
            .await
            .is_ok_and(|c| c == simplex_mono())
    })
    .await;
    let jobs_before = admin.device_jobs(&id).await.unwrap().len();

    for (print, named) in [
        (
            PrintSettings {
                duplex: Some(true),
                ..PrintSettings::default()
            },
            "duplex",
        ),
        (
            PrintSettings {
                color: Some(true),
                ..PrintSettings::default()
            },
            "color",
        ),
        (
            PrintSettings {
                media_size: Some("A3".into()),
                ..PrintSettings::default()
            },
            "media_size",
        ),
        (
            PrintSettings {
                finishing: vec!["staple".into()],
                ..PrintSettings::default()
            },
            "finishing",
        ),
    ] {
        match admin.submit_job(&id, &job(print)).await {
            Err(ClientError::Api { status, error }) => {
                assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
                assert_eq!(error.code, ErrorCode::UnsupportedSetting);
                assert!(
                    error.message.starts_with(&format!("device {id}: {named} ")),
                    "{}",
                    error.message
                );
            }
            other => panic!("expected a refusal naming {named}, got {other:?}"),
        }
    }
    assert_eq!(
        admin.device_jobs(&id).await.unwrap().len(),
        jobs_before,
        "refused jobs leave nothing behind"
    );

    // What it can do, it does, and the device gets the settings with the job.
    let fine = PrintSettings {
        media_size: Some("A4".into()),
        duplex: Some(false),
        copies: Some(3),
        ..PrintSettings::default()
    };
    let (accepted, _) = admin.submit_job(&id, &job(fine.clone())).await.unwrap();
    wait_reported(&mut events, &accepted.job_id).await;
    assert_eq!(recorder.0.lock().unwrap().last(), Some(&Some(fine)));
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn print_settings_need_a_printer_queue() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let admin = ep.client();
    let Device { agent, id, .. } = ep
        .online_device("SN-SCANNER", Device::simulated(), |_| {})
        .await;
    match admin.submit_job(&id, &job(PrintSettings::default())).await {
        Err(ClientError::Api { status, error }) => {
            assert_eq!(status, StatusCode::CONFLICT);
            assert_eq!(error.code, ErrorCode::InvalidState);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    match admin.capabilities(&id).await {
        Err(ClientError::Api { error, .. }) => assert_eq!(error.code, ErrorCode::NotFound),
        other => panic!("expected not found, got {other:?}"),
    }
    agent.stop().await.unwrap();
}
