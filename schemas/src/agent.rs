//! What the device agent keeps on disk.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::data::DeviceStatus;
use crate::job::JobUpdate;
use crate::{DeviceId, FeedSeq, JobId, Secret};

/// Version of the agent's state file.
pub const AGENT_STATE_VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    pub v: u8,
    pub credentials: Option<Credentials>,
    /// Every feed entry up to here has been handled.
    pub cursor: FeedSeq,
    /// Jobs this device has run, newest last (bounded). A job listed here is never run again;
    /// an outcome not yet `reported` is sent again instead.
    #[serde(default)]
    pub done: VecDeque<DoneJob>,
    /// The newest status not yet accepted by the cloud (newest wins).
    #[serde(default)]
    pub unsent_status: Option<DeviceStatus>,
    /// The newest feed entry a hint announced and the device has not yet fetched up to:
    /// recorded when the hint arrives, so a device that restarts before fetching still
    /// fetches, without waiting for another hint.
    #[serde(default)]
    pub hinted: Option<FeedSeq>,
}

impl Default for AgentState {
    fn default() -> Self {
        AgentState {
            v: AGENT_STATE_VERSION,
            credentials: None,
            cursor: FeedSeq::ZERO,
            done: VecDeque::new(),
            unsent_status: None,
            hinted: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Credentials {
    pub device_id: DeviceId,
    pub secret: Secret,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DoneJob {
    pub job_id: JobId,
    pub attempt: u32,
    /// The final update (succeeded, failed or rejected).
    pub outcome: JobUpdate,
    pub reported: bool,
}
