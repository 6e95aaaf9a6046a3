//! The hint published on a device's notification topic.
//!
//! A hint says only "look at your feed, it now reaches `seq`". Losing one delays work and never
//! loses it: the device catches up by cursor over the data channel. It carries no payload and no
//! secret, because rumqttd has no per-topic ACL and any client could read it.

use serde::{Deserialize, Serialize};

use crate::FeedSeq;

/// Version of the hint format.
pub const HINT_VERSION: u8 = 1;

/// Hints are tiny; anything larger on a notify topic is refused by the agent.
pub const MAX_HINT_BYTES: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hint {
    pub v: u8,
    pub kind: HintKind,
    /// The newest sequence number of the device's feed when the hint was sent.
    pub seq: FeedSeq,
}

impl Hint {
    pub fn new(kind: HintKind, seq: FeedSeq) -> Hint {
        Hint {
            v: HINT_VERSION,
            kind,
            seq,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HintKind {
    /// The feed grew (a job, a cancel, ...).
    Feed,
    /// The device connected while it had unacknowledged entries (push on connect).
    Pending,
    /// An administrator asks the device to poll now.
    PollNow,
    /// A kind this version does not know; the device treats it as `Feed`.
    #[serde(other)]
    Unknown,
}

/// What a device announces on its presence topic. It triggers push on connect and the
/// online/offline ops events; it is never trusted for anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    Online,
    Offline,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode};

    #[test]
    fn hint_is_small_and_round_trips() {
        let hint = Hint::new(HintKind::Feed, FeedSeq(u64::MAX));
        let bytes = encode(&hint).unwrap();
        assert!(bytes.len() < 32, "hint is {} bytes", bytes.len());
        assert_eq!(decode::<Hint>(&bytes).unwrap(), hint);
    }

    #[test]
    fn unknown_hint_kind_decodes_as_unknown() {
        #[derive(Serialize)]
        struct Future {
            v: u8,
            kind: &'static str,
            seq: u64,
        }
        let bytes = encode(&Future {
            v: 1,
            kind: "contract_changed",
            seq: 3,
        })
        .unwrap();
        assert_eq!(decode::<Hint>(&bytes).unwrap().kind, HintKind::Unknown);
    }
}
