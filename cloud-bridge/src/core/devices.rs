//! Devices: enrollment tokens, registration, credentials, status, and the per-device feed.

use schemas::data::{DeviceStatus, ErrorCode, Registration};
use schemas::feed::FeedEntry;
use schemas::ops::OpsEvent;
use schemas::records::{DeviceRecord, EnrollmentRecord, OwnerBinding};
use schemas::{DeviceId, FeedSeq, Secret, UnixMillis};
use sha2::{Digest, Sha256};

use super::keys::{Kind, device_range_end, feed_key};
use super::tx::{Access, Tx};
use super::{
    AuthFailure, Core, CoreError, CoreResult, Effects, check_active, decode, hex, owner_pin_hash,
    requests, sha256_hex,
};
use crate::store::Ticket;

impl Core {
    /// A transaction on one device's shard.
    pub(super) fn device_tx(&self, id: &DeviceId) -> Tx<'_> {
        Tx::new(self, Access::None, &[id])
    }

    pub fn create_enrollment(
        &self,
        token: Secret,
        customer: String,
        max_uses: u32,
        ttl_ms: u64,
        now: UnixMillis,
    ) -> CoreResult<(EnrollmentRecord, Ticket)> {
        if !(1..=128).contains(&customer.chars().count()) {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                "customer must be 1 to 128 characters",
            ));
        }
        if max_uses == 0 {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                "max_uses must be at least 1",
            ));
        }
        let record = EnrollmentRecord {
            token_sha256: sha256_hex(token.expose().as_bytes()),
            customer,
            created_at: now,
            expires_at: now.saturating_add_ms(ttl_ms),
            uses_left: max_uses,
        };
        self.create(record, Tx::put_enrollment)
    }

    /// Registers a device with an enrollment token; the caller generated `device_id` and
    /// `secret` (only the secret's hash is kept).
    pub fn register(
        &self,
        reg: &Registration,
        device_id: DeviceId,
        secret: &Secret,
        now: UnixMillis,
    ) -> CoreResult<(DeviceRecord, Ticket, Effects)> {
        for (name, value, max) in [
            ("serial", &reg.serial, 64),
            ("model", &reg.model, 64),
            ("destination", &reg.destination, 32),
            ("time_zone", &reg.time_zone, 64),
        ] {
            if value.trim().is_empty() || value.len() > max {
                return Err(CoreError::new(
                    ErrorCode::BadRequest,
                    format!("{name} must be 1 to {max} characters"),
                ));
            }
        }
        let token_hash = sha256_hex(reg.enrollment_token.expose().as_bytes());
        // With a registration id the device id follows from it, so a repeat finds the
        // device in the same shard.
        let (registration, device_id) = match registration_key(reg, &token_hash)? {
            Some((key, derived)) => (Some(key), derived),
            None => (None, device_id),
        };
        let owner = match &reg.owner {
            None => None,
            Some(claim) => {
                let pin = claim.pin.expose();
                if pin.len() < 4 || pin.len() > 64 {
                    return Err(CoreError::new(
                        ErrorCode::BadRequest,
                        "owner PIN must be 4 to 64 characters",
                    ));
                }
                Some(OwnerBinding {
                    owner_id: claim.owner_id.clone(),
                    pin_sha256: owner_pin_hash(&device_id, pin),
                })
            }
        };
        let secret_sha256 = sha256_hex(secret.expose().as_bytes());
        let mut tx = Tx::new(self, Access::Write, &[&device_id]);
        let Some(enrollment) = tx.enrollment(&token_hash)? else {
            return Err(CoreError::new(
                ErrorCode::EnrollmentInvalid,
                "unknown enrollment token",
            ));
        };
        let mut enrollment = enrollment.clone();
        if let Ok(existing) = tx.device(&device_id) {
            let same = registration.is_some() && existing.registration_sha256 == registration;
            if !same {
                return Err(CoreError::new(
                    ErrorCode::Conflict,
                    "device id collision; retry",
                ));
            }
            if existing.registration_completed_at.is_some() {
                return Err(CoreError::new(
                    ErrorCode::Conflict,
                    "this registration is complete (the device confirmed storing its \
                     credentials); registering again needs a new registration_id",
                ));
            }
            // The same registration again: its answer was lost, or the device did not keep
            // it. The same device, with the new secret; the token is not used again.
            let mut device = existing.clone();
            check_active(&device)?;
            device.secret_sha256 = secret_sha256;
            tx.put_device(device.clone())?;
            let (ticket, effects) = tx.commit()?;
            return Ok((device, ticket, effects));
        }
        if enrollment.expires_at <= now {
            return Err(CoreError::new(
                ErrorCode::EnrollmentInvalid,
                "enrollment token expired",
            ));
        }
        if enrollment.uses_left == 0 {
            return Err(CoreError::new(
                ErrorCode::EnrollmentInvalid,
                "enrollment token already used up",
            ));
        }
        if let Some(binding) = &owner
            && tx.owner(&binding.owner_id)?.is_none()
        {
            return Err(CoreError::new(
                ErrorCode::EnrollmentInvalid,
                format!("unknown owner {}", binding.owner_id),
            ));
        }
        let device = DeviceRecord {
            device_id: device_id.clone(),
            serial: reg.serial.clone(),
            model: reg.model.clone(),
            destination: reg.destination.clone(),
            time_zone: reg.time_zone.clone(),
            customer: enrollment.customer.clone(),
            secret_sha256,
            registered_at: now,
            disabled: false,
            newest: FeedSeq::ZERO,
            acked: FeedSeq::ZERO,
            last_status: None,
            last_status_at: None,
            delivered: Default::default(),
            consent: None,
            consent_changes: Vec::new(),
            owner,
            registration_completed_at: None,
            owner_check: None,
            invalidated: None,
            settings: None,
            settings_reported: None,
            services: Vec::new(),
            printer: None,
            counters: None,
            registration_sha256: registration,
        };
        enrollment.uses_left -= 1;
        tx.put_device(device.clone())?;
        tx.put_enrollment(enrollment)?;
        tx.effects.events.push(OpsEvent::DeviceRegistered {
            device_id,
            serial: device.serial.clone(),
            model: device.model.clone(),
            at: now,
        });
        let (ticket, effects) = tx.commit()?;
        Ok((device, ticket, effects))
    }

    /// Checks a device's credentials. Read-only; the hash is computed outside the lock.
    pub fn authenticate(&self, device_id: &str, secret: &str) -> Result<DeviceRecord, AuthFailure> {
        let id = DeviceId::parse(device_id).map_err(|_| AuthFailure::UnknownDevice)?;
        let actual = sha256_hex(secret.as_bytes());
        self.with_shard(&id, |shard| {
            let device = shard.devices.get(&id).ok_or(AuthFailure::UnknownDevice)?;
            if !broker::constant_time_eq(actual.as_bytes(), device.secret_sha256.as_bytes()) {
                return Err(AuthFailure::WrongSecret);
            }
            if device.invalidated.is_some() {
                return Err(AuthFailure::Invalidated);
            }
            if device.disabled {
                return Err(AuthFailure::Disabled);
            }
            Ok(device.clone())
        })
    }

    pub fn device(&self, id: &DeviceId) -> CoreResult<DeviceRecord> {
        self.with_shard(id, |shard| {
            shard
                .devices
                .get(id)
                .cloned()
                .ok_or_else(|| CoreError::new(ErrorCode::NotFound, format!("no device {id}")))
        })
    }

    /// Every device, in no particular order.
    pub fn devices(&self) -> Vec<DeviceRecord> {
        self.devices_where(|_| true)
    }

    /// Every device `keep` accepts, in no particular order.
    pub(super) fn devices_where(&self, keep: impl Fn(&DeviceRecord) -> bool) -> Vec<DeviceRecord> {
        let mut all = Vec::new();
        self.each_shard(|s| all.extend(s.devices.values().filter(|d| keep(d)).cloned()));
        all
    }

    /// Why `id` may no longer use its connections, if it may not (or does not exist).
    pub fn check_active(&self, id: &DeviceId) -> CoreResult<()> {
        self.with_shard(id, |shard| match shard.devices.get(id) {
            Some(device) => check_active(device),
            None => Err(CoreError::new(
                ErrorCode::NotFound,
                format!("no device {id}"),
            )),
        })
    }

    pub fn disable_device(
        &self,
        id: &DeviceId,
        now: UnixMillis,
    ) -> CoreResult<(DeviceRecord, Ticket, Effects)> {
        let mut tx = self.device_tx(id);
        let mut device = tx.device(id)?.clone();
        if device.disabled {
            return Ok((device, self.read_ticket(), Effects::default()));
        }
        device.disabled = true;
        tx.put_device(device.clone())?;
        tx.effects.events.push(OpsEvent::DeviceDisabled {
            device_id: id.clone(),
            at: now,
        });
        let (ticket, effects) = tx.commit()?;
        Ok((device, ticket, effects))
    }

    pub fn report_status(
        &self,
        id: &DeviceId,
        status: DeviceStatus,
        now: UnixMillis,
    ) -> CoreResult<(Ticket, Effects)> {
        requests::check_status(&status).map_err(CoreError::Refused)?;
        let mut tx = self.device_tx(id);
        let mut device = tx.active_device(id)?.clone();
        requests::check_consent(&device)?;
        let event = requests::apply_status(&mut device, status, now);
        tx.put_device(device)?;
        tx.effects.events.push(event);
        tx.commit()
    }

    /// The device registers (or updates) its printer queue. Unchanged: nothing is written.
    pub fn register_printer(
        &self,
        id: &DeviceId,
        capabilities: schemas::print::Capabilities,
        now: UnixMillis,
    ) -> CoreResult<(UnixMillis, Ticket)> {
        capabilities
            .validate()
            .map_err(|e| CoreError::new(ErrorCode::BadRequest, format!("capabilities: {e}")))?;
        let mut tx = self.device_tx(id);
        let device = tx.active_device(id)?;
        if let Some(p) = &device.printer
            && p.capabilities == capabilities
        {
            return Ok((p.registered_at, self.read_ticket()));
        }
        let mut device = device.clone();
        device.printer = Some(schemas::records::PrinterQueue {
            capabilities,
            registered_at: now,
        });
        tx.put_device(device)?;
        tx.commit_answer(now)
    }

    // ---------------------------------------------------------------- feed

    /// Entries after `after`, at most `limit`, and the feed's newest sequence number. The
    /// entries are read from the store after the shard's lock is released: an entry is in the
    /// store before the `newest` that counts it is in memory.
    pub fn feed_after(
        &self,
        device_id: &DeviceId,
        after: FeedSeq,
        limit: usize,
    ) -> CoreResult<(Vec<FeedEntry>, FeedSeq)> {
        let newest = self.with_shard(device_id, |shard| match shard.devices.get(device_id) {
            Some(device) => check_active(device).map(|()| device.newest),
            None => Err(CoreError::new(
                ErrorCode::NotFound,
                format!("no device {device_id}"),
            )),
        })?;
        if after >= newest {
            return Ok((Vec::new(), newest));
        }
        let start = feed_key(device_id, after.next());
        let end = device_range_end(Kind::Feed, device_id);
        let mut entries = Vec::new();
        for (k, v) in self.committer.store().range(&start, &end, limit)? {
            let entry: FeedEntry = decode(&k, &v)?;
            // A later entry may be in the store already but not yet counted (nor covered by
            // the caller's read ticket): it is shown next time.
            if entry.seq <= newest {
                entries.push(entry);
            }
        }
        Ok((entries, newest))
    }

    /// Records that the device has handled everything up to `upto`, and deletes those feed
    /// entries: they are never sent again. Idempotent; never moves the cursor backwards.
    pub fn ack(&self, device_id: &DeviceId, upto: FeedSeq) -> CoreResult<(FeedSeq, Ticket)> {
        let mut tx = self.device_tx(device_id);
        let device = tx.active_device(device_id)?;
        if upto > device.newest {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                format!("ack {upto} is past the newest entry {}", device.newest),
            ));
        }
        if upto <= device.acked {
            return Ok((device.acked, self.read_ticket()));
        }
        let mut device = device.clone();
        for seq in device.acked.0 + 1..=upto.0 {
            tx.delete_raw(feed_key(device_id, FeedSeq(seq)));
        }
        device.acked = upto;
        tx.put_device(device)?;
        tx.commit_answer(upto)
    }

    /// Whether a connecting device should be told at once that work is waiting.
    pub fn pending_for(&self, device_id: &DeviceId) -> Option<FeedSeq> {
        self.presence(device_id).flatten()
    }

    /// For a device that announced itself: `None` when no such device exists, else whether
    /// work is waiting for it (see [`Self::pending_for`]).
    pub fn presence(&self, device_id: &DeviceId) -> Option<Option<FeedSeq>> {
        self.with_shard(device_id, |shard| {
            let d = shard.devices.get(device_id)?;
            Some((!d.disabled && d.acked < d.newest).then_some(d.newest))
        })
    }

    /// The newest entry of a device's feed, if the device exists.
    pub fn newest(&self, device_id: &DeviceId) -> Option<FeedSeq> {
        self.with_shard(device_id, |shard| {
            shard.devices.get(device_id).map(|d| d.newest)
        })
    }
}

/// For a registration with an id: SHA-256 (hex) of the enrollment token's hash, the serial
/// and the id, and the device id it gives (the digest's first 8 bytes). Refuses an id that is
/// not 16 to 64 of `A-Z a-z 0-9 _ -`.
fn registration_key(
    reg: &Registration,
    token_hash: &str,
) -> CoreResult<Option<(String, DeviceId)>> {
    let Some(id) = &reg.registration_id else {
        return Ok(None);
    };
    let valid = (16..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        return Err(CoreError::new(
            ErrorCode::BadRequest,
            "registration_id must be 16 to 64 of A-Z a-z 0-9 _ -",
        ));
    }
    let digest = Sha256::digest(format!("{token_hash}\n{}\n{id}", reg.serial).as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    Ok(Some((hex(&digest), DeviceId::from_random(first))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::tests::{T0, core, core_with_device, job, registered};

    #[test]
    fn enrollment_token_is_single_use() {
        let core = core();
        registered(&core, 1);
        let reg = Registration {
            registration_id: None,
            enrollment_token: Secret::new("token-1"),
            serial: "SN2".into(),
            model: "m".into(),
            destination: "EU".into(),
            time_zone: "UTC".into(),
            owner: None,
        };
        let err = core
            .register(&reg, DeviceId::from_random([2; 8]), &Secret::new("s"), T0)
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::EnrollmentInvalid);
    }

    #[test]
    fn a_registration_repeated_under_its_id_is_the_same_device_until_it_is_complete() {
        let core = core();
        let token = Secret::new("token-once");
        core.create_enrollment(token.clone(), "acme".into(), 1, 60_000, T0)
            .unwrap();
        let reg = |serial: &str, id: &str| Registration {
            registration_id: Some(id.into()),
            enrollment_token: token.clone(),
            serial: serial.into(),
            model: "m".into(),
            destination: "EU".into(),
            time_zone: "UTC".into(),
            owner: None,
        };
        let register = |r: &Registration, secret: &str| {
            let fresh = DeviceId::from_random(rand::random());
            core.register(r, fresh, &Secret::new(secret), T0)
        };
        let first = reg("SN-R", "0123456789abcdef0123");
        let (a, ..) = register(&first, "s1").unwrap();
        // The answer was lost: the same registration again, though the token is used up.
        let (b, ..) = register(&first, "s2").unwrap();
        assert_eq!(a.device_id, b.device_id);
        assert_eq!(core.devices().len(), 1);
        assert_eq!(
            core.authenticate(a.device_id.as_str(), "s1").unwrap_err(),
            AuthFailure::WrongSecret,
            "the secret of the lost answer is void"
        );
        assert!(core.authenticate(a.device_id.as_str(), "s2").is_ok());
        // Another id, or the same id for another serial, is a new registration: the token
        // has no use left for it.
        for other in [
            reg("SN-R", "another-id-0000000000"),
            reg("SN-OTHER", "0123456789abcdef0123"),
        ] {
            assert_eq!(
                register(&other, "s3").unwrap_err().code(),
                ErrorCode::EnrollmentInvalid
            );
        }
        // Once the device confirmed storing its credentials, the id is spent.
        core.complete_registration(&a.device_id, T0).unwrap();
        assert_eq!(
            register(&first, "s4").unwrap_err().code(),
            ErrorCode::Conflict
        );
        assert!(core.authenticate(a.device_id.as_str(), "s2").is_ok());
        // Ids outside the syntax are refused.
        for bad in ["short", "has space 0123456789", &"x".repeat(65)] {
            assert_eq!(
                register(&reg("SN-R", bad), "s5").unwrap_err().code(),
                ErrorCode::BadRequest,
                "{bad}"
            );
        }
    }

    #[test]
    fn authentication_checks_secret_and_disabled_flag() {
        let core = core();
        let id = registered(&core, 1);
        assert!(core.authenticate(id.as_str(), "secret").is_ok());
        assert_eq!(
            core.authenticate(id.as_str(), "nope").unwrap_err(),
            AuthFailure::WrongSecret
        );
        assert_eq!(
            core.authenticate("dev-0000000000000000", "secret")
                .unwrap_err(),
            AuthFailure::UnknownDevice
        );
        core.disable_device(&id, T0).unwrap();
        assert_eq!(
            core.authenticate(id.as_str(), "secret").unwrap_err(),
            AuthFailure::Disabled
        );
    }

    #[test]
    fn ack_past_newest_is_refused_and_ack_never_goes_back() {
        let (core, dev) = core_with_device();
        job(&core, &dev);
        job(&core, &dev);
        assert_eq!(
            core.ack(&dev, FeedSeq(3)).unwrap_err().code(),
            ErrorCode::BadRequest
        );
        assert_eq!(core.ack(&dev, FeedSeq(2)).unwrap().0, FeedSeq(2));
        assert_eq!(core.ack(&dev, FeedSeq(1)).unwrap().0, FeedSeq(2));
        assert_eq!(core.pending_for(&dev), None);
    }
}
