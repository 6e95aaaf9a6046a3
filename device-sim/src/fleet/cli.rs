//! `device-sim fleet` on the command line: its arguments, the split over several processes
//! (each runs a share of the devices and writes a partial report, merged at the end), and the
//! report files.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use schemas::Secret;

#[derive(Debug, clap::Args)]
pub struct FleetArgs {
    /// Name of the run in the report and the file names.
    #[arg(long, default_value = "fleet")]
    pub label: String,
    /// Admin API of the cloud bridge.
    #[arg(
        long,
        env = "DEVICE_SIM_ADMIN_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub admin_url: String,
    /// File holding the admin token (as `cloud-bridge serve` writes it).
    #[arg(long, default_value = "data/admin-token")]
    pub admin_token_file: PathBuf,
    /// The admin token itself (instead of the file).
    #[arg(long, env = "DEVICE_SIM_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    #[arg(
        long,
        env = "DEVICE_SIM_DATA_URL",
        default_value = "ws://127.0.0.1:8081"
    )]
    pub data_url: String,
    #[arg(long, env = "DEVICE_SIM_MQTT", default_value = "127.0.0.1:1883")]
    pub mqtt: String,
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Jobs per second.
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    #[arg(long, default_value = "30s", value_parser = crate::duration::parse_duration)]
    pub duration: Duration,
    /// Devices started per second.
    #[arg(long, default_value_t = 500)]
    pub connect_rate: u32,
    /// Simulated print time per job.
    #[arg(long, default_value = "0ms", value_parser = crate::duration::parse_duration)]
    pub job_time: Duration,
    /// Poll only, every this often (no MQTT, no long-poll).
    #[arg(long, value_parser = crate::duration::parse_duration)]
    pub poll_only: Option<Duration>,
    /// Cut the MQTT link of this share of devices (0.1 = 10 %) ...
    #[arg(long)]
    pub cut_mqtt: Option<f64>,
    /// ... this long into the run ...
    #[arg(long, default_value = "10s", value_parser = crate::duration::parse_duration)]
    pub cut_at: Duration,
    /// ... for this long.
    #[arg(long, default_value = "60s", value_parser = crate::duration::parse_duration)]
    pub cut_for: Duration,
    /// Kill this share of devices, at --cut-at, and restart them after --cut-for.
    #[arg(long)]
    pub restart_devices: Option<f64>,
    /// The cloud bridge's process id, for its CPU and memory figures.
    #[arg(long)]
    pub bridge_pid: Option<u32>,
    /// Another process to measure, as name=pid (repeatable), e.g. mosquitto=1234.
    #[arg(long, value_parser = parse_watch)]
    pub watch_pid: Vec<(String, u32)>,
    /// Close an idle data channel after this long while MQTT is up.
    #[arg(long, default_value = "5s", value_parser = crate::duration::parse_duration)]
    pub data_idle_close: Duration,
    /// Where to write <label>.json, <label>.md and <label>.svg.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// Spread the devices and the rate over this many processes (a process holds at most
    /// ~9,000 devices under a 20,000 file-descriptor limit); their reports are merged.
    #[arg(long, default_value_t = 1)]
    pub processes: usize,
    /// Before measuring, send every device one job and wait until all are done (steady-state
    /// figures: a device's first job also pays for the broker's first publish to its topic and
    /// the agent's first data channel).
    #[arg(long)]
    pub warmup: bool,
    /// The bridge's retention archive (`retention.archive`): jobs its sweeper deleted are
    /// verified against their archived records (with a short retention the admin API no
    /// longer has them when the run ends).
    #[arg(long)]
    pub archive: Option<PathBuf>,
    /// After the run, send every device one more job and wait until all are done.
    #[arg(long)]
    pub final_round: bool,
    /// Internal: this process is one part of a multi-process run.
    #[arg(long, hide = true)]
    pub part: bool,
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
    if args.final_round {
        v.push("--final-round".into());
    }
    if let Some(a) = &args.archive {
        v.extend(["--archive".into(), a.display().to_string()]);
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
) -> anyhow::Result<super::report::FleetReport> {
    use super::procstat::ProcUsage;
    use super::report::{FleetReport, ProcessReport};
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

/// `device-sim fleet`: runs the fleet (in `args.processes` processes) and writes its report;
/// an error when any job was lost or run twice.
pub async fn run(args: FleetArgs) -> anyhow::Result<()> {
    use super::{Fault, FleetConfig};
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
    cfg.load.rate = args.rate;
    cfg.load.duration = args.duration;
    cfg.connect_rate = args.connect_rate;
    cfg.device.job_time = args.job_time;
    if let Some(interval) = args.poll_only {
        cfg.device.poll_interval = interval;
    }
    let fault = |share| Fault {
        share,
        at: args.cut_at,
        length: args.cut_for,
    };
    cfg.faults.cut_mqtt = args.cut_mqtt.map(fault);
    cfg.faults.restart_devices = args.restart_devices.map(fault);
    cfg.report.watch = args.watch_pid.clone();
    if let Some(pid) = args.bridge_pid {
        cfg.report.watch.insert(0, ("cloud-bridge".to_owned(), pid));
    }
    cfg.device.data_idle_close = args.data_idle_close;
    cfg.report.progress = !args.part;
    cfg.report.keep_samples = args.part;
    cfg.checks.warmup = args.warmup;
    cfg.checks.archive = args.archive.clone();
    cfg.checks.final_round = args.final_round;
    let report = super::run(cfg).await?;
    write_report(&args, &report)
}

fn write_report(args: &FleetArgs, report: &super::report::FleetReport) -> anyhow::Result<()> {
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
