//! MQTT presence as operations see it. A device that replaces its own connection (it
//! reconnects after a network blip, or a second connection of its takes over its session, whose
//! last will then announces it offline) is not shown leaving and coming back: an `offline` is
//! held for a grace period, an `online` of the same device within it cancels both, and an
//! offline not cancelled is published when its grace ends, with the time the device left.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use schemas::{DeviceId, UnixMillis};

/// Departures waiting out their grace period.
#[derive(Debug)]
pub struct Departures {
    grace_ms: u64,
    inner: Mutex<Waiting>,
    /// Woken when a departure is added (the publisher may be asleep with none waiting).
    pub added: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Waiting {
    /// Device → when it left.
    left: HashMap<DeviceId, UnixMillis>,
    /// (when its grace ends, device).
    due: BTreeSet<(UnixMillis, DeviceId)>,
}

impl Departures {
    pub fn new(grace_ms: u64) -> Departures {
        Departures {
            grace_ms,
            inner: Mutex::new(Waiting::default()),
            added: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device left at `at`. A departure already waiting keeps its time.
    pub fn left(&self, device: &DeviceId, at: UnixMillis) {
        let mut w = self.lock();
        if w.left.contains_key(device) {
            return;
        }
        w.left.insert(device.clone(), at);
        w.due
            .insert((at.saturating_add_ms(self.grace_ms), device.clone()));
        drop(w);
        self.added.notify_one();
    }

    /// The device is back: whether it had left within the grace period (then neither its
    /// departure nor its return is news).
    pub fn back(&self, device: &DeviceId) -> bool {
        let mut w = self.lock();
        match w.left.remove(device) {
            Some(at) => {
                w.due
                    .remove(&(at.saturating_add_ms(self.grace_ms), device.clone()));
                true
            }
            None => false,
        }
    }

    /// The departures whose grace has ended by `now` (device, when it left), oldest first,
    /// and when the next grace ends.
    pub fn due(&self, now: UnixMillis) -> (Vec<(DeviceId, UnixMillis)>, Option<UnixMillis>) {
        let mut w = self.lock();
        let mut gone = Vec::new();
        while let Some((end, _)) = w.due.first()
            && *end <= now
        {
            let (_, device) = w.due.pop_first().expect("checked");
            if let Some(at) = w.left.remove(&device) {
                gone.push((device, at));
            }
        }
        (gone, w.due.first().map(|(end, _)| *end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(n: u8) -> DeviceId {
        DeviceId::from_random([n; 8])
    }

    #[test]
    fn a_device_back_within_the_grace_never_left_and_one_that_is_not_did() {
        let d = Departures::new(5000);
        let t = UnixMillis(1_000_000);
        // Replaced its own connection: its last will, then its new connection's online.
        d.left(&dev(1), t);
        assert!(d.back(&dev(1)));
        // Gone for good; a second offline does not move the time it left.
        d.left(&dev(2), t.saturating_add_ms(100));
        d.left(&dev(2), t.saturating_add_ms(200));
        assert_eq!(
            d.due(t.saturating_add_ms(5099)),
            (vec![], Some(UnixMillis(1_005_100)))
        );
        let (gone, next) = d.due(t.saturating_add_ms(5100));
        assert_eq!(gone, [(dev(2), t.saturating_add_ms(100))]);
        assert_eq!(next, None);
        // An online that follows no departure is news.
        assert!(!d.back(&dev(2)));
        assert!(!d.back(&dev(3)));
    }
}
