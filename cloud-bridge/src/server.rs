//! Start-up, wiring and shutdown of the whole cloud bridge.
//!
//! [`start`] opens the store, loads the state, starts the broker (or connects to an external
//! one) and spawns every task on one [`TaskTracker`]. Cancelling the shutdown token stops the
//! listeners, closes data-channel connections with a `Closing` event and code 1001, waits for
//! every task, and makes a last flush. The embedded broker has no shutdown API (rumqttd #771):
//! it stops when the process exits.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use schemas::Secret;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bridge::Bridge;
use crate::clock::{Clock, SystemClock};
use crate::config::{BrokerMode, Config, ConfigError};
use crate::core::Core;
use crate::listener::Listener;
use crate::notifier::{self, ExternalBroker, Notifier};
use crate::store::{Committer, SledStore, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
    let context = context.into();
    move |source| StartError::Io { context, source }
}

/// The bound listeners of the admin API and the data channel (bind port 0 in tests).
#[derive(Debug)]
pub struct Listeners {
    pub admin: TcpListener,
    pub data: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &Config) -> Result<Listeners, StartError> {
        let admin = crate::listener::bind(config.listen.admin).map_err(io(format!(
            "binding the admin API on {}",
            config.listen.admin
        )))?;
        let data = crate::listener::bind(config.listen.data).map_err(io(format!(
            "binding the data channel on {}",
            config.listen.data
        )))?;
        Ok(Listeners { admin, data })
    }
}

/// A running bridge.
#[derive(Debug)]
pub struct Running {
    pub admin_addr: SocketAddr,
    pub data_addr: SocketAddr,
    /// Whether the listeners speak TLS (https://, wss://, and mqtts:// on the embedded broker).
    pub tls: bool,
    /// Where devices reach MQTT: the embedded broker, or the configured external one.
    pub mqtt_addr: String,
    /// Whether devices reach MQTT over TLS (`mqtts://`).
    pub mqtt_tls: bool,
    pub admin_token: Secret,
    pub bridge: Bridge,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    flusher: tokio::task::JoinHandle<()>,
    flusher_stop: CancellationToken,
}

impl Running {
    /// Stops everything and waits for every task; the last writes are flushed.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.join().await;
    }

    /// Waits for every task after the shutdown token was cancelled elsewhere.
    pub async fn join(self) {
        self.shutdown.cancelled().await;
        self.tracker.close();
        self.tracker.wait().await;
        self.flusher_stop.cancel();
        let _ = self.flusher.await;
        tracing::info!("cloud bridge stopped");
    }
}

/// Reads the admin token from the config, or from `<data_dir>/admin-token`, or makes one.
fn admin_token(config: &Config, data_dir: &Path) -> Result<Secret, StartError> {
    if let Some(token) = config.admin_secret() {
        return Ok(token);
    }
    let path = data_dir.join("admin-token");
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(Secret::new(text.trim())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
    }
    let token = Secret::from_random(rand::random());
    write_private(&path, token.expose()).map_err(io(format!("writing {}", path.display())))?;
    tracing::info!(path = %path.display(), "generated an admin token");
    Ok(token)
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = tls::create_private_file(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Starts the bridge on the given listeners.
pub async fn start(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<Running, StartError> {
    start_with_clock(config, listeners, shutdown, Arc::new(SystemClock)).await
}

/// Like [`start`], reading the time from `clock` (a test's [`crate::clock::SteppedClock`]).
/// A start that fails leaves no data directory behind if there was none before (a port in use
/// must not leave a new store and admin token to be found by the next start).
pub async fn start_with_clock(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
    clock: Arc<dyn Clock>,
) -> Result<Running, StartError> {
    let data_dir = config.data_dir.clone();
    let new_dir = !data_dir.exists();
    let started = start_in(config, listeners, shutdown, clock).await;
    if started.is_err() && new_dir {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    started
}

async fn start_in(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
    clock: Arc<dyn Clock>,
) -> Result<Running, StartError> {
    config.validate()?;
    // Private: the store holds job payloads, and the admin token file sits beside it.
    tls::create_private_dir(&config.data_dir)
        .map_err(io(format!("creating {}", config.data_dir.display())))?;
    let admin_token = admin_token(&config, &config.data_dir)?;
    let store_dir = config.data_dir.join("store");
    let fsync = config.store.fsync;
    let cache_bytes = config.store.cache_mb.saturating_mul(1 << 20);
    let store =
        tokio::task::spawn_blocking(move || SledStore::open(&store_dir, fsync, cache_bytes))
            .await
            .map_err(|e| StoreError::Open(e.to_string()))??;
    let committer = Committer::new(Arc::new(store), config.store.min_flush_interval());
    let core = Core::load(
        committer.clone(),
        config.job_policy(),
        config.store.shard_count(),
    )?;
    let server_tls = if config.tls.enabled() {
        Some(tls::server_config(&config.tls.cert, &config.tls.key)?)
    } else {
        None
    };
    let caps = Caps::fitted(&config);
    let notifier = Notifier::new(config.broker.queue);
    let mode = match config.broker.mode {
        BrokerMode::Embedded => "embedded",
        BrokerMode::External => "external",
    };
    let bridge = Bridge::new(
        core,
        committer.clone(),
        notifier,
        mode,
        clock,
        config.devices.presence_grace_ms,
    );

    let tracker = TaskTracker::new();
    let flusher_stop = CancellationToken::new();
    let flusher = tokio::spawn(committer.clone().run_flusher(flusher_stop.clone()));

    let mut mqtt_tls = server_tls.is_some();
    let mqtt_addr = match config.broker.mode {
        BrokerMode::Embedded => {
            let settings = broker::BrokerSettings {
                listen: config.broker.listen,
                max_connections: caps.mqtt,
                tls: server_tls.clone(),
                tls_handshake_timeout: config.tls.handshake_timeout(),
                ..broker::BrokerSettings::default()
            };
            let auth = bridge.mqtt_authenticator();
            let (embedded, link) =
                tokio::task::spawn_blocking(move || broker::EmbeddedBroker::start(&settings, auth))
                    .await
                    .map_err(|e| {
                        io("starting the embedded broker")(std::io::Error::other(e.to_string()))
                    })??;
            tracker.spawn(notifier::run_embedded(
                link,
                bridge.notifier().clone(),
                Arc::new(bridge.clone()),
                shutdown.clone(),
            ));
            let addr = embedded.addr().to_string();
            bridge.attach_broker(embedded);
            addr
        }
        BrokerMode::External => {
            let ((host, port), secure) = config.external_endpoint()?;
            mqtt_tls = secure;
            let tls = if secure {
                let ca = &config.broker.ca_file;
                Some(tls::client_config(
                    (!ca.as_os_str().is_empty()).then_some(ca.as_path()),
                )?)
            } else {
                None
            };
            let external = ExternalBroker {
                tls,
                host: host.clone(),
                port,
                client_id: config.broker.client_id.clone(),
                username: (!config.broker.username.is_empty())
                    .then(|| config.broker.username.clone()),
                password: (!config.broker.password.0.is_empty())
                    .then(|| Secret::new(config.broker.password.0.clone())),
            };
            tracker.spawn(notifier::run_external(
                external,
                bridge.notifier().clone(),
                Arc::new(bridge.clone()),
                shutdown.clone(),
            ));
            format!("{host}:{port}")
        }
    };

    tracker.spawn(bridge.clone().run_reaper(shutdown.clone()));
    tracker.spawn(bridge.clone().run_ops_publisher(shutdown.clone()));
    tracker.spawn(bridge.clone().run_departures(shutdown.clone()));
    tracker.spawn(crate::sweeper::run(
        bridge.clone(),
        config.retention.retention(),
        shutdown.clone(),
    ));

    let acceptor = server_tls.map(tls::TlsAcceptor::from);
    let listener = |socket: tokio::net::TcpListener, name: &'static str, cap| {
        let addr = socket
            .local_addr()
            .map_err(io(format!("{name} listener")))?;
        let listener = Listener::new(
            socket,
            name,
            cap,
            acceptor.clone(),
            config.tls.handshake_timeout(),
        );
        Ok::<_, StartError>((addr, listener))
    };
    let (data_addr, data_listener) = listener(listeners.data, "data channel", caps.data)?;
    tracker.spawn(crate::data_channel::serve(
        data_listener,
        bridge.clone(),
        config.data_channel_settings(),
        shutdown.clone(),
        tracker.clone(),
    ));

    let (admin_addr, admin_listener) = listener(listeners.admin, "admin API", caps.admin)?;
    let app = crate::admin::with_request_timeout(
        crate::admin::router(bridge.clone(), admin_token.clone(), acceptor.is_some()).merge(
            crate::admin::metrics_router(
                bridge.clone(),
                (!config.admin.metrics_token.0.is_empty())
                    .then(|| Secret::new(config.admin.metrics_token.0.clone())),
            ),
        ),
        Duration::from_secs(config.admin.request_timeout_secs),
    );
    tracker.spawn(crate::http::serve(
        admin_listener,
        app,
        crate::http::HttpSettings {
            header_timeout: Duration::from_secs(config.admin.header_timeout_secs),
            evicted: bridge.metrics().admin_evicted.clone(),
            open: bridge.metrics().admin_open.clone(),
        },
        shutdown.clone(),
        tracker.clone(),
    ));

    tracing::info!(%admin_addr, %data_addr, mqtt = %mqtt_addr, broker = mode, "cloud bridge ready");
    Ok(Running {
        admin_addr,
        data_addr,
        tls: acceptor.is_some(),
        mqtt_tls,
        mqtt_addr,
        admin_token,
        bridge,
        shutdown,
        tracker,
        flusher,
        flusher_stop,
    })
}

/// Descriptors kept free beside the listeners' caps: the store's files, the broker's and the
/// runtime's own, outgoing connections.
const RESERVED_DESCRIPTORS: usize = 512;

/// The connection caps of the three listeners, fitted to the process's descriptor limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Caps {
    mqtt: usize,
    data: usize,
    admin: usize,
}

impl Caps {
    fn fitted(config: &Config) -> Caps {
        let wanted = Caps {
            mqtt: if config.broker.mode == BrokerMode::Embedded {
                config.broker.max_connections
            } else {
                0
            },
            data: config.data_channel.max_connections,
            admin: config.admin.max_connections,
        };
        let Some(limit) = descriptor_limit() else {
            return Caps {
                mqtt: wanted.mqtt.max(2),
                ..wanted
            };
        };
        let fitted = wanted.fit(limit.saturating_sub(RESERVED_DESCRIPTORS));
        if fitted != wanted {
            tracing::warn!(
                limit,
                mqtt = fitted.mqtt,
                data = fitted.data,
                admin = fitted.admin,
                "the listeners' max_connections exceed the descriptor limit (ulimit -n); scaled down to fit"
            );
        }
        Caps {
            mqtt: fitted.mqtt.max(2),
            ..fitted
        }
    }

    /// Scales every cap down by the same factor so that they sum to at most `room` (each at
    /// least 1).
    fn fit(self, room: usize) -> Caps {
        let sum = self.mqtt + self.data + self.admin;
        if sum <= room {
            return self;
        }
        let scale = |n: usize| {
            if n == 0 {
                0
            } else {
                ((n as u128 * room as u128 / sum as u128) as usize).max(1)
            }
        };
        Caps {
            mqtt: scale(self.mqtt),
            data: scale(self.data),
            admin: scale(self.admin),
        }
    }
}

/// The soft limit on open descriptors, where the system tells it (Linux: /proc/self/limits).
fn descriptor_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_are_scaled_to_the_room_left() {
        let caps = Caps {
            mqtt: 10_000,
            data: 8_000,
            admin: 512,
        };
        assert_eq!(caps.fit(20_000), caps);
        let small = caps.fit(1024 - RESERVED_DESCRIPTORS);
        assert!(small.mqtt + small.data + small.admin <= 512, "{small:?}");
        assert!(small.mqtt > small.data && small.data > small.admin && small.admin >= 1);
        if cfg!(target_os = "linux") {
            assert!(descriptor_limit().is_some_and(|l| l > 0));
        }
    }
}
