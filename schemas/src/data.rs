//! The data channel: a WebSocket between one device and the cloud bridge, binary frames of
//! MessagePack.
//!
//! The device speaks first with a [`Hello`] within the server's deadline; the server answers
//! [`ServerFrame::Welcome`] or a connection-level [`ServerFrame::Error`] followed by a close with
//! one of the `CLOSE_*` codes. After that the device sends requests with ids of its choosing and
//! the server answers each with a response or an error carrying the same id, in any order (a
//! long-polling sync does not hold up a status report).

use serde::{Deserialize, Serialize};

use crate::feed::FeedEntry;
use crate::job::{JobState, JobUpdate};
use crate::outbox::{OutboxItem, RequestNo};
use crate::print::{Capabilities, HeldJobSummary, PrintSettings};
use crate::services::{ContractInfo, DeviceControl, InstructionOffer};
use crate::settings::SettingsReport;
pub use crate::status::{DeviceState, DeviceStatus};
use crate::{
    DeviceId, FeedSeq, InstructionId, JobId, OwnerId, RequestId, Secret, UnixMillis, UserId,
};

/// WebSocket close code: the frame could not be decoded.
pub const CLOSE_BAD_FRAME: u16 = 4400;
/// WebSocket close code: authentication or registration refused.
pub const CLOSE_UNAUTHORIZED: u16 = 4401;
/// WebSocket close code: the device is disabled or invalidated.
pub const CLOSE_FORBIDDEN: u16 = 4403;
/// WebSocket close code: no hello (or no frame at all) before the deadline.
pub const CLOSE_TIMEOUT: u16 = 4408;
/// WebSocket close code: a frame was larger than [`crate::MAX_FRAME_BYTES`].
pub const CLOSE_TOO_LARGE: u16 = 4413;
/// WebSocket close code: the hello named a protocol version this server does not speak.
pub const CLOSE_UNSUPPORTED_VERSION: u16 = 4426;

/// Longest long-poll wait a server grants; a larger `wait_ms` is clamped.
pub const MAX_SYNC_WAIT_MS: u32 = 30_000;
/// Most entries returned by one sync.
pub const MAX_SYNC_ENTRIES: u16 = 256;

fn max_sync_entries() -> u16 {
    MAX_SYNC_ENTRIES
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientFrame {
    Hello(Hello),
    Request { id: RequestId, body: Request },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u16,
    pub auth: HelloAuth,
    /// Free text naming the agent and its version, for logs.
    pub agent: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HelloAuth {
    /// A registered device proves who it is.
    Device { device_id: DeviceId, secret: Secret },
    /// A new device registers with an enrollment token; the welcome carries its credentials.
    Register(Registration),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    pub enrollment_token: Secret,
    pub serial: String,
    pub model: String,
    /// Sales destination / region code, e.g. "EU".
    pub destination: String,
    /// IANA time zone, e.g. "Europe/Berlin".
    pub time_zone: String,
    /// The owner as entered at the panel during set-up; bound to the device id. Asked for
    /// again when the device is reset or moved.
    #[serde(default)]
    pub owner: Option<OwnerClaim>,
    /// Chosen by the device (16 to 64 of `A-Z a-z 0-9 _ -`, random) and kept until it has
    /// stored its credentials: registering again with the same token, serial and id before
    /// [`Request::CompleteRegistration`] is the same registration (the same device id, a new
    /// secret, no further use of the token). Without one, every registration is new.
    #[serde(default)]
    pub registration_id: Option<String>,
}

/// Owner information entered at the panel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OwnerClaim {
    pub owner_id: OwnerId,
    /// Chosen at set-up, 4 to 64 characters; only its hash is kept.
    pub pin: Secret,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Entries after `after`, waiting up to `wait_ms` for one to appear (long-poll).
    Sync {
        after: FeedSeq,
        /// Default 0: answer at once.
        #[serde(default)]
        wait_ms: u32,
        /// Default (and at most) [`MAX_SYNC_ENTRIES`].
        #[serde(default = "max_sync_entries")]
        limit: u16,
        /// Acknowledges everything up to here first, as [`Request::Ack`] would: a device that
        /// has handled what its last sync returned says so in the sync that asks for more.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ack: Option<FeedSeq>,
    },
    /// Everything up to `upto` is handled. Idempotent; never moves backwards.
    Ack {
        upto: FeedSeq,
    },
    /// Take a job: returns its payload and a lease.
    FetchJob {
        job_id: JobId,
        /// The device starts the job at once: the cloud records `delivered` and `in_progress`
        /// together, and no separate `started` report is needed.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        start: bool,
    },
    /// Report progress or the outcome of the attempt named by `attempt`.
    JobUpdate {
        job_id: JobId,
        attempt: u32,
        update: JobUpdate,
    },
    /// The device's current status. Device information: refused while the device's last
    /// reported consent withholds it. Devices with an outbox send [`Request::Deliver`] instead.
    ReportStatus {
        status: DeviceStatus,
    },
    /// The oldest requests of the device's outbox, in order, at most
    /// [`crate::outbox::MAX_DELIVER_ITEMS`].
    Deliver {
        items: Vec<OutboxItem>,
    },
    /// The device has stored the credentials of its registration: from now on it may be
    /// given jobs by companions. Idempotent.
    CompleteRegistration,
    /// The device's state met a condition that calls for the owner to confirm (reset,
    /// relocation). Until confirmed, the cloud hands it no jobs; unconfirmed by the deadline,
    /// its id is invalidated.
    OwnerCheck {
        reason: OwnerCheckReason,
    },
    /// Owner information entered at the panel. Right: the check ends. Wrong: the device id is
    /// invalidated at once (error [`ErrorCode::DeviceInvalidated`]).
    ConfirmOwner {
        owner: OwnerClaim,
    },
    /// The settings the device uses now: sent when they changed (a new revision applied, or
    /// another endpoint in use after a fallback).
    ReportSettings {
        report: SettingsReport,
    },
    /// Takes an instruction from the mailbox (the cloud notes when). Refused with
    /// [`ErrorCode::Expired`] after its expiry: the device must not act on it then.
    TakeInstruction {
        instruction_id: InstructionId,
    },
    /// Calls a service's registration URL with the one-time code of a use-start instruction.
    /// Calling again with the same code after it succeeded answers the same.
    RegisterService {
        url: String,
        code: Secret,
    },
    /// The device's contract information, one entry per support service it has (or had) a
    /// contract for.
    Contracts,
    /// Registers (or updates) the device's printer queue with what its printer can do. Jobs
    /// with print settings are checked against these at submission.
    RegisterPrinter {
        capabilities: Capabilities,
    },
    /// A user logs in at the device's panel; the cloud checks the PIN and opens a session at
    /// this device, answering with the user's held jobs.
    Login {
        user_id: UserId,
        pin: Secret,
    },
    /// The logged-in user's held jobs.
    HeldJobs {
        session: Secret,
    },
    /// Moves the chosen held jobs to this device's printer queue (each once, to one device);
    /// only inside a session opened at this device.
    Release {
        session: Secret,
        jobs: Vec<JobId>,
    },
    Logout {
        session: Secret,
    },
    /// Activates a support service the device has a contract for, enabled locally and
    /// supporting its model. The answer says what the service needs reported.
    ActivateService {
        service_id: String,
        application_id: String,
    },
}

/// Why a device asks its owner to confirm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OwnerCheckReason {
    FactoryReset,
    /// The device's time zone changed: it may have moved.
    TimeZoneChanged {
        time_zone: String,
    },
    /// The device joined a network it has not been on before.
    NetworkChanged {
        network: String,
    },
}

impl std::fmt::Display for OwnerCheckReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OwnerCheckReason::FactoryReset => write!(f, "factory reset"),
            OwnerCheckReason::TimeZoneChanged { time_zone } => {
                write!(f, "time zone changed to {time_zone}")
            }
            OwnerCheckReason::NetworkChanged { network } => {
                write!(f, "network changed to {network}")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome(Welcome),
    Response {
        id: RequestId,
        body: Response,
    },
    /// An error for request `id`, or for the connection when `id` is `None` (a close follows).
    Error {
        id: Option<RequestId>,
        error: ErrorBody,
    },
    Event(ServerEvent),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol: u16,
    pub device_id: DeviceId,
    /// Present only after a registration: store these, they are not shown again.
    pub credentials: Option<Secret>,
    pub newest: FeedSeq,
    pub acked: FeedSeq,
    pub server_time: UnixMillis,
    /// The regular poll the cloud asks for, in seconds (the device adds jitter). Devices keep
    /// it; `None` from older servers.
    #[serde(default)]
    pub poll_interval_secs: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Feed {
        entries: Vec<FeedEntry>,
        newest: FeedSeq,
    },
    Acked {
        acked: FeedSeq,
    },
    Job(JobOffer),
    JobState {
        job_id: JobId,
        state: JobState,
        attempt: u32,
    },
    StatusAccepted {
        at: UnixMillis,
    },
    /// Every request up to `upto` is handled (accepted now, accepted before, or refused as
    /// listed); the device drops them from its outbox.
    Delivered {
        upto: RequestNo,
        refused: Vec<Refusal>,
    },
    RegistrationCompleted {
        at: UnixMillis,
    },
    /// The owner must confirm by `deadline`; `None`: no owner is bound, nothing to confirm.
    OwnerCheck {
        deadline: Option<UnixMillis>,
    },
    OwnerConfirmed,
    SettingsRecorded {
        at: UnixMillis,
    },
    Instruction(InstructionOffer),
    ServiceRegistered {
        service_id: String,
        at: UnixMillis,
    },
    Contracts {
        contracts: Vec<ContractInfo>,
    },
    DeviceControl(DeviceControl),
    PrinterRegistered {
        at: UnixMillis,
    },
    LoggedIn {
        session: Secret,
        expires_at: UnixMillis,
        held: Vec<HeldJobSummary>,
    },
    Held {
        held: Vec<HeldJobSummary>,
    },
    /// The jobs now in this device's queue, and those refused with why.
    Released {
        released: Vec<JobId>,
        refused: Vec<(JobId, ErrorBody)>,
    },
    LoggedOut,
}

/// A delivered request the cloud will not act on, and why. Final: sending it again cannot help.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub no: RequestNo,
    pub error: ErrorBody,
}

/// A taken job: its payload and the lease under which the device runs it.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct JobOffer {
    pub job_id: JobId,
    pub attempt: u32,
    /// The job returns to the queue if no update renews the lease before this time.
    pub lease_until: UnixMillis,
    pub content_type: String,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// The print settings the job asks for (checked against the printer's capabilities).
    #[serde(default)]
    pub print: Option<PrintSettings>,
}

impl std::fmt::Debug for JobOffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobOffer")
            .field("job_id", &self.job_id)
            .field("attempt", &self.attempt)
            .field("lease_until", &self.lease_until)
            .field("content_type", &self.content_type)
            .field("payload_len", &self.payload.len())
            .field("print", &self.print)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerEvent {
    /// The server is going away (shutdown); reconnect with backoff.
    Closing { reason: String },
}

/// A typed error with a stable code and a human message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ErrorBody {}

/// Stable error codes, shared by the data channel and the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadFrame,
    UnsupportedVersion,
    Unauthorized,
    Forbidden,
    DeviceDisabled,
    EnrollmentInvalid,
    NotFound,
    InvalidState,
    LeaseLost,
    FrameTooLarge,
    HelloTimeout,
    BadRequest,
    Conflict,
    Overloaded,
    ShuttingDown,
    Internal,
    /// Device information from a device whose user has not permitted sending it.
    ConsentWithheld,
    /// The device has not finished registering (it never confirmed storing its credentials).
    RegistrationIncomplete,
    /// The device id was invalidated (owner not confirmed): register again.
    DeviceInvalidated,
    /// The owner has not yet confirmed after a reset or relocation; try again later.
    OwnerCheckPending,
    /// Too late: the instruction (or registration code) has expired.
    Expired,
    /// The registration code is wrong, already used, or issued to another device.
    RegistrationCodeInvalid,
    /// A print setting the target printer cannot honour (the message names it).
    UnsupportedSetting,
    /// The request took longer than the server allows (the admin API's request timeout).
    Timeout,
    /// A request kind this server does not know (a newer device's): that request fails, the
    /// session goes on.
    UnknownRequest,
    /// A body or payload over its limit (the admin API, HTTP 413; the message names the limit).
    PayloadTooLarge,
    /// A request that matches its schema but holds a value that cannot be used: an endpoint URL
    /// that does not parse, base64 that does not decode, a number over this bridge's configured
    /// limit (the admin API, HTTP 422; the message names the value).
    InvalidValue,
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The HTTP status the admin API answers with this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::BadFrame | ErrorCode::FrameTooLarge => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden
            | ErrorCode::DeviceDisabled
            | ErrorCode::EnrollmentInvalid
            | ErrorCode::ConsentWithheld
            | ErrorCode::RegistrationCodeInvalid => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Timeout => 408,
            ErrorCode::InvalidState
            | ErrorCode::Conflict
            | ErrorCode::LeaseLost
            | ErrorCode::RegistrationIncomplete => 409,
            ErrorCode::Expired => 410,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UnsupportedSetting | ErrorCode::InvalidValue => 422,
            ErrorCode::Overloaded | ErrorCode::ShuttingDown => 503,
            ErrorCode::UnsupportedVersion
            | ErrorCode::HelloTimeout
            | ErrorCode::Internal
            | ErrorCode::DeviceInvalidated
            | ErrorCode::OwnerCheckPending
            | ErrorCode::UnknownRequest
            | ErrorCode::Unknown => 500,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::DeviceDisabled => "device_disabled",
            ErrorCode::EnrollmentInvalid => "enrollment_invalid",
            ErrorCode::NotFound => "not_found",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::LeaseLost => "lease_lost",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::HelloTimeout => "hello_timeout",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
            ErrorCode::ConsentWithheld => "consent_withheld",
            ErrorCode::RegistrationIncomplete => "registration_incomplete",
            ErrorCode::DeviceInvalidated => "device_invalidated",
            ErrorCode::OwnerCheckPending => "owner_check_pending",
            ErrorCode::Expired => "expired",
            ErrorCode::RegistrationCodeInvalid => "registration_code_invalid",
            ErrorCode::UnsupportedSetting => "unsupported_setting",
            ErrorCode::Timeout => "timeout",
            ErrorCode::UnknownRequest => "unknown_request",
            ErrorCode::InvalidValue => "invalid_value",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Unknown => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feed::FeedBody;
    use crate::{decode, encode};

    fn round_trip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(v: T) {
        let bytes = encode(&v).unwrap();
        assert_eq!(decode::<T>(&bytes).unwrap(), v);
    }

    #[test]
    fn frames_round_trip() {
        let device_id = DeviceId::from_random([7; 8]);
        let job_id = JobId::from_random([9; 8]);
        round_trip(ClientFrame::Hello(Hello {
            protocol: 1,
            auth: HelloAuth::Device {
                device_id: device_id.clone(),
                secret: Secret::new("s"),
            },
            agent: "test".into(),
        }));
        round_trip(ClientFrame::Request {
            id: RequestId(3),
            body: Request::JobUpdate {
                job_id: job_id.clone(),
                attempt: 2,
                update: JobUpdate::Failed {
                    reason: "jam".into(),
                },
            },
        });
        round_trip(ServerFrame::Response {
            id: RequestId(4),
            body: Response::Feed {
                entries: vec![FeedEntry {
                    seq: FeedSeq(1),
                    at: UnixMillis(5),
                    body: FeedBody::JobOffered { job_id },
                }],
                newest: FeedSeq(1),
            },
        });
        round_trip(ServerFrame::Error {
            id: None,
            error: ErrorBody::new(ErrorCode::Unauthorized, "no"),
        });
    }

    #[test]
    fn payload_is_encoded_as_bin_not_an_array_of_integers() {
        let offer = JobOffer {
            job_id: JobId::from_random([1; 8]),
            attempt: 1,
            lease_until: UnixMillis(0),
            content_type: "x".into(),
            payload: vec![0xff; 1000],
            print: None,
        };
        let bytes = encode(&offer).unwrap();
        assert!(bytes.len() < 1100, "payload took {} bytes", bytes.len());
    }

    #[test]
    fn garbage_is_a_decode_error_not_a_panic() {
        for garbage in [
            &b""[..],
            b"\xc1",
            b"\x81\xa5hello\xc0",
            &[0xdd, 0xff, 0xff, 0xff, 0xff],
        ] {
            assert!(decode::<ClientFrame>(garbage).is_err());
        }
    }

    #[test]
    fn error_codes_serialize_as_their_stable_names() {
        let json = serde_json::to_string(&ErrorCode::LeaseLost).unwrap();
        assert_eq!(json, format!("\"{}\"", ErrorCode::LeaseLost.as_str()));
    }
}
