//! The fleet run's report: JSON for machines, a Markdown table for people, an SVG plot of
//! latency over time.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::procstat::ProcUsage;

/// Percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}

/// `part / whole`, or 0 when there is no whole.
pub fn share(part: u64, whole: u64) -> f64 {
    if whole > 0 {
        part as f64 / whole as f64
    } else {
        0.0
    }
}

/// A histogram of microseconds up to an hour, three significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds are valid")
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
    h.saturating_record(us);
}

/// CPU and memory of one process over the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessReport {
    pub name: String,
    pub pid: u32,
    pub cpu_secs: f64,
    /// CPU seconds per second of the run: 1.0 is one core busy.
    pub cpu_cores: f64,
    pub peak_rss_mb: f64,
    pub rss_mb: f64,
}

impl ProcessReport {
    pub fn new(
        name: &str,
        pid: u32,
        before: &ProcUsage,
        after: &ProcUsage,
        wall: Duration,
    ) -> ProcessReport {
        let cpu = after.cpu_since(before);
        ProcessReport {
            name: name.to_owned(),
            pid,
            cpu_secs: cpu,
            cpu_cores: cpu / wall.as_secs_f64().max(1e-9),
            peak_rss_mb: after.peak_rss_bytes as f64 / 1e6,
            rss_mb: after.rss_bytes as f64 / 1e6,
        }
    }
}

/// One second of the run: jobs submitted in it and their completion latency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Second {
    pub second: u64,
    pub submitted: u64,
    pub completion_p50_ms: f64,
    pub completion_p99_ms: f64,
}

impl Second {
    /// Second `second`, with `submitted` jobs whose completion latencies are in `h`.
    pub fn from_histogram(second: usize, submitted: u64, h: &Histogram<u64>) -> Second {
        let ms = |q: f64| {
            if h.is_empty() {
                0.0
            } else {
                h.value_at_quantile(q) as f64 / 1000.0
            }
        };
        Second {
            second: second as u64,
            submitted,
            completion_p50_ms: ms(0.5),
            completion_p99_ms: ms(0.99),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetReport {
    pub label: String,
    pub mode: String,
    pub devices: usize,
    pub devices_connected: usize,
    /// Time from the first device started to the last one connected.
    #[serde(default)]
    pub connect_secs: f64,
    /// Time the warm-up took (one job per device, not counted), if there was one.
    #[serde(default)]
    pub warmup_secs: Option<f64>,
    pub target_rate: f64,
    pub duration_secs: f64,
    pub jobs_submitted: u64,
    pub jobs_acknowledged: u64,
    pub jobs_refused: u64,
    pub jobs_completed: u64,
    /// Completed jobs per second, first submission to last completion.
    pub jobs_per_sec: f64,
    pub submit_to_hint: Latency,
    pub submit_to_fetch: Latency,
    pub submit_to_complete: Latency,
    /// Share of jobs fetched while their device's MQTT link was down: they came by long-poll
    /// or poll over the data channel.
    pub fallback_share: f64,
    /// Acknowledged jobs missing from the cloud's records, or that ended without being done
    /// (failed, expired, rejected, canceled).
    pub jobs_lost: u64,
    /// Acknowledged jobs still queued or running in the cloud when the drain window closed:
    /// an overload's backlog, kept durably, not lost.
    #[serde(default)]
    pub jobs_unfinished: u64,
    /// Jobs a device printed to the end more than once, or that the cloud recorded as
    /// completed more than once.
    pub jobs_duplicated: u64,
    /// Jobs started again after their device was killed mid-job (not duplicates: the first
    /// run never finished).
    pub jobs_rerun_after_crash: u64,
    /// Longest stretch without a completion while jobs were outstanding, in ms: the time to
    /// recover from a fault.
    pub longest_completion_gap_ms: f64,
    /// Data-channel requests the bridge served, per device-hour; `None` when the bridge
    /// restarted during the run (its counters start again at zero).
    pub server_requests_per_device_hour: Option<f64>,
    /// Data-channel connections (TCP + WebSocket handshake + authentication) per device-hour.
    pub server_connections_per_device_hour: Option<f64>,
    /// Hints merged into one already waiting for the same device (the bridge was busy).
    pub hints_coalesced: u64,
    pub events_lagged: u64,
    /// The devices' MQTT links: how many went down during the run, how many connections
    /// came up after one had been up (reconnects), the most any one device made, and when
    /// the last reconnect came up (unix ms; for a scenario that restarts the broker).
    #[serde(default)]
    pub mqtt: MqttChurn,
    /// With a final round (one job to every device after the run): how long until all were
    /// done.
    #[serde(default)]
    pub final_round_secs: Option<f64>,
    pub faults: Vec<String>,
    pub processes: Vec<ProcessReport>,
    pub per_second: Vec<Second>,
    /// Per-job timings, kept only when asked (a part of a multi-process run), for merging.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<Sample>,
}

/// How the devices' MQTT links came and went (see [`FleetReport::mqtt`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MqttChurn {
    pub downs: u64,
    pub reconnects: u64,
    pub most_reconnects_of_one_device: u64,
    /// Devices that reconnected more than once.
    pub devices_reconnected_twice: u64,
    pub last_reconnect_unix_ms: Option<u64>,
}

impl MqttChurn {
    fn merge(parts: &[&MqttChurn]) -> MqttChurn {
        MqttChurn {
            downs: parts.iter().map(|p| p.downs).sum(),
            reconnects: parts.iter().map(|p| p.reconnects).sum(),
            most_reconnects_of_one_device: parts
                .iter()
                .map(|p| p.most_reconnects_of_one_device)
                .max()
                .unwrap_or(0),
            devices_reconnected_twice: parts.iter().map(|p| p.devices_reconnected_twice).sum(),
            last_reconnect_unix_ms: parts.iter().filter_map(|p| p.last_reconnect_unix_ms).max(),
        }
    }
}

/// One job's timings, in microseconds from its submission.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Second of the run in which the job was submitted.
    pub second: u32,
    pub hint_us: Option<u64>,
    pub fetch_us: Option<u64>,
    pub complete_us: Option<u64>,
    pub via_fallback: bool,
}

impl FleetReport {
    /// One report from the reports of the processes of one run (each with its samples).
    /// Bridge-wide figures that every part measured over the same window (requests,
    /// connections, coalesced hints) are counted once.
    pub fn merge(label: &str, parts: &[FleetReport]) -> FleetReport {
        let k = parts.len().max(1) as f64;
        let devices: usize = parts.iter().map(|p| p.devices).sum();
        let sum = |f: fn(&FleetReport) -> u64| parts.iter().map(f).sum::<u64>();
        let per_device_hour = |f: fn(&FleetReport) -> Option<f64>| -> Option<f64> {
            let mut total = 0.0;
            for p in parts {
                total += f(p)? * p.devices as f64;
            }
            Some(total / (devices.max(1) as f64) / k)
        };
        let (mut hint, mut fetch, mut complete) = (histogram(), histogram(), histogram());
        let mut seconds: Vec<(u64, Histogram<u64>)> = Vec::new();
        let (mut fetched, mut fallback) = (0u64, 0u64);
        for s in parts.iter().flat_map(|p| &p.samples) {
            let us = |v: u64| Duration::from_micros(v);
            if let Some(v) = s.hint_us {
                record(&mut hint, us(v));
            }
            if let Some(v) = s.fetch_us {
                record(&mut fetch, us(v));
                fetched += 1;
                fallback += u64::from(s.via_fallback);
            }
            let i = s.second as usize;
            if seconds.len() <= i {
                seconds.resize_with(i + 1, || (0, histogram()));
            }
            seconds[i].0 += 1;
            if let Some(v) = s.complete_us {
                record(&mut complete, us(v));
                record(&mut seconds[i].1, us(v));
            }
        }
        let mut faults: Vec<String> = parts.iter().flat_map(|p| p.faults.clone()).collect();
        faults.dedup();
        FleetReport {
            label: label.to_owned(),
            mode: parts
                .first()
                .map(|p| format!("{}, {} processes", p.mode, parts.len()))
                .unwrap_or_default(),
            devices,
            devices_connected: parts.iter().map(|p| p.devices_connected).sum(),
            connect_secs: parts.iter().map(|p| p.connect_secs).fold(0.0, f64::max),
            warmup_secs: parts.iter().filter_map(|p| p.warmup_secs).reduce(f64::max),
            target_rate: parts.iter().map(|p| p.target_rate).sum(),
            duration_secs: parts.iter().map(|p| p.duration_secs).fold(0.0, f64::max),
            jobs_submitted: sum(|p| p.jobs_submitted),
            jobs_acknowledged: sum(|p| p.jobs_acknowledged),
            jobs_refused: sum(|p| p.jobs_refused),
            jobs_completed: sum(|p| p.jobs_completed),
            jobs_per_sec: parts.iter().map(|p| p.jobs_per_sec).sum(),
            submit_to_hint: Latency::from_histogram(&hint),
            submit_to_fetch: Latency::from_histogram(&fetch),
            submit_to_complete: Latency::from_histogram(&complete),
            fallback_share: share(fallback, fetched),
            jobs_lost: sum(|p| p.jobs_lost),
            jobs_unfinished: sum(|p| p.jobs_unfinished),
            jobs_duplicated: sum(|p| p.jobs_duplicated),
            jobs_rerun_after_crash: sum(|p| p.jobs_rerun_after_crash),
            // Each part sees only its own completions: the longest of their gaps bounds the run's.
            longest_completion_gap_ms: parts
                .iter()
                .map(|p| p.longest_completion_gap_ms)
                .fold(0.0, f64::max),
            server_requests_per_device_hour: per_device_hour(|p| p.server_requests_per_device_hour),
            server_connections_per_device_hour: per_device_hour(|p| {
                p.server_connections_per_device_hour
            }),
            hints_coalesced: (sum(|p| p.hints_coalesced) as f64 / k) as u64,
            events_lagged: sum(|p| p.events_lagged),
            mqtt: MqttChurn::merge(&parts.iter().map(|p| &p.mqtt).collect::<Vec<_>>()),
            final_round_secs: parts
                .iter()
                .filter_map(|p| p.final_round_secs)
                .reduce(f64::max),
            faults,
            processes: parts.iter().flat_map(|p| p.processes.clone()).collect(),
            per_second: seconds
                .iter()
                .enumerate()
                .map(|(i, (n, h))| Second::from_histogram(i, *n, h))
                .collect(),
            samples: Vec::new(),
        }
    }
}

impl FleetReport {
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "### {} ({})\n", self.label, self.mode);
        let _ = writeln!(s, "| measure | value |\n|---|---|");
        let row = |s: &mut String, k: &str, v: String| {
            let _ = writeln!(s, "| {k} | {v} |");
        };
        row(
            &mut s,
            "devices connected",
            format!(
                "{} of {} in {:.1} s",
                self.devices_connected, self.devices, self.connect_secs
            ),
        );
        if let Some(w) = self.warmup_secs {
            row(
                &mut s,
                "warm-up (one job per device, not counted)",
                format!("{w:.1} s"),
            );
        }
        row(
            &mut s,
            "target rate",
            format!(
                "{:.0} jobs/s for {:.0} s",
                self.target_rate, self.duration_secs
            ),
        );
        row(
            &mut s,
            "jobs submitted / acknowledged / completed",
            format!(
                "{} / {} / {}",
                self.jobs_submitted, self.jobs_acknowledged, self.jobs_completed
            ),
        );
        row(
            &mut s,
            "sustained",
            format!("{:.1} jobs/s", self.jobs_per_sec),
        );
        row(
            &mut s,
            "jobs lost / run twice",
            format!("{} / {}", self.jobs_lost, self.jobs_duplicated),
        );
        if self.jobs_unfinished > 0 {
            row(
                &mut s,
                "still queued or running when the drain ended (kept, not lost)",
                self.jobs_unfinished.to_string(),
            );
        }
        row(
            &mut s,
            "fetched with MQTT down (data-channel fallback)",
            format!("{:.1} %", self.fallback_share * 100.0),
        );
        let per_device_hour = |r: Option<f64>| {
            r.map_or_else(
                || "n/a (bridge restarted)".to_owned(),
                |r| format!("{r:.0}"),
            )
        };
        row(
            &mut s,
            "server requests per device-hour",
            per_device_hour(self.server_requests_per_device_hour),
        );
        row(
            &mut s,
            "server connections per device-hour",
            per_device_hour(self.server_connections_per_device_hour),
        );
        if self.jobs_refused > 0 {
            row(
                &mut s,
                "submissions refused (bridge down)",
                self.jobs_refused.to_string(),
            );
        }
        if self.jobs_rerun_after_crash > 0 {
            row(
                &mut s,
                "re-run after a device crash",
                self.jobs_rerun_after_crash.to_string(),
            );
        }
        if self.hints_coalesced > 0 || self.events_lagged > 0 {
            row(
                &mut s,
                "hints coalesced / events lagged",
                format!("{} / {}", self.hints_coalesced, self.events_lagged),
            );
        }
        for f in &self.faults {
            row(&mut s, "fault", f.clone());
        }
        let _ = writeln!(
            s,
            "\n| latency (ms) | count | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|"
        );
        for (name, l) in [
            ("submission → hint", &self.submit_to_hint),
            ("submission → payload fetched", &self.submit_to_fetch),
            ("submission → completion recorded", &self.submit_to_complete),
        ] {
            let _ = writeln!(
                s,
                "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
                l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
            );
        }
        if !self.processes.is_empty() {
            let _ = writeln!(
                s,
                "\n| process | CPU s | cores | peak RSS MB | RSS MB |\n|---|---|---|---|---|"
            );
            for p in &self.processes {
                let _ = writeln!(
                    s,
                    "| {} | {:.1} | {:.2} | {:.1} | {:.1} |",
                    p.name, p.cpu_secs, p.cpu_cores, p.peak_rss_mb, p.rss_mb
                );
            }
        }
        s
    }

    /// p50 and p99 of completion latency per second of submission time.
    pub fn to_svg(&self) -> String {
        let (w, h, pad) = (800.0, 320.0, 50.0);
        let max_x = self.per_second.len().max(1) as f64;
        let max_y = self
            .per_second
            .iter()
            .map(|s| s.completion_p99_ms)
            .fold(1.0_f64, f64::max)
            * 1.1;
        let point = |i: usize, v: f64| {
            let x = pad + (i as f64 / max_x) * (w - 2.0 * pad);
            let y = h - pad - (v / max_y) * (h - 2.0 * pad);
            format!("{x:.1},{y:.1}")
        };
        let line = |f: &dyn Fn(&Second) -> f64| {
            self.per_second
                .iter()
                .enumerate()
                .map(|(i, s)| point(i, f(s)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        format!(
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{pad}" y="20">{title}: submission → completion latency per second (ms)</text>
<line x1="{pad}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="black"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{y0}" stroke="black"/>
<text x="5" y="{ytop}">{max_y:.1}</text><text x="5" y="{y0}">0</text>
<text x="{x1}" y="{ylab}" text-anchor="end">{secs} s</text>
<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{p50}"/>
<polyline fill="none" stroke="#d62728" stroke-width="1.5" points="{p99}"/>
<text x="{legend}" y="40" fill="#1f77b4">p50</text><text x="{legend2}" y="40" fill="#d62728">p99</text>
</svg>
"##,
            title = self.label,
            y0 = h - pad,
            x1 = w - pad,
            ytop = pad + 4.0,
            ylab = h - pad + 20.0,
            secs = self.per_second.len(),
            p50 = line(&|s| s.completion_p50_ms),
            p99 = line(&|s| s.completion_p99_ms),
            legend = w - 150.0,
            legend2 = w - 110.0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_percentiles_come_from_the_histogram() {
        let mut h = histogram();
        for ms in 1..=100u64 {
            record(&mut h, Duration::from_millis(ms));
        }
        let l = Latency::from_histogram(&h);
        assert_eq!(l.count, 100);
        assert!((l.p50_ms - 50.0).abs() < 0.5, "{l:?}");
        assert!((l.p99_ms - 99.0).abs() < 0.5, "{l:?}");
        assert!((l.max_ms - 100.0).abs() < 0.5, "{l:?}");
    }

    #[test]
    fn merged_reports_count_jobs_once_and_latencies_from_all_samples() {
        let part = |us: u64, devices: usize| FleetReport {
            devices,
            devices_connected: devices,
            jobs_acknowledged: 2,
            jobs_completed: 2,
            server_requests_per_device_hour: Some(100.0),
            samples: vec![
                Sample {
                    second: 0,
                    hint_us: Some(us),
                    fetch_us: Some(us),
                    complete_us: Some(us),
                    via_fallback: false,
                },
                Sample {
                    second: 1,
                    hint_us: None,
                    fetch_us: Some(us),
                    complete_us: Some(us),
                    via_fallback: true,
                },
            ],
            ..Default::default()
        };
        let merged = FleetReport::merge("m", &[part(1_000, 10), part(9_000, 10)]);
        assert_eq!((merged.devices, merged.jobs_completed), (20, 4));
        assert_eq!(merged.submit_to_complete.count, 4);
        assert!((merged.submit_to_complete.max_ms - 9.0).abs() < 0.01);
        assert!((merged.fallback_share - 0.5).abs() < 1e-9);
        assert_eq!(merged.per_second.len(), 2);
        // Both parts measured the whole bridge: 100 per device-hour each is 50 for the run.
        assert_eq!(merged.server_requests_per_device_hour, Some(50.0));
        assert!(merged.samples.is_empty());
    }

    #[test]
    fn markdown_and_svg_render() {
        let report = FleetReport {
            label: "t".into(),
            per_second: vec![Second {
                second: 0,
                submitted: 1,
                completion_p50_ms: 1.0,
                completion_p99_ms: 2.0,
            }],
            ..Default::default()
        };
        assert!(
            report
                .to_markdown()
                .contains("| jobs lost / run twice | 0 / 0 |")
        );
        assert!(report.to_svg().starts_with("<svg"));
    }
}
