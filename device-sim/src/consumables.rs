//! What a device can measure about itself for support services, and simulated cartridges that
//! drain as the simulator prints.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Device information a support service may ask for: the agent reads it on events and
/// periodically, and sends each active service exactly the data types it asked for.
pub trait ReadingsSource: Send + Sync + std::fmt::Debug + 'static {
    /// Everything the device can report now, by data type.
    fn read(&self) -> BTreeMap<String, String>;
    /// Changes whenever something worth reporting at once happened (a level crossed a
    /// threshold, a cartridge was replaced).
    fn events(&self) -> watch::Receiver<u64>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cartridge {
    pub colour: String,
    pub cartridge_type: String,
    /// Percent left.
    pub level: u8,
}

/// Simulated cartridges. Each job drains every cartridge by `per_job` percent; crossing one of
/// `thresholds` (or a replacement) is an event. With `auto_replace`, an empty cartridge is
/// replaced before the next job, as an operator would.
#[derive(Debug, Clone)]
pub struct Consumables {
    inner: Arc<Mutex<Inner>>,
    events: Arc<watch::Sender<u64>>,
}

#[derive(Debug)]
struct Inner {
    cartridges: Vec<Cartridge>,
    per_job: u8,
    thresholds: Vec<u8>,
    pages: u64,
    auto_replace: bool,
}

impl Consumables {
    pub fn new(cartridges: Vec<Cartridge>, per_job: u8, thresholds: Vec<u8>) -> Consumables {
        Consumables {
            inner: Arc::new(Mutex::new(Inner {
                cartridges,
                per_job,
                thresholds,
                pages: 0,
                auto_replace: false,
            })),
            events: Arc::new(watch::channel(0).0),
        }
    }

    /// Replace empty cartridges before the next job.
    pub fn with_auto_replace(self) -> Consumables {
        self.lock().auto_replace = true;
        self
    }

    /// Four full cartridges of a colour printer, 2 % per job, events at 20, 10 and 0 %; empty
    /// ones are replaced.
    pub fn colour_printer() -> Consumables {
        let c = |colour: &str, t: &str| Cartridge {
            colour: colour.into(),
            cartridge_type: t.into(),
            level: 100,
        };
        Consumables::new(
            vec![
                c("black", "TN-900K"),
                c("cyan", "TN-900C"),
                c("magenta", "TN-900M"),
                c("yellow", "TN-900Y"),
            ],
            2,
            vec![20, 10, 0],
        )
        .with_auto_replace()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One job printed.
    pub fn printed(&self) {
        let crossed = {
            let mut inner = self.lock();
            inner.pages += 1;
            let (per_job, thresholds) = (inner.per_job, inner.thresholds.clone());
            let mut crossed = false;
            if inner.auto_replace {
                for c in inner.cartridges.iter_mut().filter(|c| c.level == 0) {
                    c.level = 100;
                    crossed = true;
                }
            }
            for c in &mut inner.cartridges {
                let before = c.level;
                c.level = c.level.saturating_sub(per_job);
                crossed |= thresholds.iter().any(|t| before > *t && c.level <= *t);
            }
            crossed
        };
        if crossed {
            self.events.send_modify(|n| *n += 1);
        }
    }

    /// A cartridge was replaced with a full one.
    pub fn replace(&self, colour: &str) {
        let found = {
            let mut inner = self.lock();
            let c = inner.cartridges.iter_mut().find(|c| c.colour == colour);
            c.map(|c| c.level = 100).is_some()
        };
        if found {
            self.events.send_modify(|n| *n += 1);
        }
    }

    pub fn cartridges(&self) -> Vec<Cartridge> {
        self.lock().cartridges.clone()
    }
}

impl ReadingsSource for Consumables {
    /// Lists aligned by cartridge: `colour` `black,cyan,…`, `cartridge_type`, `level`; and
    /// `page_count`.
    fn read(&self) -> BTreeMap<String, String> {
        let inner = self.lock();
        let join = |f: &dyn Fn(&Cartridge) -> String| {
            inner.cartridges.iter().map(f).collect::<Vec<_>>().join(",")
        };
        BTreeMap::from([
            ("colour".to_owned(), join(&|c| c.colour.clone())),
            (
                "cartridge_type".to_owned(),
                join(&|c| c.cartridge_type.clone()),
            ),
            ("level".to_owned(), join(&|c| c.level.to_string())),
            ("page_count".to_owned(), inner.pages.to_string()),
        ])
    }

    fn events(&self) -> watch::Receiver<u64> {
        self.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crossing_a_threshold_and_replacing_are_events() {
        let c = Consumables::new(
            vec![Cartridge {
                colour: "black".into(),
                cartridge_type: "TN".into(),
                level: 24,
            }],
            3,
            vec![20],
        );
        let rx = c.events();
        c.printed(); // 21
        assert!(!rx.has_changed().unwrap());
        c.printed(); // 18: crossed
        assert!(rx.has_changed().unwrap());
        assert_eq!(c.read()["level"], "18");
        assert_eq!(c.read()["page_count"], "2");
        let mut rx = c.events();
        rx.mark_unchanged();
        c.replace("black");
        assert!(rx.has_changed().unwrap());
        assert_eq!(c.cartridges()[0].level, 100);
    }

    #[test]
    fn empty_cartridges_are_replaced_before_the_next_job() {
        let c = Consumables::new(
            vec![Cartridge {
                colour: "black".into(),
                cartridge_type: "TN".into(),
                level: 5,
            }],
            10,
            vec![0],
        )
        .with_auto_replace();
        c.printed(); // 0
        assert_eq!(c.cartridges()[0].level, 0);
        let mut rx = c.events();
        rx.mark_unchanged();
        c.printed(); // replaced, then 90
        assert_eq!(c.cartridges()[0].level, 90);
        assert!(rx.has_changed().unwrap());
    }
}
