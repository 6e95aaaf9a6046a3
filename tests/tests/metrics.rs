#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `GET /metrics`: Prometheus text that the reference parser (the Python client's OpenMetrics
//! parser, `tests/conformance/parse_metrics.py`) reads, whose numbers move as jobs go through,
//! open without the admin token unless a metrics token is configured.

use std::collections::BTreeMap;
use std::time::Duration;

use e2e_tests::{Device, InProcessBridge, SOON, all_succeed, eventually, socket_addr};
use schemas::api::SubmitJob;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PARSER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/conformance/parse_metrics.py");

/// A GET of `/metrics` with an optional bearer token: (status, content type, body).
async fn get(admin: &str, token: Option<&str>) -> (u16, String, String) {
    let mut tcp = tokio::net::TcpStream::connect(socket_addr(admin))
        .await
        .unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request =
        format!("GET /metrics HTTP/1.1\r\nHost: bridge\r\n{auth}Connection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_owned();
    (status, content_type, body.to_owned())
}

/// The scrape as the reference parser reads it (the test fails if it refuses it).
async fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut child = tokio::process::Command::new("python3")
        .arg(PARSER)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "the parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn scrape(bridge: &InProcessBridge) -> BTreeMap<String, f64> {
    let (status, content_type, body) = get(&bridge.endpoints.admin, None).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    parse(&body).await
}

fn value(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key} in {samples:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrape_parses_and_moves_as_jobs_go_through() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let device = ep
        .online_device("SN-METRICS", Device::simulated(), |_| {})
        .await;
    let before = scrape(&bridge).await;
    assert_eq!(value(&before, "bridge_broker_up{}"), 1.0);
    assert_eq!(value(&before, "bridge_devices{}"), 1.0);
    assert!(
        value(&before, "bridge_admin_connections_open{}") >= 1.0,
        "the scrape's own"
    );
    assert!(
        value(&before, "bridge_broker_connections{}") >= 2.0,
        "the device and the bridge's link"
    );

    let mut jobs = Vec::new();
    for i in 0..3 {
        let (job, _) = ep
            .client()
            .submit_job(
                &device.id,
                &SubmitJob {
                    payload: Some(format!("job {i}")),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        jobs.push(job.job_id);
    }
    all_succeed(&ep.client(), &jobs, Duration::from_secs(20)).await;
    // The transitions are counted as their ops events are released, just after the commit.
    eventually(SOON, "three succeeded transitions counted", || async {
        let now = scrape(&bridge).await;
        value(&now, "bridge_job_transitions_total{state=succeeded}") >= 3.0
    })
    .await;
    let after = scrape(&bridge).await;
    let moved = |key: &str| value(&after, key) - before.get(key).copied().unwrap_or(0.0);
    assert_eq!(moved("bridge_jobs_submitted_total{}"), 3.0);
    assert_eq!(moved("bridge_job_transitions_total{state=succeeded}"), 3.0);
    assert_eq!(moved("bridge_job_transitions_total{state=queued}"), 3.0);
    assert_eq!(
        moved("bridge_job_completion_seconds_count{state=succeeded}"),
        3.0
    );
    assert!(moved("bridge_job_completion_seconds_sum{state=succeeded}") > 0.0);
    assert!(moved("bridge_store_flush_seconds_count{}") >= 3.0);
    assert!(
        moved("bridge_data_requests_total{}") >= 6.0,
        "a fetch and an outcome per job"
    );
    // A hint for a device that already has one waiting is merged into it (coalesced).
    assert!(moved("bridge_hints_queued_total{}") >= 1.0);
    assert!(moved("bridge_hints_published_total{}") >= 1.0);
    assert_eq!(moved("bridge_hints_failed_total{}"), 0.0);
    assert!(
        moved("bridge_hints_queued_total{}") + moved("bridge_hints_coalesced_total{}") >= 3.0,
        "a hint per job, queued or merged"
    );
    assert_eq!(value(&after, "bridge_jobs{state=queued}"), 0.0);
    assert_eq!(value(&after, "bridge_store_failed{}"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_token_closes_the_scrape_to_others() {
    let bridge = InProcessBridge::start_with(|c| {
        c.admin.metrics_token = cloud_bridge::config::RedactedString("scrape-me".into());
    })
    .await;
    let admin = &bridge.endpoints.admin;
    assert_eq!(get(admin, None).await.0, 401);
    assert_eq!(get(admin, Some("wrong")).await.0, 401);
    assert_eq!(
        get(admin, Some(bridge.endpoints.admin_token.expose()))
            .await
            .0,
        401,
        "the admin token is not the metrics token"
    );
    let (status, _, body) = get(admin, Some("scrape-me")).await;
    assert_eq!(status, 200);
    assert!(value(&parse(&body).await, "bridge_broker_up{}") == 1.0);
}
