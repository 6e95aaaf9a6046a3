//! What the agent tells its embedder: events as they happen, and why a call failed.

use schemas::data::ErrorBody;
use schemas::hint::HintKind;
use schemas::{DeviceId, FeedSeq, InstructionId, JobId, UnixMillis, UserId};

use crate::executor::JobOutcome;
use crate::outbox::OutboxFull;
use crate::state::StateError;

/// What the agent did, for logs, the simulator and tests.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    Registered(DeviceId),
    /// The notification channel is connected (or moved) to `endpoint`.
    MqttUp {
        endpoint: String,
    },
    MqttDown(String),
    /// The broker refused the login (wrong credentials, device disabled): the notification
    /// channel asks again only after the longest backoff; the data channel says why.
    MqttRefused(String),
    /// The data channel is connected (or moved) to `endpoint`.
    DataUp {
        endpoint: String,
    },
    DataDown(String),
    /// Server settings from the cloud are applied and kept; the links restart with them.
    SettingsApplied {
        revision: u64,
    },
    /// The cloud has the settings the device uses now.
    SettingsReported {
        revision: u64,
    },
    HintReceived {
        kind: HintKind,
        seq: FeedSeq,
    },
    Synced {
        cursor: FeedSeq,
    },
    JobFetched {
        job_id: JobId,
        attempt: u32,
    },
    JobStarted {
        job_id: JobId,
        attempt: u32,
    },
    JobFinished {
        job_id: JobId,
        attempt: u32,
        outcome: JobOutcome,
    },
    JobReported {
        job_id: JobId,
    },
    JobCanceled {
        job_id: JobId,
    },
    /// The cloud has handled a request from the outbox (`kind` as in
    /// [`DeviceRequest::kind`]).
    RequestDelivered {
        no: schemas::outbox::RequestNo,
        kind: &'static str,
    },
    /// The owner must confirm at the panel by `deadline` (`None`: no owner bound).
    OwnerCheckStarted {
        deadline: Option<UnixMillis>,
    },
    OwnerConfirmed,
    /// The cloud invalidated the device id; the agent forgot it and registers again.
    Invalidated {
        reason: String,
    },
    /// An instruction was taken from the mailbox (`kind` as in [`InstructionBody::kind`]).
    InstructionTaken {
        instruction_id: InstructionId,
        kind: &'static str,
    },
    /// The cloud would not hand out an instruction (expired, gone): it is not acted on.
    InstructionSkipped {
        instruction_id: InstructionId,
        error: ErrorBody,
    },
    /// An instruction of the device maker's own kind, for the application to act on.
    CustomInstruction {
        instruction_id: InstructionId,
        name: String,
        params: std::collections::BTreeMap<String, String>,
    },
    /// The device is permitted to use a service (its use-start instruction's code worked).
    ServiceRegistered {
        service_id: String,
    },
    /// The cloud refused the registration code of a use-start instruction.
    ServiceRefused {
        service_id: String,
        error: ErrorBody,
    },
    /// A poll-now nudge was accepted (on the LAN or from the mailbox); the device polls after
    /// `delay_ms` and has passed it on to the devices below it.
    NudgeAccepted {
        nudge_id: String,
        delay_ms: u64,
    },
    /// A nudge was refused (bad token, expired, another device's, replayed).
    NudgeRefused {
        reason: String,
    },
    /// A support service is active: the device reports `data_types` to it from now on.
    SupportActivated {
        service_id: String,
        data_types: Vec<String>,
    },
    /// A support service is no longer active (contract canceled or moved, disabled locally).
    SupportDeactivated {
        service_id: String,
    },
    /// A user logged in at this device has new held jobs (refresh the panel's list).
    HeldJobsChanged {
        user_id: UserId,
    },
    /// Device information for a support service is queued in the outbox.
    TelemetryQueued {
        service_id: String,
        data_types: Vec<String>,
    },
    /// The cloud refused a request from the outbox; it is not sent again.
    RequestRefused {
        no: schemas::outbox::RequestNo,
        error: ErrorBody,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("registration refused: {0}")]
    Registration(ErrorBody),
    #[error("the device has no credentials and no enrollment token to register with")]
    NoCredentials,
    #[error(transparent)]
    OutboxFull(#[from] OutboxFull),
    #[error("the device id was invalidated: {0}")]
    Invalidated(String),
    #[error("this needs the cloud, which cannot be reached now: {0}")]
    Offline(String),
    #[error("the cloud refused: {0}")]
    Refused(ErrorBody),
    #[error("the agent has stopped")]
    Stopped,
}
