//! What the cloud bridge keeps on disk. Stored as MessagePack with named fields, so a newer
//! version can add fields (with `#[serde(default)]`) and still read older records.

use serde::{Deserialize, Serialize};

use crate::data::DeviceStatus;
use crate::job::{JobState, Transition};
use crate::outbox::{DeviceRequest, RequestNo};
use crate::print::{Capabilities, PageCounters, PrintSettings};
use crate::services::ServiceUse;
use crate::settings::{ReportedSettings, SettingsRecord};
use crate::{CompanionId, DeviceId, FeedSeq, JobId, OpsId, OwnerId, UnixMillis};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeviceRecord {
    pub device_id: DeviceId,
    pub serial: String,
    pub model: String,
    pub destination: String,
    pub time_zone: String,
    pub customer: String,
    /// SHA-256 of the device secret, hex. The secret itself is never stored.
    pub secret_sha256: String,
    pub registered_at: UnixMillis,
    pub disabled: bool,
    /// Newest sequence number of the device's feed.
    pub newest: FeedSeq,
    /// Everything up to here has been acknowledged by the device.
    pub acked: FeedSeq,
    pub last_status: Option<DeviceStatus>,
    pub last_status_at: Option<UnixMillis>,
    /// Highest outbox request number accepted from the device; anything at or below it is a
    /// duplicate.
    #[serde(default)]
    pub delivered: RequestNo,
    /// The device's last reported consent; `None` until it reports one.
    #[serde(default)]
    pub consent: Option<ConsentRecord>,
    /// Every reported change of consent, oldest first (the newest [`CONSENT_HISTORY`]).
    #[serde(default)]
    pub consent_changes: Vec<ConsentRecord>,
    /// The owner bound at registration.
    #[serde(default)]
    pub owner: Option<OwnerBinding>,
    /// When the device confirmed it stored its credentials; until then companions may not
    /// send it jobs.
    #[serde(default)]
    pub registration_completed_at: Option<UnixMillis>,
    /// The owner must confirm (after a reset or relocation) by the deadline.
    #[serde(default)]
    pub owner_check: Option<OwnerCheckState>,
    /// Set when the device id was invalidated; the device must register again.
    #[serde(default)]
    pub invalidated: Option<Invalidation>,
    /// Server settings set from outside (the newest revision).
    #[serde(default)]
    pub settings: Option<SettingsRecord>,
    /// What the device last reported it uses.
    #[serde(default)]
    pub settings_reported: Option<ReportedSettings>,
    /// Services the device is permitted to use (registered with a valid code).
    #[serde(default)]
    pub services: Vec<ServiceUse>,
    /// The device's printer queue, once it registered one.
    #[serde(default)]
    pub printer: Option<PrinterQueue>,
    /// The newest page counters accepted (never lower than any before).
    #[serde(default)]
    pub counters: Option<CountersRecord>,
    /// SHA-256 of (enrollment token, serial, registration id) when the device registered
    /// with a registration id: a repeat of that registration finds this device.
    #[serde(default)]
    pub registration_sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CountersRecord {
    pub counters: PageCounters,
    /// When the device read them (its clock).
    pub read_at: UnixMillis,
    pub received_at: UnixMillis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PrinterQueue {
    pub capabilities: Capabilities,
    pub registered_at: UnixMillis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OwnerCheckState {
    pub reason: String,
    pub started_at: UnixMillis,
    pub deadline: UnixMillis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Invalidation {
    pub reason: String,
    pub at: UnixMillis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OwnerBinding {
    pub owner_id: OwnerId,
    /// SHA-256 of `{device_id}:{pin}`, hex.
    pub pin_sha256: String,
}

/// `o/{owner_id}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OwnerRecord {
    pub owner_id: OwnerId,
    pub name: String,
    /// SHA-256 of the owner's API token, hex.
    pub token_sha256: String,
    pub created_at: UnixMillis,
}

/// `q/{ops_id}`: an operations login to the embedded broker. It may subscribe under
/// `fleet/events/` and nothing else; revoked, it is refused and its sessions are closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OpsLoginRecord {
    pub ops_id: OpsId,
    pub name: String,
    /// SHA-256 of the password, hex.
    pub password_sha256: String,
    pub created_at: UnixMillis,
    #[serde(default)]
    pub revoked_at: Option<UnixMillis>,
}

/// `c/{companion_id}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CompanionRecord {
    pub companion_id: CompanionId,
    pub owner_id: OwnerId,
    pub name: String,
    /// SHA-256 of the companion's API token, hex.
    pub token_sha256: String,
    pub created_at: UnixMillis,
    /// Devices it may submit jobs to.
    pub devices: Vec<DeviceId>,
}

/// How many consent changes a device record keeps.
pub const CONSENT_HISTORY: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ConsentRecord {
    pub granted: bool,
    /// When the user changed it, on the device's clock.
    pub changed_at: UnixMillis,
    /// When the cloud learned of it.
    pub recorded_at: UnixMillis,
}

/// A request from a device's outbox that the cloud accepted, kept at
/// `r/{device_id}/{no as 16 hex digits}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeviceRequestRecord {
    pub device_id: DeviceId,
    pub no: RequestNo,
    pub made_at: UnixMillis,
    pub received_at: UnixMillis,
    pub body: DeviceRequest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct EnrollmentRecord {
    /// SHA-256 of the token, hex: the key it is found by. The token is shown once.
    pub token_sha256: String,
    pub customer: String,
    pub created_at: UnixMillis,
    pub expires_at: UnixMillis,
    pub uses_left: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobRecord {
    pub job_id: JobId,
    pub device_id: DeviceId,
    pub state: JobState,
    /// Attempts started so far (a fetch starts one).
    pub attempt: u32,
    pub max_attempts: u32,
    pub created_at: UnixMillis,
    /// A job not started by then expires.
    pub expires_at: UnixMillis,
    pub lease_until: Option<UnixMillis>,
    pub idempotency_key: Option<String>,
    pub content_type: String,
    pub payload_len: u64,
    /// The device's detail on success, or the reason of a failure, rejection or cancel.
    pub outcome: Option<String>,
    pub history: Vec<Transition>,
    /// Who submitted it: `admin`, `owner:{id}` or `companion:{id}`.
    #[serde(default)]
    pub submitted_by: Option<String>,
    /// The print settings asked for.
    #[serde(default)]
    pub print: Option<PrintSettings>,
    /// With an idempotency key: SHA-256 of the submission (payload, content type, TTL,
    /// attempts, print settings, submitter), so that the key reused for another request is
    /// refused instead of answered with this job.
    #[serde(default)]
    pub request_sha256: Option<String>,
}

/// One change asked for through an operator console session: stored when it is asked, with
/// no `status`, and again under the same id once it is answered. A record left without a
/// status was asked for when the bridge stopped; whether it took effect, its target's own
/// record says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ConsoleActionRecord {
    /// 16 hex digits: of the actions asked for in the same millisecond, the later has the
    /// greater id.
    pub id: String,
    pub at: UnixMillis,
    /// `admin`, or `ops:{id}`.
    pub by: String,
    pub method: String,
    pub path: String,
    /// The HTTP status it was answered with; `None` until then.
    pub status: Option<u16>,
}
