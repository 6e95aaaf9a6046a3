//! `device-sim`: one simulated device with readable logs (`device`), or many in one process
//! (`run`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use device_sim::PrintSession;
use device_sim::consumables::Consumables;
use device_sim::counters::SimulatedCounters;
use device_sim::{
    AgentConfig, AgentEvent, DeviceInfo, FileStateStore, MemoryStateStore, SimulatedExecutor,
};
use schemas::data::{DeviceState, DeviceStatus, OwnerCheckReason, OwnerClaim};
use schemas::print::{Capabilities, HeldJobSummary};
use schemas::settings::Endpoints;
use schemas::{JobId, OwnerId, Secret, UserId};
use tokio::io::AsyncBufReadExt;
use tokio::sync::broadcast::error::RecvError;

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
    #[arg(
        long,
        env = "DEVICE_SIM_DATA_URL",
        default_value = "ws://127.0.0.1:8081",
        value_delimiter = ','
    )]
    data_url: Vec<String>,
    /// MQTT broker, host:port (mqtts://host:port for TLS); several, comma-separated, are
    /// tried in order.
    #[arg(
        long,
        env = "DEVICE_SIM_MQTT",
        default_value = "127.0.0.1:1883",
        value_delimiter = ','
    )]
    mqtt: Vec<String>,
    /// While a channel works through any endpoint but its first, how often to try the
    /// better ones again.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
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
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    job_time: Duration,
    /// Long-poll wait while MQTT is down.
    #[arg(long, default_value = "25s", value_parser = parse_duration)]
    long_poll: Duration,
    /// Accept poll-now nudges on the LAN at this address (e.g. 0.0.0.0:8883).
    #[arg(long)]
    lan_listen: Option<std::net::SocketAddr>,
    /// Regular poll interval (default: the cloud's schedule, a day unless configured there).
    #[arg(long, value_parser = parse_duration)]
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
        #[arg(long, default_value = "off", value_parser = parse_on_off)]
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
    Fleet(Box<FleetArgs>),
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

#[derive(Debug, clap::Args)]
struct FleetArgs {
    /// Name of the run in the report and the file names.
    #[arg(long, default_value = "fleet")]
    label: String,
    /// Admin API of the cloud bridge.
    #[arg(
        long,
        env = "DEVICE_SIM_ADMIN_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    admin_url: String,
    /// File holding the admin token (as `cloud-bridge serve` writes it).
    #[arg(long, default_value = "data/admin-token")]
    admin_token_file: PathBuf,
    /// The admin token itself (instead of the file).
    #[arg(long, env = "DEVICE_SIM_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    #[arg(
        long,
        env = "DEVICE_SIM_DATA_URL",
        default_value = "ws://127.0.0.1:8081"
    )]
    data_url: String,
    #[arg(long, env = "DEVICE_SIM_MQTT", default_value = "127.0.0.1:1883")]
    mqtt: String,
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Jobs per second.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Devices started per second.
    #[arg(long, default_value_t = 500)]
    connect_rate: u32,
    /// Simulated print time per job.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    job_time: Duration,
    /// Poll only, every this often (no MQTT, no long-poll).
    #[arg(long, value_parser = parse_duration)]
    poll_only: Option<Duration>,
    /// Cut the MQTT link of this share of devices (0.1 = 10 %) ...
    #[arg(long)]
    cut_mqtt: Option<f64>,
    /// ... this long into the run ...
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    cut_at: Duration,
    /// ... for this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    cut_for: Duration,
    /// Kill this share of devices, at --cut-at, and restart them after --cut-for.
    #[arg(long)]
    restart_devices: Option<f64>,
    /// The cloud bridge's process id, for its CPU and memory figures.
    #[arg(long)]
    bridge_pid: Option<u32>,
    /// Another process to measure, as name=pid (repeatable), e.g. mosquitto=1234.
    #[arg(long, value_parser = parse_watch)]
    watch_pid: Vec<(String, u32)>,
    /// Close an idle data channel after this long while MQTT is up.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    data_idle_close: Duration,
    /// Where to write <label>.json, <label>.md and <label>.svg.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Spread the devices and the rate over this many processes (a process holds at most
    /// ~9,000 devices under a 20,000 file-descriptor limit); their reports are merged.
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// Before measuring, send every device one job and wait until all are done (steady-state
    /// figures: a device's first job also pays for the broker's first publish to its topic and
    /// the agent's first data channel).
    #[arg(long)]
    warmup: bool,
    /// Internal: this process is one part of a multi-process run.
    #[arg(long, hide = true)]
    part: bool,
}

/// The command line of part `i` of `k`: its share of devices and rate, no progress bar, no
/// watched processes (the parent measures those over the whole run).
fn part_args(args: &FleetArgs, token: &str, i: usize, k: usize) -> Vec<String> {
    let devices = args.devices / k + usize::from(i < args.devices % k);
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let mut v: Vec<String> = vec![
        "fleet".into(),
        "--part".into(),
        "--label".into(),
        format!("{}-part-{i}", args.label),
        "--admin-url".into(),
        args.admin_url.clone(),
        "--admin-token".into(),
        token.to_owned(),
        "--data-url".into(),
        args.data_url.clone(),
        "--mqtt".into(),
        args.mqtt.clone(),
        "--devices".into(),
        devices.to_string(),
        "--rate".into(),
        (args.rate / k as f64).to_string(),
        "--duration".into(),
        ms(args.duration),
        "--connect-rate".into(),
        (args.connect_rate / k as u32).max(1).to_string(),
        "--job-time".into(),
        ms(args.job_time),
        "--cut-at".into(),
        ms(args.cut_at),
        "--cut-for".into(),
        ms(args.cut_for),
        "--data-idle-close".into(),
        ms(args.data_idle_close),
        "--out".into(),
        args.out.display().to_string(),
    ];
    if let Some(p) = args.poll_only {
        v.extend(["--poll-only".into(), ms(p)]);
    }
    if args.warmup {
        v.push("--warmup".into());
    }
    if let Some(c) = args.cut_mqtt {
        v.extend(["--cut-mqtt".into(), c.to_string()]);
    }
    if let Some(r) = args.restart_devices {
        v.extend(["--restart-devices".into(), r.to_string()]);
    }
    v
}

/// Runs `args.processes` parts as child processes and merges their reports.
async fn fleet_processes(
    args: &FleetArgs,
    token: &str,
) -> anyhow::Result<device_sim::fleet::report::FleetReport> {
    use device_sim::fleet::procstat::ProcUsage;
    use device_sim::fleet::report::{FleetReport, ProcessReport};
    let k = args.processes;
    let mut watch: Vec<(String, u32)> = args.watch_pid.clone();
    if let Some(pid) = args.bridge_pid {
        watch.insert(0, ("cloud-bridge".to_owned(), pid));
    }
    let before: Vec<ProcUsage> = watch
        .iter()
        .map(|(_, p)| ProcUsage::of(*p).unwrap_or_default())
        .collect();
    let started = std::time::Instant::now();
    let exe = std::env::current_exe().context("locating device-sim")?;
    let mut children = Vec::with_capacity(k);
    for i in 0..k {
        children.push(
            tokio::process::Command::new(&exe)
                .args(part_args(args, token, i, k))
                .stdout(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("starting a fleet process")?,
        );
    }
    let mut parts = Vec::with_capacity(k);
    for (i, mut child) in children.into_iter().enumerate() {
        let status = child.wait().await?;
        let path = args.out.join(format!("{}-part-{i}.json", args.label));
        let bytes =
            std::fs::read(&path).with_context(|| format!("part {i} wrote no report ({status})"))?;
        let mut part: FleetReport = serde_json::from_slice(&bytes)?;
        for p in &mut part.processes {
            p.name = format!("{} (part {i})", p.name);
        }
        parts.push(part);
        for ext in ["json", "md", "svg"] {
            let _ = std::fs::remove_file(path.with_extension(ext));
        }
    }
    let mut report = FleetReport::merge(&args.label, &parts);
    let wall = started.elapsed();
    for ((name, pid), before) in watch.iter().zip(&before) {
        if let Some(after) = ProcUsage::of(*pid) {
            report
                .processes
                .push(ProcessReport::new(name, *pid, before, &after, wall));
        }
    }
    Ok(report)
}

async fn fleet(args: FleetArgs) -> anyhow::Result<()> {
    use device_sim::fleet::{Fault, FleetConfig};
    let token = match args.admin_token.clone() {
        Some(t) => t,
        None => std::fs::read_to_string(&args.admin_token_file)
            .with_context(|| {
                format!(
                    "reading the admin token from {}",
                    args.admin_token_file.display()
                )
            })?
            .trim()
            .to_owned(),
    };
    if args.processes > 1 {
        let report = fleet_processes(&args, &token).await?;
        return write_report(&args, &report);
    }
    let mqtt = match args.poll_only {
        Some(_) => None,
        None => {
            let (host, port) = args
                .mqtt
                .rsplit_once(':')
                .context("--mqtt must be host:port")?;
            Some((host.to_owned(), port.parse().context("--mqtt port")?))
        }
    };
    let mut cfg = FleetConfig::new(&args.admin_url, Secret::new(token), &args.data_url, mqtt);
    cfg.label = args.label.clone();
    cfg.devices = args.devices;
    cfg.rate = args.rate;
    cfg.duration = args.duration;
    cfg.connect_rate = args.connect_rate;
    cfg.job_time = args.job_time;
    if let Some(interval) = args.poll_only {
        cfg.poll_interval = interval;
    }
    let fault = |share| Fault {
        share,
        at: args.cut_at,
        length: args.cut_for,
    };
    cfg.cut_mqtt = args.cut_mqtt.map(fault);
    cfg.restart_devices = args.restart_devices.map(fault);
    cfg.watch = args.watch_pid.clone();
    if let Some(pid) = args.bridge_pid {
        cfg.watch.insert(0, ("cloud-bridge".to_owned(), pid));
    }
    cfg.data_idle_close = args.data_idle_close;
    cfg.progress = !args.part;
    cfg.keep_samples = args.part;
    cfg.warmup = args.warmup;
    let report = device_sim::fleet::run(cfg).await?;
    write_report(&args, &report)
}

fn write_report(
    args: &FleetArgs,
    report: &device_sim::fleet::report::FleetReport,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let base = args.out.join(&args.label);
    std::fs::write(
        base.with_extension("json"),
        serde_json::to_vec_pretty(report)?,
    )?;
    std::fs::write(base.with_extension("md"), report.to_markdown())?;
    std::fs::write(base.with_extension("svg"), report.to_svg())?;
    println!("{}", report.to_markdown());
    eprintln!("report written to {}.{{json,md,svg}}", base.display());
    if report.jobs_lost > 0 || report.jobs_duplicated > 0 {
        anyhow::bail!(
            "{} jobs lost, {} run twice",
            report.jobs_lost,
            report.jobs_duplicated
        );
    }
    Ok(())
}

fn parse_watch(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s.split_once('=').ok_or("expected name=pid")?;
    Ok((
        name.to_owned(),
        pid.parse().map_err(|_| format!("bad pid in {s:?}"))?,
    ))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("bad duration unit in {s:?} (ms, s, m, h)")),
    }
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
                        parse_on_off(v).map_err(anyhow::Error::msg)?,
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
            let mut events = agent.subscribe();
            let status = DeviceStatus {
                state: DeviceState::Idle,
                detail: "ready".into(),
                observed_at: schemas::UnixMillis::now(),
            };
            agent.report_status(status).await?;
            let mut panel = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            let mut panel_open = true;
            let mut login: Option<PrintSession> = None;
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    line = panel.next_line(), if panel_open => match line {
                        Ok(Some(line)) => {
                            panel_command(&agent, &consumables, &mut login, &line).await
                        }
                        Ok(None) | Err(_) => panel_open = false,
                    },
                    event = events.recv() => match event {
                        Ok(event) => log_event(&event),
                        Err(RecvError::Lagged(n)) => tracing::warn!(skipped = n, "event log fell behind"),
                        Err(RecvError::Closed) => break,
                    },
                }
            }
            agent.stop().await?;
        }
        Command::Fleet(args) => fleet(*args).await?,
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

/// One command typed at the simulated panel.
/// The held jobs as the panel lists them, numbered from 1.
fn held_list(held: &[HeldJobSummary]) -> String {
    if held.is_empty() {
        return "no held jobs".into();
    }
    held.iter()
        .enumerate()
        .map(|(i, h)| format!("{:>2}. {} {}", i + 1, h.job_id, h.title))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn panel_command(
    agent: &device_sim::AgentHandle,
    consumables: &Consumables,
    login: &mut Option<PrintSession>,
    line: &str,
) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let result = match words.as_slice() {
        [] => return,
        ["login", user, pin] => match UserId::parse(user) {
            Ok(user) => agent.login(user, Secret::new(*pin)).await.map(|s| {
                let list = held_list(&s.held);
                *login = Some(s);
                format!("logged in\n{list}")
            }),
            Err(e) => Ok(e.to_string()),
        },
        ["held"] => match login.as_ref() {
            Some(s) => agent.held_jobs(s).await.map(|h| held_list(&h)),
            None => Ok("log in first: login <user id> <pin>".into()),
        },
        ["release", which @ ..] if !which.is_empty() => match login.as_ref() {
            Some(s) => match agent.held_jobs(s).await {
                Ok(held) => {
                    // `all`, numbers from `held`, or job ids.
                    let chosen: Vec<JobId> = if which == ["all"] {
                        held.iter().map(|h| h.job_id.clone()).collect()
                    } else {
                        which
                            .iter()
                            .filter_map(|w| match w.parse::<usize>() {
                                Ok(n) => held.get(n.wrapping_sub(1)).map(|h| h.job_id.clone()),
                                Err(_) => JobId::parse(w).ok(),
                            })
                            .collect()
                    };
                    if chosen.is_empty() {
                        Ok("nothing to release".into())
                    } else {
                        agent.release(s, chosen).await.map(|(released, refused)| {
                            let mut out = format!("released {}", released.len());
                            for (job, error) in refused {
                                out.push_str(&format!("\n{job}: {error}"));
                            }
                            out
                        })
                    }
                }
                Err(e) => Err(e),
            },
            None => Ok("log in first: login <user id> <pin>".into()),
        },
        ["logout"] => match login.take() {
            Some(s) => agent.logout(&s).await.map(|()| "logged out".into()),
            None => Ok("not logged in".into()),
        },
        ["consent"] => agent.consent().await.map(|c| match c {
            Some(c) => format!(
                "consent {} since {} (unix ms)",
                if c.granted { "on" } else { "off" },
                c.changed_at.0
            ),
            None => "consent not set".into(),
        }),
        ["consent", value] => match parse_on_off(value) {
            Ok(granted) => agent
                .set_consent(granted)
                .await
                .map(|c| format!("consent {}", if c.granted { "on" } else { "off" })),
            Err(e) => Ok(e),
        },
        ["status", state, detail @ ..] => {
            let state = match *state {
                "idle" => DeviceState::Idle,
                "busy" => DeviceState::Busy,
                "error" => DeviceState::Error,
                "sleeping" => DeviceState::Sleeping,
                other => {
                    println!("unknown state {other:?}: idle, busy, error or sleeping");
                    return;
                }
            };
            let status = DeviceStatus {
                state,
                detail: detail.join(" "),
                observed_at: schemas::UnixMillis::now(),
            };
            agent.report_status(status).await.map(|s| format!("{s:?}"))
        }
        ["request", action, params @ ..] => {
            let params = params
                .iter()
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    None => (p.to_string(), String::new()),
                })
                .collect();
            agent
                .panel_request(*action, params)
                .await
                .map(|s| format!("{s:?}"))
        }
        ["poll"] => agent.poll_now().await.map(|()| "polling".into()),
        ["counters"] => agent.report_counters().await.map(|s| format!("{s:?}")),
        ["cartridges"] => Ok(consumables
            .cartridges()
            .iter()
            .map(|c| format!("{} {} {}%", c.colour, c.cartridge_type, c.level))
            .collect::<Vec<_>>()
            .join("\n")),
        ["replace", colour] => {
            consumables.replace(colour);
            Ok(format!("{colour} replaced"))
        }
        ["support", service, value] => match parse_on_off(value) {
            Ok(on) => agent
                .set_support_service(*service, on)
                .await
                .map(|()| format!("{service} {}", if on { "enabled" } else { "disabled" })),
            Err(e) => Ok(e),
        },
        ["settings"] => agent.settings_in_use().await.map(|s| {
            let or_none = |e: Option<String>| e.unwrap_or_else(|| "not connected".into());
            format!(
                "settings revision {} (0: factory)\n  data channel: {} (in use: {})\n  \
                 notification: {} (in use: {})",
                s.revision,
                s.endpoints.data.join(", "),
                or_none(s.data_in_use),
                s.endpoints.mqtt.join(", "),
                or_none(s.mqtt_in_use),
            )
        }),
        ["reset"] => agent
            .owner_check_required(OwnerCheckReason::FactoryReset)
            .await
            .map(|()| "reset: the owner must confirm (`owner <owner id> <pin>`)".into()),
        ["timezone", tz] => agent
            .owner_check_required(OwnerCheckReason::TimeZoneChanged {
                time_zone: tz.to_string(),
            })
            .await
            .map(|()| "time zone changed: the owner must confirm".into()),
        ["network", name] => agent
            .owner_check_required(OwnerCheckReason::NetworkChanged {
                network: name.to_string(),
            })
            .await
            .map(|()| "network changed: the owner must confirm".into()),
        ["owner", id, pin] => match OwnerId::parse(id) {
            Ok(owner_id) => agent
                .confirm_owner(OwnerClaim {
                    owner_id,
                    pin: Secret::new(*pin),
                })
                .await
                .map(|()| "owner confirmed".into()),
            Err(e) => Ok(e.to_string()),
        },
        _ => Ok(
            "commands: consent [on|off] | status idle|busy|error|sleeping [detail] | \
                 request <action> [key=value ...] | poll | counters | settings | cartridges | \
                 login <user id> <pin> | held | release all|<n>... | logout | \
                 replace <colour> | support <service> on|off | reset | timezone <tz> | \
                 network <name> | owner <owner id> <pin>"
                .into(),
        ),
    };
    match result {
        Ok(answer) => println!("{answer}"),
        Err(e) => println!("error: {e}"),
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        other => Err(format!("{other:?}: expected on or off")),
    }
}

fn log_event(event: &AgentEvent) {
    match event {
        AgentEvent::Registered(id) => tracing::info!(device = %id, "registered"),
        AgentEvent::MqttUp { endpoint } => tracing::info!(%endpoint, "notification channel up"),
        AgentEvent::MqttDown(reason) => {
            tracing::warn!(%reason, "notification channel down; long-polling the data channel")
        }
        AgentEvent::MqttRefused(reason) => {
            tracing::error!(%reason, "notification channel refused; using the data channel only")
        }
        AgentEvent::DataUp { endpoint } => tracing::info!(%endpoint, "data channel up"),
        AgentEvent::SettingsApplied { revision } => {
            tracing::info!(revision, "server settings applied; reconnecting with them")
        }
        AgentEvent::SettingsReported { revision } => {
            tracing::info!(revision, "settings in use reported to the cloud")
        }
        AgentEvent::DataDown(reason) => tracing::info!(%reason, "data channel closed"),
        AgentEvent::HintReceived { kind, seq } => tracing::info!(?kind, %seq, "hint received"),
        AgentEvent::Synced { cursor } => tracing::info!(%cursor, "feed synced"),
        AgentEvent::JobFetched { job_id, attempt } => {
            tracing::info!(%job_id, attempt, "job fetched")
        }
        AgentEvent::JobStarted { job_id, attempt } => {
            tracing::info!(%job_id, attempt, "job started")
        }
        AgentEvent::JobFinished {
            job_id, outcome, ..
        } => tracing::info!(%job_id, ?outcome, "job finished"),
        AgentEvent::JobReported { job_id } => tracing::info!(%job_id, "outcome reported"),
        AgentEvent::JobCanceled { job_id } => tracing::warn!(%job_id, "job canceled while running"),
        AgentEvent::OwnerCheckStarted { deadline: Some(d) } => tracing::warn!(
            deadline = d.0,
            "owner must confirm at the panel (`owner <owner id> <pin>`)"
        ),
        AgentEvent::OwnerCheckStarted { deadline: None } => {
            tracing::info!("no owner bound; nothing to confirm")
        }
        AgentEvent::OwnerConfirmed => tracing::info!("owner confirmed"),
        AgentEvent::Invalidated { reason } => {
            tracing::error!(%reason, "device id invalidated; registering again")
        }
        AgentEvent::RequestDelivered { no, kind } => tracing::info!(%no, kind, "request delivered"),
        AgentEvent::RequestRefused { no, error } => tracing::warn!(%no, %error, "request refused"),
        AgentEvent::InstructionTaken {
            instruction_id,
            kind,
        } => tracing::info!(%instruction_id, kind, "instruction taken"),
        AgentEvent::InstructionSkipped {
            instruction_id,
            error,
        } => tracing::warn!(%instruction_id, %error, "instruction skipped"),
        AgentEvent::CustomInstruction { name, params, .. } => {
            tracing::info!(name, ?params, "instruction for the device")
        }
        AgentEvent::ServiceRegistered { service_id } => {
            tracing::info!(service_id, "registered for service")
        }
        AgentEvent::NudgeAccepted { nudge_id, delay_ms } => {
            tracing::info!(nudge_id, delay_ms, "poll-now nudge accepted and passed on")
        }
        AgentEvent::NudgeRefused { reason } => tracing::warn!(%reason, "nudge refused"),
        AgentEvent::HeldJobsChanged { user_id } => {
            tracing::info!(%user_id, "new held jobs for the user logged in (`held`)")
        }
        AgentEvent::SupportActivated {
            service_id,
            data_types,
        } => tracing::info!(service_id, ?data_types, "support service active"),
        AgentEvent::SupportDeactivated { service_id } => {
            tracing::info!(service_id, "support service no longer active")
        }
        AgentEvent::TelemetryQueued {
            service_id,
            data_types,
        } => tracing::info!(service_id, ?data_types, "telemetry queued"),
        AgentEvent::ServiceRefused { service_id, error } => {
            tracing::warn!(service_id, %error, "service registration refused")
        }
    }
}
