//! The working state in memory, in three parts with a lock each:
//!
//! - a [`Shard`] per group of devices: their records, their jobs, contracts, and the lease, TTL
//!   and owner-check deadlines of those. A device always lives in the shard
//!   [`shard_of`] names, so an operation on one device locks one shard;
//! - the [`Registry`]: what belongs to no single device (enrollment tokens, owners,
//!   companions, services, applications, instructions, users and their held jobs, print
//!   sessions, ops logins);
//! - the [`JobDirectory`]: which device (or user) each job id belongs to, so that a job is
//!   found by its id alone and ids are never given twice.
//!
//! Memory holds records and indexes derived from them. The records change only through the
//! `install_*` functions, which [`super::tx::Tx::commit`] calls once the store has accepted the
//! batch that writes them; the indexes follow from the old and the new record, so they cannot
//! drift from the records.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use schemas::job::JobState;
use schemas::print::{HeldJobRecord, UserRecord};
use schemas::records::{
    CompanionRecord, DeviceRecord, EnrollmentRecord, JobRecord, OpsLoginRecord, OwnerRecord,
};
use schemas::services::{ApplicationRecord, ContractRecord, InstructionRecord, ServiceRecord};
use schemas::{
    ApplicationId, CompanionId, DeviceId, InstructionId, JobId, OpsId, OwnerId, UnixMillis, UserId,
};

use super::Principal;

/// The shard a device's state lives in: FNV-1a of its id, mixed (FNV's low bits depend on
/// the low bits of the input alone), modulo the shard count. Stable across runs and machines,
/// so that shards can later be handed between bridge instances.
pub(crate) fn shard_of(device: &DeviceId, shards: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in device.as_str().bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // MurmurHash3's finalizer.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^= hash >> 33;
    (hash % shards.max(1) as u64) as usize
}

/// The shard count that fits this machine: four per core, so that devices spread over more
/// locks than there are threads to contend for them.
pub fn default_shards() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) * 4
}

/// The state of a group of devices.
#[derive(Debug, Default)]
pub(crate) struct Shard {
    pub(crate) devices: HashMap<DeviceId, DeviceRecord>,
    pub(crate) jobs: HashMap<JobId, JobRecord>,
    /// Each device's jobs, oldest first (by submission time, then id).
    pub(crate) device_jobs: HashMap<DeviceId, Vec<JobId>>,
    pub(crate) idempotency: HashMap<(DeviceId, String), JobId>,
    /// (deadline, job) for every leased job.
    pub(crate) leases: BTreeSet<(UnixMillis, JobId)>,
    /// (expires_at, job) for every job not yet started.
    pub(crate) expiries: BTreeSet<(UnixMillis, JobId)>,
    /// (deadline, device) for every owner check under way.
    pub(crate) owner_checks: BTreeSet<(UnixMillis, DeviceId)>,
    /// (device, service) → contract; ordered so that a device's contracts are one range.
    pub(crate) contracts: BTreeMap<(DeviceId, String), ContractRecord>,
}

impl Shard {
    pub(crate) fn install_device(&mut self, new: DeviceRecord) {
        let id = new.device_id.clone();
        if let Some(check) = self.devices.get(&id).and_then(|d| d.owner_check.as_ref()) {
            self.owner_checks.remove(&(check.deadline, id.clone()));
        }
        if let Some(check) = &new.owner_check {
            self.owner_checks.insert((check.deadline, id.clone()));
        }
        self.devices.insert(id, new);
    }

    /// Installs a job's new version; the old one, if any, is in this shard already.
    pub(crate) fn install_job(&mut self, new: JobRecord) {
        let old = self.remove_indexes(&new.job_id, Some(&new.device_id));
        if old.is_none_or(|d| d != new.device_id) {
            // In submission order (then id), wherever the job came from: the same order a
            // load from the store gives.
            let list = self.device_jobs.entry(new.device_id.clone()).or_default();
            let jobs = &self.jobs;
            let key = (new.created_at, &new.job_id);
            let before = |id: &JobId| {
                jobs.get(id)
                    .is_none_or(|j| (j.created_at, &j.job_id) <= key)
            };
            // A new job is almost always the newest: appended without a search.
            if list.last().is_none_or(before) {
                list.push(new.job_id.clone());
            } else {
                let at = list.partition_point(before);
                list.insert(at, new.job_id.clone());
            }
            if let Some(key) = &new.idempotency_key {
                self.idempotency
                    .entry((new.device_id.clone(), key.clone()))
                    .or_insert_with(|| new.job_id.clone());
            }
        }
        if let Some(until) = new.lease_until
            && matches!(new.state, JobState::Delivered | JobState::InProgress)
        {
            self.leases.insert((until, new.job_id.clone()));
        }
        if matches!(new.state, JobState::Queued | JobState::Delivered) {
            self.expiries.insert((new.expires_at, new.job_id.clone()));
        }
        self.jobs.insert(new.job_id.clone(), new);
    }

    /// Removes a job that moved to another shard.
    pub(crate) fn remove_job(&mut self, id: &JobId) {
        self.remove_indexes(id, None);
        self.jobs.remove(id);
    }

    /// Takes the old version of a job out of the deadline indexes and, unless it stays with
    /// the same device, out of its device's lists. Returns the old version's device.
    fn remove_indexes(&mut self, id: &JobId, staying_with: Option<&DeviceId>) -> Option<DeviceId> {
        let old = self.jobs.get(id)?;
        if let Some(until) = old.lease_until {
            self.leases.remove(&(until, id.clone()));
        }
        self.expiries.remove(&(old.expires_at, id.clone()));
        if staying_with != Some(&old.device_id) {
            if let Some(list) = self.device_jobs.get_mut(&old.device_id) {
                list.retain(|j| j != id);
            }
            if let Some(key) = &old.idempotency_key {
                let slot = (old.device_id.clone(), key.clone());
                if self.idempotency.get(&slot) == Some(id) {
                    self.idempotency.remove(&slot);
                }
            }
        }
        Some(old.device_id.clone())
    }

    pub(crate) fn install_contract(&mut self, new: ContractRecord) {
        self.contracts
            .insert((new.device_id.clone(), new.service_id.clone()), new);
    }

    /// A device's contracts, by service id.
    pub(crate) fn device_contracts(&self, device: &DeviceId) -> Vec<ContractRecord> {
        self.contracts
            .range((device.clone(), String::new())..)
            .take_while(|((d, _), _)| d == device)
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// When this shard's next lease, TTL or owner check falls due, if any.
    pub(crate) fn next_deadline(&self) -> Option<UnixMillis> {
        let lease = self.leases.first().map(|(t, _)| *t);
        let expiry = self.expiries.first().map(|(t, _)| *t);
        let check = self.owner_checks.first().map(|(t, _)| *t);
        [lease, expiry, check].into_iter().flatten().min()
    }
}

/// A user logged in at a device's panel. Sessions live in memory only: after a restart of
/// the bridge users log in again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PrintSession {
    pub(crate) user_id: UserId,
    pub(crate) device_id: DeviceId,
    pub(crate) expires_at: UnixMillis,
}

/// What belongs to no single device.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    pub(crate) enrollments: HashMap<String, EnrollmentRecord>,
    pub(crate) owners: HashMap<OwnerId, OwnerRecord>,
    pub(crate) companions: HashMap<CompanionId, CompanionRecord>,
    /// SHA-256 of an owner's, companion's or user's API token → who it is.
    pub(crate) tokens: HashMap<String, Principal>,
    pub(crate) services: BTreeMap<String, ServiceRecord>,
    pub(crate) applications: HashMap<ApplicationId, ApplicationRecord>,
    /// SHA-256 of a registration code → the application and device it was issued for.
    pub(crate) codes: HashMap<String, (ApplicationId, DeviceId)>,
    pub(crate) instructions: HashMap<InstructionId, InstructionRecord>,
    pub(crate) users: HashMap<UserId, UserRecord>,
    pub(crate) held: HashMap<JobId, HeldJobRecord>,
    /// SHA-256 of a print session's token → the session.
    pub(crate) sessions: HashMap<String, PrintSession>,
    pub(crate) ops_logins: HashMap<OpsId, OpsLoginRecord>,
}

impl Registry {
    pub(crate) fn install_enrollment(&mut self, e: EnrollmentRecord) {
        self.enrollments.insert(e.token_sha256.clone(), e);
    }

    pub(crate) fn install_service(&mut self, s: ServiceRecord) {
        self.services.insert(s.service_id.clone(), s);
    }

    pub(crate) fn install_instruction(&mut self, i: InstructionRecord) {
        self.instructions.insert(i.instruction_id.clone(), i);
    }

    pub(crate) fn install_held(&mut self, h: HeldJobRecord) {
        self.held.insert(h.job_id.clone(), h);
    }

    pub(crate) fn install_ops_login(&mut self, q: OpsLoginRecord) {
        self.ops_logins.insert(q.ops_id.clone(), q);
    }

    pub(crate) fn install_owner(&mut self, o: OwnerRecord) {
        self.tokens
            .insert(o.token_sha256.clone(), Principal::Owner(o.owner_id.clone()));
        self.owners.insert(o.owner_id.clone(), o);
    }

    pub(crate) fn install_companion(&mut self, c: CompanionRecord) {
        self.tokens.insert(
            c.token_sha256.clone(),
            Principal::Companion(c.companion_id.clone()),
        );
        self.companions.insert(c.companion_id.clone(), c);
    }

    pub(crate) fn install_user(&mut self, u: UserRecord) {
        if !u.token_sha256.is_empty() {
            self.tokens
                .insert(u.token_sha256.clone(), Principal::User(u.user_id.clone()));
        }
        self.users.insert(u.user_id.clone(), u);
    }

    pub(crate) fn install_application(&mut self, app: ApplicationRecord) {
        for e in &app.devices {
            self.codes.insert(
                e.code_sha256.clone(),
                (app.application_id.clone(), e.device_id.clone()),
            );
        }
        self.applications.insert(app.application_id.clone(), app);
    }
}

/// Where a job id belongs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum JobHome {
    /// Taken by a transaction under way; becomes one of the others when it commits, and is
    /// freed when it does not.
    Claimed,
    Device(DeviceId),
    /// A held job in a user's virtual printer (the registry's `held`).
    Held,
}

/// Job id → where the job is, for every job and held job. Split over a few locks of its own,
/// each held only for one map operation.
#[derive(Debug)]
pub(crate) struct JobDirectory {
    parts: Box<[Mutex<HashMap<JobId, JobHome>>]>,
    /// How many entries are jobs of a device (for `/v1/health`, without a scan).
    device_jobs: std::sync::atomic::AtomicUsize,
    /// The greatest job id given or known, as a number.
    last_id: std::sync::atomic::AtomicU64,
}

const DIRECTORY_PARTS: usize = 16;

impl Default for JobDirectory {
    fn default() -> Self {
        JobDirectory {
            parts: (0..DIRECTORY_PARTS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            device_jobs: std::sync::atomic::AtomicUsize::new(0),
            last_id: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl JobDirectory {
    fn part(&self, id: &JobId) -> std::sync::MutexGuard<'_, HashMap<JobId, JobHome>> {
        let low = id.as_str().bytes().last().unwrap_or(0);
        self.parts[usize::from(low) % DIRECTORY_PARTS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn get(&self, id: &JobId) -> Option<JobHome> {
        self.part(id).get(id).cloned()
    }

    /// Whether `id` is a job of `device` (without copying the entry).
    pub(crate) fn belongs_to(&self, id: &JobId, device: &DeviceId) -> bool {
        matches!(self.part(id).get(id), Some(JobHome::Device(d)) if d == device)
    }

    pub(crate) fn set(&self, id: JobId, home: JobHome) {
        use std::sync::atomic::Ordering::Relaxed;
        let is_job = matches!(home, JobHome::Device(_));
        let was_job = matches!(self.part(&id).insert(id, home), Some(JobHome::Device(_)));
        match (was_job, is_job) {
            (false, true) => self.device_jobs.fetch_add(1, Relaxed),
            (true, false) => self.device_jobs.fetch_sub(1, Relaxed),
            _ => 0,
        };
    }

    /// Claims `id` if no job has it.
    pub(crate) fn claim(&self, id: &JobId) -> bool {
        let mut part = self.part(id);
        if part.contains_key(id) {
            return false;
        }
        part.insert(id.clone(), JobHome::Claimed);
        true
    }

    /// Frees a claim that did not become a job.
    pub(crate) fn unclaim(&self, id: &JobId) {
        let mut part = self.part(id);
        if part.get(id) == Some(&JobHome::Claimed) {
            part.remove(id);
        }
    }

    /// How many jobs of devices there are.
    pub(crate) fn len(&self) -> usize {
        self.device_jobs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many claims are under way.
    #[cfg(test)]
    pub(crate) fn claims(&self) -> usize {
        self.parts
            .iter()
            .map(|p| {
                let p = p.lock().unwrap_or_else(|p| p.into_inner());
                p.values().filter(|h| **h == JobHome::Claimed).count()
            })
            .sum()
    }

    /// Every settled entry, sorted (claims under way are left out).
    #[cfg(test)]
    pub(crate) fn snapshot(&self) -> String {
        let mut all: Vec<(JobId, JobHome)> = Vec::new();
        for p in self.parts.iter() {
            let p = p.lock().unwrap_or_else(|p| p.into_inner());
            all.extend(
                p.iter()
                    .filter(|(_, h)| **h != JobHome::Claimed)
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        format!("{all:?}")
    }

    /// Claims a new job id: the time in milliseconds (48 bits) then 16 random bits, and
    /// greater than every id given before (in this run, and, through [`Self::note_id`] at
    /// load, in the store). Ids, and the store's `j/` and `p/` keys, grow with time, so new
    /// jobs land in the store's newest pages instead of anywhere in the key space; and since a
    /// finished job leaves the directory, growing ids are what keeps a new id from being one a
    /// finished job still has on disk. A millisecond crowded with jobs, or a clock set back,
    /// takes the next number up.
    pub(crate) fn claim_fresh(&self, now: UnixMillis) -> JobId {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        loop {
            let drawn = (now.0 << 16) | u64::from(rand::random::<u16>());
            let previous = self
                .last_id
                .fetch_update(AcqRel, Acquire, |last| {
                    Some(drawn.max(last.saturating_add(1)))
                })
                .unwrap_or_else(|last| last);
            let id = job_id_of(drawn.max(previous.saturating_add(1)));
            if self.claim(&id) {
                return id;
            }
        }
    }

    /// Makes every id [`Self::claim_fresh`] gives from now on greater than `id`.
    pub(crate) fn note_id(&self, id: &JobId) {
        if let Some(value) = job_id_value(id) {
            self.last_id
                .fetch_max(value, std::sync::atomic::Ordering::AcqRel);
        }
    }

    /// Forgets a job that finished (it is on disk only from now on).
    pub(crate) fn remove(&self, id: &JobId) {
        if matches!(self.part(id).remove(id), Some(JobHome::Device(_))) {
            self.device_jobs
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The number a job id spells (its 16 hex digits).
pub(crate) fn job_id_value(id: &JobId) -> Option<u64> {
    let digits = id.as_str().strip_prefix(JobId::PREFIX)?;
    u64::from_str_radix(digits, 16).ok()
}

fn job_id_of(value: u64) -> JobId {
    JobId::from_random(value.to_be_bytes())
}

/// The job id of a millisecond and 16 low bits.
#[cfg(test)]
pub(crate) fn job_id_at(millis: u64, low: u16) -> JobId {
    job_id_of((millis << 16) | u64::from(low))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_grow_with_time() {
        let dir = JobDirectory::default();
        let t = UnixMillis(1_790_000_000_000);
        let ids: Vec<JobId> = (0..50)
            .map(|i| dir.claim_fresh(UnixMillis(t.0 + i)))
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        // The time is in the id (hex of the milliseconds), then random bits.
        assert!(ids[0].as_str().contains(&format!("{:012x}", t.0)));
        assert!(JobId::parse(ids[0].as_str()).is_ok());
    }

    #[test]
    fn ids_never_repeat_one_known_or_given_before_even_with_the_clock_set_back() {
        let dir = JobDirectory::default();
        let t = UnixMillis(1_790_000_000_000);
        // A finished job on disk, newer than the clock now says.
        let on_disk = job_id_at(t.0 + 5_000, 7);
        dir.note_id(&on_disk);
        let first = dir.claim_fresh(t);
        assert!(first > on_disk, "{first} after {on_disk}");
        let mut last = first;
        for _ in 0..1000 {
            let id = dir.claim_fresh(t);
            assert!(id > last, "{id} after {last}");
            last = id;
        }
        assert!(!dir.claim(&last), "the fresh id is claimed");
        // Once the clock is past them, ids are the time again.
        let later = dir.claim_fresh(UnixMillis(t.0 + 60_000));
        assert!(later >= job_id_at(t.0 + 60_000, 0), "{later}");
    }

    #[test]
    fn shards_spread_devices_and_stay_put() {
        // Counting ids, and ids of one repeated byte (the tests' devices): all spread.
        let counting = (0..8000u64).map(|n| DeviceId::from_random(n.to_be_bytes()));
        let mut counts = [0usize; 8];
        for id in counting {
            let s = shard_of(&id, 8);
            assert_eq!(s, shard_of(&id, 8));
            counts[s] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
        let mut used = [false; 4];
        for n in 1..=16u8 {
            used[shard_of(&DeviceId::from_random([n; 8]), 4)] = true;
        }
        assert_eq!(used, [true; 4]);
    }
}
