//! What the admin API's handlers and the operator console share: the state every request is
//! served with, the error answer (`{"code": "...", "message": "..."}`), and the bearer token
//! a request presents.

use std::sync::Arc;

use axum::Json;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use schemas::Secret;
use schemas::api::ApiError;
use schemas::data::ErrorCode;

use crate::bridge::Bridge;
use crate::core::CoreError;

#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) bridge: Bridge,
    token: Arc<Secret>,
    /// The console's sign-in sessions.
    pub(crate) console: Arc<crate::console::sessions::Sessions>,
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

/// An API error response.
#[derive(Debug)]
pub(crate) struct ApiFailure(StatusCode, ApiError);

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
