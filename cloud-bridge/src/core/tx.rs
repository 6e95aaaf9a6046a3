//! Staged transactions: how every change to the state is made.
//!
//! A [`Tx`] locks, when it starts, the parts of the state it may touch (the registry, for
//! reading or writing, then the shards of the devices it names, always in ascending order, so
//! two transactions never wait on each other in a circle). The operation reads through it and
//! stages new versions of records in it; nothing in memory changes while it runs, and reads
//! through the transaction see its own staged writes. [`Tx::commit`] encodes the staged
//! records into one [`Batch`], has the store apply it, and only then installs the records in
//! memory, while the locks are still held. A refused operation, an encoding error or a store
//! that refuses the batch leave memory exactly as it was; dropping a transaction discards it.
//!
//! Durability is the caller's part: nothing a transaction did is acknowledged, published or
//! shown until a flush has covered its ticket ([`crate::store::Committer::wait_durable`]). A
//! failed flush stops the committer for good: from then on it refuses every batch and every
//! wait, so memory stays what the store accepted, nothing more is acknowledged, and a restart
//! recovers what reached the disk.

use std::collections::BTreeMap;
use std::sync::{MutexGuard, RwLockReadGuard, RwLockWriteGuard};

use schemas::data::ErrorCode;
use schemas::feed::{FeedBody, FeedEntry};
use schemas::print::{HeldJobRecord, UserRecord};
use schemas::records::{
    CompanionRecord, DeviceRecord, EnrollmentRecord, JobRecord, OpsLoginRecord, OwnerRecord,
};
use schemas::services::{ApplicationRecord, ContractRecord, InstructionRecord, ServiceRecord};
use schemas::{
    ApplicationId, CompanionId, DeviceId, FeedSeq, InstructionId, JobId, OpsId, OwnerId,
    UnixMillis, UserId,
};

use super::keys::{Kind, contract_key, device_job_key, feed_key, finished_key, idempotency_key};
use super::state::{JobHome, PrintSession, Registry, Shard};
use super::{Core, CoreError, CoreResult, Effects, JobPolicy, encode};
use crate::store::{Batch, Ticket};

/// How a transaction uses the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    None,
    Read,
    Write,
}

#[derive(Debug)]
enum RegistryLock<'a> {
    None,
    Read(RwLockReadGuard<'a, Registry>),
    Write(RwLockWriteGuard<'a, Registry>),
}

fn not_locked(what: &str) -> CoreError {
    CoreError::new(
        ErrorCode::Internal,
        format!("{what} is not locked by this transaction"),
    )
}

macro_rules! registry_tables {
    ($( $field:ident, $get:ident, $put:ident, $insert:ident, $what:literal: $K:ty => $V:ty,
        $kind:expr, |$r:ident| $id:expr, $install:ident; )*) => {
        /// Registry records a transaction writes.
        #[derive(Debug, Default)]
        struct RegistryWrites {
            $( $field: BTreeMap<$K, $V>, )*
            /// Print sessions opened, renewed (`Some`) or ended (`None`): memory only.
            sessions: BTreeMap<String, Option<PrintSession>>,
        }

        impl RegistryWrites {
            fn is_empty(&self) -> bool {
                self.sessions.is_empty() $( && self.$field.is_empty() )*
            }

            fn encode_into(&self, batch: &mut Batch) -> CoreResult<()> {
                $( for $r in self.$field.values() {
                    batch.put($kind.key($id.as_str()), encode($r)?);
                } )*
                Ok(())
            }

            fn install(self, reg: &mut Registry) {
                $( for (_, v) in self.$field { reg.$install(v); } )*
                for (hash, session) in self.sessions {
                    match session {
                        Some(s) => reg.sessions.insert(hash, s),
                        None => reg.sessions.remove(&hash),
                    };
                }
            }
        }

        impl Tx<'_> {
            $(
                /// The record as this transaction sees it (its own write, else the registry's).
                pub(crate) fn $get(&self, k: &$K) -> CoreResult<Option<&$V>> {
                    if let Some(v) = self.reg_writes.$field.get(k) {
                        return Ok(Some(v));
                    }
                    Ok(self.registry()?.$field.get(k))
                }

                pub(crate) fn $put(&mut self, $r: $V) -> CoreResult<()> {
                    if !matches!(self.registry, RegistryLock::Write(_)) {
                        return Err(not_locked("the registry (for writing)"));
                    }
                    let k = $id.clone();
                    self.reg_writes.$field.insert(k, $r);
                    Ok(())
                }

                /// Stages a new record; refused when its id is taken (ids are drawn at random:
                /// the caller retries).
                #[allow(dead_code)]
                pub(crate) fn $insert(&mut self, $r: $V) -> CoreResult<()> {
                    if self.$get(&$id)?.is_some() {
                        return Err(CoreError::new(
                            ErrorCode::Conflict,
                            concat!($what, " id collision; retry"),
                        ));
                    }
                    self.$put($r)
                }
            )*
        }
    };
}

registry_tables! {
    enrollments, enrollment, put_enrollment, insert_enrollment, "enrollment token":
        String => EnrollmentRecord, Kind::Enrollment, |r| r.token_sha256, install_enrollment;
    owners, owner, put_owner, insert_owner, "owner":
        OwnerId => OwnerRecord, Kind::Owner, |r| r.owner_id, install_owner;
    companions, companion_record, put_companion, insert_companion, "companion":
        CompanionId => CompanionRecord, Kind::Companion, |r| r.companion_id, install_companion;
    services, service_record, put_service, insert_service, "service":
        String => ServiceRecord, Kind::Service, |r| r.service_id, install_service;
    applications, application_record, put_application, insert_application, "application":
        ApplicationId => ApplicationRecord, Kind::Application, |r| r.application_id,
        install_application;
    instructions, instruction, put_instruction_record, insert_instruction, "instruction":
        InstructionId => InstructionRecord, Kind::Instruction, |r| r.instruction_id,
        install_instruction;
    users, user, put_user, insert_user, "user":
        UserId => UserRecord, Kind::User, |r| r.user_id, install_user;
    held, held_job, put_held, insert_held, "job":
        JobId => HeldJobRecord, Kind::HeldJob, |r| r.job_id, install_held;
    ops_logins, ops_login, put_ops_login, insert_ops_login, "ops login":
        OpsId => OpsLoginRecord, Kind::OpsLogin, |r| r.ops_id, install_ops_login;
}

/// A transaction over some parts of the state. See the module documentation.
#[derive(Debug)]
pub(crate) struct Tx<'a> {
    core: &'a Core,
    registry: RegistryLock<'a>,
    /// The locked shards, by ascending index.
    shards: Vec<(usize, MutexGuard<'a, Shard>)>,
    devices: BTreeMap<DeviceId, DeviceRecord>,
    jobs: BTreeMap<JobId, JobRecord>,
    contracts: BTreeMap<(DeviceId, String), ContractRecord>,
    reg_writes: RegistryWrites,
    /// Writes with no record in memory: feed entries, payloads, outbox requests.
    raw: Batch,
    /// Job ids claimed in the directory; freed unless they became jobs.
    claims: Vec<JobId>,
    /// What to do once the transaction is durable.
    pub(crate) effects: Effects,
}

impl<'a> Tx<'a> {
    /// Locks the registry as asked, then the shards of `devices`.
    pub(crate) fn new(core: &'a Core, registry: Access, devices: &[&DeviceId]) -> Tx<'a> {
        let shards = devices.iter().map(|d| core.shard_index(d));
        Tx::over_shards(core, registry, shards)
    }

    /// Locks the registry as asked, then the given shards (in ascending order).
    pub(crate) fn over_shards(
        core: &'a Core,
        registry: Access,
        shards: impl IntoIterator<Item = usize>,
    ) -> Tx<'a> {
        let mut wanted: Vec<usize> = shards.into_iter().collect();
        wanted.sort_unstable();
        wanted.dedup();
        let registry = match registry {
            Access::None => RegistryLock::None,
            Access::Read => {
                RegistryLock::Read(core.registry.read().unwrap_or_else(|p| p.into_inner()))
            }
            Access::Write => {
                RegistryLock::Write(core.registry.write().unwrap_or_else(|p| p.into_inner()))
            }
        };
        let shards = wanted
            .into_iter()
            .map(|i| (i, core.shards[i].lock().unwrap_or_else(|p| p.into_inner())))
            .collect();
        Tx {
            core,
            registry,
            shards,
            devices: BTreeMap::new(),
            jobs: BTreeMap::new(),
            contracts: BTreeMap::new(),
            reg_writes: RegistryWrites::default(),
            raw: Batch::default(),
            claims: Vec::new(),
            effects: Effects::default(),
        }
    }

    pub(crate) fn policy(&self) -> &JobPolicy {
        &self.core.policy
    }

    /// The registry as committed (without this transaction's writes).
    pub(crate) fn registry(&self) -> CoreResult<&Registry> {
        match &self.registry {
            RegistryLock::None => Err(not_locked("the registry")),
            RegistryLock::Read(r) => Ok(r),
            RegistryLock::Write(w) => Ok(w),
        }
    }

    fn position(&self, shard: usize) -> Option<usize> {
        self.shards.binary_search_by_key(&shard, |(i, _)| *i).ok()
    }

    /// The committed state of `device`'s shard, if this transaction locked it.
    pub(crate) fn shard(&self, device: &DeviceId) -> CoreResult<&Shard> {
        let at = self
            .position(self.core.shard_index(device))
            .ok_or_else(|| not_locked(&format!("the shard of device {device}")))?;
        Ok(&self.shards[at].1)
    }

    /// The locked shards, committed state.
    pub(crate) fn shards(&self) -> impl Iterator<Item = &Shard> {
        self.shards.iter().map(|(_, s)| &**s)
    }

    // ------------------------------------------------------------ devices

    pub(crate) fn device(&self, id: &DeviceId) -> CoreResult<&DeviceRecord> {
        if let Some(d) = self.devices.get(id) {
            return Ok(d);
        }
        self.shard(id)?
            .devices
            .get(id)
            .ok_or_else(|| CoreError::new(ErrorCode::NotFound, format!("no device {id}")))
    }

    /// The device, if it may use its connections; why not otherwise.
    pub(crate) fn active_device(&self, id: &DeviceId) -> CoreResult<&DeviceRecord> {
        let device = self.device(id)?;
        super::check_active(device)?;
        Ok(device)
    }

    pub(crate) fn put_device(&mut self, device: DeviceRecord) -> CoreResult<()> {
        self.shard(&device.device_id)?;
        self.devices.insert(device.device_id.clone(), device);
        Ok(())
    }

    /// Appends an entry to a device's feed (the device record's `newest` moves with it).
    pub(crate) fn append_feed(
        &mut self,
        device_id: &DeviceId,
        body: FeedBody,
        now: UnixMillis,
    ) -> CoreResult<FeedSeq> {
        let mut device = self.device(device_id)?.clone();
        let seq = device.newest.next();
        let entry = FeedEntry { seq, at: now, body };
        self.raw.put(feed_key(device_id, seq), encode(&entry)?);
        device.newest = seq;
        self.put_device(device)?;
        let grew = &mut self.effects.feed_grew;
        grew.retain(|(d, _)| d != device_id);
        grew.push((device_id.clone(), seq));
        Ok(seq)
    }

    // ------------------------------------------------------------ jobs

    /// A job in one of the locked shards (or written by this transaction).
    pub(crate) fn job(&self, id: &JobId) -> CoreResult<&JobRecord> {
        if let Some(j) = self.jobs.get(id) {
            return Ok(j);
        }
        self.shards()
            .find_map(|s| s.jobs.get(id))
            .ok_or_else(|| CoreError::new(ErrorCode::NotFound, format!("no job {id}")))
    }

    /// The job, if it belongs to `device_id` (whose shard is locked).
    pub(crate) fn own_job(&self, device_id: &DeviceId, job_id: &JobId) -> CoreResult<&JobRecord> {
        let forbidden = || {
            CoreError::new(
                ErrorCode::Forbidden,
                format!("job {job_id} belongs to another device"),
            )
        };
        match self.job(job_id) {
            Ok(job) if job.device_id == *device_id => Ok(job),
            Ok(_) => Err(forbidden()),
            Err(not_here) => match self.core.jobs.get(job_id) {
                Some(JobHome::Device(_)) => Err(forbidden()),
                _ => Err(not_here),
            },
        }
    }

    pub(crate) fn put_job(&mut self, job: JobRecord) -> CoreResult<()> {
        self.shard(&job.device_id)?;
        self.jobs.insert(job.job_id.clone(), job);
        Ok(())
    }

    /// A fresh job id (see [`super::state::JobDirectory::claim_fresh`]), held for this
    /// transaction.
    pub(crate) fn fresh_job_id(&mut self, now: UnixMillis) -> JobId {
        let id = self.core.jobs.claim_fresh(now);
        self.claims.push(id.clone());
        id
    }

    // ------------------------------------------------------------ the rest

    pub(crate) fn contract(
        &self,
        device: &DeviceId,
        service: &str,
    ) -> CoreResult<Option<&ContractRecord>> {
        let k = (device.clone(), service.to_owned());
        if let Some(c) = self.contracts.get(&k) {
            return Ok(Some(c));
        }
        Ok(self.shard(device)?.contracts.get(&k))
    }

    pub(crate) fn put_contract(&mut self, contract: ContractRecord) -> CoreResult<()> {
        self.shard(&contract.device_id)?;
        let k = (contract.device_id.clone(), contract.service_id.clone());
        self.contracts.insert(k, contract);
        Ok(())
    }

    /// A print session as this transaction sees it.
    pub(crate) fn session(&self, hash: &str) -> CoreResult<Option<&PrintSession>> {
        match self.reg_writes.sessions.get(hash) {
            Some(staged) => Ok(staged.as_ref()),
            None => Ok(self.registry()?.sessions.get(hash)),
        }
    }

    /// Opens or renews (`Some`) or ends (`None`) a print session.
    pub(crate) fn put_session(
        &mut self,
        hash: String,
        session: Option<PrintSession>,
    ) -> CoreResult<()> {
        if !matches!(self.registry, RegistryLock::Write(_)) {
            return Err(not_locked("the registry (for writing)"));
        }
        self.reg_writes.sessions.insert(hash, session);
        Ok(())
    }

    /// A write with no record in memory (a payload, an outbox request).
    pub(crate) fn put_raw(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.raw.put(key, value);
    }

    /// Deletes a record with nothing in memory (a feed entry).
    pub(crate) fn delete_raw(&mut self, key: Vec<u8>) {
        self.raw.delete(key);
    }

    /// Whether the transaction has staged anything.
    pub(crate) fn is_empty(&self) -> bool {
        self.raw.is_empty()
            && self.devices.is_empty()
            && self.jobs.is_empty()
            && self.contracts.is_empty()
            && self.reg_writes.is_empty()
    }

    /// Commits, answering `answer` with the ticket; for changes that have no effects (or whose
    /// effects the caller does not need).
    pub(crate) fn commit_answer<A>(self, answer: A) -> CoreResult<(A, Ticket)> {
        let (ticket, _) = self.commit()?;
        Ok((answer, ticket))
    }

    /// Writes everything staged as one batch and, once the store has accepted it, installs it
    /// in memory. Returns the ticket to wait on before acting on the effects.
    pub(crate) fn commit(mut self) -> CoreResult<(Ticket, Effects)> {
        let mut batch = std::mem::take(&mut self.raw);
        for d in self.devices.values() {
            batch.put(Kind::Device.key(d.device_id.as_str()), encode(d)?);
        }
        for j in self.jobs.values() {
            let old = self.shards.iter().find_map(|(_, s)| s.jobs.get(&j.job_id));
            index_job(&mut batch, old, j);
            batch.put(Kind::Job.key(j.job_id.as_str()), encode(j)?);
        }
        for c in self.contracts.values() {
            batch.put(contract_key(&c.device_id, &c.service_id), encode(c)?);
        }
        self.reg_writes.encode_into(&mut batch)?;
        let core = self.core;
        let events = &self.effects.events;
        let ticket = core
            .committer
            .apply_then(batch, |t| core.events.push(t, events.iter().cloned()))?;
        self.install();
        Ok((ticket, std::mem::take(&mut self.effects)))
    }

    fn install(&mut self) {
        let reg_writes = std::mem::take(&mut self.reg_writes);
        let new_held: Vec<JobId> = reg_writes.held.keys().cloned().collect();
        if let RegistryLock::Write(reg) = &mut self.registry {
            reg_writes.install(reg);
        }
        for id in new_held {
            if self.core.jobs.get(&id) == Some(JobHome::Claimed) {
                self.core.jobs.set(id, JobHome::Held);
            }
        }
        for (_, device) in std::mem::take(&mut self.devices) {
            let at = self.must_position(&device.device_id);
            self.shards[at].1.install_device(device);
        }
        for (id, job) in std::mem::take(&mut self.jobs) {
            let to = self.must_position(&job.device_id);
            let from = self
                .shards
                .iter()
                .position(|(_, s)| s.jobs.contains_key(&id));
            if job.state.is_terminal() {
                // Finished: on disk only from now on.
                if let Some(from) = from {
                    self.shards[from].1.remove_job(&id);
                    let shard = self.shards[from].0;
                    self.core.finished[shard].fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                }
                self.core.jobs.remove(&id);
                continue;
            }
            if let Some(from) = from
                && from != to
            {
                self.shards[from].1.remove_job(&id);
            }
            let moved = from
                .is_none_or(|f| f != to || self.shards[f].1.jobs[&id].device_id != job.device_id);
            if moved {
                self.core
                    .jobs
                    .set(id, JobHome::Device(job.device_id.clone()));
            }
            self.shards[to].1.install_job(job);
        }
        for (_, contract) in std::mem::take(&mut self.contracts) {
            let at = self.must_position(&contract.device_id);
            self.shards[at].1.install_contract(contract);
        }
        for id in std::mem::take(&mut self.claims) {
            self.core.jobs.unclaim(&id);
        }
        for (i, shard) in &self.shards {
            let next = shard.next_deadline().map_or(u64::MAX, |t| t.0);
            self.core.deadlines[*i].store(next, std::sync::atomic::Ordering::Release);
        }
    }

    /// The position of a shard that `put_*` checked was locked.
    fn must_position(&self, device: &DeviceId) -> usize {
        self.position(self.core.shard_index(device))
            .expect("put_* accepts records of locked shards only")
    }
}

/// Stages the index entries that follow from a job's change from `old` (its version in
/// memory: none for a new job) to `new`: the open-job mark, the device's list, the
/// idempotency key, and the finish time (see [`Kind`]).
pub(super) fn index_job(batch: &mut Batch, old: Option<&JobRecord>, new: &JobRecord) {
    let id = &new.job_id;
    let device_changed = old.is_none_or(|o| o.device_id != new.device_id);
    if device_changed {
        if let Some(o) = old {
            batch.delete(device_job_key(&o.device_id, id));
            if let Some(key) = &o.idempotency_key {
                batch.delete(idempotency_key(&o.device_id, key));
            }
        }
        batch.put(device_job_key(&new.device_id, id), Vec::new());
        if let Some(key) = &new.idempotency_key {
            batch.put(idempotency_key(&new.device_id, key), id.as_str().into());
        }
    }
    let was_open = old.is_some_and(|o| !o.state.is_terminal());
    if new.state.is_terminal() {
        if was_open {
            batch.delete(Kind::OpenJob.key(id.as_str()));
        }
        batch.put(finished_key(finished_at(new), id), Vec::new());
    } else if !was_open {
        batch.put(Kind::OpenJob.key(id.as_str()), Vec::new());
    }
}

/// When a finished job finished: its last transition.
pub(crate) fn finished_at(job: &JobRecord) -> UnixMillis {
    job.history.last().map_or(job.created_at, |t| t.at)
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        for id in &self.claims {
            self.core.jobs.unclaim(id);
        }
    }
}
