//! Who may call the API, and for which devices: owners, and the companions (phones, PCs) an
//! owner links to their devices.
//!
//! - The administrator (the admin token) may do everything.
//! - An owner (created by the administrator) may create companions, link them to devices the
//!   owner was bound to at registration, and submit jobs to those devices.
//! - A companion may submit jobs to the devices it is linked to, once the device has completed
//!   its registration, and read the jobs it submitted.

use schemas::data::ErrorCode;
use schemas::records::{CompanionRecord, OwnerRecord};
use schemas::{CompanionId, DeviceId, OwnerId, Secret, UnixMillis};

use super::state::Registry;
use super::tx::{Access, Tx};
use super::{Core, CoreError, CoreResult, check_name, sha256_hex};
use crate::store::Ticket;

/// The caller of an API request, as its bearer token identifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Admin,
    Owner(OwnerId),
    Companion(CompanionId),
    /// A person who prints with held jobs: their own virtual printer and jobs only.
    User(schemas::UserId),
}

impl Principal {
    /// How jobs record who submitted them.
    pub fn label(&self) -> String {
        match self {
            Principal::Admin => "admin".into(),
            Principal::Owner(id) => format!("owner:{id}"),
            Principal::Companion(id) => format!("companion:{id}"),
            Principal::User(id) => format!("user:{id}"),
        }
    }
}

/// A principal about to be created: its id, its name, and the bearer secret it will prove
/// itself with (shown to the caller once; only its SHA-256 is stored).
#[derive(Debug, Clone)]
pub struct NewPrincipal<I> {
    pub id: I,
    pub name: String,
    pub secret: Secret,
}

impl<I: Clone> NewPrincipal<I> {
    pub fn new(id: I, name: impl Into<String>, secret: Secret) -> NewPrincipal<I> {
        NewPrincipal {
            id,
            name: name.into(),
            secret,
        }
    }

    /// What every record of a principal keeps: the id, the name (checked) and the secret's
    /// hash.
    pub(super) fn checked(&self) -> CoreResult<(I, String, String)> {
        check_name(&self.name)?;
        let hash = sha256_hex(self.secret.expose().as_bytes());
        Ok((self.id.clone(), self.name.clone(), hash))
    }
}

/// The record of a principal made from a [`NewPrincipal`] alone (an owner, an ops login; a
/// companion also names its owner, a user also has a PIN).
pub(crate) trait PrincipalRecord: Clone {
    type Id: Clone;
    /// The record of a principal with this id and name whose secret has this SHA-256.
    fn made(id: Self::Id, name: String, secret_sha256: String, now: UnixMillis) -> Self;
    /// Stages the new record; refused when its id is taken.
    fn insert(tx: &mut Tx<'_>, record: Self) -> CoreResult<()>;
}

impl PrincipalRecord for OwnerRecord {
    type Id = OwnerId;
    fn made(owner_id: OwnerId, name: String, token_sha256: String, now: UnixMillis) -> Self {
        OwnerRecord {
            owner_id,
            name,
            token_sha256,
            created_at: now,
        }
    }
    fn insert(tx: &mut Tx<'_>, record: Self) -> CoreResult<()> {
        tx.insert_owner(record)
    }
}

impl Core {
    /// The principal a bearer token (not the admin token) belongs to.
    pub fn principal(&self, token: &str) -> Option<Principal> {
        let hash = sha256_hex(token.as_bytes());
        self.with_registry(|r| r.tokens.get(&hash).cloned())
    }

    /// Creates an owner or an ops login from `new`; refused as a conflict when its id is
    /// taken (ids are drawn at random, 64 bits).
    pub(crate) fn create_principal<R: PrincipalRecord>(
        &self,
        new: &NewPrincipal<R::Id>,
        now: UnixMillis,
    ) -> CoreResult<(R, Ticket)> {
        let (id, name, secret_sha256) = new.checked()?;
        self.create(R::made(id, name, secret_sha256, now), R::insert)
    }

    pub fn owner_exists(&self, owner_id: &OwnerId) -> bool {
        self.with_registry(|r| r.owners.contains_key(owner_id))
    }

    /// A companion of `owner_id`, linked to none of its devices yet.
    pub fn create_companion(
        &self,
        owner_id: &OwnerId,
        new: &NewPrincipal<CompanionId>,
        now: UnixMillis,
    ) -> CoreResult<(CompanionRecord, Ticket)> {
        let (companion_id, name, token_sha256) = new.checked()?;
        let record = CompanionRecord {
            companion_id,
            owner_id: owner_id.clone(),
            name,
            token_sha256,
            created_at: now,
            devices: Vec::new(),
        };
        self.create(record, |tx, record| {
            if tx.owner(owner_id)?.is_none() {
                return Err(CoreError::new(
                    ErrorCode::NotFound,
                    format!("no owner {owner_id}"),
                ));
            }
            tx.insert_companion(record)
        })
    }

    /// The companion, if `principal` may see it (the administrator, its owner, itself).
    pub fn companion(
        &self,
        principal: &Principal,
        id: &CompanionId,
    ) -> CoreResult<CompanionRecord> {
        self.with_registry(|r| visible_companion(r, principal, id).cloned())
    }

    /// Links (or, with `linked` false, unlinks) a companion and a device of the same owner.
    pub fn link_companion(
        &self,
        principal: &Principal,
        companion_id: &CompanionId,
        device_id: &DeviceId,
        linked: bool,
    ) -> CoreResult<(CompanionRecord, Ticket)> {
        let mut tx = Tx::new(self, Access::Write, &[device_id]);
        let mut companion = visible_companion(tx.registry()?, principal, companion_id)?.clone();
        if let Principal::Companion(_) = principal {
            return Err(CoreError::new(
                ErrorCode::Forbidden,
                "only the owner links companions to devices",
            ));
        }
        let device = tx.device(device_id)?;
        let owned = device
            .owner
            .as_ref()
            .is_some_and(|o| o.owner_id == companion.owner_id);
        if !owned {
            return Err(CoreError::new(
                ErrorCode::Forbidden,
                format!(
                    "device {device_id} is not bound to owner {}",
                    companion.owner_id
                ),
            ));
        }
        let present = companion.devices.contains(device_id);
        if present == linked {
            return Ok((companion, self.read_ticket()));
        }
        if linked {
            companion.devices.push(device_id.clone());
        } else {
            companion.devices.retain(|d| d != device_id);
        }
        tx.put_companion(companion.clone())?;
        tx.commit_answer(companion)
    }

    /// Whether `principal` may submit a job to `device_id`; a clear refusal if not.
    pub fn authorize_submit(&self, principal: &Principal, device_id: &DeviceId) -> CoreResult<()> {
        let tx = Tx::new(self, Access::Read, &[device_id]);
        let device = tx.device(device_id)?;
        let owner = match principal {
            Principal::Admin => return Ok(()),
            Principal::Owner(owner) => owner.clone(),
            Principal::Companion(id) => {
                let companion = visible_companion(tx.registry()?, principal, id)?;
                if !companion.devices.contains(device_id) {
                    return Err(CoreError::new(
                        ErrorCode::Forbidden,
                        format!("companion {id} is not linked to device {device_id}"),
                    ));
                }
                companion.owner_id.clone()
            }
            Principal::User(_) => {
                return Err(CoreError::new(
                    ErrorCode::Forbidden,
                    "users print through their virtual printer (held jobs), not to a device",
                ));
            }
        };
        if device.owner.as_ref().is_none_or(|o| o.owner_id != owner) {
            return Err(CoreError::new(
                ErrorCode::Forbidden,
                format!("device {device_id} is not bound to owner {owner}"),
            ));
        }
        if device.registration_completed_at.is_none() {
            return Err(CoreError::new(
                ErrorCode::RegistrationIncomplete,
                format!(
                    "device {device_id} has not completed its registration; jobs from \
                     companions are accepted once it has"
                ),
            ));
        }
        Ok(())
    }

    /// The job, if `principal` may read it (the administrator, the device's owner, or the
    /// companion or user that submitted it); open or finished.
    pub fn readable_job(
        &self,
        principal: &Principal,
        job_id: &schemas::JobId,
    ) -> CoreResult<schemas::records::JobRecord> {
        let job = self.job(job_id)?;
        let owner = || {
            self.with_shard(&job.device_id, |s| {
                s.devices.get(&job.device_id).and_then(|d| d.owner.clone())
            })
        };
        if may_read(principal, &job, owner) {
            Ok(job)
        } else {
            Err(hidden_job(job_id))
        }
    }

    /// The device has stored its credentials. Idempotent.
    pub fn complete_registration(
        &self,
        device_id: &DeviceId,
        now: UnixMillis,
    ) -> CoreResult<(UnixMillis, Ticket)> {
        let mut tx = self.device_tx(device_id);
        let device = tx.active_device(device_id)?;
        if let Some(at) = device.registration_completed_at {
            return Ok((at, self.read_ticket()));
        }
        let mut device = device.clone();
        device.registration_completed_at = Some(now);
        tx.put_device(device)?;
        tx.commit_answer(now)
    }
}

impl Tx<'_> {
    /// [`Core::authorize_job_read`] within a transaction that holds the job's shard.
    pub(super) fn authorize_job_read(
        &self,
        principal: &Principal,
        job_id: &schemas::JobId,
    ) -> CoreResult<()> {
        let job = self.job(job_id)?;
        let owner = || {
            self.device(&job.device_id)
                .ok()
                .and_then(|d| d.owner.clone())
        };
        if may_read(principal, job, owner) {
            Ok(())
        } else {
            Err(hidden_job(job_id))
        }
    }
}

fn may_read(
    principal: &Principal,
    job: &schemas::records::JobRecord,
    owner: impl FnOnce() -> Option<schemas::records::OwnerBinding>,
) -> bool {
    match principal {
        Principal::Admin => true,
        Principal::Owner(id) => owner().is_some_and(|o| o.owner_id == *id),
        Principal::Companion(_) | Principal::User(_) => {
            job.submitted_by.as_deref() == Some(&principal.label())
        }
    }
}

/// The same answer as for a job that does not exist: ids are not probed.
fn hidden_job(job_id: &schemas::JobId) -> CoreError {
    CoreError::new(ErrorCode::NotFound, format!("no job {job_id}"))
}

/// The companion, if `principal` may see it (the administrator, its owner, itself).
fn visible_companion<'r>(
    reg: &'r Registry,
    principal: &Principal,
    id: &CompanionId,
) -> CoreResult<&'r CompanionRecord> {
    let companion = reg
        .companions
        .get(id)
        .ok_or_else(|| CoreError::new(ErrorCode::NotFound, format!("no companion {id}")))?;
    match principal {
        Principal::Admin => Ok(companion),
        Principal::Owner(o) if *o == companion.owner_id => Ok(companion),
        Principal::Companion(c) if c == id => Ok(companion),
        _ => Err(CoreError::new(
            ErrorCode::Forbidden,
            format!("companion {id} belongs to another owner"),
        )),
    }
}
