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

use super::tx::Access;
use super::{Core, CoreError, CoreResult, Effects, Principal};
use crate::store::Ticket;

impl Core {
    /// Moves a queued job to `to`'s printer queue. The administrator may move any job; an owner
    /// only between devices bound to them. One transaction holds both devices' shards.
    pub fn move_job(
        &self,
        principal: &Principal,
        job_id: &JobId,
        to: &DeviceId,
        now: UnixMillis,
    ) -> CoreResult<(JobRecord, Ticket, Effects)> {
        let mut tx = self.open_job_tx(job_id, Access::None, Some(to), principal)?;
        tx.authorize_job_read(principal, job_id)?;
        let mut job = tx.job(job_id)?.clone();
        match principal {
            Principal::Admin => {}
            Principal::Owner(owner) => {
                let owned = tx
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
        let target = tx.active_device(to)?;
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
        tx.put_job(job.clone())?;
        let offer = FeedBody::JobOffered {
            job_id: job_id.clone(),
        };
        tx.append_feed(to, offer, now)?;
        tx.effects.events.push(OpsEvent::JobMoved {
            job_id: job_id.clone(),
            from,
            to: to.clone(),
            by: principal.label(),
            at: now,
        });
        let (ticket, effects) = tx.commit()?;
        Ok((job, ticket, effects))
    }
}
