//! What operations see of the fleet through the admin API (the console's screens): the device
//! list's query, each device's condition and presence, and the overview. Re-exported from
//! [`crate::api`] with the other API bodies.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ops::Channel;
use crate::records::DeviceRecord;
use crate::{DeviceId, UnixMillis};

/// A device's connections as one bridge has seen them since it started.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub struct PresenceView {
    pub mqtt: bool,
    pub data: bool,
    /// When it last went offline on a channel (MQTT: once the grace period ran out), and
    /// which; `None`: not since the bridge started.
    pub left_at: Option<UnixMillis>,
    pub left: Option<Channel>,
}

/// Query of `GET /v1/devices`: every device, oldest registration first; `q` and `condition`
/// keep the matching ones, and `limit` makes a page of them, the page after the device
/// `after` (the last of the page before; after a device the bridge does not have, an empty
/// page).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DevicesQuery {
    /// Devices whose id, serial, model or customer holds this text (in any case).
    #[schemars(length(min = 1, max = 128))]
    pub q: Option<String>,
    pub condition: Option<DeviceCondition>,
    pub after: Option<DeviceId>,
    /// 1 to 1000.
    #[schemars(range(min = 1, max = 1000))]
    pub limit: Option<usize>,
}

/// Where a device stands, as the console sorts devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeviceCondition {
    /// Registered and in use.
    Active,
    /// Registered, its credentials not yet confirmed stored.
    Registering,
    Disabled,
    /// Its id was invalidated: it must register again.
    Invalidated,
}

impl DeviceCondition {
    pub fn of(d: &DeviceRecord) -> DeviceCondition {
        if d.invalidated.is_some() {
            DeviceCondition::Invalidated
        } else if d.disabled {
            DeviceCondition::Disabled
        } else if d.registration_completed_at.is_none() {
            DeviceCondition::Registering
        } else {
            DeviceCondition::Active
        }
    }
}

/// `GET /v1/fleet`: the fleet at a glance.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FleetView {
    pub devices: u64,
    pub active: u64,
    pub registering: u64,
    pub disabled: u64,
    pub invalidated: u64,
    /// Devices online now on MQTT, on the data channel, and on either (as this bridge has
    /// seen them connect since it started).
    pub online_mqtt: u64,
    pub online_data: u64,
    pub online: u64,
    /// Jobs not yet finished, by state.
    pub open_jobs: BTreeMap<String, u64>,
    /// Devices by customer and model, the largest groups first.
    pub groups: Vec<FleetGroup>,
    /// The minutes of the last hour in which a job changed state, oldest first.
    pub minutes: Vec<FleetMinute>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FleetGroup {
    pub customer: String,
    pub model: String,
    pub devices: u64,
}

/// One minute of job transitions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FleetMinute {
    pub start: UnixMillis,
    /// Transitions into each state.
    pub transitions: BTreeMap<String, u64>,
    /// Jobs that succeeded, and their submission→completion time.
    pub succeeded: u64,
    pub latency_p50_ms: Option<u64>,
    pub latency_p95_ms: Option<u64>,
}
