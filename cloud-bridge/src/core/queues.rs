//! Moving jobs between printer queues (a printer jammed): a queued job is taken off one
//! device's queue and offered to another. The first device's feed still names the job, but a
//! fetch by it is refused (the job is another device's now), so it never prints it, even if
//! it was offline when the job moved and comes back later.

use schemas::data::ErrorCode;
use schemas::feed::FeedBody;
use schemas::job::{JobState, Transition};
use schemas::ops::OpsEvent;
use schemas::records::JobRecord;
use schemas::{DeviceId, JobId, UnixMillis};

use super::{Core, CoreError, CoreResult, Effects, Principal, encode, key};
use crate::store::{Batch, Ticket};

impl Core {
    /// Moves a queued job to `to`'s printer queue. The administrator may move any job; an owner
    /// only between devices bound to them.
    pub fn move_job(
        &mut self,
        principal: &Principal,
        job_id: &JobId,
        to: &DeviceId,
        now: UnixMillis,
    ) -> CoreResult<(JobRecord, Ticket, Effects)> {
        self.authorize_job_read(principal, job_id)?;
        let mut job = self.job(job_id)?.clone();
        match principal {
            Principal::Admin => {}
            Principal::Owner(owner) => {
                let owned = self
                    .device(to)?
                    .owner
                    .as_ref()
                    .is_some_and(|o| o.owner_id == *owner);
                if !owned {
                    return Err(CoreError::new(
                        ErrorCode::Forbidden,
                        format!("device {to} is not bound to owner {owner}"),
                    ));
                }
            }
            Principal::Companion(_) | Principal::User(_) => {
                return Err(CoreError::new(
                    ErrorCode::Forbidden,
                    "only an owner or an administrator moves jobs",
                ));
            }
        }
        let from = job.device_id.clone();
        if from == *to {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                format!("job {job_id} is already in {to}'s queue"),
            ));
        }
        if job.state != JobState::Queued {
            return Err(CoreError::new(
                ErrorCode::InvalidState,
                format!(
                    "only a queued job can be moved; job {job_id} is {}",
                    job.state.as_str()
                ),
            ));
        }
        let target = self.active_device(to)?;
        if let Some(print) = &job.print {
            super::check_print(target, print)?;
        }
        job.device_id = to.clone();
        job.history.push(Transition {
            from: Some(JobState::Queued),
            to: JobState::Queued,
            at: now,
            attempt: job.attempt,
            reason: Some(format!(
                "moved from {from} to {to} by {}",
                principal.label()
            )),
        });
        let mut batch = Batch::default();
        let mut effects = Effects::default();
        batch.put(key("j", job_id.as_str()), encode(&job)?);
        let offer = FeedBody::JobOffered {
            job_id: job_id.clone(),
        };
        self.append_feed(&mut batch, to, offer, now, &mut effects)?;
        let ticket = self.commit(batch)?;
        if let Some(list) = self.device_jobs.get_mut(&from) {
            list.retain(|j| j != job_id);
        }
        self.device_jobs
            .entry(to.clone())
            .or_default()
            .push(job_id.clone());
        if let Some(k) = &job.idempotency_key {
            self.idempotency.remove(&(from.clone(), k.clone()));
            self.idempotency
                .entry((to.clone(), k.clone()))
                .or_insert_with(|| job_id.clone());
        }
        effects.events.push(OpsEvent::JobMoved {
            job_id: job_id.clone(),
            from,
            to: to.clone(),
            by: principal.label(),
            at: now,
        });
        self.jobs.insert(job_id.clone(), job.clone());
        Ok((job, ticket, effects))
    }
}
