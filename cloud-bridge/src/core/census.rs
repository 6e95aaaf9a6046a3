//! Passes over the whole state: the counts for the metrics scrape and the fleet overview, and
//! the device list's search. Each takes the shards' locks in turn (never all at once), so it
//! holds up no device for long.

use std::collections::HashMap;

use schemas::api::{DeviceCondition, DevicesQuery};
use schemas::job::JobState;
use schemas::records::DeviceRecord;
use schemas::{DeviceId, UnixMillis};

use super::{Core, CoreResult};

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
    /// Devices by condition ([`Core::fleet_census`] only).
    pub conditions: HashMap<DeviceCondition, u64>,
    /// Devices by customer, then model ([`Core::fleet_census`] only).
    pub groups: HashMap<String, HashMap<String, u64>>,
}

impl Core {
    /// The counts the metrics scrape needs (no conditions, no groups).
    pub fn census(&self) -> Census {
        self.take_census(false)
    }

    /// [`Self::census`], with the devices by condition and by customer and model as well (the
    /// fleet overview).
    pub fn fleet_census(&self) -> Census {
        self.take_census(true)
    }

    fn take_census(&self, by_group: bool) -> Census {
        let mut census = Census::default();
        self.each_shard(|shard| {
            for device in shard.devices.values() {
                census.devices += 1;
                census.devices_disabled += u64::from(device.disabled);
                let behind = device.newest.0.saturating_sub(device.acked.0);
                census.feed_backlog += behind;
                census.devices_behind += u64::from(behind > 0);
                if by_group {
                    census.count_group(device);
                }
            }
            for job in shard.jobs.values() {
                *census.jobs.entry(job.state).or_default() += 1;
            }
        });
        census
    }
}

impl Census {
    fn count_group(&mut self, device: &DeviceRecord) {
        *self
            .conditions
            .entry(DeviceCondition::of(device))
            .or_default() += 1;
        let models = match self.groups.get_mut(&device.customer) {
            Some(models) => models,
            None => self.groups.entry(device.customer.clone()).or_default(),
        };
        match models.get_mut(&device.model) {
            Some(n) => *n += 1,
            None => {
                models.insert(device.model.clone(), 1);
            }
        }
    }
}

impl Core {
    /// The devices `query` asks for, oldest registration first.
    pub fn find_devices(&self, query: &DevicesQuery) -> CoreResult<Vec<DeviceRecord>> {
        let q = query.q.as_deref().map(str::to_lowercase);
        let holds = |field: &str| {
            q.as_deref()
                .is_none_or(|q| field.to_lowercase().contains(q))
        };
        let matches = |d: &DeviceRecord| {
            query.condition.is_none_or(|c| c == DeviceCondition::of(d))
                && [d.device_id.as_str(), &d.serial, &d.model, &d.customer]
                    .into_iter()
                    .any(holds)
        };
        let Some(limit) = query.limit else {
            let mut list = self.devices_where(matches);
            list.sort_by_key(|d| (d.registered_at, d.device_id.clone()));
            return Ok(list);
        };
        // Only the keys are gathered and sorted; only the page's records are copied.
        let mut keys: Vec<(UnixMillis, DeviceId)> = Vec::new();
        self.each_shard(|s| {
            let matching = s.devices.values().filter(|d| matches(d));
            keys.extend(matching.map(|d| (d.registered_at, d.device_id.clone())));
        });
        keys.sort_unstable();
        let start = match query.after.as_ref().map(|id| self.device(id)) {
            None => 0,
            Some(Ok(last)) => {
                let last = (last.registered_at, last.device_id);
                keys.partition_point(|k| *k <= last)
            }
            // Nothing comes after a device the bridge does not have (none is ever deleted).
            Some(Err(_)) => keys.len(),
        };
        let page = keys.iter().skip(start).take(limit.clamp(1, 1000));
        // A device changed since its key was read is shown as it is now, if it still matches.
        Ok(page
            .filter_map(|(_, id)| self.device(id).ok().filter(|d| matches(d)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use schemas::DeviceId;

    use super::*;
    use crate::core::tests::{T0, core, registered_as};

    #[test]
    fn devices_are_found_by_text_and_condition_a_page_at_a_time() {
        let core = core();
        let ids: Vec<DeviceId> = (1..=6)
            .map(|n| {
                registered_as(
                    &core,
                    n,
                    if n % 2 == 0 { "Globex" } else { "acme" },
                    "MFP-1",
                )
            })
            .collect();
        for id in &ids {
            core.complete_registration(id, T0).unwrap();
        }
        core.disable_device(&ids[2], T0).unwrap();
        let find = |query: DevicesQuery| -> Vec<DeviceId> {
            let found = core.find_devices(&query).unwrap();
            found.into_iter().map(|d| d.device_id).collect()
        };
        let all = find(DevicesQuery::default());
        assert_eq!(all.len(), 6);
        let globex = find(DevicesQuery {
            q: Some("gLoBeX".into()),
            ..DevicesQuery::default()
        });
        assert_eq!(globex, [ids[1].clone(), ids[3].clone(), ids[5].clone()]);
        let by_serial = find(DevicesQuery {
            q: Some("sn5".into()),
            ..DevicesQuery::default()
        });
        assert_eq!(by_serial, [ids[4].clone()]);
        let disabled = find(DevicesQuery {
            condition: Some(DeviceCondition::Disabled),
            ..DevicesQuery::default()
        });
        assert_eq!(disabled, [ids[2].clone()]);
        let page = |after: Option<&DeviceId>| {
            find(DevicesQuery {
                after: after.cloned(),
                limit: Some(4),
                ..DevicesQuery::default()
            })
        };
        let first = page(None);
        let second = page(first.last());
        assert_eq!((first.len(), second.len()), (4, 2));
        assert_eq!(
            [first, second].concat(),
            all,
            "the pages are the list, once"
        );
        let missing = DevicesQuery {
            after: Some(DeviceId::from_random([99; 8])),
            limit: Some(4),
            ..DevicesQuery::default()
        };
        assert!(core.find_devices(&missing).unwrap().is_empty());
    }
}
