//! The cloud side of the system.
//!
//! | module | what lives there |
//! |---|---|
//! | [`store`] | the narrow `Store` trait, sled behind it, group commit |
//! | [`core`] | registry, per-device feeds, job lifecycle, leases and TTLs (synchronous rules) |
//! | [`bridge`] | the service around `core`: durability before acknowledgement, long-poll, effects |
//! | [`sweeper`] | retention: deletes (and archives) finished jobs once their time is up |
//! | [`notifier`] | hints and ops events out to MQTT, presence in; embedded or external broker |
//! | [`presence`] | MQTT departures held for a grace period, so a reconnect is no offline/online pair |
//! | `device_requests` | what each data-channel request does |
//! | [`data_channel`] | the devices' WebSocket connections |
//! | [`sessions`] | open data-channel connections by device, closed at once on revocation |
//! | [`admin`] | the admin HTTP API: every operation of `schemas::admin`, served from its declaration |
//! | [`http`] | serving the admin API: header, idle and request timeouts, graceful shutdown |
//! | [`listener`] | connection caps per listener, accept backoff, TLS handshakes under a deadline |
//! | [`clock`] | where the bridge reads the time (a test's clock can jump forward) |
//! | [`config`] | the configuration file and its defaults |
//! | [`server`] | start-up, wiring, graceful shutdown |
//! | [`cli`] | the `cloud-bridge` command line |
//! | [`export`] | all data as JSON lines |
//!
//! The invariants this crate keeps: nothing is acknowledged before it is on disk; a hint is
//! never the only copy of anything; a device only sees and changes its own feed and jobs.

pub mod admin;
pub mod bridge;
pub mod cli;
pub mod clock;
pub mod config;
pub mod console;
pub mod core;
pub mod data_channel;
mod device_requests;
#[cfg(test)]
mod durability_tests;
pub mod export;
pub mod http;
pub mod listener;
pub mod notifier;
pub mod presence;
pub mod server;
pub mod sessions;
pub mod store;
pub mod sweeper;
pub mod telemetry;
pub mod watch;

pub use config::Config;
pub use server::{Listeners, Running, StartError, start, start_with_clock};
