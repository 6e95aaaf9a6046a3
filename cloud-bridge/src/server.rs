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

use schemas::Secret;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bridge::Bridge;
use crate::config::{BrokerMode, Config, ConfigError};
use crate::core::Core;
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
        let admin = TcpListener::bind(config.listen.admin)
            .await
            .map_err(io(format!(
                "binding the admin API on {}",
                config.listen.admin
            )))?;
        let data = TcpListener::bind(config.listen.data)
            .await
            .map_err(io(format!(
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
    /// Where devices reach MQTT: the embedded broker, or the configured external one.
    pub mqtt_addr: String,
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

/// Creates `dir` and its missing parents, the new ones readable by the owner only: the store
/// holds job payloads and the admin token file sits beside it.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(&tmp)?;
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
    config.validate()?;
    create_private_dir(&config.data_dir)
        .map_err(io(format!("creating {}", config.data_dir.display())))?;
    let admin_token = admin_token(&config, &config.data_dir)?;
    let store_dir = config.data_dir.join("store");
    let store = tokio::task::spawn_blocking(move || SledStore::open(&store_dir))
        .await
        .map_err(|e| StoreError::Open(e.to_string()))??;
    let committer = Committer::new(Arc::new(store), config.store.min_flush_interval());
    let core = Core::load(committer.clone(), config.job_policy())?;
    let notifier = Notifier::new(config.broker.queue);
    let mode = match config.broker.mode {
        BrokerMode::Embedded => "embedded",
        BrokerMode::External => "external",
    };
    let bridge = Bridge::new(core, committer.clone(), notifier, mode);

    let tracker = TaskTracker::new();
    let flusher_stop = CancellationToken::new();
    let flusher = tokio::spawn(committer.clone().run_flusher(flusher_stop.clone()));

    let mqtt_addr = match config.broker.mode {
        BrokerMode::Embedded => {
            let settings = broker::BrokerSettings {
                listen: config.broker.listen,
                max_connections: config.broker.max_connections,
                ..broker::BrokerSettings::default()
            };
            let auth = bridge.mqtt_authenticator(admin_token.clone());
            let (embedded, link) =
                tokio::task::spawn_blocking(move || broker::EmbeddedBroker::start(&settings, auth))
                    .await
                    .map_err(|e| {
                        io("starting the embedded broker")(std::io::Error::other(e.to_string()))
                    })??;
            tracker.spawn(notifier::run_embedded(
                link,
                bridge.clone(),
                shutdown.clone(),
            ));
            let addr = embedded.addr().to_string();
            bridge.attach_broker(embedded);
            addr
        }
        BrokerMode::External => {
            let (host, port) = config.external_addr()?;
            let external = ExternalBroker {
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
                bridge.clone(),
                shutdown.clone(),
            ));
            format!("{host}:{port}")
        }
    };

    tracker.spawn(bridge.clone().run_reaper(shutdown.clone()));

    let data_addr = listeners.data.local_addr().map_err(io("data listener"))?;
    tracker.spawn(crate::data_channel::serve(
        listeners.data,
        bridge.clone(),
        config.data_channel_settings(),
        shutdown.clone(),
        tracker.clone(),
    ));

    let admin_addr = listeners.admin.local_addr().map_err(io("admin listener"))?;
    let app = crate::admin::router(bridge.clone(), admin_token.clone());
    let admin_shutdown = shutdown.clone();
    tracker.spawn(async move {
        let served = axum::serve(listeners.admin, app)
            .with_graceful_shutdown(admin_shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin API stopped");
        }
    });

    tracing::info!(%admin_addr, %data_addr, mqtt = %mqtt_addr, broker = mode, "cloud bridge ready");
    Ok(Running {
        admin_addr,
        data_addr,
        mqtt_addr,
        admin_token,
        bridge,
        shutdown,
        tracker,
        flusher,
        flusher_stop,
    })
}
