//! What the agent is given: the device's own data, where the cloud is, and its policy numbers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use schemas::Secret;
use schemas::data::OwnerClaim;
use schemas::print::Capabilities;
use schemas::settings::Endpoints;

use crate::consumables::ReadingsSource;
use crate::counters::CounterSource;
use crate::session::SessionSettings;

/// What the device says about itself when it registers.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub serial: String,
    pub model: String,
    pub destination: String,
    pub time_zone: String,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The factory endpoints, best first: data channel URLs (`ws://host:port`) and MQTT
    /// brokers (`host:port`; none runs the agent by polling only). Settings pushed by the
    /// cloud replace them and are kept on disk.
    pub endpoints: Endpoints,
    /// While a channel works through any endpoint but its best, how often to try the better
    /// ones again (in the background; the channel moves over when one answers).
    pub probe_interval: Duration,
    /// Where to accept poll-now nudges on the LAN (`None`: nowhere). The address it listens on
    /// is reported to the cloud, which plans nudge trees through it.
    pub lan_listen: Option<std::net::SocketAddr>,
    /// Needed only until the device has registered.
    pub enrollment_token: Option<Secret>,
    pub info: DeviceInfo,
    /// Owner information entered at set-up, bound to the device id at registration.
    pub owner: Option<OwnerClaim>,
    /// How long one long-poll waits while MQTT is down. Zero: never long-poll (poll-only
    /// devices then sync every `poll_interval` and close the data channel in between).
    pub long_poll: Duration,
    /// Regular poll, even while MQTT is up (catches anything a lost hint would have said; reads
    /// the mailbox). `None`: the schedule the cloud gives (kept on disk; a day until it has
    /// said). Counted from the last sync, with jitter.
    pub poll_interval: Option<Duration>,
    /// Longest wait between attempts when the data channel cannot be reached.
    pub slow_poll: Duration,
    /// Close an unused data channel after this long while MQTT is up.
    pub data_idle_close: Duration,
    /// At start, how long to wait for MQTT (and the cloud's push on connect) before syncing
    /// over the data channel anyway.
    pub mqtt_grace: Duration,
    pub mqtt_keep_alive: Duration,
    pub backoff_min: Duration,
    /// After a working MQTT link drops, the first attempt to reconnect waits a random time up
    /// to this long: a fleet that lost its broker at one instant (a restart) comes back spread
    /// over this window instead of in one burst (10,000 devices over 5 s: 2,000 a second).
    pub mqtt_reconnect_spread: Duration,
    /// The consent to send device information the device starts with, on its very first
    /// start (the set-up screen); afterwards only the user changes it.
    pub consent_at_setup: bool,
    /// Most requests the outbox holds (see [`crate::outbox`] for what happens when full).
    pub outbox_limit: usize,
    /// The support services this device knows, and whether each is enabled, on its first
    /// start (later changed with [`AgentHandle::set_support_service`]). Only these are ever
    /// activated.
    pub support_services: BTreeMap<String, bool>,
    /// What the device can measure for support services (cartridges, counters...): read on
    /// its events and periodically.
    pub readings: Option<Arc<dyn ReadingsSource>>,
    /// The device's printer: its printer queue is registered with these capabilities (again
    /// whenever they change), and jobs asking for more are refused at submission.
    pub printer: Option<Capabilities>,
    /// The printer's page counters: read whole (see [`crate::counters`]) and reported after
    /// every job and on [`AgentHandle::report_counters`], with consent.
    pub counters: Option<Arc<dyn CounterSource>>,
    /// TLS servers (`wss://`, `mqtts://` endpoints) are verified against this CA certificate
    /// (PEM), or against the system's roots when `None`. A client configuration already in
    /// `session.tls` (one shared by a simulated fleet, say) is used as it is.
    pub ca_file: Option<std::path::PathBuf>,
    pub session: SessionSettings,
    pub agent_name: String,
}

impl AgentConfig {
    pub fn new(
        data_url: impl Into<String>,
        mqtt: Option<(String, u16)>,
        info: DeviceInfo,
    ) -> AgentConfig {
        let mqtt = mqtt.map(|(host, port)| {
            if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            }
        });
        AgentConfig {
            endpoints: Endpoints {
                data: vec![data_url.into()],
                mqtt: mqtt.into_iter().collect(),
            },
            probe_interval: Duration::from_secs(60),
            lan_listen: None,
            enrollment_token: None,
            info,
            owner: None,
            long_poll: Duration::from_secs(25),
            poll_interval: None,
            slow_poll: Duration::from_secs(60),
            data_idle_close: Duration::from_secs(30),
            mqtt_grace: Duration::from_secs(10),
            mqtt_keep_alive: Duration::from_secs(30),
            backoff_min: Duration::from_millis(250),
            mqtt_reconnect_spread: Duration::from_secs(5),
            consent_at_setup: false,
            outbox_limit: 1000,
            support_services: BTreeMap::new(),
            readings: None,
            printer: None,
            counters: None,
            ca_file: None,
            session: SessionSettings::default(),
            agent_name: concat!("device-sim/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}
