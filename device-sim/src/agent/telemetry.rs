//! Support services: contracts, the readings they asked for, and page counters.

use std::collections::BTreeMap;
use std::time::Duration;

use schemas::UnixMillis;
use schemas::agent::ActiveService;
use schemas::outbox::DeviceRequest;
use tokio::time::Instant;

use crate::counters;
use crate::outbox::{self, Submitted};
use crate::session::{DataSession, SessionError};

use super::{Agent, AgentError, AgentEvent, WorkError};

impl Agent {
    /// Fetches the contracts and activates or deactivates support services to match: active are
    /// exactly those enabled in the device's table, with a contract (non-empty application id),
    /// supporting the device's model.
    pub(super) async fn sync_contracts(&mut self, session: &DataSession) -> Result<(), WorkError> {
        let contracts = session.contracts().await?;
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
                    let activation = session
                        .activate_service(service_id.clone(), application_id.clone())
                        .await;
                    match activation {
                        Ok(control) => Some(ActiveService {
                            application_id,
                            data_types: control.data_types,
                            report_every_secs: control.report_every_secs,
                        }),
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
    pub(super) fn queue_telemetry(
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
    pub(super) async fn queue_counters(&mut self) -> Result<Submitted, AgentError> {
        let Some(source) = self.config.counters.clone() else {
            return Ok(Submitted::Withheld);
        };
        let counters = counters::read_whole(source.as_ref()).await;
        self.submit(DeviceRequest::Counters { counters })
    }

    /// When the next periodic report of an active support service is due.
    pub(super) fn next_periodic_report(&self) -> Option<Instant> {
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

    /// The readings now (none without a source of readings).
    pub(super) fn read_readings(&self) -> BTreeMap<String, String> {
        self.config
            .readings
            .as_ref()
            .map(|r| r.read())
            .unwrap_or_default()
    }

    /// The active support services whose periodic report is due.
    pub(super) fn reports_due(&self) -> Vec<String> {
        let due = |s: &str, every: u32| {
            self.telemetry_sent
                .get(s)
                .is_none_or(|at| at.elapsed() >= Duration::from_secs(u64::from(every)))
        };
        self.state
            .support
            .iter()
            .filter_map(|(id, s)| {
                s.active
                    .as_ref()
                    .filter(|a| a.report_every_secs > 0 && due(id, a.report_every_secs))
                    .map(|_| id.clone())
            })
            .collect()
    }
}
