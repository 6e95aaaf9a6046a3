//! Operations across shards under concurrency: moves and releases (which lock two shards, or
//! the registry and a shard) against submissions and device traffic, from several threads at
//! once, seeded, many rounds. No deadlock, every job in exactly one device's queue (the one
//! it belongs to, in the right shard, and so in the directory), no held job released twice,
//! and memory equal to what a reload of the store finds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use schemas::api::SubmitHeldJob;
use schemas::job::JobUpdate;
use schemas::print::HeldState;
use schemas::{DeviceId, JobId, Secret, UnixMillis, UserId};

use super::state::{JobHome, shard_of};
use super::tests::{T0, new_job, policy, registered};
use super::{Core, NewPrincipal, Principal};
use crate::store::{Committer, MemStore};

/// What the threads share: the core, and the ids they pick from.
struct World {
    core: Core,
    devices: Vec<DeviceId>,
    users: Vec<UserId>,
    jobs: Mutex<Vec<JobId>>,
    held: Mutex<Vec<JobId>>,
    released: Mutex<Vec<JobId>>,
    moves: AtomicU64,
    /// A clock every thread advances, so that leases and TTLs fall due during the run.
    clock: AtomicU64,
}

impl World {
    fn now(&self) -> UnixMillis {
        UnixMillis(self.clock.fetch_add(7, Ordering::SeqCst))
    }

    fn pick<T: Clone>(&self, rng: &mut StdRng, from: &Mutex<Vec<T>>) -> Option<T> {
        let list = from.lock().unwrap();
        (!list.is_empty()).then(|| list[rng.random_range(0..list.len())].clone())
    }

    fn device(&self, rng: &mut StdRng) -> DeviceId {
        self.devices[rng.random_range(0..self.devices.len())].clone()
    }

    /// One random operation; refusals (a job no longer queued, a lease lost) are part of the
    /// game, only the invariants afterwards count.
    fn step(&self, rng: &mut StdRng) {
        let now = self.now();
        match rng.random_range(0..10) {
            0 | 1 => {
                if let Ok((job, ..)) = self.core.submit_job(&self.device(rng), new_job(), now) {
                    self.jobs.lock().unwrap().push(job.job_id);
                }
            }
            2 => {
                let user = &self.users[rng.random_range(0..self.users.len())];
                let req = SubmitHeldJob {
                    title: Some("report".into()),
                    ..SubmitHeldJob::default()
                };
                if let Ok((held, ..)) = self.core.submit_held(user, req, b"%PDF".to_vec(), now) {
                    self.held.lock().unwrap().push(held.job_id);
                }
            }
            3 | 4 => {
                if let Some(job) = self.pick(rng, &self.jobs) {
                    let to = self.device(rng);
                    if self
                        .core
                        .move_job(&Principal::Admin, &job, &to, now)
                        .is_ok()
                    {
                        self.moves.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            5 => {
                let n = rng.random_range(0..self.users.len());
                let device = self.device(rng);
                let token = Secret::new(format!("session-{}", rng.random::<u64>()));
                let pin = Secret::new(format!("pin-{n}"));
                if self
                    .core
                    .login(&device, &self.users[n], &pin, &token, now)
                    .is_err()
                {
                    return;
                }
                let mut wanted: Vec<JobId> =
                    (0..3).filter_map(|_| self.pick(rng, &self.held)).collect();
                wanted.sort();
                wanted.dedup();
                if wanted.is_empty() {
                    return;
                }
                if let Ok((released, ..)) = self.core.release(&device, &token, &wanted, now) {
                    self.released
                        .lock()
                        .unwrap()
                        .extend(released.iter().cloned());
                    self.jobs.lock().unwrap().extend(released);
                }
            }
            6 | 7 => {
                if let Some(job) = self.pick(rng, &self.jobs)
                    && let Ok(record) = self.core.job(&job)
                    && let Ok((offer, ..)) = self.core.fetch_job(&record.device_id, &job, true, now)
                {
                    let done = JobUpdate::Succeeded { detail: None };
                    let _ = self
                        .core
                        .update_job(&record.device_id, &job, offer.attempt, done, now);
                }
            }
            8 => {
                if let Some(job) = self.pick(rng, &self.jobs) {
                    let _ = self.core.cancel_job(&job, None, now);
                }
            }
            _ => {
                let _ = self.core.expire_due(now);
            }
        }
    }
}

fn world() -> World {
    let committer = Committer::new(Arc::new(MemStore::default()), Duration::ZERO);
    let core = Core::load(committer, policy(), 4).unwrap();
    let devices = (1..=8).map(|n| registered(&core, n)).collect();
    let users = (0..3u8)
        .map(|n| {
            let id = UserId::from_random([n + 100; 8]);
            let pin = Secret::new(format!("pin-{n}"));
            let token = Secret::new(format!("user-token-{n}"));
            let new = NewPrincipal::new(id.clone(), format!("user {n}"), token);
            core.create_user(&new, &pin, T0).unwrap();
            id
        })
        .collect();
    World {
        core,
        devices,
        users,
        jobs: Mutex::new(Vec::new()),
        held: Mutex::new(Vec::new()),
        released: Mutex::new(Vec::new()),
        moves: AtomicU64::new(0),
        clock: AtomicU64::new(T0.0),
    }
}

fn check_invariants(w: &World, seed: u64) {
    let core = &w.core;
    // Every job is in exactly one list: its device's, in that device's shard.
    let mut seen: BTreeMap<JobId, DeviceId> = BTreeMap::new();
    let mut records = 0;
    for (i, shard) in core.shards.iter().enumerate() {
        let shard = shard.lock().unwrap();
        records += shard.jobs.len();
        for (device, list) in &shard.device_jobs {
            assert_eq!(shard_of(device, core.shards.len()), i, "seed {seed}");
            for job in list {
                let record = &shard.jobs[job];
                assert_eq!(
                    &record.device_id, device,
                    "seed {seed}: {job} listed for another device"
                );
                let again = seen.insert(job.clone(), device.clone());
                assert!(again.is_none(), "seed {seed}: {job} is in two queues");
            }
        }
    }
    assert_eq!(seen.len(), records, "seed {seed}: a job in no queue");
    assert_eq!(
        core.jobs.len(),
        records,
        "seed {seed}: the directory miscounts"
    );
    for (job, device) in &seen {
        assert_eq!(
            core.jobs.get(job),
            Some(JobHome::Device(device.clone())),
            "seed {seed}"
        );
    }
    assert_eq!(
        core.jobs.claims(),
        0,
        "seed {seed}: a claim outlived its transaction"
    );
    // No held job was released twice, and each release made exactly one job.
    let released = w.released.lock().unwrap();
    let once: BTreeSet<&JobId> = released.iter().collect();
    assert_eq!(
        once.len(),
        released.len(),
        "seed {seed}: a held job was released twice"
    );
    core.with_registry(|r| {
        for job in &once {
            assert!(
                matches!(r.held[*job].state, HeldState::Released { .. }),
                "seed {seed}"
            );
            // Open (in memory), or finished (on disk only).
            let finished = || {
                core.stored_job(job)
                    .unwrap()
                    .is_some_and(|j| j.state.is_terminal())
            };
            assert!(
                seen.contains_key(*job) || finished(),
                "seed {seed}: released {job} is no job"
            );
        }
        let marked = r
            .held
            .values()
            .filter(|h| matches!(h.state, HeldState::Released { .. }))
            .count();
        assert_eq!(
            marked,
            once.len(),
            "seed {seed}: a release was not reported"
        );
    });
    core.check_job_indexes()
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    // And memory is what the store holds.
    let reloaded = Core::load(core.committer.clone(), policy(), 4).unwrap();
    assert_eq!(core.snapshot(), reloaded.snapshot(), "seed {seed}");
}

#[test]
fn moves_and_releases_across_shards_race_submissions_and_device_traffic() {
    let mut totals = (0, 0, 0);
    for seed in 0..12u64 {
        let w = Arc::new(world());
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        for thread in 0..4u64 {
            let w = w.clone();
            let done = done_tx.clone();
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed * 16 + thread);
                for _ in 0..400 {
                    w.step(&mut rng);
                }
                let _ = done.send(());
            });
        }
        for _ in 0..4 {
            done_rx
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("seed {seed}: a thread is stuck (a deadlock?)"));
        }
        check_invariants(&w, seed);
        totals.0 += w.jobs.lock().unwrap().len();
        totals.1 += w.released.lock().unwrap().len();
        totals.2 += w.moves.load(Ordering::Relaxed);
    }
    // The run did what it is about: (jobs, releases, moves).
    assert!(totals.0 > 1000, "{totals:?}");
    assert!(
        totals.1 > 50,
        "only {} held jobs were released: {totals:?}",
        totals.1
    );
    assert!(
        totals.2 > 200,
        "only {} jobs were moved: {totals:?}",
        totals.2
    );
}
