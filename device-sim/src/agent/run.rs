//! The agent's task: registration, then the run loop that decides when to talk to the cloud.

use std::sync::Arc;
use std::time::Duration;

use schemas::UnixMillis;
use schemas::agent::{Credentials, PendingOwnerCheck, SupportService};
use schemas::data::{ErrorCode, Request, Response};
use schemas::hint::HintKind;
use schemas::outbox::DeviceRequest;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::{Backoff, jitter};
use crate::lan::{self, NudgeCheck};
use crate::mqtt::LinkEvent;
use crate::outbox::{self, Submitted};
use crate::session::SessionError;

use super::{Agent, AgentError, AgentEvent, Command, DataProbe, Exit, LongPoll, WorkError};

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
