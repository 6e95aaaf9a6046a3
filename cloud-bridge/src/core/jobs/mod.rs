//! The job lifecycle: submission, taking a job under a lease, reports on an attempt,
//! cancelation, and the reaper that applies leases and TTLs as they fall due.
//!
//! A job is `queued` until a device takes it (`delivered`, under a lease), then
//! `in_progress`, and ends `succeeded`, `failed`, `rejected`, `canceled` or `expired`. A lease
//! that runs out puts the job back in the queue for another attempt, up to its limit.

use schemas::api::JobsQuery;
use schemas::data::{ErrorCode, JobOffer};
use schemas::feed::FeedBody;
use schemas::job::{JobState, JobUpdate, Transition};
use schemas::records::JobRecord;
use schemas::{DeviceId, JobId, UnixMillis};

use super::keys::{Kind, device_job_key, job_of_key};
use super::tx::{Access, Tx};
use super::{
    Core, CoreError, CoreResult, Effects, NewJob, Principal, check_print, transition_event,
    truncate,
};
use crate::store::Ticket;

/// Moves a job to `to`, recording the transition and its ops event. The caller stages the job.
pub(super) fn transition(
    job: &mut JobRecord,
    to: JobState,
    reason: Option<String>,
    now: UnixMillis,
    effects: &mut Effects,
) {
    debug_assert!(job.state.can_become(to), "{:?} -> {:?}", job.state, to);
    job.history.push(Transition {
        from: Some(job.state),
        to,
        at: now,
        attempt: job.attempt,
        reason: reason.clone(),
    });
    job.state = to;
    if to.is_terminal() {
        job.lease_until = None;
        if reason.is_some() {
            job.outcome = reason;
        }
    }
    effects.events.push(transition_event(job));
}

/// A new job as the queue sees it first.
pub(super) fn queued_job(
    job_id: JobId,
    device_id: DeviceId,
    created_at: UnixMillis,
    expires_at: UnixMillis,
    max_attempts: u32,
    reason: Option<String>,
) -> JobRecord {
    JobRecord {
        job_id,
        device_id,
        state: JobState::Queued,
        attempt: 0,
        max_attempts,
        created_at,
        expires_at,
        lease_until: None,
        idempotency_key: None,
        content_type: String::new(),
        payload_len: 0,
        outcome: None,
        submitted_by: None,
        print: None,
        request_sha256: None,
        history: vec![Transition {
            from: None,
            to: JobState::Queued,
            at: created_at,
            attempt: 0,
            reason,
        }],
    }
}

impl Core {
    pub fn submit_job(
        &self,
        device_id: &DeviceId,
        new: NewJob,
        now: UnixMillis,
    ) -> CoreResult<(JobRecord, bool, Ticket, Effects)> {
        // Hashed before locking: the payload may be a megabyte.
        let fingerprint = match &new.idempotency_key {
            Some(_) => Some(new.fingerprint()?),
            None => None,
        };
        if let Some(key) = &new.idempotency_key
            && !(1..=128).contains(&key.chars().count())
        {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                "idempotency_key must be 1 to 128 characters",
            ));
        }
        let shard = self.shard_index(device_id);
        let (mut tx, device) = loop {
            // The key's job may have finished (then it is on disk only): looked up there
            // before locking, and looked up again if a job of the shard finished meanwhile.
            let finished_so_far = self.finished_count(shard);
            let stored = match &new.idempotency_key {
                Some(key) => match self.stored_idempotency(device_id, key)? {
                    Some(id) => self.stored_job(&id)?,
                    None => None,
                },
                None => None,
            };
            let tx = self.device_tx(device_id);
            let device = tx.active_device(device_id)?.clone();
            let Some(key) = &new.idempotency_key else {
                break (tx, device);
            };
            let slot = (device_id.clone(), key.clone());
            let existing = match tx.shard(device_id)?.idempotency.get(&slot) {
                Some(open) => Some(tx.job(open)?.clone()),
                None => stored,
            };
            if let Some(job) = existing {
                // Jobs stored before fingerprints were kept have none: answered as before.
                if job.request_sha256.is_some() && job.request_sha256 != fingerprint {
                    return Err(CoreError::new(
                        ErrorCode::Conflict,
                        format!(
                            "idempotency_key {key:?} was already used for a different \
                             submission to this device; a new job needs a new key"
                        ),
                    ));
                }
                return Ok((job, false, self.read_ticket(), Effects::default()));
            }
            if self.finished_count(shard) == finished_so_far {
                break (tx, device);
            }
        };
        let device = &device;
        if new.payload.len() > schemas::MAX_PAYLOAD_BYTES {
            return Err(CoreError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "payload of {} bytes exceeds the limit of {} bytes",
                    new.payload.len(),
                    schemas::MAX_PAYLOAD_BYTES
                ),
            ));
        }
        if !(1..=128).contains(&new.content_type.chars().count()) {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                "content_type must be 1 to 128 characters",
            ));
        }
        let max_attempts = new.max_attempts.unwrap_or(self.policy.default_max_attempts);
        if max_attempts == 0 || max_attempts > self.policy.max_attempts_limit {
            // 0 is outside the schema; a number over the configured limit is not.
            let code = if max_attempts == 0 {
                ErrorCode::BadRequest
            } else {
                ErrorCode::InvalidValue
            };
            return Err(CoreError::new(
                code,
                format!(
                    "max_attempts must be 1 to {} (this bridge's jobs.max_attempts_limit)",
                    self.policy.max_attempts_limit
                ),
            ));
        }
        let ttl_ms = new.ttl_ms.unwrap_or(self.policy.default_ttl_ms);
        if ttl_ms == 0 {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                "ttl must be positive",
            ));
        }
        if let Some(print) = &new.print {
            check_print(device, print)?;
        }
        let job_id = tx.fresh_job_id(now);
        let mut job = queued_job(
            job_id.clone(),
            device_id.clone(),
            now,
            now.saturating_add_ms(ttl_ms),
            max_attempts,
            None,
        );
        job.idempotency_key = new.idempotency_key;
        job.request_sha256 = fingerprint;
        job.content_type = new.content_type;
        job.payload_len = new.payload.len() as u64;
        job.submitted_by = new.submitted_by;
        job.print = new.print;
        tx.put_raw(Kind::Payload.key(job_id.as_str()), new.payload);
        tx.append_feed(device_id, FeedBody::JobOffered { job_id }, now)?;
        tx.effects.events.push(transition_event(&job));
        tx.put_job(job.clone())?;
        let (ticket, effects) = tx.commit()?;
        Ok((job, true, ticket, effects))
    }

    /// A job, open (in memory) or finished (on disk, until its retention ends).
    pub fn job(&self, id: &JobId) -> CoreResult<JobRecord> {
        match self.job_tx(id, Access::None, None) {
            Ok(tx) => Ok(tx.job(id)?.clone()),
            Err(e) if e.code() == ErrorCode::NotFound => match self.stored_job(id)? {
                // Finished after the directory was asked, or long before.
                Some(job) if job.state.is_terminal() => Ok(job),
                _ => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// A device's jobs, open and finished, in id order (the order of submission), from the
    /// first after `after`, at most `limit`.
    pub fn device_jobs(
        &self,
        device_id: &DeviceId,
        page: &JobsQuery,
    ) -> CoreResult<Vec<JobRecord>> {
        self.device(device_id)?;
        let first = device_job_key(device_id, &JobId::from_random([0; 8]));
        let after = page.after.as_ref().map(|id| device_job_key(device_id, id));
        let keys = self.device_page(Kind::DeviceJob, device_id, first, after, page)?;
        let mut jobs = Vec::new();
        for (k, _) in keys {
            let Some(id) = job_of_key(&k) else { continue };
            let open = self.with_shard(device_id, |s| s.jobs.get(&id).cloned());
            // Not open: finished (after the index was read, or before).
            let job = match open {
                Some(job) => Some(job),
                None => self.stored_job(&id)?,
            };
            // A job moved to another device since the index was read is that device's.
            jobs.extend(job.filter(|j| j.device_id == *device_id));
        }
        Ok(jobs)
    }

    /// A device takes a job: the first take of an attempt moves it to `delivered` under a
    /// lease; taking again while holding the lease renews it.
    ///
    /// With `start`, the device starts the job at once: `delivered` and `in_progress` are
    /// recorded in one write (a job already in progress stays so).
    ///
    /// The payload is read first, without any lock, and only for a job the directory says is
    /// the device's own (for any other the take is tried, in a transaction that is dropped, for
    /// its refusal); then the take is made. A payload that cannot be read changes nothing.
    pub fn fetch_job(
        &self,
        device_id: &DeviceId,
        job_id: &JobId,
        start: bool,
        now: UnixMillis,
    ) -> CoreResult<(JobOffer, Ticket, Effects)> {
        if !self.jobs.belongs_to(job_id, device_id) {
            let refused = take(
                &mut self.device_tx(device_id),
                device_id,
                job_id,
                start,
                now,
            );
            match refused {
                Err(e) if e.code() == ErrorCode::NotFound => {
                    let job = self.finished_job_of(device_id, job_id)?;
                    return Err(CoreError::new(
                        ErrorCode::InvalidState,
                        format!("job {job_id} is {}", job.state.as_str()),
                    ));
                }
                refused => {
                    refused?;
                }
            }
        }
        let payload = self.stored_payload(job_id)?.ok_or_else(|| {
            CoreError::new(ErrorCode::Internal, format!("payload of {job_id} missing"))
        })?;
        let mut tx = self.device_tx(device_id);
        let job = take(&mut tx, device_id, job_id, start, now)?;
        let (ticket, effects) = tx.commit()?;
        let offer = JobOffer {
            job_id: job_id.clone(),
            attempt: job.attempt,
            lease_until: job.lease_until.unwrap_or(now),
            content_type: job.content_type,
            payload,
            print: job.print,
        };
        Ok((offer, ticket, effects))
    }

    /// A device reports on the attempt it holds.
    pub fn update_job(
        &self,
        device_id: &DeviceId,
        job_id: &JobId,
        attempt: u32,
        update: JobUpdate,
        now: UnixMillis,
    ) -> CoreResult<(JobState, u32, Ticket, Effects)> {
        let final_state = match &update {
            JobUpdate::Succeeded { .. } => Some(JobState::Succeeded),
            JobUpdate::Failed { .. } => Some(JobState::Failed),
            JobUpdate::Rejected { .. } => Some(JobState::Rejected),
            JobUpdate::Started | JobUpdate::Progress { .. } => None,
        };
        let mut tx = self.device_tx(device_id);
        tx.active_device(device_id)?;
        let mut job = match tx.own_job(device_id, job_id) {
            Ok(job) => job.clone(),
            Err(e) if e.code() == ErrorCode::NotFound => {
                drop(tx);
                // Finished, so in the store only.
                let job = self.finished_job_of(device_id, job_id)?;
                // A resent final report of the attempt that finished the job is answered as
                // before.
                if final_state == Some(job.state) && attempt == job.attempt {
                    let ticket = self.read_ticket();
                    return Ok((job.state, job.attempt, ticket, Effects::default()));
                }
                return Err(CoreError::new(
                    ErrorCode::InvalidState,
                    format!("job {job_id} is already {}", job.state.as_str()),
                ));
            }
            Err(e) => return Err(e),
        };
        if job.state == JobState::Queued || attempt != job.attempt {
            return Err(CoreError::new(
                ErrorCode::LeaseLost,
                format!(
                    "attempt {attempt} of job {job_id} no longer holds the lease (job is {} at attempt {}); take it again",
                    job.state.as_str(),
                    job.attempt
                ),
            ));
        }
        let lease = Some(now.saturating_add_ms(self.policy.lease_ms));
        let effects = &mut tx.effects;
        match update {
            JobUpdate::Started if job.state == JobState::Delivered => {
                transition(&mut job, JobState::InProgress, None, now, effects);
                job.lease_until = lease;
            }
            JobUpdate::Started | JobUpdate::Progress { .. } => job.lease_until = lease,
            JobUpdate::Succeeded { detail } => {
                job.outcome = detail;
                transition(&mut job, JobState::Succeeded, None, now, effects);
            }
            JobUpdate::Failed { reason } => {
                let reason = Some(truncate(reason));
                transition(&mut job, JobState::Failed, reason, now, effects);
            }
            JobUpdate::Rejected { reason } => {
                let reason = Some(truncate(reason));
                transition(&mut job, JobState::Rejected, reason, now, effects);
            }
        }
        let result = (job.state, job.attempt);
        tx.put_job(job)?;
        let (ticket, effects) = tx.commit()?;
        Ok((result.0, result.1, ticket, effects))
    }

    pub fn cancel_job(
        &self,
        job_id: &JobId,
        reason: Option<String>,
        now: UnixMillis,
    ) -> CoreResult<(JobRecord, Ticket, Effects)> {
        let mut tx = self.open_job_tx(job_id, Access::None, None, &Principal::Admin)?;
        let mut job = tx.job(job_id)?.clone();
        if job.state.is_terminal() {
            return Err(CoreError::new(
                ErrorCode::InvalidState,
                format!("job {job_id} is already {}", job.state.as_str()),
            ));
        }
        let was_taken = job.state != JobState::Queued;
        let reason = truncate(reason.unwrap_or_else(|| "canceled by administrator".into()));
        transition(
            &mut job,
            JobState::Canceled,
            Some(reason),
            now,
            &mut tx.effects,
        );
        if was_taken {
            let body = FeedBody::JobCanceled {
                job_id: job_id.clone(),
            };
            tx.append_feed(&job.device_id, body, now)?;
        }
        tx.put_job(job.clone())?;
        let (ticket, effects) = tx.commit()?;
        Ok((job, ticket, effects))
    }

    /// When the next lease, TTL or owner check falls due, if any.
    pub fn next_deadline(&self) -> Option<UnixMillis> {
        let next = self
            .deadlines
            .iter()
            .map(|d| d.load(std::sync::atomic::Ordering::Acquire))
            .min()
            .unwrap_or(u64::MAX);
        (next != u64::MAX).then_some(UnixMillis(next))
    }

    /// Applies every lease, TTL and owner check that has fallen due by `now`: one
    /// transaction per shard with something due. The ticket returned covers all of them.
    pub fn expire_due(&self, now: UnixMillis) -> CoreResult<(Option<Ticket>, Effects)> {
        let mut ticket = None;
        let mut effects = Effects::default();
        for shard in 0..self.shards.len() {
            if self.deadlines[shard].load(std::sync::atomic::Ordering::Acquire) > now.0 {
                continue; // Nothing due in this shard.
            }
            let mut tx = Tx::over_shards(self, Access::None, [shard]);
            expire_shard(&mut tx, now)?;
            if tx.is_empty() {
                continue;
            }
            let (t, e) = tx.commit()?;
            ticket = ticket.max(Some(t));
            effects.feed_grew.extend(e.feed_grew);
            effects.events.extend(e.events);
        }
        Ok((ticket, effects))
    }
}

/// The state change of a take (see [`Core::fetch_job`]), staged in `tx`; the job as taken.
fn take(
    tx: &mut Tx<'_>,
    device_id: &DeviceId,
    job_id: &JobId,
    start: bool,
    now: UnixMillis,
) -> CoreResult<JobRecord> {
    if let Some(check) = &tx.active_device(device_id)?.owner_check {
        return Err(CoreError::new(
            ErrorCode::OwnerCheckPending,
            format!(
                "the owner has not yet confirmed ({}); no jobs until then",
                check.reason
            ),
        ));
    }
    let mut job = tx.own_job(device_id, job_id)?.clone();
    let lease = Some(now.saturating_add_ms(tx.policy().lease_ms));
    let effects = &mut tx.effects;
    match job.state {
        JobState::Queued if job.expires_at <= now => {
            // The reaper records the expiry at its deadline; until then, refuse to start it.
            return Err(CoreError::new(
                ErrorCode::InvalidState,
                format!("job {job_id} expired"),
            ));
        }
        JobState::Queued => {
            job.attempt += 1;
            job.lease_until = lease;
            transition(&mut job, JobState::Delivered, None, now, effects);
        }
        JobState::Delivered | JobState::InProgress => job.lease_until = lease,
        state => {
            return Err(CoreError::new(
                ErrorCode::InvalidState,
                format!("job {job_id} is {}", state.as_str()),
            ));
        }
    }
    if start && job.state == JobState::Delivered {
        transition(&mut job, JobState::InProgress, None, now, effects);
    }
    tx.put_job(job.clone())?;
    Ok(job)
}

/// Stages in `tx` (over one shard) every lease, TTL and owner check of that shard due by `now`.
fn expire_shard(tx: &mut Tx<'_>, now: UnixMillis) -> CoreResult<()> {
    let (due_leases, due_expiries) = {
        let shard = tx.shards().next().ok_or_else(|| {
            CoreError::new(ErrorCode::Internal, "the reaper's transaction has no shard")
        })?;
        let due = |set: &std::collections::BTreeSet<(UnixMillis, JobId)>| -> Vec<JobId> {
            set.iter()
                .take_while(|(t, _)| *t <= now)
                .map(|(_, id)| id.clone())
                .collect()
        };
        (due(&shard.leases), due(&shard.expiries))
    };
    for id in due_leases {
        let mut job = tx.job(&id)?.clone();
        if job.attempt >= job.max_attempts {
            let reason = format!(
                "lease expired on attempt {} of {}",
                job.attempt, job.max_attempts
            );
            transition(
                &mut job,
                JobState::Failed,
                Some(reason),
                now,
                &mut tx.effects,
            );
        } else {
            let reason = Some("lease expired".to_owned());
            transition(&mut job, JobState::Queued, reason, now, &mut tx.effects);
            job.lease_until = None;
            let offer = FeedBody::JobOffered { job_id: id.clone() };
            tx.append_feed(&job.device_id, offer, now)?;
        }
        tx.put_job(job)?;
    }
    for id in due_expiries {
        // As staged by the leases above: a job they requeued keeps its expiry.
        let mut job = tx.job(&id)?.clone();
        if job.expires_at > now {
            continue;
        }
        if job.state.can_become(JobState::Expired) {
            let reason = Some("ttl passed before the job was started".to_owned());
            transition(&mut job, JobState::Expired, reason, now, &mut tx.effects);
            tx.put_job(job)?;
        }
    }
    tx.expire_owner_checks(now)
}

#[cfg(test)]
mod tests;
