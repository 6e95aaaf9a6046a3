//! Counts over the whole state, for the metrics scrape: one pass over the shards, each under
//! its own lock in turn (never all at once), so a scrape holds up no device for long.

use std::collections::HashMap;

use schemas::api::DeviceCondition;
use schemas::job::JobState;

use super::Core;

/// What the state holds, as of one scrape.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Census {
    pub devices: u64,
    pub devices_disabled: u64,
    /// Feed entries not yet acknowledged, over all devices, and how many devices have any.
    pub feed_backlog: u64,
    pub devices_behind: u64,
    /// Jobs in memory (every job not yet finished) by state.
    pub jobs: HashMap<JobState, u64>,
    /// Devices by condition.
    pub conditions: HashMap<DeviceCondition, u64>,
    /// Devices by customer, then model.
    pub groups: HashMap<String, HashMap<String, u64>>,
}

impl Core {
    pub fn census(&self) -> Census {
        let mut census = Census::default();
        self.each_shard(|shard| {
            for device in shard.devices.values() {
                census.devices += 1;
                census.devices_disabled += u64::from(device.disabled);
                *census
                    .conditions
                    .entry(DeviceCondition::of(device))
                    .or_default() += 1;
                let models = match census.groups.get_mut(&device.customer) {
                    Some(models) => models,
                    None => census.groups.entry(device.customer.clone()).or_default(),
                };
                match models.get_mut(&device.model) {
                    Some(n) => *n += 1,
                    None => {
                        models.insert(device.model.clone(), 1);
                    }
                }
                let behind = device.newest.0.saturating_sub(device.acked.0);
                census.feed_backlog += behind;
                census.devices_behind += u64::from(behind > 0);
            }
            for job in shard.jobs.values() {
                *census.jobs.entry(job.state).or_default() += 1;
            }
        });
        census
    }
}
