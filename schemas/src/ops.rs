//! Fleet events for operations, published as JSON on `fleet/events/...` so that anyone can
//! follow them with `mosquitto_sub -t 'fleet/events/#'`.

use serde::{Deserialize, Serialize};

use crate::data::DeviceStatus;
use crate::job::JobState;
use crate::outbox::RequestNo;
use crate::{ApplicationId, DeviceId, JobId, UnixMillis, topics};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    },
}

impl OpsEvent {
    pub fn topic(&self) -> String {
        match self {
            OpsEvent::DeviceRegistered { device_id, .. } => {
                topics::ops_device(device_id, "registered")
            }
            OpsEvent::DeviceOnline { device_id, .. } => topics::ops_device(device_id, "online"),
            OpsEvent::DeviceOffline { device_id, .. } => topics::ops_device(device_id, "offline"),
            OpsEvent::DeviceStatus { device_id, .. } => topics::ops_device(device_id, "status"),
            OpsEvent::DeviceDisabled { device_id, .. } => topics::ops_device(device_id, "disabled"),
            OpsEvent::DeviceConsent { device_id, .. } => topics::ops_device(device_id, "consent"),
            OpsEvent::OwnerCheckStarted { device_id, .. } => {
                topics::ops_device(device_id, "owner_check")
            }
            OpsEvent::OwnerConfirmed { device_id, .. } => {
                topics::ops_device(device_id, "owner_confirmed")
            }
            OpsEvent::DeviceInvalidated { device_id, .. } => {
                topics::ops_device(device_id, "invalidated")
            }
            OpsEvent::DeviceRequest { device_id, .. } => topics::ops_device(device_id, "request"),
            OpsEvent::DeviceSettings { device_id, .. } => topics::ops_device(device_id, "settings"),
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
            OpsEvent::JobMoved { to, .. } => topics::ops_job(to, "moved"),
            OpsEvent::JobTransition { device_id, to, .. } => {
                topics::ops_job(device_id, to.as_str())
            }
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serializing these plain structs to JSON cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}
