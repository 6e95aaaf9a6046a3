//! A round of work over the data channel: what is unreported goes up, every new feed entry is
//! handled, the outbox is delivered; and the owner's confirmation at the panel.

use std::time::Duration;

use schemas::data::{ErrorCode, OwnerClaim};
use schemas::feed::{FeedBody, FeedEntry};
use schemas::outbox::MAX_DELIVER_ITEMS;
use schemas::{JobId, UnixMillis};
use tokio::time::Instant;

use crate::outbox;
use crate::session::{DataSession, SessionError};

use super::{Agent, AgentError, AgentEvent, WorkError};

impl Agent {
    /// One round: report what is unreported, handle every new feed entry, send the status.
    pub(super) async fn work(&mut self) -> Result<(), WorkError> {
        let session = self.session().await?;
        self.last_activity = Instant::now();
        if !self.state.registration_completed {
            // The credentials are on disk: tell the cloud, which only then lets companions
            // send jobs to this device.
            session.complete_registration().await?;
            self.state.registration_completed = true;
            self.save()?;
        }
        if let Some(capabilities) = &self.config.printer
            && self.state.printer_registered.as_ref() != Some(capabilities)
        {
            session.register_printer(capabilities.clone()).await?;
            self.state.printer_registered = Some(capabilities.clone());
            self.save()?;
        }
        if let Some(check) = &self.state.owner_check {
            // Sent again while waiting for the owner: it also tells whether the cloud has
            // given up waiting (the id is then invalidated and this request refused).
            let reason = check.reason.clone();
            let deadline = session.owner_check(reason).await?;
            let first = self.state.owner_check.as_ref().is_some_and(|c| !c.reported);
            match deadline {
                // No owner bound: nothing to confirm.
                None => self.state.owner_check = None,
                Some(_) => {
                    if let Some(check) = self.state.owner_check.as_mut() {
                        check.reported = true;
                    }
                }
            }
            if first {
                self.save()?;
                self.emit(AgentEvent::OwnerCheckStarted { deadline });
            }
        }
        let unreported: Vec<JobId> = self
            .state
            .done
            .iter()
            .filter(|d| !d.reported)
            .map(|d| d.job_id.clone())
            .collect();
        for job_id in unreported {
            self.report_outcome(&session, &job_id).await?;
        }
        self.deliver_outbox(&session).await?;
        // While the owner has not confirmed, jobs wait (the cloud would not hand them out).
        // Each sync after the first acknowledges what the one before it returned.
        let mut ack = None;
        while self.state.owner_check.is_none() {
            let sent_ack = ack.take();
            let (entries, _) = session.sync(self.state.cursor, 0, 64, sent_ack).await?;
            if let Some(cursor) = sent_ack {
                self.emit(AgentEvent::Synced { cursor });
            }
            if entries.is_empty() {
                break;
            }
            for entry in entries {
                self.handle_entry(&session, &entry).await?;
                self.state.cursor = entry.seq;
                self.save()?;
            }
            ack = Some(self.state.cursor);
        }
        if let Some(upto) = ack {
            // Left unsent only when an owner check began meanwhile: acknowledge on its own.
            session.ack(upto).await?;
            self.emit(AgentEvent::Synced { cursor: upto });
        }
        if self.state.owner_check.is_none() && self.state.hinted.take().is_some() {
            // Everything the hint announced has been fetched (the sync reached the end).
            self.save()?;
        }
        let day = Duration::from_secs(24 * 3600).as_millis() as u64;
        let stale = self
            .state
            .contracts_fetched_at
            .is_none_or(|at| UnixMillis::now().0.saturating_sub(at.0) >= day);
        if self.state.owner_check.is_none() && (self.contracts_due || stale) {
            self.sync_contracts(&session).await?;
        }
        // The feed may have asked for something (a consent report).
        self.deliver_outbox(&session).await?;
        if !self.relink {
            self.report_settings(&session).await?;
        }
        self.last_activity = Instant::now();
        Ok(())
    }

    /// Sends the outbox, oldest first, until it is empty.
    pub(super) async fn deliver_outbox(&mut self, session: &DataSession) -> Result<(), WorkError> {
        while !self.state.outbox.is_empty() {
            let items: Vec<_> = self
                .state
                .outbox
                .iter()
                .take(MAX_DELIVER_ITEMS)
                .cloned()
                .collect();
            let (upto, refused) = session.deliver(items).await?;
            let mut handled = Vec::new();
            while self.state.outbox.front().is_some_and(|i| i.no <= upto) {
                if let Some(item) = self.state.outbox.pop_front() {
                    handled.push(item);
                }
            }
            if handled.is_empty() {
                return Err(SessionError::Closed(format!(
                    "the cloud handled none of the outbox (upto {upto})"
                ))
                .into());
            }
            self.save()?;
            for item in handled {
                match refused.iter().find(|r| r.no == item.no) {
                    Some(r) => {
                        tracing::warn!(no = %item.no, kind = item.body.kind(), error = %r.error, "request refused");
                        self.emit(AgentEvent::RequestRefused {
                            no: item.no,
                            error: r.error.clone(),
                        });
                    }
                    None => self.emit(AgentEvent::RequestDelivered {
                        no: item.no,
                        kind: item.body.kind(),
                    }),
                }
            }
        }
        Ok(())
    }

    pub(super) async fn handle_entry(
        &mut self,
        session: &DataSession,
        entry: &FeedEntry,
    ) -> Result<(), WorkError> {
        match &entry.body {
            FeedBody::JobOffered { job_id } => self.run_job(session, job_id).await,
            FeedBody::ConsentQuery => {
                let limit = self.config.outbox_limit;
                outbox::report_consent(&mut self.state, UnixMillis::now(), limit);
                Ok(())
            }
            FeedBody::Settings { revision, settings } => {
                self.apply_settings(*revision, settings);
                Ok(())
            }
            FeedBody::Instruction { instruction_id, .. } => {
                self.take_instruction(session, instruction_id).await
            }
            FeedBody::HeldJobsChanged { user_id } => {
                self.emit(AgentEvent::HeldJobsChanged {
                    user_id: user_id.clone(),
                });
                Ok(())
            }
            FeedBody::ContractsChanged => {
                // Fetched once at the end of this round, however many changes there were.
                self.contracts_due = true;
                Ok(())
            }
            // A cancel of a job not running now needs nothing: the cloud refuses to hand it out.
            FeedBody::JobCanceled { .. } | FeedBody::Unknown => Ok(()),
        }
    }

    /// Sends owner information entered at the panel to the cloud.
    pub(super) async fn confirm_owner(&mut self, owner: OwnerClaim) -> Result<(), AgentError> {
        let session = self
            .session()
            .await
            .map_err(|e| AgentError::Offline(e.to_string()))?;
        match session.confirm_owner(owner).await {
            Ok(_) => {
                self.state.owner_check = None;
                self.save()?;
                self.emit(AgentEvent::OwnerConfirmed);
                Ok(())
            }
            Err(SessionError::Request(body)) if body.code == ErrorCode::DeviceInvalidated => {
                Err(AgentError::Invalidated(body.message))
            }
            Err(SessionError::Request(body)) => Err(AgentError::Refused(body)),
            Err(e) => Err(AgentError::Offline(e.to_string())),
        }
    }
}
