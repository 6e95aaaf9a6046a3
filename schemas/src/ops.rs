//! Fleet events for operations, published as JSON on `fleet/events/...` so that anyone can
//! follow them with `mosquitto_sub -t 'fleet/events/#'`.

use serde::{Deserialize, Serialize};

use crate::data::DeviceStatus;
use crate::job::JobState;
use crate::outbox::RequestNo;
use crate::{ApplicationId, DeviceId, JobId, UnixMillis, topics};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Mqtt,
    Data,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum OpsEvent {
    DeviceRegistered {
        device_id: DeviceId,
        serial: String,
        model: String,
        at: UnixMillis,
    },
    DeviceOnline {
        device_id: DeviceId,
        channel: Channel,
        at: UnixMillis,
    },
    DeviceOffline {
        device_id: DeviceId,
        channel: Channel,
        at: UnixMillis,
    },
    DeviceStatus {
        device_id: DeviceId,
        status: DeviceStatus,
        at: UnixMillis,
    },
    DeviceDisabled {
        device_id: DeviceId,
        at: UnixMillis,
    },
    /// The owner of a device must confirm (reset, relocation) by `deadline`.
    OwnerCheckStarted {
        device_id: DeviceId,
        reason: String,
        deadline: UnixMillis,
        at: UnixMillis,
    },
    OwnerConfirmed {
        device_id: DeviceId,
        at: UnixMillis,
    },
    /// The device id is no longer valid; its jobs were rejected.
    DeviceInvalidated {
        device_id: DeviceId,
        reason: String,
        at: UnixMillis,
    },
    /// A device's consent to send device information changed (or was reported again).
    DeviceConsent {
        device_id: DeviceId,
        granted: bool,
        changed_at: UnixMillis,
        at: UnixMillis,
    },
    /// A device asked for a job at its panel; services that handle `action` pick it up from
    /// `GET /v1/devices/{id}/requests`.
    DeviceRequest {
        device_id: DeviceId,
        no: RequestNo,
        action: String,
        at: UnixMillis,
    },
    /// A device reported the settings it uses (after a change, or another endpoint in use).
    DeviceSettings {
        device_id: DeviceId,
        revision: u64,
        data_in_use: Option<String>,
        mqtt_in_use: Option<String>,
        at: UnixMillis,
    },
    /// A device registered for a service with its code (for the service provider and the
    /// customer's administrator).
    ServiceRegistered {
        application_id: ApplicationId,
        service_id: String,
        device_id: DeviceId,
        at: UnixMillis,
    },
    /// No device of the application is pending any more.
    ApplicationSettled {
        application_id: ApplicationId,
        service_id: String,
        customer: String,
        registered: u32,
        failed: u32,
        at: UnixMillis,
    },
    /// A device activated a support service: the provider learns it and what it will receive.
    ServiceActivated {
        device_id: DeviceId,
        service_id: String,
        application_id: String,
        data_types: Vec<String>,
        at: UnixMillis,
    },
    /// Device information for a support service's provider.
    Telemetry {
        device_id: DeviceId,
        service_id: String,
        readings: std::collections::BTreeMap<String, String>,
        at: UnixMillis,
    },
    /// A queued job was moved to another device's printer queue.
    JobMoved {
        job_id: JobId,
        from: DeviceId,
        to: DeviceId,
        by: String,
        at: UnixMillis,
    },
    JobTransition {
        device_id: DeviceId,
        job_id: JobId,
        from: Option<JobState>,
        to: JobState,
        attempt: u32,
        reason: Option<String>,
        at: UnixMillis,
        /// When the job was submitted (`at` − `submitted_at` of a terminal transition is its
        /// submission→completion time). Absent from bridges before it: 0.
        #[serde(default)]
        submitted_at: UnixMillis,
    },
}

impl OpsEvent {
    pub fn topic(&self) -> String {
        match self {
            OpsEvent::DeviceRegistered { .. } => topics::ops_device("registered"),
            OpsEvent::DeviceOnline { .. } => topics::ops_device("online"),
            OpsEvent::DeviceOffline { .. } => topics::ops_device("offline"),
            OpsEvent::DeviceStatus { .. } => topics::ops_device("status"),
            OpsEvent::DeviceDisabled { .. } => topics::ops_device("disabled"),
            OpsEvent::DeviceConsent { .. } => topics::ops_device("consent"),
            OpsEvent::OwnerCheckStarted { .. } => topics::ops_device("owner_check"),
            OpsEvent::OwnerConfirmed { .. } => topics::ops_device("owner_confirmed"),
            OpsEvent::DeviceInvalidated { .. } => topics::ops_device("invalidated"),
            OpsEvent::DeviceRequest { .. } => topics::ops_device("request"),
            OpsEvent::DeviceSettings { .. } => topics::ops_device("settings"),
            OpsEvent::ServiceRegistered { application_id, .. } => {
                topics::ops_application(application_id, "registered")
            }
            OpsEvent::ApplicationSettled { application_id, .. } => {
                topics::ops_application(application_id, "settled")
            }
            OpsEvent::ServiceActivated { service_id, .. } => {
                topics::ops_service(service_id, "activated")
            }
            OpsEvent::Telemetry { service_id, .. } => topics::ops_service(service_id, "telemetry"),
            OpsEvent::JobMoved { .. } => topics::ops_job("moved"),
            OpsEvent::JobTransition { to, .. } => topics::ops_job(to.as_str()),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serializing these plain structs to JSON cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transition(device: u8, job: u8, to: JobState) -> OpsEvent {
        OpsEvent::JobTransition {
            device_id: DeviceId::from_random([device; 8]),
            job_id: JobId::from_random([job; 8]),
            from: None,
            to,
            attempt: 1,
            reason: None,
            at: UnixMillis(0),
            submitted_at: UnixMillis(0),
        }
    }

    #[test]
    fn event_topics_name_the_kind_and_payloads_name_the_device() {
        let (a, b) = (
            transition(1, 1, JobState::Succeeded),
            transition(2, 2, JobState::Succeeded),
        );
        assert_eq!(a.topic(), "fleet/events/jobs/succeeded");
        assert_eq!(a.topic(), b.topic(), "one topic per kind, not per device");
        assert_ne!(a.topic(), transition(1, 1, JobState::Queued).topic());
        let online = |n: u8| OpsEvent::DeviceOnline {
            device_id: DeviceId::from_random([n; 8]),
            channel: Channel::Mqtt,
            at: UnixMillis(0),
        };
        assert_eq!(online(1).topic(), online(2).topic());
        assert!(online(1).topic().starts_with(topics::OPS_PREFIX));
        let json: serde_json::Value = serde_json::from_slice(&b.to_json()).unwrap();
        assert_eq!(json["device_id"], DeviceId::from_random([2; 8]).as_str());
        assert_eq!(json["event"], "job_transition");
    }
}
