//! Server settings from the feed: applied, used from the next round on, and reported back.

use schemas::agent::AppliedSettings;
use schemas::settings::{DeviceSettings, Endpoints, SettingsReport};

use crate::session::DataSession;

use super::{Agent, AgentEvent, WorkError};

impl Agent {
    /// Applies settings from the feed: kept on disk, used from the end of this round on.
    pub(super) fn apply_settings(&mut self, revision: u64, settings: &DeviceSettings) {
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

    pub(super) fn in_use(&self) -> SettingsReport {
        SettingsReport {
            revision: self.state.settings.as_ref().map_or(0, |s| s.revision),
            endpoints: self.endpoints(),
            data_in_use: self.data_endpoint.clone(),
            mqtt_in_use: self.mqtt_endpoint.clone(),
            lan_endpoint: self.lan_endpoint.clone(),
        }
    }

    /// Tells the cloud the settings in use, when they differ from what it was last told.
    pub(super) async fn report_settings(&mut self, session: &DataSession) -> Result<(), WorkError> {
        let report = self.in_use();
        if self.last_report.as_ref() == Some(&report) {
            return Ok(());
        }
        let revision = report.revision;
        session.report_settings(report.clone()).await?;
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
}
