//! Prometheus metrics, in the text exposition format (OpenMetrics 1.0), for `GET /metrics` on
//! the admin listener: scrapers need no admin token (`[admin] metrics_token` asks for one of
//! their own).
//!
//! Two kinds of numbers: what the bridge counts anyway (its counters, the notifier's, the
//! broker's, the state's sizes) is read at scrape time into a [`Snapshot`]; job transitions
//! and submission→completion times are counted from the ops events as they are released once
//! durable ([`Telemetry::applied`]), so a metric never counts what did not reach the disk (and
//! an event dropped from a full ops queue, counted in `bridge_ops_events_dropped`, is not
//! counted here either).

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use schemas::job::JobState;

use crate::bridge::Bridge;

pub mod counted;

pub use counted::Telemetry;

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The scrape: every metric, as text.
pub fn render(bridge: &Bridge) -> String {
    let mut registry = Registry::with_prefix("bridge");
    let telemetry = bridge.telemetry();
    registry.register(
        "job_transitions",
        "Job transitions, by the state entered",
        telemetry.transitions.clone(),
    );
    registry.register_with_unit(
        "job_completion",
        "From submission to a terminal state, by that state",
        Unit::Seconds,
        telemetry.completion.clone(),
    );
    registry.register_with_unit(
        "store_flush",
        "How long each flush of the store took (fdatasync with fsync on)",
        Unit::Seconds,
        bridge.committer().flush_seconds().clone(),
    );
    registry.register_collector(Box::new(Snapshot::take(bridge)));
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

/// A number read at scrape time.
#[derive(Debug)]
struct Sample {
    name: &'static str,
    help: &'static str,
    counter: bool,
    values: Vec<(Option<(&'static str, &'static str)>, u64)>,
}

/// Everything read at scrape time.
#[derive(Debug, Default)]
struct Snapshot(Vec<Sample>);

impl Snapshot {
    fn counter(&mut self, name: &'static str, help: &'static str, value: u64) {
        self.one(true, name, help, value);
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, value: u64) {
        self.one(false, name, help, value);
    }

    fn one(&mut self, counter: bool, name: &'static str, help: &'static str, value: u64) {
        self.0.push(Sample {
            name,
            help,
            counter,
            values: vec![(None, value)],
        });
    }

    fn take(bridge: &Bridge) -> Snapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut s = Snapshot::default();
        let m = bridge.metrics();
        let n = bridge.notifier().stats();
        s.counter(
            "jobs_submitted",
            "Jobs accepted by the admin API",
            get(&m.jobs_submitted),
        );
        s.counter(
            "data_requests",
            "Data-channel requests answered",
            get(&m.requests),
        );
        s.counter(
            "data_request_errors",
            "Data-channel requests answered with an error",
            get(&m.request_errors),
        );
        s.counter(
            "data_connections",
            "Data channels opened (after the hello)",
            get(&m.data_connections),
        );
        s.gauge(
            "data_connections_open",
            "Data channels open now",
            get(&m.data_connections_open),
        );
        s.counter(
            "hints_queued",
            "Hints queued for a device with none waiting (the others are coalesced)",
            get(&n.hints_queued),
        );
        s.counter(
            "hints_coalesced",
            "Hints merged into one already waiting for the same device",
            get(&n.hints_coalesced),
        );
        s.counter(
            "presence_hints",
            "Hints sent because a device came online with work waiting",
            get(&m.presence_hints),
        );
        s.counter(
            "hints_published",
            "Hints the broker took",
            get(&n.hints_published),
        );
        s.counter(
            "hints_failed",
            "Hints the broker did not take (the device still finds the work by its cursor)",
            get(&n.hints_failed),
        );
        s.counter(
            "mqtt_published",
            "Publishes to the broker (hints and ops events)",
            get(&n.published),
        );
        s.counter(
            "mqtt_publish_failed",
            "Publishes the broker did not take",
            get(&n.publish_failed),
        );
        s.counter(
            "ops_events_dropped",
            "Ops events dropped because their queue was full",
            get(&n.events_dropped) + bridge.core().ops_queue().dropped(),
        );
        s.counter(
            "presence_received",
            "Presence announcements read",
            get(&n.presence_received),
        );
        s.counter(
            "presence_dropped",
            "Presence announcements dropped (queue full or not a device)",
            get(&n.presence_dropped),
        );
        s.counter(
            "offline_published",
            "Devices announced offline after the grace period",
            get(&m.mqtt_offline_published),
        );
        s.counter(
            "offline_withdrawn",
            "Offline announcements withdrawn: the device came back within the grace",
            get(&m.mqtt_offline_withdrawn),
        );
        s.counter(
            "jobs_swept",
            "Finished jobs deleted at the end of their retention",
            get(&m.jobs_swept),
        );
        s.counter(
            "sweep_failures",
            "Retention sweeps that failed",
            get(&m.sweep_failures),
        );
        s.gauge(
            "admin_connections_open",
            "Admin API connections open now (a scrape is one)",
            m.admin_open.load(Ordering::Relaxed) as u64,
        );
        s.counter(
            "admin_connections_evicted",
            "Idle admin connections closed to make room",
            get(&m.admin_evicted),
        );
        let (hints, events) = bridge.notifier().depth();
        s.gauge(
            "hints_waiting",
            "Devices with a hint waiting to be published",
            hints as u64,
        );
        s.gauge(
            "ops_events_waiting",
            "Ops events waiting to be published",
            events as u64,
        );
        s.gauge(
            "store_failed",
            "1 once a store flush failed: nothing is acknowledged until a restart",
            u64::from(bridge.committer().failure().is_some()),
        );
        let census = bridge.core().census();
        s.gauge("devices", "Registered devices", census.devices);
        s.gauge(
            "devices_disabled",
            "Registered devices that are disabled",
            census.devices_disabled,
        );
        s.gauge(
            "feed_backlog_entries",
            "Feed entries not yet acknowledged, over all devices",
            census.feed_backlog,
        );
        s.gauge(
            "devices_behind",
            "Devices with feed entries not yet acknowledged",
            census.devices_behind,
        );
        s.0.push(Sample {
            name: "jobs",
            help: "Jobs not yet finished, by state",
            counter: false,
            values: [JobState::Queued, JobState::Delivered, JobState::InProgress]
                .into_iter()
                .map(|state| {
                    let n = census.jobs.get(&state).copied().unwrap_or(0);
                    (Some(("state", state.as_str())), n)
                })
                .collect(),
        });
        s.broker(bridge);
        s
    }

    fn broker(&mut self, bridge: &Bridge) {
        self.gauge(
            "broker_up",
            "1 while the MQTT broker serves (embedded: its router and watchdog; external: the link)",
            u64::from(bridge.broker_problem().is_none()),
        );
        let Some(b) = bridge.embedded_broker() else {
            return;
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (topics, filters) = b.sizes();
        self.gauge(
            "broker_connections",
            "MQTT connections of the embedded broker (devices, ops logins, the bridge's own link)",
            b.connections() as u64,
        );
        self.gauge(
            "broker_topics",
            "Topics the embedded broker holds",
            topics as u64,
        );
        self.gauge(
            "broker_filters",
            "Filters the embedded broker holds",
            filters as u64,
        );
        let r = b.stats();
        self.counter(
            "broker_connects_refused",
            "MQTT CONNECTs refused",
            get(&r.connects_refused),
        );
        self.counter(
            "broker_subscribes_refused",
            "Subscriptions refused (a filter not the login's own)",
            get(&r.subscribes_refused),
        );
        self.counter(
            "broker_publishes_refused",
            "Publishes refused (a topic not the login's own; the connection closes)",
            get(&r.publishes_refused),
        );
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for sample in &self.0 {
            let kind = if sample.counter {
                MetricType::Counter
            } else {
                MetricType::Gauge
            };
            let mut metric = encoder.encode_descriptor(sample.name, sample.help, None, kind)?;
            for (label, value) in &sample.values {
                let labels: &[(&str, &str)] = match label {
                    Some(l) => std::slice::from_ref(l),
                    None => &[],
                };
                let family = metric.encode_family(&labels)?;
                if sample.counter {
                    ConstCounter::new(*value).encode(family)?;
                } else {
                    ConstGauge::new(i64::try_from(*value).unwrap_or(i64::MAX)).encode(family)?;
                }
            }
        }
        Ok(())
    }
}
