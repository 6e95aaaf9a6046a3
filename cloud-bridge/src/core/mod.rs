//! The domain: device registry, per-device feeds, and the job lifecycle.
//!
//! [`Core`] is synchronous and takes the time as an argument, so its rules are tested without
//! clocks or sockets. It is shared between threads (`&self` everywhere): its state is split
//! into shards of devices, a registry of what belongs to no single device, and a directory of
//! job ids, each behind its own lock ([`state`]). Every mutation is a staged transaction
//! ([`tx`]): it locks what it touches in one fixed order, stages new records, and installs them
//! in memory only once the store has accepted its batch. The caller ([`crate::bridge::Bridge`])
//! waits for the returned ticket to be durable before it acknowledges anything or publishes
//! the [`Effects`].
//!
//! Rules of the house:
//! - An operation on one device locks that device's shard only; operations that span devices
//!   (moving a job, releasing held jobs, applications, poll-now) name all of them up front.
//! - Nothing is read from the store, and nothing slow is computed (hashes of secrets), while a
//!   lock is held: the only store call under a lock is `apply`, sled's in-memory insert.
//! - Reads copy what they need out of the state and return owned values.
//!
//! The store's keys are listed in [`keys`]. Rules by topic live in submodules: [`devices`]
//! (registration, the feed), [`jobs`] (the job lifecycle, leases and TTLs), [`requests`] (a
//! device's outbox), [`principals`] (owners, companions), [`owner`] (owner confirmation),
//! [`services`] and [`contracts`], [`held`] (pull printing), [`queues`] (moving jobs),
//! [`settings`], [`nudge`] (poll-now), [`ops_logins`].

use std::sync::{Arc, Mutex, RwLock};

use schemas::data::{ErrorBody, ErrorCode};
use schemas::ops::OpsEvent;
use schemas::records::{DeviceRecord, JobRecord};
use schemas::{DeviceId, FeedSeq, JobId};
use sha2::{Digest, Sha256};

use crate::store::{Committer, StoreError, Ticket};

mod audit;
mod census;
#[cfg(test)]
mod concurrency_tests;
mod contracts;
mod devices;
mod events;
#[cfg(test)]
mod failure_tests;
mod held;
mod jobs;
pub mod keys;
mod nudge;
mod ops_logins;
mod owner;
mod principals;
mod queues;
mod requests;
mod retention;
mod services;
mod settings;
mod state;
mod tx;

pub use census::Census;
pub use events::OpsQueue;
pub use ops_logins::OpsLoginFailure;
pub use owner::OwnerVerdict;
pub(crate) use principals::PrincipalRecord;
pub use principals::{NewPrincipal, Principal};
pub use retention::FinishedJob;
pub use services::ServiceRegistration;
pub use state::default_shards;
use state::{JobDirectory, JobHome, Registry, Shard};
use tx::{Access, Tx};

/// Why a domain operation was refused. Each maps to a stable [`ErrorCode`].
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{0}")]
    Refused(ErrorBody),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CoreError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> CoreError {
        CoreError::Refused(ErrorBody::new(code, message))
    }

    pub fn body(&self) -> ErrorBody {
        match self {
            CoreError::Refused(b) => b.clone(),
            CoreError::Store(e) => ErrorBody::new(ErrorCode::Internal, e.to_string()),
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            CoreError::Refused(b) => b.code,
            CoreError::Store(_) => ErrorCode::Internal,
        }
    }
}

pub type CoreResult<T> = Result<T, CoreError>;

/// Policy numbers of the job lifecycle (and of the owner check, which stops jobs).
#[derive(Debug, Clone)]
pub struct JobPolicy {
    /// How long an owner has to confirm after a device's reset or relocation.
    pub owner_check_ms: u64,
    /// The regular poll devices are asked to keep (their mailbox is read at least this often).
    pub poll_interval_secs: u32,
    /// A print session at a device's panel ends after this long unused.
    pub print_session_ms: u64,
    pub lease_ms: u64,
    pub default_ttl_ms: u64,
    pub default_max_attempts: u32,
    pub max_attempts_limit: u32,
}

impl Default for JobPolicy {
    fn default() -> Self {
        JobPolicy {
            owner_check_ms: 10 * 60_000,
            poll_interval_secs: 24 * 3600,
            print_session_ms: 300_000,
            lease_ms: 60_000,
            default_ttl_ms: 24 * 3600 * 1000,
            default_max_attempts: 3,
            max_attempts_limit: 100,
        }
    }
}

/// What to do once a mutation is durable.
#[derive(Debug, Default)]
pub struct Effects {
    /// Devices whose feed grew, with the newest sequence number.
    pub feed_grew: Vec<(DeviceId, FeedSeq)>,
    pub events: Vec<OpsEvent>,
}

/// A new job as the core sees it (the admin API has decoded and checked the request).
#[derive(Debug, Clone)]
pub struct NewJob {
    pub payload: Vec<u8>,
    pub content_type: String,
    pub ttl_ms: Option<u64>,
    pub max_attempts: Option<u32>,
    pub idempotency_key: Option<String>,
    /// [`Principal::label`] of the submitter.
    pub submitted_by: Option<String>,
    pub print: Option<schemas::print::PrintSettings>,
}

impl NewJob {
    /// What makes two submissions the same request: SHA-256 over every field the submitter
    /// chose, and who submitted it (a key never answers one principal with another's job).
    fn fingerprint(&self) -> CoreResult<String> {
        let chosen = (
            &self.content_type,
            self.ttl_ms,
            self.max_attempts,
            &self.print,
            &self.submitted_by,
        );
        let mut hash = Sha256::new();
        hash.update(encode(&chosen)?);
        hash.update(&self.payload);
        Ok(hex(&hash.finalize()))
    }
}

/// The outcome of authenticating a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    UnknownDevice,
    WrongSecret,
    Disabled,
    Invalidated,
}

/// Names given by people (owners, companions, services, users): 1 to 128 characters.
pub(crate) fn check_name(name: &str) -> CoreResult<()> {
    if !(1..=128).contains(&name.chars().count()) {
        return Err(CoreError::new(
            ErrorCode::BadRequest,
            "name must be 1 to 128 characters",
        ));
    }
    Ok(())
}

/// A time to live asked for in seconds (`None`: `default_secs`), kept within 1 s and
/// `max_secs`, in milliseconds.
pub(crate) fn ttl_ms(asked_secs: Option<u64>, default_secs: u64, max_secs: u64) -> u64 {
    asked_secs
        .unwrap_or(default_secs)
        .clamp(1, max_secs)
        .saturating_mul(1000)
}

/// Whether `device`'s printer can honour `print`; refused naming the first setting it cannot,
/// or because the device has registered no printer queue.
fn check_print(device: &DeviceRecord, print: &schemas::print::PrintSettings) -> CoreResult<()> {
    let device_id = &device.device_id;
    let Some(printer) = &device.printer else {
        return Err(CoreError::new(
            ErrorCode::InvalidState,
            format!(
                "device {device_id} has registered no printer queue; print settings cannot be honoured"
            ),
        ));
    };
    print.check(&printer.capabilities).map_err(|e| {
        CoreError::new(
            ErrorCode::UnsupportedSetting,
            format!("device {device_id}: {e}"),
        )
    })
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the cloud keeps of an owner PIN: salted with the device id.
fn owner_pin_hash(device_id: &DeviceId, pin: &str) -> String {
    sha256_hex(format!("{device_id}:{pin}").as_bytes())
}

fn encode<T: serde::Serialize>(v: &T) -> CoreResult<Vec<u8>> {
    schemas::encode(v).map_err(|e| CoreError::Store(StoreError::Engine(e.to_string())))
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(k: &[u8], v: &[u8]) -> Result<T, StoreError> {
    schemas::codec::decode_limited(v, usize::MAX).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(k).into_owned(),
        detail: e.to_string(),
    })
}

/// The devices of `pool` named by `ids`, in that order; an id not in the pool is refused with
/// `missing(id)`.
pub(crate) fn pick_devices(
    pool: &[DeviceRecord],
    ids: &[DeviceId],
    missing: impl Fn(&DeviceId) -> CoreError,
) -> CoreResult<Vec<DeviceRecord>> {
    ids.iter()
        .map(|id| {
            let found = pool.iter().find(|d| d.device_id == *id);
            found.cloned().ok_or_else(|| missing(id))
        })
        .collect()
}

/// Refuses a device that may no longer use its connections, saying why.
pub(crate) fn check_active(device: &DeviceRecord) -> CoreResult<()> {
    let id = &device.device_id;
    if let Some(inv) = &device.invalidated {
        return Err(CoreError::new(
            ErrorCode::DeviceInvalidated,
            format!("device id {id} was invalidated: {}", inv.reason),
        ));
    }
    if device.disabled {
        return Err(CoreError::new(
            ErrorCode::DeviceDisabled,
            format!("device {id} is disabled"),
        ));
    }
    Ok(())
}

/// The working state, backed by the store. See the module documentation.
#[derive(Debug)]
pub struct Core {
    committer: Arc<Committer>,
    policy: JobPolicy,
    registry: RwLock<Registry>,
    shards: Box<[Mutex<Shard>]>,
    /// Each shard's next deadline (unix ms; `u64::MAX`: none), kept by every commit that
    /// changes the shard, so that the reaper finds the next one without taking every lock.
    deadlines: Box<[std::sync::atomic::AtomicU64]>,
    jobs: JobDirectory,
    /// How many jobs of each shard have finished (and left memory) since the start: a look-up
    /// in the store made without the shard's lock is repeated when this moved meanwhile.
    finished: Box<[std::sync::atomic::AtomicU64]>,
    /// Ops events waiting for their changes to be durable, in the order of the changes.
    events: OpsQueue,
}

impl Core {
    /// Loads the state from the store, into `shards` shards (at least one).
    pub fn load(
        committer: Arc<Committer>,
        policy: JobPolicy,
        shards: usize,
    ) -> Result<Core, StoreError> {
        use keys::Kind;
        let store = committer.store();
        let count = shards.max(1);
        let mut parts: Vec<Shard> = (0..count).map(|_| Shard::default()).collect();
        let mut reg = Registry::default();
        let dir = JobDirectory::default();
        retention::index_jobs(&committer)?;
        let mut jobs: Vec<JobRecord> = Vec::new();
        for kind in Kind::ALL {
            if kind.is_index() && kind != Kind::OpenJob {
                continue;
            }
            if matches!(
                kind,
                Kind::Job | Kind::Feed | Kind::DeviceRequest | Kind::Payload | Kind::ConsoleAction
            ) {
                // Read where they are needed, never held in memory (open jobs: below).
                continue;
            }
            for (k, v) in store.scan_prefix(kind.prefix().as_bytes())? {
                match kind {
                    Kind::Device => {
                        let d: DeviceRecord = decode(&k, &v)?;
                        parts[state::shard_of(&d.device_id, count)].install_device(d);
                    }
                    Kind::OpenJob => {
                        let corrupt = |detail: &str| StoreError::Corrupt {
                            key: String::from_utf8_lossy(&k).into_owned(),
                            detail: detail.into(),
                        };
                        let id = keys::job_of_key(&k).ok_or_else(|| corrupt("not a job id"))?;
                        let key = Kind::Job.key(id.as_str());
                        let v = store
                            .get(&key)?
                            .ok_or_else(|| corrupt("an open job without its record"))?;
                        jobs.push(decode(&key, &v)?);
                    }
                    Kind::Contract => {
                        let c: schemas::services::ContractRecord = decode(&k, &v)?;
                        parts[state::shard_of(&c.device_id, count)].install_contract(c);
                    }
                    Kind::Enrollment => reg.install_enrollment(decode(&k, &v)?),
                    Kind::OpsLogin => reg.install_ops_login(decode(&k, &v)?),
                    Kind::Owner => reg.install_owner(decode(&k, &v)?),
                    Kind::Companion => reg.install_companion(decode(&k, &v)?),
                    Kind::Service => reg.install_service(decode(&k, &v)?),
                    Kind::Application => reg.install_application(decode(&k, &v)?),
                    Kind::Instruction => reg.install_instruction(decode(&k, &v)?),
                    Kind::User => reg.install_user(decode(&k, &v)?),
                    Kind::HeldJob => {
                        let h: schemas::print::HeldJobRecord = decode(&k, &v)?;
                        dir.note_id(&h.job_id);
                        // A released one is a device's job now (open: loaded below).
                        if !matches!(h.state, schemas::print::HeldState::Released { .. }) {
                            dir.set(h.job_id.clone(), JobHome::Held);
                        }
                        reg.install_held(h);
                    }
                    _ => {}
                }
            }
        }
        // New ids follow every id on disk, finished jobs' included.
        if let Some(k) = store.last_key(Kind::Job.prefix().as_bytes())?
            && let Some(id) = keys::job_of_key(&k)
        {
            dir.note_id(&id);
        }
        // Oldest first, so that each device's list of jobs is in submission order.
        jobs.sort_by_key(|j| j.created_at);
        for j in jobs {
            dir.note_id(&j.job_id);
            dir.set(j.job_id.clone(), JobHome::Device(j.device_id.clone()));
            parts[state::shard_of(&j.device_id, count)].install_job(j);
        }
        Ok(Core {
            committer,
            policy,
            registry: RwLock::new(reg),
            deadlines: parts
                .iter()
                .map(|s| {
                    let next = s.next_deadline().map_or(u64::MAX, |t| t.0);
                    std::sync::atomic::AtomicU64::new(next)
                })
                .collect(),
            finished: parts.iter().map(|_| Default::default()).collect(),
            shards: parts.into_iter().map(Mutex::new).collect(),
            jobs: dir,
            events: OpsQueue::new(events::OPS_QUEUE_CAPACITY),
        })
    }

    pub fn policy(&self) -> &JobPolicy {
        &self.policy
    }

    /// The ops events of committed changes, for the bridge's publisher.
    pub fn ops_queue(&self) -> &OpsQueue {
        &self.events
    }

    /// Queues an event that belongs to no transaction (presence) behind every change
    /// applied so far.
    pub fn observe(&self, event: OpsEvent) {
        self.events.push(self.committer.current(), [event]);
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    fn shard_index(&self, device: &DeviceId) -> usize {
        state::shard_of(device, self.shards.len())
    }

    /// How many jobs of shard `shard` have finished since the start.
    fn finished_count(&self, shard: usize) -> u64 {
        self.finished[shard].load(std::sync::atomic::Ordering::Acquire)
    }

    /// Runs `f` on the committed state of `device`'s shard, under its lock.
    fn with_shard<T>(&self, device: &DeviceId, f: impl FnOnce(&Shard) -> T) -> T {
        let shard = self.shards[self.shard_index(device)]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        f(&shard)
    }

    /// Runs `f` on each shard in turn (one lock at a time: not a snapshot across shards).
    fn each_shard(&self, mut f: impl FnMut(&Shard)) {
        for shard in self.shards.iter() {
            f(&shard.lock().unwrap_or_else(|p| p.into_inner()));
        }
    }

    /// Runs `f` on the registry, under its read lock.
    fn with_registry<T>(&self, f: impl FnOnce(&Registry) -> T) -> T {
        f(&self.registry.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// A transaction on the shard that holds job `id` (and on `also`'s, when given), found
    /// through the directory; looked up again if the job moved meanwhile.
    fn job_tx(&self, id: &JobId, registry: Access, also: Option<&DeviceId>) -> CoreResult<Tx<'_>> {
        for _ in 0..16 {
            let Some(JobHome::Device(device)) = self.jobs.get(id) else {
                return Err(CoreError::new(ErrorCode::NotFound, format!("no job {id}")));
            };
            let mut devices = vec![&device];
            devices.extend(also);
            let tx = Tx::new(self, registry, &devices);
            if tx.job(id).is_ok_and(|j| j.device_id == device) {
                return Ok(tx);
            }
        }
        Err(CoreError::new(
            ErrorCode::Internal,
            format!("job {id} kept moving while it was looked up"),
        ))
    }

    /// [`Self::job_tx`] for a change that only an open job accepts: a finished job (on disk
    /// only) is refused as `InvalidState`, when `principal` may see it, and as not found
    /// otherwise.
    fn open_job_tx(
        &self,
        id: &JobId,
        registry: Access,
        also: Option<&DeviceId>,
        principal: &Principal,
    ) -> CoreResult<Tx<'_>> {
        match self.job_tx(id, registry, also) {
            Err(e) if e.code() == ErrorCode::NotFound => match self.readable_job(principal, id) {
                // Not open, but there: finished, so on disk only.
                Ok(job) if job.state.is_terminal() => Err(CoreError::new(
                    ErrorCode::InvalidState,
                    format!("job {id} is already {}", job.state.as_str()),
                )),
                _ => Err(e),
            },
            tx => tx,
        }
    }

    /// Commits a new registry record through `insert` (a `Tx::insert_*`, which refuses an id
    /// already taken, or more checks around one).
    fn create<'c, R: Clone>(
        &'c self,
        record: R,
        insert: impl FnOnce(&mut Tx<'c>, R) -> CoreResult<()>,
    ) -> CoreResult<(R, Ticket)> {
        let mut tx = Tx::new(self, Access::Write, &[]);
        insert(&mut tx, record.clone())?;
        tx.commit_answer(record)
    }

    /// A ticket covering everything applied so far (for reads).
    pub fn read_ticket(&self) -> Ticket {
        self.committer.current()
    }

    /// The number of devices and of jobs.
    pub fn counts(&self) -> (usize, usize) {
        let mut devices = 0;
        self.each_shard(|s| devices += s.devices.len());
        (devices, self.jobs.len())
    }
}

#[cfg(test)]
impl Core {
    /// Everything in memory, records and indexes, in a form that compares equal exactly when
    /// two cores hold the same state (whatever the order maps iterate in). Print sessions and
    /// claims under way are left out: they are not stored.
    pub(crate) fn snapshot(&self) -> String {
        use std::collections::BTreeMap;
        use std::fmt::Write;
        fn sorted<K: Ord + std::fmt::Debug, V: std::fmt::Debug>(
            m: impl IntoIterator<Item = (K, V)>,
        ) -> String {
            format!("{:?}", m.into_iter().collect::<BTreeMap<K, V>>())
        }
        let mut out = String::new();
        let mut devices = BTreeMap::new();
        let mut jobs = BTreeMap::new();
        let mut device_jobs = BTreeMap::new();
        let mut idempotency = BTreeMap::new();
        let mut deadlines = Vec::new();
        let mut contracts = BTreeMap::new();
        self.each_shard(|s| {
            devices.extend(s.devices.iter().map(|(k, v)| (k.clone(), format!("{v:?}"))));
            jobs.extend(s.jobs.iter().map(|(k, v)| (k.clone(), format!("{v:?}"))));
            let lists = s.device_jobs.iter().filter(|(_, v)| !v.is_empty());
            device_jobs.extend(lists.map(|(k, v)| (k.clone(), v.clone())));
            idempotency.extend(s.idempotency.iter().map(|(k, v)| (k.clone(), v.clone())));
            deadlines.push(format!(
                "{:?} {:?} {:?}",
                s.leases, s.expiries, s.owner_checks
            ));
            contracts.extend(
                s.contracts
                    .iter()
                    .map(|(k, v)| (k.clone(), format!("{v:?}"))),
            );
        });
        let _ = writeln!(
            out,
            "devices {devices:?}\njobs {jobs:?}\nlists {device_jobs:?}"
        );
        let _ = writeln!(out, "idempotency {idempotency:?}\ndeadlines {deadlines:?}");
        let _ = writeln!(out, "contracts {contracts:?}");
        self.with_registry(|r| {
            let _ = writeln!(out, "enrollments {}", sorted(r.enrollments.iter()));
            let _ = writeln!(out, "owners {}", sorted(r.owners.iter()));
            let _ = writeln!(out, "companions {}", sorted(r.companions.iter()));
            let tokens = r.tokens.iter().map(|(k, v)| (k, format!("{v:?}")));
            let _ = writeln!(out, "tokens {}", sorted(tokens));
            let _ = writeln!(out, "services {:?}", r.services);
            let _ = writeln!(out, "applications {}", sorted(r.applications.iter()));
            let _ = writeln!(out, "codes {}", sorted(r.codes.iter()));
            let _ = writeln!(out, "instructions {}", sorted(r.instructions.iter()));
            let _ = writeln!(out, "users {}", sorted(r.users.iter()));
            let _ = writeln!(out, "held {}", sorted(r.held.iter()));
            let _ = writeln!(out, "ops {}", sorted(r.ops_logins.iter()));
        });
        let _ = writeln!(out, "directory {}", self.jobs.snapshot());
        out
    }
}

pub(crate) fn truncate(mut s: String) -> String {
    if s.len() > 1024 {
        let mut cut = 1024;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

pub(crate) fn transition_event(job: &JobRecord) -> OpsEvent {
    let last = job.history.last();
    OpsEvent::JobTransition {
        device_id: job.device_id.clone(),
        job_id: job.job_id.clone(),
        from: last.and_then(|t| t.from),
        to: job.state,
        attempt: job.attempt,
        reason: last.and_then(|t| t.reason.clone()),
        at: last.map(|t| t.at).unwrap_or_default(),
        submitted_at: job.created_at,
    }
}

#[cfg(test)]
pub(crate) mod tests;
