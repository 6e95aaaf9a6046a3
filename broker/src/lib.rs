//! The embedded MQTT broker: rumqttd 0.20 with device authentication.
//!
//! What this crate adds around rumqttd, and why:
//! - **Authentication by device.** Every MQTT 3.1.1 client must present username = client id =
//!   device id and the device secret as password; an [`Authenticator`] decides, and a refusal
//!   is answered with its CONNACK return code ([`Refusal`]) before the socket closes.
//! - **Authorization per packet** (the vendored rumqttd's authorizer hook). A device may
//!   subscribe only to its own notify topic and publish only to its own presence topic (QoS 0
//!   or 1, never retained, its last will included); an operations login may only subscribe
//!   under `fleet/events/`; only the in-process link of the cloud bridge publishes hints and
//!   ops events. A refused filter gets SUBACK failure (0x80), a refused publish closes the
//!   connection; both are counted ([`BrokerStats`]) and logged at a bounded rate. `$share`
//!   and `$SYS` filters are refused like any other foreign filter.
//! - **Session control** ([`EmbeddedBroker::disconnect`]): the bridge closes a disabled
//!   device's connection and forgets its persistent session.
//! - **Health** ([`EmbeddedBroker::health`]): the router thread reports why it stopped, and a
//!   watchdog logs in with a one-time probe identity every few seconds; either failing means
//!   the broker cannot serve.
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
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttd::{
    AuthResult, Config, ConnectionSettings, RouterConfig, RouterHealth, SegmentConfig,
    ServerSettings, SessionControl,
};

mod auth;
mod probe;
mod rules;
mod stats;

pub use auth::{Authenticator, Login, Refusal, StaticAuthenticator, constant_time_eq};
use probe::{ProbeIdentity, probe_once, wait_ready};
use rules::{DeviceRules, NothingAllowed, OpsRules, OpsSessions};
pub use stats::{BrokerStats, LogLimiter};

pub use rumqttd::Notification;
/// Binds a TCP listener with a backlog as deep as the kernel allows (rumqttd patch 10), as the
/// broker's own listener does: for the other listeners of a program that serves a fleet.
pub use rumqttd::deep_listener;
pub use rumqttd::local::{LinkError, LinkRx, LinkTx};

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
    /// rumqttd's pause after each accepted connection, per listener; 0 (the default) accepts
    /// as fast as connections come. A pause of 1 ms caps a listener near 700 accepts a second
    /// (the timer's granularity), below what a fleet reconnecting at once offers; the
    /// connection cap and the CONNECT deadline bound a flood instead.
    pub next_connection_delay_ms: u64,
    /// Segment size of each `devices/+/notify` filter (rumqttd's minimum is 1024).
    pub notify_segment_bytes: usize,
    /// How long [`EmbeddedBroker::start`] waits for the listener to answer.
    pub ready_timeout: Duration,
    /// How often the watchdog logs in to check the broker serves.
    pub health_interval: Duration,
    /// TLS for the MQTT listener (mqtts://): every connection must do its handshake first.
    pub tls: Option<Arc<tls::rustls::ServerConfig>>,
    /// A client must finish its TLS handshake within this time.
    pub tls_handshake_timeout: Duration,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        BrokerSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            max_connections: 20_000,
            max_payload_size: 4 * 1024,
            connection_timeout_ms: 10_000,
            next_connection_delay_ms: 0,
            notify_segment_bytes: 1024,
            ready_timeout: Duration::from_secs(10),
            health_interval: Duration::from_secs(2),
            tls: None,
            tls_handshake_timeout: Duration::from_secs(5),
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

/// Makes every accepted connection do its TLS handshake (in its own task, under the deadline).
fn tls_wrapper(
    config: Arc<tls::rustls::ServerConfig>,
    timeout: Duration,
) -> rumqttd::StreamWrapper {
    let acceptor = tls::TlsAcceptor::from(config);
    rumqttd::StreamWrapper(Arc::new(move |tcp| {
        let acceptor = acceptor.clone();
        Box::pin(async move {
            match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => Ok(Box::new(stream) as Box<dyn rumqttd::Stream>),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "TLS handshake timed out",
                )),
            }
        })
    }))
}

/// A running embedded broker. Clones share it.
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Client ids that logged in as each operations login, so that revoking one closes its
    /// sessions (whatever client ids they chose).
    ops_sessions: OpsSessions,
    stats: Arc<BrokerStats>,
    router: RouterHealth,
    sessions: SessionControl,
    /// The watchdog's last failure, while it keeps failing.
    watchdog: Mutex<Option<String>>,
}

/// Whether the broker serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerHealth {
    Serving,
    /// It cannot serve; why.
    Down(String),
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
        let probe = ProbeIdentity::new(settings.tls.is_some());
        let stats = Arc::new(BrokerStats::new());
        let ops_sessions = OpsSessions::default();
        let config = rumqttd_config(
            settings,
            addr,
            auth,
            probe.clone(),
            stats.clone(),
            ops_sessions.clone(),
        );
        let mut broker = rumqttd::Broker::new(config);
        let (tx, rx) = broker
            .link("cloud-bridge")
            .map_err(|e| BrokerError::Link(e.to_string()))?;
        let shared = Arc::new(Shared {
            ops_sessions,
            stats,
            router: broker.router_health(),
            sessions: broker.sessions(),
            watchdog: Mutex::new(None),
        });
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded broker stopped");
                }
            })
            .map_err(BrokerError::Thread)?;
        wait_ready(addr, &probe, settings.ready_timeout)?;
        let broker = EmbeddedBroker { addr, shared };
        broker.spawn_watchdog(probe, settings.health_interval)?;
        tracing::info!(%addr, "embedded MQTT broker ready");
        Ok((broker, BridgeLink { tx, rx }))
    }

    /// The address devices connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many topics and filters the broker holds (rumqttd frees neither).
    pub fn sizes(&self) -> (usize, usize) {
        self.shared.router.sizes()
    }

    /// MQTT connections open (devices, ops logins, the bridge's own link, the watchdog's).
    pub fn connections(&self) -> usize {
        self.shared.router.connections()
    }

    /// What the broker refused so far.
    pub fn stats(&self) -> &BrokerStats {
        &self.shared.stats
    }

    /// Whether the broker serves: its router thread runs and the watchdog's last two logins
    /// were answered.
    pub fn health(&self) -> BrokerHealth {
        if let Some(reason) = self.shared.router.stopped() {
            return BrokerHealth::Down(reason);
        }
        let watchdog = self
            .shared
            .watchdog
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match &*watchdog {
            Some(failure) => BrokerHealth::Down(failure.clone()),
            None => BrokerHealth::Serving,
        }
    }

    /// Closes the connection of `client_id`, if it has one, and forgets its persistent session
    /// (its queued messages, its subscriptions). Waits at most a second for the router.
    pub fn disconnect(&self, client_id: &str) -> Result<(), BrokerError> {
        self.shared
            .sessions
            .disconnect(client_id, Duration::from_secs(1))
            .map_err(|e| BrokerError::Link(e.to_string()))
    }

    /// Closes every session that logged in as the operations login `login` (see
    /// [`Login::Ops`]); the authenticator refuses it from then on.
    pub fn disconnect_login(&self, login: &str) -> Result<usize, BrokerError> {
        let clients = self.shared.ops_sessions.take(login);
        for client in &clients {
            self.disconnect(client)?;
        }
        Ok(clients.len())
    }

    /// Logs in every `interval`; two failures in a row mark the broker down until one succeeds.
    fn spawn_watchdog(&self, probe: ProbeIdentity, interval: Duration) -> Result<(), BrokerError> {
        let broker = self.clone();
        std::thread::Builder::new()
            .name("broker-watchdog".into())
            .spawn(move || {
                let mut failures = 0u32;
                loop {
                    // A periodic check, not a wait for an event: there is none to wait on.
                    std::thread::sleep(interval);
                    let result = probe_once(broker.addr, &probe);
                    let mut state = broker
                        .shared
                        .watchdog
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    match result {
                        Ok(()) => {
                            if state.take().is_some() {
                                tracing::warn!("embedded broker serves again");
                            }
                            failures = 0;
                        }
                        Err(e) => {
                            failures += 1;
                            if failures >= 2 && state.is_none() {
                                tracing::error!(error = %e, "embedded broker does not answer logins");
                                *state = Some(format!("the broker does not answer logins: {e}"));
                            }
                        }
                    }
                }
            })
            .map_err(BrokerError::Thread)?;
        Ok(())
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

fn rumqttd_config(
    settings: &BrokerSettings,
    addr: SocketAddr,
    auth: Arc<dyn Authenticator>,
    probe: ProbeIdentity,
    stats: Arc<BrokerStats>,
    ops_sessions: OpsSessions,
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
            let login = if client_id == probe.client_id {
                if username == probe.client_id
                    && constant_time_eq(password.as_bytes(), probe.password.as_bytes())
                {
                    Ok(None)
                } else {
                    Err(Refusal::BadCredentials)
                }
            } else {
                auth.authenticate(&client_id, &username, &password)
                    .map(Some)
            };
            let result = match login {
                Ok(None) => AuthResult::Allow(Some(Arc::new(NothingAllowed))),
                Ok(Some(Login::Device(device))) => AuthResult::Allow(Some(Arc::new(DeviceRules {
                    notify: schemas::topics::notify_of(&device),
                    presence: schemas::topics::presence_of(&device),
                    device,
                    stats: stats.clone(),
                }))),
                Ok(Some(Login::Ops(login))) => {
                    ops_sessions.add(login, &client_id);
                    AuthResult::Allow(Some(Arc::new(OpsRules {
                        stats: stats.clone(),
                    })))
                }
                Err(refusal) => {
                    stats.refused_connect(&client_id, refusal);
                    AuthResult::Refuse(refusal.return_code())
                }
            };
            std::future::ready(result)
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
            stream_wrapper: settings
                .tls
                .clone()
                .map(|c| tls_wrapper(c, settings.tls_handshake_timeout)),
            max_connections: Some(settings.max_connections),
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use rumqttd::protocol::QoS;
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::rules::valid_filter;

    #[test]
    fn static_authenticator_requires_matching_client_id_and_secret() {
        let hash: String = Sha256::digest(b"s3cret")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let auth = StaticAuthenticator::from_lines(&format!("# comment\ndev-1 {hash}\n")).unwrap();
        assert_eq!(
            auth.authenticate("dev-1", "dev-1", "s3cret"),
            Ok(Login::Device("dev-1".into()))
        );
        assert_eq!(
            auth.authenticate("dev-2", "dev-1", "s3cret"),
            Err(Refusal::IdentifierRejected)
        );
        assert_eq!(
            auth.authenticate("dev-1", "dev-1", "wrong"),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            auth.authenticate("dev-9", "dev-9", "s3cret"),
            Err(Refusal::BadCredentials)
        );
        assert!(StaticAuthenticator::from_lines("dev-1 short").is_err());
    }

    #[test]
    fn filters_follow_the_specification() {
        for ok in ["fleet/events/#", "fleet/events/+/x", "a", "+", "#", "a/+/#"] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+", "#/a", "fleet/events/j#"] {
            assert!(!valid_filter(bad), "{bad}");
        }
    }

    #[test]
    fn a_device_may_only_read_its_hints_and_announce_itself() {
        use rumqttd::Authorizer;
        let stats = Arc::new(BrokerStats::new());
        let rules = DeviceRules {
            device: "dev-a".into(),
            notify: schemas::topics::notify_of("dev-a"),
            presence: schemas::topics::presence_of("dev-a"),
            stats: stats.clone(),
        };
        assert!(rules.may_subscribe("devices/dev-a/notify", QoS::AtLeastOnce));
        for foreign in [
            "#",
            "devices/+/notify",
            "devices/dev-b/notify",
            "fleet/events/#",
            "$share/g/#",
            "$SYS/#",
            "+/+/+",
            "devices/dev-a/presence",
        ] {
            assert!(!rules.may_subscribe(foreign, QoS::AtLeastOnce), "{foreign}");
        }
        assert!(rules.may_publish("devices/dev-a/presence", QoS::AtLeastOnce, false));
        assert!(rules.may_publish("devices/dev-a/presence", QoS::AtMostOnce, false));
        assert!(!rules.may_publish("devices/dev-a/presence", QoS::AtLeastOnce, true));
        assert!(!rules.may_publish("devices/dev-a/presence", QoS::ExactlyOnce, false));
        assert!(!rules.may_publish("devices/dev-b/presence", QoS::AtLeastOnce, false));
        assert!(!rules.may_publish("devices/dev-a/notify", QoS::AtLeastOnce, false));
        assert!(!rules.may_publish("fleet/events/jobs/succeeded", QoS::AtMostOnce, false));
        assert_eq!(stats.subscribes_refused.load(Ordering::Relaxed), 8);
        assert_eq!(stats.publishes_refused.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn refusals_are_logged_at_a_bounded_rate() {
        let stats = BrokerStats::new();
        let logged = (0..1000).filter(|_| stats.may_log()).count();
        assert_eq!(logged, BrokerStats::LOG_PER_SECOND as usize);
        assert_eq!(stats.refusals_not_logged(), 990);
    }

    #[test]
    fn ops_sessions_remember_a_bounded_number_of_client_ids_per_login() {
        let sessions = OpsSessions::default();
        for n in 0..(OpsSessions::PER_LOGIN + 10) {
            sessions.add("ops-a".into(), &format!("mosq-{n}"));
        }
        sessions.add("ops-a".into(), "mosq-300");
        sessions.add("ops-b".into(), "grafana");
        let a = sessions.take("ops-a");
        assert_eq!(a.len(), OpsSessions::PER_LOGIN);
        assert_eq!(a.last().map(String::as_str), Some("mosq-300"));
        assert!(!a.contains(&"mosq-0".to_owned()));
        assert!(sessions.take("ops-a").is_empty());
        assert_eq!(sessions.take("ops-b"), ["grafana"]);
    }

    #[test]
    fn a_limiter_reports_what_it_held_back_with_the_next_line() {
        let limiter = LogLimiter::per_second(2);
        assert_eq!(limiter.allow(), Some(0));
        assert_eq!(limiter.allow(), Some(0));
        assert_eq!(limiter.allow(), None);
        assert_eq!(limiter.allow(), None);
        assert_eq!(limiter.suppressed(), 2);
    }
}
