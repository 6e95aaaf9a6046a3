//! Serving an operation from its declaration in [`schemas::admin`]: one generic handler reads
//! the token, the query, the body and the path parameters as the declaration says, in that
//! order, and hands them to the operation's [`Serve::serve`].

use std::any::TypeId;
use std::future::Future;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_LENGTH;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post, put};
use axum::{Json, Router};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
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
    let schemas = Arc::new((BodySchema::of::<O>(), BodySchema::of_query::<O>()));
    let handler = move |State(state): State<AppState>, request: Request| {
        let schemas = schemas.clone();
        async move {
            match run::<O>(&state, &schemas, request).await {
                Ok(response) => response,
                Err(failure) => failure.into_response(),
            }
        }
    };
    let method: MethodRouter<AppState> = match O::METHOD {
        Method::Get => get(handler),
        Method::Post => post(handler),
        Method::Put => put(handler),
        Method::Delete => delete(handler),
    };
    router.route(&path, method)
}

/// The JSON Schema a body must meet, as the OpenAPI document publishes it (`None` for an
/// operation without a body).
struct BodySchema(Option<jsonschema::Validator>);

impl BodySchema {
    fn of<O: Operation>() -> BodySchema {
        if O::BODY == BodyUse::None {
            return BodySchema(None);
        }
        let schema = schemas::openapi::root_schema::<O::Body>();
        // The schemas are ours and fixed at build time; a test builds every one of them.
        BodySchema(jsonschema::draft202012::new(&schema).ok())
    }

    /// The schema of the operation's query (`None` for one without): its values, once read,
    /// must meet it as a body's must (lengths, ranges).
    fn of_query<O: Operation>() -> BodySchema {
        if TypeId::of::<O::Query>() == TypeId::of::<()>() {
            return BodySchema(None);
        }
        let schema = schemas::openapi::root_schema::<O::Query>();
        BodySchema(jsonschema::draft202012::new(&schema).ok())
    }

    /// `what`: `body` or `query`, for the message.
    fn check(&self, what: &str, value: &serde_json::Value) -> ApiResult<()> {
        let Some(validator) = &self.0 else {
            return Ok(());
        };
        match validator.iter_errors(value).next() {
            None => Ok(()),
            Some(e) => {
                let at = e.instance_path().to_string();
                let at = if at.is_empty() { "/".to_owned() } else { at };
                let mut message = format!("{at}: {}", e.masked());
                if message.len() > 300 {
                    message.truncate(message.floor_char_boundary(300));
                    message.push_str("...");
                }
                Err(ApiFailure::new(
                    ErrorCode::BadRequest,
                    format!("the {what} does not match its schema at {message}"),
                ))
            }
        }
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

/// How much of a body over [`super::BODY_LIMIT`] is read and dropped before the 413 is sent.
/// Answering before the client has finished sending makes hyper close the connection under
/// it, and the client then sees a reset instead of the 413; past this bound, or when the
/// declared length is past it, the bridge answers at once and closes.
const DRAIN_LIMIT: usize = 8 * super::BODY_LIMIT;

fn too_large() -> ApiFailure {
    ApiFailure::new(
        ErrorCode::PayloadTooLarge,
        format!(
            "the body is larger than the limit of {} bytes (a job's payload: at most {} bytes \
             once decoded)",
            super::BODY_LIMIT,
            schemas::MAX_PAYLOAD_BYTES
        ),
    )
}

/// The request body, at most [`super::BODY_LIMIT`] bytes: a longer one is read to its end
/// (up to [`DRAIN_LIMIT`]) and dropped, then refused with 413.
async fn read_body(parts: &Parts, mut body: Body) -> ApiResult<Bytes> {
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > DRAIN_LIMIT as u64) {
        return Err(too_large());
    }
    let mut kept = BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiFailure::new(
                ErrorCode::BadRequest,
                format!("the body could not be read: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        seen = seen.saturating_add(data.len());
        if seen > DRAIN_LIMIT {
            return Err(too_large());
        }
        if seen <= super::BODY_LIMIT {
            kept.extend_from_slice(&data);
        }
    }
    if seen > super::BODY_LIMIT {
        return Err(too_large());
    }
    Ok(kept.freeze())
}

/// A JSON body: axum's extractor checks the content type and the syntax, the value is checked
/// against the body's schema, then read as `T`, with integers also written as whole floats
/// (`2.0`), as JSON Schema counts them.
async fn json<T: DeserializeOwned>(
    state: &AppState,
    schema: &BodySchema,
    parts: Parts,
    bytes: Bytes,
) -> ApiResult<T> {
    let request = Request::from_parts(parts, Body::from(bytes));
    let mut value = match Json::<serde_json::Value>::from_request(request, state).await {
        Ok(Json(value)) => value,
        Err(rejection) => {
            return Err(ApiFailure::new(
                ErrorCode::BadRequest,
                rejection.body_text(),
            ));
        }
    };
    schema.check("body", &value)?;
    whole_floats_as_integers(&mut value);
    serde_path_to_error::deserialize(value).map_err(|e| {
        ApiFailure::new(
            ErrorCode::BadRequest,
            format!("Failed to deserialize the JSON body into the target type: {e}"),
        )
    })
}

/// Replaces every float with no fractional part that fits an `i64` or a `u64` by that integer.
fn whole_floats_as_integers(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Number(n) if !(n.is_u64() || n.is_i64()) => {
            let Some(f) = n.as_f64() else { return };
            // 2^64 and -2^63 are exact as f64; the casts below are exact in these ranges.
            if f.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&f) {
                *n = serde_json::Number::from(f as u64);
            } else if f.fract() == 0.0 && (-9_223_372_036_854_775_808.0..0.0).contains(&f) {
                *n = serde_json::Number::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(whole_floats_as_integers),
        Value::Object(map) => map.values_mut().for_each(whole_floats_as_integers),
        _ => {}
    }
}

async fn run<O: Serve>(
    state: &AppState,
    (schema, query_schema): &(BodySchema, BodySchema),
    request: Request,
) -> ApiResult<Response> {
    let (mut parts, body) = request.into_parts();
    let principal = match O::ACCESS {
        Access::Public => Principal::Admin,
        Access::Admin | Access::Token => {
            let principal = authenticate(state, &parts.method, &parts.headers)?;
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
        let value = serde_json::to_value(&q)
            .map_err(|e| ApiFailure::new(ErrorCode::Internal, e.to_string()))?;
        query_schema.check("query", &value)?;
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
    let body: O::Body = match O::BODY {
        BodyUse::None => absent()?,
        BodyUse::Required => {
            let bytes = read_body(&parts, body).await?;
            json(state, schema, parts, bytes).await?
        }
        BodyUse::Optional => {
            let bytes = read_body(&parts, body).await?;
            if bytes.is_empty() {
                absent()?
            } else {
                json(state, schema, parts, bytes).await?
            }
        }
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

#[cfg(test)]
mod tests {
    use schemas::admin::{Visit, for_each_operation};

    use super::*;

    #[test]
    fn every_body_and_query_schema_compiles() {
        struct Compile(Vec<&'static str>);
        impl Visit for Compile {
            fn visit<O: Operation>(&mut self, name: &'static str, _: &[&'static str]) {
                if O::BODY != BodyUse::None && BodySchema::of::<O>().0.is_none() {
                    self.0.push(name);
                }
                let has_query = TypeId::of::<O::Query>() != TypeId::of::<()>();
                if has_query && BodySchema::of_query::<O>().0.is_none() {
                    self.0.push(name);
                }
            }
        }
        let mut failed = Compile(Vec::new());
        for_each_operation(&mut failed);
        assert!(failed.0.is_empty(), "{:?}", failed.0);
    }

    /// A query's values are held to its schema: a page size out of range, an empty search.
    #[test]
    fn a_query_outside_its_schema_is_refused() {
        let schema = BodySchema::of_query::<schemas::admin::ListDevices>();
        let check = |v: serde_json::Value| schema.check("query", &v).is_ok();
        assert!(check(serde_json::json!({ "q": "SN", "limit": 50 })));
        assert!(check(serde_json::json!({ "q": null, "limit": null })));
        assert!(!check(serde_json::json!({ "limit": 0 })));
        assert!(!check(serde_json::json!({ "limit": 1001 })));
        assert!(!check(serde_json::json!({ "q": "" })));
    }

    /// The schema's base64 pattern accepts exactly what the bridge decodes.
    #[test]
    fn the_base64_pattern_is_the_decoder() {
        use base64::Engine as _;
        let schema = BodySchema::of::<schemas::admin::SubmitJobOp>();
        let alphabet: Vec<char> = "ABQRgwx/+=0489".chars().collect();
        let mut strings = vec![String::new()];
        for _ in 0..5 {
            let longer: Vec<String> = strings
                .iter()
                .filter(|s| s.len() == strings.last().map_or(0, String::len))
                .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                .collect();
            strings.extend(longer);
        }
        for prefix in ["", "QUJD"] {
            for s in &strings {
                let text = format!("{prefix}{s}");
                let body = serde_json::json!({ "payload_base64": text });
                let decodes = base64::engine::general_purpose::STANDARD
                    .decode(&text)
                    .is_ok();
                assert_eq!(schema.check("body", &body).is_ok(), decodes, "{text:?}");
            }
        }
    }
}
