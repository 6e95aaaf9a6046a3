//! Operations logins to the embedded broker: each may only watch ops events (`fleet/events/`),
//! is stored as a SHA-256 of its password, and can be revoked, after which it is refused and
//! its open sessions are closed. They replace logging in to MQTT with the admin token, which
//! opens the whole API.

use schemas::data::ErrorCode;
use schemas::records::OpsLoginRecord;
use schemas::{OpsId, UnixMillis};

use super::principals::PrincipalRecord;
use super::tx::{Access, Tx};
use super::{Core, CoreError, CoreResult, sha256_hex};
use crate::store::Ticket;

/// Why an ops login was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpsLoginFailure {
    /// No such login, or the wrong password.
    BadCredentials,
    Revoked,
}

/// A login whose secret is its password.
impl PrincipalRecord for OpsLoginRecord {
    type Id = OpsId;
    fn made(ops_id: OpsId, name: String, password_sha256: String, now: UnixMillis) -> Self {
        OpsLoginRecord {
            ops_id,
            name,
            password_sha256,
            created_at: now,
            revoked_at: None,
        }
    }
    fn insert(tx: &mut Tx<'_>, record: Self) -> CoreResult<()> {
        tx.insert_ops_login(record)
    }
}

impl Core {
    /// Whether the login exists and is not revoked.
    pub fn ops_login_active(&self, id: &OpsId) -> bool {
        self.with_registry(|r| r.ops_logins.get(id).is_some_and(|l| l.revoked_at.is_none()))
    }

    /// Every ops login, revoked ones included, oldest first.
    pub fn ops_logins(&self) -> Vec<OpsLoginRecord> {
        let mut all: Vec<OpsLoginRecord> =
            self.with_registry(|r| r.ops_logins.values().cloned().collect());
        all.sort_by_key(|r| (r.created_at, r.ops_id.as_str().to_owned()));
        all
    }

    /// Revokes a login; revoking it again changes nothing.
    pub fn revoke_ops_login(
        &self,
        ops_id: &OpsId,
        now: UnixMillis,
    ) -> CoreResult<(OpsLoginRecord, Ticket)> {
        let mut tx = Tx::new(self, Access::Write, &[]);
        let mut record = tx
            .ops_login(ops_id)?
            .cloned()
            .ok_or_else(|| CoreError::new(ErrorCode::NotFound, format!("no ops login {ops_id}")))?;
        if record.revoked_at.is_some() {
            return Ok((record, self.read_ticket()));
        }
        record.revoked_at = Some(now);
        tx.put_ops_login(record.clone())?;
        tx.commit_answer(record)
    }

    /// Checks an MQTT login as operations: the id as username, its password.
    pub fn authenticate_ops(
        &self,
        username: &str,
        password: &str,
    ) -> Result<OpsId, OpsLoginFailure> {
        let id = OpsId::parse(username).map_err(|_| OpsLoginFailure::BadCredentials)?;
        let presented = sha256_hex(password.as_bytes());
        self.with_registry(|r| {
            let record = r
                .ops_logins
                .get(&id)
                .ok_or(OpsLoginFailure::BadCredentials)?;
            if !broker::constant_time_eq(presented.as_bytes(), record.password_sha256.as_bytes()) {
                return Err(OpsLoginFailure::BadCredentials);
            }
            if record.revoked_at.is_some() {
                return Err(OpsLoginFailure::Revoked);
            }
            Ok(id.clone())
        })
    }
}

#[cfg(test)]
mod tests {
    use schemas::Secret;

    use super::*;
    use crate::core::NewPrincipal;
    use crate::core::tests::core;

    #[test]
    fn an_ops_login_works_until_revoked() {
        let core = core();
        let id = OpsId::parse("ops-00000000000000a1").unwrap();
        let password = Secret::new("pw");
        let new = NewPrincipal::new(id.clone(), "grafana", password);
        core.create_principal::<OpsLoginRecord>(&new, UnixMillis(1))
            .unwrap();
        assert_eq!(core.authenticate_ops(id.as_str(), "pw"), Ok(id.clone()));
        assert_eq!(
            core.authenticate_ops(id.as_str(), "wrong"),
            Err(OpsLoginFailure::BadCredentials)
        );
        assert_eq!(
            core.authenticate_ops("ops-00000000000000ff", "pw"),
            Err(OpsLoginFailure::BadCredentials)
        );
        core.revoke_ops_login(&id, UnixMillis(2)).unwrap();
        assert_eq!(
            core.authenticate_ops(id.as_str(), "pw"),
            Err(OpsLoginFailure::Revoked)
        );
        assert_eq!(core.ops_logins()[0].revoked_at, Some(UnixMillis(2)));
        assert!(core.ops_logins()[0].password_sha256 != "pw");
    }
}
