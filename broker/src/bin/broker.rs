//! `broker`: the embedded MQTT broker on its own, for a deployment that runs the notification
//! channel apart from the cloud bridge. Devices are admitted from a credentials file with lines
//! `<device id> <sha256 of the device secret, hex>`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use broker::{BrokerSettings, EmbeddedBroker, Notification, StaticAuthenticator};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Embedded MQTT 3.1.1 broker with per-device authentication"
)]
struct Args {
    /// Address devices connect to.
    #[arg(long, default_value = "127.0.0.1:1883", env = "BROKER_LISTEN")]
    listen: SocketAddr,
    /// File of `<device id> <sha256 hex of secret>` lines.
    #[arg(long, env = "BROKER_CREDENTIALS")]
    credentials: PathBuf,
    /// Most connections at once.
    #[arg(long, default_value_t = 20_000)]
    max_connections: usize,
}

fn main() -> anyhow::Result<()> {
    broker::init_logging("info,rumqttd=error,rumqttd::server::broker=off");
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.credentials)
        .with_context(|| format!("reading {}", args.credentials.display()))?;
    let auth = StaticAuthenticator::from_lines(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.credentials.display()))?;
    tracing::info!(devices = auth.len(), "credentials loaded");
    let settings = BrokerSettings {
        listen: args.listen,
        max_connections: args.max_connections,
        ..BrokerSettings::default()
    };
    let (broker, link) = EmbeddedBroker::start(&settings, Arc::new(auth))?;
    println!("broker listening on {}", broker.addr());
    // Nothing reads the in-process link here; drain it so the router never waits on it.
    let broker::BridgeLink { tx: _tx, mut rx } = link;
    loop {
        match rx.recv() {
            Ok(Some(Notification::Unschedule)) => rx.ready().context("broker link")?,
            Ok(_) => {}
            Err(e) => return Err(anyhow::anyhow!("broker link closed: {e}")),
        }
    }
}
