//! Bringing the fleet up: devices start at the connect rate (those whose MQTT link will be cut
//! connect through one proxy), and the run waits, generously, until they are connected. Also
//! killing, restarting and stopping devices.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use schemas::{DeviceId, Secret};
use tokio::time::Instant;

use super::proxy::CutProxy;
use super::{FleetConfig, FleetError, Shared, Slot, agent_config, follow};
use crate::executor::JobExecutor;
use crate::state::MemoryStateStore;

/// The devices of a run.
pub(super) struct Fleet {
    pub(super) agents: Vec<Slot>,
    /// (agent index, device id) of every connected device: jobs go only to them.
    pub(super) ready: Vec<(usize, DeviceId)>,
    /// The proxy the first `cut_count` devices reach MQTT through.
    pub(super) proxy: Option<CutProxy>,
    pub(super) cut_count: usize,
    pub(super) poll_only: bool,
    pub(super) connect_secs: f64,
    shared: Arc<Shared>,
    executor: Arc<dyn JobExecutor>,
}

/// Starts the devices and waits until they are connected (or the wait is over: the run goes on
/// with those that made it, and the report says how many).
pub(super) async fn start(
    cfg: &FleetConfig,
    token: &Secret,
    shared: &Arc<Shared>,
    executor: &Arc<dyn JobExecutor>,
) -> Result<Fleet, FleetError> {
    let cut_count = cfg
        .faults
        .cut_mqtt
        .map(|f| ((cfg.devices as f64) * f.share).round() as usize)
        .unwrap_or(0);
    let proxy = match (&cfg.mqtt, cut_count) {
        (Some((host, port)), n) if n > 0 => {
            let target: SocketAddr = format!("{host}:{port}")
                .parse()
                .map_err(|e| FleetError::Config(format!("MQTT address {host}:{port}: {e}")))?;
            Some(CutProxy::start(target).await.map_err(FleetError::Proxy)?)
        }
        _ => None,
    };
    let poll_only = cfg.mqtt.is_none();

    // Start the devices at the connect rate.
    let mut agents: Vec<Slot> = Vec::with_capacity(cfg.devices);
    let pace = Duration::from_secs_f64(1.0 / f64::from(cfg.connect_rate));
    let started = Instant::now();
    for i in 0..cfg.devices {
        let mqtt = match (&proxy, &cfg.mqtt) {
            (Some(p), Some(_)) if i < cut_count => Some(("127.0.0.1".to_owned(), p.addr.port())),
            (_, m) => m.clone(),
        };
        let config = agent_config(cfg, mqtt, format!("SIM-{}-{i:06}", cfg.label), token);
        let store = MemoryStateStore::default();
        let agent = crate::start(config.clone(), executor.clone(), store.clone());
        follow(shared.clone(), i, agent.subscribe(), poll_only);
        agents.push(Slot {
            agent: Some(agent),
            store,
            config,
        });
        tokio::time::sleep_until(started + pace * (i as u32 + 1)).await;
    }
    // Wait for every device, generously; then run with those that made it. Connecting slows
    // down as the fleet grows: every device registers durably and opens two connections.
    let waited = Duration::from_secs_f64(3.0 * cfg.devices as f64 / f64::from(cfg.connect_rate))
        + Duration::from_secs(60);
    let deadline = started + waited;
    loop {
        let notified = shared.changed.notified();
        if shared.connected.load(Ordering::Relaxed) >= cfg.devices {
            break;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            break;
        }
    }
    let ready: Vec<(usize, DeviceId)> = {
        let state = shared.state();
        agents
            .iter()
            .enumerate()
            .filter(|(i, _)| state.connected[*i])
            .filter_map(|(i, s)| {
                s.agent
                    .as_ref()
                    .and_then(|a| a.device_id())
                    .map(|id| (i, id))
            })
            .collect()
    };
    if ready.is_empty() {
        return Err(FleetError::NotConnected {
            connected: 0,
            wanted: cfg.devices,
            waited,
        });
    }
    if ready.len() < cfg.devices {
        tracing::warn!(
            connected = ready.len(),
            wanted = cfg.devices,
            ?waited,
            "not every device connected; running with those that did"
        );
    }
    tracing::info!(devices = ready.len(), took = ?started.elapsed(), "fleet connected");
    Ok(Fleet {
        agents,
        ready,
        proxy,
        cut_count,
        poll_only,
        connect_secs: started.elapsed().as_secs_f64(),
        shared: shared.clone(),
        executor: executor.clone(),
    })
}

impl Fleet {
    /// Kills device `i` at once (`kill -9` for an agent: its state stays in its store).
    pub(super) fn kill(&mut self, i: usize) {
        if let Some(agent) = self.agents[i].agent.take() {
            agent.kill();
        }
    }

    /// Starts device `i` again from what its store kept.
    pub(super) fn restart(&mut self, i: usize) {
        let slot = &mut self.agents[i];
        let agent = crate::start(
            slot.config.clone(),
            self.executor.clone(),
            slot.store.clone(),
        );
        follow(self.shared.clone(), i, agent.subscribe(), self.poll_only);
        slot.agent = Some(agent);
    }

    /// Stops every device.
    pub(super) async fn stop(self) {
        let mut stops = tokio::task::JoinSet::new();
        for agent in self.agents.into_iter().filter_map(|s| s.agent) {
            stops.spawn(agent.stop());
        }
        while stops.join_next().await.is_some() {}
    }
}
