//! The HTTP API: JSON over HTTP/1.1, every route but health behind
//! `Authorization: Bearer <token>`. The token says who calls ([`Principal`]): the admin token
//! opens every route; an owner's or a companion's token opens only the routes marked so below,
//! and only for their own devices and jobs (see [`crate::core`]'s `principals`).
//!
//! | method and path | does | who |
//! |---|---|---|
//! | `GET /v1/health` | liveness, counts (no token needed) | anyone |
//! | `POST /v1/devices/{id}/jobs` | submit a job (201 new, 200 same idempotency key) | admin, owner, linked companion |
//! | `GET /v1/jobs/{id}` | a job with its history | admin, device owner, submitting companion |
//! | `GET /v1/devices/{id}/capabilities` | what the device's printer can do | admin, owner, linked companion |
//! | `POST /v1/jobs/{id}/move` | move a queued job to another device's printer queue | admin, owner of both |
//! | `POST`, `GET /v1/users/{id}/held-jobs` | a job for the user's virtual printer; their held jobs (held, released, expired) | admin, the user |
//! | `POST /v1/owners` | create an owner and its API token | admin |
//! | `POST /v1/companions` | create a companion (phone, PC) and its token | owner |
//! | `GET /v1/companions/{id}` | a companion and its linked devices | admin, owner, itself |
//! | `PUT`/`DELETE /v1/companions/{id}/devices/{device}` | link / unlink a device | owner |
//! | `GET /v1/devices/{id}/settings` | server settings as set and as the device reports them | admin, device owner |
//! | `PUT /v1/devices/{id}/settings` | set the endpoints the device uses (through its feed) | admin, device owner |
//!
//! Everything else needs the admin token:
//!
//! | method and path | does |
//! |---|---|
//! | `GET /v1/metrics` | counters |
//! | `POST /v1/enrollment-tokens` | create a token devices register with |
//! | `GET /v1/devices` | list devices |
//! | `GET /v1/devices/{id}` | one device |
//! | `POST /v1/devices/{id}/disable` | refuse the device everywhere from now on |
//! | `POST`, `GET /v1/ops-logins`; `DELETE /v1/ops-logins/{id}` | MQTT logins for operations (watch `fleet/events/` only); revoke one (its sessions close) |
//! | `GET /v1/devices/{id}/requests?after=N&limit=M` | requests from the device's outbox |
//! | `POST /v1/devices/{id}/consent-query` | ask the device to report its consent setting |
//! | `GET /v1/devices/{id}/jobs` | the device's jobs |
//! | `POST`, `GET /v1/devices/{id}/instructions` | put an instruction in the device's mailbox; list it |
//! | `POST`, `GET /v1/services`; `GET`, `PUT /v1/services/{id}` | services and the models they apply to |
//! | `GET /v1/customers` | customers and their devices by model |
//! | `GET /v1/customers/{customer}/devices` | a customer's devices |
//! | `GET /v1/customers/{customer}/candidates?service=ID` | devices a service can be applied for |
//! | `POST /v1/customers/{customer}/applications` | apply for a service (all, some models, some devices) |
//! | `GET /v1/applications/{id}` | an application's progress, device by device |
//! | `POST /v1/customers/{customer}/poll-now` | make devices poll now: hints, or a tree over their LAN |
//! | `GET /v1/devices/{id}/contracts` | the device's support-service contracts |
//! | `PUT`, `DELETE /v1/devices/{id}/contracts/{service}` | set (switching provider) or cancel a contract |
//! | `POST /v1/jobs/{id}/cancel` | cancel a job |
//! | `POST /v1/users` | a person who prints with held jobs (PIN for the panel, API token) |
//!
//! Errors are `{"code": "...", "message": "..."}` with the codes of [`ErrorCode`].

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use schemas::api::{
    ApiError, ApplyForService, CancelJob, CandidatesQuery, CreateCompanion, CreateEnrollmentToken,
    CreateInstruction, CreateOwner, CreateService, CreateUser, Health, MoveJob, PollNow,
    PutContract, PutSettings, RequestsQuery, SubmitHeldJob, SubmitJob, UpdateService,
};
use schemas::data::ErrorCode;
use schemas::{ApplicationId, CompanionId, DeviceId, JobId, OwnerId, Secret, UserId};
use serde::Serialize;

use crate::bridge::Bridge;
use crate::core::{CoreError, Principal};

#[derive(Debug, Clone)]
struct AppState {
    bridge: Bridge,
    token: Arc<Secret>,
}

/// The admin API router.
pub fn router(bridge: Bridge, admin_token: Secret) -> Router {
    let state = AppState {
        bridge,
        token: Arc::new(admin_token),
    };
    let admin_only = Router::new()
        .route("/v1/metrics", get(metrics))
        .route("/v1/owners", post(create_owner))
        .route(
            "/v1/ops-logins",
            post(create_ops_login).get(list_ops_logins),
        )
        .route(
            "/v1/ops-logins/:id",
            axum::routing::delete(revoke_ops_login),
        )
        .route("/v1/enrollment-tokens", post(create_enrollment))
        .route("/v1/devices", get(list_devices))
        .route("/v1/devices/:id", get(get_device))
        .route("/v1/devices/:id/disable", post(disable_device))
        .route("/v1/devices/:id/requests", get(device_requests))
        .route("/v1/devices/:id/consent-query", post(query_consent))
        .route("/v1/devices/:id/jobs", get(list_jobs))
        .route("/v1/jobs/:id/cancel", post(cancel_job))
        .route(
            "/v1/devices/:id/instructions",
            post(create_instruction).get(list_instructions),
        )
        .route("/v1/services", post(create_service).get(list_services))
        .route("/v1/services/:id", get(get_service).put(update_service))
        .route("/v1/customers", get(list_customers))
        .route("/v1/customers/:customer/devices", get(customer_devices))
        .route("/v1/customers/:customer/candidates", get(candidates))
        .route(
            "/v1/customers/:customer/applications",
            post(apply_for_service),
        )
        .route("/v1/applications/:id", get(get_application))
        .route("/v1/customers/:customer/poll-now", post(poll_now))
        .route("/v1/users", post(create_user))
        .route("/v1/devices/:id/contracts", get(list_contracts))
        .route(
            "/v1/devices/:id/contracts/:service",
            put(put_contract).delete(cancel_contract),
        )
        .route_layer(middleware::from_fn(require_admin));
    let shared = Router::new()
        .route("/v1/devices/:id/jobs", post(submit_job))
        .route("/v1/jobs/:id", get(get_job))
        .route("/v1/devices/:id/capabilities", get(get_capabilities))
        .route("/v1/users/:id/held-jobs", post(submit_held).get(list_held))
        .route("/v1/jobs/:id/move", post(move_job))
        .route(
            "/v1/devices/:id/settings",
            get(get_settings).put(put_settings),
        )
        .route("/v1/companions", post(create_companion))
        .route("/v1/companions/:id", get(get_companion))
        .route(
            "/v1/companions/:id/devices/:device",
            put(link_companion).delete(unlink_companion),
        );
    let protected = admin_only
        .merge(shared)
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/v1/health", get(health))
        .merge(protected)
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(
            2 * schemas::MAX_FRAME_BYTES,
        ))
        .with_state(state)
}

/// Answers 408 `timeout` for a request (body included) not answered within `limit`: a client
/// that trickles its body cannot hold a connection and a task for ever.
pub fn with_request_timeout(router: Router, limit: std::time::Duration) -> Router {
    router.layer(middleware::from_fn(
        move |req: Request, next: Next| async move {
            match tokio::time::timeout(limit, next.run(req)).await {
                Ok(response) => response,
                Err(_) => ApiFailure::new(
                    ErrorCode::Timeout,
                    format!("the request was not complete within {} s", limit.as_secs()),
                )
                .into_response(),
            }
        },
    ))
}

/// An API error response.
#[derive(Debug)]
pub struct ApiFailure(StatusCode, ApiError);

impl ApiFailure {
    fn new(code: ErrorCode, message: impl Into<String>) -> ApiFailure {
        ApiFailure(
            status_for(code),
            ApiError {
                code,
                message: message.into(),
            },
        )
    }
}

fn status_for(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest | ErrorCode::BadFrame | ErrorCode::FrameTooLarge => {
            StatusCode::BAD_REQUEST
        }
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden | ErrorCode::DeviceDisabled | ErrorCode::EnrollmentInvalid => {
            StatusCode::FORBIDDEN
        }
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::InvalidState
        | ErrorCode::Conflict
        | ErrorCode::LeaseLost
        | ErrorCode::RegistrationIncomplete => StatusCode::CONFLICT,
        ErrorCode::ConsentWithheld => StatusCode::FORBIDDEN,
        ErrorCode::Expired => StatusCode::GONE,
        ErrorCode::RegistrationCodeInvalid => StatusCode::FORBIDDEN,
        ErrorCode::UnsupportedSetting => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::Overloaded | ErrorCode::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Timeout => StatusCode::REQUEST_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<CoreError> for ApiFailure {
    fn from(e: CoreError) -> ApiFailure {
        let body = e.body();
        if body.code == ErrorCode::Internal {
            tracing::error!(error = %e, "admin API internal error");
        }
        ApiFailure::new(body.code, body.message)
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

/// `Json` whose rejections are API errors, not axum's plain-text ones.
#[derive(Debug)]
struct Body<T>(T);

#[axum::async_trait]
impl<S, T> FromRequest<S> for Body<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiFailure;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(rejection) => Err(ApiFailure::new(
                ErrorCode::BadRequest,
                rejection.body_text(),
            )),
        }
    }
}

type ApiResult<T> = Result<T, ApiFailure>;

/// Finds who the bearer token belongs to and hands it to the handler as a [`Principal`].
async fn authenticate(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let principal = match presented {
        Some(token)
            if broker::constant_time_eq(token.as_bytes(), state.token.expose().as_bytes()) =>
        {
            Principal::Admin
        }
        Some(token) => match state.bridge.principal(token) {
            Some(p) => p,
            None => {
                return ApiFailure::new(ErrorCode::Unauthorized, "unknown token").into_response();
            }
        },
        None => {
            return ApiFailure::new(
                ErrorCode::Unauthorized,
                "missing `Authorization: Bearer <token>`",
            )
            .into_response();
        }
    };
    request.extensions_mut().insert(principal);
    next.run(request).await
}

async fn require_admin(
    Extension(principal): Extension<Principal>,
    request: Request,
    next: Next,
) -> Response {
    if principal != Principal::Admin {
        return ApiFailure::new(ErrorCode::Forbidden, "this route needs the admin token")
            .into_response();
    }
    next.run(request).await
}

fn owner_of(principal: &Principal) -> ApiResult<&OwnerId> {
    match principal {
        Principal::Owner(id) => Ok(id),
        _ => Err(ApiFailure::new(
            ErrorCode::Forbidden,
            "this route needs an owner's token",
        )),
    }
}

fn companion_id(raw: &str) -> ApiResult<CompanionId> {
    CompanionId::parse(raw).map_err(|e| ApiFailure::new(ErrorCode::BadRequest, e.to_string()))
}

async fn not_found() -> ApiFailure {
    ApiFailure::new(ErrorCode::NotFound, "no such route")
}

fn device_id(raw: &str) -> ApiResult<DeviceId> {
    DeviceId::parse(raw).map_err(|e| ApiFailure::new(ErrorCode::BadRequest, e.to_string()))
}

fn job_id(raw: &str) -> ApiResult<JobId> {
    JobId::parse(raw).map_err(|e| ApiFailure::new(ErrorCode::BadRequest, e.to_string()))
}

/// 200 while every part serves; 503 naming what does not (a load balancer or a supervisor
/// acts on the code, the on-call engineer reads `problems`).
async fn health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let (devices, jobs) = state.bridge.counts();
    let mut problems = Vec::new();
    if let Some(broker::BrokerHealth::Down(reason)) =
        state.bridge.embedded_broker().map(|b| b.health())
    {
        problems.push(format!("embedded MQTT broker: {reason}"));
    }
    if state.bridge.broker_mode() == "external"
        && let Some((down, error)) = state
            .bridge
            .notifier()
            .stats()
            .external_outage(std::time::Duration::from_secs(10))
    {
        problems.push(format!(
            "external MQTT broker unreachable for {} s: {error}",
            down.as_secs()
        ));
    }
    let (code, status) = if problems.is_empty() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    };
    let health = Health {
        status: status.into(),
        broker: state.bridge.broker_mode().to_owned(),
        devices: devices as u64,
        jobs: jobs as u64,
        problems,
    };
    (code, Json(health))
}

#[derive(Debug, Serialize)]
struct MetricsView {
    jobs_submitted: u64,
    data_requests: u64,
    data_request_errors: u64,
    data_connections_total: u64,
    data_connections_open: u64,
    presence_hints: u64,
    hints_queued: u64,
    hints_coalesced: u64,
    events_queued: u64,
    events_dropped: u64,
    mqtt_published: u64,
    mqtt_publish_failed: u64,
    presence_received: u64,
    presence_dropped: u64,
    store_flushes: u64,
    /// Idle admin connections closed to make room for new ones.
    admin_connections_evicted: u64,
    /// The embedded broker's health and what it refused (absent with an external broker).
    #[serde(skip_serializing_if = "Option::is_none")]
    embedded_broker: Option<EmbeddedBrokerView>,
}

#[derive(Debug, Serialize)]
struct EmbeddedBrokerView {
    serving: bool,
    /// Topics and filters the broker holds; rumqttd frees neither, so growth is worth a look.
    topics: u64,
    filters: u64,
    connects_refused: u64,
    subscribes_refused: u64,
    publishes_refused: u64,
    refusals_not_logged: u64,
}

async fn metrics(State(state): State<AppState>) -> Json<MetricsView> {
    let m = state.bridge.metrics();
    let n = state.bridge.notifier().stats();
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    Json(MetricsView {
        jobs_submitted: get(&m.jobs_submitted),
        data_requests: get(&m.requests),
        data_request_errors: get(&m.request_errors),
        data_connections_total: get(&m.data_connections),
        data_connections_open: get(&m.data_connections_open),
        presence_hints: get(&m.presence_hints),
        hints_queued: get(&n.hints_queued),
        hints_coalesced: get(&n.hints_coalesced),
        events_queued: get(&n.events_queued),
        events_dropped: get(&n.events_dropped),
        mqtt_published: get(&n.published),
        mqtt_publish_failed: get(&n.publish_failed),
        presence_received: get(&n.presence_received),
        presence_dropped: get(&n.presence_dropped),
        store_flushes: state.bridge.committer().flush_count(),
        admin_connections_evicted: get(&m.admin_evicted),
        embedded_broker: state.bridge.embedded_broker().map(|b| {
            let r = b.stats();
            let (topics, filters) = b.sizes();
            EmbeddedBrokerView {
                serving: b.health() == broker::BrokerHealth::Serving,
                topics: topics as u64,
                filters: filters as u64,
                connects_refused: get(&r.connects_refused),
                subscribes_refused: get(&r.subscribes_refused),
                publishes_refused: get(&r.publishes_refused),
                refusals_not_logged: r.refusals_not_logged(),
            }
        }),
    })
}

async fn create_enrollment(
    State(state): State<AppState>,
    Body(req): Body<CreateEnrollmentToken>,
) -> ApiResult<impl IntoResponse> {
    let created = state.bridge.create_enrollment(req).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

async fn list_devices(State(state): State<AppState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.bridge.devices().await?))
}

async fn get_device(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.bridge.device(&device_id(&id)?).await?))
}

async fn disable_device(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.bridge.disable_device(&device_id(&id)?).await?))
}

async fn device_requests(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<RequestsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(query) = query.map_err(|e| ApiFailure::new(ErrorCode::BadRequest, e.body_text()))?;
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let after = schemas::outbox::RequestNo(query.after.unwrap_or(0));
    Ok(Json(
        state
            .bridge
            .device_requests(&device_id(&id)?, after, limit)
            .await?,
    ))
}

async fn query_consent(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    state.bridge.query_consent(&device_id(&id)?).await?;
    Ok(StatusCode::ACCEPTED)
}

async fn get_settings(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        state.bridge.settings(&principal, &device_id(&id)?).await?,
    ))
}

async fn put_settings(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    Body(req): Body<PutSettings>,
) -> ApiResult<impl IntoResponse> {
    let settings = schemas::settings::DeviceSettings {
        endpoints: req.endpoints,
    };
    Ok(Json(
        state
            .bridge
            .set_settings(&principal, &device_id(&id)?, settings)
            .await?,
    ))
}

async fn create_instruction(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Body(req): Body<CreateInstruction>,
) -> ApiResult<impl IntoResponse> {
    let view = state
        .bridge
        .create_instruction(&device_id(&id)?, req)
        .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn list_instructions(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.bridge.instructions(&device_id(&id)?).await?))
}

async fn create_service(
    State(state): State<AppState>,
    Body(req): Body<CreateService>,
) -> ApiResult<impl IntoResponse> {
    Ok((
        StatusCode::CREATED,
        Json(state.bridge.create_service(req).await?),
    ))
}

async fn list_services(State(state): State<AppState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.bridge.services().await?))
}

async fn get_service(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.bridge.service(&id).await?))
}

async fn update_service(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Body(req): Body<UpdateService>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.bridge.update_service(&id, req).await?))
}

async fn list_customers(State(state): State<AppState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.bridge.customers().await?))
}

async fn customer_devices(
    State(state): State<AppState>,
    Path(customer): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.bridge.customer_devices(&customer).await?))
}

async fn candidates(
    State(state): State<AppState>,
    Path(customer): Path<String>,
    query: Result<Query<CandidatesQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(query) = query.map_err(|e| ApiFailure::new(ErrorCode::BadRequest, e.body_text()))?;
    Ok(Json(
        state.bridge.candidates(&customer, &query.service).await?,
    ))
}

async fn apply_for_service(
    State(state): State<AppState>,
    Path(customer): Path<String>,
    Body(req): Body<ApplyForService>,
) -> ApiResult<impl IntoResponse> {
    let view = state.bridge.apply_for_service(&customer, req).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

fn user_id(raw: &str) -> ApiResult<UserId> {
    UserId::parse(raw).map_err(|e| ApiFailure::new(ErrorCode::BadRequest, e.to_string()))
}

async fn create_user(
    State(state): State<AppState>,
    Body(req): Body<CreateUser>,
) -> ApiResult<impl IntoResponse> {
    Ok((
        StatusCode::CREATED,
        Json(state.bridge.create_user(req).await?),
    ))
}

async fn submit_held(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    Body(req): Body<SubmitHeldJob>,
) -> ApiResult<impl IntoResponse> {
    let held = state
        .bridge
        .submit_held(&principal, &user_id(&id)?, req)
        .await?;
    Ok((StatusCode::CREATED, Json(held)))
}

async fn list_held(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        state.bridge.held_jobs(&principal, &user_id(&id)?).await?,
    ))
}

async fn move_job(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    Body(req): Body<MoveJob>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        state
            .bridge
            .move_job(&principal, &job_id(&id)?, &req.to)
            .await?,
    ))
}

async fn get_capabilities(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        state
            .bridge
            .capabilities(&principal, &device_id(&id)?)
            .await?,
    ))
}

async fn list_contracts(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.bridge.contracts(&device_id(&id)?).await?))
}

async fn put_contract(
    State(state): State<AppState>,
    Path((id, service)): Path<(String, String)>,
    Body(req): Body<PutContract>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        state
            .bridge
            .put_contract(&device_id(&id)?, &service, req)
            .await?,
    ))
}

async fn cancel_contract(
    State(state): State<AppState>,
    Path((id, service)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        state
            .bridge
            .cancel_contract(&device_id(&id)?, &service)
            .await?,
    ))
}

async fn poll_now(
    State(state): State<AppState>,
    Path(customer): Path<String>,
    Body(req): Body<PollNow>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.bridge.poll_now(&customer, req).await?))
}

async fn get_application(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let id = ApplicationId::parse(&id)
        .map_err(|e| ApiFailure::new(ErrorCode::BadRequest, e.to_string()))?;
    Ok(Json(state.bridge.application(&id).await?))
}

async fn create_ops_login(
    State(state): State<AppState>,
    Body(req): Body<schemas::api::CreateOpsLogin>,
) -> ApiResult<impl IntoResponse> {
    Ok((
        StatusCode::CREATED,
        Json(state.bridge.create_ops_login(req).await?),
    ))
}

async fn list_ops_logins(State(state): State<AppState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.bridge.ops_logins().await?))
}

async fn revoke_ops_login(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let id = schemas::OpsId::parse(&id)
        .map_err(|e| ApiFailure::new(ErrorCode::NotFound, e.to_string()))?;
    Ok(Json(state.bridge.revoke_ops_login(&id).await?))
}

async fn create_owner(
    State(state): State<AppState>,
    Body(req): Body<CreateOwner>,
) -> ApiResult<impl IntoResponse> {
    Ok((
        StatusCode::CREATED,
        Json(state.bridge.create_owner(req).await?),
    ))
}

async fn create_companion(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Body(req): Body<CreateCompanion>,
) -> ApiResult<impl IntoResponse> {
    let owner = owner_of(&principal)?;
    let created = state.bridge.create_companion(owner, req).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

async fn get_companion(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        state
            .bridge
            .companion(&principal, &companion_id(&id)?)
            .await?,
    ))
}

async fn link_companion(
    state: State<AppState>,
    principal: Extension<Principal>,
    path: Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    set_link(state, principal, path, true).await
}

async fn unlink_companion(
    state: State<AppState>,
    principal: Extension<Principal>,
    path: Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    set_link(state, principal, path, false).await
}

async fn set_link(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((id, device)): Path<(String, String)>,
    linked: bool,
) -> ApiResult<Json<schemas::api::CompanionView>> {
    let view = state
        .bridge
        .link_companion(
            &principal,
            &companion_id(&id)?,
            &device_id(&device)?,
            linked,
        )
        .await?;
    Ok(Json(view))
}

async fn submit_job(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    Body(req): Body<SubmitJob>,
) -> ApiResult<impl IntoResponse> {
    let (job, created) = state
        .bridge
        .submit_job(&principal, &device_id(&id)?, req)
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(job)))
}

async fn list_jobs(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.bridge.device_jobs(&device_id(&id)?).await?))
}

async fn get_job(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(state.bridge.job(&principal, &job_id(&id)?).await?))
}

async fn cancel_job(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Option<Body<CancelJob>>,
) -> ApiResult<impl IntoResponse> {
    let reason = body.and_then(|Body(b)| b.reason);
    Ok(Json(state.bridge.cancel_job(&job_id(&id)?, reason).await?))
}
