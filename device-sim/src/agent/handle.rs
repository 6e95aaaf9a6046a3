//! The embedder's side: an [`AgentHandle`] that sends commands to the agent's task.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pacing::Backoff;
use schemas::agent::{AgentState, PendingOwnerCheck};
use schemas::data::{DeviceStatus, ErrorBody, OwnerCheckReason, OwnerClaim};
use schemas::outbox::{Consent, DeviceRequest};
use schemas::print::HeldJobSummary;
use schemas::settings::SettingsReport;
use schemas::{DeviceId, JobId, Secret, UnixMillis, UserId};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::executor::JobExecutor;
use crate::outbox::{self, Submitted};
use crate::state::StateStore;

use super::run::{Flow, Loop};
use super::{Agent, AgentConfig, AgentError, AgentEvent, Exit};
use crate::session::{DataSession, SessionError};

/// A call on the data channel, run on the agent's task with its session (or why there is
/// none); resolves to whether it succeeded.
pub(super) struct SessionJob(
    Box<dyn FnOnce(Result<DataSession, SessionError>) -> Succeeded + Send>,
);

type Succeeded = std::pin::Pin<Box<dyn Future<Output = bool> + Send>>;

impl SessionJob {
    pub(super) fn run(self, session: Result<DataSession, SessionError>) -> Succeeded {
        (self.0)(session)
    }
}

impl std::fmt::Debug for SessionJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionJob")
    }
}

pub(super) type Reply<T> = oneshot::Sender<Result<T, AgentError>>;

#[derive(Debug)]
pub(super) enum Command {
    Submit(DeviceRequest, Reply<Submitted>),
    SetConsent(bool, Reply<Consent>),
    GetConsent(Reply<Option<Consent>>),
    OwnerCheck(OwnerCheckReason, Reply<()>),
    ConfirmOwner(OwnerClaim, Reply<()>),
    InUse(Reply<SettingsReport>),
    SetSupport(String, bool, Reply<()>),
    ReportCounters(Reply<Submitted>),
    /// Work on the data channel for the embedder (see [`AgentHandle::with_session`]).
    Session {
        job: SessionJob,
        then_sync: bool,
    },
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
        let logged_in = self
            .with_session(false, move |s| async move { s.login(user_id, pin).await })
            .await?;
        Ok(PrintSession {
            token: logged_in.session,
            expires_at: logged_in.expires_at,
            held: logged_in.held,
        })
    }

    /// The logged-in user's held jobs.
    pub async fn held_jobs(
        &self,
        session: &PrintSession,
    ) -> Result<Vec<HeldJobSummary>, AgentError> {
        let token = session.token.clone();
        self.with_session(false, move |s| async move { s.held_jobs(token).await })
            .await
    }

    /// Releases the chosen held jobs to this device's printer queue; they arrive as jobs (the
    /// agent syncs at once). Returns those released and those refused (with why).
    #[allow(clippy::type_complexity)]
    pub async fn release(
        &self,
        session: &PrintSession,
        jobs: Vec<JobId>,
    ) -> Result<(Vec<JobId>, Vec<(JobId, ErrorBody)>), AgentError> {
        let token = session.token.clone();
        self.with_session(true, move |s| async move { s.release(token, jobs).await })
            .await
    }

    pub async fn logout(&self, session: &PrintSession) -> Result<(), AgentError> {
        let token = session.token.clone();
        self.with_session(false, move |s| async move { s.logout(token).await })
            .await
    }

    /// Runs `call` on the data channel (connecting if needed) on the agent's task. With
    /// `then_sync`, a round of work follows a call that succeeded.
    async fn with_session<T, F, Fut>(&self, then_sync: bool, call: F) -> Result<T, AgentError>
    where
        T: Send + 'static,
        F: FnOnce(DataSession) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, SessionError>> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = SessionJob(Box::new(move |session| {
            Box::pin(async move {
                let result = match session {
                    Ok(session) => call(session).await.map_err(|e| match e {
                        SessionError::Request(body) => AgentError::Refused(body),
                        e => AgentError::Offline(e.to_string()),
                    }),
                    Err(e) => Err(AgentError::Offline(e.to_string())),
                };
                let ok = result.is_ok();
                let _ = reply.send(result);
                ok
            })
        }));
        self.commands
            .send(Command::Session { job, then_sync })
            .await
            .map_err(|_| AgentError::Stopped)?;
        answer.await.map_err(|_| AgentError::Stopped)?
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

impl Agent {
    /// A command from the embedder.
    pub(super) async fn on_command(
        &mut self,
        command: Command,
        lp: &mut Loop,
    ) -> Result<Flow, AgentError> {
        match command {
            Command::Submit(body, reply) => {
                let result = self.submit(body);
                if matches!(result, Ok(Submitted::Queued(_))) {
                    lp.want_sync = true;
                }
                let _ = reply.send(result);
            }
            Command::SetConsent(granted, reply) => {
                let limit = self.config.outbox_limit;
                let consent =
                    outbox::set_consent(&mut self.state, granted, UnixMillis::now(), limit);
                let _ = reply.send(self.save().map(|()| consent).map_err(AgentError::from));
                lp.want_sync = true;
            }
            Command::GetConsent(reply) => {
                let _ = reply.send(Ok(self.state.consent));
            }
            Command::InUse(reply) => {
                let _ = reply.send(Ok(self.in_use()));
            }
            Command::SetSupport(service, enabled, reply) => {
                self.state.support.entry(service).or_default().enabled = enabled;
                self.contracts_due = true;
                let _ = reply.send(self.save().map_err(AgentError::from));
                lp.want_sync = true;
            }
            Command::Session { job, then_sync } => {
                let session = self.session().await;
                // Released jobs are in the feed now: fetch them at once.
                if job.run(session).await && then_sync {
                    lp.want_sync = true;
                }
            }
            Command::ReportCounters(reply) => {
                let result = self.queue_counters().await;
                if matches!(result, Ok(Submitted::Queued(_))) {
                    lp.want_sync = true;
                }
                let _ = reply.send(result);
            }
            Command::Readings(readings, reply) => {
                let queued = self.queue_telemetry(&readings, |_| true);
                if !matches!(queued, Ok(ref q) if q.is_empty()) {
                    lp.want_sync = true;
                }
                let _ = reply.send(queued);
            }
            Command::OwnerCheck(reason, reply) => {
                if self.state.owner_check.is_none() {
                    self.state.owner_check = Some(PendingOwnerCheck {
                        reason,
                        since: UnixMillis::now(),
                        reported: false,
                    });
                }
                let _ = reply.send(self.save().map_err(AgentError::from));
                lp.want_sync = true;
            }
            Command::ConfirmOwner(owner, reply) => {
                let result = self.confirm_owner(owner).await;
                let invalidated = match &result {
                    Err(AgentError::Invalidated(reason)) => Some(reason.clone()),
                    _ => None,
                };
                let _ = reply.send(result);
                if let Some(reason) = invalidated {
                    return Ok(Flow::Exit(Exit::Invalidated(reason)));
                }
                lp.want_sync = true;
            }
            Command::PollNow => lp.want_sync = true,
        }
        Ok(Flow::Go)
    }
}
