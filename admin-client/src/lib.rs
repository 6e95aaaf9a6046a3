//! A typed client of the bridge's admin API, for cloud services written in Rust, the
//! simulator's job generator, and the tests.
//!
//! [`AdminClient::call`] calls any operation declared in [`schemas::admin`]; the named methods
//! are shorthands for the common ones.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use schemas::Secret;
use schemas::admin::{self as op, BodyUse, Operation};
use schemas::api::{
    ApiError, ApplicationView, ApplyForService, CancelJob, CandidatesQuery, CompanionCreated,
    CompanionView, CreateCompanion, CreateEnrollmentToken, CreateInstruction, CreateOwner,
    CreateService, CreateUser, CustomerView, DeviceView, DevicesQuery, EnrollmentTokenCreated,
    Health, InstructionView, JobView, JobsQuery, MoveJob, OpsLoginCreated, OpsLoginView,
    OwnerCreated, PollNow, PollNowPlan, PutContract, PutSettings, RequestsQuery, SettingsView,
    SubmitHeldJob, SubmitJob, UserCreated,
};
use schemas::print::{Capabilities, HeldJobRecord};
use schemas::records::DeviceRequestRecord;
use schemas::services::{ContractRecord, ServiceRecord};
use schemas::settings::Endpoints;
use schemas::{ApplicationId, CompanionId, DeviceId, JobId, OpsId, UserId};

mod connector;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API answered with an error.
    #[error("HTTP {status}: {}: {}", .error.code.as_str(), .error.message)]
    Api { status: StatusCode, error: ApiError },
    /// The request did not get an answer.
    #[error("request failed: {0}")]
    Transport(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("unexpected answer: {0}")]
    Decode(String),
}

impl ClientError {
    /// Whether the same request may succeed if sent again: no answer (the connection failed
    /// or the time ran out), or the bridge said it is busy, restarting or behind a proxy
    /// that lost it (502, 503, 504). Other errors answer the request itself.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Transport(_) | ClientError::Timeout(_) => true,
            ClientError::Api { status, .. } => matches!(status.as_u16(), 502..=504),
            ClientError::Decode(_) => false,
        }
    }

    /// The HTTP status, when the API answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Named shorthands, one line each: `name(path parameter; body) -> answer: Operation`, either
/// part left out where the operation has none. The types are checked against the operation's
/// declaration in [`schemas::admin`]; a path parameter may be borrowed in a form of its own
/// (`&str` for a `String`).
macro_rules! shorthands {
    ($($(#[$doc:meta])* $name:ident($($param:ident: $pty:ty)? $(; $body:ident: $bty:ty)?)
        -> $answer:ty: $op:ident;)*) => {$(
        $(#[$doc])*
        pub async fn $name(&self $(, $param: $pty)? $(, $body: $bty)?)
            -> Result<$answer, ClientError> {
            self.call::<op::$op>(or_unit!($(&ToOwned::to_owned($param))?), &(), or_unit!($($body)?))
                .await
        }
    )*};
}

macro_rules! or_unit {
    () => {
        &()
    };
    ($e:expr) => {
        $e
    };
}

#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    token: Secret,
    http: Client<connector::Connector, Full<Bytes>>,
    timeout: Duration,
    /// Job submissions sent again after a transient error, at most this many times.
    retries: u32,
    retried: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Retries of a job submission by default: waits of about 0.1, 0.3, 0.9 and 2.7 s, 4 s in
/// all, which covers a bridge's restart.
pub const DEFAULT_RETRIES: u32 = 4;
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
/// However many retries are asked for, no wait is longer.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

impl AdminClient {
    /// `base` is like `http://127.0.0.1:8080`; an `https://` base is verified against the
    /// system's roots (see [`AdminClient::with_tls`] for a private CA).
    pub fn new(base: impl Into<String>, token: Secret) -> AdminClient {
        Self::build(base.into(), token, None)
    }

    /// An `https://` API whose certificate is verified with `tls` (a private CA, say:
    /// [`tls::client_config`]).
    pub fn with_tls(
        base: impl Into<String>,
        token: Secret,
        tls: std::sync::Arc<tls::rustls::ClientConfig>,
    ) -> AdminClient {
        Self::build(base.into(), token, Some(tls))
    }

    fn build(
        base: String,
        token: Secret,
        tls: Option<std::sync::Arc<tls::rustls::ClientConfig>>,
    ) -> AdminClient {
        AdminClient {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http: Client::builder(TokioExecutor::new()).build(connector::Connector::new(tls)),
            timeout: Duration::from_secs(30),
            retries: DEFAULT_RETRIES,
            retried: Default::default(),
        }
    }

    /// The same API as another caller: an owner's or a companion's token.
    pub fn with_token(&self, token: Secret) -> AdminClient {
        AdminClient {
            token,
            ..self.clone()
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> AdminClient {
        self.timeout = timeout;
        self
    }

    /// How many times [`AdminClient::submit_job`] sends a submission again after a transient
    /// error ([`ClientError::is_transient`]); 0: never. Waits between tries grow threefold
    /// from 0.1 s, with jitter.
    pub fn with_retries(mut self, retries: u32) -> AdminClient {
        self.retries = retries;
        self
    }

    /// Submissions sent again so far by this client and its clones.
    pub fn retried(&self) -> u64 {
        self.retried.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends a request and returns the status and body, whatever the status.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        token: Option<&str>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        if body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| ClientError::Transport(e.to_string()))?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Transport(e.to_string()))?
                .to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))?
    }

    /// Calls an operation: its path parameters, query and body as the declaration types them.
    /// Returns the status (a success) with the answer.
    pub async fn call_with_status<O: Operation>(
        &self,
        params: &O::Params,
        query: &O::Query,
        body: &O::Body,
    ) -> Result<(StatusCode, O::Answer), ClientError> {
        let mut path = op::path_of::<O>(params);
        let query = serde_urlencoded::to_string(query)
            .map_err(|e| ClientError::Decode(format!("query: {e}")))?;
        if !query.is_empty() {
            path = format!("{path}?{query}");
        }
        let body = match O::BODY {
            BodyUse::None => None,
            BodyUse::Required | BodyUse::Optional => {
                Some(serde_json::to_vec(body).map_err(|e| ClientError::Decode(e.to_string()))?)
            }
        };
        let method = Method::from_bytes(O::METHOD.as_str().as_bytes())
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let (status, bytes) = self
            .raw(method, &path, body, Some(self.token.expose()))
            .await?;
        if !status.is_success() {
            let error = serde_json::from_slice::<ApiError>(&bytes).map_err(|_| {
                ClientError::Decode(format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&bytes)
                ))
            })?;
            return Err(ClientError::Api { status, error });
        }
        let bytes: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        let answer =
            serde_json::from_slice(bytes).map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok((status, answer))
    }

    /// Calls an operation (see [`Self::call_with_status`]).
    pub async fn call<O: Operation>(
        &self,
        params: &O::Params,
        query: &O::Query,
        body: &O::Body,
    ) -> Result<O::Answer, ClientError> {
        Ok(self.call_with_status::<O>(params, query, body).await?.1)
    }

    /// An operation with path parameters only.
    async fn get<O: Operation<Query = (), Body = ()>>(
        &self,
        params: &O::Params,
    ) -> Result<O::Answer, ClientError> {
        self.call::<O>(params, &(), &()).await
    }

    /// An operation with path parameters and a body.
    async fn send<O: Operation<Query = ()>>(
        &self,
        params: &O::Params,
        body: &O::Body,
    ) -> Result<O::Answer, ClientError> {
        self.call::<O>(params, &(), body).await
    }

    shorthands! {
        health() -> Health: GetHealth;
        metrics() -> serde_json::Value: GetMetrics;
        create_enrollment(; req: &CreateEnrollmentToken) -> EnrollmentTokenCreated:
            CreateEnrollment;
        device(id: &DeviceId) -> DeviceView: GetDevice;
        disable_device(id: &DeviceId) -> DeviceView: DisableDevice;
        ops_logins() -> Vec<OpsLoginView>: ListOpsLogins;
        companion(id: &CompanionId) -> CompanionView: GetCompanion;
        create_service(; req: &CreateService) -> ServiceRecord: CreateServiceOp;
        customers() -> Vec<CustomerView>: ListCustomers;
        application(id: &ApplicationId) -> ApplicationView: GetApplication;
        apply_for_service(customer: &str; req: &ApplyForService) -> ApplicationView:
            ApplyForServiceOp;
        poll_now(customer: &str; req: &PollNow) -> PollNowPlan: PollNowOp;
        create_instruction(device: &DeviceId; req: &CreateInstruction) -> InstructionView:
            CreateInstructionOp;
        instructions(device: &DeviceId) -> Vec<InstructionView>: ListInstructions;
        create_user(; req: &CreateUser) -> UserCreated: CreateUserOp;
        submit_held(user: &UserId; req: &SubmitHeldJob) -> HeldJobRecord: SubmitHeld;
        held_jobs(user: &UserId) -> Vec<HeldJobRecord>: ListHeld;
        capabilities(device: &DeviceId) -> Capabilities: GetCapabilities;
        contracts(device: &DeviceId) -> Vec<ContractRecord>: ListContracts;
        settings(device: &DeviceId) -> SettingsView: GetSettings;
        /// Asks the device to report its consent setting through its outbox.
        query_consent(device: &DeviceId) -> (): QueryConsent;
        job(id: &JobId) -> JobView: GetJob;
    }

    pub async fn create_owner(&self, name: &str) -> Result<OwnerCreated, ClientError> {
        let req = CreateOwner { name: name.into() };
        self.send::<op::CreateOwnerOp>(&(), &req).await
    }

    /// An MQTT login for operations; its password is in the answer only.
    pub async fn create_ops_login(&self, name: &str) -> Result<OpsLoginCreated, ClientError> {
        let req = schemas::api::CreateOpsLogin { name: name.into() };
        self.send::<op::CreateOpsLoginOp>(&(), &req).await
    }

    /// Revokes an ops login; its open sessions are closed.
    pub async fn revoke_ops_login(&self, id: &OpsId) -> Result<OpsLoginView, ClientError> {
        self.get::<op::RevokeOpsLogin>(&id.as_str().to_owned())
            .await
    }

    /// A companion of the owner whose token this client uses.
    pub async fn create_companion(&self, name: &str) -> Result<CompanionCreated, ClientError> {
        let req = CreateCompanion { name: name.into() };
        self.send::<op::CreateCompanionOp>(&(), &req).await
    }

    /// Links (or with `linked` false, unlinks) a companion and a device.
    pub async fn link_companion(
        &self,
        companion: &CompanionId,
        device: &DeviceId,
        linked: bool,
    ) -> Result<CompanionView, ClientError> {
        let params = (companion.clone(), device.clone());
        if linked {
            self.get::<op::LinkCompanion>(&params).await
        } else {
            self.get::<op::UnlinkCompanion>(&params).await
        }
    }

    /// The customer's devices a service can be applied for.
    pub async fn candidates(
        &self,
        customer: &str,
        service: &str,
    ) -> Result<Vec<DeviceView>, ClientError> {
        let query = CandidatesQuery {
            service: service.into(),
        };
        self.call::<op::Candidates>(&customer.to_owned(), &query, &())
            .await
    }

    pub async fn move_job(&self, job: &JobId, to: &DeviceId) -> Result<JobView, ClientError> {
        let req = MoveJob { to: to.clone() };
        self.send::<op::MoveJobOp>(job, &req).await
    }

    pub async fn put_contract(
        &self,
        device: &DeviceId,
        service: &str,
        req: &PutContract,
    ) -> Result<Vec<ContractRecord>, ClientError> {
        let params = (device.clone(), service.to_owned());
        self.send::<op::PutContractOp>(&params, req).await
    }

    pub async fn cancel_contract(
        &self,
        device: &DeviceId,
        service: &str,
    ) -> Result<Vec<ContractRecord>, ClientError> {
        let params = (device.clone(), service.to_owned());
        self.get::<op::CancelContract>(&params).await
    }

    /// Sets the endpoints a device uses (a new settings revision, through its feed).
    pub async fn set_settings(
        &self,
        device: &DeviceId,
        endpoints: &Endpoints,
    ) -> Result<SettingsView, ClientError> {
        let req = PutSettings {
            endpoints: endpoints.clone(),
        };
        self.send::<op::PutSettingsOp>(device, &req).await
    }

    /// Requests accepted from the device's outbox after number `after`, oldest first.
    pub async fn device_requests(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DeviceRequestRecord>, ClientError> {
        let query = RequestsQuery {
            after: Some(after),
            limit: Some(limit),
            ..RequestsQuery::default()
        };
        self.call::<op::ListDeviceRequests>(device, &query, &())
            .await
    }

    /// Every request accepted from the device's outbox, oldest first.
    pub async fn all_device_requests(
        &self,
        device: &DeviceId,
    ) -> Result<Vec<DeviceRequestRecord>, ClientError> {
        let mut all: Vec<DeviceRequestRecord> = Vec::new();
        loop {
            let after = all.last().map_or(0, |r| r.no.0);
            let page = self.device_requests(device, after, 1000).await?;
            if page.is_empty() {
                return Ok(all);
            }
            all.extend(page);
        }
    }

    /// Submits a job; the flag is false when an earlier job with the same idempotency key was
    /// returned instead.
    ///
    /// A transient error is retried (see [`AdminClient::with_retries`]) under the same
    /// idempotency key, so a submission stored by a try whose answer was lost is answered
    /// with that job, never made twice. Without a key of the caller's the client makes one
    /// (`auto-` and 128 random bits); a job it then finds made by its own earlier try counts
    /// as created.
    pub async fn submit_job(
        &self,
        device: &DeviceId,
        req: &SubmitJob,
    ) -> Result<(JobView, bool), ClientError> {
        let keyed;
        let (req, own_key) = match &req.idempotency_key {
            None if self.retries > 0 => {
                keyed = SubmitJob {
                    idempotency_key: Some(format!("auto-{:032x}", rand::random::<u128>())),
                    ..req.clone()
                };
                (&keyed, true)
            }
            _ => (req, false),
        };
        let mut delay = FIRST_RETRY_DELAY;
        let mut tries = 0;
        loop {
            match self
                .call_with_status::<op::SubmitJobOp>(device, &(), req)
                .await
            {
                Ok((status, job)) => {
                    let created = status == StatusCode::CREATED || (own_key && tries > 0);
                    return Ok((job, created));
                }
                Err(e) if e.is_transient() && tries < self.retries => {
                    tries += 1;
                    self.retried
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // Full jitter over the upper half: clients that failed together do not
                    // come back together.
                    let wait = delay.mul_f64(rand::random_range(0.5..=1.0));
                    tokio::time::sleep(wait).await;
                    delay = delay.saturating_mul(3).min(MAX_RETRY_DELAY);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A page of the device's jobs (open, and finished within retention) in the order they
    /// were submitted: at most `limit` (1 to 1000) after `after`.
    pub async fn device_jobs_page(
        &self,
        device: &DeviceId,
        after: Option<&JobId>,
        limit: usize,
    ) -> Result<Vec<JobView>, ClientError> {
        let query = JobsQuery {
            after: after.cloned(),
            limit: Some(limit),
            ..JobsQuery::default()
        };
        self.call::<op::ListDeviceJobs>(device, &query, &()).await
    }

    /// Every device, oldest registration first.
    pub async fn devices(&self) -> Result<Vec<DeviceView>, ClientError> {
        self.find_devices(&DevicesQuery::default()).await
    }

    /// The devices `query` asks for (a page of them, with `limit`).
    pub async fn find_devices(&self, query: &DevicesQuery) -> Result<Vec<DeviceView>, ClientError> {
        self.call::<op::ListDevices>(&(), query, &()).await
    }

    /// Every job of the device (open, and finished within retention), page by page.
    pub async fn device_jobs(&self, device: &DeviceId) -> Result<Vec<JobView>, ClientError> {
        let mut all: Vec<JobView> = Vec::new();
        loop {
            let after = all.last().map(|j| j.job_id.clone());
            let page = self.device_jobs_page(device, after.as_ref(), 1000).await?;
            let full = page.len() == 1000;
            all.extend(page);
            if !full {
                return Ok(all);
            }
        }
    }

    pub async fn cancel_job(
        &self,
        id: &JobId,
        reason: Option<String>,
    ) -> Result<JobView, ClientError> {
        self.send::<op::CancelJobOp>(id, &Some(CancelJob { reason }))
            .await
    }
}
