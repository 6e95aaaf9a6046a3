//! TLS on every listener: the pipeline runs with the admin API on https, the data channel on
//! wss and the embedded broker on mqtts, the agent verifying a private CA; operations follow
//! events with `mosquitto_sub --cafile`; plain text reaches nothing; Mosquitto over TLS serves
//! as the external broker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use device_sim::AgentEvent;
use device_sim::session::{DataSession, SessionSettings};
use e2e_tests::{
    BridgeProcess, Device, InProcessBridge, Mosquitto, OpsWatcher, SOON, init_tracing,
    wait_for_event, wait_reported,
};
use schemas::api::SubmitJob;
use schemas::job::JobState;
use schemas::ops::OpsEvent;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

fn job(text: &str) -> SubmitJob {
    SubmitJob {
        payload: Some(text.into()),
        content_type: Some("text/plain".into()),
        ..Default::default()
    }
}

fn mosquitto_sub() -> &'static str {
    ["/usr/bin/mosquitto_sub", "/usr/local/bin/mosquitto_sub"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("mosquitto_sub is not installed: apt-get install -y mosquitto-clients")
}

/// `mosquitto_sub` with its login in an options file (so the password is not on the command
/// line, as the README does it), following ops events over TLS until it has printed `count`.
fn ops_subscriber(
    dir: &Path,
    port: u16,
    ca: &Path,
    (user, password): (&str, &str),
    count: usize,
) -> tokio::process::Child {
    let config_home = dir.join("xdg");
    std::fs::create_dir_all(&config_home).unwrap();
    std::fs::write(
        config_home.join("mosquitto_sub"),
        format!("-u {user}\n-P {password}\n"),
    )
    .unwrap();
    // stdbuf: mosquitto_sub's output is line-buffered only on a terminal.
    tokio::process::Command::new("stdbuf")
        .arg("-oL")
        .arg(mosquitto_sub())
        .env("XDG_CONFIG_HOME", &config_home)
        .args(["-h", "localhost", "-p", &port.to_string(), "--cafile"])
        .arg(ca)
        .args([
            "-i",
            "ops-tls",
            "-t",
            "fleet/events/jobs/#",
            "-v",
            "-d",
            "-C",
            &count.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_with_tls_on_every_listener() {
    let bridge = InProcessBridge::start_tls(|_| {}).await;
    let ep = &bridge.endpoints;
    assert!(ep.admin.starts_with("https://") && ep.data_url.starts_with("wss://") && ep.mqtt_tls);
    let ca = ep.ca.clone().unwrap();
    let mut ops = OpsWatcher::start(ep).await;

    // Operations follow with mosquitto_sub over TLS, with an ops login of their own.
    let login = ep.client().create_ops_login("mosquitto_sub").await.unwrap();
    let mut sub = ops_subscriber(
        bridge.dir.path(),
        ep.mqtt.1,
        &ca,
        (login.ops_id.as_str(), login.password.expose()),
        2,
    );
    let mut lines = tokio::io::BufReader::new(sub.stdout.take().unwrap()).lines();
    tokio::time::timeout(SOON, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("SUBACK") {
                return;
            }
        }
        panic!("mosquitto_sub ended before it subscribed");
    })
    .await
    .expect("mosquitto_sub did not subscribe");

    // A device registers over wss, takes hints over mqtts, and completes a job.
    let Device {
        agent,
        mut events,
        id,
        ..
    } = ep
        .online_device("SN-TLS", Device::simulated(), |_| {})
        .await;
    let (submitted, _) = ep.client().submit_job(&id, &job("over TLS")).await.unwrap();
    wait_reported(&mut events, &submitted.job_id).await;
    assert_eq!(
        ep.client().job(&submitted.job_id).await.unwrap().state,
        JobState::Succeeded
    );
    ops.wait_for(SOON, |e| match e {
        OpsEvent::JobTransition {
            job_id,
            to: JobState::Succeeded,
            ..
        } if job_id == &submitted.job_id => Some(()),
        _ => None,
    })
    .await;
    let mut printed = Vec::new();
    tokio::time::timeout(SOON, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with("fleet/events/jobs/") {
                printed.push(line);
            }
        }
    })
    .await
    .expect("mosquitto_sub did not print the events and exit");
    assert!(
        printed[0].contains(submitted.job_id.as_str()),
        "{printed:?}"
    );
    assert!(sub.wait().await.unwrap().success());
    agent.stop().await.unwrap();

    // Plain text reaches none of the three listeners.
    let admin: std::net::SocketAddr = ep.admin.trim_start_matches("https://").parse().unwrap();
    let mut plain = tokio::net::TcpStream::connect(admin).await.unwrap();
    plain
        .write_all(b"GET /v1/health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(SOON, plain.read_to_end(&mut answer))
        .await
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&answer).contains("200 OK"),
        "plain HTTP was served"
    );
    let plain_ws = ep.data_url.replace("wss://", "ws://");
    let hello = schemas::data::HelloAuth::Device {
        device_id: id.clone(),
        secret: schemas::Secret::new("x"),
    };
    assert!(
        DataSession::connect(&plain_ws, hello, "test", SessionSettings::default())
            .await
            .is_err()
    );
    assert!(
        e2e_tests::mqtt_connect(
            &e2e_tests::Endpoints {
                mqtt_tls: false,
                ca: None,
                ..ep.clone()
            },
            "ops-plain",
            login.ops_id.as_str(),
            login.password.expose()
        )
        .await
        .is_err()
    );

    // A CA the server was not signed by is refused (by the agent's session and mosquitto_sub).
    let other = tempfile::tempdir().unwrap();
    let other = tls::create_private_ca(&other.path().join("tls"), &[], false).unwrap();
    let settings = SessionSettings {
        tls: Some(tls::client_config(Some(&other.ca_cert)).unwrap()),
        ..SessionSettings::default()
    };
    let hello = schemas::data::HelloAuth::Device {
        device_id: id.clone(),
        secret: schemas::Secret::new("x"),
    };
    let refused = DataSession::connect(&ep.data_url, hello, "test", settings).await;
    assert!(matches!(
        refused,
        Err(device_sim::session::SessionError::Connect { .. })
    ));
    let mut wrong = ops_subscriber(
        other.ca_cert.parent().unwrap(),
        ep.mqtt.1,
        &other.ca_cert,
        (login.ops_id.as_str(), login.password.expose()),
        1,
    );
    let status = tokio::time::timeout(Duration::from_secs(10), wrong.wait())
        .await
        .expect("mosquitto_sub with the wrong CA kept trying")
        .unwrap();
    assert!(!status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_over_tls_serves_as_the_external_broker() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("tls");
    let files = tls::create_private_ca(&tls_dir, &[], false).unwrap();
    let mut mosquitto =
        Mosquitto::start_tls(dir.path(), &[Mosquitto::BRIDGE_LOGIN], &tls_dir).await;
    let url = format!("mqtts://localhost:{}", mosquitto.port);
    let bridge = BridgeProcess::start_external(
        &dir.path().join("bridge"),
        &url,
        &["--mqtt-ca-file", files.ca_cert.to_str().unwrap()],
    )
    .await;
    let mut ep = bridge.endpoints.clone();
    assert!(ep.mqtt_tls);
    ep.ca = Some(files.ca_cert.clone());

    let (agent, config, _store, creds) =
        mosquitto.provisioned_device(&ep, "SN-MQTTS", |_| {}).await;
    assert_eq!(
        config.endpoints.mqtt,
        [format!("mqtts://localhost:{}", mosquitto.port)]
    );
    let mut events = agent.subscribe();

    let (submitted, _) = ep
        .client()
        .submit_job(&creds.device_id, &job("via mosquitto over TLS"))
        .await
        .unwrap();
    // The hint came through Mosquitto over TLS: a hint before the job was reported.
    let mut hinted = false;
    wait_for_event(&mut events, SOON, |e| match e {
        AgentEvent::HintReceived { .. } => {
            hinted = true;
            None
        }
        AgentEvent::JobReported { job_id } if job_id == &submitted.job_id => Some(()),
        _ => None,
    })
    .await;
    assert!(hinted, "the job came without a hint");
    agent.stop().await.unwrap();
}
