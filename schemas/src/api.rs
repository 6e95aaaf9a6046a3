//! JSON bodies of the admin HTTP API (`/v1/...`). Errors are [`ApiError`] with a stable code.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::fleet::{
    DeviceCondition, DevicesQuery, FleetGroup, FleetMinute, FleetView, PresenceView,
};
pub use crate::principals::{
    CompanionCreated, CompanionView, CreateCompanion, CreateOpsLogin, CreateOwner, CreateUser,
    OpsLoginCreated, OpsLoginView, OwnerCreated, UserCreated, UserView,
};

use crate::data::{DeviceStatus, ErrorCode};
use crate::outbox::RequestNo;
use crate::print::PrintSettings;
use crate::records::{
    ConsentRecord, CountersRecord, DeviceRecord, Invalidation, JobRecord, OwnerCheckState,
};
use crate::services::{
    EnrollmentState, InstructionBody, InstructionRecord, InstructionState, RefusedRegistration,
    ServiceUse,
};
use crate::settings::{Endpoints, ReportedSettings, SettingsRecord};
use crate::{ApplicationId, DeviceId, FeedSeq, InstructionId, JobId, OwnerId, Secret, UnixMillis};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEnrollmentToken {
    #[schemars(length(min = 1, max = 128))]
    pub customer: String,
    /// How many devices may register with this token (default 1).
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub max_uses: Option<u32>,
    /// Lifetime in seconds (default one day).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct EnrollmentTokenCreated {
    /// Shown once; only its hash is stored.
    pub token: Secret,
    pub customer: String,
    pub expires_at: UnixMillis,
    pub max_uses: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeviceView {
    pub device_id: DeviceId,
    pub serial: String,
    pub model: String,
    pub destination: String,
    pub time_zone: String,
    pub customer: String,
    pub registered_at: UnixMillis,
    pub disabled: bool,
    /// Where it stands: invalidated, else disabled, else registering until it confirmed its
    /// credentials stored, else active.
    pub condition: DeviceCondition,
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
    /// Services the device is permitted to use.
    pub services: Vec<ServiceUse>,
    /// The newest page counters accepted.
    pub counters: Option<CountersRecord>,
    /// Its connections now, as this bridge has seen them since it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<PresenceView>,
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
            condition: DeviceCondition::of(d),
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
            services: d.services.clone(),
            counters: d.counters.clone(),
            presence: None,
        }
    }
}

/// `POST /v1/services`
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend(
    "if" = {
        "required": ["data_types"],
        "properties": { "data_types": { "type": "array", "minItems": 1 } },
    },
    "then" = {
        "required": ["kind"],
        "properties": { "kind": { "type": "string", "minLength": 1 } },
    },
))]
pub struct CreateService {
    /// 1 to 64 of `a-z`, `0-9`, `-`.
    #[schemars(regex(pattern = r"^[a-z0-9-]{1,64}$"))]
    pub service_id: String,
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    /// The device models the service applies to.
    #[schemars(length(min = 1, max = 256), inner(length(min = 1, max = 128)))]
    pub models: Vec<String>,
    /// Support services: their kind (needed when `data_types` are given), the data types they
    /// need, how often they want them.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub kind: Option<String>,
    #[serde(default)]
    #[schemars(length(max = 32), inner(regex(pattern = r"^[a-z0-9_]{1,64}$")))]
    pub data_types: Option<Vec<String>>,
    #[serde(default)]
    pub report_every_secs: Option<u32>,
}

/// `PUT /v1/devices/{id}/contracts/{service}`: the device's contract for a support service.
/// Replaces a contract of another service of the same kind (switching provider).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PutContract {
    #[schemars(length(max = 128))]
    pub application_id: String,
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub outline: String,
}

/// `PUT /v1/services/{id}`: what is given replaces what was.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct UpdateService {
    #[schemars(length(min = 1, max = 128))]
    pub name: Option<String>,
    #[schemars(length(min = 1, max = 256), inner(length(min = 1, max = 128)))]
    pub models: Option<Vec<String>>,
    #[schemars(length(max = 32), inner(regex(pattern = r"^[a-z0-9_]{1,64}$")))]
    pub data_types: Option<Vec<String>>,
    pub report_every_secs: Option<u32>,
}

/// A customer as the registry knows it: its devices by model.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CustomerView {
    pub customer: String,
    pub devices: u64,
    pub models: BTreeMap<String, u64>,
}

/// `GET /v1/customers/{customer}/candidates?service=...`
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CandidatesQuery {
    pub service: String,
}

/// `POST /v1/customers/{customer}/applications`: neither `models` nor `devices`: every device of
/// the customer whose model the service supports; `models`: those models only; `devices`: those
/// devices only (each must be the customer's and of a supported model).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("not" = {
    "required": ["models", "devices"],
    "properties": { "models": { "type": "array" }, "devices": { "type": "array" } },
}))]
pub struct ApplyForService {
    pub service_id: String,
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub devices: Option<Vec<DeviceId>>,
    /// How long the registration codes stay valid (default 7 days).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// An application's progress, device by device.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ApplicationView {
    pub application_id: ApplicationId,
    pub customer: String,
    pub service_id: String,
    pub created_at: UnixMillis,
    pub expires_at: UnixMillis,
    pub pending: u32,
    pub registered: u32,
    pub failed: u32,
    /// No device is pending any more.
    pub settled: bool,
    pub devices: Vec<EnrollmentView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct EnrollmentView {
    pub device_id: DeviceId,
    pub model: String,
    pub instruction_id: InstructionId,
    /// When the device took its use-start instruction.
    pub taken_at: Option<UnixMillis>,
    #[serde(flatten)]
    pub state: EnrollmentState,
    pub refusals: Vec<RefusedRegistration>,
}

/// `POST /v1/devices/{id}/instructions`: an instruction for the device maker's own handling.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInstruction {
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// How long the device may take to take it (default 7 days).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// An instruction in a device's mailbox (registration codes blanked).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct InstructionView {
    pub instruction_id: InstructionId,
    pub device_id: DeviceId,
    pub body: InstructionBody,
    pub created_at: UnixMillis,
    pub expires_at: UnixMillis,
    pub taken_at: Option<UnixMillis>,
    pub state: InstructionState,
}

impl InstructionView {
    pub fn new(r: &InstructionRecord, now: UnixMillis) -> InstructionView {
        InstructionView {
            instruction_id: r.instruction_id.clone(),
            device_id: r.device_id.clone(),
            body: r.body.redacted(),
            created_at: r.created_at,
            expires_at: r.expires_at,
            taken_at: r.taken_at,
            state: r.state(now),
        }
    }
}

/// Canonical padded standard base64, as the bridge decodes it: the last symbol before `=` may
/// carry no bits beyond the data.
const BASE64: &str =
    r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?$";

/// A job body carries its payload as `payload` or as `payload_base64`, exactly one of them.
fn one_payload(schema: &mut schemars::Schema) {
    schema.insert(
        "oneOf".into(),
        serde_json::json!([
            { "required": ["payload"], "properties": { "payload": { "type": "string" } } },
            {
                "required": ["payload_base64"],
                "properties": { "payload_base64": { "type": "string" } },
            },
        ]),
    );
}

/// `POST /v1/users/{id}/held-jobs`: a job for the user's virtual printer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
#[schemars(transform = one_payload)]
pub struct SubmitHeldJob {
    pub title: Option<String>,
    pub payload: Option<String>,
    #[schemars(regex(pattern = BASE64))]
    pub payload_base64: Option<String>,
    pub content_type: Option<String>,
    pub print: Option<PrintSettings>,
    /// How long it waits to be released (default 3 days).
    pub ttl_secs: Option<u64>,
}

/// `POST /v1/jobs/{id}/move`: to another device's printer queue.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveJob {
    pub to: DeviceId,
}

/// `POST /v1/customers/{customer}/poll-now`: make devices poll now.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct PollNow {
    /// Default: every device of the customer in use.
    #[schemars(length(min = 1, max = 10000))]
    pub devices: Option<Vec<DeviceId>>,
    /// `hint` (default): a poll-now hint to each device. `lan`: one device (`root`, default the
    /// first with a LAN endpoint) gets the plan in its mailbox and passes it on over the LAN.
    pub via: PollNowVia,
    pub root: Option<DeviceId>,
    /// Devices each device passes the nudge on to (default 3).
    pub fanout: Option<u8>,
    /// The k-th device of the tree polls k × `stagger_ms` after receiving the nudge (default
    /// 1000).
    pub stagger_ms: Option<u32>,
    /// How long the nudge is valid (default 300 s).
    pub ttl_secs: Option<u64>,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum PollNowVia {
    #[default]
    Hint,
    Lan,
}

/// What a poll-now did.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PollNowPlan {
    pub nudge_id: String,
    pub created_at: UnixMillis,
    pub not_after: UnixMillis,
    /// The device whose mailbox holds the tree (`via: lan`).
    pub root: Option<DeviceId>,
    /// Each device in the tree and how long after receiving the nudge it polls.
    pub schedule: Vec<PlannedPoll>,
    /// Devices told by a hint instead (`via: hint`, or no LAN endpoint known).
    pub hinted: Vec<DeviceId>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PlannedPoll {
    pub device_id: DeviceId,
    pub delay_ms: u32,
    /// Where it passes the nudge on to.
    pub children: Vec<DeviceId>,
}

/// `PUT /v1/devices/{id}/settings`: replaces the device's server settings.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PutSettings {
    pub endpoints: Endpoints,
}

/// A device's server settings: as set from outside, and as the device reports using them.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
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

#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
#[schemars(transform = one_payload)]
pub struct SubmitJob {
    /// The payload as UTF-8 text. Exactly one of `payload` and `payload_base64` is required.
    pub payload: Option<String>,
    /// The payload as standard base64 (padded, canonical), for binary documents.
    #[schemars(regex(pattern = BASE64))]
    pub payload_base64: Option<String>,
    /// Default `application/octet-stream`.
    #[schemars(length(min = 1, max = 128))]
    pub content_type: Option<String>,
    /// How long the job may wait to be started, in seconds (default one day).
    #[schemars(range(min = 1))]
    pub ttl_secs: Option<u64>,
    /// Attempts before a job whose lease keeps running out fails (default 3; at most the
    /// bridge's `jobs.max_attempts_limit`, 100 unless configured, else `invalid_value`).
    #[schemars(range(min = 1))]
    pub max_attempts: Option<u32>,
    /// A second submission with the same key for the same device returns the first job.
    #[schemars(length(min = 1, max = 128))]
    pub idempotency_key: Option<String>,
    /// Print settings, checked against the device's printer (`unsupported_setting` names the
    /// first it cannot honour).
    pub print: Option<PrintSettings>,
}

/// A job as the admin API shows it: the stored record itself, since every field of it is
/// for whoever may read the job (the payload is not in it). Should the record ever hold
/// something the API must not show, this becomes a type of its own again.
pub type JobView = JobRecord;

/// A page of a list in the order it was made (`order=newest`: the other way round): the items
/// after `after` in that order (default: from the first), at most `limit` of them (default 100,
/// at most 1000).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PageQuery<After> {
    #[serde(default = "none::<After>")]
    pub after: Option<After>,
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(default, skip_serializing_if = "Order::is_oldest")]
    pub order: Order,
}

/// Which end of a list a page starts from.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// The oldest first.
    #[default]
    Oldest,
    /// The newest first.
    Newest,
}

impl Order {
    pub fn is_oldest(&self) -> bool {
        *self == Order::Oldest
    }
}

/// `None`, as a default that puts no `Default` bound on `After`.
fn none<T>() -> Option<T> {
    None
}

impl<After> PageQuery<After> {
    /// How many to answer: `limit` within 1 to 1000, 100 when not given.
    pub fn page_size(&self) -> usize {
        self.limit.unwrap_or(100).clamp(1, 1000)
    }
}

impl<After> Default for PageQuery<After> {
    fn default() -> Self {
        PageQuery {
            after: None,
            limit: None,
            order: Order::Oldest,
        }
    }
}

/// Query of `GET /v1/devices/{id}/requests`: requests numbered above `after` (default 0).
pub type RequestsQuery = PageQuery<u64>;

/// Query of `GET /v1/devices/{id}/jobs`: a page of the device's jobs, open and finished (until
/// their retention ends), in the order they were submitted; `after` is a job id.
pub type JobsQuery = PageQuery<JobId>;

#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelJob {
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Health {
    /// `ok`, or `unavailable` (answered with 503) when a part cannot serve.
    pub status: String,
    pub broker: String,
    pub devices: u64,
    pub jobs: u64,
    /// What cannot serve, and why; empty when `status` is `ok`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}
