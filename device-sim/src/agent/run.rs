//! The agent's task: registration, then the run loop that decides when to talk to the cloud.

use std::sync::Arc;

use pacing::{Backoff, jitter};
use schemas::FeedSeq;
use schemas::UnixMillis;
use schemas::agent::{Credentials, SupportService};
use schemas::data::{ErrorCode, Welcome};
use schemas::feed::FeedEntry;
use schemas::hint::HintKind;
use schemas::outbox::DeviceRequest;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::lan::{self, NudgeCheck};
use crate::mqtt::LinkEvent;
use crate::outbox::{self, Submitted};
use crate::session::{DataSession, SessionError};

use super::{
    Agent, AgentError, AgentEvent, Command, DataProbe, Exit, LongPoll, MqttLink, WorkError,
};

impl Agent {
    pub(super) async fn run(
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

    pub(super) async fn main_loop(
        &mut self,
        credentials: Credentials,
        commands: &mut mpsc::Receiver<Command>,
        shutdown: CancellationToken,
    ) -> Result<Exit, AgentError> {
        let mut lp = self.start_loop(credentials, &shutdown).await;
        loop {
            if lp.want_sync
                && lp.retry_at.is_none()
                && let Some(exit) = self.round(&mut lp).await?
            {
                return Ok(exit);
            }
            if std::mem::take(&mut self.relink) {
                self.relink(&mut lp, &shutdown);
                continue;
            }
            self.start_long_poll(&mut lp);
            let deadlines = self.deadlines(&lp);
            let wake = lp.next(deadlines, &shutdown, commands).await;
            match self.on_wake(wake, &mut lp).await? {
                Flow::Go => {}
                Flow::Stop => break,
                Flow::Exit(exit) => return Ok(exit),
            }
        }
        if let Some(session) = self.session.take() {
            session.close();
        }
        Ok(Exit::Stopped)
    }

    /// Starts the notification link and the LAN endpoint for a run with `credentials`.
    async fn start_loop(&mut self, credentials: Credentials, shutdown: &CancellationToken) -> Loop {
        let mqtt = self.start_mqtt(&credentials, shutdown);
        let check = Arc::new(NudgeCheck::new(
            credentials.device_id.clone(),
            &credentials.secret,
        ));
        self.nudges = Some(check.clone());
        let (nudge_tx, nudges) = mpsc::channel::<lan::Accepted>(16);
        let (refused_tx, refused) = mpsc::channel::<String>(16);
        let lan_stop = shutdown.child_token();
        let lan_guard = lan_stop.clone().drop_guard();
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
        Loop {
            want_sync: mqtt.is_none() || has_own_work,
            mqtt_grace: mqtt
                .as_ref()
                .map(|_| Instant::now() + self.config.mqtt_grace),
            mqtt,
            credentials,
            retry_at: None,
            long_poll: None,
            data_probe: None,
            next_poll: Instant::now() + jitter(self.poll_every()),
            readings: self.config.readings.as_ref().map(|r| r.events()),
            nudges,
            refused,
            _lan: lan_guard,
        }
    }

    /// A round of work; on a failure the next attempt is scheduled with backoff. `Some` when
    /// the run must end.
    async fn round(&mut self, lp: &mut Loop) -> Result<Option<Exit>, AgentError> {
        match self.work().await {
            Ok(()) => {
                lp.want_sync = false;
                self.backoff.reset();
                // The regular poll counts from the last sync.
                lp.next_poll = Instant::now() + jitter(self.poll_every());
            }
            Err(WorkError::State(e)) => return Err(e.into()),
            Err(WorkError::Session(e)) if e.code() == Some(ErrorCode::DeviceInvalidated) => {
                return Ok(Some(Exit::Invalidated(e.to_string())));
            }
            Err(WorkError::Session(e)) => {
                self.drop_session(e.to_string());
                let delay = self.backoff.next_delay();
                tracing::debug!(error = %e, ?delay, "cloud unreachable; retrying");
                lp.retry_at = Some(Instant::now() + delay);
            }
        }
        Ok(None)
    }

    /// New settings: both channels start again from the best of the new endpoints, and the
    /// settings are reported through them.
    fn relink(&mut self, lp: &mut Loop, shutdown: &CancellationToken) {
        if let Some(old) = lp.mqtt.take() {
            old.retire();
        }
        if self.mqtt_up {
            self.mqtt_up = false;
            self.mqtt_endpoint = None;
            self.emit(AgentEvent::MqttDown("new server settings".into()));
        }
        lp.mqtt = self.start_mqtt(&lp.credentials, shutdown);
        lp.long_poll = None;
        lp.data_probe = None;
        self.drop_session("new server settings".into());
        self.data_last_good = None;
        self.retry_better_at = None;
        lp.retry_at = None;
        lp.want_sync = true;
    }

    /// Long-polls only while MQTT is down and the data channel is up.
    fn start_long_poll(&self, lp: &mut Loop) {
        if lp.long_poll.is_some()
            || self.config.long_poll.is_zero()
            || self.mqtt_up
            || lp.retry_at.is_some()
            || self.state.owner_check.is_some()
        {
            return;
        }
        let Some(session) = self.session.clone() else {
            return;
        };
        let after = self.state.cursor;
        let wait_ms = u32::try_from(self.config.long_poll.as_millis()).unwrap_or(u32::MAX);
        lp.long_poll = Some(Box::pin(async move {
            session.sync(after, wait_ms, 1, None).await
        }));
    }

    /// The agent's own deadlines for this turn of the loop.
    fn deadlines(&self, lp: &Loop) -> Deadlines {
        let quiet = self.mqtt_up || self.config.long_poll.is_zero();
        Deadlines {
            report: self.next_periodic_report(),
            poll_at: self.poll_at,
            idle_close: (quiet && self.session.is_some())
                .then(|| self.last_activity + self.config.data_idle_close),
            probe: self
                .retry_better_at
                .filter(|_| self.session.is_some() && lp.data_probe.is_none()),
        }
    }

    /// Acts on what woke the loop.
    async fn on_wake(&mut self, wake: Wake, lp: &mut Loop) -> Result<Flow, AgentError> {
        match wake {
            Wake::Stop => return Ok(Flow::Stop),
            Wake::Command(command) => return self.on_command(command, lp).await,
            Wake::Link(event) => self.on_link(event, lp).await?,
            Wake::LongPoll(result) => match result {
                Ok((entries, _)) => {
                    self.last_activity = Instant::now();
                    if !entries.is_empty() {
                        lp.want_sync = true;
                    }
                }
                Err(e) => {
                    self.drop_session(e.to_string());
                    lp.want_sync = true;
                }
            },
            Wake::Retry => lp.want_sync = true,
            Wake::Nudge(accepted) => self.nudged(accepted),
            Wake::NudgeRefused(reason) => self.emit(AgentEvent::NudgeRefused { reason }),
            Wake::Readings(true) => {
                // Something worth reporting at once happened on the device.
                let now = self.read_readings();
                if !self.queue_telemetry(&now, |_| true)?.is_empty() {
                    lp.want_sync = true;
                }
            }
            Wake::Readings(false) => lp.readings = None,
            Wake::ReportDue => {
                let now = self.read_readings();
                let due = self.reports_due();
                if !self
                    .queue_telemetry(&now, |id| due.iter().any(|d| d == id))?
                    .is_empty()
                {
                    lp.want_sync = true;
                }
            }
            Wake::PollAt => {
                self.poll_at = None;
                lp.want_sync = true;
            }
            Wake::PollTimer => {
                lp.want_sync = true;
                lp.next_poll = Instant::now() + jitter(self.poll_every());
            }
            // MQTT did not come up in time: work over the data channel (long-poll).
            Wake::MqttGrace => lp.want_sync = true,
            Wake::IdleClose => self.drop_session("idle while MQTT is up".into()),
            Wake::ProbeDue => {
                self.retry_better_at = None;
                lp.data_probe = self.probe_better_data();
            }
            Wake::Probed(found) => self.on_probed(found, lp),
        }
        Ok(Flow::Go)
    }

    /// An event of the notification link.
    async fn on_link(&mut self, event: LinkEvent, lp: &mut Loop) -> Result<(), AgentError> {
        match event {
            LinkEvent::Up { endpoint } => {
                self.mqtt_up = true;
                lp.mqtt_grace = None;
                lp.long_poll = None;
                if let Some(s) = self.state.settings.as_mut()
                    && s.endpoints.mqtt.contains(&endpoint)
                {
                    // One of the new brokers answered; saved with the next change.
                    s.previous.mqtt.clear();
                }
                self.mqtt_endpoint = Some(endpoint.clone());
                self.emit(AgentEvent::MqttUp { endpoint });
                // With the data channel open anyway, the cloud learns the broker in use now;
                // otherwise with the next round.
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
            LinkEvent::Down(reason) => {
                self.mqtt_up = false;
                self.mqtt_endpoint = None;
                self.emit(AgentEvent::MqttDown(reason));
                lp.want_sync = true;
            }
            LinkEvent::Refused(reason) => {
                self.mqtt_up = false;
                self.mqtt_endpoint = None;
                self.emit(AgentEvent::MqttRefused(reason));
                // The data channel learns why (disabled, invalidated) and acts on it.
                lp.want_sync = true;
            }
            LinkEvent::Hint(hint) => {
                if hint.seq > self.state.cursor && self.state.hinted < Some(hint.seq) {
                    // Noted on disk before acting: a reboot before the fetch still fetches.
                    self.state.hinted = Some(hint.seq);
                    self.save()?;
                }
                self.emit(AgentEvent::HintReceived {
                    kind: hint.kind,
                    seq: hint.seq,
                });
                if hint.seq > self.state.cursor || hint.kind == HintKind::PollNow {
                    lp.want_sync = true;
                    lp.retry_at = None;
                }
            }
        }
        Ok(())
    }

    /// The background probe of better data endpoints ended.
    fn on_probed(&mut self, found: Option<(DataSession, Welcome, String)>, lp: &mut Loop) {
        let Some((session, welcome, endpoint)) = found else {
            self.retry_better_at = Some(Instant::now() + jitter(self.config.probe_interval));
            return;
        };
        // A better endpoint answers again: move over. The long-poll on the old connection goes
        // with it.
        lp.long_poll = None;
        self.drop_session(format!("moving to {endpoint}"));
        let rank = self
            .endpoints()
            .data
            .iter()
            .position(|e| *e == endpoint)
            .unwrap_or(0);
        self.data_connected(&endpoint, rank);
        self.on_welcome(&welcome);
        self.session = Some(session);
        self.last_activity = Instant::now();
        self.emit_data_up();
        tracing::info!(%endpoint, "data channel back on a better endpoint");
        // The cloud learns which endpoint the device uses now.
        lp.want_sync = true;
    }

    /// Queues a request in the outbox, durably.
    pub(super) fn submit(&mut self, body: DeviceRequest) -> Result<Submitted, AgentError> {
        let limit = self.config.outbox_limit;
        let submitted = outbox::admit(&mut self.state, body, UnixMillis::now(), limit)?;
        if let Submitted::Queued(_) = submitted {
            self.save()?;
        }
        Ok(submitted)
    }

    /// A nudge was accepted: poll after its delay (the earliest asked for wins).
    pub(super) fn nudged(&mut self, accepted: lan::Accepted) {
        let at = Instant::now() + accepted.delay;
        self.poll_at = Some(self.poll_at.map_or(at, |p| p.min(at)));
        self.emit(AgentEvent::NudgeAccepted {
            nudge_id: accepted.nudge_id,
            delay_ms: u64::try_from(accepted.delay.as_millis()).unwrap_or(u64::MAX),
        });
    }
}

/// What the run loop waits on besides the agent's own state: the notification link, the
/// timers, the work under way in the background and the LAN endpoint's news.
pub(super) struct Loop {
    credentials: Credentials,
    mqtt: Option<MqttLink>,
    /// A round of work is wanted.
    pub(super) want_sync: bool,
    /// Until then MQTT may come up; after it the device works over the data channel.
    mqtt_grace: Option<Instant>,
    /// The cloud could not be reached: the next attempt.
    retry_at: Option<Instant>,
    long_poll: Option<LongPoll>,
    data_probe: Option<DataProbe>,
    /// The regular poll.
    next_poll: Instant,
    readings: Option<watch::Receiver<u64>>,
    nudges: mpsc::Receiver<lan::Accepted>,
    refused: mpsc::Receiver<String>,
    /// Stops the LAN endpoint when the run ends.
    _lan: tokio_util::sync::DropGuard,
}

/// The agent's deadlines (its state, not the loop's) for one turn of the loop.
struct Deadlines {
    /// The next periodic report of a support service.
    report: Option<Instant>,
    /// A poll an accepted nudge asked for.
    poll_at: Option<Instant>,
    /// Closing the data channel, idle while MQTT carries the notifications.
    idle_close: Option<Instant>,
    /// Trying the better data endpoints again.
    probe: Option<Instant>,
}

/// Why the run loop woke up.
enum Wake {
    Stop,
    Command(Command),
    Link(LinkEvent),
    LongPoll(Result<(Vec<FeedEntry>, FeedSeq), SessionError>),
    Retry,
    Nudge(lan::Accepted),
    NudgeRefused(String),
    /// Readings changed (`false`: their source is gone).
    Readings(bool),
    ReportDue,
    PollAt,
    PollTimer,
    MqttGrace,
    IdleClose,
    ProbeDue,
    Probed(Option<(DataSession, Welcome, String)>),
}

/// What the loop does next.
pub(super) enum Flow {
    Go,
    Stop,
    Exit(Exit),
}

/// Waits until `at`, or for ever without one.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Loop {
    /// Waits for the next thing to act on.
    async fn next(
        &mut self,
        due: Deadlines,
        shutdown: &CancellationToken,
        commands: &mut mpsc::Receiver<Command>,
    ) -> Wake {
        let Loop {
            mqtt,
            long_poll,
            data_probe,
            readings,
            retry_at,
            mqtt_grace,
            next_poll,
            nudges,
            refused,
            ..
        } = self;
        let link = async {
            match mqtt.as_mut() {
                Some(link) => link.events.recv().await,
                None => std::future::pending().await,
            }
        };
        let polled = async {
            match long_poll.as_mut() {
                Some(poll) => poll.await,
                None => std::future::pending().await,
            }
        };
        let probed = async {
            match data_probe.as_mut() {
                Some(probe) => probe.join().await,
                None => std::future::pending().await,
            }
        };
        let changed = async {
            match readings.as_mut() {
                Some(events) => events.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        let wake = tokio::select! {
            _ = shutdown.cancelled() => Wake::Stop,
            command = commands.recv() => command.map_or(Wake::Stop, Wake::Command),
            Some(event) = link => Wake::Link(event),
            result = polled => Wake::LongPoll(result),
            _ = until(*retry_at) => Wake::Retry,
            Some(accepted) = nudges.recv() => Wake::Nudge(accepted),
            Some(reason) = refused.recv() => Wake::NudgeRefused(reason),
            alive = changed => Wake::Readings(alive),
            _ = until(due.report) => Wake::ReportDue,
            _ = until(due.poll_at) => Wake::PollAt,
            _ = tokio::time::sleep_until(*next_poll) => Wake::PollTimer,
            _ = until(*mqtt_grace) => Wake::MqttGrace,
            _ = until(due.idle_close) => Wake::IdleClose,
            _ = until(due.probe) => Wake::ProbeDue,
            found = probed => Wake::Probed(found.flatten()),
        };
        // What fired is spent.
        match &wake {
            Wake::LongPoll(_) => *long_poll = None,
            Wake::Probed(_) => *data_probe = None,
            Wake::Retry => *retry_at = None,
            Wake::MqttGrace => *mqtt_grace = None,
            _ => {}
        }
        wake
    }
}
