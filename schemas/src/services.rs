//! Services a customer's devices can use, the applications that enroll devices in them, and
//! the instruction mailbox that carries the use-start instruction to each device.
//!
//! The flow: the administrator applies for a service for some of a customer's devices; for each
//! one the cloud puts a use-start instruction in its mailbox (an entry in its feed) holding the
//! service's registration URL and a one-time registration code. The device takes the
//! instruction (the cloud notes when) and calls the URL over its data channel with the code; the
//! cloud records the device as permitted to use the service only if the code is the one issued
//! to that device, unused and not expired.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{ApplicationId, DeviceId, InstructionId, Secret, UnixMillis};

/// Longest service id.
pub const MAX_SERVICE_ID_LEN: usize = 64;
/// Most models one service lists.
pub const MAX_SERVICE_MODELS: usize = 256;
/// Refused registration attempts kept per device and application.
pub const MAX_REFUSALS: usize = 8;

/// Checks a service id chosen by the administrator: 1 to 64 of `a-z`, `0-9` and `-`, e.g.
/// `toner-delivery` (it appears in URLs and topics).
pub fn check_service_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= MAX_SERVICE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "service id {:?} must be 1 to {MAX_SERVICE_ID_LEN} of a-z, 0-9 and -",
            id.chars().take(80).collect::<String>()
        ))
    }
}

/// The URL a device calls (over its data channel) to register for `service_id`.
pub fn registration_url(service_id: &str) -> String {
    format!("/v1/services/{service_id}/register")
}

/// The service a registration URL names, if it is one.
pub fn service_of_url(url: &str) -> Option<&str> {
    let id = url
        .strip_prefix("/v1/services/")?
        .strip_suffix("/register")?;
    check_service_id(id).ok().map(|()| id)
}

/// `s/{service_id}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ServiceRecord {
    pub service_id: String,
    pub name: String,
    /// The device models the service applies to.
    pub models: Vec<String>,
    pub created_at: UnixMillis,
    /// For support services: what kind of support (`consumables`, ...). A device has at most one
    /// contract of a kind: contracting another provider of the same kind replaces it.
    #[serde(default)]
    pub kind: String,
    /// The device information a support service needs (the device control information), e.g.
    /// `cartridge_type`, `colour`, `level`. A device reports exactly these, nothing else.
    #[serde(default)]
    pub data_types: Vec<String>,
    /// How often the device reports them besides on events, in seconds (0: on events only).
    #[serde(default)]
    pub report_every_secs: u32,
}

/// `k/{device_id}/{service_id}`: the contract (application) information of one device for one
/// support service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ContractRecord {
    pub device_id: DeviceId,
    pub service_id: String,
    /// The contract's application id; empty: no contract, or canceled.
    pub application_id: String,
    /// A short description for the device's panel.
    pub outline: String,
    pub changed_at: UnixMillis,
    /// When the device activated the service under this application id.
    pub activated_at: Option<UnixMillis>,
}

/// A contract as the device is told it (with what it needs to decide whether to activate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ContractInfo {
    pub service_id: String,
    pub kind: String,
    /// Empty: no contract, or canceled.
    pub application_id: String,
    pub outline: String,
    /// The models the service supports.
    pub models: Vec<String>,
}

/// What an activated support service needs from the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeviceControl {
    pub service_id: String,
    pub data_types: Vec<String>,
    pub report_every_secs: u32,
}

/// What an instruction tells the device to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InstructionBody {
    /// Start using a service: call `registration_url` over the data channel with the code.
    UseStart {
        service_id: String,
        application_id: ApplicationId,
        registration_url: String,
        registration_code: Secret,
    },
    /// Pass a poll-now nudge on over the LAN: the device is the root of the tree.
    RelayNudge { nudge: crate::nudge::Nudge },
    /// An instruction for the device maker's own handling (`name` and plain parameters).
    Custom {
        name: String,
        params: BTreeMap<String, String>,
    },
    /// A kind this version does not know: taken, and not acted on.
    #[serde(other)]
    Unknown,
}

impl InstructionBody {
    pub fn kind(&self) -> &'static str {
        match self {
            InstructionBody::UseStart { .. } => "use_start",
            InstructionBody::RelayNudge { .. } => "relay_nudge",
            InstructionBody::Custom { .. } => "custom",
            InstructionBody::Unknown => "unknown",
        }
    }

    /// The body with any registration code blanked, for views and logs.
    pub fn redacted(&self) -> InstructionBody {
        let mut body = self.clone();
        if let InstructionBody::UseStart {
            registration_code, ..
        } = &mut body
        {
            *registration_code = Secret::new("");
        }
        body
    }
}

/// `i/{instruction_id}`: one instruction in a device's mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct InstructionRecord {
    pub instruction_id: InstructionId,
    pub device_id: DeviceId,
    pub body: InstructionBody,
    pub created_at: UnixMillis,
    /// Not handed out after this time: a device that did not take it by then never acts on it.
    pub expires_at: UnixMillis,
    /// When the device took it.
    pub taken_at: Option<UnixMillis>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum InstructionState {
    Waiting,
    Taken,
    Expired,
}

impl InstructionRecord {
    pub fn state(&self, now: UnixMillis) -> InstructionState {
        match self.taken_at {
            Some(_) => InstructionState::Taken,
            None if now > self.expires_at => InstructionState::Expired,
            None => InstructionState::Waiting,
        }
    }
}

/// An instruction as the device receives it when it takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct InstructionOffer {
    pub instruction_id: InstructionId,
    pub body: InstructionBody,
    pub created_at: UnixMillis,
    pub expires_at: UnixMillis,
    pub taken_at: UnixMillis,
}

/// `a/{application_id}`: a customer's application for a service and how each device fares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ApplicationRecord {
    pub application_id: ApplicationId,
    pub customer: String,
    pub service_id: String,
    pub created_at: UnixMillis,
    /// The registration codes (and the use-start instructions) expire at this time.
    pub expires_at: UnixMillis,
    pub devices: Vec<Enrollment>,
}

/// One device of an application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Enrollment {
    pub device_id: DeviceId,
    pub model: String,
    pub instruction_id: InstructionId,
    /// SHA-256 of the registration code, hex; the code itself is only in the instruction.
    pub code_sha256: String,
    pub registered_at: Option<UnixMillis>,
    /// Refused attempts, oldest first (the newest [`MAX_REFUSALS`]).
    pub refusals: Vec<RefusedRegistration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RefusedRegistration {
    pub at: UnixMillis,
    pub reason: String,
}

/// Where one device of an application stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum EnrollmentState {
    /// The device has not registered yet.
    Pending,
    Registered {
        at: UnixMillis,
    },
    /// The newest attempt was refused, or the code expired unused.
    Failed {
        reason: String,
    },
}

impl Enrollment {
    pub fn state(&self, expires_at: UnixMillis, now: UnixMillis) -> EnrollmentState {
        if let Some(at) = self.registered_at {
            return EnrollmentState::Registered { at };
        }
        if let Some(refused) = self.refusals.last() {
            return EnrollmentState::Failed {
                reason: refused.reason.clone(),
            };
        }
        if now > expires_at {
            return EnrollmentState::Failed {
                reason: "the registration code expired before the device used it".into(),
            };
        }
        EnrollmentState::Pending
    }
}

/// A service a device is permitted to use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ServiceUse {
    pub service_id: String,
    pub application_id: ApplicationId,
    pub since: UnixMillis,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_ids_and_urls() {
        assert!(check_service_id("toner-delivery").is_ok());
        for bad in ["", "Toner", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_service_id(bad).is_err(), "{bad}");
        }
        let url = registration_url("toner-delivery");
        assert_eq!(service_of_url(&url), Some("toner-delivery"));
        assert_eq!(service_of_url("/v1/services/../register"), None);
        assert_eq!(service_of_url("https://elsewhere/register"), None);
    }

    #[test]
    fn enrollment_state() {
        let mut e = Enrollment {
            device_id: DeviceId::from_random([1; 8]),
            model: "M".into(),
            instruction_id: InstructionId::from_random([1; 8]),
            code_sha256: String::new(),
            registered_at: None,
            refusals: vec![],
        };
        let expires = UnixMillis(100);
        assert_eq!(e.state(expires, UnixMillis(50)), EnrollmentState::Pending);
        assert!(matches!(
            e.state(expires, UnixMillis(150)),
            EnrollmentState::Failed { .. }
        ));
        e.refusals.push(RefusedRegistration {
            at: UnixMillis(60),
            reason: "wrong registration code".into(),
        });
        assert_eq!(
            e.state(expires, UnixMillis(70)),
            EnrollmentState::Failed {
                reason: "wrong registration code".into()
            }
        );
        e.registered_at = Some(UnixMillis(80));
        assert_eq!(
            e.state(expires, UnixMillis(150)),
            EnrollmentState::Registered { at: UnixMillis(80) }
        );
    }

    #[test]
    fn redaction_blanks_the_code() {
        let body = InstructionBody::UseStart {
            service_id: "s".into(),
            application_id: ApplicationId::from_random([2; 8]),
            registration_url: registration_url("s"),
            registration_code: Secret::new("code"),
        };
        let InstructionBody::UseStart {
            registration_code, ..
        } = body.redacted()
        else {
            panic!()
        };
        assert_eq!(registration_code.expose(), "");
    }
}
