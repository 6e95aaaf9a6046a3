//! Identifier newtypes.
//!
//! Device and job ids are short lowercase strings with a kind prefix (`dev-…`, `job-…`), so they
//! read well in logs and topics and are safe as MQTT topic levels and storage key parts: they
//! never contain `/`, `+`, `#` or whitespace. Deserializing validates them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind}: {value:?} (expected {expected})")]
pub struct IdError {
    kind: &'static str,
    value: String,
    expected: &'static str,
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;
            const EXPECTED: &'static str = concat!($prefix, " followed by 16 lowercase hex digits");

            /// Builds an id from 8 random bytes.
            pub fn from_random(bytes: [u8; 8]) -> Self {
                Self(format!("{}{}", Self::PREFIX, hex(&bytes)))
            }

            /// Parses and validates an id.
            pub fn parse(value: &str) -> Result<Self, IdError> {
                let valid = value
                    .strip_prefix(Self::PREFIX)
                    .is_some_and(|rest| {
                        rest.len() == 16
                            && rest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                    });
                if valid {
                    Ok(Self(value.to_owned()))
                } else {
                    Err(IdError { kind: $kind, value: value.chars().take(64).collect(), expected: Self::EXPECTED })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::parse(&value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "pattern": concat!("^", $prefix, "[0-9a-f]{16}$"),
                    "description": concat!("A ", $kind, ": ", $prefix, " followed by 16 lowercase hex digits."),
                })
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
    };
}

prefixed_id!(
    /// A registered device. Also its MQTT client id and username.
    DeviceId, "dev-", "device id"
);
prefixed_id!(
    /// A job, unique across all devices.
    JobId, "job-", "job id"
);
prefixed_id!(
    /// The person or organisation a device belongs to; bound to the device at registration.
    OwnerId, "own-", "owner id"
);
prefixed_id!(
    /// A phone or PC an owner has allowed to submit jobs to some of their devices.
    CompanionId, "cmp-", "companion id"
);

prefixed_id!(
    /// A person who prints: their jobs wait in their virtual printer until they release them
    /// at a device.
    UserId, "usr-", "user id"
);
prefixed_id!(
    /// An operations login to the embedded broker (read-only ops events); its MQTT username.
    OpsId, "ops-", "ops login id"
);
prefixed_id!(
    /// A customer's application for a service, covering some of its devices.
    ApplicationId, "app-", "application id"
);
prefixed_id!(
    /// An instruction in a device's mailbox.
    InstructionId, "ins-", "instruction id"
);

/// A number that counts up from 1 per device, with 0 for "nothing yet": [`FeedSeq`] and
/// [`crate::outbox::RequestNo`].
macro_rules! counter {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize,
            Deserialize, schemars::JsonSchema,)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl $name {
            pub const ZERO: $name = $name(0);

            pub fn next(self) -> $name {
                $name(self.0 + 1)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}
pub(crate) use counter;

counter!(
    /// Position in a device's feed. The first entry has sequence 1; 0 means "nothing yet".
    FeedSeq
);

/// Correlates a data-channel request with its response; chosen by the device, unique per
/// connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct RequestId(pub u32);

/// Milliseconds since the Unix epoch, UTC.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(transparent)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    pub fn now() -> UnixMillis {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        UnixMillis(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn saturating_add_ms(self, ms: u64) -> UnixMillis {
        UnixMillis(self.0.saturating_add(ms))
    }

    pub fn saturating_sub_ms(self, ms: u64) -> UnixMillis {
        UnixMillis(self.0.saturating_sub(ms))
    }
}

/// A secret (device secret, enrollment token, admin token). `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// A fresh secret from 32 random bytes, hex encoded.
    pub fn from_random(bytes: [u8; 32]) -> Secret {
        Secret(hex(&bytes))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_bad_shapes() {
        let id = DeviceId::from_random([0xab; 8]);
        assert_eq!(id.as_str(), "dev-abababababababab");
        assert_eq!(DeviceId::parse(id.as_str()), Ok(id.clone()));
        for bad in [
            "",
            "dev-",
            "dev-ABABABABABABABAB",
            "job-abababababababab",
            "dev-abababababababab/x",
            "dev-+bababababababab",
        ] {
            assert!(DeviceId::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
