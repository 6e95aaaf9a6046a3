//! Store-and-forward: what a device asks of the cloud on its own initiative (a status report, a
//! consent change, a job request made at the panel). The device numbers each request when it is
//! made, keeps it in a durable outbox, and delivers the outbox in order once its data channel
//! is up. The cloud acts on a request number once: a number at or below the highest it has
//! accepted from that device is a duplicate (a resend after a crash) and is only acknowledged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::UnixMillis;
use crate::status::DeviceStatus;

crate::ids::counter!(
    /// The number a device gives a request when it is made; 1, 2, 3, ... per device, never
    /// reused (gaps are allowed: a request dropped from a full outbox leaves one).
    RequestNo
);

/// Most requests delivered in one [`crate::data::Request::Deliver`].
pub const MAX_DELIVER_ITEMS: usize = 64;

/// One request waiting in (or delivered from) a device's outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OutboxItem {
    pub no: RequestNo,
    /// The device's clock when the request was made.
    pub made_at: UnixMillis,
    pub body: DeviceRequest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceRequest {
    /// The device's status (device information: needs the user's consent).
    Status { status: DeviceStatus },
    /// The user changed (or the cloud asked for) the permission to send device information.
    Consent {
        granted: bool,
        /// When the user changed it, on the device's clock.
        changed_at: UnixMillis,
    },
    /// A job the user asked for at the panel ("scan to cloud", "print my held jobs").
    PanelJob {
        action: String,
        #[serde(default)]
        params: BTreeMap<String, String>,
    },
    /// Device information an activated support service asked for (its data types only).
    Telemetry {
        service_id: String,
        readings: BTreeMap<String, String>,
    },
    /// The printer's page counters (device information), read whole.
    Counters {
        counters: crate::print::PageCounters,
    },
    /// A request kind this version does not know.
    #[serde(other)]
    Unknown,
}

impl DeviceRequest {
    /// Whether this is device information, which leaves the device only with consent.
    pub fn is_device_information(&self) -> bool {
        matches!(
            self,
            DeviceRequest::Status { .. }
                | DeviceRequest::Telemetry { .. }
                | DeviceRequest::Counters { .. }
        )
    }

    pub fn kind(&self) -> &'static str {
        match self {
            DeviceRequest::Status { .. } => "status",
            DeviceRequest::Consent { .. } => "consent",
            DeviceRequest::PanelJob { .. } => "panel_job",
            DeviceRequest::Telemetry { .. } => "telemetry",
            DeviceRequest::Counters { .. } => "counters",
            DeviceRequest::Unknown => "unknown",
        }
    }
}

/// The permission to send device information, as the device holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Consent {
    pub granted: bool,
    /// When the user last changed it, on the device's clock.
    pub changed_at: UnixMillis,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::DeviceState;
    use crate::{decode, encode};

    #[test]
    fn requests_round_trip_and_unknown_kinds_decode() {
        let items = vec![
            OutboxItem {
                no: RequestNo(1),
                made_at: UnixMillis(10),
                body: DeviceRequest::Consent {
                    granted: true,
                    changed_at: UnixMillis(9),
                },
            },
            OutboxItem {
                no: RequestNo(2),
                made_at: UnixMillis(11),
                body: DeviceRequest::Status {
                    status: DeviceStatus {
                        state: DeviceState::Idle,
                        detail: "ready".into(),
                        observed_at: UnixMillis(11),
                    },
                },
            },
            OutboxItem {
                no: RequestNo(3),
                made_at: UnixMillis(12),
                body: DeviceRequest::PanelJob {
                    action: "scan_to_cloud".into(),
                    params: BTreeMap::from([("pages".into(), "3".into())]),
                },
            },
        ];
        let bytes = encode(&items).unwrap();
        assert_eq!(decode::<Vec<OutboxItem>>(&bytes).unwrap(), items);

        #[derive(Serialize, schemars::JsonSchema)]
        struct Future {
            kind: &'static str,
            level: u8,
        }
        let bytes = encode(&Future {
            kind: "toner_level",
            level: 5,
        })
        .unwrap();
        assert_eq!(
            decode::<DeviceRequest>(&bytes).unwrap(),
            DeviceRequest::Unknown
        );
    }

    #[test]
    fn only_status_is_device_information() {
        assert!(
            !DeviceRequest::Consent {
                granted: false,
                changed_at: UnixMillis(0)
            }
            .is_device_information()
        );
        assert!(
            !DeviceRequest::PanelJob {
                action: "x".into(),
                params: BTreeMap::new()
            }
            .is_device_information()
        );
    }
}
