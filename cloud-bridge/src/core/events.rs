//! Ops events in the order their changes were made, each held until the flush that covers it.
//!
//! A transaction's events are queued as its batch is applied, before the next batch (see
//! [`crate::store::Committer::apply_then`]), so the queue's order is the store's order across
//! all shards; events that belong to no transaction (presence) are queued behind everything
//! applied when they happen. The bridge's publisher releases events oldest first, each once
//! its ticket is durable, to the notifier's queue, which publishes in order. So a watcher sees
//! the events of one bridge in the order of the changes they describe: a job's transitions in
//! order, an application's registrations before its settlement.
//!
//! Events are observations: past the capacity, new ones are dropped and counted.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use schemas::ops::OpsEvent;
use tokio::sync::Notify;

use crate::store::Ticket;

/// Events waiting for durability, at most this many.
pub(super) const OPS_QUEUE_CAPACITY: usize = 1 << 16;

#[derive(Debug)]
pub struct OpsQueue {
    waiting: Mutex<VecDeque<(Ticket, OpsEvent)>>,
    capacity: usize,
    dropped: AtomicU64,
    queued: Notify,
}

impl OpsQueue {
    pub fn new(capacity: usize) -> OpsQueue {
        OpsQueue {
            waiting: Mutex::new(VecDeque::new()),
            capacity,
            dropped: AtomicU64::new(0),
            queued: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Ticket, OpsEvent)>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `events` behind everything queued so far, to be released once `ticket` (or
    /// the newest ticket queued before, if later) is durable.
    pub fn push(&self, ticket: Ticket, events: impl IntoIterator<Item = OpsEvent>) {
        let mut waiting = self.lock();
        let ticket = waiting.back().map_or(ticket, |(t, _)| ticket.max(*t));
        let before = waiting.len();
        for event in events {
            if waiting.len() >= self.capacity {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            waiting.push_back((ticket, event));
        }
        let grew = waiting.len() > before;
        drop(waiting);
        if grew {
            self.queued.notify_one();
        }
    }

    /// Waits until an event is queued; the ticket that covers every event queued so far.
    pub async fn next(&self) -> Ticket {
        loop {
            if let Some((ticket, _)) = self.lock().back() {
                return *ticket;
            }
            self.queued.notified().await;
        }
    }

    /// Removes and returns, oldest first, the events that `durable` covers.
    pub fn release(&self, durable: Ticket) -> Vec<OpsEvent> {
        let mut waiting = self.lock();
        let covered = waiting.partition_point(|(t, _)| *t <= durable);
        waiting.drain(..covered).map(|(_, e)| e).collect()
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use schemas::{DeviceId, UnixMillis};

    use super::*;
    use crate::store::{Batch, Committer, MemStore};

    /// An event that carries a number, to check the order it comes out in.
    fn numbered(n: u64) -> OpsEvent {
        OpsEvent::DeviceDisabled {
            device_id: DeviceId::from_random([1; 8]),
            at: UnixMillis(n),
        }
    }

    fn number(e: &OpsEvent) -> u64 {
        match e {
            OpsEvent::DeviceDisabled { at, .. } => at.0,
            other => panic!("{other:?}"),
        }
    }

    fn one_write(key: &str) -> Batch {
        let mut batch = Batch::default();
        batch.put(key, vec![1]);
        batch
    }

    #[test]
    fn an_event_waits_for_its_ticket_and_for_every_event_queued_before_it() {
        let committer = Committer::new(Arc::new(MemStore::default()), Duration::ZERO);
        let queue = OpsQueue::new(16);
        let first = committer.apply(one_write("a")).unwrap();
        let second = committer.apply(one_write("b")).unwrap();
        queue.push(second, [numbered(2)]);
        // Queued later under an older ticket: it still comes after the event before it.
        queue.push(first, [numbered(1)]);
        assert!(queue.release(first).is_empty());
        let out: Vec<u64> = queue.release(second).iter().map(number).collect();
        assert_eq!(out, [2, 1]);
        assert!(queue.release(second).is_empty(), "released once");
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let committer = Committer::new(Arc::new(MemStore::default()), Duration::ZERO);
        let queue = OpsQueue::new(2);
        let t = committer.apply(one_write("a")).unwrap();
        queue.push(t, (1..=3).map(numbered));
        assert_eq!(queue.dropped(), 1);
        assert_eq!(queue.release(t).len(), 2);
    }

    #[test]
    fn events_of_concurrent_commits_queue_in_the_store_order() {
        let committer = Committer::new(Arc::new(MemStore::default()), Duration::ZERO);
        let queue = OpsQueue::new(1 << 16);
        std::thread::scope(|s| {
            for thread in 0..4 {
                let (committer, queue) = (&committer, &queue);
                s.spawn(move || {
                    for i in 0..500 {
                        committer
                            .apply_then(one_write(&format!("{thread}/{i}")), |t| {
                                queue.push(t, [numbered(t.number())]);
                            })
                            .unwrap();
                    }
                });
            }
        });
        let out: Vec<u64> = queue
            .release(committer.current())
            .iter()
            .map(number)
            .collect();
        assert_eq!(out, (1..=2000).collect::<Vec<u64>>());
    }

    #[tokio::test]
    async fn next_waits_for_an_event() {
        let committer = Committer::new(Arc::new(MemStore::default()), Duration::ZERO);
        let queue = Arc::new(OpsQueue::new(16));
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.next().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let t = committer.apply(one_write("a")).unwrap();
        queue.push(t, [numbered(1)]);
        let covering = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("next() did not wake")
            .unwrap();
        assert_eq!(covering, t);
    }
}
