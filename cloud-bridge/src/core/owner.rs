//! Owner confirmation. The owner is bound to the device id at registration. When the device
//! is reset or moved it asks for the owner's confirmation; until the owner confirms at the
//! panel the cloud hands it no jobs. A wrong confirmation, or none by the deadline, invalidates
//! the device id: its credentials stop working on both channels, new jobs are refused, and
//! jobs not yet finished are rejected with the reason. The device has to register again.

use schemas::data::{ErrorCode, OwnerCheckReason, OwnerClaim};
use schemas::job::JobState;
use schemas::ops::OpsEvent;
use schemas::records::{DeviceRecord, Invalidation, OwnerCheckState};
use schemas::{DeviceId, UnixMillis};

use super::jobs::transition;
use super::tx::Tx;
use super::{Core, CoreError, CoreResult, Effects, owner_pin_hash};
use crate::store::Ticket;

/// What a confirmation at the panel led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerVerdict {
    Confirmed,
    /// Wrong owner information: the device id is invalidated (already durable in the batch).
    Invalidated(String),
}

impl Core {
    /// The device met a condition that calls for the owner. Returns the deadline, or `None`
    /// when no owner is bound (nothing to confirm). Asking again keeps the first deadline.
    pub fn start_owner_check(
        &self,
        device_id: &DeviceId,
        reason: &OwnerCheckReason,
        now: UnixMillis,
    ) -> CoreResult<(Option<UnixMillis>, Ticket, Effects)> {
        let mut tx = self.device_tx(device_id);
        let mut device = tx.active_device(device_id)?.clone();
        if device.owner.is_none() {
            return Ok((None, self.read_ticket(), Effects::default()));
        }
        if let Some(check) = &device.owner_check {
            return Ok((Some(check.deadline), self.read_ticket(), Effects::default()));
        }
        if let OwnerCheckReason::TimeZoneChanged { time_zone } = reason {
            if time_zone.trim().is_empty() || time_zone.len() > 64 {
                return Err(CoreError::new(
                    ErrorCode::BadRequest,
                    "time_zone must be 1 to 64 characters",
                ));
            }
            device.time_zone = time_zone.clone();
        }
        let deadline = now.saturating_add_ms(self.policy.owner_check_ms);
        let check = OwnerCheckState {
            reason: reason.to_string(),
            started_at: now,
            deadline,
        };
        device.owner_check = Some(check.clone());
        tx.put_device(device)?;
        tx.effects.events.push(OpsEvent::OwnerCheckStarted {
            device_id: device_id.clone(),
            reason: check.reason,
            deadline,
            at: now,
        });
        let (ticket, effects) = tx.commit()?;
        Ok((Some(deadline), ticket, effects))
    }

    /// Owner information entered at the panel, checked against what was bound at
    /// registration.
    pub fn confirm_owner(
        &self,
        device_id: &DeviceId,
        claim: &OwnerClaim,
        now: UnixMillis,
    ) -> CoreResult<(OwnerVerdict, Ticket, Effects)> {
        let presented = owner_pin_hash(device_id, claim.pin.expose());
        let mut tx = self.device_tx(device_id);
        let mut device = tx.active_device(device_id)?.clone();
        let Some(binding) = &device.owner else {
            return Err(CoreError::new(
                ErrorCode::InvalidState,
                format!("device {device_id} has no owner bound"),
            ));
        };
        let matches = claim.owner_id == binding.owner_id
            && broker::constant_time_eq(presented.as_bytes(), binding.pin_sha256.as_bytes());
        if !matches {
            let reason = "wrong owner information entered at the panel".to_owned();
            tx.invalidate(device, &reason, now)?;
            let (ticket, effects) = tx.commit()?;
            return Ok((OwnerVerdict::Invalidated(reason), ticket, effects));
        }
        if device.owner_check.take().is_none() {
            // Confirming without a check under way changes nothing.
            return Ok((
                OwnerVerdict::Confirmed,
                self.read_ticket(),
                Effects::default(),
            ));
        }
        tx.put_device(device)?;
        tx.effects.events.push(OpsEvent::OwnerConfirmed {
            device_id: device_id.clone(),
            at: now,
        });
        let (ticket, effects) = tx.commit()?;
        Ok((OwnerVerdict::Confirmed, ticket, effects))
    }
}

impl Tx<'_> {
    /// Invalidates every device of the locked shards whose owner check ran out by `now`.
    pub(super) fn expire_owner_checks(&mut self, now: UnixMillis) -> CoreResult<()> {
        let due: Vec<DeviceId> = self
            .shards()
            .flat_map(|s| s.owner_checks.iter().take_while(|(t, _)| *t <= now))
            .map(|(_, d)| d.clone())
            .collect();
        let check_secs = self.policy().owner_check_ms / 1000;
        for device_id in due {
            let device = self.device(&device_id)?.clone();
            let reason = match &device.owner_check {
                Some(check) => format!(
                    "owner not confirmed within {check_secs} s after {}",
                    check.reason
                ),
                None => continue,
            };
            self.invalidate(device, &reason, now)?;
        }
        Ok(())
    }

    /// Revokes the device id: refused on both channels from now on, and every job not yet
    /// finished is rejected with the reason.
    fn invalidate(
        &mut self,
        mut device: DeviceRecord,
        reason: &str,
        now: UnixMillis,
    ) -> CoreResult<()> {
        let device_id = device.device_id.clone();
        device.owner_check = None;
        device.disabled = true;
        device.invalidated = Some(Invalidation {
            reason: reason.to_owned(),
            at: now,
        });
        self.put_device(device)?;
        let shard = self.shard(&device_id)?;
        let open: Vec<_> = shard
            .device_jobs
            .get(&device_id)
            .into_iter()
            .flatten()
            .filter(|id| shard.jobs.get(*id).is_some_and(|j| !j.state.is_terminal()))
            .cloned()
            .collect();
        for job_id in open {
            let mut job = self.job(&job_id)?.clone();
            if job.state.is_terminal() {
                continue; // Finished earlier in this transaction.
            }
            let why = Some(format!("device id invalidated: {reason}"));
            transition(&mut job, JobState::Rejected, why, now, &mut self.effects);
            self.put_job(job)?;
        }
        self.effects.events.push(OpsEvent::DeviceInvalidated {
            device_id,
            reason: reason.to_owned(),
            at: now,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use schemas::data::Registration;
    use schemas::records::OwnerRecord;
    use schemas::{JobId, OwnerId, Secret};

    use super::*;
    use crate::core::AuthFailure;
    use crate::core::NewPrincipal;
    use crate::core::tests::{T0, core, error_code, job};

    /// A device bound to a new owner with PIN "2468".
    fn owned(core: &Core) -> (DeviceId, OwnerId) {
        let owner = OwnerId::from_random([3; 8]);
        let new = NewPrincipal::new(owner.clone(), "Anna", Secret::new("t"));
        core.create_principal::<OwnerRecord>(&new, T0).unwrap();
        let token = Secret::new("enrol");
        core.create_enrollment(token.clone(), "acme".into(), 1, 60_000, T0)
            .unwrap();
        let reg = Registration {
            registration_id: None,
            enrollment_token: token,
            serial: "SN".into(),
            model: "MFP-1".into(),
            destination: "EU".into(),
            time_zone: "Europe/Berlin".into(),
            owner: Some(OwnerClaim {
                owner_id: owner.clone(),
                pin: Secret::new("2468"),
            }),
        };
        let id = DeviceId::from_random([4; 8]);
        core.register(&reg, id.clone(), &Secret::new("secret"), T0)
            .unwrap();
        (id, owner)
    }

    /// An owned device after a factory reset (its owner must confirm), with a job queued.
    fn reset_with_a_job(core: &Core) -> (DeviceId, OwnerId, JobId) {
        let (dev, owner) = owned(core);
        core.start_owner_check(&dev, &OwnerCheckReason::FactoryReset, T0)
            .unwrap();
        let queued = job(core, &dev);
        (dev, owner, queued)
    }

    fn claim(owner: &OwnerId, pin: &str) -> OwnerClaim {
        OwnerClaim {
            owner_id: owner.clone(),
            pin: Secret::new(pin),
        }
    }

    #[test]
    fn the_right_owner_ends_the_check_and_jobs_flow_again() {
        let core = core();
        let (dev, owner) = owned(&core);
        let moved = OwnerCheckReason::TimeZoneChanged {
            time_zone: "Asia/Tokyo".into(),
        };
        let (deadline, ..) = core.start_owner_check(&dev, &moved, T0).unwrap();
        assert_eq!(deadline, Some(T0.saturating_add_ms(5000)));
        assert_eq!(core.device(&dev).unwrap().time_zone, "Asia/Tokyo");
        let j = job(&core, &dev);
        assert_eq!(
            error_code(core.fetch_job(&dev, &j, false, T0)),
            ErrorCode::OwnerCheckPending
        );
        let (verdict, ..) = core
            .confirm_owner(&dev, &claim(&owner, "2468"), T0)
            .unwrap();
        assert_eq!(verdict, OwnerVerdict::Confirmed);
        core.fetch_job(&dev, &j, false, T0).unwrap();
        // The deadline no longer matters.
        core.expire_due(T0.saturating_add_ms(10_000)).unwrap();
        assert!(core.authenticate(dev.as_str(), "secret").is_ok());
    }

    #[test]
    fn a_wrong_owner_invalidates_the_id_and_rejects_its_jobs() {
        let core = core();
        let (dev, owner, queued) = reset_with_a_job(&core);
        let (verdict, _, effects) = core
            .confirm_owner(&dev, &claim(&owner, "1111"), T0)
            .unwrap();
        assert!(matches!(verdict, OwnerVerdict::Invalidated(_)));
        assert!(
            effects
                .events
                .iter()
                .any(|e| matches!(e, OpsEvent::DeviceInvalidated { .. }))
        );
        let j = core.job(&queued).unwrap();
        assert_eq!(j.state, JobState::Rejected);
        assert!(j.outcome.as_deref().unwrap().contains("invalidated"));
        assert_eq!(
            core.authenticate(dev.as_str(), "secret").unwrap_err(),
            AuthFailure::Invalidated
        );
        assert_eq!(
            error_code(core.submit_job(
                &dev,
                crate::core::NewJob {
                    payload: vec![1],
                    content_type: "x/y".into(),
                    ttl_ms: None,
                    max_attempts: None,
                    idempotency_key: None,
                    submitted_by: None,
                    print: None,
                },
                T0,
            )),
            ErrorCode::DeviceInvalidated
        );
    }

    #[test]
    fn the_right_pin_with_another_owner_id_is_wrong_too() {
        let core = core();
        let (dev, _) = owned(&core);
        let stranger = OwnerId::from_random([5; 8]);
        let (verdict, ..) = core
            .confirm_owner(&dev, &claim(&stranger, "2468"), T0)
            .unwrap();
        assert!(matches!(verdict, OwnerVerdict::Invalidated(_)));
    }

    #[test]
    fn no_confirmation_by_the_deadline_invalidates() {
        let core = core();
        let (dev, _, j) = reset_with_a_job(&core);
        assert_eq!(core.next_deadline(), Some(T0.saturating_add_ms(5000)));
        let (ticket, _) = core.expire_due(T0.saturating_add_ms(4999)).unwrap();
        assert!(ticket.is_none(), "not yet due");
        core.expire_due(T0.saturating_add_ms(5000)).unwrap();
        let device = core.device(&dev).unwrap();
        assert!(
            device
                .invalidated
                .as_ref()
                .unwrap()
                .reason
                .contains("not confirmed")
        );
        assert_eq!(core.job(&j).unwrap().state, JobState::Rejected);
    }
}
