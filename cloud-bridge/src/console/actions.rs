//! The changes operators make through the console: who (the admin session, or an ops login
//! refused), what (method and path), when, and how it was answered. Each is stored before it
//! is carried out and again with its answer (the core's audit trail, `core/audit.rs`), and
//! goes to the bridge's log (`console action`, target `console`); `GET /console/actions`
//! answers the newest, from the store. Reads are not recorded.

use std::sync::atomic::{AtomicU32, Ordering};

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use schemas::records::ConsoleActionRecord;

use super::{Viewer, signed_in};
use crate::admin::shared::{ApiFailure, ApiResult, AppState, bearer};

/// Actions `GET /console/actions` lists, at most.
pub const MAX_ACTIONS: usize = 1000;

/// Orders the actions asked for in the same millisecond (the first half of their ids).
static NEXT: AtomicU32 = AtomicU32::new(0);

/// A new action's id: this process's count, then 32 random bits, in hex.
fn action_id() -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{n:08x}{:08x}", rand::random::<u32>())
}

/// Stores the record and waits until it is durable. A store that refuses it is logged: the
/// change itself is answered all the same (its own record says whether it took effect).
async fn store(state: &AppState, action: &ConsoleActionRecord) {
    let bridge = &state.bridge;
    let stored = match bridge.core().record_console_action(action) {
        Ok(ticket) => bridge.durable_read(ticket).await,
        Err(e) => Err(e),
    };
    if let Err(e) = stored {
        tracing::error!(target: "console", error = %e, id = %action.id, "console action not stored");
    }
}

/// Records each change a console session asks for: before it is carried out, and once it is
/// answered.
pub(crate) async fn record(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let changes = !matches!(*request.method(), Method::GET | Method::HEAD);
    let by_cookie = bearer(request.headers()).is_none();
    let path = request.uri().path().to_owned();
    let viewer = (changes && by_cookie && path != "/console/session")
        .then(|| signed_in(&state, request.headers()))
        .flatten()
        .map(|(_, session)| session.viewer);
    let Some(viewer) = viewer else {
        return next.run(request).await;
    };
    let mut action = ConsoleActionRecord {
        id: action_id(),
        at: state.bridge.now(),
        by: match viewer {
            Viewer::Admin => "admin".to_owned(),
            Viewer::Ops(id) => format!("ops:{id}"),
        },
        method: request.method().to_string(),
        path,
        status: None,
    };
    store(&state, &action).await;
    let response = next.run(request).await;
    let status = response.status().as_u16();
    action.status = Some(status);
    tracing::info!(
        target: "console",
        by = %action.by, method = %action.method, path = %action.path, status,
        "console action"
    );
    store(&state, &action).await;
    response
}

/// `GET /console/actions`: what was changed through the console, newest first.
pub(crate) async fn list(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> ApiResult<Response> {
    if signed_in(&state, &headers).is_none() {
        return Err(ApiFailure::new(
            schemas::data::ErrorCode::Unauthorized,
            "not signed in",
        ));
    }
    let bridge = state.bridge.clone();
    let actions = tokio::task::spawn_blocking(move || {
        let actions = bridge.core().console_actions(MAX_ACTIONS)?;
        Ok::<_, crate::core::CoreError>(actions)
    })
    .await
    .map_err(|e| ApiFailure::new(schemas::data::ErrorCode::Internal, e.to_string()))??;
    let mut response = Json(actions).into_response();
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    Ok(response)
}
