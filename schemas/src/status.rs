//! What a device says about its state (idle, busy, an error shown on the panel), whether it
//! reports it directly or through its outbox.

use serde::{Deserialize, Serialize};

use crate::UnixMillis;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeviceStatus {
    pub state: DeviceState,
    /// Free text, e.g. an error code shown on the panel.
    pub detail: String,
    /// The device's own clock when the status was observed.
    pub observed_at: UnixMillis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    Idle,
    Busy,
    Error,
    Sleeping,
    #[serde(other)]
    Unknown,
}
