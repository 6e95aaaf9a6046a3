//! Storage: a narrow key-value [`Store`] trait, sled behind it, and group commit on top.
//!
//! The domain above keeps its working state in memory and writes every change as one atomic
//! [`Batch`]. Nothing is acknowledged to anyone (HTTP 2xx, data-channel response, hint) until a
//! flush that covers the batch has finished: [`Committer::apply`] returns a ticket and
//! [`Committer::wait_durable`] waits for it. One flush covers every batch applied before it
//! started, so many concurrent writers share each flush (group commit) instead of paying one
//! flush each.
//!
//! sled's flush on Linux uses `sync_file_range`: it survives a killed process (tested with
//! `kill -9`), not necessarily a power loss. Swapping in another engine means implementing
//! [`Store`] for it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Engine(String),
    #[error("a flush to disk failed earlier; refusing to acknowledge anything: {0}")]
    Poisoned(String),
    #[error("stored record under {key} cannot be decoded: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("the data directory is in use by another process or cannot be opened: {0}")]
    Open(String),
}

/// An atomic group of writes.
#[derive(Debug, Default)]
pub struct Batch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: Vec<u8>) {
        self.ops.push((key.into(), Some(value)));
    }

    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), None));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// The operations the bridge needs from a storage engine, and no more.
pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every pair whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Pairs, StoreError>;
    /// Up to `limit` pairs with `start <= key < end`, in key order.
    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Pairs, StoreError>;
    /// Up to `limit` pairs with `start <= key < end`, the greatest key first.
    fn range_back(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Pairs, StoreError>;
    /// The greatest key that starts with `prefix`, if any.
    fn last_key(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Applies all writes of `batch` or none of them. Not yet durable.
    fn apply(&self, batch: Batch) -> Result<(), StoreError>;
    /// Makes everything applied so far durable. Blocking.
    fn flush(&self) -> Result<(), StoreError>;
}

/// sled 0.34 as the embedded store.
#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
}

impl SledStore {
    /// `fsync`: each flush ends with `fdatasync`, so what it covers survives a power cut;
    /// without, with `sync_file_range`, which survives a killed process but not a power cut
    /// (the disk's write cache and the file's size are not made durable). `cache_bytes` is
    /// sled's page cache, counted as the pages' size on disk: sled's memory is several times
    /// that.
    pub fn open(dir: &Path, fsync: bool, cache_bytes: u64) -> Result<SledStore, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            // We flush explicitly before acknowledging; the background flush is only a backstop.
            .flush_every_ms(Some(1000))
            .cache_capacity(cache_bytes)
            .sync_data(fsync)
            .open()
            .map_err(|e| StoreError::Open(format!("{}: {e}", dir.display())))?;
        Ok(SledStore { db })
    }
}

fn engine(e: sled::Error) -> StoreError {
    StoreError::Engine(e.to_string())
}

/// The first `limit` pairs sled's iterator gives, copied out.
fn sled_pairs(
    pairs: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
    limit: usize,
) -> Result<Pairs, StoreError> {
    pairs
        .take(limit)
        .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(engine))
        .collect()
}

impl Store for SledStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key).map_err(engine)?.map(|v| v.to_vec()))
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Pairs, StoreError> {
        sled_pairs(self.db.scan_prefix(prefix), usize::MAX)
    }

    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Pairs, StoreError> {
        sled_pairs(self.db.range(start..end), limit)
    }

    fn range_back(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Pairs, StoreError> {
        sled_pairs(self.db.range(start..end).rev(), limit)
    }

    fn last_key(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.db.scan_prefix(prefix).next_back() {
            Some(r) => Ok(Some(r.map_err(engine)?.0.to_vec())),
            None => Ok(None),
        }
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let mut sled_batch = sled::Batch::default();
        for (k, v) in batch.ops {
            match v {
                Some(v) => sled_batch.insert(k, v),
                None => sled_batch.remove(k),
            }
        }
        self.db.apply_batch(sled_batch).map_err(engine)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(engine)
    }
}

/// An in-memory store for unit tests of the layers above.
#[derive(Debug, Default)]
pub struct MemStore {
    map: std::sync::Mutex<std::collections::BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl MemStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<Vec<u8>, Vec<u8>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The first `limit` pairs of a map's iterator, copied out.
fn copied<'a>(pairs: impl Iterator<Item = (&'a Vec<u8>, &'a Vec<u8>)>, limit: usize) -> Pairs {
    pairs
        .take(limit)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

impl Store for MemStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().get(key).cloned())
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Pairs, StoreError> {
        Ok(self
            .lock()
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Pairs, StoreError> {
        let map = self.lock();
        Ok(copied(map.range(start.to_vec()..end.to_vec()), limit))
    }

    fn range_back(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Pairs, StoreError> {
        let map = self.lock();
        Ok(copied(map.range(start.to_vec()..end.to_vec()).rev(), limit))
    }

    fn last_key(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let map = self.lock();
        let last = map
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix));
        Ok(last.last().map(|(k, _)| k.clone()))
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let mut map = self.lock();
        for (k, v) in batch.ops {
            match v {
                Some(v) => map.insert(k, v),
                None => map.remove(&k),
            };
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A store that fails on demand, for tests of what a failure leaves behind. Batches go to a
/// live map (what reads see, like sled's tree in memory); a flush copies it to the durable map
/// (what a restart would find). A refused batch changes neither; a failed flush leaves the
/// live map ahead of the durable one, as a failed `fsync` would.
/// The reads of a test store that keeps its data in a [`MemStore`] named `live`.
#[cfg(test)]
macro_rules! reads_from_live {
    () => {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.live.get(key)
        }

        fn scan_prefix(&self, prefix: &[u8]) -> Result<Pairs, StoreError> {
            self.live.scan_prefix(prefix)
        }

        fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Pairs, StoreError> {
            self.live.range(start, end, limit)
        }

        fn range_back(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Pairs, StoreError> {
            self.live.range_back(start, end, limit)
        }

        fn last_key(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.live.last_key(prefix)
        }
    };
}

#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct FailingStore {
    live: MemStore,
    durable: Mutex<std::collections::BTreeMap<Vec<u8>, Vec<u8>>>,
    pub(crate) fail_applies: std::sync::atomic::AtomicBool,
    pub(crate) fail_flushes: std::sync::atomic::AtomicBool,
}

#[cfg(test)]
impl FailingStore {
    /// A copy of what reached the disk.
    pub(crate) fn durable(&self) -> MemStore {
        let map = self
            .durable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        MemStore {
            map: Mutex::new(map),
        }
    }
}

#[cfg(test)]
impl Store for FailingStore {
    reads_from_live!();

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        if self.fail_applies.load(Ordering::SeqCst) {
            return Err(StoreError::Engine("injected: the batch was refused".into()));
        }
        self.live.apply(batch)
    }

    fn flush(&self) -> Result<(), StoreError> {
        if self.fail_flushes.load(Ordering::SeqCst) {
            return Err(StoreError::Engine("injected: the flush failed".into()));
        }
        *self.durable.lock().unwrap_or_else(|p| p.into_inner()) = self.live.lock().clone();
        Ok(())
    }
}

/// Which batches are durable.
#[derive(Debug, Clone, PartialEq)]
enum Durable {
    Upto(u64),
    Failed(String),
}

/// What the flusher thread is asked to do.
#[derive(Debug, Default)]
struct Kick {
    /// A waiter wants a flush.
    wanted: bool,
    /// Flush once more and end.
    stop: bool,
}

/// Group commit over a [`Store`].
///
/// Callers apply batches while holding the lock of what they change (so tickets follow the
/// order of changes) and wait for durability after releasing it. One flusher thread serves all
/// waiters. Flushes start at most once per `min_flush_interval`: under load a flush then covers more writes, which saves
/// the engine's per-flush work (for sled: a write, a `sync_file_range`, and waking its IO
/// threads) at the price of at most that interval of latency per durable write. When the last
/// flush is older than the interval, a flush starts at once.
#[derive(Debug)]
pub struct Committer {
    store: Arc<dyn Store>,
    applied: AtomicU64,
    durable: watch::Sender<Durable>,
    kick: Mutex<Kick>,
    kicked: Condvar,
    /// Held while a batch is applied: batches go to the store one at a time.
    writing: Mutex<()>,
    min_flush_interval: Duration,
    flushes: AtomicU64,
    /// How long each flush took, for the metrics scrape.
    flush_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl std::fmt::Debug for dyn Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

/// A position in the apply order; durable once a flush has covered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

#[cfg(test)]
impl Ticket {
    /// How many batches were applied up to and including this one.
    pub(crate) fn number(self) -> u64 {
        self.0
    }
}

impl Committer {
    pub fn new(store: Arc<dyn Store>, min_flush_interval: Duration) -> Arc<Committer> {
        let (durable, _) = watch::channel(Durable::Upto(0));
        Arc::new(Committer {
            store,
            applied: AtomicU64::new(0),
            durable,
            kick: Mutex::new(Kick::default()),
            kicked: Condvar::new(),
            writing: Mutex::new(()),
            min_flush_interval,
            flushes: AtomicU64::new(0),
            // 50 µs to about 1.6 s.
            flush_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(50e-6, 2.0, 16),
            ),
        })
    }

    fn signal(&self, stop: bool) {
        let mut kick = self.kick.lock().unwrap_or_else(|p| p.into_inner());
        kick.wanted = true;
        kick.stop |= stop;
        drop(kick);
        self.kicked.notify_one();
    }

    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    /// Applies a batch and returns the ticket to wait on. Call with the lock of the state the
    /// batch writes held, so that tickets follow the order of the changes. Once a flush has
    /// failed every batch is refused: memory, which changes only after an accepted batch,
    /// then stays what the store holds.
    ///
    /// Batches, from whatever shard, are applied one at a time and take their ticket in the
    /// same step, so tickets follow the store's order. sled applies one batch at a time anyway
    /// (`Tree::apply_batch` takes a process-wide write lock), so this costs no parallelism;
    /// it only moves the wait from sled's locks, which spin before they park, to a mutex here
    /// (measured in BENCHMARKS.md).
    pub fn apply(&self, batch: Batch) -> Result<Ticket, StoreError> {
        self.apply_then(batch, |_| {})
    }

    /// [`Committer::apply`], then `then(ticket)` before the next batch is applied: what
    /// `then` queues is in the store's order. An empty batch writes nothing and gets the
    /// current ticket, without waiting for other batches.
    pub fn apply_then(
        &self,
        batch: Batch,
        then: impl FnOnce(Ticket),
    ) -> Result<Ticket, StoreError> {
        if let Some(failure) = self.failure() {
            return Err(StoreError::Poisoned(failure));
        }
        if batch.is_empty() {
            let ticket = self.current();
            then(ticket);
            return Ok(ticket);
        }
        let _one_writer = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        self.store.apply(batch)?;
        let ticket = Ticket(self.applied.fetch_add(1, Ordering::SeqCst) + 1);
        then(ticket);
        Ok(ticket)
    }

    /// A ticket covering everything applied so far: waiting on it before answering a read
    /// ensures nothing not yet durable is ever shown.
    pub fn current(&self) -> Ticket {
        Ticket(self.applied.load(Ordering::SeqCst))
    }

    /// Why the store stopped accepting writes, once a flush has failed.
    pub fn failure(&self) -> Option<String> {
        match &*self.durable.borrow() {
            Durable::Failed(e) => Some(e.clone()),
            Durable::Upto(_) => None,
        }
    }

    /// How long flushes took (shared: the metrics scrape registers it).
    pub fn flush_seconds(&self) -> &prometheus_client::metrics::histogram::Histogram {
        &self.flush_seconds
    }

    /// Number of flushes done, for metrics and tests of group commit.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Waits until a flush has covered `ticket`.
    pub async fn wait_durable(&self, ticket: Ticket) -> Result<(), StoreError> {
        let mut rx = self.durable.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                Durable::Upto(n) if *n >= ticket.0 => return Ok(()),
                Durable::Failed(e) => return Err(StoreError::Poisoned(e.clone())),
                Durable::Upto(_) => {}
            }
            self.signal(false);
            if rx.changed().await.is_err() {
                return Err(StoreError::Engine("committer stopped".into()));
            }
        }
    }

    /// The flusher: run it as one task for the life of the store. It flushes on a thread of
    /// its own (a flush blocks) and, once `shutdown` is cancelled, flushes a last time and ends.
    pub async fn run_flusher(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let committer = self.clone();
        let thread = std::thread::Builder::new()
            .name("store-flusher".into())
            .spawn(move || committer.flush_loop());
        let thread = match thread {
            Ok(thread) => thread,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the flusher thread");
                self.durable
                    .send_replace(Durable::Failed(format!("no flusher thread: {e}")));
                return;
            }
        };
        shutdown.cancelled().await;
        self.signal(true);
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }

    fn flush_loop(&self) {
        let mut last_start: Option<Instant> = None;
        loop {
            let stop = {
                let mut kick = self.kick.lock().unwrap_or_else(|p| p.into_inner());
                while !kick.wanted {
                    kick = self.kicked.wait(kick).unwrap_or_else(|p| p.into_inner());
                }
                kick.wanted = false;
                kick.stop
            };
            if let Some(at) = last_start
                && !stop
            {
                // Pacing between flushes, not waiting for an event: writes arriving meanwhile
                // join this flush.
                std::thread::sleep(
                    (at + self.min_flush_interval).saturating_duration_since(Instant::now()),
                );
            }
            last_start = Some(Instant::now());
            self.flush_now();
            if stop {
                return;
            }
        }
    }

    fn flush_now(&self) {
        let target = self.applied.load(Ordering::SeqCst);
        if matches!(&*self.durable.borrow(), Durable::Upto(n) if *n >= target) {
            return;
        }
        let started = std::time::Instant::now();
        let result = self.store.flush();
        self.flush_seconds.observe(started.elapsed().as_secs_f64());
        self.flushes.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(()) => {
                self.durable.send_if_modified(|d| match d {
                    Durable::Upto(n) if *n < target => {
                        *n = target;
                        true
                    }
                    _ => false,
                });
            }
            Err(e) => {
                tracing::error!(error = %e, "flush failed; the bridge will acknowledge nothing more");
                self.durable.send_replace(Durable::Failed(e.to_string()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn concurrent_writers_share_flushes() {
        let committer = Committer::new(Arc::new(MemStore::default()), Duration::ZERO);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let flusher = tokio::spawn(committer.clone().run_flusher(shutdown.clone()));
        let mut waiters = Vec::new();
        for i in 0..200u32 {
            let mut batch = Batch::default();
            batch.put(format!("k{i}"), vec![1]);
            let ticket = committer.apply(batch).unwrap();
            let c = committer.clone();
            waiters.push(tokio::spawn(async move { c.wait_durable(ticket).await }));
        }
        for w in waiters {
            w.await.unwrap().unwrap();
        }
        assert!(
            committer.flush_count() < 200,
            "{} flushes for 200 writes",
            committer.flush_count()
        );
        assert_eq!(committer.store().scan_prefix(b"k").unwrap().len(), 200);
        shutdown.cancel();
        flusher.await.unwrap();
    }

    #[tokio::test]
    async fn flushes_are_paced_but_an_idle_store_flushes_at_once() {
        let interval = Duration::from_secs(1);
        let committer = Committer::new(Arc::new(MemStore::default()), interval);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let flusher = tokio::spawn(committer.clone().run_flusher(shutdown.clone()));
        let write = |k: &str| {
            let mut batch = Batch::default();
            batch.put(k, vec![1]);
            committer.apply(batch).unwrap()
        };
        let started = Instant::now();
        committer.wait_durable(write("a")).await.unwrap();
        let first = started.elapsed();
        assert!(first < interval / 2, "the first flush waited {first:?}");
        committer.wait_durable(write("b")).await.unwrap();
        assert!(
            started.elapsed() >= interval,
            "the second flush came {:?} after the first",
            started.elapsed()
        );
        assert_eq!(committer.flush_count(), 2);
        // Stopping flushes what is left.
        let last = write("c");
        shutdown.cancel();
        flusher.await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), committer.wait_durable(last))
            .await
            .expect("the last write was not flushed at shutdown")
            .unwrap();
    }

    /// A store whose first batch waits inside `apply` for a second one to join it.
    #[derive(Debug, Default)]
    struct Meeting {
        live: MemStore,
        inside: Mutex<u32>,
        changed: Condvar,
        met: std::sync::atomic::AtomicBool,
    }

    impl Store for Meeting {
        reads_from_live!();

        fn apply(&self, batch: Batch) -> Result<(), StoreError> {
            let mut inside = self.inside.lock().unwrap();
            *inside += 1;
            if *inside > 1 {
                self.met.store(true, Ordering::SeqCst);
            }
            self.changed.notify_all();
            // The first batch gives a second up to 300 ms to come in beside it.
            let (mut inside, _) = self
                .changed
                .wait_timeout_while(inside, Duration::from_millis(300), |n| *n == 1)
                .unwrap();
            *inside -= 1;
            self.changed.notify_all();
            drop(inside);
            self.live.apply(batch)
        }

        fn flush(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    #[test]
    fn batches_from_many_threads_reach_the_store_one_at_a_time() {
        let store = Arc::new(Meeting::default());
        let committer = Committer::new(store.clone(), Duration::ZERO);
        std::thread::scope(|s| {
            for t in 0..2 {
                let committer = &committer;
                s.spawn(move || {
                    for i in 0..2 {
                        let mut batch = Batch::default();
                        batch.put(format!("k{t}-{i}"), vec![1]);
                        committer.apply(batch).unwrap();
                    }
                });
            }
        });
        assert!(
            !store.met.load(Ordering::SeqCst),
            "two batches were inside the store at once"
        );
        assert_eq!(store.scan_prefix(b"k").unwrap().len(), 4);
        assert_eq!(committer.current(), Ticket(4));
    }

    #[test]
    fn sled_range_and_prefix_respect_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), true, 1 << 20).unwrap();
        let mut batch = Batch::default();
        for k in ["a/1", "a/2", "a/3", "b/1"] {
            batch.put(k, k.as_bytes().to_vec());
        }
        store.apply(batch).unwrap();
        assert_eq!(store.scan_prefix(b"a/").unwrap().len(), 3);
        let r = store.range(b"a/2", b"a/~", 10).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(store.range(b"a/", b"a/~", 1).unwrap().len(), 1);
        store.flush().unwrap();
    }
}
