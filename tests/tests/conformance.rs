#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A device outside Rust (`tests/conformance/device.py`: Python with msgpack, websockets and
//! paho-mqtt, written from PROTOCOL.md alone) against the real bridge: it registers, runs a job
//! announced by a hint, runs one found by long-polling with its MQTT link down, reports consent
//! and status, and meets the documented error cases. This test does the cloud's side between
//! its steps and checks what the bridge recorded.

use std::process::Stdio;
use std::time::Duration;

use e2e_tests::InProcessBridge;
use schemas::api::SubmitJob;
use schemas::job::JobState;
use schemas::status::DeviceState;
use schemas::{DeviceId, JobId};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

const DEVICE_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/conformance/device.py");
/// Each step's answer; the long-poll step waits for a job this test submits meanwhile.
const STEP: Duration = Duration::from_secs(45);

struct PyDevice {
    _child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl PyDevice {
    fn start(data_url: &str, mqtt: &(String, u16)) -> PyDevice {
        let mut child = tokio::process::Command::new("python3")
            .arg(DEVICE_PY)
            .args([
                "--data-url",
                data_url,
                "--mqtt",
                &format!("{}:{}", mqtt.0, mqtt.1),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs (scripts/test.sh installs tests/conformance/requirements.txt)");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        PyDevice {
            _child: child,
            stdin,
            stdout,
        }
    }

    async fn send(&mut self, command: &str) {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// The device's next line; a `fail` line fails the test with the device's reason.
    async fn line(&mut self) -> String {
        let line = tokio::time::timeout(STEP, self.stdout.next_line())
            .await
            .expect("the Python device did not answer in time")
            .unwrap()
            .expect("the Python device ended (are msgpack, websockets and paho-mqtt installed?)");
        assert!(!line.starts_with("fail"), "the Python device says: {line}");
        line
    }

    async fn step(&mut self, command: &str) -> String {
        self.send(command).await;
        self.line().await
    }
}

async fn submit(bridge: &InProcessBridge, device: &DeviceId, payload: &str) -> JobId {
    let (job, _) = bridge
        .endpoints
        .client()
        .submit_job(
            device,
            &SubmitJob {
                payload: Some(payload.into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    job.job_id
}

async fn assert_succeeded(bridge: &InProcessBridge, job: &JobId) {
    let view = bridge.endpoints.client().job(job).await.unwrap();
    assert_eq!(view.state, JobState::Succeeded, "{view:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_device_written_from_protocol_md_works_end_to_end() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let mut py = PyDevice::start(&ep.data_url, &ep.mqtt);

    let token = ep.enrollment_token(1).await;
    let registered = py.step(&format!("register {}", token.expose())).await;
    let device = DeviceId::parse(registered.strip_prefix("registered ").unwrap()).unwrap();
    let view = ep.client().device(&device).await.unwrap();
    assert!(view.registration_completed_at.is_some(), "{view:?}");

    // The hint path.
    assert_eq!(py.step("mqtt").await, "mqtt_up");
    let job = submit(&bridge, &device, "by hint").await;
    assert_eq!(py.step("hint_job").await, format!("done {job} feed"));
    assert_succeeded(&bridge, &job).await;

    // The long-poll path, MQTT down.
    assert_eq!(py.step("mqtt_off").await, "mqtt_down");
    py.send("poll_job").await;
    assert_eq!(py.line().await, "polling");
    let job = submit(&bridge, &device, "by long-poll").await;
    assert_eq!(py.line().await, format!("done {job}"));
    assert_succeeded(&bridge, &job).await;

    // Consent and status, through the outbox and directly.
    assert_eq!(py.step("status").await, "status_ok");
    let view = ep.client().device(&device).await.unwrap();
    assert_eq!(view.requests_delivered.0, 2, "{view:?}");
    assert_eq!(view.consent.map(|c| c.granted), Some(true));
    assert_eq!(view.last_status.map(|s| s.state), Some(DeviceState::Busy));

    // The documented errors, and the device still works afterwards.
    assert_eq!(py.step("errors").await, "errors_ok");
    assert_eq!(py.step("mqtt").await, "mqtt_up");
    let job = submit(&bridge, &device, "after the errors").await;
    assert_eq!(py.step("hint_job").await, format!("done {job} feed"));
    assert_succeeded(&bridge, &job).await;
    py.send("quit").await;
}
