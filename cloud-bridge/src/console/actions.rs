//! The changes operators make through the console, recorded as they are answered: who (the
//! admin session, or an ops login refused), what (method and path), when, and how it ended.
//! Each goes to the bridge's log (`console action`, target `console`) and to a bounded list
//! in memory that `GET /console/actions` answers, newest first; the log is what outlives a
//! restart. Reads are not recorded.

use std::collections::VecDeque;
use std::sync::Mutex;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use schemas::UnixMillis;
use serde::Serialize;

use super::{Viewer, signed_in};
use crate::admin::{ApiFailure, ApiResult, AppState};

/// Actions kept in memory, at most.
pub const MAX_ACTIONS: usize = 1000;

#[derive(Debug, Clone, Serialize)]
pub struct Action {
    pub at: UnixMillis,
    /// `admin`, or `ops:{id}`.
    pub by: String,
    pub method: String,
    pub path: String,
    /// The HTTP status it was answered with.
    pub status: u16,
}

#[derive(Debug, Default)]
pub struct Actions {
    list: Mutex<VecDeque<Action>>,
}

impl Actions {
    fn push(&self, action: Action) {
        let mut list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        if list.len() >= MAX_ACTIONS {
            list.pop_front();
        }
        list.push_back(action);
    }

    /// The newest first.
    pub fn newest(&self) -> Vec<Action> {
        let list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        list.iter().rev().cloned().collect()
    }
}

/// Records each change a console session asks for, once it is answered.
pub(crate) async fn record(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let changes = !matches!(*request.method(), Method::GET | Method::HEAD);
    let by_cookie = crate::admin::bearer(request.headers()).is_none();
    let viewer = (changes && by_cookie)
        .then(|| signed_in(&state, request.headers()))
        .flatten()
        .map(|(_, session)| session.viewer);
    let (method, path) = (
        request.method().to_string(),
        request.uri().path().to_owned(),
    );
    let response = next.run(request).await;
    if let Some(viewer) = viewer
        && path != "/console/session"
    {
        let by = match viewer {
            Viewer::Admin => "admin".to_owned(),
            Viewer::Ops(id) => format!("ops:{id}"),
        };
        let status = response.status().as_u16();
        tracing::info!(target: "console", %by, %method, %path, status, "console action");
        state.actions.push(Action {
            at: state.bridge.now(),
            by,
            method,
            path,
            status,
        });
    }
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
    let mut response = Json(state.actions.newest()).into_response();
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    Ok(response)
}
