//! `device-sim`: one simulated device with readable logs (`device`), or many in one process
//! (`run`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use device_sim::consumables::Consumables;
use device_sim::counters::SimulatedCounters;
use device_sim::{AgentConfig, DeviceInfo, FileStateStore, MemoryStateStore, SimulatedExecutor};
use schemas::data::{DeviceState, DeviceStatus, OwnerClaim};
use schemas::print::Capabilities;
use schemas::settings::Endpoints;
use schemas::{OwnerId, Secret};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Simulated printers and MFPs running the device agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct Common {
    /// Data channel of the cloud bridge; several, comma-separated, are tried in order (the
    /// first that answers is used, the better ones tried again in the background).
    #[arg(long, env = "DEVICE_SIM_DATA_URL", value_delimiter = ',')]
    #[arg(default_value = "ws://127.0.0.1:8081")]
    data_url: Vec<String>,
    /// MQTT broker, host:port (mqtts://host:port for TLS); several, comma-separated, are
    /// tried in order.
    #[arg(long, env = "DEVICE_SIM_MQTT", value_delimiter = ',')]
    #[arg(default_value = "127.0.0.1:1883")]
    mqtt: Vec<String>,
    /// While a channel works through any endpoint but its first, how often to try the
    /// better ones again.
    #[arg(long, default_value = "60s", value_parser = device_sim::duration::parse_duration)]
    probe_interval: Duration,
    /// Poll only; no MQTT notification channel.
    #[arg(long)]
    no_mqtt: bool,
    /// Enrollment token for registration (needed until the device has credentials). Prefer
    /// the environment variable: a command line is visible to every user (ps).
    #[arg(long, env = "DEVICE_SIM_ENROLLMENT_TOKEN", hide_env_values = true)]
    enrollment_token: Option<String>,
    /// CA certificate (PEM) that wss:// and mqtts:// servers are verified against (default:
    /// the system's roots); `cloud-bridge tls init` writes one to <data_dir>/tls/ca.pem.
    #[arg(long, env = "DEVICE_SIM_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Device model.
    #[arg(long, default_value = "MFP-4000")]
    model: String,
    #[arg(long, default_value = "EU")]
    destination: String,
    #[arg(long, default_value = "Europe/Berlin")]
    time_zone: String,
    /// Simulated time to run one job.
    #[arg(long, default_value = "200ms", value_parser = device_sim::duration::parse_duration)]
    job_time: Duration,
    /// Long-poll wait while MQTT is down.
    #[arg(long, default_value = "25s", value_parser = device_sim::duration::parse_duration)]
    long_poll: Duration,
    /// Accept poll-now nudges on the LAN at this address (e.g. 0.0.0.0:8883).
    #[arg(long)]
    lan_listen: Option<std::net::SocketAddr>,
    /// Regular poll interval (default: the cloud's schedule, a day unless configured there).
    #[arg(long, value_parser = device_sim::duration::parse_duration)]
    poll_interval: Option<Duration>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one device whose state lives in --state-dir, with readable logs. Its panel reads
    /// commands from standard input (type `help`).
    Device {
        #[command(flatten)]
        common: Common,
        /// Directory of the device's state (credentials, cursor, outcomes, outbox, consent).
        #[arg(long, default_value = "device-state")]
        state_dir: PathBuf,
        #[arg(long, default_value = "SN-0001")]
        serial: String,
        /// Owner bound at registration (with --owner-pin).
        #[arg(long, requires = "owner_pin")]
        owner_id: Option<OwnerId>,
        /// The owner's PIN, asked again after a reset or relocation.
        #[arg(long, env = "DEVICE_SIM_OWNER_PIN", hide_env_values = true)]
        owner_pin: Option<String>,
        /// Permission to send device information chosen at set-up (first start only; change
        /// it later at the panel with `consent on|off`).
        #[arg(long, default_value = "off", value_parser = device_sim::panel::parse_on_off)]
        consent: bool,
        /// A support service the device knows, enabled (`toner`) or not (`toner=off`);
        /// repeatable. Change it later at the panel with `support <service> on|off`.
        #[arg(long = "support")]
        support: Vec<String>,
        /// The printer prints one side only (its queue says so; duplex jobs are refused).
        #[arg(long)]
        simplex: bool,
        /// The printer prints in black only.
        #[arg(long)]
        mono: bool,
    },
    /// Run N devices with a job generator and faults, and report latency and throughput.
    Fleet(Box<device_sim::fleet::cli::FleetArgs>),
    /// Run N devices in this process, state in memory.
    Run {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 10)]
        devices: usize,
        /// Devices started per second.
        #[arg(long, default_value_t = 200)]
        connect_rate: u32,
    },
}

fn config(common: &Common, serial: String) -> anyhow::Result<AgentConfig> {
    let endpoints = Endpoints {
        data: common.data_url.clone(),
        mqtt: if common.no_mqtt {
            Vec::new()
        } else {
            common.mqtt.clone()
        },
    };
    endpoints.validate().context("--data-url / --mqtt")?;
    let info = DeviceInfo {
        serial,
        model: common.model.clone(),
        destination: common.destination.clone(),
        time_zone: common.time_zone.clone(),
    };
    let mut config = AgentConfig::new(String::new(), None, info);
    config.endpoints = endpoints;
    config.probe_interval = common.probe_interval;
    config.lan_listen = common.lan_listen;
    config.enrollment_token = common.enrollment_token.clone().map(Secret::new);
    config.ca_file = common.ca_file.clone();
    config.long_poll = common.long_poll;
    config.poll_interval = common.poll_interval;
    Ok(config)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // A fleet's thousands of agents would drown the log at info.
    let default_filter = match cli.command {
        Command::Fleet(_) => "warn,device_sim::fleet=info",
        _ => "info,rumqttc=warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .init();
    match cli.command {
        Command::Device {
            common,
            state_dir,
            serial,
            consent,
            owner_id,
            owner_pin,
            support,
            simplex,
            mono,
        } => {
            // A colour printer whose cartridges drain as it prints (panel: `replace <colour>`).
            let consumables = Consumables::colour_printer();
            let counters = Arc::new(SimulatedCounters::default());
            let executor = Arc::new(SimulatedExecutor {
                duration: common.job_time,
                fail_ratio: 0.0,
                consumables: Some(consumables.clone()),
                counters: Some(counters.clone()),
            });
            let mut config = config(&common, serial)?;
            config.readings = Some(Arc::new(consumables.clone()));
            config.counters = Some(counters);
            config.printer = Some(Capabilities {
                media_sizes: vec!["A4".into(), "Letter".into(), "A5".into()],
                color: !mono,
                duplex: !simplex,
                resolutions_dpi: vec![300, 600],
                finishing: vec!["staple".into()],
                max_copies: 999,
            });
            for s in support {
                let (name, on) = match s.split_once('=') {
                    Some((name, v)) => (
                        name.to_owned(),
                        device_sim::panel::parse_on_off(v).map_err(anyhow::Error::msg)?,
                    ),
                    None => (s, true),
                };
                config.support_services.insert(name, on);
            }
            config.consent_at_setup = consent;
            config.owner = owner_id.zip(owner_pin).map(|(owner_id, pin)| OwnerClaim {
                owner_id,
                pin: Secret::new(pin),
            });
            let agent = device_sim::start(config, executor, FileStateStore::new(state_dir));
            let status = DeviceStatus {
                state: DeviceState::Idle,
                detail: "ready".into(),
                observed_at: schemas::UnixMillis::now(),
            };
            if let Err(e) = agent.report_status(status).await {
                // The agent has ended (a refused registration, say): its own error says why.
                return Err(agent.stop().await.err().unwrap_or(e).into());
            }
            device_sim::panel::run(&agent, &consumables).await;
            agent.stop().await?;
        }
        Command::Fleet(args) => device_sim::fleet::cli::run(*args).await?,
        Command::Run {
            common,
            devices,
            connect_rate,
        } => {
            let executor = Arc::new(SimulatedExecutor {
                duration: common.job_time,
                ..SimulatedExecutor::default()
            });
            let pause = Duration::from_secs_f64(1.0 / f64::from(connect_rate.max(1)));
            let mut agents = Vec::with_capacity(devices);
            for i in 0..devices {
                let config = config(&common, format!("SIM-{i:06}"))?;
                agents.push(device_sim::start(
                    config,
                    executor.clone(),
                    MemoryStateStore::default(),
                ));
                // Pace connections: the embedded broker accepts about 1,000 per second.
                tokio::time::sleep(pause).await;
            }
            println!("{devices} devices started; Ctrl-C to stop");
            tokio::signal::ctrl_c().await?;
            for agent in agents {
                agent.stop().await?;
            }
        }
    }
    Ok(())
}
