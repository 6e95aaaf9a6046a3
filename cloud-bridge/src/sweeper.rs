//! The sweeper: deletes finished jobs once their retention has ended, archiving them first
//! when the configuration names an archive (the rules are in `core/retention.rs`).
//!
//! Each sweep takes the finished jobs due in groups of [`SWEEP_BATCH`], oldest finish first:
//! a group is appended to the archive and synced to disk, then deleted from the store in one
//! batch. A crash between the two steps leaves the group in the store, so the next sweep
//! archives it again (the archive may hold a job twice; never none). A crash in the middle of
//! an append leaves a line cut short at the end, which the next append cuts off first.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::bridge::Bridge;
use crate::core::{Core, CoreError};
use crate::store::Ticket;

/// Jobs deleted per batch.
pub const SWEEP_BATCH: usize = 256;

/// What is kept, and for how long (`None`: for ever).
#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    /// A finished job, after it finished.
    pub finished_jobs: Option<Duration>,
    /// An accepted outbox request, after it was received.
    pub device_requests: Option<Duration>,
    /// Applications after their codes expired, instructions taken or expired, held jobs
    /// released or expired (see `Core::forget_settled`).
    pub settled: Option<Duration>,
    /// The console's audit trail, after the change was asked for.
    pub console_actions: Option<Duration>,
    /// Where jobs are appended before they are deleted.
    pub archive: Option<PathBuf>,
    /// How often to sweep.
    pub interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("archive {path}: {source}")]
    Archive {
        path: String,
        source: std::io::Error,
    },
}

/// Sweeps every `retention.interval` until `shutdown`.
pub async fn run(bridge: Bridge, retention: Retention, shutdown: CancellationToken) {
    let kept = [
        retention.finished_jobs,
        retention.device_requests,
        retention.settled,
        retention.console_actions,
    ];
    if kept.iter().all(Option::is_none) {
        return;
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(retention.interval) => {}
        }
        let (b, r) = (bridge.clone(), retention.clone());
        let swept = tokio::task::spawn_blocking(move || sweep(b.core(), b.now(), &r)).await;
        let metrics = bridge.metrics();
        match swept {
            Ok(Ok(Swept { ticket: None, .. })) => {}
            Ok(Ok(swept)) => {
                if let Some(ticket) = swept.ticket
                    && let Err(e) = bridge.committer().wait_durable(ticket).await
                {
                    tracing::error!(error = %e, "the sweep's deletions are not durable");
                    continue;
                }
                let jobs = swept.jobs as u64;
                metrics.jobs_swept.fetch_add(jobs, Ordering::Relaxed);
                tracing::info!(
                    jobs,
                    requests = swept.requests,
                    settled = swept.settled,
                    console_actions = swept.console_actions,
                    "records past retention deleted"
                );
            }
            Ok(Err(e)) => {
                metrics.sweep_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "sweep failed; what was due stays until the next");
            }
            Err(e) => {
                metrics.sweep_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "sweep stopped");
            }
        }
    }
}

/// What one sweep deleted, and the ticket of its last deletion (none: nothing was due).
#[derive(Debug, Default)]
pub struct Swept {
    pub jobs: usize,
    pub requests: usize,
    pub settled: usize,
    pub console_actions: usize,
    pub ticket: Option<Ticket>,
}

/// Deletes everything whose retention has ended by `now`: finished jobs (archived first when
/// `retention.archive` is set), accepted outbox requests, settled records, and the console's
/// audit trail.
pub fn sweep(
    core: &Core,
    now: schemas::UnixMillis,
    retention: &Retention,
) -> Result<Swept, SweepError> {
    let cutoff = |keep: Duration| now.saturating_sub_ms(keep.as_millis() as u64);
    let mut swept = Swept::default();
    if let Some(keep) = retention.finished_jobs {
        loop {
            let due = core.finished_before(cutoff(keep), SWEEP_BATCH)?;
            if due.is_empty() {
                break;
            }
            if let Some(path) = &retention.archive {
                append(core, path, &due)?;
            }
            swept.ticket = Some(core.forget_finished(&due)?);
            swept.jobs += due.len();
            if due.len() < SWEEP_BATCH {
                break;
            }
        }
    }
    if let Some(keep) = retention.device_requests {
        loop {
            let due = core.requests_before(cutoff(keep), SWEEP_BATCH)?;
            let n = due.len();
            if n == 0 {
                break;
            }
            swept.ticket = Some(core.forget_requests(due)?);
            swept.requests += n;
            if n < SWEEP_BATCH {
                break;
            }
        }
    }
    if let Some(keep) = retention.settled {
        loop {
            let (n, ticket) = core.forget_settled(cutoff(keep), now, SWEEP_BATCH)?;
            if n == 0 {
                break;
            }
            swept.ticket = Some(ticket);
            swept.settled += n;
            if n < SWEEP_BATCH {
                break;
            }
        }
    }
    if let Some(keep) = retention.console_actions {
        loop {
            let (n, ticket) = core.forget_console_actions(cutoff(keep), SWEEP_BATCH)?;
            if let Some(ticket) = ticket {
                swept.ticket = Some(ticket);
            }
            swept.console_actions += n;
            if n < SWEEP_BATCH {
                break;
            }
        }
    }
    Ok(swept)
}

/// Appends the jobs (with their payloads) to the archive and syncs it to disk.
fn append(core: &Core, path: &Path, due: &[crate::core::FinishedJob]) -> Result<(), SweepError> {
    let failed = |source| SweepError::Archive {
        path: path.display().to_string(),
        source,
    };
    let mut lines = Vec::new();
    for job in due.iter().filter_map(|f| f.job.clone()) {
        let payload = core.stored_payload(&job.job_id)?.unwrap_or_default();
        let line = crate::export::job_line(job, &payload)
            .map_err(|e| failed(std::io::Error::other(e.to_string())))?;
        lines.extend(line);
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .map_err(failed)?;
    drop_torn_tail(&mut file).map_err(failed)?;
    file.write_all(&lines).map_err(failed)?;
    file.sync_data().map_err(failed)
}

/// Cuts off a last line that a crash left unfinished (every complete line ends in `\n`). It
/// belongs to an append that was never synced, so its jobs are still in the store and are
/// archived again; without the cut, the next append would run on from the torn fragment.
fn drop_torn_tail(file: &mut std::fs::File) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let len = file.metadata()?.len();
    let mut end = len;
    let mut chunk = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let part = &mut chunk[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(part)?;
        if let Some(i) = part.iter().rposition(|b| *b == b'\n') {
            end = start + i as u64 + 1;
            break;
        }
        end = start;
    }
    if end < len {
        tracing::warn!(
            bytes = len - end,
            "archive: a line cut short by a crash is dropped"
        );
        file.set_len(end)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn cut(content: &[u8]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("archive.jsonl");
        std::fs::write(&path, content).unwrap();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .unwrap();
        drop_torn_tail(&mut file).unwrap();
        file.write_all(b"next\n").unwrap();
        std::fs::read(&path).unwrap()
    }

    #[test]
    fn a_line_cut_short_is_dropped_before_the_next_append() {
        assert_eq!(cut(b""), b"next\n");
        assert_eq!(cut(b"a\nb\n"), b"a\nb\nnext\n");
        assert_eq!(cut(b"a\nb\n{\"type\":\"jo"), b"a\nb\nnext\n");
        assert_eq!(cut(b"{\"type\""), b"next\n");
        // A torn line longer than one read back.
        let mut long = b"a\n".to_vec();
        long.extend(std::iter::repeat_n(b'x', 200_000));
        assert_eq!(cut(&long), b"a\nnext\n");
    }
}
