//! The sweeper: deletes finished jobs once their retention has ended, archiving them first
//! when the configuration names an archive (the rules are in `core/retention.rs`).
//!
//! Each sweep takes the finished jobs due in groups of [`SWEEP_BATCH`], oldest finish first:
//! a group is appended to the archive and synced to disk, then deleted from the store in one
//! batch. A crash between the two steps leaves the group in the store, so the next sweep
//! archives it again (the archive may hold a job twice; never none).

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

/// What is kept, and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    /// How long a finished job stays on disk; `None`: for ever.
    pub finished_jobs: Option<Duration>,
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
    let Some(keep) = retention.finished_jobs else {
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(retention.interval) => {}
        }
        let cutoff = bridge.now().saturating_sub_ms(keep.as_millis() as u64);
        let b = bridge.clone();
        let archive = retention.archive.clone();
        let swept =
            tokio::task::spawn_blocking(move || sweep(b.core(), cutoff, archive.as_deref())).await;
        let metrics = bridge.metrics();
        match swept {
            Ok(Ok((0, _))) => {}
            Ok(Ok((count, ticket))) => {
                if let Some(ticket) = ticket
                    && let Err(e) = bridge.committer().wait_durable(ticket).await
                {
                    tracing::error!(error = %e, "the sweep's deletions are not durable");
                    continue;
                }
                metrics
                    .jobs_swept
                    .fetch_add(count as u64, Ordering::Relaxed);
                tracing::info!(jobs = count, "finished jobs past retention deleted");
            }
            Ok(Err(e)) => {
                metrics.sweep_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "sweep failed; the jobs stay until the next one");
            }
            Err(e) => {
                metrics.sweep_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "sweep stopped");
            }
        }
    }
}

/// Deletes every job that finished before `cutoff` (archived first to `archive`): how many,
/// and the ticket of the last deletion.
pub fn sweep(
    core: &Core,
    cutoff: schemas::UnixMillis,
    archive: Option<&Path>,
) -> Result<(usize, Option<Ticket>), SweepError> {
    let mut count = 0;
    let mut ticket = None;
    loop {
        let due = core.finished_before(cutoff, SWEEP_BATCH)?;
        if due.is_empty() {
            break;
        }
        if let Some(path) = archive {
            append(core, path, &due)?;
        }
        ticket = Some(core.forget_finished(&due)?);
        count += due.len();
        if due.len() < SWEEP_BATCH {
            break;
        }
    }
    Ok((count, ticket))
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
        .append(true)
        .open(path)
        .map_err(failed)?;
    file.write_all(&lines).map_err(failed)?;
    file.sync_data().map_err(failed)
}
