//! The admin API's OpenAPI 3.1 document, built from the operations declared in
//! [`crate::admin`] and the JSON Schema of their types, so that it cannot drift from what the
//! bridge serves. The bridge serves it at `GET /v1/openapi.json`; the repository keeps a copy
//! (`openapi.json`) that a test holds equal to it.

use std::any::TypeId;

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{Map, Value, json};

use crate::admin::{
    Access, BodyUse, GetHealth, Method, Operation, PathParams, SubmitJobOp, Visit,
    for_each_operation,
};
use crate::api::ApiError;

/// The document, as JSON.
pub fn document() -> Value {
    let mut paths = Paths {
        generator: SchemaSettings::draft2020_12()
            .with(|s| s.definitions_path = "#/components/schemas/".into())
            .into_generator(),
        inline: SchemaSettings::draft2020_12()
            .with(|s| s.inline_subschemas = true)
            .into_generator(),
        paths: Map::new(),
    };
    for_each_operation(&mut paths);
    let error = paths.generator.subschema_for::<ApiError>();
    let mut schemas = paths.generator.take_definitions(true);
    schemas.sort_keys();
    let mut document = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Cloud bridge admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": description(),
        },
        "paths": paths.paths,
        "components": {
            "schemas": schemas,
            "responses": error_responses(&error.to_value()),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The admin token (printed by `cloud-bridge serve` at first \
                        start, in `<data dir>/admin-token`), or the token of an owner, a \
                        companion or a user, for the operations that say so.",
                },
            },
        },
    });
    tidy(&mut document);
    document
}

/// The JSON Schema of `T` as a document of its own (its definitions under `$defs`), as the
/// OpenAPI document gives it: what the bridge checks a request body against.
pub fn root_schema<T: JsonSchema>() -> Value {
    let mut schema = SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<T>()
        .to_value();
    tidy(&mut schema);
    schema
}

/// Gives each integer the bounds of its Rust type (schemars writes only the lower one of the
/// wide types), and joins the lines of descriptions taken from doc comments.
fn tidy(value: &mut Value) {
    match value {
        Value::Object(map) => {
            let bounds: Option<(Value, Value)> = match map.get("format").and_then(Value::as_str) {
                Some("uint16") => Some((json!(0), json!(u16::MAX))),
                Some("uint32") => Some((json!(0), json!(u32::MAX))),
                Some("uint64" | "uint") => Some((json!(0), json!(u64::MAX))),
                Some("int32") => Some((json!(i32::MIN), json!(i32::MAX))),
                Some("int64" | "int") => Some((json!(i64::MIN), json!(i64::MAX))),
                _ => None,
            };
            if let Some((min, max)) = bounds {
                map.entry("minimum").or_insert(min);
                map.entry("maximum").or_insert(max);
            }
            if let Some(Value::String(text)) = map.get_mut("description") {
                *text = text
                    .split('\n')
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(" ");
            }
            map.values_mut().for_each(tidy);
        }
        Value::Array(items) => items.iter_mut().for_each(tidy),
        _ => {}
    }
}

fn description() -> String {
    format!(
        "Enrolls devices, submits and follows jobs, manages services, people and operations \
         logins. Every error is a JSON `ApiError` with a stable `code`; the HTTP status follows \
         from the code (see `ErrorCode`). Request bodies are JSON, at most {} bytes (a job's \
         payload at most {} bytes once decoded); unknown fields in a body are refused. A \
         request not answered within the bridge's request timeout gets 408.",
        crate::MAX_BODY_BYTES,
        crate::MAX_PAYLOAD_BYTES
    )
}

/// Every error status an operation can answer, each with the codes that give it.
const ERRORS: &[(u16, &str)] = &[
    (
        400,
        "`bad_request`: the path, the query or the body does not parse",
    ),
    (
        401,
        "`unauthorized`: no token, or one the bridge does not know",
    ),
    (
        403,
        "`forbidden` (not this token's to see or change), `device_disabled`, \
         `consent_withheld`, `registration_code_invalid`",
    ),
    (
        404,
        "`not_found`: a device, job or other record named does not exist",
    ),
    (408, "`timeout`: not answered within the request timeout"),
    (
        409,
        "`invalid_state`, `conflict` (e.g. an idempotency key reused for another job), \
         `registration_incomplete`",
    ),
    (
        410,
        "`expired`: an instruction, a held job or a code past its time",
    ),
    (
        413,
        "`payload_too_large`: the body or a job's payload is over its limit",
    ),
    (
        422,
        "`unsupported_setting`: a print setting the printer cannot honour",
    ),
    (503, "`overloaded` or `shutting_down`: try again later"),
];

fn error_responses(error: &Value) -> Value {
    let mut out = Map::new();
    for (status, codes) in ERRORS {
        out.insert(
            status.to_string(),
            json!({
                "description": codes,
                "content": { "application/json": { "schema": error } },
            }),
        );
    }
    Value::Object(out)
}

/// The error statuses `O` can answer.
fn error_statuses<O: Operation>() -> Vec<u16> {
    let mut out = vec![408];
    let takes_input = O::PATH.contains('{')
        || TypeId::of::<O::Query>() != TypeId::of::<()>()
        || O::BODY != BodyUse::None;
    if takes_input {
        out.push(400);
    }
    if O::ACCESS != Access::Public {
        out.extend([401, 403]);
    }
    if O::PATH.contains('{') || O::BODY != BodyUse::None {
        out.push(404);
    }
    if O::METHOD != Method::Get {
        out.push(409);
    }
    if O::BODY != BodyUse::None {
        out.extend([410, 413, 422]);
    }
    if O::ACCESS != Access::Public {
        out.push(503);
    }
    out.sort_unstable();
    out
}

struct Paths {
    /// Named types become `#/components/schemas/…` references.
    generator: SchemaGenerator,
    /// For a query, whose fields become parameters one by one.
    inline: SchemaGenerator,
    paths: Map<String, Value>,
}

impl Visit for Paths {
    fn visit<O: Operation>(&mut self, name: &'static str, doc: &[&'static str]) {
        let description = doc.iter().map(|l| l.trim()).collect::<Vec<_>>().join(" ");
        let summary = match description.split(". ").next() {
            Some(first) if !first.is_empty() => first.trim_end_matches('.').to_owned(),
            _ => words(name),
        };
        let mut operation = Map::new();
        operation.insert("operationId".into(), json!(name));
        operation.insert("summary".into(), json!(summary));
        let access = match O::ACCESS {
            Access::Public => "No token needed.",
            Access::Admin => "Needs the admin token.",
            Access::Token => {
                "Any valid token: the admin's, or an owner's, a companion's or a user's for \
                 what is theirs."
            }
        };
        operation.insert(
            "description".into(),
            json!(format!("{description} {access}").trim()),
        );
        operation.insert(
            "security".into(),
            match O::ACCESS {
                Access::Public => json!([]),
                Access::Admin | Access::Token => json!([{ "bearer": [] }]),
            },
        );
        let parameters = self.parameters::<O>();
        if !parameters.is_empty() {
            operation.insert("parameters".into(), Value::Array(parameters));
        }
        if O::BODY != BodyUse::None {
            operation.insert(
                "requestBody".into(),
                json!({
                    "required": O::BODY == BodyUse::Required,
                    "content": { "application/json": {
                        "schema": self.generator.subschema_for::<O::Body>(),
                    } },
                }),
            );
        }
        operation.insert("responses".into(), self.responses::<O>());
        let item = self
            .paths
            .entry(O::PATH)
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(item) = item {
            item.insert(
                O::METHOD.as_str().to_ascii_lowercase(),
                Value::Object(operation),
            );
        }
    }
}

impl Paths {
    fn parameters<O: Operation>(&mut self) -> Vec<Value> {
        let names = O::PATH
            .split('/')
            .filter_map(|part| part.strip_prefix('{')?.strip_suffix('}'));
        let schemas = O::Params::schemas(&mut self.generator);
        let mut out: Vec<Value> = names
            .zip(schemas)
            .map(|(name, schema)| {
                json!({ "name": name, "in": "path", "required": true, "schema": schema })
            })
            .collect();
        if TypeId::of::<O::Query>() != TypeId::of::<()>() {
            out.extend(query_parameters(
                self.inline.subschema_for::<O::Query>().to_value(),
            ));
        }
        out
    }

    fn responses<O: Operation>(&mut self) -> Value {
        let mut out = Map::new();
        let mut success = json!({ "description": success_description(O::STATUS) });
        if TypeId::of::<O::Answer>() != TypeId::of::<()>() {
            success["content"] = json!({ "application/json": {
                "schema": self.generator.subschema_for::<O::Answer>(),
            } });
        }
        out.insert(O::STATUS.to_string(), success.clone());
        if TypeId::of::<O>() == TypeId::of::<SubmitJobOp>() {
            let mut earlier = success.clone();
            earlier["description"] = json!("The earlier job with the same idempotency key.");
            out.insert("200".into(), earlier);
        }
        if TypeId::of::<O>() == TypeId::of::<GetHealth>() {
            let mut unavailable = success;
            unavailable["description"] = json!("Some part cannot serve: `problems` names it.");
            out.insert("503".into(), unavailable);
        }
        for status in error_statuses::<O>() {
            out.entry(status.to_string())
                .or_insert_with(|| json!({ "$ref": format!("#/components/responses/{status}") }));
        }
        Value::Object(out)
    }
}

/// `ListDeviceJobs` as "List device jobs", `CancelJobOp` as "Cancel job".
fn words(name: &str) -> String {
    let name = name.strip_suffix("Op").unwrap_or(name);
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push(' ');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn success_description(status: u16) -> &'static str {
    match status {
        201 => "Created.",
        202 => "Accepted: passed on, done later.",
        _ => "Done.",
    }
}

/// A query's fields as parameters, each optional unless its schema requires it.
fn query_parameters(schema: Value) -> Vec<Value> {
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|names| names.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(properties) = schema["properties"].as_object() else {
        return Vec::new();
    };
    properties
        .iter()
        .map(|(name, property)| {
            let mut property = property.clone();
            let description = property
                .as_object_mut()
                .and_then(|p| p.remove("description"));
            let mut parameter = json!({
                "name": name,
                "in": "query",
                "required": required.contains(&name.as_str()),
                "schema": not_null(property),
            });
            if let Some(description) = description {
                parameter["description"] = description;
            }
            parameter
        })
        .collect()
}

/// A query parameter is absent rather than null: `["integer", "null"]` becomes `"integer"`.
fn not_null(mut schema: Value) -> Value {
    if schema.get("default") == Some(&Value::Null) {
        schema.as_object_mut().map(|s| s.remove("default"));
    }
    if let Some(types) = schema["type"].as_array() {
        let kept: Vec<Value> = types.iter().filter(|t| *t != "null").cloned().collect();
        if kept.len() == 1 {
            schema["type"] = kept[0].clone();
        } else {
            schema["type"] = Value::Array(kept);
        }
    }
    if let Some(any_of) = schema.get("anyOf").and_then(Value::as_array).cloned() {
        let kept: Vec<Value> = any_of.into_iter().filter(|s| s["type"] != "null").collect();
        if let [only] = kept.as_slice() {
            return only.clone();
        }
        schema["anyOf"] = Value::Array(kept);
    }
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_is_in_the_document_with_its_status_and_security() {
        struct Expect(Value);
        impl Visit for Expect {
            fn visit<O: Operation>(&mut self, name: &'static str, _: &[&'static str]) {
                let operation = &self.0["paths"][O::PATH][O::METHOD.as_str().to_lowercase()];
                assert_eq!(operation["operationId"], name);
                assert!(
                    operation["responses"][O::STATUS.to_string()].is_object(),
                    "{name}"
                );
                assert_eq!(
                    operation["security"].as_array().map(Vec::is_empty),
                    Some(O::ACCESS == Access::Public),
                    "{name}"
                );
            }
        }
        for_each_operation(&mut Expect(document()));
    }

    #[test]
    fn a_query_becomes_optional_parameters_without_null() {
        let doc = document();
        let params = doc["paths"]["/v1/devices/{id}/jobs"]["get"]["parameters"]
            .as_array()
            .unwrap()
            .clone();
        let limit = params.iter().find(|p| p["name"] == "limit").unwrap();
        assert_eq!(limit["in"], "query");
        assert_eq!(limit["required"], false);
        assert_eq!(limit["schema"]["type"], "integer");
        let id = params.iter().find(|p| p["name"] == "id").unwrap();
        assert_eq!(id["schema"]["$ref"], "#/components/schemas/DeviceId");
    }

    #[test]
    fn every_reference_resolves() {
        fn walk(doc: &Value, v: &Value) {
            match v {
                Value::Object(map) => {
                    if let Some(Value::String(r)) = map.get("$ref") {
                        let pointer = r.trim_start_matches('#');
                        assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
                    }
                    map.values().for_each(|v| walk(doc, v));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(doc, v)),
                _ => {}
            }
        }
        let doc = document();
        walk(&doc, &doc);
    }
}
