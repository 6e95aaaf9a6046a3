//! Open data-channel connections by device, so that disabling or invalidating a device closes
//! them at once instead of at their next periodic check.
//!
//! A connection registers after its hello ([`DataSessions::open`]) and then waits on its
//! [`DataSession`] besides its socket; [`DataSessions::close_all`] cancels every connection of
//! one device. A connection that registers just after a `close_all` rechecks the device itself
//! (see the data channel), so no connection of a revoked device stays open.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use schemas::DeviceId;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Default)]
pub struct DataSessions {
    by_device: Mutex<HashMap<DeviceId, Entry>>,
}

#[derive(Debug)]
struct Entry {
    /// Tells a later registration apart from one that `close_all` already removed.
    generation: u64,
    token: CancellationToken,
    open: usize,
}

/// One registered connection; deregisters on drop.
#[derive(Debug)]
pub struct DataSession {
    device: DeviceId,
    generation: u64,
    token: CancellationToken,
    sessions: Arc<DataSessions>,
}

impl DataSession {
    /// Resolves once the device's connections are to be closed.
    pub async fn revoked(&self) {
        self.token.cancelled().await;
    }
}

impl DataSessions {
    pub fn open(self: &Arc<Self>, device: &DeviceId) -> DataSession {
        static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut map = self.by_device.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(device.clone()).or_insert_with(|| Entry {
            generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            token: CancellationToken::new(),
            open: 0,
        });
        entry.open += 1;
        DataSession {
            device: device.clone(),
            generation: entry.generation,
            token: entry.token.clone(),
            sessions: self.clone(),
        }
    }

    /// Closes every open connection of `device`; returns how many there were.
    pub fn close_all(&self, device: &DeviceId) -> usize {
        let removed = self
            .by_device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(device);
        removed.map_or(0, |entry| {
            entry.token.cancel();
            entry.open
        })
    }

    /// Devices with at least one open connection.
    pub fn devices(&self) -> usize {
        self.by_device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl Drop for DataSession {
    fn drop(&mut self) {
        let mut map = self
            .sessions
            .by_device
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = map.get_mut(&self.device)
            && entry.generation == self.generation
        {
            entry.open -= 1;
            if entry.open == 0 {
                map.remove(&self.device);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn close_all_cancels_every_connection_of_one_device_only() {
        let sessions = Arc::new(DataSessions::default());
        let a = DeviceId::parse("dev-aaaaaaaaaaaaaaaa").unwrap();
        let b = DeviceId::parse("dev-bbbbbbbbbbbbbbbb").unwrap();
        let a1 = sessions.open(&a);
        let a2 = sessions.open(&a);
        let b1 = sessions.open(&b);
        assert_eq!(sessions.close_all(&a), 2);
        a1.revoked().await;
        a2.revoked().await;
        assert!(!b1.token.is_cancelled());
        // A connection registered after the close is a new generation: the old ones' drops
        // do not deregister it.
        let a3 = sessions.open(&a);
        drop(a1);
        drop(a2);
        assert_eq!(sessions.devices(), 2);
        drop(a3);
        drop(b1);
        assert_eq!(sessions.devices(), 0);
    }
}
