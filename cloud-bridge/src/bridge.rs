//! The bridge service: [`Core`] behind a lock, made durable and observable.
//!
//! Every operation follows one pattern: take the lock, let [`Core`] decide and write a batch,
//! release the lock, wait until the batch is durable, then act on the [`Effects`] (wake
//! long-polls, publish hints and ops events). Reads also wait for everything they saw to be
//! durable, so no one is ever shown data that a crash could take back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use schemas::api::{
    ApplicationView, ApplyForService, CompanionCreated, CompanionView, CreateCompanion,
    CreateEnrollmentToken, CreateInstruction, CreateOwner, CreateService, CreateUser, CustomerView,
    DeviceView, EnrollmentTokenCreated, InstructionView, JobView, OwnerCreated, PollNow,
    PollNowPlan, PutContract, SettingsView, SubmitHeldJob, SubmitJob, UpdateService, UserCreated,
};
use schemas::data::{
    ErrorCode, MAX_SYNC_ENTRIES, MAX_SYNC_WAIT_MS, Registration, Request, Response,
};
use schemas::hint::{HintKind, Presence};
use schemas::ops::{Channel, OpsEvent};
use schemas::outbox::RequestNo;
use schemas::print::{Capabilities, HeldJobRecord};
use schemas::records::{DeviceRecord, DeviceRequestRecord};
use schemas::services::{ContractRecord, InstructionBody, ServiceRecord};
use schemas::settings::DeviceSettings;
use schemas::{
    ApplicationId, CompanionId, DeviceId, FeedSeq, InstructionId, JobId, OwnerId, Secret,
    UnixMillis, UserId,
};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::core::{
    AuthFailure, Core, CoreError, CoreResult, Effects, NewJob, OwnerVerdict, Principal,
    ServiceRegistration,
};
use crate::notifier::Notifier;
use crate::sessions::{DataSession, DataSessions};
use crate::store::{Committer, Ticket};

/// Counters shown by `GET /v1/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub jobs_submitted: AtomicU64,
    pub requests: AtomicU64,
    pub request_errors: AtomicU64,
    pub data_connections: AtomicU64,
    pub data_connections_open: AtomicU64,
    pub presence_hints: AtomicU64,
    /// Idle admin connections closed to make room for new ones (at `admin.max_connections`).
    pub admin_evicted: Arc<AtomicU64>,
}

#[derive(Debug)]
struct Inner {
    core: Core,
    committer: Arc<Committer>,
    notifier: Notifier,
    /// Durable newest sequence number per device, for long-polls.
    feeds: Mutex<HashMap<DeviceId, watch::Sender<FeedSeq>>>,
    reaper: Notify,
    metrics: Metrics,
    broker_mode: String,
    /// The embedded broker, once started (none with an external broker).
    embedded: OnceLock<broker::EmbeddedBroker>,
    data_sessions: Arc<DataSessions>,
}

/// Cheap to clone; all clones share one state.
#[derive(Debug, Clone)]
pub struct Bridge {
    inner: Arc<Inner>,
}

impl Bridge {
    pub fn new(
        core: Core,
        committer: Arc<Committer>,
        notifier: Notifier,
        broker_mode: &str,
    ) -> Bridge {
        Bridge {
            inner: Arc::new(Inner {
                core,
                committer,
                notifier,
                feeds: Mutex::new(HashMap::new()),
                reaper: Notify::new(),
                metrics: Metrics::default(),
                broker_mode: broker_mode.to_owned(),
                embedded: OnceLock::new(),
                data_sessions: Arc::new(DataSessions::default()),
            }),
        }
    }

    pub(crate) fn core(&self) -> &Core {
        &self.inner.core
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn notifier(&self) -> &Notifier {
        &self.inner.notifier
    }

    pub fn committer(&self) -> &Arc<Committer> {
        &self.inner.committer
    }

    /// The regular poll devices are asked to keep.
    pub fn poll_interval_secs(&self) -> u32 {
        self.core().policy().poll_interval_secs
    }

    pub fn broker_mode(&self) -> &str {
        &self.inner.broker_mode
    }

    /// Waits for `ticket`, then wakes long-polls and publishes hints and events.
    async fn finish(&self, ticket: Ticket, effects: Effects) -> CoreResult<()> {
        self.inner.committer.wait_durable(ticket).await?;
        for (device, seq) in effects.feed_grew {
            self.feed_watch(&device).send_if_modified(|s| {
                let grew = *s < seq;
                *s = (*s).max(seq);
                grew
            });
            self.inner.notifier.hint(&device, HintKind::Feed, seq);
        }
        for event in effects.events {
            if let OpsEvent::DeviceDisabled { device_id, .. }
            | OpsEvent::DeviceInvalidated { device_id, .. } = &event
            {
                self.revoke(device_id);
            }
            if let OpsEvent::DeviceInvalidated { device_id, .. } = &event {
                // Tell the device now, so it stops and registers again: its next request is
                // refused with the reason. Its long-polls wake too.
                let watch = self.feed_watch(device_id);
                watch.send_modify(|_| {});
                let newest = *watch.borrow();
                self.inner
                    .notifier
                    .hint(device_id, HintKind::PollNow, newest);
            }
            self.inner.notifier.ops(&event);
        }
        self.inner.reaper.notify_one();
        Ok(())
    }

    /// Closes a disabled or invalidated device's open connections: its data-channel
    /// connections (each is told why) and its MQTT session on the embedded broker, whose
    /// persistent session is forgotten. Its credentials are refused from then on.
    fn revoke(&self, device: &DeviceId) {
        let closed = self.inner.data_sessions.close_all(device);
        if let Some(embedded) = self.inner.embedded.get().cloned() {
            let device = device.clone();
            // The router's queue may be full for a moment: wait on a blocking thread.
            tokio::task::spawn_blocking(move || {
                if let Err(e) = embedded.disconnect(device.as_str()) {
                    tracing::error!(%device, error = %e, "could not close the MQTT session");
                }
            });
        }
        tracing::info!(%device, data_connections = closed, "device's connections closed");
    }

    /// The embedded broker, for session control and health (once, at start-up).
    pub fn attach_broker(&self, embedded: broker::EmbeddedBroker) {
        let _ = self.inner.embedded.set(embedded);
    }

    pub fn embedded_broker(&self) -> Option<&broker::EmbeddedBroker> {
        self.inner.embedded.get()
    }

    /// Registers an open data-channel connection of `device`, closed by [`Self::revoke`].
    pub fn data_session(&self, device: &DeviceId) -> DataSession {
        self.inner.data_sessions.open(device)
    }

    /// Why `device` may no longer use its connections, if it may not.
    pub fn refusal(&self, device: &DeviceId) -> Option<CoreError> {
        self.core().check_active(device).err()
    }

    async fn durable_read(&self, ticket: Ticket) -> CoreResult<()> {
        Ok(self.inner.committer.wait_durable(ticket).await?)
    }

    fn feed_watch(&self, device: &DeviceId) -> watch::Sender<FeedSeq> {
        let mut feeds = self.inner.feeds.lock().unwrap_or_else(|p| p.into_inner());
        feeds
            .entry(device.clone())
            .or_insert_with(|| watch::channel(FeedSeq::ZERO).0)
            .clone()
    }

    // ---------------------------------------------------------------- registry

    pub async fn create_enrollment(
        &self,
        req: CreateEnrollmentToken,
    ) -> CoreResult<EnrollmentTokenCreated> {
        let token = Secret::from_random(rand::random());
        let max_uses = req.max_uses.unwrap_or(1);
        let ttl_ms = req.ttl_secs.unwrap_or(24 * 3600).saturating_mul(1000);
        let (record, ticket) = self.core().create_enrollment(
            token.clone(),
            req.customer,
            max_uses,
            ttl_ms,
            UnixMillis::now(),
        )?;
        self.finish(ticket, Effects::default()).await?;
        Ok(EnrollmentTokenCreated {
            token,
            customer: record.customer,
            expires_at: record.expires_at,
            max_uses,
        })
    }

    /// Registers a device; returns its record and its secret (to be given to it once).
    pub async fn register(&self, reg: &Registration) -> CoreResult<(DeviceRecord, Secret)> {
        let secret = Secret::from_random(rand::random());
        let id = DeviceId::from_random(rand::random());
        let (device, ticket, effects) =
            self.core().register(reg, id, &secret, UnixMillis::now())?;
        self.finish(ticket, effects).await?;
        Ok((device, secret))
    }

    pub fn authenticate(&self, device_id: &str, secret: &str) -> Result<DeviceRecord, AuthFailure> {
        self.core().authenticate(device_id, secret)
    }

    /// Whether a device may still use its data channel (it may be disabled meanwhile).
    pub fn is_active(&self, device_id: &DeviceId) -> bool {
        self.core().check_active(device_id).is_ok()
    }

    pub async fn devices(&self) -> CoreResult<Vec<DeviceView>> {
        let (mut list, ticket) = {
            let core = self.core();
            let list: Vec<DeviceView> = core.devices().iter().map(DeviceView::from).collect();
            (list, core.read_ticket())
        };
        self.durable_read(ticket).await?;
        list.sort_by_key(|d| d.registered_at);
        Ok(list)
    }

    pub async fn device(&self, id: &DeviceId) -> CoreResult<DeviceView> {
        let (view, ticket) = {
            let core = self.core();
            (DeviceView::from(&core.device(id)?), core.read_ticket())
        };
        self.durable_read(ticket).await?;
        Ok(view)
    }

    pub async fn disable_device(&self, id: &DeviceId) -> CoreResult<DeviceView> {
        let (device, ticket, effects) = self.core().disable_device(id, UnixMillis::now())?;
        self.finish(ticket, effects).await?;
        // Wake its long-polls so they notice.
        self.feed_watch(id).send_modify(|_| {});
        Ok(DeviceView::from(&device))
    }

    /// Requests accepted from a device's outbox after `after`, oldest first.
    pub async fn device_requests(
        &self,
        id: &DeviceId,
        after: RequestNo,
        limit: usize,
    ) -> CoreResult<Vec<DeviceRequestRecord>> {
        let (list, ticket) = {
            let core = self.core();
            (core.device_requests(id, after, limit)?, core.read_ticket())
        };
        self.durable_read(ticket).await?;
        Ok(list)
    }

    /// Asks a device to report its consent setting (answered through its outbox).
    pub async fn query_consent(&self, id: &DeviceId) -> CoreResult<()> {
        let (ticket, effects) = self.core().query_consent(id, UnixMillis::now())?;
        self.finish(ticket, effects).await
    }

    /// Sets a device's server settings (a new revision in its feed).
    pub async fn set_settings(
        &self,
        principal: &Principal,
        id: &DeviceId,
        settings: DeviceSettings,
    ) -> CoreResult<SettingsView> {
        let (view, ticket, effects) = {
            let core = self.core();
            let (_, ticket, effects) =
                core.set_settings(principal, id, settings, UnixMillis::now())?;
            (SettingsView::from(&core.device(id)?), ticket, effects)
        };
        self.finish(ticket, effects).await?;
        Ok(view)
    }

    /// A device's settings, as set and as reported.
    pub async fn settings(&self, principal: &Principal, id: &DeviceId) -> CoreResult<SettingsView> {
        let (view, ticket) = {
            let core = self.core();
            core.authorize_settings(principal, id)?;
            (SettingsView::from(&core.device(id)?), core.read_ticket())
        };
        self.durable_read(ticket).await?;
        Ok(view)
    }

    // ---------------------------------------------------------------- services

    /// Runs a read of the core and waits until what it saw is durable.
    async fn read<T>(&self, f: impl FnOnce(&Core) -> CoreResult<T>) -> CoreResult<T> {
        let (value, ticket) = {
            let core = self.core();
            (f(core)?, core.read_ticket())
        };
        self.durable_read(ticket).await?;
        Ok(value)
    }

    pub async fn create_service(&self, req: CreateService) -> CoreResult<ServiceRecord> {
        let (record, ticket) = self.core().create_service(req, UnixMillis::now())?;
        self.finish(ticket, Effects::default()).await?;
        Ok(record)
    }

    pub async fn update_service(&self, id: &str, req: UpdateService) -> CoreResult<ServiceRecord> {
        let (record, ticket) = self.core().update_service(id, req)?;
        self.finish(ticket, Effects::default()).await?;
        Ok(record)
    }

    pub async fn services(&self) -> CoreResult<Vec<ServiceRecord>> {
        self.read(|c| Ok(c.services())).await
    }

    pub async fn service(&self, id: &str) -> CoreResult<ServiceRecord> {
        self.read(|c| c.service(id)).await
    }

    pub async fn customers(&self) -> CoreResult<Vec<CustomerView>> {
        self.read(|c| Ok(c.customers())).await
    }

    pub async fn customer_devices(&self, customer: &str) -> CoreResult<Vec<DeviceView>> {
        let mut list: Vec<DeviceView> = self
            .read(|c| {
                Ok(c.customer_devices(customer)
                    .iter()
                    .map(DeviceView::from)
                    .collect())
            })
            .await?;
        list.sort_by_key(|d| d.registered_at);
        Ok(list)
    }

    pub async fn candidates(&self, customer: &str, service: &str) -> CoreResult<Vec<DeviceView>> {
        self.read(|c| {
            Ok(c.candidates(customer, service)?
                .iter()
                .map(DeviceView::from)
                .collect())
        })
        .await
    }

    /// Applies for a service for some of a customer's devices; each gets a use-start
    /// instruction with a fresh one-time code, and a hint.
    pub async fn apply_for_service(
        &self,
        customer: &str,
        req: ApplyForService,
    ) -> CoreResult<ApplicationView> {
        let id = ApplicationId::from_random(rand::random());
        let mut fresh = || {
            (
                InstructionId::from_random(rand::random()),
                Secret::from_random(rand::random()),
            )
        };
        let (view, ticket, effects) =
            self.core()
                .apply_for_service(customer, req, id, &mut fresh, UnixMillis::now())?;
        self.finish(ticket, effects).await?;
        Ok(view)
    }

    pub async fn application(&self, id: &ApplicationId) -> CoreResult<ApplicationView> {
        self.read(|c| c.application(id, UnixMillis::now())).await
    }

    /// Puts an instruction of the device maker's own kind in a device's mailbox.
    pub async fn create_instruction(
        &self,
        device: &DeviceId,
        req: CreateInstruction,
    ) -> CoreResult<InstructionView> {
        crate::core::check_name(&req.name)?;
        let size: usize = req.params.iter().map(|(k, v)| k.len() + v.len()).sum();
        if size > 16 * 1024 {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                "params may hold at most 16 KiB",
            ));
        }
        let ttl_ms = crate::core::ttl_ms(req.ttl_secs, 7 * 24 * 3600, 365 * 24 * 3600);
        let body = InstructionBody::Custom {
            name: req.name,
            params: req.params,
        };
        let id = InstructionId::from_random(rand::random());
        let (view, ticket, effects) =
            self.core()
                .create_instruction(device, id, body, ttl_ms, UnixMillis::now())?;
        self.finish(ticket, effects).await?;
        Ok(view)
    }

    pub async fn instructions(&self, device: &DeviceId) -> CoreResult<Vec<InstructionView>> {
        self.read(|c| c.instructions(device, UnixMillis::now()))
            .await
    }

    pub async fn create_user(&self, req: CreateUser) -> CoreResult<UserCreated> {
        let id = UserId::from_random(rand::random());
        let token = Secret::from_random(rand::random());
        let (record, ticket) =
            self.core()
                .create_user(id, req.name, &req.pin, &token, UnixMillis::now())?;
        self.finish(ticket, Effects::default()).await?;
        Ok(UserCreated {
            user_id: record.user_id,
            name: record.name,
            token,
        })
    }

    /// A job for a user's virtual printer, held until the user releases it at a device.
    pub async fn submit_held(
        &self,
        principal: &Principal,
        user: &UserId,
        req: SubmitHeldJob,
    ) -> CoreResult<HeldJobRecord> {
        self.core().authorize_user(principal, user)?;
        let payload = decode_payload(req.payload.as_deref(), req.payload_base64.as_deref())?;
        let (record, ticket, effects) =
            self.core()
                .submit_held(user, req, payload, UnixMillis::now())?;
        self.finish(ticket, effects).await?;
        Ok(record)
    }

    /// A user's held jobs in every state: held, released (where, when), expired.
    pub async fn held_jobs(
        &self,
        principal: &Principal,
        user: &UserId,
    ) -> CoreResult<Vec<HeldJobRecord>> {
        self.read(|c| {
            c.authorize_user(principal, user)?;
            c.held_jobs(user, UnixMillis::now())
        })
        .await
    }

    /// Moves a queued job to another device's printer queue.
    pub async fn move_job(
        &self,
        principal: &Principal,
        job: &JobId,
        to: &DeviceId,
    ) -> CoreResult<JobView> {
        let (record, ticket, effects) =
            self.core()
                .move_job(principal, job, to, UnixMillis::now())?;
        self.finish(ticket, effects).await?;
        Ok(JobView::from(&record))
    }

    /// What a device's printer can do (for a client to offer only those settings); for whoever
    /// may submit jobs to it.
    pub async fn capabilities(
        &self,
        principal: &Principal,
        device: &DeviceId,
    ) -> CoreResult<Capabilities> {
        self.read(|c| {
            c.authorize_submit(principal, device)?;
            c.device(device)?
                .printer
                .map(|p| p.capabilities)
                .ok_or_else(|| {
                    CoreError::new(
                        ErrorCode::NotFound,
                        format!("device {device} has registered no printer queue"),
                    )
                })
        })
        .await
    }

    /// Sets (or with an empty application id, clears) a device's contract for a support
    /// service; another provider's contract of the same kind is canceled.
    pub async fn put_contract(
        &self,
        device: &DeviceId,
        service: &str,
        req: PutContract,
    ) -> CoreResult<Vec<ContractRecord>> {
        let (list, ticket, effects) =
            self.core()
                .put_contract(device, service, req, UnixMillis::now())?;
        self.finish(ticket, effects).await?;
        Ok(list)
    }

    pub async fn cancel_contract(
        &self,
        device: &DeviceId,
        service: &str,
    ) -> CoreResult<Vec<ContractRecord>> {
        let (list, ticket, effects) =
            self.core()
                .cancel_contract(device, service, UnixMillis::now())?;
        self.finish(ticket, effects).await?;
        Ok(list)
    }

    pub async fn contracts(&self, device: &DeviceId) -> CoreResult<Vec<ContractRecord>> {
        self.read(|c| c.device_contracts(device)).await
    }

    /// Makes a customer's devices poll now: by hints, or through a tree on their LAN whose
    /// root gets it in its mailbox.
    pub async fn poll_now(&self, customer: &str, req: PollNow) -> CoreResult<PollNowPlan> {
        let nudge_id: String = rand::random::<[u8; 16]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let instruction = InstructionId::from_random(rand::random());
        let (plan, ticket, effects) =
            self.core()
                .poll_now(customer, req, nudge_id, instruction, UnixMillis::now())?;
        self.finish(ticket, effects).await?;
        for device in &plan.hinted {
            if let Some(newest) = self.core().newest(device) {
                self.inner.notifier.hint(device, HintKind::PollNow, newest);
            }
        }
        Ok(plan)
    }

    // ---------------------------------------------------------------- owners and companions

    /// Who an API token (other than the admin token) belongs to.
    pub fn principal(&self, token: &str) -> Option<Principal> {
        self.core().principal(token)
    }

    pub async fn create_owner(&self, req: CreateOwner) -> CoreResult<OwnerCreated> {
        let token = Secret::from_random(rand::random());
        let id = OwnerId::from_random(rand::random());
        let (record, ticket) = self
            .core()
            .create_owner(id, req.name, &token, UnixMillis::now())?;
        self.finish(ticket, Effects::default()).await?;
        Ok(OwnerCreated {
            owner_id: record.owner_id,
            name: record.name,
            token,
        })
    }

    /// A new MQTT login for operations; its password is in the answer only.
    pub async fn create_ops_login(
        &self,
        req: schemas::api::CreateOpsLogin,
    ) -> CoreResult<schemas::api::OpsLoginCreated> {
        let password = Secret::from_random(rand::random());
        let id = schemas::OpsId::from_random(rand::random());
        let (record, ticket) =
            self.core()
                .create_ops_login(id, req.name, &password, UnixMillis::now())?;
        self.finish(ticket, Effects::default()).await?;
        Ok(schemas::api::OpsLoginCreated {
            ops_id: record.ops_id,
            name: record.name,
            password,
            created_at: record.created_at,
        })
    }

    pub async fn ops_logins(&self) -> CoreResult<Vec<schemas::api::OpsLoginView>> {
        let (list, ticket) = {
            let core = self.core();
            (core.ops_logins(), core.read_ticket())
        };
        self.durable_read(ticket).await?;
        Ok(list.iter().map(schemas::api::OpsLoginView::from).collect())
    }

    /// Revokes an ops login and closes its open MQTT sessions.
    pub async fn revoke_ops_login(
        &self,
        id: &schemas::OpsId,
    ) -> CoreResult<schemas::api::OpsLoginView> {
        let (record, ticket) = self.core().revoke_ops_login(id, UnixMillis::now())?;
        self.finish(ticket, Effects::default()).await?;
        if let Some(embedded) = self.inner.embedded.get().cloned() {
            let login = id.as_str().to_owned();
            let closed = tokio::task::spawn_blocking(move || embedded.disconnect_login(&login))
                .await
                .map_err(|e| CoreError::new(ErrorCode::Internal, e.to_string()))?;
            match closed {
                Ok(n) => tracing::info!(ops_login = %id, sessions = n, "ops login revoked"),
                Err(e) => {
                    tracing::error!(ops_login = %id, error = %e, "could not close its sessions")
                }
            }
        }
        Ok(schemas::api::OpsLoginView::from(&record))
    }

    pub async fn create_companion(
        &self,
        owner: &OwnerId,
        req: CreateCompanion,
    ) -> CoreResult<CompanionCreated> {
        let token = Secret::from_random(rand::random());
        let id = CompanionId::from_random(rand::random());
        let (record, ticket) =
            self.core()
                .create_companion(owner, id, req.name, &token, UnixMillis::now())?;
        self.finish(ticket, Effects::default()).await?;
        Ok(CompanionCreated {
            companion_id: record.companion_id,
            owner_id: record.owner_id,
            name: record.name,
            token,
        })
    }

    pub async fn companion(
        &self,
        principal: &Principal,
        id: &CompanionId,
    ) -> CoreResult<CompanionView> {
        let (view, ticket) = {
            let core = self.core();
            (
                CompanionView::from(&core.companion(principal, id)?),
                core.read_ticket(),
            )
        };
        self.durable_read(ticket).await?;
        Ok(view)
    }

    pub async fn link_companion(
        &self,
        principal: &Principal,
        companion: &CompanionId,
        device: &DeviceId,
        linked: bool,
    ) -> CoreResult<CompanionView> {
        let (record, ticket) = self
            .core()
            .link_companion(principal, companion, device, linked)?;
        self.finish(ticket, Effects::default()).await?;
        Ok(CompanionView::from(&record))
    }

    pub fn counts(&self) -> (usize, usize) {
        self.core().counts()
    }

    // ---------------------------------------------------------------- jobs

    /// Submits a job for `principal`, if it may submit to `device`.
    pub async fn submit_job(
        &self,
        principal: &Principal,
        device: &DeviceId,
        req: SubmitJob,
    ) -> CoreResult<(JobView, bool)> {
        let payload = decode_payload(req.payload.as_deref(), req.payload_base64.as_deref())?;
        let new = NewJob {
            payload,
            content_type: req
                .content_type
                .unwrap_or_else(|| "application/octet-stream".into()),
            ttl_ms: req.ttl_secs.map(|s| s.saturating_mul(1000)),
            max_attempts: req.max_attempts,
            idempotency_key: req.idempotency_key,
            submitted_by: Some(principal.label()),
            print: req.print,
        };
        let core = self.core();
        core.authorize_submit(principal, device)?;
        let (job, created, ticket, effects) = core.submit_job(device, new, UnixMillis::now())?;
        self.finish(ticket, effects).await?;
        if created {
            self.inner
                .metrics
                .jobs_submitted
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok((JobView::from(&job), created))
    }

    pub async fn job(&self, principal: &Principal, id: &JobId) -> CoreResult<JobView> {
        let (view, ticket) = {
            let core = self.core();
            core.authorize_job_read(principal, id)?;
            (JobView::from(&core.job(id)?), core.read_ticket())
        };
        self.durable_read(ticket).await?;
        Ok(view)
    }

    pub async fn device_jobs(&self, device: &DeviceId) -> CoreResult<Vec<JobView>> {
        let (list, ticket) = {
            let core = self.core();
            let list = core
                .device_jobs(device)?
                .iter()
                .map(JobView::from)
                .collect();
            (list, core.read_ticket())
        };
        self.durable_read(ticket).await?;
        Ok(list)
    }

    pub async fn cancel_job(&self, id: &JobId, reason: Option<String>) -> CoreResult<JobView> {
        let (job, ticket, effects) = self.core().cancel_job(id, reason, UnixMillis::now())?;
        self.finish(ticket, effects).await?;
        Ok(JobView::from(&job))
    }

    // ---------------------------------------------------------------- data channel

    /// Serves one data-channel request of an authenticated device.
    pub async fn handle(&self, device: &DeviceId, request: Request) -> CoreResult<Response> {
        self.inner.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let result = self.handle_inner(device, request).await;
        if result.is_err() {
            self.inner
                .metrics
                .request_errors
                .fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn handle_inner(&self, device: &DeviceId, request: Request) -> CoreResult<Response> {
        let now = UnixMillis::now();
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
                let (offer, ticket, effects) =
                    self.core().fetch_job(device, &job_id, start, now)?;
                self.finish(ticket, effects).await?;
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
                let (deadline, ticket, effects) =
                    self.core().start_owner_check(device, &reason, now)?;
                self.finish(ticket, effects).await?;
                Ok(Response::OwnerCheck { deadline })
            }
            Request::ConfirmOwner { owner } => {
                let (verdict, ticket, effects) = self.core().confirm_owner(device, &owner, now)?;
                self.finish(ticket, effects).await?;
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
                let (outcome, ticket, effects) =
                    self.core().register_service(device, &url, &code, now)?;
                self.finish(ticket, effects).await?;
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
                let (control, ticket, effects) =
                    self.core()
                        .activate_service(device, &service_id, &application_id, now)?;
                self.finish(ticket, effects).await?;
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

    pub fn data_connected(&self, device: &DeviceId, up: bool) {
        let at = UnixMillis::now();
        let event = if up {
            self.inner
                .metrics
                .data_connections
                .fetch_add(1, Ordering::Relaxed);
            self.inner
                .metrics
                .data_connections_open
                .fetch_add(1, Ordering::Relaxed);
            OpsEvent::DeviceOnline {
                device_id: device.clone(),
                channel: Channel::Data,
                at,
            }
        } else {
            self.inner
                .metrics
                .data_connections_open
                .fetch_sub(1, Ordering::Relaxed);
            OpsEvent::DeviceOffline {
                device_id: device.clone(),
                channel: Channel::Data,
                at,
            }
        };
        self.inner.notifier.ops(&event);
    }

    // ---------------------------------------------------------------- notification channel

    /// A device announced itself on MQTT. Untrusted: it can at most cause a hint carrying
    /// nothing but a sequence number, and an ops event.
    pub fn on_presence(&self, device: &DeviceId, presence: Presence) {
        let at = UnixMillis::now();
        let Some(pending) = self.core().presence(device) else {
            return;
        };
        match presence {
            Presence::Online => {
                self.inner.notifier.ops(&OpsEvent::DeviceOnline {
                    device_id: device.clone(),
                    channel: Channel::Mqtt,
                    at,
                });
                if let Some(newest) = pending {
                    self.inner
                        .metrics
                        .presence_hints
                        .fetch_add(1, Ordering::Relaxed);
                    self.inner.notifier.hint(device, HintKind::Pending, newest);
                }
            }
            Presence::Offline => self.inner.notifier.ops(&OpsEvent::DeviceOffline {
                device_id: device.clone(),
                channel: Channel::Mqtt,
                at,
            }),
        }
    }

    /// An [`broker::Authenticator`] backed by the registry. Devices log in with their id as
    /// client id and username and their secret as password; operations tools with an ops
    /// login (`POST /v1/ops-logins`: its id as username), under any client id that is not a
    /// device id.
    pub fn mqtt_authenticator(&self) -> Arc<dyn broker::Authenticator> {
        Arc::new(MqttAuth {
            bridge: self.clone(),
        })
    }

    // ---------------------------------------------------------------- leases and TTLs

    /// Applies leases and TTLs as they fall due, until `shutdown`.
    pub async fn run_reaper(self, shutdown: CancellationToken) {
        loop {
            let next = self.core().next_deadline();
            let wait = next.map(|t| Duration::from_millis(t.0.saturating_sub(UnixMillis::now().0)));
            if wait != Some(Duration::ZERO) {
                let sleep = tokio::time::sleep(wait.unwrap_or(Duration::from_secs(3600)));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.inner.reaper.notified() => continue,
                    _ = sleep => {}
                }
            }
            let result = self.core().expire_due(UnixMillis::now());
            match result {
                Ok((Some(ticket), effects)) => {
                    if let Err(e) = self.finish(ticket, effects).await {
                        tracing::error!(error = %e, "lease/TTL changes not durable");
                    }
                }
                Ok((None, _)) => {}
                Err(e) => tracing::error!(error = %e, "lease/TTL processing failed"),
            }
        }
    }
}

#[derive(Debug)]
struct MqttAuth {
    bridge: Bridge,
}

impl broker::Authenticator for MqttAuth {
    fn authenticate(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> Result<broker::Login, broker::Refusal> {
        use broker::Refusal;
        if username.starts_with(schemas::OpsId::PREFIX) {
            let login = self.bridge.core().authenticate_ops(username, password);
            return match login {
                Err(crate::core::OpsLoginFailure::BadCredentials) => Err(Refusal::BadCredentials),
                Err(crate::core::OpsLoginFailure::Revoked) => Err(Refusal::NotAuthorized),
                // A device's id would take over that device's session.
                Ok(_) if DeviceId::parse(client_id).is_ok() => Err(Refusal::IdentifierRejected),
                Ok(id) => Ok(broker::Login::Ops(id.as_str().to_owned())),
            };
        }
        match self.bridge.authenticate(username, password) {
            Ok(_) if client_id == username => Ok(broker::Login::Device(username.to_owned())),
            Ok(_) => Err(Refusal::IdentifierRejected),
            Err(AuthFailure::Disabled | AuthFailure::Invalidated) => Err(Refusal::NotAuthorized),
            Err(AuthFailure::UnknownDevice | AuthFailure::WrongSecret) => {
                Err(Refusal::BadCredentials)
            }
        }
    }
}

/// A payload given as text or as standard base64 (exactly one).
fn decode_payload(text: Option<&str>, b64: Option<&str>) -> CoreResult<Vec<u8>> {
    use base64::Engine as _;
    match (text, b64) {
        (Some(text), None) => Ok(text.as_bytes().to_vec()),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| CoreError::new(ErrorCode::BadRequest, format!("payload_base64: {e}"))),
        _ => Err(CoreError::new(
            ErrorCode::BadRequest,
            "give exactly one of payload and payload_base64",
        )),
    }
}
