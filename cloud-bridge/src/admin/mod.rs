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

use axum::Router;
use axum::extract::Request;
use axum::http::HeaderMap;
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use schemas::data::ErrorCode;
use schemas::{Secret, UnixMillis};

use crate::bridge::Bridge;
use crate::core::Principal;

pub(crate) mod ops;
mod people;
pub(crate) mod serve;
pub(crate) mod shared;
mod status;

pub(crate) use shared::{ApiFailure, ApiResult, AppState, bearer};

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

// The handlers' common steps (`ops.rs`, `people.rs`).

fn bridge(state: &AppState) -> &Bridge {
    &state.bridge
}

/// The time, as the bridge's clock says.
fn now(s: &AppState) -> UnixMillis {
    s.bridge.now()
}

/// A payload given as text or as standard base64 (exactly one).
fn decode_payload(text: Option<&str>, b64: Option<&str>) -> ApiResult<Vec<u8>> {
    use base64::Engine as _;
    match (text, b64) {
        (Some(text), None) => Ok(text.as_bytes().to_vec()),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| ApiFailure::new(ErrorCode::BadRequest, format!("payload_base64: {e}"))),
        _ => Err(ApiFailure::new(
            ErrorCode::BadRequest,
            "give exactly one of payload and payload_base64",
        )),
    }
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
