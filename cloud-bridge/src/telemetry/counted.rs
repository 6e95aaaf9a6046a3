//! What is counted from the ops events as they are released once durable (job transitions,
//! submission→completion times): the bridge feeds it, the scrape (`telemetry/mod.rs`) reads
//! it.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use schemas::ops::OpsEvent;

type StateLabel = [(&'static str, &'static str); 1];

fn completion_histogram() -> Histogram {
    // 1 ms to about 131 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 18))
}

/// What is counted as commits are applied.
#[derive(Debug)]
pub struct Telemetry {
    pub(super) transitions: Family<StateLabel, Counter>,
    pub(super) completion: Family<StateLabel, Histogram, fn() -> Histogram>,
}

impl Default for Telemetry {
    fn default() -> Telemetry {
        Telemetry {
            transitions: Family::default(),
            completion: Family::new_with_constructor(completion_histogram),
        }
    }
}

impl Telemetry {
    /// Counts an event of a commit that is durable.
    pub fn applied(&self, event: &OpsEvent) {
        if let OpsEvent::JobTransition {
            to,
            at,
            submitted_at,
            ..
        } = event
        {
            let label = [("state", to.as_str())];
            self.transitions.get_or_create(&label).inc();
            if to.is_terminal() && submitted_at.0 > 0 {
                let millis = at.0.saturating_sub(submitted_at.0);
                self.completion
                    .get_or_create(&label)
                    .observe(millis as f64 / 1000.0);
            }
        }
    }
}
