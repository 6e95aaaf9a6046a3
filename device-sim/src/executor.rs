//! How a device runs a job. A device maker plugs in its print engine; the simulator uses
//! [`SimulatedExecutor`].

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use schemas::data::JobOffer;

use crate::consumables::Consumables;

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
}

impl Default for SimulatedExecutor {
    fn default() -> Self {
        SimulatedExecutor {
            duration: Duration::from_millis(50),
            fail_ratio: 0.0,
            consumables: None,
        }
    }
}

impl JobExecutor for SimulatedExecutor {
    fn run(&self, job: JobOffer) -> ExecFuture {
        let duration = self.duration;
        let fail = self.fail_ratio > 0.0 && rand::random::<f64>() < self.fail_ratio;
        let consumables = self.consumables.clone();
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
                JobOutcome::Succeeded {
                    detail: Some(format!("printed {} bytes", job.payload.len())),
                }
            }
        })
    }
}
