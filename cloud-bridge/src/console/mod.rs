//! The operator console: pages served from the admin listener under `/console/`, with their
//! script and style built into the binary (no build step, nothing fetched from elsewhere).
//!
//! - `POST /console/session` signs in with the admin token (`{"token": ...}`) or an ops login
//!   (`{"ops_id": ..., "password": ...}`) and sets the session cookie (HttpOnly,
//!   SameSite=Strict, expiring with the session; Secure when the listener speaks TLS). The
//!   answer carries the session's CSRF token; `GET` answers it again for a reloaded page,
//!   `DELETE` signs out.
//! - The pages call the admin API itself with the cookie: an admin session may do what the
//!   admin token may; an ops session may only read (`GET`). A change made with the cookie must
//!   carry the session's CSRF token in `X-CSRF-Token` ([`allow`]).
//! - `GET /console/events` streams the ops events as they are published (server-sent events),
//!   the same events as on MQTT under `fleet/events/`, each once its change is durable.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, COOKIE as COOKIE_HEADER, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use schemas::data::ErrorCode;
use schemas::{OpsId, UnixMillis};
use serde::{Deserialize, Serialize};

use crate::admin::shared::{ApiFailure, ApiResult, AppState, bearer};

mod actions;
pub(crate) mod sessions;

pub use actions::MAX_ACTIONS;
pub(crate) use actions::record;

pub use sessions::{COOKIE, CSRF_HEADER, MAX_SESSIONS, SESSION_MS, Session, Sessions, Viewer};

/// The page and what it loads, built into the binary: (path, content type, text).
const ASSETS: [(&str, &str, &str); 5] = [
    (
        "/console/",
        "text/html",
        include_str!("../../console/index.html"),
    ),
    (
        "/console/app.css",
        "text/css",
        include_str!("../../console/app.css"),
    ),
    (
        "/console/app.js",
        "text/javascript",
        include_str!("../../console/app.js"),
    ),
    (
        "/console/lib.js",
        "text/javascript",
        include_str!("../../console/lib.js"),
    ),
    (
        "/console/screens.js",
        "text/javascript",
        include_str!("../../console/screens.js"),
    ),
];

/// What the pages may load and where they may connect: this listener only.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' \
                   data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
                   base-uri 'none'";

/// Live event streams open at once, at most (each holds an admin connection).
pub const MAX_STREAMS: usize = 64;

/// The console's routes, added to the admin API's.
pub(crate) fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = ASSETS
        .into_iter()
        .fold(router, |router, (path, kind, text)| {
            router.route(path, get(move || async move { asset(kind, text) }))
        });
    router
        .route(
            "/console",
            get(|| async { Redirect::permanent("/console/") }),
        )
        .route(
            "/console/session",
            get(current).post(sign_in).delete(sign_out),
        )
        .route("/console/events", get(events))
        .route("/console/actions", get(actions::list))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = (
        [
            (CONTENT_TYPE, format!("{content_type}; charset=utf-8")),
            (CACHE_CONTROL, "no-cache".to_owned()),
        ],
        body,
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert("content-security-policy", HeaderValue::from_static(CSP));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    response
}

/// The session the request's cookie names, if it is valid: not expired, and for an ops login,
/// the login not revoked since.
pub(crate) fn signed_in(state: &AppState, headers: &HeaderMap) -> Option<(String, Session)> {
    let id = cookie(headers)?;
    let session = state.console.get(&id, state.bridge.now())?;
    if let Viewer::Ops(ops) = &session.viewer
        && !state.bridge.core().ops_login_active(ops)
    {
        state.console.end_ops(ops);
        return None;
    }
    Some((id, session))
}

/// Whether a request made with the session's cookie may go on: anything but a read needs an
/// admin session and the session's CSRF token.
pub(crate) fn allow(session: &Session, method: &Method, headers: &HeaderMap) -> ApiResult<()> {
    if method == Method::GET || method == Method::HEAD {
        return Ok(());
    }
    if let Viewer::Ops(_) = session.viewer {
        return Err(ApiFailure::new(
            ErrorCode::Forbidden,
            "an ops login may read, not change anything",
        ));
    }
    check_csrf(session, headers)
}

/// The request carries the session's CSRF token.
fn check_csrf(session: &Session, headers: &HeaderMap) -> ApiResult<()> {
    let presented = headers.get(CSRF_HEADER).map(HeaderValue::as_bytes);
    if !presented.is_some_and(|p| broker::constant_time_eq(p, session.csrf.expose().as_bytes())) {
        return Err(ApiFailure::new(
            ErrorCode::Forbidden,
            format!("a change made with the console's cookie needs the session's {CSRF_HEADER}"),
        ));
    }
    Ok(())
}

/// The `Set-Cookie` value for session `id` (empty, with no time left: signed out).
fn set_cookie(id: &str, max_age_secs: u64, secure: bool) -> ApiResult<HeaderValue> {
    let secure = if secure { "; Secure" } else { "" };
    let cookie =
        format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}{secure}");
    HeaderValue::from_str(&cookie).map_err(|e| ApiFailure::new(ErrorCode::Internal, e.to_string()))
}

/// The session as the page sees it, not to be cached, with the cookie to set if any.
fn session_answer(session: &Session, cookie: Option<HeaderValue>) -> Response {
    let mut response = Json(SessionView::from(session)).into_response();
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(cookie) = cookie {
        headers.insert(SET_COOKIE, cookie);
    }
    response
}

/// The value of the session cookie, if the request has one.
fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(COOKIE_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// `POST /console/session`: exactly one of the admin token and an ops login.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignIn {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    ops_id: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Who is signed in, until when, and the token their changes must carry.
#[derive(Debug, Serialize)]
struct SessionView {
    role: &'static str,
    ops_id: Option<OpsId>,
    csrf: String,
    expires_at: UnixMillis,
}

impl From<&Session> for SessionView {
    fn from(s: &Session) -> SessionView {
        let (role, ops_id) = match &s.viewer {
            Viewer::Admin => ("admin", None),
            Viewer::Ops(id) => ("ops", Some(id.clone())),
        };
        SessionView {
            role,
            ops_id,
            csrf: s.csrf.expose().to_owned(),
            expires_at: s.expires_at,
        }
    }
}

fn unauthorized(message: &str) -> ApiFailure {
    ApiFailure::new(ErrorCode::Unauthorized, message)
}

async fn sign_in(
    State(state): State<AppState>,
    body: Result<Json<SignIn>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) = body.map_err(|e| ApiFailure::new(ErrorCode::BadRequest, e.body_text()))?;
    let viewer = match (body.token, body.ops_id, body.password) {
        (Some(token), None, None) if state.is_admin_token(&token) => Viewer::Admin,
        (Some(_), None, None) => {
            tracing::warn!(target: "console", "console sign-in refused: wrong token");
            return Err(unauthorized("wrong token"));
        }
        (None, Some(id), Some(password)) => {
            match state.bridge.core().authenticate_ops(&id, &password) {
                Ok(id) => Viewer::Ops(id),
                Err(e) => {
                    tracing::warn!(target: "console", ops_id = %id, reason = ?e, "console sign-in refused");
                    return Err(unauthorized("wrong ops login or password"));
                }
            }
        }
        _ => {
            return Err(ApiFailure::new(
                ErrorCode::BadRequest,
                "give either `token`, or `ops_id` and `password`",
            ));
        }
    };
    tracing::info!(target: "console", viewer = ?viewer, "console sign-in");
    let (id, session) = state.console.start(viewer, state.bridge.now());
    let cookie = set_cookie(id.expose(), SESSION_MS / 1000, state.secure_cookies)?;
    Ok(session_answer(&session, Some(cookie)))
}

/// `GET /console/session`: the session the cookie names.
async fn current(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    let (_, session) = signed_in(&state, &headers).ok_or_else(|| unauthorized("not signed in"))?;
    Ok(session_answer(&session, None))
}

/// `DELETE /console/session`: signs out (with the session's CSRF token, like any change).
async fn sign_out(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    let (id, session) = signed_in(&state, &headers).ok_or_else(|| unauthorized("not signed in"))?;
    check_csrf(&session, &headers)?;
    state.console.end(&id);
    let expired = set_cookie("", 0, state.secure_cookies)?;
    Ok((StatusCode::NO_CONTENT, [(SET_COOKIE, expired)]).into_response())
}

/// Counts a live stream while it is open.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `GET /console/events`: the ops events as server-sent events (`event: ops`, the data
/// `{"topic": ..., "payload": ...}`), from now on. A stream that falls behind by more than
/// [`crate::bridge::LIVE_BACKLOG`] events gets `event: missed` with how many it lost, and
/// goes on. Signed in with the console's cookie, or with the admin token.
async fn events(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    let viewer_ok = signed_in(&state, &headers).is_some()
        || bearer(&headers).is_some_and(|t| state.is_admin_token(t));
    if !viewer_ok {
        return Err(unauthorized("not signed in"));
    }
    let open = state.live_streams.clone();
    if open.fetch_add(1, Ordering::Relaxed) >= MAX_STREAMS {
        open.fetch_sub(1, Ordering::Relaxed);
        return Err(ApiFailure::new(
            ErrorCode::Overloaded,
            format!("{MAX_STREAMS} live streams are open already"),
        ));
    }
    let guard = Open(open);
    let Some(receiver) = state.bridge.live_events() else {
        return Err(ApiFailure::new(
            ErrorCode::ShuttingDown,
            "the bridge is stopping",
        ));
    };
    let stream =
        futures_util::stream::unfold((receiver, guard), |(mut receiver, guard)| async move {
            use tokio::sync::broadcast::error::RecvError;
            let event = match receiver.recv().await {
                Ok(line) => Event::default().event("ops").data(&*line),
                Err(RecvError::Lagged(n)) => Event::default().event("missed").data(n.to_string()),
                Err(RecvError::Closed) => return None,
            };
            Some((Ok::<_, std::convert::Infallible>(event), (receiver, guard)))
        });
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}
