//! `GET /v1/health`, `GET /v1/openapi.json`, `GET /v1/metrics` and `GET /v1/fleet`.

use std::sync::atomic::Ordering;

use axum::http::StatusCode;
use schemas::admin::{GetFleet, GetHealth, GetMetrics, GetOpenApi};
use schemas::api::{DeviceCondition, FleetGroup, FleetView, Health};
use schemas::data::ErrorCode;
use serde::Serialize;

use super::serve::{Call, Reply};
use super::{ApiFailure, ApiResult, AppState};

/// 200 while every part serves; 503 naming what does not (a load balancer or a supervisor
/// acts on the code, the on-call engineer reads `problems`).
pub(super) async fn health(state: &AppState, _: Call<GetHealth>) -> ApiResult<Reply<Health>> {
    {
        let bridge = &state.bridge;
        let (devices, jobs) = bridge.core().counts();
        let mut problems: Vec<String> = bridge.broker_problem().into_iter().collect();
        if let Some(failure) = bridge.committer().failure() {
            problems.push(format!(
                "store: a flush failed, nothing is acknowledged until a restart: {failure}"
            ));
        }
        let (status, word) = if problems.is_empty() {
            (StatusCode::OK, "ok")
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        };
        let health = Health {
            status: word.into(),
            broker: bridge.broker_mode().to_owned(),
            devices: devices as u64,
            jobs: jobs as u64,
            problems,
        };
        Ok(Reply {
            answer: health,
            status: Some(status),
        })
    }
}

/// The OpenAPI document, built once from the declarations.
pub(super) async fn openapi(_: &AppState, _: Call<GetOpenApi>) -> ApiResult<serde_json::Value> {
    static DOCUMENT: std::sync::LazyLock<serde_json::Value> =
        std::sync::LazyLock::new(schemas::openapi::document);
    Ok(DOCUMENT.clone())
}

pub(super) async fn metrics(state: &AppState, _: Call<GetMetrics>) -> ApiResult<serde_json::Value> {
    serde_json::to_value(metrics_view(state))
        .map_err(|e| ApiFailure::new(ErrorCode::Internal, e.to_string()))
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
    /// MQTT offlines published, and withdrawn because the device came back within the grace.
    mqtt_offline_published: u64,
    mqtt_offline_withdrawn: u64,
    /// Finished jobs deleted at the end of their retention, and sweeps that failed.
    jobs_swept: u64,
    sweep_failures: u64,
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

fn metrics_view(state: &AppState) -> MetricsView {
    let m = state.bridge.metrics();
    let n = state.bridge.notifier().stats();
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    MetricsView {
        jobs_submitted: get(&m.jobs_submitted),
        data_requests: get(&m.requests),
        data_request_errors: get(&m.request_errors),
        data_connections_total: get(&m.data_connections),
        data_connections_open: get(&m.data_connections_open),
        presence_hints: get(&m.presence_hints),
        hints_queued: get(&n.hints_queued),
        hints_coalesced: get(&n.hints_coalesced),
        events_queued: get(&n.events_queued),
        events_dropped: get(&n.events_dropped) + state.bridge.core().ops_queue().dropped(),
        mqtt_published: get(&n.published),
        mqtt_publish_failed: get(&n.publish_failed),
        presence_received: get(&n.presence_received),
        presence_dropped: get(&n.presence_dropped),
        store_flushes: state.bridge.committer().flush_count(),
        mqtt_offline_published: get(&m.mqtt_offline_published),
        mqtt_offline_withdrawn: get(&m.mqtt_offline_withdrawn),
        jobs_swept: get(&m.jobs_swept),
        sweep_failures: get(&m.sweep_failures),
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
    }
}

/// `GET /v1/fleet`.
pub(super) async fn fleet(state: &AppState, _: Call<GetFleet>) -> ApiResult<FleetView> {
    let census = state.bridge.core().fleet_census();
    let count = |c| census.conditions.get(&c).copied().unwrap_or(0);
    let online = state.bridge.watch().online();
    let mut groups: Vec<FleetGroup> = census
        .groups
        .iter()
        .flat_map(|(customer, models)| {
            models.iter().map(|(model, n)| FleetGroup {
                customer: customer.clone(),
                model: model.clone(),
                devices: *n,
            })
        })
        .collect();
    groups.sort_by(|a, b| {
        (b.devices, &a.customer, &a.model).cmp(&(a.devices, &b.customer, &b.model))
    });
    Ok(FleetView {
        devices: census.devices,
        active: count(DeviceCondition::Active),
        registering: count(DeviceCondition::Registering),
        disabled: count(DeviceCondition::Disabled),
        invalidated: count(DeviceCondition::Invalidated),
        online_mqtt: online.mqtt,
        online_data: online.data,
        online: online.any,
        open_jobs: census
            .jobs
            .iter()
            .map(|(state, n)| (state.as_str().to_owned(), *n))
            .collect(),
        groups,
        minutes: state.bridge.watch().minutes(state.bridge.now()),
    })
}
