//! Retention: finished jobs past their retention leave the API and the disk (archived first),
//! while open jobs and unacknowledged feed entries stay; a `kill -9` in the middle of a sweep
//! loses nothing and leaves no job half deleted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use e2e_tests::{BridgeProcess, Counting, Device, SOON, all_succeed, eventually, init_tracing};
use futures_util::StreamExt;
use schemas::JobId;
use schemas::api::SubmitJob;

/// Finished jobs to sweep: more than a few sweep batches, so that the kill lands in one.
const FINISHED: usize = 1500;
/// Jobs left queued for a device that is offline meanwhile.
const OPEN: usize = 20;

/// Writes the bridge's configuration (read again at each restart).
fn configure(path: &Path, retention: &str) {
    std::fs::write(path, retention).unwrap();
}

/// The ids of the archive's job lines (a job may be there twice). With `torn_tail_allowed`, a
/// last line not yet ended (a write cut short by the kill) is left out.
fn archived(path: &Path, torn_tail_allowed: bool) -> Vec<JobId> {
    let mut text = std::fs::read_to_string(path).unwrap_or_default();
    if !text.is_empty() && !text.ends_with('\n') {
        assert!(torn_tail_allowed, "the archive ends in a line cut short");
        text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
    }
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("an archive line is JSON");
            assert_eq!(v["type"], "job", "{l}");
            assert!(v["payload_base64"].is_string(), "{l}");
            JobId::parse(v["job_id"].as_str().unwrap()).unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_past_retention_are_swept_and_a_kill9_mid_sweep_loses_nothing() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let archive = dir.path().join("archive.jsonl");
    // First kept for ever: the jobs pile up.
    let config = dir.path().join("bridge.toml");
    configure(&config, "[retention]\nfinished_jobs_secs = 0\n");
    let mut bridge = BridgeProcess::start(&data, &["--config", config.to_str().unwrap()]).await;
    let ep = bridge.endpoints.clone();
    let client = ep.client().with_timeout(Duration::from_secs(10));

    // A device that will be offline, with jobs waiting for it (open jobs, unacknowledged
    // feed entries).
    let counting = Counting::default();
    let Device {
        agent,
        id: sleeper,
        store: sleeper_state,
        config: sleeper_config,
        ..
    } = ep
        .online_device("SN-SLEEPER", Arc::new(counting.clone()), |_| {})
        .await;
    agent.stop().await.unwrap();
    let mut open = Vec::new();
    for n in 0..OPEN {
        let job = SubmitJob {
            payload: Some(format!("open {n}")),
            ..Default::default()
        };
        open.push(client.submit_job(&sleeper, &job).await.unwrap().0.job_id);
    }
    // A device whose jobs are all finished: most canceled before it ever took them, some run.
    let Device {
        agent: worker,
        id: busy,
        ..
    } = ep
        .online_device("SN-BUSY", Device::simulated(), |_| {})
        .await;
    let ran: Vec<JobId> = futures_util::stream::iter(0..50)
        .map(|n| {
            let client = client.clone();
            let busy = busy.clone();
            async move {
                let job = SubmitJob {
                    payload: Some(format!("run {n}")),
                    idempotency_key: Some(format!("run-{n}")),
                    ..Default::default()
                };
                client.submit_job(&busy, &job).await.unwrap().0.job_id
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    all_succeed(&client, &ran, Duration::from_secs(60)).await;
    worker.stop().await.unwrap();
    let canceled: Vec<JobId> = futures_util::stream::iter(0..FINISHED - ran.len())
        .map(|n| {
            let client = client.clone();
            let busy = busy.clone();
            async move {
                let job = SubmitJob {
                    payload: Some(format!("cancel {n}")),
                    ..Default::default()
                };
                let id = client.submit_job(&busy, &job).await.unwrap().0.job_id;
                client.cancel_job(&id, None).await.unwrap();
                id
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let finished: HashSet<JobId> = ran.iter().chain(&canceled).cloned().collect();
    assert_eq!(finished.len(), FINISHED);

    // Now with a retention of a second, archived: the sweep starts; kill -9 as soon as the
    // archive shows it under way.
    configure(
        &config,
        &format!(
            "[retention]\nfinished_jobs_secs = 1\nsweep_interval_ms = 20\narchive = {:?}\n",
            archive.display().to_string()
        ),
    );
    bridge.restart().await;
    let started = tokio::time::Instant::now();
    while std::fs::metadata(&archive).map_or(0, |m| m.len()) == 0 {
        assert!(started.elapsed() < SOON, "the sweep never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    bridge.kill9().await;
    let at_kill = archived(&archive, true).len();
    eprintln!("killed with {at_kill} of {FINISHED} jobs archived");

    // Restarted: the sweep finishes; every finished job is gone from the API, having been
    // archived; the open ones are all there.
    bridge.restart().await;
    eventually(Duration::from_secs(60), "every finished job swept", || {
        let (client, busy) = (client.clone(), busy.clone());
        async move { client.device_jobs(&busy).await.is_ok_and(|j| j.is_empty()) }
    })
    .await;
    for id in finished.iter().take(100) {
        let e = client.job(id).await.unwrap_err();
        assert_eq!(e.status().map(|s| s.as_u16()), Some(404), "{id}: {e}");
    }
    let archived: HashSet<JobId> = archived(&archive, false).into_iter().collect();
    assert_eq!(archived, finished, "every swept job was archived first");
    let waiting = client.device_jobs(&sleeper).await.unwrap();
    let waiting: Vec<JobId> = waiting.into_iter().map(|j| j.job_id).collect();
    assert_eq!(waiting, open, "the open jobs are all there, in order");

    // The sleeping device wakes: its feed still offers every open job, and each runs once.
    let agent = device_sim::start(sleeper_config, Arc::new(counting.clone()), sleeper_state);
    all_succeed(&client, &open, Duration::from_secs(60)).await;
    agent.stop().await.unwrap();
    let runs = counting.runs.lock().unwrap().clone();
    for id in &open {
        assert_eq!(runs.get(id), Some(&1), "{id} ran {:?} times", runs.get(id));
    }

    // And on disk: of the jobs, only the open ones are left (all finished now, within
    // their second of retention, or swept).
    bridge.kill9().await;
    let stored: HashSet<JobId> = e2e_tests::export(&data)
        .into_iter()
        .filter(|v| v["type"] == "job")
        .map(|v| JobId::parse(v["job_id"].as_str().unwrap()).unwrap())
        .collect();
    assert!(
        stored.is_disjoint(&finished),
        "swept jobs are gone from the disk"
    );
    assert!(
        stored.is_subset(&open.iter().cloned().collect()),
        "{stored:?}"
    );
}
