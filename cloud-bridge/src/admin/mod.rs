//! The HTTP API: JSON over HTTP/1.1, every route but health behind
//! `Authorization: Bearer <token>`. The token says who calls ([`Principal`]): the admin token
//! opens every route; an owner's, a companion's or a user's token opens only the routes
//! declared `Token`, and there only their own devices, jobs and held jobs (see
//! [`crate::core`]'s `principals`).
//!
//! Every operation is declared once in [`schemas::admin`] (method, route, access, types);
//! [`serve`] serves any declared operation, and [`ops`] says what each one does and lists the
//! routes. Health and metrics are in [`status`].
//!
//! Errors are `{"code": "...", "message": "..."}` with the codes of [`ErrorCode`].

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use schemas::Secret;
use schemas::api::ApiError;
use schemas::data::ErrorCode;

use crate::bridge::Bridge;
use crate::core::{CoreError, Principal};

pub(crate) mod ops;
mod people;
pub(crate) mod serve;
mod status;

#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) bridge: Bridge,
    token: Arc<Secret>,
    /// The console's sign-in sessions.
    pub(crate) console: Arc<crate::console::Sessions>,
    /// The console's cookie is marked `Secure` (the listener speaks TLS).
    pub(crate) secure_cookies: bool,
    /// The console's live event streams open now.
    pub(crate) live_streams: Arc<std::sync::atomic::AtomicUsize>,
}

impl AppState {
    pub(crate) fn new(bridge: Bridge, admin_token: Secret, secure_cookies: bool) -> AppState {
        AppState {
            bridge,
            token: Arc::new(admin_token),
            console: Arc::default(),
            secure_cookies,
            live_streams: Arc::default(),
        }
    }

    pub(crate) fn is_admin_token(&self, presented: &str) -> bool {
        broker::constant_time_eq(presented.as_bytes(), self.token.expose().as_bytes())
    }
}

/// The largest request body.
pub(crate) const BODY_LIMIT: usize = schemas::MAX_BODY_BYTES;

/// The admin API router: every operation of [`schemas::admin`], and the console
/// ([`crate::console`]), whose cookie is marked `Secure` if `tls` (the listener speaks TLS).
pub fn router(bridge: Bridge, admin_token: Secret, tls: bool) -> Router {
    let state = AppState::new(bridge, admin_token, tls);
    crate::console::routes(ops::routes(Router::new()))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::console::record,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// `GET /metrics`: Prometheus text, open unless `token` is set (then `Bearer <token>`).
pub fn metrics_router(bridge: Bridge, token: Option<Secret>) -> Router {
    let token = Arc::new(token);
    Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: HeaderMap| {
            let (bridge, token) = (bridge.clone(), token.clone());
            async move {
                if let Some(token) = token.as_ref()
                    && !bearer(&headers).is_some_and(|presented| {
                        broker::constant_time_eq(presented.as_bytes(), token.expose().as_bytes())
                    })
                {
                    return ApiFailure::new(
                        ErrorCode::Unauthorized,
                        "missing or wrong `Authorization: Bearer <metrics_token>`",
                    )
                    .into_response();
                }
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        crate::telemetry::CONTENT_TYPE,
                    )],
                    crate::telemetry::render(&bridge),
                )
                    .into_response()
            }
        }),
    )
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
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> ApiFailure {
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
    StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
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

pub(crate) type ApiResult<T> = Result<T, ApiFailure>;

/// The bearer token presented, if any.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Who calls: the bearer token's principal, or with no token, the console session the cookie
/// names (an admin session is the administrator; an ops session reads as one and changes
/// nothing; see [`crate::console::allow`]).
fn authenticate(
    state: &AppState,
    method: &axum::http::Method,
    headers: &HeaderMap,
) -> ApiResult<Principal> {
    match bearer(headers) {
        Some(token) if state.is_admin_token(token) => Ok(Principal::Admin),
        Some(token) => state
            .bridge
            .core()
            .principal(token)
            .ok_or_else(|| ApiFailure::new(ErrorCode::Unauthorized, "unknown token")),
        None => match crate::console::signed_in(state, headers) {
            Some((_, session)) => {
                crate::console::allow(&session, method, headers)?;
                Ok(Principal::Admin)
            }
            None => Err(ApiFailure::new(
                ErrorCode::Unauthorized,
                "missing `Authorization: Bearer <token>`",
            )),
        },
    }
}

async fn not_found() -> ApiFailure {
    ApiFailure::new(ErrorCode::NotFound, "no such route")
}
