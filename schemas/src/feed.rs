//! Entries of a device's durable feed. The feed is the source of truth; hints only point at it.

use serde::{Deserialize, Serialize};

use crate::settings::DeviceSettings;
use crate::{FeedSeq, InstructionId, JobId, UnixMillis};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedEntry {
    pub seq: FeedSeq,
    pub at: UnixMillis,
    pub body: FeedBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FeedBody {
    /// A job is waiting for this device (first offer, or again after a lost lease).
    JobOffered { job_id: JobId },
    /// A job was canceled; stop it if it is running.
    JobCanceled { job_id: JobId },
    /// The cloud asks for the device's consent setting; the device answers with a
    /// [`crate::outbox::DeviceRequest::Consent`] through its outbox.
    ConsentQuery,
    /// New server settings from the owner or an administrator. The device applies a revision
    /// once, keeps it on disk and answers with [`crate::data::Request::ReportSettings`].
    Settings {
        revision: u64,
        settings: DeviceSettings,
    },
    /// An instruction waits in the mailbox; the device takes it with
    /// [`crate::data::Request::TakeInstruction`] (unless it has expired).
    Instruction {
        instruction_id: InstructionId,
        expires_at: UnixMillis,
    },
    /// The device's contracts changed: fetch them again
    /// ([`crate::data::Request::Contracts`]).
    ContractsChanged,
    /// A user logged in at this device has new held jobs.
    HeldJobsChanged { user_id: crate::UserId },
    /// An entry kind this version does not know; the device acknowledges and skips it.
    #[serde(other)]
    Unknown,
}
