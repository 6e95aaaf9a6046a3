//! What the device agent keeps on disk.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::data::OwnerCheckReason;
use crate::job::JobUpdate;
use crate::outbox::{Consent, OutboxItem, RequestNo};
use crate::print::Capabilities;
use crate::settings::Endpoints;
use crate::{DeviceId, FeedSeq, JobId, Secret, UnixMillis};

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
    /// Requests made on the device and not yet delivered, oldest first.
    #[serde(default)]
    pub outbox: VecDeque<OutboxItem>,
    /// The number given to the newest request made (delivered or not).
    #[serde(default)]
    pub last_request: RequestNo,
    /// The user's permission to send device information; `None` until first set (at set-up).
    #[serde(default)]
    pub consent: Option<Consent>,
    /// The cloud knows the credentials are stored (the registration is complete).
    #[serde(default)]
    pub registration_completed: bool,
    /// The owner must confirm at the panel (after a reset or relocation); no jobs until then.
    #[serde(default)]
    pub owner_check: Option<PendingOwnerCheck>,
    /// The newest feed entry a hint announced and the device has not yet fetched up to:
    /// recorded when the hint arrives, so a device that restarts before fetching still
    /// fetches, without waiting for another hint.
    #[serde(default)]
    pub hinted: Option<FeedSeq>,
    /// Server settings given from outside; `None`: the factory settings (the agent's
    /// configuration).
    #[serde(default)]
    pub settings: Option<AppliedSettings>,
    /// The regular poll the cloud asked for, in seconds.
    #[serde(default)]
    pub poll_interval_secs: Option<u32>,
    /// The device's table of support services, by service id: whether the user (or the
    /// maker) enabled each, and what is active.
    #[serde(default)]
    pub support: BTreeMap<String, SupportService>,
    /// When the contracts were last fetched.
    #[serde(default)]
    pub contracts_fetched_at: Option<UnixMillis>,
    /// The printer capabilities the cloud has (registered with the printer queue).
    #[serde(default)]
    pub printer_registered: Option<Capabilities>,
    /// The registration id sent while registering (see
    /// [`crate::data::Registration::registration_id`]), stored before the first try.
    #[serde(default)]
    pub registration_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupportService {
    pub enabled: bool,
    /// Activated under a contract: what to report.
    pub active: Option<ActiveService>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveService {
    pub application_id: String,
    pub data_types: Vec<String>,
    pub report_every_secs: u32,
}

impl Default for AgentState {
    fn default() -> Self {
        AgentState {
            v: AGENT_STATE_VERSION,
            credentials: None,
            cursor: FeedSeq::ZERO,
            done: VecDeque::new(),
            outbox: VecDeque::new(),
            last_request: RequestNo::ZERO,
            consent: None,
            registration_completed: false,
            owner_check: None,
            hinted: None,
            settings: None,
            poll_interval_secs: None,
            support: BTreeMap::new(),
            contracts_fetched_at: None,
            printer_registered: None,
            registration_id: None,
        }
    }
}

/// Server settings the device applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedSettings {
    /// The revision applied; a feed entry with this revision or an older one is skipped.
    pub revision: u64,
    pub endpoints: Endpoints,
    /// The endpoints used before, tried after the new ones until one of the new ones has
    /// answered (each channel on its own): a mistyped setting cannot cut the device off.
    pub previous: Endpoints,
    /// The cloud has been told this revision is applied.
    pub reported: bool,
}

impl AppliedSettings {
    /// The lists the device tries, best first.
    pub fn effective(&self) -> Endpoints {
        self.endpoints.followed_by(&self.previous)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingOwnerCheck {
    pub reason: OwnerCheckReason,
    pub since: UnixMillis,
    /// The cloud has been told (and stops handing out jobs until the owner confirms).
    pub reported: bool,
}

impl AgentState {
    /// Forgets the device's identity after the cloud invalidated it, keeping what belongs
    /// to the device and its user (consent, the outbox, request numbering).
    pub fn forget_identity(&mut self) {
        self.credentials = None;
        // The next identity is a new registration.
        self.registration_id = None;
        self.cursor = FeedSeq::ZERO;
        self.done.clear();
        self.hinted = None;
        self.registration_completed = false;
        self.owner_check = None;
        // Contracts belonged to the old id: nothing is active until the new one has some.
        for s in self.support.values_mut() {
            s.active = None;
        }
        self.contracts_fetched_at = None;
        self.printer_registered = None;
        // The endpoints stay (they say where the service is); the revision numbering belongs
        // to the old id's record, and the new one starts again from 1.
        if let Some(s) = self.settings.as_mut() {
            s.revision = 0;
            s.reported = false;
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
