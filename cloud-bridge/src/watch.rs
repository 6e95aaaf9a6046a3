//! What the console's overview shows that the core does not keep, learnt from the ops events
//! as they are published: which devices are online on which channel, and the last hour of job
//! transitions, minute by minute, with the submission→completion time of the jobs that
//! succeeded. It is memory only: after a restart it fills again as devices connect and jobs
//! move.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use schemas::api::{FleetMinute, PresenceView};
use schemas::ops::{Channel, OpsEvent};
use schemas::{DeviceId, UnixMillis};

const MINUTE_MS: u64 = 60_000;
/// Minutes kept.
pub const WINDOW_MINUTES: usize = 60;

#[derive(Debug, Default)]
pub struct Watch {
    inner: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Every device seen connecting since the bridge started.
    presence: HashMap<DeviceId, PresenceView>,
    /// The newest minutes, oldest first.
    minutes: VecDeque<Minute>,
}

#[derive(Debug)]
struct Minute {
    start: u64,
    transitions: BTreeMap<String, u64>,
    /// Submission→completion times of the jobs that succeeded, in ms.
    latency: hdrhistogram::Histogram<u64>,
}

/// How many devices are online now, on each channel and on either.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OnlineCounts {
    pub mqtt: u64,
    pub data: u64,
    pub any: u64,
}

impl Watch {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes in one published event.
    pub fn observe(&self, event: &OpsEvent) {
        let mut state = self.lock();
        match event {
            OpsEvent::DeviceOnline {
                device_id, channel, ..
            } => state.set(device_id, *channel, true, None),
            OpsEvent::DeviceOffline {
                device_id,
                channel,
                at,
            } => state.set(device_id, *channel, false, Some(*at)),
            OpsEvent::DeviceDisabled { device_id, at }
            | OpsEvent::DeviceInvalidated { device_id, at, .. } => {
                // Its connections are closed: offline on both.
                state.set(device_id, Channel::Mqtt, false, Some(*at));
                state.set(device_id, Channel::Data, false, Some(*at));
            }
            OpsEvent::JobTransition {
                to,
                at,
                submitted_at,
                ..
            } => {
                let Some(minute) = state.minute(*at) else {
                    return;
                };
                *minute
                    .transitions
                    .entry(to.as_str().to_owned())
                    .or_default() += 1;
                if *to == schemas::job::JobState::Succeeded && submitted_at.0 > 0 {
                    // Values past the histogram's range are clamped, not refused.
                    minute
                        .latency
                        .saturating_record(at.0.saturating_sub(submitted_at.0));
                }
            }
            _ => {}
        }
    }

    pub fn online(&self) -> OnlineCounts {
        let state = self.lock();
        let mut counts = OnlineCounts::default();
        for p in state.presence.values() {
            counts.mqtt += u64::from(p.mqtt);
            counts.data += u64::from(p.data);
            counts.any += u64::from(p.mqtt || p.data);
        }
        counts
    }

    /// The device's connections now (all `false` for one not seen since the bridge started).
    pub fn presence(&self, id: &DeviceId) -> PresenceView {
        self.lock().presence.get(id).copied().unwrap_or_default()
    }

    /// The minutes of the last hour up to `now` in which a job changed state, oldest first.
    pub fn minutes(&self, now: UnixMillis) -> Vec<FleetMinute> {
        let since = (now.0 / MINUTE_MS).saturating_sub(WINDOW_MINUTES as u64 - 1) * MINUTE_MS;
        let state = self.lock();
        state
            .minutes
            .iter()
            .filter(|m| m.start >= since && m.start <= now.0)
            .map(|m| {
                let done = m.latency.len();
                let at = |q: f64| (done > 0).then(|| m.latency.value_at_quantile(q));
                FleetMinute {
                    start: UnixMillis(m.start),
                    transitions: m.transitions.clone(),
                    succeeded: done,
                    latency_p50_ms: at(0.5),
                    latency_p95_ms: at(0.95),
                }
            })
            .collect()
    }
}

impl State {
    fn set(&mut self, device: &DeviceId, channel: Channel, up: bool, left_at: Option<UnixMillis>) {
        let presence = self.presence.entry(device.clone()).or_default();
        let was = match channel {
            Channel::Mqtt => std::mem::replace(&mut presence.mqtt, up),
            Channel::Data => std::mem::replace(&mut presence.data, up),
        };
        if was && !up {
            presence.left_at = left_at;
            presence.left = Some(channel);
        }
    }

    /// The bucket of the minute `at` falls in (a new one drops those past the window); `None`
    /// for a minute already past it.
    fn minute(&mut self, at: UnixMillis) -> Option<&mut Minute> {
        let start = at.0 / MINUTE_MS * MINUTE_MS;
        let newest = self.minutes.back().map_or(start, |m| m.start.max(start));
        let oldest_kept = newest.saturating_sub((WINDOW_MINUTES as u64 - 1) * MINUTE_MS);
        if start < oldest_kept {
            return None;
        }
        while self.minutes.front().is_some_and(|m| m.start < oldest_kept) {
            self.minutes.pop_front();
        }
        // Events come in the order of their changes, but one may be stamped a little before
        // the newest minute (another shard read the clock first): it goes in the minute it
        // names.
        let i = self.minutes.partition_point(|m| m.start < start);
        if self.minutes.get(i).is_none_or(|m| m.start != start) {
            // 1 ms to a day at two significant figures: bounds the histogram accepts.
            let latency = hdrhistogram::Histogram::new_with_bounds(1, 86_400_000, 2).ok()?;
            let minute = Minute {
                start,
                transitions: BTreeMap::new(),
                latency,
            };
            self.minutes.insert(i, minute);
        }
        self.minutes.get_mut(i)
    }
}

#[cfg(test)]
mod tests {
    use schemas::JobId;
    use schemas::job::JobState;

    use super::*;

    fn transition(to: JobState, submitted: u64, at: u64) -> OpsEvent {
        OpsEvent::JobTransition {
            device_id: DeviceId::from_random([1; 8]),
            job_id: JobId::from_random([2; 8]),
            from: None,
            to,
            attempt: 1,
            reason: None,
            at: UnixMillis(at),
            submitted_at: UnixMillis(submitted),
        }
    }

    #[test]
    fn presence_counts_each_device_once_and_remembers_when_and_how_it_left() {
        let watch = Watch::default();
        let (a, b) = (DeviceId::from_random([1; 8]), DeviceId::from_random([2; 8]));
        let at = UnixMillis(1);
        let online = |d: &DeviceId, channel| OpsEvent::DeviceOnline {
            device_id: d.clone(),
            channel,
            at,
        };
        watch.observe(&online(&a, Channel::Mqtt));
        watch.observe(&online(&a, Channel::Data));
        watch.observe(&online(&b, Channel::Data));
        assert_eq!(
            watch.online(),
            OnlineCounts {
                mqtt: 1,
                data: 2,
                any: 2
            }
        );
        watch.observe(&OpsEvent::DeviceOffline {
            device_id: a.clone(),
            channel: Channel::Mqtt,
            at: UnixMillis(7),
        });
        let left = PresenceView {
            mqtt: false,
            data: true,
            left_at: Some(UnixMillis(7)),
            left: Some(Channel::Mqtt),
        };
        assert_eq!(watch.presence(&a), left);
        watch.observe(&OpsEvent::DeviceDisabled {
            device_id: b.clone(),
            at: UnixMillis(8),
        });
        assert_eq!(watch.online().any, 1);
        let b_now = watch.presence(&b);
        assert_eq!(
            (b_now.mqtt, b_now.data, b_now.left_at),
            (false, false, Some(UnixMillis(8)))
        );
        let never = watch.presence(&DeviceId::from_random([3; 8]));
        assert_eq!(never, PresenceView::default());
    }

    #[test]
    fn an_hour_of_minutes_with_the_completion_times_of_each() {
        let watch = Watch::default();
        let t0 = 10 * MINUTE_MS;
        for n in 0..10 {
            watch.observe(&transition(JobState::Queued, t0, t0 + n));
            watch.observe(&transition(JobState::Succeeded, t0, t0 + 100 * (n + 1)));
        }
        watch.observe(&transition(JobState::Failed, t0, t0 + MINUTE_MS));
        let minutes = watch.minutes(UnixMillis(t0 + MINUTE_MS));
        assert_eq!(minutes.len(), 2);
        assert_eq!(minutes[0].transitions["queued"], 10);
        assert_eq!(minutes[0].succeeded, 10);
        let p50 = minutes[0].latency_p50_ms.unwrap();
        assert!((500..=510).contains(&p50), "{p50}");
        assert_eq!(minutes[1].transitions["failed"], 1);
        assert_eq!(minutes[1].latency_p50_ms, None);
        // An hour on, the first minute is gone from what is shown and from memory.
        let later = t0 + 61 * MINUTE_MS;
        watch.observe(&transition(JobState::Queued, later, later));
        let minutes = watch.minutes(UnixMillis(later));
        assert_eq!(minutes.len(), 1);
        assert_eq!(watch.lock().minutes.len(), 1);
    }
}
