//! The device agent: what a device maker embeds.
//!
//! One task owns the agent's state and decides when to talk to the cloud. Triggers to sync the
//! feed: start-up, a hint on MQTT, a status change, a poll-now, the regular poll timer, and,
//! while MQTT is down, a long-poll on the data channel (the server answers as soon as the feed
//! grows). When even the data channel cannot be reached, it retries with exponential backoff
//! and jitter up to `slow_poll` (slow polling).
//!
//! A hint is written to disk when it arrives and cleared when a sync has reached the end of
//! the feed, so a device that restarts in between fetches at once instead of waiting for
//! another hint or its regular poll.
//!
//! Requests the device makes on its own (status, consent changes, panel job requests) go to a
//! durable outbox ([`crate::outbox`]) and are delivered in order whenever the data channel is
//! up; the cloud acts on each number once. Device information leaves only with the user's
//! consent, which is kept on the device and can be changed offline.
//!
//! Exactly once on the device: a job's outcome is written to disk before it is reported, and a
//! job found in that list is never run again; an unreported outcome is reported again instead
//! (taking the job again first if its lease was lost meanwhile).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use schemas::agent::{
    ActiveService, AgentState, AppliedSettings, Credentials, DoneJob, PendingOwnerCheck,
    SupportService,
};
use schemas::data::{
    DeviceStatus, ErrorBody, ErrorCode, HelloAuth, JobOffer, OwnerCheckReason, OwnerClaim,
    Registration, Request, Response, Welcome,
};
use schemas::feed::{FeedBody, FeedEntry};
use schemas::hint::HintKind;
use schemas::job::JobUpdate;
use schemas::outbox::{Consent, DeviceRequest, MAX_DELIVER_ITEMS};
use schemas::print::{Capabilities, HeldJobSummary};
use schemas::services::InstructionBody;
use schemas::settings::{DeviceSettings, Endpoints, SettingsReport};
use schemas::{DeviceId, FeedSeq, InstructionId, JobId, Secret, UnixMillis, UserId};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::{Backoff, jitter};
use crate::consumables::ReadingsSource;
use crate::counters::{self, CounterSource};
use crate::executor::{JobExecutor, JobOutcome};
use crate::lan::{self, NudgeCheck};
use crate::mqtt::{self, LinkEvent, MqttSettings};
use crate::outbox::{self, OutboxFull, Submitted};
use crate::session::{DataSession, SessionError, SessionSettings};
use crate::state::{StateError, StateStore};

/// What the device says about itself when it registers.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub serial: String,
    pub model: String,
    pub destination: String,
    pub time_zone: String,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The factory endpoints, best first: data channel URLs (`ws://host:port`) and MQTT
    /// brokers (`host:port`; none runs the agent by polling only). Settings pushed by the
    /// cloud replace them and are kept on disk.
    pub endpoints: Endpoints,
    /// While a channel works through any endpoint but its best, how often to try the better
    /// ones again (in the background; the channel moves over when one answers).
    pub probe_interval: Duration,
    /// Where to accept poll-now nudges on the LAN (`None`: nowhere). The address it listens on
    /// is reported to the cloud, which plans nudge trees through it.
    pub lan_listen: Option<std::net::SocketAddr>,
    /// Needed only until the device has registered.
    pub enrollment_token: Option<Secret>,
    pub info: DeviceInfo,
    /// Owner information entered at set-up, bound to the device id at registration.
    pub owner: Option<OwnerClaim>,
    /// How long one long-poll waits while MQTT is down. Zero: never long-poll (poll-only
    /// devices then sync every `poll_interval` and close the data channel in between).
    pub long_poll: Duration,
    /// Regular poll, even while MQTT is up (catches anything a lost hint would have said; reads
    /// the mailbox). `None`: the schedule the cloud gives (kept on disk; a day until it has
    /// said). Counted from the last sync, with jitter.
    pub poll_interval: Option<Duration>,
    /// Longest wait between attempts when the data channel cannot be reached.
    pub slow_poll: Duration,
    /// Close an unused data channel after this long while MQTT is up.
    pub data_idle_close: Duration,
    /// At start, how long to wait for MQTT (and the cloud's push on connect) before syncing
    /// over the data channel anyway.
    pub mqtt_grace: Duration,
    pub mqtt_keep_alive: Duration,
    pub backoff_min: Duration,
    /// The consent to send device information the device starts with, on its very first
    /// start (the set-up screen); afterwards only the user changes it.
    pub consent_at_setup: bool,
    /// Most requests the outbox holds (see [`crate::outbox`] for what happens when full).
    pub outbox_limit: usize,
    /// The support services this device knows, and whether each is enabled, on its first
    /// start (later changed with [`AgentHandle::set_support_service`]). Only these are ever
    /// activated.
    pub support_services: BTreeMap<String, bool>,
    /// What the device can measure for support services (cartridges, counters...): read on
    /// its events and periodically.
    pub readings: Option<Arc<dyn ReadingsSource>>,
    /// The device's printer: its printer queue is registered with these capabilities (again
    /// whenever they change), and jobs asking for more are refused at submission.
    pub printer: Option<Capabilities>,
    /// The printer's page counters: read whole (see [`crate::counters`]) and reported after
    /// every job and on [`AgentHandle::report_counters`], with consent.
    pub counters: Option<Arc<dyn CounterSource>>,
    /// TLS servers (`wss://`, `mqtts://` endpoints) are verified against this CA certificate
    /// (PEM), or against the system's roots when `None`. A client configuration already in
    /// `session.tls` (one shared by a simulated fleet, say) is used as it is.
    pub ca_file: Option<std::path::PathBuf>,
    pub session: SessionSettings,
    pub agent_name: String,
}

impl AgentConfig {
    pub fn new(
        data_url: impl Into<String>,
        mqtt: Option<(String, u16)>,
        info: DeviceInfo,
    ) -> AgentConfig {
        let mqtt = mqtt.map(|(host, port)| {
            if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            }
        });
        AgentConfig {
            endpoints: Endpoints {
                data: vec![data_url.into()],
                mqtt: mqtt.into_iter().collect(),
            },
            probe_interval: Duration::from_secs(60),
            lan_listen: None,
            enrollment_token: None,
            info,
            owner: None,
            long_poll: Duration::from_secs(25),
            poll_interval: None,
            slow_poll: Duration::from_secs(60),
            data_idle_close: Duration::from_secs(30),
            mqtt_grace: Duration::from_secs(10),
            mqtt_keep_alive: Duration::from_secs(30),
            backoff_min: Duration::from_millis(250),
            consent_at_setup: false,
            outbox_limit: 1000,
            support_services: BTreeMap::new(),
            readings: None,
            printer: None,
            counters: None,
            ca_file: None,
            session: SessionSettings::default(),
            agent_name: concat!("device-sim/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

/// What the agent did, for logs, the simulator and tests.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    Registered(DeviceId),
    /// The notification channel is connected (or moved) to `endpoint`.
    MqttUp {
        endpoint: String,
    },
    MqttDown(String),
    /// The broker refused the login (wrong credentials, device disabled): the notification
    /// channel asks again only after the longest backoff; the data channel says why.
    MqttRefused(String),
    /// The data channel is connected (or moved) to `endpoint`.
    DataUp {
        endpoint: String,
    },
    DataDown(String),
    /// Server settings from the cloud are applied and kept; the links restart with them.
    SettingsApplied {
        revision: u64,
    },
    /// The cloud has the settings the device uses now.
    SettingsReported {
        revision: u64,
    },
    HintReceived {
        kind: HintKind,
        seq: FeedSeq,
    },
    Synced {
        cursor: FeedSeq,
    },
    JobFetched {
        job_id: JobId,
        attempt: u32,
    },
    JobStarted {
        job_id: JobId,
        attempt: u32,
    },
    JobFinished {
        job_id: JobId,
        attempt: u32,
        outcome: JobOutcome,
    },
    JobReported {
        job_id: JobId,
    },
    JobCanceled {
        job_id: JobId,
    },
    /// The cloud has handled a request from the outbox (`kind` as in
    /// [`DeviceRequest::kind`]).
    RequestDelivered {
        no: schemas::outbox::RequestNo,
        kind: &'static str,
    },
    /// The owner must confirm at the panel by `deadline` (`None`: no owner bound).
    OwnerCheckStarted {
        deadline: Option<UnixMillis>,
    },
    OwnerConfirmed,
    /// The cloud invalidated the device id; the agent forgot it and registers again.
    Invalidated {
        reason: String,
    },
    /// An instruction was taken from the mailbox (`kind` as in [`InstructionBody::kind`]).
    InstructionTaken {
        instruction_id: InstructionId,
        kind: &'static str,
    },
    /// The cloud would not hand out an instruction (expired, gone): it is not acted on.
    InstructionSkipped {
        instruction_id: InstructionId,
        error: ErrorBody,
    },
    /// An instruction of the device maker's own kind, for the application to act on.
    CustomInstruction {
        instruction_id: InstructionId,
        name: String,
        params: std::collections::BTreeMap<String, String>,
    },
    /// The device is permitted to use a service (its use-start instruction's code worked).
    ServiceRegistered {
        service_id: String,
    },
    /// The cloud refused the registration code of a use-start instruction.
    ServiceRefused {
        service_id: String,
        error: ErrorBody,
    },
    /// A poll-now nudge was accepted (on the LAN or from the mailbox); the device polls after
    /// `delay_ms` and has passed it on to the devices below it.
    NudgeAccepted {
        nudge_id: String,
        delay_ms: u64,
    },
    /// A nudge was refused (bad token, expired, another device's, replayed).
    NudgeRefused {
        reason: String,
    },
    /// A support service is active: the device reports `data_types` to it from now on.
    SupportActivated {
        service_id: String,
        data_types: Vec<String>,
    },
    /// A support service is no longer active (contract canceled or moved, disabled locally).
    SupportDeactivated {
        service_id: String,
    },
    /// A user logged in at this device has new held jobs (refresh the panel's list).
    HeldJobsChanged {
        user_id: UserId,
    },
    /// Device information for a support service is queued in the outbox.
    TelemetryQueued {
        service_id: String,
        data_types: Vec<String>,
    },
    /// The cloud refused a request from the outbox; it is not sent again.
    RequestRefused {
        no: schemas::outbox::RequestNo,
        error: ErrorBody,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("registration refused: {0}")]
    Registration(ErrorBody),
    #[error("the device has no credentials and no enrollment token to register with")]
    NoCredentials,
    #[error(transparent)]
    OutboxFull(#[from] OutboxFull),
    #[error("the device id was invalidated: {0}")]
    Invalidated(String),
    #[error("this needs the cloud, which cannot be reached now: {0}")]
    Offline(String),
    #[error("the cloud refused: {0}")]
    Refused(ErrorBody),
    #[error("the agent has stopped")]
    Stopped,
}

type Reply<T> = oneshot::Sender<Result<T, AgentError>>;

#[derive(Debug)]
enum Command {
    Submit(DeviceRequest, Reply<Submitted>),
    SetConsent(bool, Reply<Consent>),
    GetConsent(Reply<Option<Consent>>),
    OwnerCheck(OwnerCheckReason, Reply<()>),
    ConfirmOwner(OwnerClaim, Reply<()>),
    InUse(Reply<SettingsReport>),
    SetSupport(String, bool, Reply<()>),
    ReportCounters(Reply<Submitted>),
    Call(Request, Reply<Response>),
    Readings(BTreeMap<String, String>, Reply<Vec<String>>),
    PollNow,
}

/// A user logged in at the panel.
#[derive(Debug, Clone)]
pub struct PrintSession {
    token: Secret,
    pub expires_at: UnixMillis,
    /// The user's held jobs when they logged in.
    pub held: Vec<HeldJobSummary>,
}

impl PrintSession {
    /// The same session with a token the cloud never issued (for tests of refusals).
    #[doc(hidden)]
    pub fn forged_for_tests(&self) -> PrintSession {
        PrintSession {
            token: Secret::new("not-a-session"),
            ..self.clone()
        }
    }
}

fn unexpected(response: Response) -> AgentError {
    AgentError::Offline(format!("unexpected answer: {response:?}"))
}

/// Why the main loop ended.
enum Exit {
    Stopped,
    Invalidated(String),
}

/// Aborts a task when dropped, so a killed agent takes its links down with it.
#[derive(Debug)]
struct AbortOnDrop<T>(Option<JoinHandle<T>>);

impl<T> AbortOnDrop<T> {
    fn new(task: JoinHandle<T>) -> Self {
        AbortOnDrop(Some(task))
    }

    /// Lets the task run on by itself.
    fn detach(mut self) {
        self.0 = None;
    }

    async fn join(&mut self) -> Option<T> {
        match self.0.as_mut() {
            Some(task) => task.await.ok(),
            None => std::future::pending().await,
        }
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// The running notification link.
struct MqttLink {
    events: mpsc::Receiver<LinkEvent>,
    stop: CancellationToken,
    task: AbortOnDrop<()>,
}

impl MqttLink {
    /// Stops the link cleanly (DISCONNECT, so no last will) without waiting for it.
    fn retire(self) {
        self.stop.cancel();
        self.task.detach();
    }
}

/// A data channel connection found by a background probe of better endpoints.
type DataProbe = AbortOnDrop<Option<(DataSession, Welcome, String)>>;

/// Controls a running agent.
#[derive(Debug)]
pub struct AgentHandle {
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<AgentEvent>,
    device_id: Arc<Mutex<Option<DeviceId>>>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), AgentError>>,
}

impl AgentHandle {
    pub fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.events.subscribe()
    }

    pub fn device_id(&self) -> Option<DeviceId> {
        self.device_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn ask<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, AgentError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(command(tx))
            .await
            .map_err(|_| AgentError::Stopped)?;
        rx.await.map_err(|_| AgentError::Stopped)?
    }

    /// Queues a status report (durably) for the outbox; it is sent as soon as the data
    /// channel allows. Without the user's consent it is dropped: [`Submitted::Withheld`].
    pub async fn report_status(&self, status: DeviceStatus) -> Result<Submitted, AgentError> {
        self.ask(|r| Command::Submit(DeviceRequest::Status { status }, r))
            .await
    }

    /// Queues a job request made at the panel ("scan_to_cloud", "print_held_jobs", ...).
    pub async fn panel_request(
        &self,
        action: impl Into<String>,
        params: std::collections::BTreeMap<String, String>,
    ) -> Result<Submitted, AgentError> {
        let body = DeviceRequest::PanelJob {
            action: action.into(),
            params,
        };
        self.ask(|r| Command::Submit(body, r)).await
    }

    /// The user gives or withdraws consent to send device information, at the panel; works
    /// offline. The change itself is reported to the cloud through the outbox.
    pub async fn set_consent(&self, granted: bool) -> Result<Consent, AgentError> {
        self.ask(|r| Command::SetConsent(granted, r)).await
    }

    /// The device's state met a condition that calls for the owner (factory reset, new time
    /// zone, new network): no jobs run until the owner confirms with [`Self::confirm_owner`].
    /// Works offline; the cloud is told as soon as it can be reached.
    pub async fn owner_check_required(&self, reason: OwnerCheckReason) -> Result<(), AgentError> {
        self.ask(|r| Command::OwnerCheck(reason, r)).await
    }

    /// Owner information entered at the panel, checked by the cloud (needs the data channel).
    /// Wrong information invalidates the device id: [`AgentError::Invalidated`], and the agent
    /// registers again if it has an enrollment token.
    pub async fn confirm_owner(&self, owner: OwnerClaim) -> Result<(), AgentError> {
        self.ask(|r| Command::ConfirmOwner(owner, r)).await
    }

    /// The settings revision applied, the endpoint lists and the endpoints connected now
    /// (what the panel shows and what the cloud is told).
    pub async fn settings_in_use(&self) -> Result<SettingsReport, AgentError> {
        self.ask(Command::InUse).await
    }

    /// Enables or disables a support service in the device's table (the panel's setting). Takes
    /// effect at the next sync: an enabled service with a contract is activated, a disabled one
    /// stops receiving anything.
    pub async fn set_support_service(
        &self,
        service_id: impl Into<String>,
        enabled: bool,
    ) -> Result<(), AgentError> {
        let id = service_id.into();
        self.ask(|r| Command::SetSupport(id, enabled, r)).await
    }

    /// Readings the device took (for an event of its own): each active support service gets
    /// exactly its data types, through the outbox (with consent). Returns the services queued.
    pub async fn report_readings(
        &self,
        readings: BTreeMap<String, String>,
    ) -> Result<Vec<String>, AgentError> {
        self.ask(|r| Command::Readings(readings, r)).await
    }

    /// A user logs in at the panel (user id and PIN, checked by the cloud; needs the data
    /// channel). The session is for this device; it ends on logout or after a while unused.
    pub async fn login(&self, user_id: UserId, pin: Secret) -> Result<PrintSession, AgentError> {
        match self.call(Request::Login { user_id, pin }).await? {
            Response::LoggedIn {
                session,
                expires_at,
                held,
            } => Ok(PrintSession {
                token: session,
                expires_at,
                held,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// The logged-in user's held jobs.
    pub async fn held_jobs(
        &self,
        session: &PrintSession,
    ) -> Result<Vec<HeldJobSummary>, AgentError> {
        let request = Request::HeldJobs {
            session: session.token.clone(),
        };
        match self.call(request).await? {
            Response::Held { held } => Ok(held),
            other => Err(unexpected(other)),
        }
    }

    /// Releases the chosen held jobs to this device's printer queue; they arrive as jobs.
    /// Returns those released and those refused (with why).
    #[allow(clippy::type_complexity)]
    pub async fn release(
        &self,
        session: &PrintSession,
        jobs: Vec<JobId>,
    ) -> Result<(Vec<JobId>, Vec<(JobId, ErrorBody)>), AgentError> {
        let request = Request::Release {
            session: session.token.clone(),
            jobs,
        };
        match self.call(request).await? {
            Response::Released { released, refused } => Ok((released, refused)),
            other => Err(unexpected(other)),
        }
    }

    pub async fn logout(&self, session: &PrintSession) -> Result<(), AgentError> {
        let request = Request::Logout {
            session: session.token.clone(),
        };
        self.call(request).await.map(|_| ())
    }

    /// Sends one request over the data channel (connecting if needed).
    async fn call(&self, request: Request) -> Result<Response, AgentError> {
        self.ask(|r| Command::Call(request, r)).await
    }

    /// Reads the page counters whole and queues them for the cloud (device information: without
    /// consent, [`Submitted::Withheld`]). Without a counter source: [`Submitted::Withheld`] too.
    pub async fn report_counters(&self) -> Result<Submitted, AgentError> {
        self.ask(Command::ReportCounters).await
    }

    /// The consent setting as the device holds it.
    pub async fn consent(&self) -> Result<Option<Consent>, AgentError> {
        self.ask(Command::GetConsent).await
    }

    pub async fn poll_now(&self) -> Result<(), AgentError> {
        self.commands
            .send(Command::PollNow)
            .await
            .map_err(|_| AgentError::Stopped)
    }

    /// Stops the agent cleanly (MQTT DISCONNECT, so no last will).
    pub async fn stop(self) -> Result<(), AgentError> {
        self.shutdown.cancel();
        self.task.await.map_err(|_| AgentError::Stopped)?
    }

    /// Stops the agent as a crash would: no goodbye on any link, nothing saved beyond what
    /// was already saved.
    pub fn kill(self) {
        self.task.abort();
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// Starts an agent.
pub fn start(
    config: AgentConfig,
    executor: Arc<dyn JobExecutor>,
    store: impl StateStore,
) -> AgentHandle {
    let (commands, commands_rx) = mpsc::channel(64);
    let (events, _) = broadcast::channel(1024);
    let device_id = Arc::new(Mutex::new(None));
    let shutdown = CancellationToken::new();
    let agent = Agent {
        config,
        executor,
        store: Box::new(store),
        state: AgentState::default(),
        events: events.clone(),
        device_id: device_id.clone(),
        session: None,
        skew_ms: 0,
        mqtt_up: false,
        backoff: Backoff::new(Duration::from_millis(250), Duration::from_secs(60)),
        last_activity: Instant::now(),
        data_endpoint: None,
        data_last_good: None,
        retry_better_at: None,
        mqtt_endpoint: None,
        last_report: None,
        relink: false,
        tls_failed: false,
        lan_endpoint: None,
        nudges: None,
        poll_at: None,
        skew: Arc::new(AtomicI64::new(0)),
        contracts_due: true,
        telemetry_sent: HashMap::new(),
    };
    let task = tokio::spawn(agent.run(commands_rx, shutdown.clone()));
    AgentHandle {
        commands,
        events,
        device_id,
        shutdown,
        task,
    }
}

/// Most outcomes remembered; the oldest reported ones are forgotten first.
const DONE_LIMIT: usize = 1024;

struct Agent {
    config: AgentConfig,
    executor: Arc<dyn JobExecutor>,
    store: Box<dyn StateStore>,
    state: AgentState,
    events: broadcast::Sender<AgentEvent>,
    device_id: Arc<Mutex<Option<DeviceId>>>,
    session: Option<DataSession>,
    /// Server clock minus ours, from the last welcome.
    skew_ms: i64,
    mqtt_up: bool,
    backoff: Backoff,
    last_activity: Instant,
    /// The data channel endpoint of the open session.
    data_endpoint: Option<String>,
    /// The data channel endpoint that answered last.
    data_last_good: Option<String>,
    /// Working through a worse data endpoint: when to try the better ones again.
    retry_better_at: Option<Instant>,
    /// The broker the notification channel is connected to.
    mqtt_endpoint: Option<String>,
    /// The settings report the cloud has (in this run).
    last_report: Option<SettingsReport>,
    /// New settings were applied: restart the links with them after this round.
    relink: bool,
    /// Building the TLS client configuration failed (logged once).
    tls_failed: bool,
    /// Where the LAN endpoint listens.
    lan_endpoint: Option<String>,
    /// Checks nudges for this identity.
    nudges: Option<Arc<NudgeCheck>>,
    /// An accepted nudge asks for a poll at this time.
    poll_at: Option<Instant>,
    /// `skew_ms`, for the LAN endpoint's task.
    skew: Arc<AtomicI64>,
    /// Fetch the contracts with the next round (at start, on a change, a day after the last).
    contracts_due: bool,
    /// When each active support service was last sent its readings.
    telemetry_sent: HashMap<String, Instant>,
}

/// Why a round of work stopped early.
#[derive(Debug)]
enum WorkError {
    Session(SessionError),
    State(StateError),
}

impl From<SessionError> for WorkError {
    fn from(e: SessionError) -> Self {
        WorkError::Session(e)
    }
}

impl From<StateError> for WorkError {
    fn from(e: StateError) -> Self {
        WorkError::State(e)
    }
}

type LongPoll =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, SessionError>> + Send>>;

impl Agent {
    fn emit(&self, event: AgentEvent) {
        let _ = self.events.send(event);
    }

    fn save(&mut self) -> Result<(), StateError> {
        self.store.save(&self.state)
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        shutdown: CancellationToken,
    ) -> Result<(), AgentError> {
        self.backoff = Backoff::new(self.config.backoff_min, self.config.slow_poll);
        self.state = self.store.load()?.unwrap_or_default();
        for (service, enabled) in &self.config.support_services {
            self.state
                .support
                .entry(service.clone())
                .or_insert_with(|| SupportService {
                    enabled: *enabled,
                    active: None,
                });
        }
        if self.state.consent.is_none() {
            // First start: the set-up screen's choice, reported to the cloud once registered.
            let limit = self.config.outbox_limit;
            outbox::set_consent(
                &mut self.state,
                self.config.consent_at_setup,
                UnixMillis::now(),
                limit,
            );
            self.save()?;
        }
        loop {
            let credentials = match self.state.credentials.clone() {
                Some(c) => c,
                None => match self.register(&shutdown).await? {
                    Some(c) => c,
                    None => return Ok(()),
                },
            };
            *self.device_id.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(credentials.device_id.clone());
            let span = tracing::info_span!("agent", device = %credentials.device_id);
            let exit = self
                .main_loop(credentials, &mut commands, shutdown.clone())
                .instrument(span)
                .await?;
            match exit {
                Exit::Stopped => return Ok(()),
                Exit::Invalidated(reason) => {
                    tracing::warn!(%reason, "device id invalidated; registering again");
                    self.drop_session("device id invalidated".into());
                    self.state.forget_identity();
                    self.save()?;
                    self.mqtt_up = false;
                    self.emit(AgentEvent::Invalidated {
                        reason: reason.clone(),
                    });
                    if self.config.enrollment_token.is_none() {
                        return Err(AgentError::Invalidated(reason));
                    }
                }
            }
        }
    }

    async fn main_loop(
        &mut self,
        credentials: Credentials,
        commands: &mut mpsc::Receiver<Command>,
        shutdown: CancellationToken,
    ) -> Result<Exit, AgentError> {
        let mut mqtt = self.start_mqtt(&credentials, &shutdown);
        let check = Arc::new(NudgeCheck::new(
            credentials.device_id.clone(),
            &credentials.secret,
        ));
        self.nudges = Some(check.clone());
        let (nudge_tx, mut nudges) = mpsc::channel::<lan::Accepted>(16);
        let (refused_tx, mut refused) = mpsc::channel::<String>(16);
        let lan_stop = shutdown.child_token();
        let _lan_guard = lan_stop.clone().drop_guard();
        if let Some(addr) = self.config.lan_listen {
            match lan::listen(
                addr,
                check,
                self.skew.clone(),
                nudge_tx,
                refused_tx,
                lan_stop,
            )
            .await
            {
                Ok(local) => self.lan_endpoint = Some(local.to_string()),
                Err(e) => tracing::warn!(%addr, error = %e, "cannot listen for LAN nudges"),
            }
        }

        // With a notification channel, a (re)started device does not poll: the cloud pushes on
        // connect when it holds work. That keeps a fleet-wide reconnect off the data channel.
        // It syncs at once only when it has something of its own to send, or without MQTT.
        let has_own_work = !self.state.outbox.is_empty()
            || !self.state.registration_completed
            || self.state.done.iter().any(|d| !d.reported)
            || self.state.hinted.is_some_and(|seq| seq > self.state.cursor)
            || self.state.settings.as_ref().is_some_and(|s| !s.reported);
        let mut want_sync = mqtt.is_none() || has_own_work;
        let mut mqtt_grace = mqtt
            .as_ref()
            .map(|_| Instant::now() + self.config.mqtt_grace);
        let mut retry_at: Option<Instant> = None;
        let mut long_poll: Option<LongPoll> = None;
        let mut data_probe: Option<DataProbe> = None;
        let mut next_poll = Instant::now() + jitter(self.poll_every());
        let mut readings_events = self.config.readings.as_ref().map(|r| r.events());
        loop {
            if want_sync && retry_at.is_none() {
                match self.work().await {
                    Ok(()) => {
                        want_sync = false;
                        self.backoff.reset();
                        // The regular poll counts from the last sync.
                        next_poll = Instant::now() + jitter(self.poll_every());
                    }
                    Err(WorkError::State(e)) => return Err(e.into()),
                    Err(WorkError::Session(e))
                        if e.code() == Some(ErrorCode::DeviceInvalidated) =>
                    {
                        return Ok(Exit::Invalidated(e.to_string()));
                    }
                    Err(WorkError::Session(e)) => {
                        self.drop_session(e.to_string());
                        let delay = self.backoff.next_delay();
                        tracing::debug!(error = %e, ?delay, "cloud unreachable; retrying");
                        retry_at = Some(Instant::now() + delay);
                    }
                }
            }
            if std::mem::take(&mut self.relink) {
                // New settings: both channels start again from the best of the new endpoints.
                if let Some(old) = mqtt.take() {
                    old.retire();
                }
                if self.mqtt_up {
                    self.mqtt_up = false;
                    self.mqtt_endpoint = None;
                    self.emit(AgentEvent::MqttDown("new server settings".into()));
                }
                mqtt = self.start_mqtt(&credentials, &shutdown);
                long_poll = None;
                data_probe = None;
                self.drop_session("new server settings".into());
                self.data_last_good = None;
                self.retry_better_at = None;
                retry_at = None;
                // Report the settings, through the new endpoints.
                want_sync = true;
                continue;
            }
            // Long-poll only while MQTT is down and the data channel is up.
            if long_poll.is_none()
                && !self.config.long_poll.is_zero()
                && !self.mqtt_up
                && retry_at.is_none()
                && self.state.owner_check.is_none()
                && let Some(session) = self.session.clone()
            {
                let request = Request::Sync {
                    after: self.state.cursor,
                    wait_ms: u32::try_from(self.config.long_poll.as_millis()).unwrap_or(u32::MAX),
                    limit: 1,
                    ack: None,
                };
                long_poll = Some(Box::pin(async move { session.request(request).await }));
            }
            let next_report = self.next_periodic_report();
            let quiet = self.mqtt_up || self.config.long_poll.is_zero();
            let idle_close = (quiet && self.session.is_some())
                .then(|| self.last_activity + self.config.data_idle_close);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                command = commands.recv() => match command {
                    None => break,
                    Some(Command::Submit(body, reply)) => {
                        let result = self.submit(body);
                        if matches!(result, Ok(Submitted::Queued(_))) {
                            want_sync = true;
                        }
                        let _ = reply.send(result);
                    }
                    Some(Command::SetConsent(granted, reply)) => {
                        let limit = self.config.outbox_limit;
                        let consent =
                            outbox::set_consent(&mut self.state, granted, UnixMillis::now(), limit);
                        let _ = reply.send(self.save().map(|()| consent).map_err(AgentError::from));
                        want_sync = true;
                    }
                    Some(Command::GetConsent(reply)) => {
                        let _ = reply.send(Ok(self.state.consent));
                    }
                    Some(Command::InUse(reply)) => {
                        let _ = reply.send(Ok(self.in_use()));
                    }
                    Some(Command::SetSupport(service, enabled, reply)) => {
                        self.state.support.entry(service).or_default().enabled = enabled;
                        self.contracts_due = true;
                        let _ = reply.send(self.save().map_err(AgentError::from));
                        want_sync = true;
                    }
                    Some(Command::Call(request, reply)) => {
                        let released = matches!(request, Request::Release { .. });
                        let result = match self.session().await {
                            Ok(session) => match session.request(request).await {
                                Ok(response) => Ok(response),
                                Err(SessionError::Request(body)) => Err(AgentError::Refused(body)),
                                Err(e) => Err(AgentError::Offline(e.to_string())),
                            },
                            Err(e) => Err(AgentError::Offline(e.to_string())),
                        };
                        // Released jobs are in the feed now: fetch them at once.
                        if released && result.is_ok() {
                            want_sync = true;
                        }
                        let _ = reply.send(result);
                    }
                    Some(Command::ReportCounters(reply)) => {
                        let result = self.queue_counters().await;
                        if matches!(result, Ok(Submitted::Queued(_))) {
                            want_sync = true;
                        }
                        let _ = reply.send(result);
                    }
                    Some(Command::Readings(readings, reply)) => {
                        let queued = self.queue_telemetry(&readings, |_| true);
                        if !matches!(queued, Ok(ref q) if q.is_empty()) {
                            want_sync = true;
                        }
                        let _ = reply.send(queued);
                    }
                    Some(Command::OwnerCheck(reason, reply)) => {
                        if self.state.owner_check.is_none() {
                            self.state.owner_check = Some(PendingOwnerCheck {
                                reason,
                                since: UnixMillis::now(),
                                reported: false,
                            });
                        }
                        let _ = reply.send(self.save().map_err(AgentError::from));
                        want_sync = true;
                    }
                    Some(Command::ConfirmOwner(owner, reply)) => {
                        let result = self.confirm_owner(owner).await;
                        let invalidated = match &result {
                            Err(AgentError::Invalidated(reason)) => Some(reason.clone()),
                            _ => None,
                        };
                        let _ = reply.send(result);
                        if let Some(reason) = invalidated {
                            return Ok(Exit::Invalidated(reason));
                        }
                        want_sync = true;
                    }
                    Some(Command::PollNow) => want_sync = true,
                },
                event = async { mqtt.as_mut().expect("guarded").events.recv().await }, if mqtt.is_some() => match event {
                    Some(LinkEvent::Up { endpoint }) => {
                        self.mqtt_up = true;
                        mqtt_grace = None;
                        long_poll = None;
                        if let Some(s) = self.state.settings.as_mut()
                            && s.endpoints.mqtt.contains(&endpoint)
                        {
                            // One of the new brokers answered; saved with the next change.
                            s.previous.mqtt.clear();
                        }
                        self.mqtt_endpoint = Some(endpoint.clone());
                        self.emit(AgentEvent::MqttUp { endpoint });
                        // With the data channel open anyway, the cloud learns the broker in use
                        // now; otherwise with the next round.
                        if let Some(session) = self.session.clone().filter(|s| !s.is_closed()) {
                            match self.report_settings(&session).await {
                                Err(WorkError::State(e)) => return Err(e.into()),
                                Err(WorkError::Session(e)) => {
                                    tracing::debug!(error = %e, "settings report failed; sent with the next round")
                                }
                                Ok(()) => {}
                            }
                        }
                    }
                    Some(LinkEvent::Down(reason)) => {
                        self.mqtt_up = false;
                        self.mqtt_endpoint = None;
                        self.emit(AgentEvent::MqttDown(reason));
                        want_sync = true;
                    }
                    Some(LinkEvent::Refused(reason)) => {
                        self.mqtt_up = false;
                        self.mqtt_endpoint = None;
                        self.emit(AgentEvent::MqttRefused(reason));
                        // The data channel learns why (disabled, invalidated) and acts on it.
                        want_sync = true;
                    }
                    Some(LinkEvent::Hint(hint)) => {
                        if hint.seq > self.state.cursor && self.state.hinted < Some(hint.seq) {
                            // Noted on disk before acting: a reboot before the fetch still
                            // fetches.
                            self.state.hinted = Some(hint.seq);
                            self.save()?;
                        }
                        self.emit(AgentEvent::HintReceived { kind: hint.kind, seq: hint.seq });
                        if hint.seq > self.state.cursor || hint.kind == HintKind::PollNow {
                            want_sync = true;
                            retry_at = None;
                        }
                    }
                    None => {}
                },
                result = async { long_poll.as_mut().expect("guarded").await }, if long_poll.is_some() => {
                    long_poll = None;
                    match result {
                        Ok(Response::Feed { entries, .. }) => {
                            self.last_activity = Instant::now();
                            if !entries.is_empty() {
                                want_sync = true;
                            }
                        }
                        Ok(_) => want_sync = true,
                        Err(e) => {
                            self.drop_session(e.to_string());
                            want_sync = true;
                        }
                    }
                }
                _ = async { tokio::time::sleep_until(retry_at.expect("guarded")).await }, if retry_at.is_some() => {
                    retry_at = None;
                    want_sync = true;
                }
                Some(accepted) = nudges.recv() => self.nudged(accepted),
                changed = async { readings_events.as_mut().expect("guarded").changed().await }, if readings_events.is_some() => {
                    match changed {
                        Ok(()) => {
                            // Something worth reporting at once happened on the device.
                            let now = self.config.readings.as_ref().map(|r| r.read()).unwrap_or_default();
                            if !self.queue_telemetry(&now, |_| true)?.is_empty() {
                                want_sync = true;
                            }
                        }
                        Err(_) => readings_events = None,
                    }
                }
                _ = async { tokio::time::sleep_until(next_report.expect("guarded")).await }, if next_report.is_some() => {
                    let now = self.config.readings.as_ref().map(|r| r.read()).unwrap_or_default();
                    let due = |s: &str, every: u32| {
                        self.telemetry_sent.get(s).is_none_or(|at| at.elapsed() >= Duration::from_secs(u64::from(every)))
                    };
                    let due: Vec<String> = self.state.support.iter()
                        .filter_map(|(id, s)| s.active.as_ref().filter(|a| a.report_every_secs > 0 && due(id, a.report_every_secs)).map(|_| id.clone()))
                        .collect();
                    if !self.queue_telemetry(&now, |id| due.iter().any(|d| d == id))?.is_empty() {
                        want_sync = true;
                    }
                }
                Some(reason) = refused.recv() => self.emit(AgentEvent::NudgeRefused { reason }),
                _ = async { tokio::time::sleep_until(self.poll_at.expect("guarded")).await }, if self.poll_at.is_some() => {
                    self.poll_at = None;
                    want_sync = true;
                }
                _ = tokio::time::sleep_until(next_poll) => {
                    want_sync = true;
                    next_poll = Instant::now() + jitter(self.poll_every());
                }
                _ = async { tokio::time::sleep_until(mqtt_grace.expect("guarded")).await }, if mqtt_grace.is_some() => {
                    // MQTT did not come up in time: work over the data channel (long-poll).
                    mqtt_grace = None;
                    want_sync = true;
                }
                _ = async { tokio::time::sleep_until(idle_close.expect("guarded")).await }, if idle_close.is_some() => {
                    self.drop_session("idle while MQTT is up".into());
                }
                _ = async { tokio::time::sleep_until(self.retry_better_at.expect("guarded")).await },
                    if self.retry_better_at.is_some() && self.session.is_some() && data_probe.is_none() => {
                    self.retry_better_at = None;
                    data_probe = self.probe_better_data();
                }
                found = async { data_probe.as_mut().expect("guarded").join().await }, if data_probe.is_some() => {
                    data_probe = None;
                    match found.flatten() {
                        Some((session, welcome, endpoint)) => {
                            // A better endpoint answers again: move over. The long-poll on the
                            // old connection goes with it.
                            long_poll = None;
                            self.drop_session(format!("moving to {endpoint}"));
                            let rank = self.endpoints().data.iter().position(|e| *e == endpoint).unwrap_or(0);
                            self.data_connected(&endpoint, rank);
                            self.on_welcome(&welcome);
                            self.session = Some(session);
                            self.last_activity = Instant::now();
                            self.emit_data_up();
                            tracing::info!(%endpoint, "data channel back on a better endpoint");
                            // The cloud learns which endpoint the device uses now.
                            want_sync = true;
                        }
                        None => {
                            self.retry_better_at = Some(Instant::now() + jitter(self.config.probe_interval));
                        }
                    }
                }
            }
        }
        if let Some(session) = self.session.take() {
            session.close();
        }
        Ok(Exit::Stopped)
    }

    /// Fetches the contracts and activates or deactivates support services to match: active are
    /// exactly those enabled in the device's table, with a contract (non-empty application id),
    /// supporting the device's model.
    async fn sync_contracts(&mut self, session: &DataSession) -> Result<(), WorkError> {
        let response = session.request(Request::Contracts).await?;
        let Response::Contracts { contracts } = response else {
            return Err(SessionError::Closed(format!(
                "unexpected answer to contracts: {response:?}"
            ))
            .into());
        };
        let model = self.config.info.model.clone();
        let services: Vec<String> = self.state.support.keys().cloned().collect();
        for service_id in services {
            let enabled = self.state.support[&service_id].enabled;
            let contract = contracts
                .iter()
                .find(|c| c.service_id == service_id)
                .filter(|c| enabled && !c.application_id.is_empty() && c.models.contains(&model));
            let current = self.state.support[&service_id]
                .active
                .as_ref()
                .map(|a| a.application_id.clone());
            let wanted = contract.map(|c| c.application_id.clone());
            if current == wanted {
                continue;
            }
            let activated = match wanted {
                None => None,
                Some(application_id) => {
                    let request = Request::ActivateService {
                        service_id: service_id.clone(),
                        application_id: application_id.clone(),
                    };
                    match session.request(request).await {
                        Ok(Response::DeviceControl(control)) => Some(ActiveService {
                            application_id,
                            data_types: control.data_types,
                            report_every_secs: control.report_every_secs,
                        }),
                        Ok(other) => {
                            return Err(SessionError::Closed(format!(
                                "unexpected answer to activate_service: {other:?}"
                            ))
                            .into());
                        }
                        Err(SessionError::Request(error)) => {
                            tracing::warn!(%service_id, %error, "activation refused");
                            None
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            let entry = self.state.support.entry(service_id.clone()).or_default();
            let was_active = entry.active.is_some();
            entry.active = activated.clone();
            match activated {
                Some(a) => self.emit(AgentEvent::SupportActivated {
                    service_id,
                    data_types: a.data_types,
                }),
                None if was_active => {
                    self.telemetry_sent.remove(&service_id);
                    self.emit(AgentEvent::SupportDeactivated { service_id });
                }
                None => {}
            }
        }
        // Telemetry queued for a service no longer active is not sent.
        let support = &self.state.support;
        self.state.outbox.retain(|i| match &i.body {
            DeviceRequest::Telemetry { service_id, .. } => {
                support.get(service_id).is_some_and(|s| s.active.is_some())
            }
            _ => true,
        });
        self.state.contracts_fetched_at = Some(UnixMillis::now());
        self.contracts_due = false;
        self.save()?;
        Ok(())
    }

    /// Queues, for each active support service `pick` chooses, exactly the readings of the
    /// data types it asked for. Returns the services queued for.
    fn queue_telemetry(
        &mut self,
        readings: &BTreeMap<String, String>,
        pick: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, AgentError> {
        let now = UnixMillis::now();
        let limit = self.config.outbox_limit;
        let mut queued = Vec::new();
        let wanted: Vec<(String, Vec<String>)> = self
            .state
            .support
            .iter()
            .filter(|(id, _)| pick(id))
            .filter_map(|(id, s)| {
                s.active
                    .as_ref()
                    .map(|a| (id.clone(), a.data_types.clone()))
            })
            .collect();
        for (service_id, types) in wanted {
            let picked: BTreeMap<String, String> = readings
                .iter()
                .filter(|(k, _)| types.contains(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if picked.is_empty() {
                continue;
            }
            let data_types: Vec<String> = picked.keys().cloned().collect();
            let body = DeviceRequest::Telemetry {
                service_id: service_id.clone(),
                readings: picked,
            };
            match outbox::admit(&mut self.state, body, now, limit) {
                Ok(Submitted::Queued(_)) => {
                    self.telemetry_sent
                        .insert(service_id.clone(), Instant::now());
                    self.emit(AgentEvent::TelemetryQueued {
                        service_id: service_id.clone(),
                        data_types,
                    });
                    queued.push(service_id);
                }
                // Without consent nothing is even queued.
                Ok(Submitted::Withheld) => {}
                Err(full) => tracing::warn!(%service_id, error = %full, "telemetry dropped"),
            }
        }
        if !queued.is_empty() {
            self.save()?;
        }
        Ok(queued)
    }

    /// Reads the counters whole and queues them.
    async fn queue_counters(&mut self) -> Result<Submitted, AgentError> {
        let Some(source) = self.config.counters.clone() else {
            return Ok(Submitted::Withheld);
        };
        let counters = counters::read_whole(source.as_ref()).await;
        self.submit(DeviceRequest::Counters { counters })
    }

    /// When the next periodic report of an active support service is due.
    fn next_periodic_report(&self) -> Option<Instant> {
        self.config.readings.as_ref()?;
        self.state
            .support
            .iter()
            .filter_map(|(id, s)| {
                let every = s.active.as_ref()?.report_every_secs;
                (every > 0).then(|| {
                    let period = Duration::from_secs(u64::from(every));
                    self.telemetry_sent
                        .get(id)
                        .map_or_else(|| Instant::now() + period, |at| *at + period)
                })
            })
            .min()
    }

    /// A nudge was accepted: poll after its delay (the earliest asked for wins).
    fn nudged(&mut self, accepted: lan::Accepted) {
        let at = Instant::now() + accepted.delay;
        self.poll_at = Some(self.poll_at.map_or(at, |p| p.min(at)));
        self.emit(AgentEvent::NudgeAccepted {
            nudge_id: accepted.nudge_id,
            delay_ms: u64::try_from(accepted.delay.as_millis()).unwrap_or(u64::MAX),
        });
    }

    /// Starts the notification link on the current brokers; `None` without any.
    fn start_mqtt(
        &mut self,
        credentials: &Credentials,
        shutdown: &CancellationToken,
    ) -> Option<MqttLink> {
        let endpoints = self.endpoints().mqtt;
        if endpoints.is_empty() {
            return None;
        }
        let settings = MqttSettings {
            endpoints,
            keep_alive: self.config.mqtt_keep_alive,
            backoff_min: self.config.backoff_min,
            backoff_max: self.config.slow_poll,
            probe_interval: self.config.probe_interval,
            tls: self.tls_client(),
        };
        let (tx, events) = mpsc::channel(64);
        let stop = shutdown.child_token();
        let task = tokio::spawn(mqtt::run(settings, credentials.clone(), tx, stop.clone()));
        Some(MqttLink {
            events,
            stop,
            task: AbortOnDrop::new(task),
        })
    }

    /// Applies settings from the feed: kept on disk, used from the end of this round on.
    fn apply_settings(&mut self, revision: u64, settings: &DeviceSettings) {
        let applied = self.state.settings.as_ref().map_or(0, |s| s.revision);
        if revision <= applied {
            return;
        }
        if let Err(e) = settings.endpoints.validate() {
            // The cloud checks before sending; this is a version mismatch. The report keeps
            // saying the old revision.
            tracing::warn!(revision, error = %e, "server settings not applied");
            return;
        }
        let before = self.endpoints();
        let keep = |old: Vec<String>, new: &[String]| -> Vec<String> {
            // No broker at all is a choice (data channel only), not a mistake to guard against.
            if new.is_empty() {
                return Vec::new();
            }
            old.into_iter().filter(|e| !new.contains(e)).collect()
        };
        let previous = Endpoints {
            data: keep(before.data, &settings.endpoints.data),
            mqtt: keep(before.mqtt, &settings.endpoints.mqtt),
        };
        tracing::info!(revision, endpoints = ?settings.endpoints, "server settings applied");
        self.state.settings = Some(AppliedSettings {
            revision,
            endpoints: settings.endpoints.clone(),
            previous,
            reported: false,
        });
        self.relink = true;
        self.emit(AgentEvent::SettingsApplied { revision });
    }

    fn in_use(&self) -> SettingsReport {
        SettingsReport {
            revision: self.state.settings.as_ref().map_or(0, |s| s.revision),
            endpoints: self.endpoints(),
            data_in_use: self.data_endpoint.clone(),
            mqtt_in_use: self.mqtt_endpoint.clone(),
            lan_endpoint: self.lan_endpoint.clone(),
        }
    }

    /// Tells the cloud the settings in use, when they differ from what it was last told.
    async fn report_settings(&mut self, session: &DataSession) -> Result<(), WorkError> {
        let report = self.in_use();
        if self.last_report.as_ref() == Some(&report) {
            return Ok(());
        }
        let revision = report.revision;
        session
            .request(Request::ReportSettings {
                report: report.clone(),
            })
            .await?;
        self.last_report = Some(report);
        if let Some(s) = self.state.settings.as_mut()
            && !s.reported
        {
            s.reported = true;
            self.save()?;
        }
        self.emit(AgentEvent::SettingsReported { revision });
        Ok(())
    }

    /// Sends owner information entered at the panel to the cloud.
    async fn confirm_owner(&mut self, owner: OwnerClaim) -> Result<(), AgentError> {
        let session = self
            .session()
            .await
            .map_err(|e| AgentError::Offline(e.to_string()))?;
        match session.request(Request::ConfirmOwner { owner }).await {
            Ok(_) => {
                self.state.owner_check = None;
                self.save()?;
                self.emit(AgentEvent::OwnerConfirmed);
                Ok(())
            }
            Err(SessionError::Request(body)) if body.code == ErrorCode::DeviceInvalidated => {
                Err(AgentError::Invalidated(body.message))
            }
            Err(SessionError::Request(body)) => Err(AgentError::Refused(body)),
            Err(e) => Err(AgentError::Offline(e.to_string())),
        }
    }

    /// Queues a request in the outbox, durably.
    fn submit(&mut self, body: DeviceRequest) -> Result<Submitted, AgentError> {
        let limit = self.config.outbox_limit;
        let submitted = outbox::admit(&mut self.state, body, UnixMillis::now(), limit)?;
        if let Submitted::Queued(_) = submitted {
            self.save()?;
        }
        Ok(submitted)
    }

    fn drop_session(&mut self, reason: String) {
        self.data_endpoint = None;
        if let Some(session) = self.session.take() {
            // The connection's own account, when it has ended, says more than the caller's.
            let reason = session.close_reason().unwrap_or(reason);
            session.close();
            self.emit(AgentEvent::DataDown(reason));
        }
    }

    /// Registers with the enrollment token, retrying while the cloud is unreachable.
    /// `None` means shutdown came first.
    async fn register(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Credentials>, AgentError> {
        let token = self
            .config
            .enrollment_token
            .clone()
            .ok_or(AgentError::NoCredentials)?;
        let info = self.config.info.clone();
        loop {
            let auth = HelloAuth::Register(Registration {
                enrollment_token: token.clone(),
                serial: info.serial.clone(),
                model: info.model.clone(),
                destination: info.destination.clone(),
                time_zone: info.time_zone.clone(),
                owner: self.config.owner.clone(),
            });
            match self.connect_data(auth).await {
                Ok((session, welcome)) => {
                    let Some(secret) = welcome.credentials.clone() else {
                        return Err(AgentError::Registration(ErrorBody::new(
                            ErrorCode::Internal,
                            "welcome carried no credentials",
                        )));
                    };
                    let credentials = Credentials {
                        device_id: welcome.device_id.clone(),
                        secret,
                    };
                    self.state.credentials = Some(credentials.clone());
                    self.save()?;
                    self.on_welcome(&welcome);
                    self.session = Some(session);
                    tracing::info!(device = %welcome.device_id, "registered");
                    // Known before any event says the device exists.
                    *self.device_id.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(welcome.device_id.clone());
                    self.emit(AgentEvent::Registered(welcome.device_id));
                    self.emit_data_up();
                    return Ok(Some(credentials));
                }
                Err(SessionError::Refused(body)) => return Err(AgentError::Registration(body)),
                Err(e) => {
                    let delay = self.backoff.next_delay();
                    tracing::warn!(error = %e, ?delay, "cannot register yet; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return Ok(None),
                    }
                }
            }
        }
    }

    async fn session(&mut self) -> Result<DataSession, SessionError> {
        if let Some(s) = &self.session {
            if !s.is_closed() {
                return Ok(s.clone());
            }
            let reason = s
                .close_reason()
                .unwrap_or_else(|| "connection ended".into());
            self.drop_session(reason);
        }
        let credentials = self
            .state
            .credentials
            .clone()
            .ok_or_else(|| SessionError::Closed("no credentials".into()))?;
        let auth = HelloAuth::Device {
            device_id: credentials.device_id,
            secret: credentials.secret,
        };
        let (session, welcome) = self.connect_data(auth).await?;
        self.on_welcome(&welcome);
        self.session = Some(session.clone());
        self.emit_data_up();
        Ok(session)
    }

    /// Notes what every welcome says: the server's clock and the poll schedule it asks for
    /// (saved with the next change of state).
    fn on_welcome(&mut self, welcome: &Welcome) {
        self.skew_ms = welcome.server_time.0 as i64 - UnixMillis::now().0 as i64;
        self.skew.store(self.skew_ms, Ordering::Relaxed);
        if welcome.poll_interval_secs.is_some() {
            self.state.poll_interval_secs = welcome.poll_interval_secs;
        }
    }

    /// The regular poll: the configured one, else the cloud's, else a day.
    fn poll_every(&self) -> Duration {
        self.config.poll_interval.unwrap_or_else(|| {
            Duration::from_secs(u64::from(
                self.state.poll_interval_secs.unwrap_or(24 * 3600),
            ))
        })
    }

    fn emit_data_up(&self) {
        if let Some(endpoint) = self.data_endpoint.clone() {
            self.emit(AgentEvent::DataUp { endpoint });
        }
    }

    /// The endpoints the agent works from, best first: the applied settings (followed by the
    /// ones used before them, until one of the new ones answers), or the factory ones.
    fn endpoints(&self) -> Endpoints {
        match &self.state.settings {
            Some(s) => s.effective(),
            None => self.config.endpoints.clone(),
        }
    }

    /// How TLS servers are verified, built the first time an endpoint asks for TLS (so that a
    /// device without TLS endpoints never reads certificates). A failure is logged once and
    /// leaves TLS endpoints unusable; they are never tried in plain text.
    fn tls_client(&mut self) -> Option<Arc<tls::rustls::ClientConfig>> {
        if self.config.session.tls.is_none() && !self.tls_failed {
            let endpoints = self.endpoints();
            let wanted = endpoints.data.iter().any(|u| u.starts_with("wss://"))
                || endpoints.mqtt.iter().any(|m| m.starts_with("mqtts://"));
            if wanted {
                match tls::client_config(self.config.ca_file.as_deref()) {
                    Ok(config) => self.config.session.tls = Some(config),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot verify TLS servers; TLS endpoints are unusable");
                        self.tls_failed = true;
                    }
                }
            }
        }
        self.config.session.tls.clone()
    }

    /// Connects the data channel through the first endpoint that answers, best first; while
    /// a worse endpoint works and it is not yet time to try the better ones, from that one.
    async fn connect_data(
        &mut self,
        auth: HelloAuth,
    ) -> Result<(DataSession, Welcome), SessionError> {
        let list = self.endpoints().data;
        self.tls_client();
        let now = Instant::now();
        let start = match (&self.data_last_good, self.retry_better_at) {
            (Some(good), Some(at)) if at > now => list.iter().position(|e| e == good).unwrap_or(0),
            _ => 0,
        };
        let mut last_error = None;
        for rank in (start..list.len()).chain(0..start) {
            let url = &list[rank];
            let attempt = DataSession::connect(
                url,
                auth.clone(),
                &self.config.agent_name,
                self.config.session.clone(),
            )
            .await;
            match attempt {
                Ok((session, welcome)) => {
                    self.data_connected(url, rank);
                    return Ok((session, welcome));
                }
                // A server that answered has spoken for the service; another would not differ.
                Err(e @ SessionError::Refused(_)) => return Err(e),
                Err(e) => {
                    tracing::debug!(endpoint = %url, error = %e, "data endpoint unreachable");
                    last_error = Some(e);
                }
            }
        }
        Err(last_error
            .unwrap_or_else(|| SessionError::Closed("no data channel endpoint configured".into())))
    }

    /// Notes that `endpoint`, `rank`th best, answered.
    fn data_connected(&mut self, endpoint: &str, rank: usize) {
        self.data_endpoint = Some(endpoint.to_owned());
        self.data_last_good = Some(endpoint.to_owned());
        let now = Instant::now();
        if rank == 0 {
            self.retry_better_at = None;
        } else if self.retry_better_at.is_none_or(|at| at <= now) {
            self.retry_better_at = Some(now + jitter(self.config.probe_interval));
        }
        // One of the new endpoints answered: the ones used before are no longer needed
        // (saved with the next change of state).
        if let Some(s) = self.state.settings.as_mut()
            && s.endpoints.data.iter().any(|e| e == endpoint)
        {
            s.previous.data.clear();
        }
    }

    /// Connects to the first data endpoint better than the one in use, in the background.
    fn probe_better_data(&self) -> Option<DataProbe> {
        let list = self.endpoints().data;
        let current = self.data_endpoint.as_ref()?;
        let rank = list.iter().position(|e| e == current)?;
        let credentials = self.state.credentials.clone()?;
        let better: Vec<String> = list[..rank].to_vec();
        let agent = self.config.agent_name.clone();
        let settings = self.config.session.clone();
        Some(AbortOnDrop::new(tokio::spawn(async move {
            for url in better {
                let auth = HelloAuth::Device {
                    device_id: credentials.device_id.clone(),
                    secret: credentials.secret.clone(),
                };
                if let Ok((session, welcome)) =
                    DataSession::connect(&url, auth, &agent, settings.clone()).await
                {
                    return Some((session, welcome, url));
                }
            }
            None
        })))
    }

    /// One round: report what is unreported, handle every new feed entry, send the status.
    async fn work(&mut self) -> Result<(), WorkError> {
        let session = self.session().await?;
        self.last_activity = Instant::now();
        if !self.state.registration_completed {
            // The credentials are on disk: tell the cloud, which only then lets companions
            // send jobs to this device.
            session.request(Request::CompleteRegistration).await?;
            self.state.registration_completed = true;
            self.save()?;
        }
        if let Some(capabilities) = &self.config.printer
            && self.state.printer_registered.as_ref() != Some(capabilities)
        {
            let request = Request::RegisterPrinter {
                capabilities: capabilities.clone(),
            };
            session.request(request).await?;
            self.state.printer_registered = Some(capabilities.clone());
            self.save()?;
        }
        if let Some(check) = &self.state.owner_check {
            // Sent again while waiting for the owner: it also tells whether the cloud has
            // given up waiting (the id is then invalidated and this request refused).
            let reason = check.reason.clone();
            let response = session.request(Request::OwnerCheck { reason }).await?;
            let Response::OwnerCheck { deadline } = response else {
                return Err(SessionError::Closed(format!(
                    "unexpected answer to owner_check: {response:?}"
                ))
                .into());
            };
            let first = self.state.owner_check.as_ref().is_some_and(|c| !c.reported);
            match deadline {
                // No owner bound: nothing to confirm.
                None => self.state.owner_check = None,
                Some(_) => {
                    if let Some(check) = self.state.owner_check.as_mut() {
                        check.reported = true;
                    }
                }
            }
            if first {
                self.save()?;
                self.emit(AgentEvent::OwnerCheckStarted { deadline });
            }
        }
        let unreported: Vec<JobId> = self
            .state
            .done
            .iter()
            .filter(|d| !d.reported)
            .map(|d| d.job_id.clone())
            .collect();
        for job_id in unreported {
            self.report_outcome(&session, &job_id).await?;
        }
        self.deliver_outbox(&session).await?;
        // While the owner has not confirmed, jobs wait (the cloud would not hand them out).
        // Each sync after the first acknowledges what the one before it returned.
        let mut ack = None;
        while self.state.owner_check.is_none() {
            let sent_ack = ack.take();
            let response = session
                .request(Request::Sync {
                    after: self.state.cursor,
                    wait_ms: 0,
                    limit: 64,
                    ack: sent_ack,
                })
                .await?;
            if let Some(cursor) = sent_ack {
                self.emit(AgentEvent::Synced { cursor });
            }
            let Response::Feed { entries, .. } = response else {
                return Err(SessionError::Closed(format!(
                    "unexpected answer to sync: {response:?}"
                ))
                .into());
            };
            if entries.is_empty() {
                break;
            }
            for entry in entries {
                self.handle_entry(&session, &entry).await?;
                self.state.cursor = entry.seq;
                self.save()?;
            }
            ack = Some(self.state.cursor);
        }
        if let Some(upto) = ack {
            // Left unsent only when an owner check began meanwhile: acknowledge on its own.
            session.request(Request::Ack { upto }).await?;
            self.emit(AgentEvent::Synced { cursor: upto });
        }
        if self.state.owner_check.is_none() && self.state.hinted.take().is_some() {
            // Everything the hint announced has been fetched (the sync reached the end).
            self.save()?;
        }
        let day = Duration::from_secs(24 * 3600).as_millis() as u64;
        let stale = self
            .state
            .contracts_fetched_at
            .is_none_or(|at| UnixMillis::now().0.saturating_sub(at.0) >= day);
        if self.state.owner_check.is_none() && (self.contracts_due || stale) {
            self.sync_contracts(&session).await?;
        }
        // The feed may have asked for something (a consent report).
        self.deliver_outbox(&session).await?;
        if !self.relink {
            self.report_settings(&session).await?;
        }
        self.last_activity = Instant::now();
        Ok(())
    }

    /// Sends the outbox, oldest first, until it is empty.
    async fn deliver_outbox(&mut self, session: &DataSession) -> Result<(), WorkError> {
        while !self.state.outbox.is_empty() {
            let items: Vec<_> = self
                .state
                .outbox
                .iter()
                .take(MAX_DELIVER_ITEMS)
                .cloned()
                .collect();
            let response = session.request(Request::Deliver { items }).await?;
            let Response::Delivered { upto, refused } = response else {
                return Err(SessionError::Closed(format!(
                    "unexpected answer to deliver: {response:?}"
                ))
                .into());
            };
            let mut handled = Vec::new();
            while self.state.outbox.front().is_some_and(|i| i.no <= upto) {
                if let Some(item) = self.state.outbox.pop_front() {
                    handled.push(item);
                }
            }
            if handled.is_empty() {
                return Err(SessionError::Closed(format!(
                    "the cloud handled none of the outbox (upto {upto})"
                ))
                .into());
            }
            self.save()?;
            for item in handled {
                match refused.iter().find(|r| r.no == item.no) {
                    Some(r) => {
                        tracing::warn!(no = %item.no, kind = item.body.kind(), error = %r.error, "request refused");
                        self.emit(AgentEvent::RequestRefused {
                            no: item.no,
                            error: r.error.clone(),
                        });
                    }
                    None => self.emit(AgentEvent::RequestDelivered {
                        no: item.no,
                        kind: item.body.kind(),
                    }),
                }
            }
        }
        Ok(())
    }

    async fn handle_entry(
        &mut self,
        session: &DataSession,
        entry: &FeedEntry,
    ) -> Result<(), WorkError> {
        match &entry.body {
            FeedBody::JobOffered { job_id } => self.run_job(session, job_id).await,
            FeedBody::ConsentQuery => {
                let limit = self.config.outbox_limit;
                outbox::report_consent(&mut self.state, UnixMillis::now(), limit);
                Ok(())
            }
            FeedBody::Settings { revision, settings } => {
                self.apply_settings(*revision, settings);
                Ok(())
            }
            FeedBody::Instruction { instruction_id, .. } => {
                self.take_instruction(session, instruction_id).await
            }
            FeedBody::HeldJobsChanged { user_id } => {
                self.emit(AgentEvent::HeldJobsChanged {
                    user_id: user_id.clone(),
                });
                Ok(())
            }
            FeedBody::ContractsChanged => {
                // Fetched once at the end of this round, however many changes there were.
                self.contracts_due = true;
                Ok(())
            }
            // A cancel of a job not running now needs nothing: the cloud refuses to hand it out.
            FeedBody::JobCanceled { .. } | FeedBody::Unknown => Ok(()),
        }
    }

    /// Takes an instruction from the mailbox and acts on it. The cloud refuses one that has
    /// expired: it is skipped, never acted on.
    async fn take_instruction(
        &mut self,
        session: &DataSession,
        instruction_id: &InstructionId,
    ) -> Result<(), WorkError> {
        let request = Request::TakeInstruction {
            instruction_id: instruction_id.clone(),
        };
        let offer = match session.request(request).await {
            Ok(Response::Instruction(offer)) => offer,
            Ok(other) => {
                return Err(SessionError::Closed(format!(
                    "unexpected answer to take_instruction: {other:?}"
                ))
                .into());
            }
            Err(SessionError::Request(error)) => {
                tracing::info!(%instruction_id, %error, "instruction skipped");
                self.emit(AgentEvent::InstructionSkipped {
                    instruction_id: instruction_id.clone(),
                    error,
                });
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        self.emit(AgentEvent::InstructionTaken {
            instruction_id: instruction_id.clone(),
            kind: offer.body.kind(),
        });
        match offer.body {
            InstructionBody::UseStart {
                service_id,
                registration_url,
                registration_code,
                ..
            } => {
                let request = Request::RegisterService {
                    url: registration_url,
                    code: registration_code,
                };
                match session.request(request).await {
                    Ok(Response::ServiceRegistered { service_id, .. }) => {
                        tracing::info!(%service_id, "registered for a service");
                        self.emit(AgentEvent::ServiceRegistered { service_id });
                    }
                    Ok(other) => {
                        return Err(SessionError::Closed(format!(
                            "unexpected answer to register_service: {other:?}"
                        ))
                        .into());
                    }
                    // A refusal is final (and recorded by the cloud for the administrator).
                    Err(SessionError::Request(error)) => {
                        tracing::warn!(%service_id, %error, "service registration refused");
                        self.emit(AgentEvent::ServiceRefused { service_id, error });
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            InstructionBody::RelayNudge { nudge } => {
                let now = lan::cloud_now(self.skew_ms);
                let verdict = match &self.nudges {
                    Some(check) => check.accept(&nudge, now),
                    None => Err("no identity to check the nudge against".into()),
                };
                match verdict {
                    Ok(accepted) => {
                        lan::pass_on(&nudge);
                        self.nudged(accepted);
                    }
                    Err(reason) => self.emit(AgentEvent::NudgeRefused { reason }),
                }
            }
            InstructionBody::Custom { name, params } => {
                self.emit(AgentEvent::CustomInstruction {
                    instruction_id: instruction_id.clone(),
                    name,
                    params,
                });
            }
            InstructionBody::Unknown => {}
        }
        Ok(())
    }

    async fn run_job(&mut self, session: &DataSession, job_id: &JobId) -> Result<(), WorkError> {
        if let Some(done) = self.state.done.iter().find(|d| &d.job_id == job_id) {
            if !done.reported {
                self.report_outcome(session, job_id).await?;
            }
            return Ok(());
        }
        // The job starts as soon as it is here: fetching it also records it started.
        let offer = match session
            .request(Request::FetchJob {
                job_id: job_id.clone(),
                start: true,
            })
            .await
        {
            Ok(Response::Job(offer)) => offer,
            Ok(other) => {
                return Err(
                    SessionError::Closed(format!("unexpected answer to fetch: {other:?}")).into(),
                );
            }
            // Canceled, expired, finished: nothing to run.
            Err(e) if is_final_refusal(&e) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let attempt = offer.attempt;
        self.emit(AgentEvent::JobFetched {
            job_id: job_id.clone(),
            attempt,
        });
        self.emit(AgentEvent::JobStarted {
            job_id: job_id.clone(),
            attempt,
        });
        let Some(outcome) = self.execute(session, offer).await else {
            self.emit(AgentEvent::JobCanceled {
                job_id: job_id.clone(),
            });
            return Ok(());
        };
        let update = match &outcome {
            JobOutcome::Succeeded { detail } => JobUpdate::Succeeded {
                detail: detail.clone(),
            },
            JobOutcome::Failed { reason } => JobUpdate::Failed {
                reason: reason.clone(),
            },
            JobOutcome::Rejected { reason } => JobUpdate::Rejected {
                reason: reason.clone(),
            },
        };
        self.state.done.push_back(DoneJob {
            job_id: job_id.clone(),
            attempt,
            outcome: update,
            reported: false,
        });
        while self.state.done.len() > DONE_LIMIT {
            match self.state.done.iter().position(|d| d.reported) {
                Some(i) => {
                    self.state.done.remove(i);
                }
                None => break,
            }
        }
        self.save()?;
        self.emit(AgentEvent::JobFinished {
            job_id: job_id.clone(),
            attempt,
            outcome,
        });
        // The job changed the counters: they go with the round's outbox delivery.
        if let Err(e) = self.queue_counters().await {
            tracing::warn!(error = %e, "counters not queued");
        }
        self.report_outcome(session, job_id).await
    }

    /// Runs a job, renewing its lease; `None` if it was canceled or its lease lost meanwhile.
    async fn execute(&self, session: &DataSession, offer: JobOffer) -> Option<JobOutcome> {
        let server_now = UnixMillis::now().0 as i64 + self.skew_ms;
        let remaining = (offer.lease_until.0 as i64 - server_now).max(300) as u64;
        let renew_every = Duration::from_millis((remaining / 3).clamp(100, 20_000));
        let job_id = offer.job_id.clone();
        let attempt = offer.attempt;
        let mut run = self.executor.run(offer);
        let mut renew = tokio::time::interval_at(Instant::now() + renew_every, renew_every);
        loop {
            tokio::select! {
                outcome = &mut run => return Some(outcome),
                _ = renew.tick() => {
                    let progress = Request::JobUpdate { job_id: job_id.clone(), attempt, update: JobUpdate::Progress { percent: 0 } };
                    match session.request(progress).await {
                        Ok(_) => {}
                        Err(e) if is_final_refusal(&e) || e.code() == Some(ErrorCode::LeaseLost) => return None,
                        // A network blip does not stop a print; the outcome is reported later.
                        Err(e) => tracing::debug!(error = %e, "lease renewal failed"),
                    }
                }
            }
        }
    }

    async fn report_outcome(
        &mut self,
        session: &DataSession,
        job_id: &JobId,
    ) -> Result<(), WorkError> {
        let Some(done) = self
            .state
            .done
            .iter()
            .find(|d| &d.job_id == job_id)
            .cloned()
        else {
            return Ok(());
        };
        let report = |attempt: u32| Request::JobUpdate {
            job_id: job_id.clone(),
            attempt,
            update: done.outcome.clone(),
        };
        let result = match session.request(report(done.attempt)).await {
            Err(e) if e.code() == Some(ErrorCode::LeaseLost) => {
                // The lease ran out before we could report: take the job again, report the
                // recorded outcome under the new attempt. It is not run again.
                match session
                    .request(Request::FetchJob {
                        job_id: job_id.clone(),
                        start: false,
                    })
                    .await
                {
                    Ok(Response::Job(offer)) => session.request(report(offer.attempt)).await,
                    other => other,
                }
            }
            other => other,
        };
        match result {
            Ok(_) => {}
            Err(e) if is_final_refusal(&e) => {
                tracing::info!(%job_id, error = %e, "outcome no longer wanted")
            }
            Err(e) => return Err(e.into()),
        }
        if let Some(d) = self.state.done.iter_mut().find(|d| &d.job_id == job_id) {
            d.reported = true;
        }
        self.save()?;
        self.emit(AgentEvent::JobReported {
            job_id: job_id.clone(),
        });
        Ok(())
    }
}

/// Errors after which asking again cannot help.
fn is_final_refusal(e: &SessionError) -> bool {
    matches!(
        e.code(),
        Some(ErrorCode::InvalidState | ErrorCode::NotFound | ErrorCode::Forbidden)
    )
}
