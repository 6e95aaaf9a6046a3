//! The printer's page counters and how the agent reads them whole.
//!
//! A print engine counts a page by updating several registers one after another (total, then
//! colour or mono, then the media size), so a reading taken while a page is being counted can be
//! torn: a total that is not the sum of its parts. The engine's counters therefore carry a
//! generation that changes before and after every update (odd while one is under way), and the
//! agent re-reads until the generation was even and unchanged across its read.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use schemas::print::PageCounters;

/// Where the agent reads the page counters.
pub trait CounterSource: Send + Sync + std::fmt::Debug + 'static {
    /// Changes before and after every update; odd while one is under way.
    fn generation(&self) -> u64;
    /// The counters as they are now; torn if a page is being counted meanwhile.
    fn read(&self) -> PageCounters;
}

/// Reads the counters whole: again and again until no page was counted during the read.
pub async fn read_whole(source: &dyn CounterSource) -> PageCounters {
    loop {
        let before = source.generation();
        if before.is_multiple_of(2) {
            let reading = source.read();
            if source.generation() == before {
                return reading;
            }
        }
        tokio::task::yield_now().await;
    }
}

/// A simulated engine's counters, updated register by register.
#[derive(Debug, Default)]
pub struct SimulatedCounters {
    generation: AtomicU64,
    total: AtomicU64,
    color: AtomicU64,
    mono: AtomicU64,
    media: Mutex<BTreeMap<String, u64>>,
    /// The engine counts one page at a time, whoever prints it (cloud jobs, local copies).
    engine: Mutex<()>,
}

impl SimulatedCounters {
    /// Counts one printed page.
    pub fn count_page(&self, color: bool, media: &str) {
        let _engine = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.total.fetch_add(1, Ordering::SeqCst);
        // The registers are written one by one: a careless reader sees the gap.
        gap();
        let part = if color { &self.color } else { &self.mono };
        part.fetch_add(1, Ordering::SeqCst);
        gap();
        *self
            .media
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(media.to_owned())
            .or_default() += 1;
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// The time an engine takes between two register writes (a few microseconds).
fn gap() {
    for _ in 0..2000 {
        std::hint::spin_loop();
    }
}

impl CounterSource for SimulatedCounters {
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn read(&self) -> PageCounters {
        let total = self.total.load(Ordering::SeqCst);
        let color = self.color.load(Ordering::SeqCst);
        let mono = self.mono.load(Ordering::SeqCst);
        let per_media = self.media.lock().unwrap_or_else(|p| p.into_inner()).clone();
        PageCounters {
            total,
            color,
            mono,
            per_media,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// While another thread counts pages as fast as it can, every whole reading is consistent
    /// and none is lower than the one before; plain reads are torn now and then (the hazard is
    /// real).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn whole_readings_are_consistent_and_monotonic_while_pages_are_counted() {
        let counters = Arc::new(SimulatedCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let printer = {
            let (c, stop) = (counters.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    c.count_page(
                        n.is_multiple_of(3),
                        if n.is_multiple_of(2) { "A4" } else { "Letter" },
                    );
                    std::thread::sleep(std::time::Duration::from_micros(20));
                }
            })
        };
        let mut last = PageCounters::default();
        let mut torn = 0;
        let mut reads = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        // Until pages were counted during plenty of whole reads and a plain read has torn
        // (so the hazard is shown to be real here).
        while reads < 1000 || last.total < 100 || torn == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "after {reads} reads: total {}, {torn} torn plain reads",
                last.total
            );
            let whole = read_whole(counters.as_ref()).await;
            assert!(whole.is_consistent(), "{whole:?}");
            assert_eq!(whole.went_backwards(&last), None);
            last = whole;
            torn += usize::from(!counters.read().is_consistent());
            reads += 1;
        }
        stop.store(true, Ordering::SeqCst);
        printer.join().unwrap();
    }
}
