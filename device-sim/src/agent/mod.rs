//! The device agent: what a device maker embeds.
//!
//! One task owns the agent's state and decides when to talk to the cloud. Triggers to sync the
//! feed: start-up, a hint on MQTT, a status change, a poll-now, the regular poll timer, and,
//! while MQTT is down, a long-poll on the data channel (the server answers as soon as the feed
//! grows). When even the data channel cannot be reached, it retries with exponential backoff
//! and jitter up to `slow_poll` (slow polling).
//!
//! A hint is written to disk when it arrives and cleared when a sync has reached the end of
//! the feed, so a device that restarts in between fetches at once instead of waiting for
//! another hint or its regular poll.
//!
//! Requests the device makes on its own (status, consent changes, panel job requests) go to a
//! durable outbox ([`crate::outbox`]) and are delivered in order whenever the data channel is
//! up; the cloud acts on each number once. Device information leaves only with the user's
//! consent, which is kept on the device and can be changed offline.
//!
//! Exactly once on the device: a job's outcome is written to disk before it is reported, and a
//! job found in that list is never run again; an unreported outcome is reported again instead
//! (taking the job again first if its lease was lost meanwhile).

mod config;
mod events;
mod handle;
mod instructions;
mod jobs;
mod links;
mod rounds;
mod run;
mod settings;
mod telemetry;

pub use config::{AgentConfig, DeviceInfo};
pub use events::{AgentError, AgentEvent};
use handle::Command;
pub use handle::{AgentHandle, PrintSession, start};

use std::collections::HashMap;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};

use pacing::Backoff;
use schemas::DeviceId;
use schemas::agent::AgentState;
use schemas::data::Welcome;
use schemas::settings::SettingsReport;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::executor::JobExecutor;
use crate::lan::NudgeCheck;
use crate::mqtt::LinkEvent;
use crate::session::{DataSession, SessionError};
use crate::state::{StateError, StateStore};

/// Why the main loop ended.
enum Exit {
    Stopped,
    Invalidated(String),
}

/// Aborts a task when dropped, so a killed agent takes its links down with it.
#[derive(Debug)]
struct AbortOnDrop<T>(Option<JoinHandle<T>>);

impl<T> AbortOnDrop<T> {
    fn new(task: JoinHandle<T>) -> Self {
        AbortOnDrop(Some(task))
    }

    /// Lets the task run on by itself.
    fn detach(mut self) {
        self.0 = None;
    }

    async fn join(&mut self) -> Option<T> {
        match self.0.as_mut() {
            Some(task) => task.await.ok(),
            None => std::future::pending().await,
        }
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// The running notification link.
struct MqttLink {
    events: mpsc::Receiver<LinkEvent>,
    stop: CancellationToken,
    task: AbortOnDrop<()>,
}

impl MqttLink {
    /// Stops the link cleanly (DISCONNECT, so no last will) without waiting for it.
    fn retire(self) {
        self.stop.cancel();
        self.task.detach();
    }
}

/// A data channel connection found by a background probe of better endpoints.
type DataProbe = AbortOnDrop<Option<(DataSession, Welcome, String)>>;

/// Most outcomes remembered; the oldest reported ones are forgotten first.
const DONE_LIMIT: usize = 1024;

struct Agent {
    config: AgentConfig,
    executor: Arc<dyn JobExecutor>,
    store: Box<dyn StateStore>,
    state: AgentState,
    events: broadcast::Sender<AgentEvent>,
    device_id: Arc<Mutex<Option<DeviceId>>>,
    session: Option<DataSession>,
    /// Server clock minus ours, from the last welcome.
    skew_ms: i64,
    mqtt_up: bool,
    backoff: Backoff,
    last_activity: Instant,
    /// The data channel endpoint of the open session.
    data_endpoint: Option<String>,
    /// The data channel endpoint that answered last.
    data_last_good: Option<String>,
    /// Working through a worse data endpoint: when to try the better ones again.
    retry_better_at: Option<Instant>,
    /// The broker the notification channel is connected to.
    mqtt_endpoint: Option<String>,
    /// The settings report the cloud has (in this run).
    last_report: Option<SettingsReport>,
    /// New settings were applied: restart the links with them after this round.
    relink: bool,
    /// Building the TLS client configuration failed (logged once).
    tls_failed: bool,
    /// Where the LAN endpoint listens.
    lan_endpoint: Option<String>,
    /// Checks nudges for this identity.
    nudges: Option<Arc<NudgeCheck>>,
    /// An accepted nudge asks for a poll at this time.
    poll_at: Option<Instant>,
    /// `skew_ms`, for the LAN endpoint's task.
    skew: Arc<AtomicI64>,
    /// Fetch the contracts with the next round (at start, on a change, a day after the last).
    contracts_due: bool,
    /// When each active support service was last sent its readings.
    telemetry_sent: HashMap<String, Instant>,
}

/// Why a round of work stopped early.
#[derive(Debug)]
enum WorkError {
    Session(SessionError),
    State(StateError),
}

impl From<SessionError> for WorkError {
    fn from(e: SessionError) -> Self {
        WorkError::Session(e)
    }
}

impl From<StateError> for WorkError {
    fn from(e: StateError) -> Self {
        WorkError::State(e)
    }
}

type LongPoll = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<(Vec<schemas::feed::FeedEntry>, schemas::FeedSeq), SessionError>,
            > + Send,
    >,
>;

impl Agent {
    fn emit(&self, event: AgentEvent) {
        let _ = self.events.send(event);
    }

    fn save(&mut self) -> Result<(), StateError> {
        self.store.save(&self.state)
    }
}
