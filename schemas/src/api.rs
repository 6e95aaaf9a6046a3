//! JSON bodies of the admin HTTP API (`/v1/...`). Errors are [`ApiError`] with a stable code.

use serde::{Deserialize, Serialize};

use crate::data::{DeviceStatus, ErrorCode};
use crate::job::{JobState, Transition};
use crate::outbox::RequestNo;
use crate::records::{
    CompanionRecord, ConsentRecord, DeviceRecord, Invalidation, JobRecord, OwnerCheckState,
};
use crate::settings::{Endpoints, ReportedSettings, SettingsRecord};
use crate::{CompanionId, DeviceId, FeedSeq, JobId, OwnerId, Secret, UnixMillis};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateEnrollmentToken {
    pub customer: String,
    /// How many devices may register with this token (default 1).
    #[serde(default)]
    pub max_uses: Option<u32>,
    /// Lifetime in seconds (default one day).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollmentTokenCreated {
    /// Shown once; only its hash is stored.
    pub token: Secret,
    pub customer: String,
    pub expires_at: UnixMillis,
    pub max_uses: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    pub device_id: DeviceId,
    pub serial: String,
    pub model: String,
    pub destination: String,
    pub time_zone: String,
    pub customer: String,
    pub registered_at: UnixMillis,
    pub disabled: bool,
    pub feed_newest: FeedSeq,
    pub feed_acked: FeedSeq,
    pub last_status: Option<DeviceStatus>,
    pub last_status_at: Option<UnixMillis>,
    /// Highest outbox request number accepted from the device.
    pub requests_delivered: RequestNo,
    pub consent: Option<ConsentRecord>,
    pub consent_changes: Vec<ConsentRecord>,
    pub owner_id: Option<OwnerId>,
    /// `None` until the device confirmed it stored its credentials.
    pub registration_completed_at: Option<UnixMillis>,
    pub owner_check: Option<OwnerCheckState>,
    pub invalidated: Option<Invalidation>,
}

impl From<&DeviceRecord> for DeviceView {
    fn from(d: &DeviceRecord) -> DeviceView {
        DeviceView {
            device_id: d.device_id.clone(),
            serial: d.serial.clone(),
            model: d.model.clone(),
            destination: d.destination.clone(),
            time_zone: d.time_zone.clone(),
            customer: d.customer.clone(),
            registered_at: d.registered_at,
            disabled: d.disabled,
            feed_newest: d.newest,
            feed_acked: d.acked,
            last_status: d.last_status.clone(),
            last_status_at: d.last_status_at,
            requests_delivered: d.delivered,
            consent: d.consent,
            consent_changes: d.consent_changes.clone(),
            owner_id: d.owner.as_ref().map(|o| o.owner_id.clone()),
            registration_completed_at: d.registration_completed_at,
            owner_check: d.owner_check.clone(),
            invalidated: d.invalidated.clone(),
        }
    }
}

/// `PUT /v1/devices/{id}/settings`: replaces the device's server settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutSettings {
    pub endpoints: Endpoints,
}

/// A device's server settings: as set from outside, and as the device reports using them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SettingsView {
    pub device_id: DeviceId,
    /// `None`: never set from outside; the device runs on its factory settings.
    pub desired: Option<SettingsRecord>,
    pub reported: Option<ReportedSettings>,
    /// The device has reported the newest revision (or nothing was ever set).
    pub applied: bool,
}

impl From<&DeviceRecord> for SettingsView {
    fn from(d: &DeviceRecord) -> SettingsView {
        let wanted = d.settings.as_ref().map_or(0, |s| s.revision);
        let got = d
            .settings_reported
            .as_ref()
            .map_or(0, |r| r.report.revision);
        SettingsView {
            device_id: d.device_id.clone(),
            desired: d.settings.clone(),
            reported: d.settings_reported.clone(),
            applied: got >= wanted,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitJob {
    /// The payload as UTF-8 text. Exactly one of `payload` and `payload_base64` is required.
    #[serde(default)]
    pub payload: Option<String>,
    /// The payload as standard base64, for binary documents.
    #[serde(default)]
    pub payload_base64: Option<String>,
    /// Default `application/octet-stream`.
    #[serde(default)]
    pub content_type: Option<String>,
    /// How long the job may wait to be started, in seconds (default one day).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Attempts before a job whose lease keeps running out fails (default 3).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// A second submission with the same key for the same device returns the first job.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    pub job_id: JobId,
    pub device_id: DeviceId,
    pub state: JobState,
    pub attempt: u32,
    pub max_attempts: u32,
    pub created_at: UnixMillis,
    pub expires_at: UnixMillis,
    pub lease_until: Option<UnixMillis>,
    pub idempotency_key: Option<String>,
    pub content_type: String,
    pub payload_len: u64,
    pub outcome: Option<String>,
    pub history: Vec<Transition>,
    pub submitted_by: Option<String>,
}

impl From<&JobRecord> for JobView {
    fn from(j: &JobRecord) -> JobView {
        JobView {
            job_id: j.job_id.clone(),
            device_id: j.device_id.clone(),
            state: j.state,
            attempt: j.attempt,
            max_attempts: j.max_attempts,
            created_at: j.created_at,
            expires_at: j.expires_at,
            lease_until: j.lease_until,
            idempotency_key: j.idempotency_key.clone(),
            content_type: j.content_type.clone(),
            payload_len: j.payload_len,
            outcome: j.outcome.clone(),
            history: j.history.clone(),
            submitted_by: j.submitted_by.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOwner {
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OwnerCreated {
    pub owner_id: OwnerId,
    pub name: String,
    /// The owner's API token. Shown once; only its hash is stored.
    pub token: Secret,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCompanion {
    /// "Anna's phone".
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompanionCreated {
    pub companion_id: CompanionId,
    pub owner_id: OwnerId,
    pub name: String,
    /// The companion's API token. Shown once; only its hash is stored.
    pub token: Secret,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompanionView {
    pub companion_id: CompanionId,
    pub owner_id: OwnerId,
    pub name: String,
    pub created_at: UnixMillis,
    pub devices: Vec<DeviceId>,
}

impl From<&CompanionRecord> for CompanionView {
    fn from(c: &CompanionRecord) -> CompanionView {
        CompanionView {
            companion_id: c.companion_id.clone(),
            owner_id: c.owner_id.clone(),
            name: c.name.clone(),
            created_at: c.created_at,
            devices: c.devices.clone(),
        }
    }
}

/// Query of `GET /v1/devices/{id}/requests`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestsQuery {
    /// Only requests numbered above this (default 0: from the first).
    #[serde(default)]
    pub after: Option<u64>,
    /// At most this many (default 100, at most 1000).
    #[serde(default)]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelJob {
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub broker: String,
    pub devices: u64,
    pub jobs: u64,
}
