//! What each data-channel request of an authenticated device does: the core decides, the
//! bridge waits until the change (or what was read) is durable, then answers. A sync without
//! entries waits for the feed to grow (long-poll).

use std::time::Duration;

use schemas::data::{ErrorCode, MAX_SYNC_ENTRIES, MAX_SYNC_WAIT_MS, Request, Response};
use schemas::{DeviceId, FeedSeq, Secret};

use crate::bridge::Bridge;
use crate::core::{CoreError, CoreResult, OwnerVerdict, ServiceRegistration};

impl Bridge {
    pub(crate) async fn handle_inner(
        &self,
        device: &DeviceId,
        request: Request,
    ) -> CoreResult<Response> {
        let now = self.now();
        match request {
            Request::Sync {
                after,
                wait_ms,
                limit,
                ack,
            } => {
                if let Some(upto) = ack {
                    // The sync's read below waits for this write to be durable.
                    self.core().ack(device, upto)?;
                }
                self.sync(device, after, wait_ms, limit).await
            }
            Request::Ack { upto } => {
                let (acked, ticket) = self.core().ack(device, upto)?;
                self.durable_read(ticket).await?;
                Ok(Response::Acked { acked })
            }
            Request::FetchJob { job_id, start } => {
                let offer = self
                    .change(|core| core.fetch_job(device, &job_id, start, now))
                    .await?;
                Ok(Response::Job(offer))
            }
            Request::JobUpdate {
                job_id,
                attempt,
                update,
            } => {
                let (state, attempt, ticket, effects) = self
                    .core()
                    .update_job(device, &job_id, attempt, update, now)?;
                self.finish(ticket, effects).await?;
                Ok(Response::JobState {
                    job_id,
                    state,
                    attempt,
                })
            }
            Request::ReportStatus { status } => {
                let (ticket, effects) = self.core().report_status(device, status, now)?;
                self.finish(ticket, effects).await?;
                Ok(Response::StatusAccepted { at: now })
            }
            Request::OwnerCheck { reason } => {
                let deadline = self
                    .change(|core| core.start_owner_check(device, &reason, now))
                    .await?;
                Ok(Response::OwnerCheck { deadline })
            }
            Request::ConfirmOwner { owner } => {
                let verdict = self
                    .change(|core| core.confirm_owner(device, &owner, now))
                    .await?;
                match verdict {
                    OwnerVerdict::Confirmed => Ok(Response::OwnerConfirmed),
                    OwnerVerdict::Invalidated(reason) => Err(CoreError::new(
                        ErrorCode::DeviceInvalidated,
                        format!("device id {device} was invalidated: {reason}"),
                    )),
                }
            }
            Request::CompleteRegistration => {
                let (at, ticket) = self.core().complete_registration(device, now)?;
                self.durable_read(ticket).await?;
                Ok(Response::RegistrationCompleted { at })
            }
            Request::Deliver { items } => {
                let (upto, refused, ticket, effects) = self.core().deliver(device, items, now)?;
                self.finish(ticket, effects).await?;
                Ok(Response::Delivered { upto, refused })
            }
            Request::TakeInstruction { instruction_id } => {
                let (offer, ticket) = self.core().take_instruction(device, &instruction_id, now)?;
                self.durable_read(ticket).await?;
                Ok(Response::Instruction(offer))
            }
            Request::RegisterService { url, code } => {
                let outcome = self
                    .change(|core| core.register_service(device, &url, &code, now))
                    .await?;
                match outcome {
                    ServiceRegistration::Registered { service_id, at } => {
                        Ok(Response::ServiceRegistered { service_id, at })
                    }
                    ServiceRegistration::Refused(e) => Err(e),
                }
            }
            Request::Login { user_id, pin } => {
                let token = Secret::from_random(rand::random());
                let (expires_at, held) = self.core().login(device, &user_id, &pin, &token, now)?;
                Ok(Response::LoggedIn {
                    session: token,
                    expires_at,
                    held,
                })
            }
            Request::HeldJobs { session } => {
                let (held, ticket) = {
                    let core = self.core();
                    (
                        core.session_held_jobs(device, &session, now)?,
                        core.read_ticket(),
                    )
                };
                self.durable_read(ticket).await?;
                Ok(Response::Held { held })
            }
            Request::Release { session, jobs } => {
                let (released, refused, ticket, effects) =
                    self.core().release(device, &session, &jobs, now)?;
                self.finish(ticket, effects).await?;
                Ok(Response::Released { released, refused })
            }
            Request::Logout { session } => {
                self.core().logout(device, &session)?;
                Ok(Response::LoggedOut)
            }
            Request::RegisterPrinter { capabilities } => {
                let (at, ticket) = self.core().register_printer(device, capabilities, now)?;
                self.durable_read(ticket).await?;
                Ok(Response::PrinterRegistered { at })
            }
            Request::Contracts => {
                let (contracts, ticket) = {
                    let core = self.core();
                    (core.contract_info(device)?, core.read_ticket())
                };
                self.durable_read(ticket).await?;
                Ok(Response::Contracts { contracts })
            }
            Request::ActivateService {
                service_id,
                application_id,
            } => {
                let control = self
                    .change(|core| core.activate_service(device, &service_id, &application_id, now))
                    .await?;
                Ok(Response::DeviceControl(control))
            }
            Request::ReportSettings { report } => {
                let (ticket, effects) = self.core().report_settings(device, report, now)?;
                self.finish(ticket, effects).await?;
                Ok(Response::SettingsRecorded { at: now })
            }
        }
    }

    /// Entries after `after`; if there are none, waits up to `wait_ms` for some (long-poll).
    async fn sync(
        &self,
        device: &DeviceId,
        after: FeedSeq,
        wait_ms: u32,
        limit: u16,
    ) -> CoreResult<Response> {
        let limit = usize::from(limit.clamp(1, MAX_SYNC_ENTRIES));
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(u64::from(wait_ms.min(MAX_SYNC_WAIT_MS)));
        // Subscribe before reading, so growth between the read and the wait is not missed.
        let mut rx = self.feed_watch(device).subscribe();
        loop {
            let (entries, newest, ticket) = {
                let core = self.core();
                let (entries, newest) = core.feed_after(device, after, limit)?;
                (entries, newest, core.read_ticket())
            };
            self.durable_read(ticket).await?;
            if !entries.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(Response::Feed { entries, newest });
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return Ok(Response::Feed { entries, newest }),
            }
        }
    }
}
