//! The job generator: jobs at the target rate to random connected devices, each submission
//! timed, with the faults applied on schedule; then the drain, until every acknowledged job is
//! done or the drain window closes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use admin_client::AdminClient;
use schemas::api::SubmitJob;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::connect::Fleet;
use super::{FleetConfig, Shared, Timing};

/// Where a fault stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Before,
    During,
    Over,
}

/// The faults of a run and what they did, for the report.
#[derive(Debug)]
struct Faults {
    cut: Phase,
    restart: Phase,
    killed: Vec<usize>,
    log: Vec<String>,
}

impl Faults {
    /// Starts or ends each fault whose time has come, `elapsed` into the run.
    fn apply(&mut self, cfg: &FleetConfig, fleet: &mut Fleet, elapsed: Duration) {
        if let (Some(f), Some(p)) = (cfg.faults.cut_mqtt, &fleet.proxy) {
            if self.cut == Phase::Before && elapsed >= f.at {
                p.cut();
                self.cut = Phase::During;
                self.log.push(format!(
                    "MQTT cut for {} devices at {:?} for {:?}",
                    fleet.cut_count, f.at, f.length
                ));
            } else if self.cut == Phase::During && elapsed >= f.at + f.length {
                p.restore();
                self.cut = Phase::Over;
            }
        }
        if let Some(f) = cfg.faults.restart_devices {
            if self.restart == Phase::Before && elapsed >= f.at {
                let n = (((cfg.devices as f64) * f.share).round() as usize).min(cfg.devices);
                let mut order: Vec<usize> = (0..cfg.devices).collect();
                for i in 0..n {
                    let j = rand::random_range(i..cfg.devices);
                    order.swap(i, j);
                }
                self.killed = order.into_iter().take(n).collect();
                for &i in &self.killed {
                    fleet.kill(i);
                }
                self.restart = Phase::During;
                self.log.push(format!(
                    "{n} devices killed at {:?}, restarted after {:?}",
                    f.at, f.length
                ));
            } else if self.restart == Phase::During && elapsed >= f.at + f.length {
                for &i in &self.killed {
                    fleet.restart(i);
                }
                self.restart = Phase::Over;
            }
        }
    }
}

/// What the generator did.
#[derive(Debug)]
pub(super) struct Generated {
    pub(super) submitted: u64,
    pub(super) started: Instant,
    pub(super) elapsed: Duration,
    pub(super) faults: Vec<String>,
}

/// Submits jobs for `cfg.load.duration`, applying faults on schedule, then waits for every
/// submission to be answered and for the outstanding jobs.
pub(super) async fn run(
    cfg: &FleetConfig,
    client: &AdminClient,
    shared: &Arc<Shared>,
    fleet: &mut Fleet,
) -> Generated {
    let progress = cfg.report.progress.then(|| {
        let bar = indicatif::ProgressBar::new(cfg.load.duration.as_secs());
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len}s {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let in_flight = Arc::new(Semaphore::new(cfg.load.max_in_flight));
    let mut faults = Faults {
        cut: Phase::Before,
        restart: Phase::Before,
        killed: Vec::new(),
        log: Vec::new(),
    };
    let started = Instant::now();
    let mut submitted: u64 = 0;
    let payload_pad = "x".repeat(cfg.load.payload_bytes.saturating_sub(24));
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    loop {
        tick.tick().await;
        let elapsed = started.elapsed();
        if elapsed >= cfg.load.duration {
            break;
        }
        faults.apply(cfg, fleet, elapsed);
        let due = (elapsed.as_secs_f64() * cfg.load.rate) as u64;
        while submitted < due {
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                break;
            };
            let (device, id) = fleet.ready[rand::random_range(0..fleet.ready.len())].clone();
            let n = {
                let mut state = shared.state();
                let n = state.jobs.len();
                state.jobs.push(Timing::submitted(device));
                state.unhinted[device].push_back(n);
                n
            };
            submitted += 1;
            let (client, shared) = (client.clone(), shared.clone());
            let job = SubmitJob {
                payload: Some(format!("fleet:{n};{payload_pad}")),
                content_type: Some("text/plain".into()),
                ..Default::default()
            };
            tokio::spawn(async move {
                let result = client.submit_job(&id, &job).await;
                let mut state = shared.state();
                match result {
                    Ok((view, _)) => {
                        state.jobs[n].job_id = Some(view.job_id.clone());
                        state.by_job_id.insert(view.job_id.clone(), n);
                        if let Some(at) = state.early_reports.remove(&view.job_id) {
                            shared.complete(n, at, &mut state);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "submission refused");
                        state.jobs[n].refused = true;
                        shared.changed.notify_waiters();
                    }
                }
                drop(permit);
            });
        }
        if let Some(bar) = &progress {
            bar.set_position(elapsed.as_secs());
            bar.set_message(format!(
                "{submitted} submitted, {} completed, {} connected",
                shared.completed.load(Ordering::Relaxed),
                shared.connected.load(Ordering::Relaxed)
            ));
        }
    }
    let elapsed = started.elapsed();
    if let Some(p) = &fleet.proxy {
        p.restore();
    }
    // Wait for every submission to be answered, then for the outstanding jobs.
    let _all = in_flight
        .acquire_many(u32::try_from(cfg.load.max_in_flight).unwrap_or(u32::MAX))
        .await;
    drain(cfg, shared).await;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    Generated {
        submitted,
        started,
        elapsed,
        faults: faults.log,
    }
}

/// Waits until every acknowledged job is done, at most `cfg.load.drain`.
async fn drain(cfg: &FleetConfig, shared: &Shared) {
    let deadline = Instant::now() + cfg.load.drain;
    loop {
        let notified = shared.changed.notified();
        let (acked, completed) = {
            let state = shared.state();
            let acked = state.jobs.iter().filter(|t| t.job_id.is_some()).count() as u64;
            (acked, shared.completed.load(Ordering::Relaxed))
        };
        if completed >= acked || tokio::time::timeout_at(deadline, notified).await.is_err() {
            break;
        }
    }
}
