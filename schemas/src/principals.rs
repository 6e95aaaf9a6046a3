//! The admin API's bodies for the principals it creates: owners and their companions, users
//! of held printing, ops logins. Each secret is shown once, in the answer that creates it;
//! only its hash is stored. Re-exported from [`crate::api`] with the other API bodies.

use serde::{Deserialize, Serialize};

use crate::print::UserRecord;
use crate::records::CompanionRecord;
use crate::{CompanionId, DeviceId, OwnerId, Secret, UnixMillis, UserId};

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOwner {
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
}

/// `POST /v1/ops-logins`: an MQTT login for operations tools (dashboards, mosquitto_sub).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOpsLogin {
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OpsLoginCreated {
    /// The MQTT username.
    pub ops_id: crate::OpsId,
    pub name: String,
    /// The MQTT password. Shown once; only its hash is stored.
    pub password: Secret,
    pub created_at: UnixMillis,
}

/// An ops login as listed (no secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OpsLoginView {
    pub ops_id: crate::OpsId,
    pub name: String,
    pub created_at: UnixMillis,
    pub revoked_at: Option<UnixMillis>,
}

impl From<&crate::records::OpsLoginRecord> for OpsLoginView {
    fn from(r: &crate::records::OpsLoginRecord) -> OpsLoginView {
        OpsLoginView {
            ops_id: r.ops_id.clone(),
            name: r.name.clone(),
            created_at: r.created_at,
            revoked_at: r.revoked_at,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OwnerCreated {
    pub owner_id: OwnerId,
    pub name: String,
    /// The owner's API token. Shown once; only its hash is stored.
    pub token: Secret,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCompanion {
    /// "Anna's phone".
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CompanionCreated {
    pub companion_id: CompanionId,
    pub owner_id: OwnerId,
    pub name: String,
    /// The companion's API token. Shown once; only its hash is stored.
    pub token: Secret,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CompanionView {
    pub companion_id: CompanionId,
    pub owner_id: OwnerId,
    pub name: String,
    pub created_at: UnixMillis,
    pub devices: Vec<DeviceId>,
}

impl From<&CompanionRecord> for CompanionView {
    fn from(c: &CompanionRecord) -> CompanionView {
        CompanionView {
            companion_id: c.companion_id.clone(),
            owner_id: c.owner_id.clone(),
            name: c.name.clone(),
            created_at: c.created_at,
            devices: c.devices.clone(),
        }
    }
}

/// `POST /v1/users`: a person who prints with held jobs (logs in at devices with the PIN).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    #[schemars(with = "String", length(min = 4, max = 32))]
    pub pin: Secret,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UserCreated {
    pub user_id: UserId,
    pub name: String,
    /// The user's API token (shown once): submits to and reads their own virtual printer.
    pub token: Secret,
}

/// A user of held printing as the API lists them (never their PIN or token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UserView {
    pub user_id: UserId,
    pub name: String,
    pub created_at: UnixMillis,
}

impl From<&UserRecord> for UserView {
    fn from(u: &UserRecord) -> UserView {
        UserView {
            user_id: u.user_id.clone(),
            name: u.name.clone(),
            created_at: u.created_at,
        }
    }
}
