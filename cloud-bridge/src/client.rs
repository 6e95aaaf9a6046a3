//! A typed client of the admin API, for cloud services written in Rust, the simulator's job
//! generator, and the tests.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use schemas::api::{
    ApiError, CancelJob, CompanionCreated, CompanionView, CreateCompanion, CreateEnrollmentToken,
    CreateOwner, DeviceView, EnrollmentTokenCreated, Health, JobView, OwnerCreated, PutSettings,
    SettingsView, SubmitJob,
};
use schemas::api::{
    ApplicationView, ApplyForService, CreateInstruction, CreateService, CreateUser, CustomerView,
    InstructionView, MoveJob, PollNow, PollNowPlan, PutContract, SubmitHeldJob, UserCreated,
};
use schemas::print::{Capabilities, HeldJobRecord};
use schemas::records::DeviceRequestRecord;
use schemas::services::{ContractRecord, ServiceRecord};
use schemas::settings::Endpoints;
use schemas::{ApplicationId, CompanionId, DeviceId, JobId, Secret, UserId};
use serde::Serialize;
use serde::de::DeserializeOwned;

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
    /// The HTTP status, when the API answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    token: Secret,
    http: Client<connector::Connector, Full<Bytes>>,
    timeout: Duration,
}

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

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<(StatusCode, T), ClientError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        let (status, bytes) = self
            .raw(method, path, body, Some(self.token.expose()))
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
        let value =
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok((status, value))
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        Ok(self.call(Method::GET, "/v1/health", None::<&()>).await?.1)
    }

    pub async fn metrics(&self) -> Result<serde_json::Value, ClientError> {
        Ok(self.call(Method::GET, "/v1/metrics", None::<&()>).await?.1)
    }

    pub async fn create_enrollment(
        &self,
        req: &CreateEnrollmentToken,
    ) -> Result<EnrollmentTokenCreated, ClientError> {
        Ok(self
            .call(Method::POST, "/v1/enrollment-tokens", Some(req))
            .await?
            .1)
    }

    pub async fn devices(&self) -> Result<Vec<DeviceView>, ClientError> {
        Ok(self.call(Method::GET, "/v1/devices", None::<&()>).await?.1)
    }

    pub async fn device(&self, id: &DeviceId) -> Result<DeviceView, ClientError> {
        Ok(self
            .call(Method::GET, &format!("/v1/devices/{id}"), None::<&()>)
            .await?
            .1)
    }

    pub async fn disable_device(&self, id: &DeviceId) -> Result<DeviceView, ClientError> {
        Ok(self
            .call(
                Method::POST,
                &format!("/v1/devices/{id}/disable"),
                None::<&()>,
            )
            .await?
            .1)
    }

    pub async fn create_owner(&self, name: &str) -> Result<OwnerCreated, ClientError> {
        let req = CreateOwner { name: name.into() };
        Ok(self.call(Method::POST, "/v1/owners", Some(&req)).await?.1)
    }

    /// A new MQTT login for operations tools; the password is in the answer only.
    pub async fn create_ops_login(
        &self,
        name: &str,
    ) -> Result<schemas::api::OpsLoginCreated, ClientError> {
        let req = schemas::api::CreateOpsLogin { name: name.into() };
        Ok(self
            .call(Method::POST, "/v1/ops-logins", Some(&req))
            .await?
            .1)
    }

    pub async fn ops_logins(&self) -> Result<Vec<schemas::api::OpsLoginView>, ClientError> {
        Ok(self
            .call(Method::GET, "/v1/ops-logins", None::<&()>)
            .await?
            .1)
    }

    /// Revokes an ops login: it is refused from now on and its open sessions close.
    pub async fn revoke_ops_login(
        &self,
        id: &schemas::OpsId,
    ) -> Result<schemas::api::OpsLoginView, ClientError> {
        Ok(self
            .call(Method::DELETE, &format!("/v1/ops-logins/{id}"), None::<&()>)
            .await?
            .1)
    }

    /// Creates a companion of the calling owner.
    pub async fn create_companion(&self, name: &str) -> Result<CompanionCreated, ClientError> {
        let req = CreateCompanion { name: name.into() };
        Ok(self
            .call(Method::POST, "/v1/companions", Some(&req))
            .await?
            .1)
    }

    pub async fn companion(&self, id: &CompanionId) -> Result<CompanionView, ClientError> {
        Ok(self
            .call(Method::GET, &format!("/v1/companions/{id}"), None::<&()>)
            .await?
            .1)
    }

    /// Links (or unlinks) a companion and a device of the calling owner.
    pub async fn link_companion(
        &self,
        id: &CompanionId,
        device: &DeviceId,
        linked: bool,
    ) -> Result<CompanionView, ClientError> {
        let method = if linked { Method::PUT } else { Method::DELETE };
        Ok(self
            .call(
                method,
                &format!("/v1/companions/{id}/devices/{device}"),
                None::<&()>,
            )
            .await?
            .1)
    }

    pub async fn create_service(&self, req: &CreateService) -> Result<ServiceRecord, ClientError> {
        Ok(self.call(Method::POST, "/v1/services", Some(req)).await?.1)
    }

    pub async fn customers(&self) -> Result<Vec<CustomerView>, ClientError> {
        Ok(self
            .call(Method::GET, "/v1/customers", None::<&()>)
            .await?
            .1)
    }

    /// The customer's devices a service can be applied for.
    pub async fn candidates(
        &self,
        customer: &str,
        service: &str,
    ) -> Result<Vec<DeviceView>, ClientError> {
        let path = format!(
            "/v1/customers/{}/candidates?service={}",
            encode_path(customer),
            encode_path(service)
        );
        Ok(self.call(Method::GET, &path, None::<&()>).await?.1)
    }

    pub async fn apply_for_service(
        &self,
        customer: &str,
        req: &ApplyForService,
    ) -> Result<ApplicationView, ClientError> {
        let path = format!("/v1/customers/{}/applications", encode_path(customer));
        Ok(self.call(Method::POST, &path, Some(req)).await?.1)
    }

    pub async fn poll_now(
        &self,
        customer: &str,
        req: &PollNow,
    ) -> Result<PollNowPlan, ClientError> {
        let path = format!("/v1/customers/{}/poll-now", encode_path(customer));
        Ok(self.call(Method::POST, &path, Some(req)).await?.1)
    }

    pub async fn application(&self, id: &ApplicationId) -> Result<ApplicationView, ClientError> {
        Ok(self
            .call(Method::GET, &format!("/v1/applications/{id}"), None::<&()>)
            .await?
            .1)
    }

    pub async fn create_instruction(
        &self,
        device: &DeviceId,
        req: &CreateInstruction,
    ) -> Result<InstructionView, ClientError> {
        Ok(self
            .call(
                Method::POST,
                &format!("/v1/devices/{device}/instructions"),
                Some(req),
            )
            .await?
            .1)
    }

    pub async fn instructions(
        &self,
        device: &DeviceId,
    ) -> Result<Vec<InstructionView>, ClientError> {
        Ok(self
            .call(
                Method::GET,
                &format!("/v1/devices/{device}/instructions"),
                None::<&()>,
            )
            .await?
            .1)
    }

    pub async fn create_user(&self, req: &CreateUser) -> Result<UserCreated, ClientError> {
        Ok(self.call(Method::POST, "/v1/users", Some(req)).await?.1)
    }

    /// A job for a user's virtual printer, held until released at a device.
    pub async fn submit_held(
        &self,
        user: &UserId,
        req: &SubmitHeldJob,
    ) -> Result<HeldJobRecord, ClientError> {
        let path = format!("/v1/users/{user}/held-jobs");
        Ok(self.call(Method::POST, &path, Some(req)).await?.1)
    }

    pub async fn held_jobs(&self, user: &UserId) -> Result<Vec<HeldJobRecord>, ClientError> {
        let path = format!("/v1/users/{user}/held-jobs");
        Ok(self.call(Method::GET, &path, None::<&()>).await?.1)
    }

    /// Moves a queued job to another device's printer queue.
    pub async fn move_job(&self, job: &JobId, to: &DeviceId) -> Result<JobView, ClientError> {
        let body = MoveJob { to: to.clone() };
        let path = format!("/v1/jobs/{job}/move");
        Ok(self.call(Method::POST, &path, Some(&body)).await?.1)
    }

    /// What a device's printer can do.
    pub async fn capabilities(&self, device: &DeviceId) -> Result<Capabilities, ClientError> {
        let path = format!("/v1/devices/{device}/capabilities");
        Ok(self.call(Method::GET, &path, None::<&()>).await?.1)
    }

    /// Sets a device's contract for a support service.
    pub async fn put_contract(
        &self,
        device: &DeviceId,
        service: &str,
        req: &PutContract,
    ) -> Result<Vec<ContractRecord>, ClientError> {
        let path = format!("/v1/devices/{device}/contracts/{}", encode_path(service));
        Ok(self.call(Method::PUT, &path, Some(req)).await?.1)
    }

    pub async fn cancel_contract(
        &self,
        device: &DeviceId,
        service: &str,
    ) -> Result<Vec<ContractRecord>, ClientError> {
        let path = format!("/v1/devices/{device}/contracts/{}", encode_path(service));
        Ok(self.call(Method::DELETE, &path, None::<&()>).await?.1)
    }

    pub async fn contracts(&self, device: &DeviceId) -> Result<Vec<ContractRecord>, ClientError> {
        let path = format!("/v1/devices/{device}/contracts");
        Ok(self.call(Method::GET, &path, None::<&()>).await?.1)
    }

    /// Sets the endpoints a device uses (admin or the device's owner).
    pub async fn set_settings(
        &self,
        device: &DeviceId,
        endpoints: &Endpoints,
    ) -> Result<SettingsView, ClientError> {
        let body = PutSettings {
            endpoints: endpoints.clone(),
        };
        Ok(self
            .call(
                Method::PUT,
                &format!("/v1/devices/{device}/settings"),
                Some(&body),
            )
            .await?
            .1)
    }

    /// A device's settings as set and as the device reports them.
    pub async fn settings(&self, device: &DeviceId) -> Result<SettingsView, ClientError> {
        Ok(self
            .call(
                Method::GET,
                &format!("/v1/devices/{device}/settings"),
                None::<&()>,
            )
            .await?
            .1)
    }

    /// Requests accepted from the device's outbox after number `after`, oldest first.
    pub async fn device_requests(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DeviceRequestRecord>, ClientError> {
        Ok(self
            .call(
                Method::GET,
                &format!("/v1/devices/{device}/requests?after={after}&limit={limit}"),
                None::<&()>,
            )
            .await?
            .1)
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

    /// Asks the device to report its consent setting through its outbox.
    pub async fn query_consent(&self, device: &DeviceId) -> Result<(), ClientError> {
        let (status, bytes) = self
            .raw(
                Method::POST,
                &format!("/v1/devices/{device}/consent-query"),
                None,
                Some(self.token.expose()),
            )
            .await?;
        if status.is_success() {
            return Ok(());
        }
        let error = serde_json::from_slice::<ApiError>(&bytes)
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        Err(ClientError::Api { status, error })
    }

    /// Submits a job; the flag is false when an earlier job with the same idempotency key was
    /// returned instead.
    pub async fn submit_job(
        &self,
        device: &DeviceId,
        req: &SubmitJob,
    ) -> Result<(JobView, bool), ClientError> {
        let (status, job) = self
            .call(
                Method::POST,
                &format!("/v1/devices/{device}/jobs"),
                Some(req),
            )
            .await?;
        Ok((job, status == StatusCode::CREATED))
    }

    pub async fn job(&self, id: &JobId) -> Result<JobView, ClientError> {
        Ok(self
            .call(Method::GET, &format!("/v1/jobs/{id}"), None::<&()>)
            .await?
            .1)
    }

    pub async fn device_jobs(&self, device: &DeviceId) -> Result<Vec<JobView>, ClientError> {
        Ok(self
            .call(
                Method::GET,
                &format!("/v1/devices/{device}/jobs"),
                None::<&()>,
            )
            .await?
            .1)
    }

    pub async fn cancel_job(
        &self,
        id: &JobId,
        reason: Option<String>,
    ) -> Result<JobView, ClientError> {
        Ok(self
            .call(
                Method::POST,
                &format!("/v1/jobs/{id}/cancel"),
                Some(&CancelJob { reason }),
            )
            .await?
            .1)
    }
}

/// Percent-encodes a path segment or query value (customer names may hold anything).
fn encode_path(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Connections for the client: TCP (TCP_NODELAY) and, for `https://`, TLS.
mod connector {
    use std::future::Future;
    use std::io;
    use std::pin::Pin;
    use std::sync::{Arc, OnceLock};
    use std::task::{Context, Poll};

    use hyper::Uri;
    use hyper_util::client::legacy::connect::{Connected, Connection};
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    #[derive(Debug, Clone)]
    pub(super) struct Connector {
        /// Given, or built from the system's roots on the first `https://` request.
        tls: Arc<OnceLock<Result<Arc<tls::rustls::ClientConfig>, String>>>,
    }

    impl Connector {
        pub(super) fn new(tls: Option<Arc<tls::rustls::ClientConfig>>) -> Connector {
            let cell = OnceLock::new();
            if let Some(config) = tls {
                let _ = cell.set(Ok(config));
            }
            Connector {
                tls: Arc::new(cell),
            }
        }
    }

    /// A connection the client pool can hold.
    #[derive(Debug)]
    pub(super) struct Stream(tls::MaybeTls);

    impl Connection for Stream {
        fn connected(&self) -> Connected {
            Connected::new()
        }
    }

    impl AsyncRead for Stream {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Stream {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
        }
    }

    type Connecting = Pin<Box<dyn Future<Output = io::Result<TokioIo<Stream>>> + Send>>;

    impl tower_service::Service<Uri> for Connector {
        type Response = TokioIo<Stream>;
        type Error = io::Error;
        type Future = Connecting;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, uri: Uri) -> Connecting {
            let tls = self.tls.clone();
            Box::pin(async move {
                let secure = match uri.scheme_str() {
                    Some("https") => true,
                    Some("http") => false,
                    other => {
                        return Err(io::Error::other(format!("unsupported scheme {other:?}")));
                    }
                };
                let host = uri
                    .host()
                    .ok_or_else(|| io::Error::other("no host"))?
                    .trim_matches(['[', ']'])
                    .to_owned();
                let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                let _ = tcp.set_nodelay(true);
                if !secure {
                    return Ok(TokioIo::new(Stream(tls::MaybeTls::Plain(tcp))));
                }
                let config = tls
                    .get_or_init(|| tls::client_config(None).map_err(|e| e.to_string()))
                    .clone()
                    .map_err(io::Error::other)?;
                let name = tls::server_name(&host).map_err(io::Error::other)?;
                let stream = tls::TlsConnector::from(config).connect(name, tcp).await?;
                Ok(TokioIo::new(Stream(stream.into())))
            })
        }
    }
}
