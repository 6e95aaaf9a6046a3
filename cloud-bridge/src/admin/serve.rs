//! Serving an operation from its declaration in [`schemas::admin`]: one generic handler reads
//! the token, the query, the body and the path parameters as the declaration says, in that
//! order, and hands them to the operation's [`Serve::serve`].

use std::any::TypeId;
use std::future::Future;

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post, put};
use axum::{Json, Router};
use schemas::admin::{Access, BodyUse, Method, Operation, PathParams};
use schemas::data::ErrorCode;
use serde::de::DeserializeOwned;

use super::{ApiFailure, ApiResult, AppState, authenticate};
use crate::core::Principal;

/// An operation's arguments, as the declaration types them.
#[derive(Debug)]
pub(crate) struct Call<O: Operation> {
    pub(crate) principal: Principal,
    pub(crate) params: O::Params,
    pub(crate) query: O::Query,
    pub(crate) body: O::Body,
}

/// An answer, with the declared status unless `status` says otherwise.
#[derive(Debug)]
pub(crate) struct Reply<A> {
    pub(crate) answer: A,
    pub(crate) status: Option<StatusCode>,
}

impl<A> From<A> for Reply<A> {
    fn from(answer: A) -> Reply<A> {
        Reply {
            answer,
            status: None,
        }
    }
}

/// How the bridge carries out an operation.
pub(crate) trait Serve: Operation + Sized {
    fn serve(
        state: &AppState,
        call: Call<Self>,
    ) -> impl Future<Output = ApiResult<Reply<Self::Answer>>> + Send;
}

/// Adds the operation's route to `router`.
pub(crate) fn route<O: Serve>(router: Router<AppState>) -> Router<AppState> {
    // axum 0.7 writes parameters as `:name`.
    let path: String = O::PATH
        .split('/')
        .map(|part| match part.strip_prefix('{') {
            Some(name) => format!(":{}", name.trim_end_matches('}')),
            None => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("/");
    let handler = handle::<O>;
    let method: MethodRouter<AppState> = match O::METHOD {
        Method::Get => get(handler),
        Method::Post => post(handler),
        Method::Put => put(handler),
        Method::Delete => delete(handler),
    };
    router.route(&path, method)
}

async fn handle<O: Serve>(State(state): State<AppState>, request: Request) -> Response {
    match run::<O>(&state, request).await {
        Ok(response) => response,
        Err(failure) => failure.into_response(),
    }
}

/// The value of a part the declaration says is not there (`()`), or an absent optional body
/// (`None`).
fn absent<T: DeserializeOwned>() -> ApiResult<T> {
    serde_json::from_value(serde_json::Value::Null).map_err(|e| {
        ApiFailure::new(
            ErrorCode::Internal,
            format!("operation declared without a part it needs: {e}"),
        )
    })
}

async fn run<O: Serve>(state: &AppState, request: Request) -> ApiResult<Response> {
    let (mut parts, body) = request.into_parts();
    let principal = match O::ACCESS {
        Access::Public => Principal::Admin,
        Access::Admin | Access::Token => {
            let principal = authenticate(state, &parts.headers)?;
            if O::ACCESS == Access::Admin && principal != Principal::Admin {
                return Err(ApiFailure::new(
                    ErrorCode::Forbidden,
                    "this route needs the admin token",
                ));
            }
            principal
        }
    };
    let query: O::Query = if TypeId::of::<O::Query>() == TypeId::of::<()>() {
        absent()?
    } else {
        let Query(q) = Query::<O::Query>::from_request_parts(&mut parts, state)
            .await
            .map_err(|e| ApiFailure::new(ErrorCode::BadRequest, e.body_text()))?;
        q
    };
    let raw_params: Vec<String> = if O::PATH.contains('{') {
        let Path(raw) = Path::<Vec<String>>::from_request_parts(&mut parts, state)
            .await
            .map_err(|e| ApiFailure::new(ErrorCode::BadRequest, e.body_text()))?;
        raw
    } else {
        Vec::new()
    };
    let request = Request::from_parts(parts, body);
    let body: O::Body = match O::BODY {
        BodyUse::None => absent()?,
        BodyUse::Required => match Json::<O::Body>::from_request(request, state).await {
            Ok(Json(b)) => b,
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiFailure::new(
                    ErrorCode::PayloadTooLarge,
                    format!(
                        "the body is larger than the limit of {} bytes (a job's payload: at \
                         most {} bytes once decoded)",
                        super::BODY_LIMIT,
                        schemas::MAX_PAYLOAD_BYTES
                    ),
                ));
            }
            Err(rejection) => {
                return Err(ApiFailure::new(
                    ErrorCode::BadRequest,
                    rejection.body_text(),
                ));
            }
        },
        BodyUse::Optional => match Json::<O::Body>::from_request(request, state).await {
            Ok(Json(b)) => b,
            Err(_) => absent()?,
        },
    };
    let params =
        O::Params::parse(&raw_params).map_err(|e| ApiFailure::new(ErrorCode::BadRequest, e))?;
    let call = Call {
        principal,
        params,
        query,
        body,
    };
    let reply = O::serve(state, call).await?;
    let status = reply
        .status
        .unwrap_or_else(|| StatusCode::from_u16(O::STATUS).unwrap_or(StatusCode::OK));
    if TypeId::of::<O::Answer>() == TypeId::of::<()>() {
        return Ok(status.into_response());
    }
    Ok((status, Json(reply.answer)).into_response())
}
