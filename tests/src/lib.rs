//! The end-to-end test harness.
//!
//! - [`BridgeProcess`]: the real `cloud-bridge serve` as a child process, on ports it picks;
//!   killed on drop; `kill9` for crash tests.
//! - [`InProcessBridge`]: the same bridge started in the test process (faster, for tests that
//!   do not kill it).
//! - [`TcpProxy`]: the simulator's cuttable proxy, between a device and a server.
//! - [`OpsWatcher`]: an MQTT client on `fleet/events/#`, as operations would run.
//! - [`wait_for_event`] and [`eventually`]: wait on events and conditions with a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use admin_client::AdminClient;
use device_sim::{
    AgentConfig, AgentEvent, AgentHandle, DeviceInfo, JobExecutor, MemoryStateStore,
    SimulatedExecutor,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use schemas::api::CreateEnrollmentToken;
use schemas::ops::OpsEvent;
use schemas::{DeviceId, JobId, Secret};
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// Generous bound for anything that should happen "soon" on a loaded 2-core machine.
pub const SOON: Duration = Duration::from_secs(30);

/// Logs to the test output, once per process; `RUST_LOG` picks the level.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,rumqttd=error,rumqttd::server::broker=off".into()),
        )
        .try_init();
}

/// Where a bridge can be reached.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub admin: String,
    pub data_url: String,
    pub mqtt: (String, u16),
    /// Devices reach MQTT over TLS (`mqtts://`).
    pub mqtt_tls: bool,
    pub admin_token: Secret,
    /// The CA the bridge's certificate is verified with, when its listeners speak TLS.
    pub ca: Option<PathBuf>,
}

impl Endpoints {
    pub fn client(&self) -> AdminClient {
        match self.tls_client() {
            Some(tls) => AdminClient::with_tls(self.admin.clone(), self.admin_token.clone(), tls),
            None => AdminClient::new(self.admin.clone(), self.admin_token.clone()),
        }
    }

    /// A client configuration trusting [`Self::ca`].
    pub fn tls_client(&self) -> Option<Arc<tls::rustls::ClientConfig>> {
        self.ca
            .as_ref()
            .map(|ca| tls::client_config(Some(ca)).expect("the test CA loads"))
    }

    /// The broker as a device's endpoint list spells it.
    pub fn mqtt_endpoint(&self) -> String {
        let (host, port) = &self.mqtt;
        let scheme = if self.mqtt_tls { "mqtts" } else { "mqtt" };
        format!("{scheme}://{host}:{port}")
    }

    /// MQTT options for a test client of the bridge's broker (TLS when it speaks TLS).
    pub fn mqtt_options(&self, client_id: &str, user: &str, pass: &str) -> MqttOptions {
        let mut opts = MqttOptions::new(client_id, self.mqtt.0.clone(), self.mqtt.1);
        opts.set_credentials(user, pass);
        if self.mqtt_tls {
            let tls = self.tls_client().expect("a TLS broker needs Endpoints::ca");
            opts.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls),
            ));
        }
        opts
    }

    /// An agent config for a simulated device that registers with `token`.
    pub fn agent_config(&self, token: &Secret, serial: &str) -> AgentConfig {
        let mut config = AgentConfig::new(
            self.data_url.clone(),
            Some(self.mqtt.clone()),
            device_info(serial),
        );
        config.enrollment_token = Some(token.clone());
        if self.mqtt_tls {
            config.endpoints.mqtt = vec![self.mqtt_endpoint()];
        }
        config.ca_file = self.ca.clone();
        // Tests of device information opt out explicitly.
        config.consent_at_setup = true;
        config.backoff_min = Duration::from_millis(50);
        config.mqtt_reconnect_spread = Duration::from_millis(200);
        config.slow_poll = Duration::from_secs(2);
        config.long_poll = Duration::from_secs(2);
        config
    }

    /// Registers a simulated device and waits until its MQTT link is up. `adjust` may change
    /// its config first (`mqtt_grace`, `long_poll`, ...).
    pub async fn online_device(
        &self,
        serial: &str,
        executor: Arc<dyn JobExecutor>,
        adjust: impl FnOnce(&mut AgentConfig),
    ) -> Device {
        let token = self.enrollment_token(1).await;
        let mut config = self.agent_config(&token, serial);
        adjust(&mut config);
        let store = MemoryStateStore::default();
        let agent = device_sim::start(config.clone(), executor, store.clone());
        let mut events = agent.subscribe();
        wait_for_event(&mut events, SOON, |e| {
            matches!(e, AgentEvent::MqttUp { .. }).then_some(())
        })
        .await;
        let id = agent.device_id().expect("registered");
        Device {
            agent,
            events,
            id,
            store,
            config,
        }
    }

    /// A fresh enrollment token for `uses` devices.
    pub async fn enrollment_token(&self, uses: u32) -> Secret {
        self.client()
            .create_enrollment(&CreateEnrollmentToken {
                customer: "acme".into(),
                max_uses: Some(uses),
                ttl_secs: None,
            })
            .await
            .unwrap()
            .token
    }
}

/// An executor that counts how many times each job is run (and succeeds them all).
#[derive(Debug, Clone, Default)]
pub struct Counting {
    pub runs: Arc<std::sync::Mutex<std::collections::HashMap<JobId, u32>>>,
}

impl JobExecutor for Counting {
    fn run(&self, job: schemas::data::JobOffer) -> device_sim::executor::ExecFuture {
        *self.runs.lock().unwrap().entry(job.job_id).or_default() += 1;
        Box::pin(async { device_sim::executor::JobOutcome::Succeeded { detail: None } })
    }
}

/// Waits until every job of `jobs` has succeeded.
pub async fn all_succeed(client: &AdminClient, jobs: &[JobId], within: Duration) {
    eventually(within, "every job succeeded", || {
        let (client, jobs) = (client.clone(), jobs.to_vec());
        async move {
            for id in &jobs {
                let done = client
                    .job(id)
                    .await
                    .is_ok_and(|j| j.state == schemas::job::JobState::Succeeded);
                if !done {
                    return false;
                }
            }
            true
        }
    })
    .await;
}

/// A running simulated device, as [`Endpoints::online_device`] made it.
#[derive(Debug)]
pub struct Device {
    pub agent: AgentHandle,
    pub events: broadcast::Receiver<AgentEvent>,
    pub id: DeviceId,
    /// Its state; a new agent started on a clone continues where this one stopped.
    pub store: MemoryStateStore,
    pub config: AgentConfig,
}

impl Device {
    /// The simulated executor: succeeds after a short time.
    pub fn simulated() -> Arc<dyn JobExecutor> {
        Arc::new(SimulatedExecutor::default())
    }

    pub fn credentials(&self) -> schemas::agent::Credentials {
        self.store
            .snapshot()
            .and_then(|s| s.credentials)
            .expect("registered")
    }
}

/// Waits until the agent has reported the outcome of `job`.
pub async fn wait_reported(events: &mut broadcast::Receiver<AgentEvent>, job: &JobId) {
    wait_for_event(events, SOON, |e| match e {
        AgentEvent::JobReported { job_id } if job_id == job => Some(()),
        _ => None,
    })
    .await
}

pub fn device_info(serial: &str) -> DeviceInfo {
    DeviceInfo {
        serial: serial.into(),
        model: "MFP-4000".into(),
        destination: "EU".into(),
        time_zone: "Europe/Berlin".into(),
    }
}

/// Connects to the bridge's broker with these credentials: `Ok` on a CONNACK, the error
/// otherwise (a refused login shows up as an error).
pub async fn mqtt_connect(
    ep: &Endpoints,
    client_id: &str,
    user: &str,
    pass: &str,
) -> Result<(), String> {
    let opts = ep.mqtt_options(client_id, user, pass);
    let (_client, mut eventloop) = AsyncClient::new(opts, 10);
    tokio::time::timeout(SOON, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .expect("no answer from the broker")
}

/// Where [`InProcessBridge::start_tls`] (and `cloud-bridge tls init`) put the CA certificate.
pub fn tls_ca(data_dir: &Path) -> PathBuf {
    data_dir.join("tls").join("ca.pem")
}

/// The socket address of a `ws://host:port` or `http://host:port` URL with a numeric host.
pub fn socket_addr(url: &str) -> std::net::SocketAddr {
    url.trim_start_matches("ws://")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("ws://ip:port or http://ip:port")
}

fn split_host_port(s: &str) -> (String, u16) {
    let (h, p) = s.rsplit_once(':').expect("host:port");
    (h.to_owned(), p.parse().expect("port"))
}

/// A free port on loopback. The caller binds it right away; a race with another process shows
/// up as a clear bind error.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `e2e-cloud-bridge` binary Cargo built for this package's integration tests: it sits in
/// the target directory, one level above the test executable in `deps/`.
pub fn bridge_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let bin = dir.join(format!("e2e-cloud-bridge{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: run the tests with cargo test",
        bin.display()
    );
    bin
}

/// `cloud-bridge export` of a stopped bridge's data: one JSON value a line (see
/// `cloud-bridge/src/export.rs`). Panics with its standard error if it fails.
pub fn export(data_dir: &Path) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(bridge_binary())
        .args(["export", "--data-dir", data_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `cloud-bridge serve` as a child process.
#[derive(Debug)]
pub struct BridgeProcess {
    child: Child,
    pub endpoints: Endpoints,
    pub data_dir: PathBuf,
    args: Vec<String>,
    /// Where its log goes, if not to the test's standard error (then with the binary's own
    /// default filter).
    log: Option<PathBuf>,
}

impl BridgeProcess {
    /// Starts a bridge with its data in `data_dir`, on fresh ports, plus `extra` flags.
    pub async fn start(data_dir: &Path, extra: &[&str]) -> BridgeProcess {
        Self::start_logged(data_dir, extra, None).await
    }

    /// A bridge with `url` as its external broker (`mqtt://` or `mqtts://`), logged in there as
    /// [`Mosquitto::BRIDGE_LOGIN`], plus `extra` flags.
    pub async fn start_external(data_dir: &Path, url: &str, extra: &[&str]) -> BridgeProcess {
        let (user, pass) = Mosquitto::BRIDGE_LOGIN;
        let mut args = vec![
            "--broker",
            "external",
            "--mqtt-url",
            url,
            "--mqtt-username",
            user,
            "--mqtt-password",
            pass,
        ];
        args.extend_from_slice(extra);
        Self::start(data_dir, &args).await
    }

    /// Like [`Self::start`], with its log (the binary's default filter) written to `log`.
    pub async fn start_logged(
        data_dir: &Path,
        extra: &[&str],
        log: Option<&Path>,
    ) -> BridgeProcess {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--admin-listen".into(),
            format!("127.0.0.1:{}", free_port()),
            "--data-listen".into(),
            format!("127.0.0.1:{}", free_port()),
        ];
        if !extra.contains(&"--broker") {
            args.push("--mqtt-listen".into());
            args.push(format!("127.0.0.1:{}", free_port()));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(data_dir, args, log.map(Path::to_owned)).await
    }

    async fn spawn(data_dir: &Path, args: Vec<String>, log: Option<PathBuf>) -> BridgeProcess {
        let (filter, stderr) = match &log {
            // The binary's own default filter, as an operator would run it.
            Some(path) => (
                String::new(),
                std::process::Stdio::from(std::fs::File::create(path).unwrap()),
            ),
            None => (
                std::env::var("BRIDGE_LOG")
                    .unwrap_or_else(|_| "warn,rumqttd=error,rumqttd::server::broker=off".into()),
                std::process::Stdio::inherit(),
            ),
        };
        let mut command = Command::new(bridge_binary());
        if filter.is_empty() {
            command.env_remove("RUST_LOG");
        } else {
            command.env("RUST_LOG", filter);
        }
        let mut child = command
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("cannot start the cloud-bridge binary");
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(SOON, lines.next_line())
            .await
            .expect("cloud-bridge did not report ready in time")
            .unwrap()
            .expect("cloud-bridge exited before it was ready");
        let ready: serde_json::Value = serde_json::from_str(&line).expect("ready line is JSON");
        let token = std::fs::read_to_string(data_dir.join("admin-token")).unwrap();
        let endpoints = Endpoints {
            admin: ready["admin"].as_str().unwrap().to_owned(),
            data_url: ready["data"].as_str().unwrap().to_owned(),
            mqtt: split_host_port(ready["mqtt"].as_str().unwrap()),
            mqtt_tls: ready["mqtt_tls"].as_bool().unwrap_or(false),
            admin_token: Secret::new(token.trim()),
            ca: None,
        };
        // Keep reading stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        BridgeProcess {
            child,
            endpoints,
            data_dir: data_dir.to_owned(),
            args,
            log,
        }
    }

    /// Starts the same bridge again (same data, same ports), e.g. after [`Self::kill9`].
    pub async fn restart(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let again = Self::spawn(&self.data_dir, self.args.clone(), self.log.clone()).await;
        *self = again;
    }

    /// SIGKILL: no shutdown, no last flush.
    pub async fn kill9(&mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Sends a signal with the system's `kill` command.
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .expect("cloud-bridge did not exit in time")
            .unwrap()
    }
}

/// The bridge running inside the test process.
#[derive(Debug)]
pub struct InProcessBridge {
    pub endpoints: Endpoints,
    pub running: Option<cloud_bridge::Running>,
    pub dir: tempfile::TempDir,
    /// The bridge's clock: a test moves it forward instead of waiting for time to pass.
    pub clock: Arc<cloud_bridge::clock::SteppedClock>,
}

impl InProcessBridge {
    pub async fn start() -> InProcessBridge {
        Self::start_with(|_| {}).await
    }

    /// With TLS on every listener, from a private CA made for this bridge
    /// ([`Endpoints::ca`] holds its certificate).
    pub async fn start_tls(adjust: impl FnOnce(&mut cloud_bridge::Config)) -> InProcessBridge {
        Self::start_with(|c| {
            let files = tls::create_private_ca(&c.data_dir.join("tls"), &[], false).unwrap();
            c.tls.cert = files.server_cert;
            c.tls.key = files.server_key;
            adjust(c)
        })
        .await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut cloud_bridge::Config)) -> InProcessBridge {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let mut config = cloud_bridge::Config {
            data_dir: dir.path().to_owned(),
            ..Default::default()
        };
        config.listen.admin = "127.0.0.1:0".parse().unwrap();
        config.listen.data = "127.0.0.1:0".parse().unwrap();
        config.broker.listen = "127.0.0.1:0".parse().unwrap();
        adjust(&mut config);
        let listeners = cloud_bridge::Listeners::bind(&config).await.unwrap();
        let clock = Arc::new(cloud_bridge::clock::SteppedClock::default());
        let running = cloud_bridge::start_with_clock(
            config,
            listeners,
            CancellationToken::new(),
            clock.clone(),
        )
        .await
        .unwrap();
        let (http, ws) = if running.tls {
            ("https", "wss")
        } else {
            ("http", "ws")
        };
        let ca = running.tls.then(|| tls_ca(dir.path()));
        let endpoints = Endpoints {
            admin: format!("{http}://{}", running.admin_addr),
            data_url: format!("{ws}://{}", running.data_addr),
            mqtt: split_host_port(&running.mqtt_addr),
            mqtt_tls: running.mqtt_tls,
            admin_token: running.admin_token.clone(),
            ca,
        };
        InProcessBridge {
            endpoints,
            running: Some(running),
            dir,
            clock,
        }
    }
}

/// Waits until `events` yields an event for which `pick` returns `Some`.
pub async fn wait_for_event<T>(
    events: &mut broadcast::Receiver<AgentEvent>,
    within: Duration,
    mut pick: impl FnMut(&AgentEvent) -> Option<T>,
) -> T {
    tokio::time::timeout(within, async {
        loop {
            match events.recv().await {
                Ok(e) => {
                    if let Some(t) = pick(&e) {
                        return t;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    panic!("test fell {n} events behind the agent")
                }
                Err(broadcast::error::RecvError::Closed) => panic!("agent stopped"),
            }
        }
    })
    .await
    .expect("the awaited agent event did not happen in time")
}

/// Checks `condition` until it holds, for state only observable by asking (the admin API).
/// Each check is a real request; the pause between checks only spaces them out.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if condition().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub use device_sim::fleet::proxy::CutProxy as TcpProxy;

/// An MQTT client following `fleet/events/#` as operations would, with an ops login of its
/// own (`POST /v1/ops-logins`).
#[derive(Debug)]
pub struct OpsWatcher {
    pub events: mpsc::UnboundedReceiver<OpsEvent>,
    stop: CancellationToken,
}

impl OpsWatcher {
    pub async fn start(endpoints: &Endpoints) -> OpsWatcher {
        let login = endpoints
            .client()
            .create_ops_login("test ops watcher")
            .await
            .expect("creating an ops login");
        let mut opts = endpoints.mqtt_options(
            &format!("ops-watch-{}", free_port()),
            login.ops_id.as_str(),
            login.password.expose(),
        );
        opts.set_max_packet_size(64 * 1024, 64 * 1024);
        let (client, mut eventloop) = AsyncClient::new(opts, 10);
        let (tx, events) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    e = eventloop.poll() => e,
                    _ = s.cancelled() => return,
                };
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        client
                            .subscribe(schemas::topics::OPS_FILTER, QoS::AtLeastOnce)
                            .await
                            .unwrap();
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(e) = serde_json::from_slice::<OpsEvent>(&p.payload) {
                            let _ = tx.send(e);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => panic!("ops watcher lost the broker: {e}"),
                }
            }
        });
        tokio::time::timeout(SOON, subscribed)
            .await
            .expect("ops watcher did not subscribe in time")
            .unwrap();
        OpsWatcher { events, stop }
    }

    /// Waits for an ops event matching `pick`.
    pub async fn wait_for<T>(
        &mut self,
        within: Duration,
        mut pick: impl FnMut(&OpsEvent) -> Option<T>,
    ) -> T {
        tokio::time::timeout(within, async {
            loop {
                let e = self.events.recv().await.expect("ops watcher stopped");
                if let Some(t) = pick(&e) {
                    return t;
                }
            }
        })
        .await
        .expect("the awaited ops event did not happen in time")
    }
}

impl Drop for OpsWatcher {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A Mosquitto broker configured as a production deployment would: no anonymous clients,
/// a password file, client id = username, and ACLs that confine each device to its own topics.
#[derive(Debug)]
pub struct Mosquitto {
    pub port: u16,
    child: Child,
    passwords: PathBuf,
    conf: PathBuf,
}

impl Mosquitto {
    /// The login of the bridge at a harness Mosquitto (give it to `start`).
    pub const BRIDGE_LOGIN: (&'static str, &'static str) = ("cloud-bridge", "bridge-pass");

    /// A device that registers over the data channel and is then provisioned here, as the
    /// operator of an external broker does; returns once its MQTT link is up.
    pub async fn provisioned_device(
        &mut self,
        ep: &Endpoints,
        serial: &str,
        adjust: impl FnOnce(&mut AgentConfig),
    ) -> (
        device_sim::AgentHandle,
        AgentConfig,
        MemoryStateStore,
        schemas::agent::Credentials,
    ) {
        let token = ep.enrollment_token(1).await;
        let store = MemoryStateStore::default();
        let mut config = ep.agent_config(&token, serial);
        adjust(&mut config);
        let agent = device_sim::start(config.clone(), Device::simulated(), store.clone());
        let mut events = agent.subscribe();
        wait_for_event(&mut events, SOON, |e| {
            matches!(e, AgentEvent::Registered(_)).then_some(())
        })
        .await;
        let creds = store.snapshot().unwrap().credentials.unwrap();
        self.add_user(creds.device_id.as_str(), creds.secret.expose());
        wait_for_event(&mut events, SOON, |e| {
            matches!(e, AgentEvent::MqttUp { .. }).then_some(())
        })
        .await;
        (agent, config, store, creds)
    }

    /// The ACL: the bridge publishes hints and events and reads presence; `ops` reads events;
    /// a device reads only its own notify topic and writes only its own presence.
    pub const ACL: &'static str = "user cloud-bridge\n\
topic write devices/+/notify\n\
topic read devices/+/presence\n\
topic write fleet/events/#\n\
user ops\n\
topic read fleet/events/#\n\
pattern read devices/%u/notify\n\
pattern write devices/%u/presence\n";

    fn binary(name: &str) -> PathBuf {
        for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
            let p = Path::new(dir).join(name);
            if p.exists() {
                return p;
            }
        }
        panic!("{name} is not installed: apt-get install -y mosquitto (.ci/run does this)");
    }

    pub async fn start(dir: &Path, users: &[(&str, &str)]) -> Mosquitto {
        Self::start_with(dir, users, None).await
    }

    /// With TLS only, with the certificate and key that `tls::create_private_ca` wrote to
    /// `tls_dir`.
    pub async fn start_tls(dir: &Path, users: &[(&str, &str)], tls_dir: &Path) -> Mosquitto {
        Self::start_with(dir, users, Some(tls_dir)).await
    }

    async fn start_with(dir: &Path, users: &[(&str, &str)], tls: Option<&Path>) -> Mosquitto {
        let port = free_port();
        let tls = tls.map(|d| {
            format!(
                "cafile {}\ncertfile {}\nkeyfile {}\n",
                d.join("ca.pem").display(),
                d.join("server.pem").display(),
                d.join("server-key.pem").display()
            )
        });
        let passwords = dir.join("passwords");
        std::fs::write(&passwords, "").unwrap();
        let acl = dir.join("acl");
        std::fs::write(&acl, Self::ACL).unwrap();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n{}allow_anonymous false\npassword_file {}\nacl_file {}\n\
                 use_username_as_clientid true\npersistence false\nlog_dest stderr\nlog_type error\n",
                tls.map(|t| format!("{t}{}", Self::keep_root())).unwrap_or_default(),
                passwords.display(),
                acl.display()
            ),
        )
        .unwrap();
        // Users go in before the start: a SIGHUP before mosquitto installs its handler kills it.
        for (user, pass) in users {
            Self::passwd(&passwords, user, pass);
        }
        let mut m = Mosquitto {
            port,
            child: Self::spawn(&conf),
            passwords,
            conf,
        };
        m.wait_listening().await;
        m
    }

    fn spawn(conf: &Path) -> Child {
        Command::new(Self::binary("mosquitto"))
            .arg("-c")
            .arg(conf)
            .kill_on_drop(true)
            .spawn()
            .expect("cannot start mosquitto")
    }

    async fn wait_listening(&mut self) {
        let port = self.port;
        let deadline = tokio::time::Instant::now() + SOON;
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "mosquitto did not listen on {port}"
            );
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "mosquitto exited; port {port} taken?"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Mosquitto listens before it installs its signal handlers: a SIGHUP in between kills
        // it, or is lost if SIGHUP is ignored in the parent (`nohup`), and then the users added
        // later are never read. Ready means listening and catching SIGHUP.
        while !self.catches_sighup() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "mosquitto did not install its SIGHUP handler"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Whether the broker has its own SIGHUP handler (bit 0 of `SigCgt` in its `/proc` status).
    fn catches_sighup(&self) -> bool {
        let Some(pid) = self.child.id() else {
            return false;
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .is_some_and(|mask| mask & 1 == 1)
    }

    /// Kills the broker (SIGKILL), as a crash would.
    pub async fn kill(&mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    /// Starts it again on the same port with the same configuration and users.
    pub async fn restart(&mut self) {
        self.child = Self::spawn(&self.conf);
        self.wait_listening().await;
    }

    /// Run as root, mosquitto drops to its own user before it reads certificates, and could not
    /// read them in the test's private directory: keep it root there.
    fn keep_root() -> &'static str {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata("/proc/self") {
            Ok(m) if m.uid() == 0 => "user root\n",
            _ => "",
        }
    }

    fn passwd(file: &Path, user: &str, pass: &str) {
        let status = std::process::Command::new(Self::binary("mosquitto_passwd"))
            .arg("-b")
            .arg(file)
            .arg(user)
            .arg(pass)
            .status()
            .unwrap();
        assert!(status.success(), "mosquitto_passwd failed");
    }

    /// Adds a user and makes mosquitto reread its password file.
    pub fn add_user(&mut self, user: &str, pass: &str) {
        Self::passwd(&self.passwords, user, pass);
        self.reload();
    }

    fn reload(&self) {
        let pid = self.child.id().expect("mosquitto running");
        let status = std::process::Command::new("kill")
            .arg("-HUP")
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }
}
