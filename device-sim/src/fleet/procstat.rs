//! CPU time and peak memory of a process, from Linux's /proc.

use serde::Serialize;

/// What a process used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ProcUsage {
    /// User plus system CPU time, seconds.
    pub cpu_secs: f64,
    /// Peak resident set size (VmHWM), bytes.
    pub peak_rss_bytes: u64,
    /// Current resident set size (VmRSS), bytes.
    pub rss_bytes: u64,
}

impl ProcUsage {
    /// Reads `/proc/<pid>`; `None` if the process is gone or this is not Linux.
    pub fn of(pid: u32) -> Option<ProcUsage> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name, which is in parentheses and may contain spaces.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        let ticks = 100.0; // USER_HZ on Linux
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kb = |key: &str| -> u64 {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        Some(ProcUsage {
            cpu_secs: (utime + stime) / ticks,
            peak_rss_bytes: kb("VmHWM:"),
            rss_bytes: kb("VmRSS:"),
        })
    }

    pub fn current() -> Option<ProcUsage> {
        ProcUsage::of(std::process::id())
    }

    /// CPU used between two readings.
    pub fn cpu_since(&self, earlier: &ProcUsage) -> f64 {
        (self.cpu_secs - earlier.cpu_secs).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let usage = ProcUsage::current().expect("Linux /proc");
        assert!(usage.peak_rss_bytes > 0 && usage.peak_rss_bytes >= usage.rss_bytes / 2);
        assert!(usage.cpu_secs >= 0.0);
    }
}
