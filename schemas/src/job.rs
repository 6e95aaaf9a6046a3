//! The job lifecycle, shared by the cloud and the device.
//!
//! ```text
//! queued ──fetch──▶ delivered ──started──▶ in_progress ──▶ succeeded | failed | rejected
//!   ▲                   │                       │
//!   └──── lease lost (attempt counted) ◀────────┘      any non-terminal ──▶ canceled
//! queued | delivered ──ttl──▶ expired                  attempts exhausted ──▶ failed
//! any non-terminal ──device id invalidated──▶ rejected
//! ```

use serde::{Deserialize, Serialize};

use crate::UnixMillis;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Delivered,
    InProgress,
    Succeeded,
    Failed,
    Rejected,
    Canceled,
    Expired,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded
                | JobState::Failed
                | JobState::Rejected
                | JobState::Canceled
                | JobState::Expired
        )
    }

    /// Whether the lifecycle allows going from `self` to `to`.
    pub fn can_become(self, to: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, to),
            (Queued, Delivered | Canceled | Expired | Failed | Rejected)
                | (
                    Delivered,
                    InProgress | Succeeded | Failed | Rejected | Queued | Canceled | Expired
                )
                | (
                    InProgress,
                    Succeeded | Failed | Rejected | Queued | Canceled
                )
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Delivered => "delivered",
            JobState::InProgress => "in_progress",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Rejected => "rejected",
            JobState::Canceled => "canceled",
            JobState::Expired => "expired",
        }
    }
}

/// What a device reports about the attempt it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobUpdate {
    Started,
    /// Renews the lease.
    Progress {
        percent: u8,
    },
    Succeeded {
        detail: Option<String>,
    },
    Failed {
        reason: String,
    },
    /// The device will not run this job (unsupported, refused by the user).
    Rejected {
        reason: String,
    },
}

/// One step of a job's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Transition {
    pub from: Option<JobState>,
    pub to: JobState,
    pub at: UnixMillis,
    pub attempt: u32,
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::JobState::*;
    use super::*;

    const ALL: [JobState; 8] = [
        Queued, Delivered, InProgress, Succeeded, Failed, Rejected, Canceled, Expired,
    ];

    #[test]
    fn terminal_states_go_nowhere() {
        for from in ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in ALL {
                assert!(!from.can_become(to), "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn a_started_job_does_not_expire_by_ttl() {
        assert!(!InProgress.can_become(Expired));
        assert!(Delivered.can_become(Expired));
    }
}
