//! Poll-now nudges passed on over the customer's LAN as a tree, so many devices poll soon
//! without all hitting the server at the same instant.
//!
//! The cloud plans the tree: each node names a device, its LAN endpoint, how long it waits
//! after receiving the nudge before it polls (its place in the stagger), and the devices it
//! passes the nudge on to. Every node carries a token only the cloud can make: HMAC-SHA256,
//! keyed with the SHA-256 of the device's secret (which the device can compute and the cloud
//! stores), over the nudge id, the device id, the expiry and the delay. A device accepts a
//! nudge only with its own valid token, before the expiry, and once per nudge id.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{DeviceId, UnixMillis};

/// Largest nudge a device reads from its LAN endpoint.
pub const MAX_NUDGE_BYTES: usize = 256 * 1024;

/// A nudge as one device receives it: its own node, with the subtree below it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Nudge {
    /// 32 hex digits, new for every poll-now.
    pub nudge_id: String,
    /// Not accepted after this time.
    pub not_after: UnixMillis,
    pub node: NudgeNode,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NudgeNode {
    pub device_id: DeviceId,
    /// The device's LAN endpoint, `host:port`.
    pub lan: String,
    /// How long the device waits, after receiving the nudge, before it polls.
    pub delay_ms: u32,
    /// Hex HMAC-SHA256; see [`token`].
    pub token: String,
    pub children: Vec<NudgeNode>,
}

/// What a device answers on its LAN endpoint, one JSON line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NudgeAnswer {
    Accepted,
    Refused { reason: String },
}

/// The key of a device's nudge tokens: the SHA-256 of its secret, hex (what the cloud stores).
pub fn device_key(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The token of one node.
pub fn token(
    key: &str,
    nudge_id: &str,
    device: &DeviceId,
    not_after: UnixMillis,
    delay_ms: u32,
) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(format!("poll-now|{nudge_id}|{device}|{}|{delay_ms}", not_after.0).as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `node`'s token is the one the cloud would make for it (constant time).
pub fn verify(key: &str, nudge_id: &str, not_after: UnixMillis, node: &NudgeNode) -> bool {
    let expected = token(key, nudge_id, &node.device_id, not_after, node.delay_ms);
    expected.len() == node.token.len()
        && expected
            .bytes()
            .zip(node.token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

impl NudgeNode {
    /// Every node of the tree, depth first.
    pub fn walk(&self) -> Vec<&NudgeNode> {
        let mut out = vec![self];
        for child in &self.children {
            out.extend(child.walk());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_bind_every_field() {
        let key = device_key("secret");
        let dev = DeviceId::from_random([1; 8]);
        let t = token(&key, "n1", &dev, UnixMillis(10), 250);
        let node = |delay_ms, token: &str| NudgeNode {
            device_id: dev.clone(),
            lan: "127.0.0.1:1".into(),
            delay_ms,
            token: token.into(),
            children: vec![],
        };
        assert!(verify(&key, "n1", UnixMillis(10), &node(250, &t)));
        assert!(!verify(&key, "n2", UnixMillis(10), &node(250, &t)));
        assert!(!verify(&key, "n1", UnixMillis(11), &node(250, &t)));
        assert!(!verify(&key, "n1", UnixMillis(10), &node(0, &t)));
        assert!(!verify(
            &device_key("other"),
            "n1",
            UnixMillis(10),
            &node(250, &t)
        ));
        assert!(!verify(&key, "n1", UnixMillis(10), &node(250, "00")));
    }
}
