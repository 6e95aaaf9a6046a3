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

pub mod procstat;
pub mod proxy;
pub mod report;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use admin_client::{AdminClient, ClientError};
use schemas::api::{CreateEnrollmentToken, SubmitJob};
use schemas::data::JobOffer;
use schemas::job::JobState;
use schemas::{DeviceId, JobId, Secret};
use tokio::sync::{Notify, Semaphore, broadcast};
use tokio::time::Instant;

use crate::agent::{AgentConfig, AgentEvent, AgentHandle, DeviceInfo};
use crate::executor::{ExecFuture, JobExecutor, JobOutcome};
use crate::state::MemoryStateStore;
use procstat::ProcUsage;
use proxy::CutProxy;
use report::{FleetReport, Latency, ProcessReport, Second};

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
    /// Jobs submitted per second, spread over random devices.
    pub rate: f64,
    pub duration: Duration,
    /// After the generator stops, how long to wait for outstanding jobs.
    pub drain: Duration,
    /// Simulated print time per job.
    pub job_time: Duration,
    pub payload_bytes: usize,
    /// Poll interval of poll-only devices.
    pub poll_interval: Duration,
    pub long_poll: Duration,
    /// Submissions in flight at once.
    pub max_in_flight: usize,
    /// Cut the MQTT link of a share of the devices.
    pub cut_mqtt: Option<Fault>,
    /// Kill a share of the devices and start them again after `length`.
    pub restart_devices: Option<Fault>,
    /// Processes whose CPU and memory go in the report (the bridge, an external broker).
    pub watch: Vec<(String, u32)>,
    /// Devices close an idle data channel after this long (MQTT up). Large fleets need it
    /// short: each open channel is a file descriptor in the bridge.
    pub data_idle_close: Duration,
    pub progress: bool,
    /// Keep every job's timings in the report, for merging the parts of a multi-process run.
    pub keep_samples: bool,
    /// Before measuring, send every device one job and wait until all are done, so that the
    /// figures are the steady state: with the embedded broker, the first publish to a topic
    /// costs rumqttd a comparison with every filter (one per device), once per device.
    pub warmup: bool,
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
            rate: 50.0,
            duration: Duration::from_secs(30),
            drain: Duration::from_secs(60),
            job_time: Duration::from_millis(0),
            payload_bytes: 256,
            poll_interval: Duration::from_secs(30),
            long_poll: Duration::from_secs(25),
            max_in_flight: 256,
            cut_mqtt: None,
            restart_devices: None,
            watch: Vec::new(),
            data_idle_close: Duration::from_secs(5),
            progress: false,
            keep_samples: false,
            warmup: false,
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
                AgentEvent::MqttDown(_) => shared.state().mqtt_up[index] = false,
                AgentEvent::MqttUp { .. } | AgentEvent::DataUp { .. } => {
                    if matches!(event, AgentEvent::MqttUp { .. }) {
                        shared.state().mqtt_up[index] = true;
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
    config.long_poll = cfg.long_poll;
    config.backoff_min = Duration::from_millis(250);
    config.slow_poll = Duration::from_secs(30);
    config.data_idle_close = cfg.data_idle_close;
    if mqtt.is_none() {
        config.poll_interval = Some(cfg.poll_interval);
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
    let in_flight = Arc::new(Semaphore::new(cfg.max_in_flight));
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
    let deadline = Instant::now() + cfg.drain;
    loop {
        let notified = shared.changed.notified();
        let left = shared.state().warmup.len();
        if left == 0 {
            return Ok(());
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Err(FleetError::Warmup(format!(
                "{left} jobs not done within {:?}",
                cfg.drain
            )));
        }
    }
}

/// Runs the fleet and returns its report.
pub async fn run(cfg: FleetConfig) -> Result<FleetReport, FleetError> {
    if cfg.devices == 0 || cfg.rate <= 0.0 || cfg.connect_rate == 0 {
        return Err(FleetError::Config(
            "devices, rate and connect rate must be positive".into(),
        ));
    }
    let client = AdminClient::new(cfg.admin_url.clone(), cfg.admin_token.clone())
        .with_timeout(Duration::from_secs(30));
    let token = client
        .create_enrollment(&CreateEnrollmentToken {
            customer: format!("fleet-{}", cfg.label),
            max_uses: Some(u32::try_from(cfg.devices).unwrap_or(u32::MAX)),
            ttl_secs: Some(86_400),
        })
        .await?
        .token;
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            unhinted: vec![VecDeque::new(); cfg.devices],
            connected: vec![false; cfg.devices],
            mqtt_up: vec![false; cfg.devices],
            ..State::default()
        }),
        connected: AtomicUsize::new(0),
        completed: AtomicU64::new(0),
        lagged: AtomicU64::new(0),
        changed: Notify::new(),
    });
    let executor: Arc<dyn JobExecutor> = Arc::new(FleetExecutor {
        shared: shared.clone(),
        job_time: cfg.job_time,
    });

    // Devices whose MQTT link will be cut connect through one proxy.
    let cut_count = cfg
        .cut_mqtt
        .map(|f| ((cfg.devices as f64) * f.share).round() as usize)
        .unwrap_or(0);
    let proxy = match (&cfg.mqtt, cut_count) {
        (Some((host, port)), n) if n > 0 => {
            let target: SocketAddr = format!("{host}:{port}")
                .parse()
                .map_err(|e| FleetError::Config(format!("MQTT address {host}:{port}: {e}")))?;
            Some(CutProxy::start(target).await.map_err(FleetError::Proxy)?)
        }
        _ => None,
    };
    let poll_only = cfg.mqtt.is_none();

    // Start the devices at the connect rate.
    let mut agents: Vec<Slot> = Vec::with_capacity(cfg.devices);
    let pace = Duration::from_secs_f64(1.0 / f64::from(cfg.connect_rate));
    let started = Instant::now();
    for i in 0..cfg.devices {
        let mqtt = match (&proxy, &cfg.mqtt) {
            (Some(p), Some(_)) if i < cut_count => Some(("127.0.0.1".to_owned(), p.addr.port())),
            (_, m) => m.clone(),
        };
        let config = agent_config(&cfg, mqtt, format!("SIM-{}-{i:06}", cfg.label), &token);
        let store = MemoryStateStore::default();
        let agent = crate::start(config.clone(), executor.clone(), store.clone());
        follow(shared.clone(), i, agent.subscribe(), poll_only);
        agents.push(Slot {
            agent: Some(agent),
            store,
            config,
        });
        tokio::time::sleep_until(started + pace * (i as u32 + 1)).await;
    }
    // Wait for every device, generously; then run with those that made it (the report says how
    // many). Connecting slows down as the fleet grows: every device registers durably and
    // opens two connections.
    let waited = Duration::from_secs_f64(3.0 * cfg.devices as f64 / f64::from(cfg.connect_rate))
        + Duration::from_secs(60);
    let deadline = started + waited;
    loop {
        let notified = shared.changed.notified();
        if shared.connected.load(Ordering::Relaxed) >= cfg.devices {
            break;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            break;
        }
    }
    // (agent index, device id) of every connected device: jobs go only to them.
    let ready: Vec<(usize, DeviceId)> = {
        let state = shared.state();
        agents
            .iter()
            .enumerate()
            .filter(|(i, _)| state.connected[*i])
            .filter_map(|(i, s)| {
                s.agent
                    .as_ref()
                    .and_then(|a| a.device_id())
                    .map(|id| (i, id))
            })
            .collect()
    };
    if ready.is_empty() {
        return Err(FleetError::NotConnected {
            connected: 0,
            wanted: cfg.devices,
            waited,
        });
    }
    if ready.len() < cfg.devices {
        tracing::warn!(
            connected = ready.len(),
            wanted = cfg.devices,
            ?waited,
            "not every device connected; running with those that did"
        );
    }
    let connect_secs = started.elapsed().as_secs_f64();
    tracing::info!(devices = ready.len(), took = ?started.elapsed(), "fleet connected");
    let warmup_secs = if cfg.warmup {
        let began = Instant::now();
        warm_up(&cfg, &client, &shared, &ready).await?;
        tracing::info!(took = ?began.elapsed(), "fleet warmed up");
        Some(began.elapsed().as_secs_f64())
    } else {
        None
    };

    // What is measured starts here: CPU, requests and connections exclude connecting and
    // warming up.
    let measured = Instant::now();
    let sim_before = ProcUsage::current().unwrap_or_default();
    let watched_before: Vec<ProcUsage> = cfg
        .watch
        .iter()
        .map(|(_, pid)| ProcUsage::of(*pid).unwrap_or_default())
        .collect();
    let metrics_before = client.metrics().await?;

    // Generate jobs for `duration`, applying faults on schedule.
    let progress = cfg.progress.then(|| {
        let bar = indicatif::ProgressBar::new(cfg.duration.as_secs());
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len}s {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let in_flight = Arc::new(Semaphore::new(cfg.max_in_flight));
    let mut faults = Vec::new();
    let gen_start = Instant::now();
    let mut submitted: u64 = 0;
    let mut cut_state = 0u8; // 0 not yet, 1 cut, 2 restored
    let mut restart_state = 0u8;
    let mut killed: Vec<usize> = Vec::new();
    let payload_pad = "x".repeat(cfg.payload_bytes.saturating_sub(24));
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    loop {
        tick.tick().await;
        let elapsed = gen_start.elapsed();
        if elapsed >= cfg.duration {
            break;
        }
        if let (Some(f), Some(p)) = (cfg.cut_mqtt, &proxy) {
            if cut_state == 0 && elapsed >= f.at {
                p.cut();
                cut_state = 1;
                faults.push(format!(
                    "MQTT cut for {cut_count} devices at {:?} for {:?}",
                    f.at, f.length
                ));
            } else if cut_state == 1 && elapsed >= f.at + f.length {
                p.restore();
                cut_state = 2;
            }
        }
        if let Some(f) = cfg.restart_devices {
            if restart_state == 0 && elapsed >= f.at {
                let n = (((cfg.devices as f64) * f.share).round() as usize).min(cfg.devices);
                let mut order: Vec<usize> = (0..cfg.devices).collect();
                for i in 0..n {
                    let j = rand::random_range(i..cfg.devices);
                    order.swap(i, j);
                }
                killed = order.into_iter().take(n).collect();
                for &i in &killed {
                    if let Some(agent) = agents[i].agent.take() {
                        agent.kill();
                    }
                }
                restart_state = 1;
                faults.push(format!(
                    "{n} devices killed at {:?}, restarted after {:?}",
                    f.at, f.length
                ));
            } else if restart_state == 1 && elapsed >= f.at + f.length {
                for &i in &killed {
                    let slot = &mut agents[i];
                    let agent =
                        crate::start(slot.config.clone(), executor.clone(), slot.store.clone());
                    follow(shared.clone(), i, agent.subscribe(), poll_only);
                    slot.agent = Some(agent);
                }
                restart_state = 2;
            }
        }
        let due = (elapsed.as_secs_f64() * cfg.rate) as u64;
        while submitted < due {
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                break;
            };
            let (device, id) = ready[rand::random_range(0..ready.len())].clone();
            let n = {
                let mut state = shared.state();
                let n = state.jobs.len();
                state.jobs.push(Timing {
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
                });
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
    let gen_elapsed = gen_start.elapsed();
    if let Some(p) = &proxy {
        p.restore();
    }
    // Wait for every submission to be answered, then for the outstanding jobs.
    let _all = in_flight
        .acquire_many(u32::try_from(cfg.max_in_flight).unwrap_or(u32::MAX))
        .await;
    let drain_deadline = Instant::now() + cfg.drain;
    loop {
        let notified = shared.changed.notified();
        let (acked, completed) = {
            let state = shared.state();
            let acked = state.jobs.iter().filter(|t| t.job_id.is_some()).count() as u64;
            (acked, shared.completed.load(Ordering::Relaxed))
        };
        if completed >= acked
            || tokio::time::timeout_at(drain_deadline, notified)
                .await
                .is_err()
        {
            break;
        }
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let wall = measured.elapsed();

    // The cloud's records.
    let mut cloud: HashMap<JobId, (JobState, usize)> = HashMap::new();
    for (_, id) in &ready {
        for job in client.device_jobs(id).await? {
            let succeeded = job
                .history
                .iter()
                .filter(|t| t.to == JobState::Succeeded)
                .count();
            cloud.insert(job.job_id, (job.state, succeeded));
        }
    }
    let metrics_after = client.metrics().await?;
    let sim_after = ProcUsage::current().unwrap_or_default();
    let watched_after: Vec<Option<ProcUsage>> = cfg
        .watch
        .iter()
        .map(|(_, pid)| ProcUsage::of(*pid))
        .collect();

    // Stop the devices.
    let mut stops = tokio::task::JoinSet::new();
    for agent in agents.into_iter().filter_map(|s| s.agent) {
        stops.spawn(agent.stop());
    }
    while stops.join_next().await.is_some() {}

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
        let second = t.submitted.saturating_duration_since(gen_start).as_secs() as usize;
        if cfg.keep_samples {
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
    let (requests_before, requests_after) = (
        metric(&metrics_before, "data_requests"),
        metric(&metrics_after, "data_requests"),
    );
    let restarted = requests_after < requests_before;
    let requests = requests_after.saturating_sub(requests_before);
    let connections = metric(&metrics_after, "data_connections_total")
        .saturating_sub(metric(&metrics_before, "data_connections_total"));
    let hints_coalesced = metric(&metrics_after, "hints_coalesced")
        .saturating_sub(metric(&metrics_before, "hints_coalesced"));
    let device_hours = cfg.devices as f64 * wall.as_secs_f64() / 3600.0;
    let span = match (state.jobs.first(), last_completion) {
        (Some(first), Some(last)) => (last - first.submitted).as_secs_f64(),
        _ => 0.0,
    };
    let mut processes = vec![ProcessReport::new(
        "device-sim fleet",
        std::process::id(),
        &sim_before,
        &sim_after,
        wall,
    )];
    for (((name, pid), before), after) in cfg.watch.iter().zip(&watched_before).zip(&watched_after)
    {
        if let Some(after) = after {
            processes.push(ProcessReport::new(name, *pid, before, after, wall));
        }
    }
    let mode = match &cfg.mqtt {
        None => format!("poll-only every {:?}", cfg.poll_interval),
        Some(_) => "push".to_owned(),
    };
    Ok(FleetReport {
        label: cfg.label.clone(),
        mode,
        devices: cfg.devices,
        devices_connected: ready.len(),
        connect_secs,
        warmup_secs,
        target_rate: cfg.rate,
        duration_secs: gen_elapsed.as_secs_f64(),
        jobs_submitted: submitted,
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
        fallback_share: if fetched_total > 0 {
            fallback as f64 / fetched_total as f64
        } else {
            0.0
        },
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
        faults,
        processes,
        per_second: per_second
            .iter()
            .zip(&submitted_per_second)
            .enumerate()
            .map(|(i, (h, &n))| Second::from_histogram(i, n, h))
            .collect(),
        samples,
    })
}
