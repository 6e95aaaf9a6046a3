//! The device side.
//!
//! - [`agent`]: the device agent a device maker embeds: registration, the MQTT notification
//!   link, the data channel, long-poll and slow-poll fallbacks, exactly-once job execution.
//! - [`session`]: the data-channel client (a handle plus one task owning the WebSocket).
//! - [`mqtt`]: the notification link (rumqttc).
//! - [`lan`]: the LAN endpoint that accepts poll-now nudges and passes them on.
//! - [`outbox`]: store-and-forward of the device's own requests, and the consent rules.
//! - [`state`]: where the agent keeps its state (a file, or memory for large fleets).
//! - [`executor`]: how a job is run; [`executor::SimulatedExecutor`] for the simulator.
//! - [`counters`]: page counters, read whole even while pages are being counted.
//! - [`consumables`]: what a device can measure for support services; simulated cartridges.
//! - [`panel`]: the simulated panel of `device-sim device` (commands on standard input).
//! - [`duration`]: durations on the command line (`250ms`, `30s`, `5m`).
//! - `fleet` (feature `fleet`, on by default): many devices in one process (or several), a job
//!   generator, faults, and a latency and throughput report; `fleet::cli` is `device-sim fleet`.
//!
//! The `device-sim` binary runs one device (`device-sim device`) or many (`device-sim run`).

pub mod agent;
pub mod consumables;
pub mod counters;
pub mod duration;
pub mod executor;
#[cfg(feature = "fleet")]
pub mod fleet;
pub mod lan;
pub mod mqtt;
pub mod outbox;
pub mod panel;
pub mod session;
pub mod state;

pub use agent::{
    AgentConfig, AgentError, AgentEvent, AgentHandle, DeviceInfo, PrintSession, start,
};
pub use executor::{JobExecutor, JobOutcome, SimulatedExecutor};
pub use outbox::{OutboxFull, Submitted};
pub use state::{FileStateStore, MemoryStateStore, StateStore};
