//! How a device runs a job. A device maker plugs in its print engine; the simulator uses
//! [`SimulatedExecutor`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use schemas::data::JobOffer;

use crate::consumables::Consumables;
use crate::counters::SimulatedCounters;

/// The result of running a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    Succeeded {
        detail: Option<String>,
    },
    Failed {
        reason: String,
    },
    /// The device will not run this job (unsupported format, refused at the panel).
    Rejected {
        reason: String,
    },
}

pub type ExecFuture = Pin<Box<dyn Future<Output = JobOutcome> + Send>>;

/// Runs jobs. The agent drops the future when the job is canceled.
pub trait JobExecutor: Send + Sync + 'static {
    fn run(&self, job: JobOffer) -> ExecFuture;
}

/// Takes `duration` per job and succeeds; fails a share of jobs if asked. With consumables,
/// each successful job drains them.
#[derive(Debug, Clone)]
pub struct SimulatedExecutor {
    pub duration: Duration,
    pub fail_ratio: f64,
    pub consumables: Option<Consumables>,
    /// Counts each page printed (copies × 1 page, colour and media as the job asks).
    pub counters: Option<Arc<SimulatedCounters>>,
}

impl Default for SimulatedExecutor {
    fn default() -> Self {
        SimulatedExecutor {
            duration: Duration::from_millis(50),
            fail_ratio: 0.0,
            consumables: None,
            counters: None,
        }
    }
}

impl JobExecutor for SimulatedExecutor {
    fn run(&self, job: JobOffer) -> ExecFuture {
        let duration = self.duration;
        let fail = self.fail_ratio > 0.0 && rand::random::<f64>() < self.fail_ratio;
        let consumables = self.consumables.clone();
        let counters = self.counters.clone();
        Box::pin(async move {
            // Simulated printing time.
            tokio::time::sleep(duration).await;
            if fail {
                JobOutcome::Failed {
                    reason: "simulated paper jam".into(),
                }
            } else {
                if let Some(c) = consumables {
                    c.printed();
                }
                if let Some(counters) = counters {
                    let print = job.print.clone().unwrap_or_default();
                    let media = print.media_size.as_deref().unwrap_or("A4");
                    for _ in 0..print.copies.unwrap_or(1) {
                        counters.count_page(print.color == Some(true), media);
                    }
                }
                JobOutcome::Succeeded {
                    detail: Some(format!("printed {} bytes", job.payload.len())),
                }
            }
        })
    }
}
