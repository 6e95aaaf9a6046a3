//! The verdict: every job the cloud acknowledged is checked against the cloud's own records
//! (lost, run twice, unfinished), and the timings and resource use become the report.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use admin_client::{AdminClient, ClientError};
use schemas::job::JobState;
use schemas::{DeviceId, JobId};
use tokio::time::Instant;

use super::generator::Generated;
use super::procstat::ProcUsage;
use super::report::{self, FleetReport, Latency, ProcessReport, Second};
use super::{FleetConfig, Shared};

/// Each job's state and how often it succeeded, as the cloud has them.
pub(super) type CloudRecords = HashMap<JobId, (JobState, usize)>;

/// Every job of every connected device, through the admin API.
pub(super) async fn cloud_records(
    client: &AdminClient,
    ready: &[(usize, DeviceId)],
) -> Result<CloudRecords, ClientError> {
    let mut cloud = CloudRecords::new();
    for (_, id) in ready {
        for job in client.device_jobs(id).await? {
            let succeeded = job
                .history
                .iter()
                .filter(|t| t.to == JobState::Succeeded)
                .count();
            cloud.insert(job.job_id, (job.state, succeeded));
        }
    }
    Ok(cloud)
}

/// Adds the jobs of the bridge's retention archive that the admin API no longer has (a job
/// archived twice, by a sweep cut short, is the same record twice).
pub(super) fn archived_records(
    path: &std::path::Path,
    cloud: &mut CloudRecords,
) -> std::io::Result<()> {
    #[derive(serde::Deserialize)]
    struct Archived {
        job_id: JobId,
        state: JobState,
        history: Vec<schemas::job::Transition>,
    }
    let text = match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        read => read?,
    };
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let job: Archived = serde_json::from_str(line).map_err(std::io::Error::other)?;
        let succeeded = job
            .history
            .iter()
            .filter(|t| t.to == JobState::Succeeded)
            .count();
        cloud.entry(job.job_id).or_insert((job.state, succeeded));
    }
    Ok(())
}

/// Resource use and the bridge's counters over the measured part of the run (connecting and
/// warming up excluded).
#[derive(Debug)]
pub(super) struct Measure {
    started: Instant,
    sim_before: ProcUsage,
    watched_before: Vec<ProcUsage>,
    metrics_before: serde_json::Value,
    wall: Duration,
    sim_after: ProcUsage,
    watched_after: Vec<Option<ProcUsage>>,
    metrics_after: serde_json::Value,
}

impl Measure {
    pub(super) async fn start(
        cfg: &FleetConfig,
        client: &AdminClient,
    ) -> Result<Measure, ClientError> {
        let started = Instant::now();
        let sim_before = ProcUsage::current().unwrap_or_default();
        let watched_before = cfg
            .report
            .watch
            .iter()
            .map(|(_, pid)| ProcUsage::of(*pid).unwrap_or_default())
            .collect();
        let metrics_before = client.metrics().await?;
        Ok(Measure {
            started,
            sim_before,
            watched_before,
            metrics_before,
            wall: Duration::ZERO,
            sim_after: ProcUsage::default(),
            watched_after: Vec::new(),
            metrics_after: serde_json::Value::Null,
        })
    }

    /// The end of the measured time (the generator and the drain are over): the bridge's
    /// processes' CPU and counters are read now, before anything else asks the bridge.
    pub(super) async fn finish(
        &mut self,
        cfg: &FleetConfig,
        client: &AdminClient,
    ) -> Result<(), ClientError> {
        self.wall = self.started.elapsed();
        self.sim_after = ProcUsage::current().unwrap_or_default();
        self.watched_after = cfg
            .report
            .watch
            .iter()
            .map(|(_, pid)| ProcUsage::of(*pid))
            .collect();
        self.metrics_after = client.metrics().await?;
        Ok(())
    }
}

/// What the report says about bringing the fleet up.
#[derive(Debug)]
pub(super) struct Connected {
    pub(super) connected: usize,
    pub(super) connect_secs: f64,
    pub(super) warmup_secs: Option<f64>,
    pub(super) final_round_secs: Option<f64>,
}

/// The report: each acknowledged job checked against `cloud`, the timings tallied.
pub(super) fn report(
    cfg: &FleetConfig,
    shared: &Shared,
    fleet: &Connected,
    generated: &Generated,
    cloud: &CloudRecords,
    m: &Measure,
) -> FleetReport {
    let wall = m.wall;
    let state = shared.state();
    let mut hint = report::histogram();
    let mut fetch = report::histogram();
    let mut complete = report::histogram();
    let mut per_second: Vec<hdrhistogram::Histogram<u64>> = Vec::new();
    let mut submitted_per_second: Vec<u64> = Vec::new();
    let (
        mut acked,
        mut refused,
        mut completed,
        mut lost,
        mut duplicated,
        mut rerun,
        mut fallback,
        mut fetched_total,
    ) = (0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut last_completion: Option<Instant> = None;
    let mut unfinished = 0u64;
    let mut samples = Vec::new();
    for t in &state.jobs {
        let second = t
            .submitted
            .saturating_duration_since(generated.started)
            .as_secs() as usize;
        if cfg.report.keep_samples {
            let us = |at: Option<Instant>| {
                at.map(|a| u64::try_from((a - t.submitted).as_micros()).unwrap_or(u64::MAX))
            };
            samples.push(report::Sample {
                second: u32::try_from(second).unwrap_or(u32::MAX),
                hint_us: us(t.hinted),
                fetch_us: us(t.fetched),
                complete_us: us(t.completed),
                via_fallback: t.via_fallback,
            });
        }
        if per_second.len() <= second {
            per_second.resize_with(second + 1, report::histogram);
            submitted_per_second.resize(second + 1, 0);
        }
        submitted_per_second[second] += 1;
        if t.refused {
            refused += 1;
        }
        if let Some(h) = t.hinted {
            report::record(&mut hint, h - t.submitted);
        }
        if let Some(f) = t.fetched {
            report::record(&mut fetch, f - t.submitted);
            fetched_total += 1;
            if t.via_fallback {
                fallback += 1;
            }
        }
        if let Some(c) = t.completed {
            completed += 1;
            report::record(&mut complete, c - t.submitted);
            report::record(&mut per_second[second], c - t.submitted);
            last_completion = Some(last_completion.map_or(c, |l| l.max(c)));
        }
        if t.runs_started > 1 && t.runs_finished <= 1 {
            rerun += 1;
        }
        let Some(id) = &t.job_id else { continue };
        acked += 1;
        match cloud.get(id) {
            Some((JobState::Succeeded, n)) => {
                if *n > 1 || t.runs_finished > 1 {
                    duplicated += 1;
                }
            }
            // Still queued or running when the drain window closed: backlog, not loss.
            Some((state, _)) if !state.is_terminal() => unfinished += 1,
            // Missing from the cloud's records, or ended without being done.
            _ => lost += 1,
        }
    }
    let mut completions: Vec<Instant> = state.jobs.iter().filter_map(|t| t.completed).collect();
    completions.sort();
    let longest_gap = completions
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let metric = |m: &serde_json::Value, k: &str| m.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let (metrics_before, metrics_after) = (&m.metrics_before, &m.metrics_after);
    let (requests_before, requests_after) = (
        metric(metrics_before, "data_requests"),
        metric(metrics_after, "data_requests"),
    );
    let restarted = requests_after < requests_before;
    let requests = requests_after.saturating_sub(requests_before);
    let connections = metric(metrics_after, "data_connections_total")
        .saturating_sub(metric(metrics_before, "data_connections_total"));
    let hints_coalesced = metric(metrics_after, "hints_coalesced")
        .saturating_sub(metric(metrics_before, "hints_coalesced"));
    let device_hours = cfg.devices as f64 * wall.as_secs_f64() / 3600.0;
    let span = match (state.jobs.first(), last_completion) {
        (Some(first), Some(last)) => (last - first.submitted).as_secs_f64(),
        _ => 0.0,
    };
    let mut processes = vec![ProcessReport::new(
        "device-sim fleet",
        std::process::id(),
        &m.sim_before,
        &m.sim_after,
        wall,
    )];
    for (((name, pid), before), after) in cfg
        .report
        .watch
        .iter()
        .zip(&m.watched_before)
        .zip(&m.watched_after)
    {
        if let Some(after) = after {
            processes.push(ProcessReport::new(name, *pid, before, after, wall));
        }
    }
    let mode = match &cfg.mqtt {
        None => format!("poll-only every {:?}", cfg.device.poll_interval),
        Some(_) => "push".to_owned(),
    };
    FleetReport {
        label: cfg.label.clone(),
        mode,
        devices: cfg.devices,
        devices_connected: fleet.connected,
        connect_secs: fleet.connect_secs,
        warmup_secs: fleet.warmup_secs,
        target_rate: cfg.load.rate,
        duration_secs: generated.elapsed.as_secs_f64(),
        jobs_submitted: generated.submitted,
        jobs_acknowledged: acked,
        jobs_refused: refused,
        jobs_completed: completed,
        jobs_per_sec: if span > 0.0 {
            completed as f64 / span
        } else {
            0.0
        },
        submit_to_hint: Latency::from_histogram(&hint),
        submit_to_fetch: Latency::from_histogram(&fetch),
        submit_to_complete: Latency::from_histogram(&complete),
        fallback_share: report::share(fallback, fetched_total),
        jobs_lost: lost,
        jobs_unfinished: unfinished,
        jobs_duplicated: duplicated,
        jobs_rerun_after_crash: rerun,
        longest_completion_gap_ms: longest_gap.as_secs_f64() * 1000.0,
        server_requests_per_device_hour: (!restarted && device_hours > 0.0)
            .then(|| requests as f64 / device_hours),
        server_connections_per_device_hour: (!restarted && device_hours > 0.0)
            .then(|| connections as f64 / device_hours),
        hints_coalesced,
        events_lagged: shared.lagged.load(Ordering::Relaxed),
        mqtt: report::MqttChurn {
            downs: state.mqtt_downs,
            reconnects: state.reconnects.iter().sum(),
            most_reconnects_of_one_device: state.reconnects.iter().copied().max().unwrap_or(0),
            devices_reconnected_twice: state.reconnects.iter().filter(|n| **n > 1).count() as u64,
            last_reconnect_unix_ms: state.last_reconnect.and_then(|t| {
                let since = t.duration_since(std::time::UNIX_EPOCH).ok()?;
                u64::try_from(since.as_millis()).ok()
            }),
        },
        final_round_secs: fleet.final_round_secs,
        faults: generated.faults.clone(),
        processes,
        per_second: per_second
            .iter()
            .zip(&submitted_per_second)
            .enumerate()
            .map(|(i, (h, &n))| Second::from_histogram(i, n, h))
            .collect(),
        samples,
    }
}
