//! Pull printing: jobs wait in a user's virtual printer (held) until the user logs in at a
//! device and releases them there.
//!
//! - A login (user id and PIN, checked in constant time against a salted hash) opens a session
//!   bound to that device; it ends on logout or after `print_session_ms` unused. Sessions live
//!   in memory: after a restart of the bridge users log in again.
//! - A release moves a held job to the device's printer queue: the held record becomes
//!   `released` and the job of the same id is queued for the device in one batch, under the one
//!   lock of the core, so a job is released once, to one device, however many try at once.
//! - Print settings are checked against the device's capabilities at release.

use schemas::api::SubmitHeldJob;
use schemas::data::{ErrorBody, ErrorCode};
use schemas::feed::FeedBody;
use schemas::job::{JobState, Transition};
use schemas::print::{HeldJobRecord, HeldJobSummary, HeldState, UserRecord};
use schemas::records::JobRecord;
use schemas::{DeviceId, JobId, Secret, UnixMillis, UserId};

use super::{
    Core, CoreError, CoreResult, Effects, check_name, encode, key, sha256_hex, transition_event,
    ttl_ms,
};
use crate::store::{Batch, Ticket};

/// A user logged in at a device's panel.
#[derive(Debug, Clone)]
pub(super) struct PrintSession {
    user_id: UserId,
    device_id: DeviceId,
    expires_at: UnixMillis,
}

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

    pub fn create_user(
        &mut self,
        user_id: UserId,
        name: String,
        pin: &Secret,
        token: &Secret,
        now: UnixMillis,
    ) -> CoreResult<(UserRecord, Ticket)> {
        check_name(&name)?;
        let digits = pin.expose();
        if digits.len() < 4 || digits.len() > 32 {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                "the PIN must be 4 to 32 characters",
            ));
        }
        if self.users.contains_key(&user_id) {
            return Err(CoreError::new(
                ErrorCode::Conflict,
                "user id collision; retry",
            ));
        }
        let record = UserRecord {
            pin_sha256: pin_hash(&user_id, pin),
            token_sha256: sha256_hex(token.expose().as_bytes()),
            user_id: user_id.clone(),
            name,
            created_at: now,
        };
        let mut batch = Batch::default();
        batch.put(key("u", user_id.as_str()), encode(&record)?);
        let ticket = self.commit(batch)?;
        self.tokens.insert(
            record.token_sha256.clone(),
            super::Principal::User(user_id.clone()),
        );
        self.users.insert(user_id, record.clone());
        Ok((record, ticket))
    }

    /// A job for a user's virtual printer. A device where the user is logged in now is told.
    pub fn submit_held(
        &mut self,
        user_id: &UserId,
        job_id: JobId,
        req: SubmitHeldJob,
        payload: Vec<u8>,
        now: UnixMillis,
    ) -> CoreResult<(HeldJobRecord, Ticket, Effects)> {
        if !self.users.contains_key(user_id) {
            return Err(CoreError::new(
                ErrorCode::NotFound,
                format!("no user {user_id}"),
            ));
        }
        if payload.len() > schemas::MAX_PAYLOAD_BYTES {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                format!("payload exceeds {} bytes", schemas::MAX_PAYLOAD_BYTES),
            ));
        }
        if self.jobs.contains_key(&job_id) || self.held.contains_key(&job_id) {
            return Err(CoreError::new(
                ErrorCode::Conflict,
                "job id collision; retry",
            ));
        }
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
        let mut batch = Batch::default();
        let mut effects = Effects::default();
        batch.put(key("h", job_id.as_str()), encode(&record)?);
        batch.put(key("p", job_id.as_str()), payload);
        // Devices where the user is logged in now learn that the list changed.
        let mut at: Vec<DeviceId> = self
            .sessions
            .values()
            .filter(|s| s.user_id == *user_id && s.expires_at > now)
            .map(|s| s.device_id.clone())
            .collect();
        at.sort();
        at.dedup();
        for device in at {
            let body = FeedBody::HeldJobsChanged {
                user_id: user_id.clone(),
            };
            self.append_feed(&mut batch, &device, body, now, &mut effects)?;
        }
        let ticket = self.commit(batch)?;
        self.held.insert(job_id, record.clone());
        Ok((record, ticket, effects))
    }

    /// A user's held jobs, every state (what the user's own audit shows).
    pub fn held_jobs(&self, user_id: &UserId, now: UnixMillis) -> CoreResult<Vec<HeldJobRecord>> {
        if !self.users.contains_key(user_id) {
            return Err(CoreError::new(
                ErrorCode::NotFound,
                format!("no user {user_id}"),
            ));
        }
        let mut list: Vec<HeldJobRecord> = self
            .held
            .values()
            .filter(|h| h.user_id == *user_id)
            .map(|h| {
                let mut h = h.clone();
                if h.state == HeldState::Held && now > h.expires_at {
                    h.state = HeldState::Expired { at: h.expires_at };
                }
                h
            })
            .collect();
        list.sort_by_key(|h| (h.created_at, h.job_id.clone()));
        Ok(list)
    }

    fn waiting(&self, user_id: &UserId, now: UnixMillis) -> Vec<HeldJobSummary> {
        let mut list: Vec<HeldJobSummary> = self
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

    /// A user logs in at a device: a session for that device, and the user's held jobs.
    pub fn login(
        &mut self,
        device_id: &DeviceId,
        user_id: &UserId,
        pin: &Secret,
        token: &Secret,
        now: UnixMillis,
    ) -> CoreResult<(UnixMillis, Vec<HeldJobSummary>)> {
        self.active_device(device_id)?;
        let right = self.users.get(user_id).is_some_and(|u| {
            broker::constant_time_eq(pin_hash(user_id, pin).as_bytes(), u.pin_sha256.as_bytes())
        });
        if !right {
            return Err(CoreError::new(
                ErrorCode::Unauthorized,
                "unknown user or wrong PIN",
            ));
        }
        self.sessions.retain(|_, s| s.expires_at > now);
        let expires_at = now.saturating_add_ms(self.policy.print_session_ms);
        self.sessions.insert(
            sha256_hex(token.expose().as_bytes()),
            PrintSession {
                user_id: user_id.clone(),
                device_id: device_id.clone(),
                expires_at,
            },
        );
        Ok((expires_at, self.waiting(user_id, now)))
    }

    /// The session's user, if the session is open at this device (and keeps it open).
    fn use_session(
        &mut self,
        device_id: &DeviceId,
        token: &Secret,
        now: UnixMillis,
    ) -> CoreResult<UserId> {
        let session_ms = self.policy.print_session_ms;
        let session = self
            .sessions
            .get_mut(&sha256_hex(token.expose().as_bytes()))
            .filter(|s| s.device_id == *device_id && s.expires_at > now)
            .ok_or_else(no_session)?;
        session.expires_at = now.saturating_add_ms(session_ms);
        Ok(session.user_id.clone())
    }

    pub fn session_held_jobs(
        &mut self,
        device_id: &DeviceId,
        token: &Secret,
        now: UnixMillis,
    ) -> CoreResult<Vec<HeldJobSummary>> {
        let user = self.use_session(device_id, token, now)?;
        Ok(self.waiting(&user, now))
    }

    pub fn logout(&mut self, device_id: &DeviceId, token: &Secret) -> CoreResult<()> {
        let hash = sha256_hex(token.expose().as_bytes());
        match self.sessions.get(&hash) {
            Some(s) if s.device_id == *device_id => {
                self.sessions.remove(&hash);
                Ok(())
            }
            _ => Err(no_session()),
        }
    }

    /// Releases held jobs of the session's user to this device's printer queue.
    #[allow(clippy::type_complexity)]
    pub fn release(
        &mut self,
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
        let user = self.use_session(device_id, token, now)?;
        let device = self.active_device(device_id)?.clone();
        let mut released = Vec::new();
        let mut refused = Vec::new();
        let mut batch = Batch::default();
        let mut effects = Effects::default();
        let mut queued: Vec<(HeldJobRecord, JobRecord)> = Vec::new();
        for job_id in jobs {
            let verdict = (|| {
                let held = self
                    .held
                    .get(job_id)
                    .filter(|h| h.user_id == user)
                    .ok_or_else(|| {
                        CoreError::new(ErrorCode::NotFound, format!("no held job {job_id}"))
                    })?;
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
                if queued.iter().any(|(h, _)| h.job_id == *job_id) {
                    return Err(CoreError::new(
                        ErrorCode::BadRequest,
                        format!("job {job_id} listed twice"),
                    ));
                }
                if let Some(print) = &held.print {
                    super::check_print(&device, print)?;
                }
                Ok(held.clone())
            })();
            let held = match verdict {
                Ok(h) => h,
                Err(e) => {
                    refused.push((job_id.clone(), e.body()));
                    continue;
                }
            };
            let mut released_held = held.clone();
            released_held.state = HeldState::Released {
                device_id: device_id.clone(),
                at: now,
            };
            let job = JobRecord {
                job_id: job_id.clone(),
                device_id: device_id.clone(),
                state: JobState::Queued,
                attempt: 0,
                max_attempts: self.policy.default_max_attempts,
                created_at: now,
                expires_at: now.saturating_add_ms(self.policy.default_ttl_ms),
                lease_until: None,
                idempotency_key: None,
                content_type: held.content_type.clone(),
                payload_len: held.payload_len,
                outcome: None,
                submitted_by: Some(format!("user:{user}")),
                print: held.print.clone(),
                history: vec![Transition {
                    from: None,
                    to: JobState::Queued,
                    at: now,
                    attempt: 0,
                    reason: Some(format!(
                        "held since {} (unix ms); released at {device_id} by {user}",
                        held.created_at.0
                    )),
                }],
            };
            batch.put(key("h", job_id.as_str()), encode(&released_held)?);
            batch.put(key("j", job_id.as_str()), encode(&job)?);
            let offer = FeedBody::JobOffered {
                job_id: job_id.clone(),
            };
            self.append_feed(&mut batch, device_id, offer, now, &mut effects)?;
            queued.push((released_held, job));
        }
        if queued.is_empty() {
            return Ok((released, refused, self.read_ticket(), effects));
        }
        let ticket = self.commit(batch)?;
        for (held, job) in queued {
            effects.events.push(transition_event(&job));
            self.index_job(&job);
            self.device_jobs
                .entry(device_id.clone())
                .or_default()
                .push(job.job_id.clone());
            released.push(job.job_id.clone());
            self.jobs.insert(job.job_id.clone(), job);
            self.held.insert(held.job_id.clone(), held);
        }
        Ok((released, refused, ticket, effects))
    }
}
