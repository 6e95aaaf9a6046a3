//! Page counters reported while jobs print, from the cloud and from the panel at the same time:
//! every reading the cloud receives is whole (total = colour + mono = the sum over media) and
//! none goes backwards; the cloud would refuse either (checked here too).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use device_sim::counters::SimulatedCounters;
use device_sim::{AgentEvent, SimulatedExecutor, Submitted};
use e2e_tests::{Device, InProcessBridge, SOON, eventually};
use schemas::api::SubmitJob;
use schemas::data::ErrorCode;
use schemas::outbox::DeviceRequest;
use schemas::print::{Capabilities, PageCounters, PrintSettings};

fn printer() -> Capabilities {
    Capabilities {
        media_sizes: vec!["A4".into(), "Letter".into()],
        color: true,
        duplex: true,
        resolutions_dpi: vec![600],
        finishing: vec![],
        max_copies: 99,
    }
}

/// One case: `jobs` cloud jobs and `reads` reports from the panel while local copies print.
async fn case(seed: u64, jobs: usize, reads: usize) {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let admin = ep.client();
    let counters = Arc::new(SimulatedCounters::default());
    let executor = Arc::new(SimulatedExecutor {
        duration: std::time::Duration::from_millis(5),
        counters: Some(counters.clone()),
        ..SimulatedExecutor::default()
    });
    let source = counters.clone();
    let Device {
        agent,
        mut events,
        id,
        ..
    } = ep
        .online_device(&format!("SN-COUNT-{seed}"), executor, move |c| {
            c.printer = Some(printer());
            c.counters = Some(source);
        })
        .await;

    // Copies made at the panel count pages all the time, on another thread.
    let stop = Arc::new(AtomicBool::new(false));
    let copier = {
        let (c, stop) = (counters.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = seed;
            while !stop.load(Ordering::SeqCst) {
                n = n
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                c.count_page(
                    n >> 63 == 1,
                    if (n >> 62) & 1 == 1 { "A4" } else { "Letter" },
                );
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
        })
    };
    let mut submitted = Vec::new();
    for i in 0..jobs.max(reads) {
        if i < jobs {
            let print = PrintSettings {
                color: Some((seed + i as u64).is_multiple_of(2)),
                media_size: Some(if i.is_multiple_of(3) { "Letter" } else { "A4" }.into()),
                copies: Some(1 + (i % 4) as u16),
                ..PrintSettings::default()
            };
            let (job, _) = admin
                .submit_job(
                    &id,
                    &SubmitJob {
                        payload: Some("%PDF".into()),
                        print: Some(print),
                        ..SubmitJob::default()
                    },
                )
                .await
                .unwrap();
            submitted.push(job.job_id);
        }
        if i < reads {
            assert!(matches!(
                agent.report_counters().await.unwrap(),
                Submitted::Queued(_)
            ));
        }
    }
    eventually(SOON, "every job done", || async {
        let mut done = 0;
        for j in &submitted {
            done += usize::from(admin.job(j).await.unwrap().state.is_terminal());
        }
        done == submitted.len()
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    copier.join().unwrap();
    // A last reading after everything, and its delivery as a sentinel.
    let Submitted::Queued(last) = agent.report_counters().await.unwrap() else {
        panic!("consent is given")
    };
    eventually(SOON, "the last reading delivered", || async {
        admin.device(&id).await.unwrap().requests_delivered >= last
    })
    .await;

    while let Ok(e) = events.try_recv() {
        if let AgentEvent::RequestRefused { no, error } = e {
            panic!("the cloud refused reading {no}: {error}");
        }
    }
    let readings: Vec<PageCounters> = admin
        .all_device_requests(&id)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.body {
            DeviceRequest::Counters { counters } => Some(counters),
            _ => None,
        })
        .collect();
    assert!(readings.len() > jobs + reads, "{} readings", readings.len());
    let mut earlier = PageCounters::default();
    for r in &readings {
        assert!(r.is_consistent(), "torn: {r:?}");
        assert_eq!(r.went_backwards(&earlier), None);
        earlier = r.clone();
    }
    let view = admin.device(&id).await.unwrap();
    assert_eq!(view.counters.unwrap().counters, earlier);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_reported_while_jobs_print_are_never_torn_and_never_go_backwards() {
    for (seed, jobs, reads) in [(1, 12, 20), (2, 20, 8), (3, 5, 30)] {
        case(seed, jobs, reads).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloud_refuses_torn_and_backward_readings() {
    use device_sim::session::{DataSession, SessionSettings};
    use schemas::UnixMillis;
    use schemas::data::{HelloAuth, Request, Response};
    use schemas::outbox::{OutboxItem, RequestNo};

    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let Device {
        agent, id, store, ..
    } = ep
        .online_device("SN-RAW", Device::simulated(), |_| {})
        .await;
    let credentials = store.snapshot().unwrap().credentials.unwrap();
    let next = store.snapshot().unwrap().last_request.0;
    agent.stop().await.unwrap();
    let (session, _) = DataSession::connect(
        &ep.data_url,
        HelloAuth::Device {
            device_id: id.clone(),
            secret: credentials.secret,
        },
        "test",
        SessionSettings::default(),
    )
    .await
    .unwrap();
    let reading = |total, color, mono| PageCounters {
        total,
        color,
        mono,
        per_media: [("A4".to_owned(), total)].into(),
    };
    let item = |no: u64, counters| OutboxItem {
        no: RequestNo(next + no),
        made_at: UnixMillis::now(),
        body: DeviceRequest::Counters { counters },
    };
    let Response::Delivered { refused, .. } = session
        .request(Request::Deliver {
            items: vec![
                item(1, reading(10, 4, 6)),
                item(2, reading(11, 4, 6)),
                item(3, reading(9, 3, 6)),
                item(4, reading(12, 5, 7)),
            ],
        })
        .await
        .unwrap()
    else {
        panic!("delivered")
    };
    let codes: Vec<(u64, ErrorCode)> = refused
        .iter()
        .map(|r| (r.no.0 - next, r.error.code))
        .collect();
    assert_eq!(
        codes,
        vec![(2, ErrorCode::BadRequest), (3, ErrorCode::InvalidState)],
        "{refused:?}"
    );
    let view = ep.client().device(&id).await.unwrap();
    assert_eq!(view.counters.unwrap().counters, reading(12, 5, 7));
}
