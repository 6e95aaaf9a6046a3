//! The bridge's sense of time. The core takes the time as an argument; the bridge asks its
//! [`Clock`] for it, so that tests can move time forward at once instead of waiting for leases,
//! TTLs, print sessions and codes to run out ([`SteppedClock`]).

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use schemas::UnixMillis;
use tokio::sync::Notify;

/// Where the bridge reads the time.
pub trait Clock: Send + Sync + Debug + 'static {
    fn now(&self) -> UnixMillis;

    /// Resolves when the clock jumped (the reaper, its one waiter, then looks at its deadlines
    /// again). The system clock never does.
    fn jumped(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(std::future::pending())
    }
}

/// The system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixMillis {
        UnixMillis::now()
    }
}

/// The system's clock, plus however far a test has moved it forward.
#[derive(Debug, Default)]
pub struct SteppedClock {
    ahead_ms: AtomicU64,
    jumped: Notify,
}

impl SteppedClock {
    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.ahead_ms.fetch_add(ms, Ordering::SeqCst);
        // A permit for the one waiter (the reaper), even when it is not waiting at this moment.
        self.jumped.notify_one();
    }

    /// Moves the clock just past `at` (not at all when it is past already).
    pub fn advance_past(&self, at: UnixMillis) {
        let now = self.now();
        if now <= at {
            self.advance(Duration::from_millis(at.0 - now.0 + 1));
        }
    }
}

impl Clock for SteppedClock {
    fn now(&self) -> UnixMillis {
        UnixMillis(UnixMillis::now().0 + self.ahead_ms.load(Ordering::SeqCst))
    }

    fn jumped(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.jumped.notified())
    }
}
