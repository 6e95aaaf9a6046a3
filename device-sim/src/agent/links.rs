//! The two links to the cloud: the MQTT notification link and the data channel, each over the
//! best endpoint that answers, and registration over the data channel.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use pacing::jitter;
use schemas::UnixMillis;
use schemas::agent::Credentials;
use schemas::data::{ErrorBody, ErrorCode, HelloAuth, Registration, Welcome};
use schemas::settings::Endpoints;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::mqtt::{self, MqttSettings};
use crate::session::{DataSession, SessionError};

use super::{AbortOnDrop, Agent, AgentError, AgentEvent, DataProbe, MqttLink};

impl Agent {
    /// Starts the notification link on the current brokers; `None` without any.
    pub(super) fn start_mqtt(
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
            reconnect_spread: self.config.mqtt_reconnect_spread,
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

    pub(super) fn drop_session(&mut self, reason: String) {
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
    pub(super) async fn register(
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
            // Stored before the first try: a try whose welcome is lost is repeated as the
            // same registration, not a second device.
            let registration_id = match &self.state.registration_id {
                Some(id) => id.clone(),
                None => {
                    let id = format!("{:032x}", rand::random::<u128>());
                    self.state.registration_id = Some(id.clone());
                    self.save()?;
                    id
                }
            };
            let auth = HelloAuth::Register(Registration {
                registration_id: Some(registration_id),
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
                    tracing::debug!(device = %welcome.device_id, "registered");
                    // Known before any event says the device exists.
                    *self.device_id.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(welcome.device_id.clone());
                    self.emit(AgentEvent::Registered(welcome.device_id));
                    self.emit_data_up();
                    return Ok(Some(credentials));
                }
                Err(SessionError::Refused(body)) if body.code == ErrorCode::Conflict => {
                    // A finished registration under this id (the credentials were lost
                    // since) or an id collision: register anew under another id.
                    tracing::warn!(reason = %body.message, "registering under a new id");
                    self.state.registration_id = None;
                    self.save()?;
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

    pub(super) async fn session(&mut self) -> Result<DataSession, SessionError> {
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
    pub(super) fn on_welcome(&mut self, welcome: &Welcome) {
        self.skew_ms = welcome.server_time.0 as i64 - UnixMillis::now().0 as i64;
        self.skew.store(self.skew_ms, Ordering::Relaxed);
        if welcome.poll_interval_secs.is_some() {
            self.state.poll_interval_secs = welcome.poll_interval_secs;
        }
    }

    /// The regular poll: the configured one, else the cloud's, else a day.
    pub(super) fn poll_every(&self) -> Duration {
        self.config.poll_interval.unwrap_or_else(|| {
            Duration::from_secs(u64::from(
                self.state.poll_interval_secs.unwrap_or(24 * 3600),
            ))
        })
    }

    pub(super) fn emit_data_up(&self) {
        if let Some(endpoint) = self.data_endpoint.clone() {
            self.emit(AgentEvent::DataUp { endpoint });
        }
    }

    /// The endpoints the agent works from, best first: the applied settings (followed by the
    /// ones used before them, until one of the new ones answers), or the factory ones.
    pub(super) fn endpoints(&self) -> Endpoints {
        match &self.state.settings {
            Some(s) => s.effective(),
            None => self.config.endpoints.clone(),
        }
    }

    /// How TLS servers are verified, built the first time an endpoint asks for TLS (so that a
    /// device without TLS endpoints never reads certificates). A failure is logged once and
    /// leaves TLS endpoints unusable; they are never tried in plain text.
    pub(super) fn tls_client(&mut self) -> Option<Arc<tls::rustls::ClientConfig>> {
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
    pub(super) async fn connect_data(
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
    pub(super) fn data_connected(&mut self, endpoint: &str, rank: usize) {
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
    pub(super) fn probe_better_data(&self) -> Option<DataProbe> {
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
}
