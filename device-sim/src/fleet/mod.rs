//! `device-sim fleet`: many simulated devices in one process, a job generator, faults on demand,
//! and a report.
//!
//! Timing. The generator notes when it sends each submission; the job's payload carries its
//! number, so the simulated print engine knows which job it is fetching. A hint is credited to
//! the oldest submissions to that device not yet hinted. "Completion recorded" is when the device
//! has the cloud's answer to its final report, which the cloud gives only once it is on disk.
//!
//! Lost and duplicated jobs are decided at the end from the cloud's own records (every job of
//! every device, fetched through the admin API), checked against what the devices saw.

pub mod cli;
mod connect;
mod generator;
pub mod procstat;
pub mod proxy;
pub mod report;
mod verify;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use admin_client::{AdminClient, ClientError};
use schemas::api::{CreateEnrollmentToken, SubmitJob};
use schemas::data::JobOffer;
use schemas::{DeviceId, JobId, Secret};
use tokio::sync::{Notify, Semaphore, broadcast};
use tokio::time::Instant;

use crate::agent::{AgentConfig, AgentEvent, AgentHandle, DeviceInfo};
use crate::executor::{ExecFuture, JobExecutor, JobOutcome};
use crate::state::MemoryStateStore;
use report::FleetReport;

/// A fault applied to a share of the devices at a time into the run, for a while.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fault {
    pub share: f64,
    pub at: Duration,
    pub length: Duration,
}

#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub label: String,
    pub admin_url: String,
    pub admin_token: Secret,
    pub data_url: String,
    /// `None`: poll-only devices.
    pub mqtt: Option<(String, u16)>,
    pub devices: usize,
    /// Devices started per second.
    pub connect_rate: u32,
    /// How each simulated device behaves.
    pub device: DeviceBehaviour,
    /// The jobs the generator submits.
    pub load: Load,
    /// What the generator does to the devices on schedule.
    pub faults: Faults,
    /// What is run and checked around the measurement.
    pub checks: Checks,
    /// What goes in the report besides the figures.
    pub report: Reporting,
}

#[derive(Debug, Clone)]
pub struct DeviceBehaviour {
    /// Simulated print time per job.
    pub job_time: Duration,
    /// Poll interval of poll-only devices.
    pub poll_interval: Duration,
    pub long_poll: Duration,
    /// Devices close an idle data channel after this long (MQTT up). Large fleets need it
    /// short: each open channel is a file descriptor in the bridge.
    pub data_idle_close: Duration,
}

#[derive(Debug, Clone)]
pub struct Load {
    /// Jobs submitted per second, spread over random devices.
    pub rate: f64,
    pub duration: Duration,
    /// After the generator stops, how long to wait for outstanding jobs.
    pub drain: Duration,
    pub payload_bytes: usize,
    /// Submissions in flight at once.
    pub max_in_flight: usize,
}

#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Cut the MQTT link of a share of the devices.
    pub cut_mqtt: Option<Fault>,
    /// Kill a share of the devices and start them again after `length`.
    pub restart_devices: Option<Fault>,
}

#[derive(Debug, Clone, Default)]
pub struct Checks {
    /// Before measuring, send every device one job and wait until all are done, so that the
    /// figures are the steady state: with the embedded broker, the first publish to a topic
    /// costs rumqttd a comparison with every filter (one per device), once per device.
    pub warmup: bool,
    /// After the run, send every device one more job and wait until all are done (every
    /// device still works after the run's faults).
    pub final_round: bool,
    /// The bridge's retention archive, for jobs swept before the verification reads them.
    pub archive: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Default)]
pub struct Reporting {
    /// Processes whose CPU and memory go in the report (the bridge, an external broker).
    pub watch: Vec<(String, u32)>,
    pub progress: bool,
    /// Keep every job's timings in the report, for merging the parts of a multi-process run.
    pub keep_samples: bool,
}

impl FleetConfig {
    pub fn new(
        admin_url: &str,
        admin_token: Secret,
        data_url: &str,
        mqtt: Option<(String, u16)>,
    ) -> FleetConfig {
        FleetConfig {
            label: "fleet".into(),
            admin_url: admin_url.to_owned(),
            admin_token,
            data_url: data_url.to_owned(),
            mqtt,
            devices: 100,
            connect_rate: 500,
            device: DeviceBehaviour {
                job_time: Duration::from_millis(0),
                poll_interval: Duration::from_secs(30),
                long_poll: Duration::from_secs(25),
                data_idle_close: Duration::from_secs(5),
            },
            load: Load {
                rate: 50.0,
                duration: Duration::from_secs(30),
                drain: Duration::from_secs(60),
                payload_bytes: 256,
                max_in_flight: 256,
            },
            faults: Faults::default(),
            checks: Checks::default(),
            report: Reporting::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("admin API: {0}")]
    Admin(#[from] ClientError),
    #[error("fault proxy: {0}")]
    Proxy(std::io::Error),
    #[error("only {connected} of {wanted} devices connected within {waited:?}")]
    NotConnected {
        connected: usize,
        wanted: usize,
        waited: Duration,
    },
    #[error("bad configuration: {0}")]
    Config(String),
    #[error("warm-up: {0}")]
    Warmup(String),
    #[error("reading the archive {path}: {source}")]
    Archive {
        path: String,
        source: std::io::Error,
    },
}

/// One simulated device: its agent while it runs, and what survives a kill.
#[derive(Debug)]
struct Slot {
    agent: Option<AgentHandle>,
    store: MemoryStateStore,
    config: AgentConfig,
}

/// What the run knows about one submission.
#[derive(Debug, Clone)]
struct Timing {
    device: usize,
    /// Fetched while the device's MQTT link was down.
    via_fallback: bool,
    submitted: Instant,
    job_id: Option<JobId>,
    refused: bool,
    hinted: Option<Instant>,
    fetched: Option<Instant>,
    completed: Option<Instant>,
    runs_started: u32,
    runs_finished: u32,
}

impl Timing {
    /// A submission to agent `device`, sent now.
    fn submitted(device: usize) -> Timing {
        Timing {
            device,
            via_fallback: false,
            submitted: Instant::now(),
            job_id: None,
            refused: false,
            hinted: None,
            fetched: None,
            completed: None,
            runs_started: 0,
            runs_finished: 0,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    jobs: Vec<Timing>,
    by_job_id: HashMap<JobId, usize>,
    /// Completions seen before the submission's answer named the job.
    early_reports: HashMap<JobId, Instant>,
    /// Warm-up jobs submitted and not yet reported done.
    warmup: HashSet<JobId>,
    unhinted: Vec<VecDeque<usize>>,
    connected: Vec<bool>,
    mqtt_up: Vec<bool>,
    /// Per device: MQTT links that came up after one had been up.
    reconnects: Vec<u64>,
    mqtt_downs: u64,
    last_reconnect: Option<std::time::SystemTime>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    connected: AtomicUsize,
    completed: AtomicU64,
    lagged: AtomicU64,
    changed: Notify,
}

impl Shared {
    fn new(devices: usize) -> Shared {
        Shared {
            state: Mutex::new(State {
                unhinted: vec![VecDeque::new(); devices],
                connected: vec![false; devices],
                mqtt_up: vec![false; devices],
                reconnects: vec![0; devices],
                ..State::default()
            }),
            connected: AtomicUsize::new(0),
            completed: AtomicU64::new(0),
            lagged: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn complete(&self, n: usize, at: Instant, state: &mut State) {
        let timing = &mut state.jobs[n];
        if timing.completed.is_none() {
            timing.completed = Some(at);
            self.completed.fetch_add(1, Ordering::Relaxed);
            self.changed.notify_waiters();
        }
    }
}

/// The simulated print engine: knows each job by the number in its payload.
#[derive(Debug)]
struct FleetExecutor {
    shared: Arc<Shared>,
    job_time: Duration,
}

fn job_number(payload: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(payload.get(..32.min(payload.len()))?).ok()?;
    text.strip_prefix("fleet:")?.split(';').next()?.parse().ok()
}

impl JobExecutor for FleetExecutor {
    fn run(&self, job: JobOffer) -> ExecFuture {
        let shared = self.shared.clone();
        let job_time = self.job_time;
        let n = job_number(&job.payload);
        if let Some(n) = n {
            let mut state = shared.state();
            let State { jobs, mqtt_up, .. } = &mut *state;
            if let Some(t) = jobs.get_mut(n) {
                if t.fetched.is_none() {
                    t.fetched = Some(Instant::now());
                    t.via_fallback = !mqtt_up[t.device];
                }
                t.runs_started += 1;
            }
        }
        Box::pin(async move {
            if !job_time.is_zero() {
                // Simulated print time.
                tokio::time::sleep(job_time).await;
            }
            if let Some(n) = n
                && let Some(t) = shared.state().jobs.get_mut(n)
            {
                t.runs_finished += 1;
            }
            JobOutcome::Succeeded { detail: None }
        })
    }
}

/// Follows one agent's events.
fn follow(
    shared: Arc<Shared>,
    index: usize,
    mut events: broadcast::Receiver<AgentEvent>,
    poll_only: bool,
) {
    tokio::spawn(async move {
        loop {
            let event = match events.recv().await {
                Ok(e) => e,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    shared.lagged.fetch_add(n, Ordering::Relaxed);
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let now = Instant::now();
            match event {
                AgentEvent::MqttDown(_) => {
                    let mut state = shared.state();
                    state.mqtt_up[index] = false;
                    state.mqtt_downs += 1;
                }
                AgentEvent::MqttUp { .. } | AgentEvent::DataUp { .. } => {
                    if matches!(event, AgentEvent::MqttUp { .. }) {
                        let mut state = shared.state();
                        state.mqtt_up[index] = true;
                        if state.connected[index] {
                            state.reconnects[index] += 1;
                            state.last_reconnect = Some(std::time::SystemTime::now());
                        }
                    }
                    if matches!(event, AgentEvent::MqttUp { .. }) || poll_only {
                        let mut state = shared.state();
                        if !state.connected[index] {
                            state.connected[index] = true;
                            shared.connected.fetch_add(1, Ordering::Relaxed);
                            shared.changed.notify_waiters();
                        }
                    }
                }
                AgentEvent::HintReceived { .. } => {
                    let mut state = shared.state();
                    let State { jobs, unhinted, .. } = &mut *state;
                    while let Some(&n) = unhinted[index].front() {
                        if jobs[n].submitted > now {
                            break;
                        }
                        unhinted[index].pop_front();
                        if jobs[n].fetched.is_none() {
                            jobs[n].hinted = Some(now);
                        }
                    }
                }
                AgentEvent::JobReported { job_id } => {
                    let mut state = shared.state();
                    match state.by_job_id.get(&job_id).copied() {
                        Some(n) => shared.complete(n, now, &mut state),
                        None if state.warmup.remove(&job_id) => shared.changed.notify_waiters(),
                        None => {
                            state.early_reports.insert(job_id, now);
                        }
                    }
                }
                _ => {}
            }
        }
    });
}

fn agent_config(
    cfg: &FleetConfig,
    mqtt: Option<(String, u16)>,
    serial: String,
    token: &Secret,
) -> AgentConfig {
    let info = DeviceInfo {
        serial,
        model: "SIM-MFP".into(),
        destination: "EU".into(),
        time_zone: "UTC".into(),
    };
    let mut config = AgentConfig::new(cfg.data_url.clone(), mqtt.clone(), info);
    config.enrollment_token = Some(token.clone());
    config.long_poll = cfg.device.long_poll;
    config.backoff_min = Duration::from_millis(250);
    config.slow_poll = Duration::from_secs(30);
    config.data_idle_close = cfg.device.data_idle_close;
    if mqtt.is_none() {
        config.poll_interval = Some(cfg.device.poll_interval);
        config.long_poll = Duration::ZERO;
    }
    config
}

/// Sends every ready device one job (not counted in the figures) and waits until each has
/// been reported done.
async fn warm_up(
    cfg: &FleetConfig,
    client: &AdminClient,
    shared: &Arc<Shared>,
    ready: &[(usize, DeviceId)],
) -> Result<(), FleetError> {
    let in_flight = Arc::new(Semaphore::new(cfg.load.max_in_flight));
    let mut submissions = tokio::task::JoinSet::new();
    for (_, id) in ready {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let (client, shared, id) = (client.clone(), shared.clone(), id.clone());
        submissions.spawn(async move {
            let job = SubmitJob {
                payload: Some("warm-up".into()),
                content_type: Some("text/plain".into()),
                ..Default::default()
            };
            let (view, _) = client.submit_job(&id, &job).await?;
            drop(permit);
            let mut state = shared.state();
            if state.early_reports.remove(&view.job_id).is_none() {
                state.warmup.insert(view.job_id);
            }
            Ok::<(), ClientError>(())
        });
    }
    while let Some(done) = submissions.join_next().await {
        done.map_err(|e| FleetError::Warmup(format!("submission task: {e}")))??;
    }
    let deadline = Instant::now() + cfg.load.drain;
    loop {
        let notified = shared.changed.notified();
        let left = shared.state().warmup.len();
        if left == 0 {
            return Ok(());
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Err(FleetError::Warmup(format!(
                "{left} jobs not done within {:?}",
                cfg.load.drain
            )));
        }
    }
}

/// Runs the fleet and returns its report: connect, warm up (if asked), generate jobs with the
/// faults, drain, then check every job against the cloud's records.
pub async fn run(cfg: FleetConfig) -> Result<FleetReport, FleetError> {
    if cfg.devices == 0 || cfg.load.rate <= 0.0 || cfg.connect_rate == 0 {
        return Err(FleetError::Config(
            "devices, rate and connect rate must be positive".into(),
        ));
    }
    // No retries: the run counts every submission that did not get a 2xx, and checks the
    // acknowledged ones against the cloud's records.
    let client = AdminClient::new(cfg.admin_url.clone(), cfg.admin_token.clone())
        .with_timeout(Duration::from_secs(30))
        .with_retries(0);
    let token = client
        .create_enrollment(&CreateEnrollmentToken {
            customer: format!("fleet-{}", cfg.label),
            max_uses: Some(u32::try_from(cfg.devices).unwrap_or(u32::MAX)),
            ttl_secs: Some(86_400),
        })
        .await?
        .token;
    let shared = Arc::new(Shared::new(cfg.devices));
    let executor: Arc<dyn JobExecutor> = Arc::new(FleetExecutor {
        shared: shared.clone(),
        job_time: cfg.device.job_time,
    });
    let mut fleet = connect::start(&cfg, &token, &shared, &executor).await?;
    let warmup_secs = if cfg.checks.warmup {
        let began = Instant::now();
        warm_up(&cfg, &client, &shared, &fleet.ready).await?;
        tracing::info!(took = ?began.elapsed(), "fleet warmed up");
        Some(began.elapsed().as_secs_f64())
    } else {
        None
    };
    let mut measure = verify::Measure::start(&cfg, &client).await?;
    let generated = generator::run(&cfg, &client, &shared, &mut fleet).await;
    // Before the verification's reads, which are not part of what the run measures.
    measure.finish(&cfg, &client).await?;
    let final_round_secs = if cfg.checks.final_round {
        let began = Instant::now();
        warm_up(&cfg, &client, &shared, &fleet.ready)
            .await
            .map_err(|e| FleetError::Warmup(format!("final round: {e}")))?;
        tracing::info!(took = ?began.elapsed(), "final round done");
        Some(began.elapsed().as_secs_f64())
    } else {
        None
    };
    let mut cloud = verify::cloud_records(&client, &fleet.ready).await?;
    if let Some(archive) = &cfg.checks.archive {
        verify::archived_records(archive, &mut cloud).map_err(|source| FleetError::Archive {
            path: archive.display().to_string(),
            source,
        })?;
    }
    let connected = verify::Connected {
        connected: fleet.ready.len(),
        connect_secs: fleet.connect_secs,
        warmup_secs,
        final_round_secs,
    };
    fleet.stop().await;
    Ok(verify::report(
        &cfg, &shared, &connected, &generated, &cloud, &measure,
    ))
}
