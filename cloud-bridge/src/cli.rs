//! The `cloud-bridge` command line: parses flags and the config file, sets up logging, binds,
//! and calls [`crate::start`]. `serve` runs everything with working defaults and no config file
//! needed. It lives in the library so that the end-to-end tests run this very code as a child
//! process they can kill.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::{BrokerMode, COMMENTED_DEFAULTS, Config, RedactedString};
use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(version, about = "Cloud side of the fleet event system")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker, data channel, admin API and notifier.
    Serve(Box<ServeArgs>),
    /// Print the configuration file with every default, commented.
    Config,
    /// Write every stored record as JSON lines to stdout (the bridge must be stopped).
    Export {
        #[arg(long, env = "CLOUD_BRIDGE_DATA_DIR", default_value = "data")]
        data_dir: PathBuf,
    },
    /// TLS certificates.
    #[command(subcommand)]
    Tls(TlsCommand),
}

#[derive(Debug, Subcommand)]
enum TlsCommand {
    /// Create a private CA and a server certificate signed by it in <data_dir>/tls; then start
    /// with the --tls-cert and --tls-key it prints, and give devices and clients its ca.pem.
    Init {
        #[arg(long, env = "CLOUD_BRIDGE_DATA_DIR", default_value = "data")]
        data_dir: PathBuf,
        /// A DNS name or IP address devices reach the server by (repeat for more);
        /// localhost, 127.0.0.1 and ::1 are always included.
        #[arg(long = "name")]
        names: Vec<String>,
        /// Replace certificates already there (the old CA is no longer trusted by anyone who
        /// receives the new one).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML configuration file (see `cloud-bridge config`).
    #[arg(long, env = "CLOUD_BRIDGE_CONFIG")]
    config: Option<PathBuf>,
    /// Where the store, the generated admin token and TLS files live [default: data].
    #[arg(long, env = "CLOUD_BRIDGE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Admin API address, ip:port or host:port [default: 127.0.0.1:8080].
    #[arg(long, env = "CLOUD_BRIDGE_ADMIN_LISTEN", value_parser = crate::config::parse_listen)]
    admin_listen: Option<SocketAddr>,
    /// Data channel (WebSocket) address [default: 127.0.0.1:8081].
    #[arg(long, env = "CLOUD_BRIDGE_DATA_LISTEN", value_parser = crate::config::parse_listen)]
    data_listen: Option<SocketAddr>,
    /// Embedded broker's MQTT address [default: 127.0.0.1:1883].
    #[arg(long, env = "CLOUD_BRIDGE_MQTT_LISTEN", value_parser = crate::config::parse_listen)]
    mqtt_listen: Option<SocketAddr>,
    /// Use the embedded broker or an external one [default: embedded].
    #[arg(long, env = "CLOUD_BRIDGE_BROKER", value_enum)]
    broker: Option<BrokerMode>,
    /// External broker, as mqtt://host:port or mqtts://host:port [default: mqtt://127.0.0.1:1883].
    #[arg(long, env = "CLOUD_BRIDGE_MQTT_URL")]
    mqtt_url: Option<String>,
    /// Username at the external broker.
    #[arg(long, env = "CLOUD_BRIDGE_MQTT_USERNAME")]
    mqtt_username: Option<String>,
    /// Password at the external broker (prefer the environment variable).
    #[arg(long, env = "CLOUD_BRIDGE_MQTT_PASSWORD", hide_env_values = true)]
    mqtt_password: Option<String>,
    /// Admin API bearer token (default: generated into <data_dir>/admin-token).
    #[arg(long, env = "CLOUD_BRIDGE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Job lease in seconds: a job not renewed for this long goes back to the queue [default: 60].
    #[arg(long, env = "CLOUD_BRIDGE_LEASE_SECS")]
    lease_secs: Option<u64>,
    /// Certificate chain (PEM) for TLS on every listener (`cloud-bridge tls init` makes one).
    #[arg(long, env = "CLOUD_BRIDGE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "CLOUD_BRIDGE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// External broker over mqtts://: the CA (PEM) to verify it with (default: system roots).
    #[arg(long, env = "CLOUD_BRIDGE_MQTT_CA_FILE")]
    mqtt_ca_file: Option<PathBuf>,
    /// Listen beyond loopback without TLS (when TLS ends in front of the bridge).
    #[arg(long, env = "CLOUD_BRIDGE_ALLOW_PLAINTEXT")]
    allow_plaintext: bool,
}

impl ServeArgs {
    fn config(self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        set(&mut config.data_dir, self.data_dir);
        set(&mut config.listen.admin, self.admin_listen);
        set(&mut config.listen.data, self.data_listen);
        set(&mut config.broker.listen, self.mqtt_listen);
        set(&mut config.broker.mode, self.broker);
        set(&mut config.broker.url, self.mqtt_url);
        set(&mut config.broker.username, self.mqtt_username);
        set(
            &mut config.broker.password,
            self.mqtt_password.map(RedactedString),
        );
        set(
            &mut config.admin_token,
            self.admin_token.map(RedactedString),
        );
        set(&mut config.jobs.lease_secs, self.lease_secs);
        if let (Some(cert), Some(key)) = (self.tls_cert, self.tls_key) {
            config.tls.cert = cert;
            config.tls.key = key;
        }
        set(&mut config.broker.ca_file, self.mqtt_ca_file);
        if self.allow_plaintext {
            config.listen.allow_plaintext = true;
        }
        config.validate()?;
        Ok(config)
    }
}

/// A flag given on the command line overrides the configuration file.
fn set<T>(slot: &mut T, flag: Option<T>) {
    if let Some(v) = flag {
        *slot = v;
    }
}

/// Runs the command line with the process's arguments.
pub fn main() -> anyhow::Result<()> {
    broker::init_logging("info,rumqttd=error,rumqttd::server::broker=off,sled=warn");
    match Cli::parse().command {
        Command::Config => {
            print!("{COMMENTED_DEFAULTS}");
            Ok(())
        }
        Command::Export { data_dir } => {
            let store = crate::store::SledStore::open(&data_dir.join("store"), false, 16 << 20)
                .context("opening the store (is the bridge still running?)")?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let lines = crate::export::export(&store, &mut out)?;
            eprintln!("exported {lines} records");
            Ok(())
        }
        Command::Tls(TlsCommand::Init {
            data_dir,
            names,
            force,
        }) => {
            let dir = data_dir.join("tls");
            let files = tls::create_private_ca(&dir, &names, force)?;
            println!(
                "wrote a private CA and a server certificate to {}",
                dir.display()
            );
            println!("start the bridge with TLS on every listener:");
            println!(
                "  cloud-bridge serve --data-dir {} --tls-cert {} --tls-key {}",
                data_dir.display(),
                files.server_cert.display(),
                files.server_key.display()
            );
            println!(
                "devices and clients verify the server with {} (device-sim --ca-file, mosquitto_sub --cafile, curl --cacert)",
                files.ca_cert.display()
            );
            println!(
                "keep {} offline: whoever holds it can impersonate the server",
                files.ca_key.display()
            );
            Ok(())
        }
        Command::Serve(args) => {
            let config = (*args).config()?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(serve(config))
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    // Handlers first: a signal that arrives after "ready" must find them installed.
    let signals = Signals::install()?;
    let listeners = crate::Listeners::bind(&config).await?;
    let shutdown = CancellationToken::new();
    let running = crate::start(config, listeners, shutdown.clone()).await?;
    // One machine-readable line on stdout, for scripts and the test harness.
    let (http, ws) = if running.tls {
        ("https", "wss")
    } else {
        ("http", "ws")
    };
    println!(
        "{}",
        serde_json::json!({
            "ready": true,
            "admin": format!("{http}://{}", running.admin_addr),
            "data": format!("{ws}://{}", running.data_addr),
            "mqtt": running.mqtt_addr,
            "tls": running.tls,
            "mqtt_tls": running.mqtt_tls,
            "admin_token_file": data_dir.join("admin-token"),
        })
    );
    tokio::spawn(async move {
        signals.wait().await;
        tracing::info!("shutting down");
        shutdown.cancel();
    });
    running.join().await;
    Ok(())
}

/// SIGINT and SIGTERM, registered when created.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    #[cfg(unix)]
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    #[cfg(not(unix))]
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {})
    }

    #[cfg(unix)]
    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }

    #[cfg(not(unix))]
    async fn wait(self) {
        let _ = tokio::signal::ctrl_c().await;
    }
}
