//! Running a job exactly once on the device: its outcome is on disk before it is reported.

use std::time::Duration;

use schemas::agent::DoneJob;
use schemas::data::{ErrorCode, JobOffer};
use schemas::job::JobUpdate;
use schemas::{JobId, UnixMillis};
use tokio::time::Instant;

use crate::executor::JobOutcome;
use crate::session::{DataSession, SessionError};

use super::{Agent, AgentEvent, DONE_LIMIT, WorkError};

impl Agent {
    pub(super) async fn run_job(
        &mut self,
        session: &DataSession,
        job_id: &JobId,
    ) -> Result<(), WorkError> {
        if let Some(done) = self.state.done.iter().find(|d| &d.job_id == job_id) {
            if !done.reported {
                self.report_outcome(session, job_id).await?;
            }
            return Ok(());
        }
        // The job starts as soon as it is here: fetching it also records it started.
        let offer = match session.fetch_job(job_id.clone(), true).await {
            Ok(offer) => offer,
            // Canceled, expired, finished: nothing to run.
            Err(e) if is_final_refusal(&e) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let attempt = offer.attempt;
        self.emit(AgentEvent::JobFetched {
            job_id: job_id.clone(),
            attempt,
        });
        self.emit(AgentEvent::JobStarted {
            job_id: job_id.clone(),
            attempt,
        });
        let Some(outcome) = self.execute(session, offer).await else {
            self.emit(AgentEvent::JobCanceled {
                job_id: job_id.clone(),
            });
            return Ok(());
        };
        let update = match &outcome {
            JobOutcome::Succeeded { detail } => JobUpdate::Succeeded {
                detail: detail.clone(),
            },
            JobOutcome::Failed { reason } => JobUpdate::Failed {
                reason: reason.clone(),
            },
            JobOutcome::Rejected { reason } => JobUpdate::Rejected {
                reason: reason.clone(),
            },
        };
        self.state.done.push_back(DoneJob {
            job_id: job_id.clone(),
            attempt,
            outcome: update,
            reported: false,
        });
        while self.state.done.len() > DONE_LIMIT {
            match self.state.done.iter().position(|d| d.reported) {
                Some(i) => {
                    self.state.done.remove(i);
                }
                None => break,
            }
        }
        self.save()?;
        self.emit(AgentEvent::JobFinished {
            job_id: job_id.clone(),
            attempt,
            outcome,
        });
        // The job changed the counters: they go with the round's outbox delivery.
        if let Err(e) = self.queue_counters().await {
            tracing::warn!(error = %e, "counters not queued");
        }
        self.report_outcome(session, job_id).await
    }

    /// Runs a job, renewing its lease; `None` if it was canceled or its lease lost meanwhile.
    pub(super) async fn execute(
        &self,
        session: &DataSession,
        offer: JobOffer,
    ) -> Option<JobOutcome> {
        let server_now = UnixMillis::now().0 as i64 + self.skew_ms;
        let remaining = (offer.lease_until.0 as i64 - server_now).max(300) as u64;
        let renew_every = Duration::from_millis((remaining / 3).clamp(100, 20_000));
        let job_id = offer.job_id.clone();
        let attempt = offer.attempt;
        let mut run = self.executor.run(offer);
        let mut renew = tokio::time::interval_at(Instant::now() + renew_every, renew_every);
        loop {
            tokio::select! {
                outcome = &mut run => return Some(outcome),
                _ = renew.tick() => {
                    let progress = JobUpdate::Progress { percent: 0 };
                    match session.update_job(job_id.clone(), attempt, progress).await {
                        Ok(_) => {}
                        Err(e) if is_final_refusal(&e) || e.code() == Some(ErrorCode::LeaseLost) => return None,
                        // A network blip does not stop a print; the outcome is reported later.
                        Err(e) => tracing::debug!(error = %e, "lease renewal failed"),
                    }
                }
            }
        }
    }

    pub(super) async fn report_outcome(
        &mut self,
        session: &DataSession,
        job_id: &JobId,
    ) -> Result<(), WorkError> {
        let Some(done) = self
            .state
            .done
            .iter()
            .find(|d| &d.job_id == job_id)
            .cloned()
        else {
            return Ok(());
        };
        let report =
            |attempt: u32| session.update_job(job_id.clone(), attempt, done.outcome.clone());
        let result = match report(done.attempt).await {
            Err(e) if e.code() == Some(ErrorCode::LeaseLost) => {
                // The lease ran out before we could report: take the job again, report the
                // recorded outcome under the new attempt. It is not run again.
                match session.fetch_job(job_id.clone(), false).await {
                    Ok(offer) => report(offer.attempt).await,
                    Err(e) => Err(e),
                }
            }
            other => other,
        };
        match result {
            Ok(_) => {}
            Err(e) if is_final_refusal(&e) => {
                tracing::info!(%job_id, error = %e, "outcome no longer wanted")
            }
            Err(e) => return Err(e.into()),
        }
        if let Some(d) = self.state.done.iter_mut().find(|d| &d.job_id == job_id) {
            d.reported = true;
        }
        self.save()?;
        self.emit(AgentEvent::JobReported {
            job_id: job_id.clone(),
        });
        Ok(())
    }
}

/// Errors after which asking again cannot help.
fn is_final_refusal(e: &SessionError) -> bool {
    matches!(
        e.code(),
        Some(ErrorCode::InvalidState | ErrorCode::NotFound | ErrorCode::Forbidden)
    )
}
