//! The embedded MQTT broker: rumqttd 0.20 with device authentication.
//!
//! What this crate adds around rumqttd, and why:
//! - **Authentication by device.** Every MQTT 3.1.1 client must present username = client id =
//!   device id and the device secret as password; an [`Authenticator`] decides. rumqttd has no
//!   per-topic ACL, so hints carry nothing secret and devices send nothing trusted over MQTT.
//! - **Bounded memory per device.** Each device's notify topic is its own rumqttd filter with a
//!   commit log; those filters get the smallest segments rumqttd allows (see
//!   [`BrokerSettings::notify_segment_bytes`]).
//! - **Ready means ready.** rumqttd only logs a failed bind, so [`EmbeddedBroker::start`] returns
//!   only after an MQTT CONNECT with a one-time probe identity got a CONNACK from *this* broker.
//! - **An in-process link** for the cloud bridge to publish hints and read presence without TCP.
//! - **Logging without rumqttd's spans** ([`init_logging`]): rumqttd opens an error-level span
//!   for every packet it routes, which a formatting subscriber renders even when nothing is
//!   logged in it.
//!
//! rumqttd has no shutdown API: the broker lives until the process exits.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::{Config, ConnectionSettings, RouterConfig, SegmentConfig, ServerSettings};
use sha2::{Digest, Sha256};

pub use rumqttd::Notification;
pub use rumqttd::local::{LinkError, LinkRx, LinkTx};

/// Decides whether an MQTT CONNECT is allowed.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(&self, client_id: &str, username: &str, password: &str) -> bool;
}

/// Settings of the embedded broker. Defaults suit a fleet of up to ~10,000 devices.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// Where devices connect (MQTT 3.1.1). Port 0 picks a free port.
    pub listen: SocketAddr,
    pub max_connections: usize,
    /// Largest publish accepted, in bytes. Hints are tiny; devices publish only presence.
    pub max_payload_size: usize,
    /// Time a new TCP connection has to send its CONNECT.
    pub connection_timeout_ms: u16,
    /// rumqttd accepts one connection per this many milliseconds per listener.
    pub next_connection_delay_ms: u64,
    /// Segment size of each `devices/+/notify` filter (rumqttd's minimum is 1024).
    pub notify_segment_bytes: usize,
    /// How long [`EmbeddedBroker::start`] waits for the listener to answer.
    pub ready_timeout: Duration,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        BrokerSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            max_connections: 20_000,
            max_payload_size: 4 * 1024,
            connection_timeout_ms: 10_000,
            next_connection_delay_ms: 1,
            notify_segment_bytes: 1024,
            ready_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot bind the MQTT listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the MQTT listener on {addr} did not answer within {timeout:?}: {detail}")]
    NotReady {
        addr: SocketAddr,
        timeout: Duration,
        detail: String,
    },
    /// rumqttd's `LinkError` is large; keep its message only.
    #[error("cannot create the in-process link: {0}")]
    Link(String),
    #[error("cannot start the broker thread: {0}")]
    Thread(std::io::Error),
}

/// A running embedded broker.
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
}

/// The in-process client of the cloud bridge: publish with `tx`, receive with `rx`.
pub struct BridgeLink {
    pub tx: LinkTx,
    pub rx: LinkRx,
}

impl std::fmt::Debug for BridgeLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BridgeLink").finish_non_exhaustive()
    }
}

impl EmbeddedBroker {
    /// Starts the broker and returns once it has answered a CONNECT, with the bridge's link.
    ///
    /// With port 0 a free port is chosen; if another process takes it between the check and
    /// rumqttd's bind, start is tried again on another port.
    pub fn start(
        settings: &BrokerSettings,
        auth: Arc<dyn Authenticator>,
    ) -> Result<(EmbeddedBroker, BridgeLink), BrokerError> {
        let attempts = if settings.listen.port() == 0 { 3 } else { 1 };
        let mut last = None;
        for _ in 0..attempts {
            match Self::start_once(settings, auth.clone()) {
                Ok(started) => return Ok(started),
                Err(e @ BrokerError::NotReady { .. }) => {
                    tracing::warn!(error = %e, "broker did not come up; trying another port");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(BrokerError::NotReady {
            addr: settings.listen,
            timeout: settings.ready_timeout,
            detail: "no attempt made".into(),
        }))
    }

    fn start_once(
        settings: &BrokerSettings,
        auth: Arc<dyn Authenticator>,
    ) -> Result<(EmbeddedBroker, BridgeLink), BrokerError> {
        let addr = pick_addr(settings.listen)?;
        let probe = ProbeIdentity::new();
        let config = rumqttd_config(settings, addr, auth, probe.clone());
        let mut broker = rumqttd::Broker::new(config);
        let (tx, rx) = broker
            .link("cloud-bridge")
            .map_err(|e| BrokerError::Link(e.to_string()))?;
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded broker stopped");
                }
            })
            .map_err(BrokerError::Thread)?;
        wait_ready(addr, &probe, settings.ready_timeout)?;
        tracing::info!(%addr, "embedded MQTT broker ready");
        Ok((EmbeddedBroker { addr }, BridgeLink { tx, rx }))
    }

    /// The address devices connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn pick_addr(listen: SocketAddr) -> Result<SocketAddr, BrokerError> {
    // Bind once ourselves: this turns "address in use" into an error instead of a log line,
    // and resolves port 0. rumqttd binds again right after we drop the listener.
    let listener = TcpListener::bind(listen).map_err(|source| BrokerError::Bind {
        addr: listen,
        source,
    })?;
    listener.local_addr().map_err(|source| BrokerError::Bind {
        addr: listen,
        source,
    })
}

/// A one-time identity that only the readiness probe knows.
#[derive(Clone)]
struct ProbeIdentity {
    client_id: String,
    password: String,
}

impl ProbeIdentity {
    fn new() -> ProbeIdentity {
        let mut hasher = Sha256::new();
        hasher.update(format!(
            "{:?}{:?}",
            Instant::now(),
            std::thread::current().id()
        ));
        hasher.update(std::process::id().to_le_bytes());
        let digest = hasher.finalize();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        ProbeIdentity {
            client_id: format!("broker-probe-{}", &hex[..16]),
            password: hex[16..].to_owned(),
        }
    }
}

fn rumqttd_config(
    settings: &BrokerSettings,
    addr: SocketAddr,
    auth: Arc<dyn Authenticator>,
    probe: ProbeIdentity,
) -> Config {
    let mut connections = ConnectionSettings {
        connection_timeout_ms: settings.connection_timeout_ms,
        max_payload_size: settings.max_payload_size,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    connections.set_auth_handler(
        move |client_id: String, username: String, password: String| {
            let allowed = if client_id == probe.client_id {
                username == probe.client_id && password == probe.password
            } else {
                auth.authenticate(&client_id, &username, &password)
            };
            if !allowed {
                tracing::info!(%client_id, "MQTT connect refused");
            }
            std::future::ready(allowed)
        },
    );
    let mut v4 = HashMap::new();
    v4.insert(
        "devices".to_owned(),
        ServerSettings {
            name: "devices".to_owned(),
            listen: addr,
            tls: None,
            next_connection_delay_ms: settings.next_connection_delay_ms,
            connections,
        },
    );
    let mut custom_segment = HashMap::new();
    custom_segment.insert(
        schemas::topics::NOTIFY_FILTER.to_owned(),
        SegmentConfig {
            max_segment_size: settings.notify_segment_bytes.max(1024),
            max_segment_count: 1,
        },
    );
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: settings.max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: 1024 * 1024,
            max_segment_count: 10,
            custom_segment: Some(custom_segment),
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(v4),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    }
}

/// Sends an MQTT 3.1.1 CONNECT with the probe identity until this broker answers CONNACK 0.
fn wait_ready(
    addr: SocketAddr,
    probe: &ProbeIdentity,
    timeout: Duration,
) -> Result<(), BrokerError> {
    let deadline = Instant::now() + timeout;
    let mut detail = String::from("no answer");
    while Instant::now() < deadline {
        match probe_once(addr, probe) {
            Ok(()) => return Ok(()),
            Err(e) => detail = e,
        }
        // Polling a port that rumqttd's listener thread is about to bind: there is no event
        // to wait on, so back off briefly between tries.
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotReady {
        addr,
        timeout,
        detail,
    })
}

fn probe_once(addr: SocketAddr, probe: &ProbeIdentity) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(&connect_packet(probe))
        .map_err(|e| format!("write: {e}"))?;
    let mut connack = [0u8; 4];
    stream
        .read_exact(&mut connack)
        .map_err(|e| format!("no CONNACK (another process on this port?): {e}"))?;
    if connack == [0x20, 0x02, 0x00, 0x00] {
        // Just close: the probe's session is clean, so nothing is left behind. (A DISCONNECT
        // racing the close makes rumqttd log a spurious "connection already gone" error.)
        Ok(())
    } else {
        Err(format!("unexpected CONNACK {connack:02x?}"))
    }
}

fn connect_packet(probe: &ProbeIdentity) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut body = Vec::new();
    string(&mut body, "MQTT");
    body.push(4); // protocol level 3.1.1
    body.push(0b1100_0010); // username, password, clean session
    body.extend_from_slice(&10u16.to_be_bytes()); // keep-alive seconds
    string(&mut body, &probe.client_id);
    string(&mut body, &probe.client_id);
    string(&mut body, &probe.password);
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

/// An authenticator for the standalone broker binary: a fixed table of device id → SHA-256 of
/// the secret (hex), where username and client id must both be the device id.
#[derive(Debug, Clone, Default)]
pub struct StaticAuthenticator {
    secrets_sha256: HashMap<String, String>,
}

impl StaticAuthenticator {
    /// Reads `device_id sha256hex` pairs, one per line; `#` starts a comment.
    pub fn from_lines(text: &str) -> Result<StaticAuthenticator, String> {
        let mut secrets_sha256 = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(id), Some(hash), None) if hash.len() == 64 => {
                    secrets_sha256.insert(id.to_owned(), hash.to_ascii_lowercase());
                }
                _ => {
                    return Err(format!(
                        "line {}: expected `<device id> <sha256 of secret, 64 hex digits>`",
                        n + 1
                    ));
                }
            }
        }
        Ok(StaticAuthenticator { secrets_sha256 })
    }

    pub fn len(&self) -> usize {
        self.secrets_sha256.len()
    }

    pub fn is_empty(&self) -> bool {
        self.secrets_sha256.is_empty()
    }
}

impl Authenticator for StaticAuthenticator {
    fn authenticate(&self, client_id: &str, username: &str, password: &str) -> bool {
        if client_id != username {
            return false;
        }
        let Some(expected) = self.secrets_sha256.get(username) else {
            return false;
        };
        let actual: String = Sha256::digest(password.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        constant_time_eq(actual.as_bytes(), expected.as_bytes())
    }
}

/// Sets up logging to standard error for a process that embeds the broker: `RUST_LOG` when set,
/// otherwise `default_filter`; colours only on a terminal.
///
/// rumqttd's events pass that filter as usual, but its spans are never created: it opens an
/// error-level span (with the topic formatted) for every packet it routes, which cost about 3 %
/// of the cloud bridge's CPU under load, for no output. Its events then carry no span context
/// (the client id of `incoming_connect`, say).
pub fn init_logging(default_filter: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer, filter};

    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
    // The hint keeps the `log` records of dependencies (sled logs through `log`) below the
    // filter's level from reaching tracing at all.
    let max_level = env.max_level_hint().unwrap_or(filter::LevelFilter::TRACE);
    let no_broker_spans =
        filter::filter_fn(|meta| !(meta.is_span() && meta.target().starts_with("rumqttd")))
            .with_max_level_hint(max_level);
    tracing_subscriber::registry()
        .with(env)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter(no_broker_spans),
        )
        .init();
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_authenticator_requires_matching_client_id_and_secret() {
        let hash: String = Sha256::digest(b"s3cret")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let auth = StaticAuthenticator::from_lines(&format!("# comment\ndev-1 {hash}\n")).unwrap();
        assert!(auth.authenticate("dev-1", "dev-1", "s3cret"));
        assert!(!auth.authenticate("dev-2", "dev-1", "s3cret"));
        assert!(!auth.authenticate("dev-1", "dev-1", "wrong"));
        assert!(!auth.authenticate("dev-9", "dev-9", "s3cret"));
        assert!(StaticAuthenticator::from_lines("dev-1 short").is_err());
    }
}
