//! Pull printing: jobs wait in a user's virtual printer (held) until the user logs in at a
//! device and releases them there.
//!
//! - A login (user id and PIN, checked in constant time against a salted hash) opens a session
//!   bound to that device; it ends on logout or after `print_session_ms` unused. Sessions live
//!   in memory: after a restart of the bridge users log in again.
//! - A release moves a held job to the device's printer queue: the held record becomes
//!   `released` and the job of the same id is queued for the device in one batch. The release
//!   holds the registry's write lock, so a job is released once, to one device, however many
//!   try at once.
//! - Print settings are checked against the device's capabilities at release.

use schemas::api::SubmitHeldJob;
use schemas::data::{ErrorBody, ErrorCode};
use schemas::feed::FeedBody;
use schemas::print::{HeldJobRecord, HeldJobSummary, HeldState, UserRecord};
use schemas::records::JobRecord;
use schemas::{DeviceId, JobId, Secret, UnixMillis, UserId};

use super::jobs::queued_job;
use super::keys::Kind;
use super::principals::NewPrincipal;
use super::state::{PrintSession, Registry};
use super::tx::{Access, Tx};
use super::{
    Core, CoreError, CoreResult, Effects, check_print, sha256_hex, transition_event, ttl_ms,
};
use crate::store::Ticket;

fn pin_hash(user: &UserId, pin: &Secret) -> String {
    sha256_hex(format!("{user}:{}", pin.expose()).as_bytes())
}

fn no_session() -> CoreError {
    CoreError::new(
        ErrorCode::Unauthorized,
        "no print session at this device: log in first (sessions end on logout and after a \
         while unused)",
    )
}

fn no_user(user_id: &UserId) -> CoreError {
    CoreError::new(ErrorCode::NotFound, format!("no user {user_id}"))
}

impl Core {
    /// Whether `principal` may use `user`'s virtual printer (the user, or the administrator).
    pub fn authorize_user(&self, principal: &super::Principal, user: &UserId) -> CoreResult<()> {
        match principal {
            super::Principal::Admin => Ok(()),
            super::Principal::User(u) if u == user => Ok(()),
            _ => Err(CoreError::new(
                ErrorCode::Forbidden,
                format!("only {user} (or an administrator) uses this virtual printer"),
            )),
        }
    }

    /// A user whose secret is the bearer token of their API calls; `pin` logs them in at a
    /// device.
    pub fn create_user(
        &self,
        new: &NewPrincipal<UserId>,
        pin: &Secret,
        now: UnixMillis,
    ) -> CoreResult<(UserRecord, Ticket)> {
        let (user_id, name, token_sha256) = new.checked()?;
        if !(4..=32).contains(&pin.expose().chars().count()) {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                "the PIN must be 4 to 32 characters",
            ));
        }
        let record = UserRecord {
            pin_sha256: pin_hash(&user_id, pin),
            token_sha256,
            user_id,
            name,
            created_at: now,
        };
        self.create(record, Tx::insert_user)
    }

    /// A job for a user's virtual printer. A device where the user is logged in now is told.
    pub fn submit_held(
        &self,
        user_id: &UserId,
        req: SubmitHeldJob,
        payload: Vec<u8>,
        now: UnixMillis,
    ) -> CoreResult<(HeldJobRecord, Ticket, Effects)> {
        if !self.with_registry(|r| r.users.contains_key(user_id)) {
            return Err(no_user(user_id));
        }
        if payload.len() > schemas::MAX_PAYLOAD_BYTES {
            return Err(CoreError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "payload of {} bytes exceeds the limit of {} bytes",
                    payload.len(),
                    schemas::MAX_PAYLOAD_BYTES
                ),
            ));
        }
        // Devices where the user is logged in now learn that the list changed.
        let mut at = self.with_registry(|r| logged_in_at(r, user_id, now));
        at.sort();
        at.dedup();
        let locked: Vec<&DeviceId> = at.iter().collect();
        let mut tx = Tx::new(self, Access::Write, &locked);
        if tx.user(user_id)?.is_none() {
            return Err(no_user(user_id));
        }
        let job_id = tx.fresh_job_id(now);
        let ttl = ttl_ms(req.ttl_secs, 3 * 24 * 3600, 30 * 24 * 3600);
        let record = HeldJobRecord {
            job_id: job_id.clone(),
            user_id: user_id.clone(),
            title: req
                .title
                .unwrap_or_else(|| "untitled".into())
                .chars()
                .take(128)
                .collect(),
            content_type: req
                .content_type
                .unwrap_or_else(|| "application/octet-stream".into()),
            payload_len: payload.len() as u64,
            print: req.print,
            created_at: now,
            expires_at: now.saturating_add_ms(ttl),
            state: HeldState::Held,
        };
        tx.put_raw(Kind::Payload.key(job_id.as_str()), payload);
        tx.put_held(record.clone())?;
        // A session opened since the devices were read is left out: its login lists the job.
        let still = logged_in_at(tx.registry()?, user_id, now);
        for device in at.into_iter().filter(|d| still.contains(d)) {
            let body = FeedBody::HeldJobsChanged {
                user_id: user_id.clone(),
            };
            tx.append_feed(&device, body, now)?;
        }
        let (ticket, effects) = tx.commit()?;
        Ok((record, ticket, effects))
    }

    /// A user's held jobs, every state (what the user's own audit shows).
    /// Every user, oldest first.
    pub fn users(&self) -> Vec<UserRecord> {
        let mut all: Vec<UserRecord> = self.with_registry(|r| r.users.values().cloned().collect());
        all.sort_by(|a, b| (a.created_at, &a.user_id).cmp(&(b.created_at, &b.user_id)));
        all
    }

    pub fn held_jobs(&self, user_id: &UserId, now: UnixMillis) -> CoreResult<Vec<HeldJobRecord>> {
        let mut list: Vec<HeldJobRecord> = self.with_registry(|r| {
            if !r.users.contains_key(user_id) {
                return Err(no_user(user_id));
            }
            Ok(r.held
                .values()
                .filter(|h| h.user_id == *user_id)
                .map(|h| {
                    let mut h = h.clone();
                    if h.state == HeldState::Held && now > h.expires_at {
                        h.state = HeldState::Expired { at: h.expires_at };
                    }
                    h
                })
                .collect())
        })?;
        list.sort_by_key(|h| (h.created_at, h.job_id.clone()));
        Ok(list)
    }

    /// A user logs in at a device: a session for that device, and the user's held jobs.
    pub fn login(
        &self,
        device_id: &DeviceId,
        user_id: &UserId,
        pin: &Secret,
        token: &Secret,
        now: UnixMillis,
    ) -> CoreResult<(UnixMillis, Vec<HeldJobSummary>)> {
        let presented = pin_hash(user_id, pin);
        let hash = sha256_hex(token.expose().as_bytes());
        let mut tx = Tx::new(self, Access::Write, &[device_id]);
        tx.active_device(device_id)?;
        let right = tx.user(user_id)?.is_some_and(|u| {
            broker::constant_time_eq(presented.as_bytes(), u.pin_sha256.as_bytes())
        });
        if !right {
            return Err(CoreError::new(
                ErrorCode::Unauthorized,
                "unknown user or wrong PIN",
            ));
        }
        let ended: Vec<String> = tx
            .registry()?
            .sessions
            .iter()
            .filter(|(_, s)| s.expires_at <= now)
            .map(|(h, _)| h.clone())
            .collect();
        for h in ended {
            tx.put_session(h, None)?;
        }
        let expires_at = now.saturating_add_ms(self.policy.print_session_ms);
        let session = PrintSession {
            user_id: user_id.clone(),
            device_id: device_id.clone(),
            expires_at,
        };
        tx.put_session(hash, Some(session))?;
        let waiting = waiting(tx.registry()?, user_id, now);
        tx.commit()?;
        Ok((expires_at, waiting))
    }

    pub fn session_held_jobs(
        &self,
        device_id: &DeviceId,
        token: &Secret,
        now: UnixMillis,
    ) -> CoreResult<Vec<HeldJobSummary>> {
        let hash = sha256_hex(token.expose().as_bytes());
        let mut tx = Tx::new(self, Access::Write, &[]);
        let user = tx.use_session(device_id, hash, now)?;
        let waiting = waiting(tx.registry()?, &user, now);
        tx.commit()?;
        Ok(waiting)
    }

    pub fn logout(&self, device_id: &DeviceId, token: &Secret) -> CoreResult<()> {
        let hash = sha256_hex(token.expose().as_bytes());
        let mut tx = Tx::new(self, Access::Write, &[]);
        match tx.session(&hash)? {
            Some(s) if s.device_id == *device_id => {
                tx.put_session(hash, None)?;
                tx.commit()?;
                Ok(())
            }
            _ => Err(no_session()),
        }
    }

    /// Releases held jobs of the session's user to this device's printer queue.
    #[allow(clippy::type_complexity)]
    pub fn release(
        &self,
        device_id: &DeviceId,
        token: &Secret,
        jobs: &[JobId],
        now: UnixMillis,
    ) -> CoreResult<(Vec<JobId>, Vec<(JobId, ErrorBody)>, Ticket, Effects)> {
        if jobs.is_empty() || jobs.len() > 64 {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                "release 1 to 64 jobs at a time",
            ));
        }
        let hash = sha256_hex(token.expose().as_bytes());
        let mut tx = Tx::new(self, Access::Write, &[device_id]);
        let user = tx.use_session(device_id, hash, now)?;
        let device = tx.active_device(device_id)?.clone();
        let mut released = Vec::new();
        let mut refused = Vec::new();
        for job_id in jobs {
            let verdict = releasable(&tx, &user, &device, job_id, &released, now);
            let held = match verdict {
                Ok(h) => h,
                Err(e) => {
                    refused.push((job_id.clone(), e.body()));
                    continue;
                }
            };
            let mut job: JobRecord = queued_job(
                job_id.clone(),
                device_id.clone(),
                now,
                now.saturating_add_ms(self.policy.default_ttl_ms),
                self.policy.default_max_attempts,
                Some(format!(
                    "held since {} (unix ms); released at {device_id} by {user}",
                    held.created_at.0
                )),
            );
            job.content_type = held.content_type.clone();
            job.payload_len = held.payload_len;
            job.submitted_by = Some(format!("user:{user}"));
            job.print = held.print.clone();
            let mut released_held = held;
            released_held.state = HeldState::Released {
                device_id: device_id.clone(),
                at: now,
            };
            tx.put_held(released_held)?;
            let offer = FeedBody::JobOffered {
                job_id: job_id.clone(),
            };
            tx.append_feed(device_id, offer, now)?;
            tx.effects.events.push(transition_event(&job));
            tx.put_job(job)?;
            released.push(job_id.clone());
        }
        if released.is_empty() {
            // The session was renewed: commit that, with nothing to write.
            let (_, effects) = tx.commit()?;
            return Ok((released, refused, self.read_ticket(), effects));
        }
        let (ticket, effects) = tx.commit()?;
        Ok((released, refused, ticket, effects))
    }
}

impl Tx<'_> {
    /// The session's user, if the session is open at this device (and keeps it open).
    fn use_session(
        &mut self,
        device_id: &DeviceId,
        hash: String,
        now: UnixMillis,
    ) -> CoreResult<UserId> {
        let mut session = self
            .session(&hash)?
            .filter(|s| s.device_id == *device_id && s.expires_at > now)
            .cloned()
            .ok_or_else(no_session)?;
        session.expires_at = now.saturating_add_ms(self.policy().print_session_ms);
        let user = session.user_id.clone();
        self.put_session(hash, Some(session))?;
        Ok(user)
    }
}

/// Whether `job_id` can be released to `device` by `user` now; the held record if so.
fn releasable(
    tx: &Tx<'_>,
    user: &UserId,
    device: &schemas::records::DeviceRecord,
    job_id: &JobId,
    released: &[JobId],
    now: UnixMillis,
) -> CoreResult<HeldJobRecord> {
    let held = tx
        .held_job(job_id)?
        .filter(|h| h.user_id == *user)
        .ok_or_else(|| CoreError::new(ErrorCode::NotFound, format!("no held job {job_id}")))?;
    if released.contains(job_id) {
        return Err(CoreError::new(
            ErrorCode::BadRequest,
            format!("job {job_id} listed twice"),
        ));
    }
    match &held.state {
        HeldState::Held if now > held.expires_at => {
            return Err(CoreError::new(
                ErrorCode::Expired,
                format!("held job {job_id} expired"),
            ));
        }
        HeldState::Held => {}
        HeldState::Released { device_id, .. } => {
            return Err(CoreError::new(
                ErrorCode::InvalidState,
                format!("held job {job_id} was already released to {device_id}"),
            ));
        }
        HeldState::Expired { .. } => {
            return Err(CoreError::new(
                ErrorCode::Expired,
                format!("held job {job_id} expired"),
            ));
        }
    }
    if let Some(print) = &held.print {
        check_print(device, print)?;
    }
    Ok(held.clone())
}

/// The devices where `user` has a session open at `now`.
fn logged_in_at(reg: &Registry, user: &UserId, now: UnixMillis) -> Vec<DeviceId> {
    reg.sessions
        .values()
        .filter(|s| s.user_id == *user && s.expires_at > now)
        .map(|s| s.device_id.clone())
        .collect()
}

/// The user's held jobs that can still be released, oldest first.
fn waiting(reg: &Registry, user_id: &UserId, now: UnixMillis) -> Vec<HeldJobSummary> {
    let mut list: Vec<HeldJobSummary> = reg
        .held
        .values()
        .filter(|h| h.user_id == *user_id && h.state == HeldState::Held && now <= h.expires_at)
        .map(|h| HeldJobSummary {
            job_id: h.job_id.clone(),
            title: h.title.clone(),
            print: h.print.clone(),
            created_at: h.created_at,
        })
        .collect();
    list.sort_by_key(|h| (h.created_at, h.job_id.clone()));
    list
}
