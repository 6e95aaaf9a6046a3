//! Retention: what the bridge forgets, and when.
//!
//! - A job leaves memory the moment it finishes; its record, payload and history stay on disk,
//!   where the admin API still finds it, its idempotency key still answers with it, and a
//!   device's resent final report is still answered as before.
//! - Once a finished job is older than the retention period, the sweeper deletes its record,
//!   payload and index entries ([`Core::forget_finished`]), one atomic batch per sweep, after
//!   writing it to the archive when one is configured (`crate::sweeper`). Open jobs are never
//!   swept: only finished ones are in the `z/` index the sweeper reads.
//! - A device's feed entries are deleted when the device acknowledges them ([`Core::ack`]):
//!   what is at or below the cursor has been handled and is never sent again.
//!
//! The indexes the bridge keeps for this (`n/`, `l/`, `y/`, `z/`, see [`Kind`]) are written in
//! the same batch as the job record they follow ([`super::tx`]); a store written before they
//! existed gets them at the first start ([`index_jobs`]).

use std::collections::HashSet;

use schemas::data::ErrorCode;
use schemas::outbox::RequestNo;
use schemas::records::{DeviceRequestRecord, JobRecord};
use schemas::{ApplicationId, DeviceId, InstructionId, JobId, UnixMillis};

use super::keys::{
    Kind, device_job_key, device_range_end, finished_key, idempotency_key, job_of_key, request_key,
};
use super::tx::index_job;
use super::{Core, CoreError, CoreResult, decode};
use crate::store::{Batch, Committer, StoreError, Ticket};

/// The layout of the store's keys; stored under `m/layout`.
const LAYOUT: &[u8] = b"2";

/// Writes the job indexes for a store that has none yet (its layout is older): every job is
/// indexed as if it had just been written. Indexes follow from the records alone, so a start
/// cut short does this again.
pub(super) fn index_jobs(committer: &Committer) -> Result<(), StoreError> {
    let store = committer.store();
    let layout = Kind::Meta.key("layout");
    if store.get(&layout)?.as_deref() == Some(LAYOUT) {
        return Ok(());
    }
    let mut batch = Batch::default();
    let mut staged = 0usize;
    for (k, v) in store.scan_prefix(Kind::Job.prefix().as_bytes())? {
        let job: JobRecord = decode(&k, &v)?;
        index_job(&mut batch, None, &job);
        staged += 1;
        if staged.is_multiple_of(1000) {
            committer.apply(std::mem::take(&mut batch))?;
        }
    }
    batch.put(layout, LAYOUT.to_vec());
    committer.apply(batch)?;
    if staged > 0 {
        tracing::info!(jobs = staged, "indexed the jobs of an older store");
    }
    store.flush()
}

/// A finished job whose retention has ended, as the sweeper found it.
#[derive(Debug, Clone)]
pub struct FinishedJob {
    /// Its entry in the `z/` index.
    index_key: Vec<u8>,
    /// Its record; `None` when only the index entry was left.
    pub job: Option<JobRecord>,
}

impl Core {
    /// A job's record as stored (a finished job is there only).
    pub(super) fn stored_job(&self, id: &JobId) -> CoreResult<Option<JobRecord>> {
        let key = Kind::Job.key(id.as_str());
        match self.committer.store().get(&key)? {
            Some(v) => Ok(Some(decode(&key, &v)?)),
            None => Ok(None),
        }
    }

    /// A job of `device` that has finished (so is on disk only), for the answers the device
    /// gets about it: `Forbidden` for another device's job, `NotFound` when there is none.
    pub(super) fn finished_job_of(&self, device: &DeviceId, id: &JobId) -> CoreResult<JobRecord> {
        match self.stored_job(id)? {
            Some(job) if job.state.is_terminal() && job.device_id == *device => Ok(job),
            Some(job) if job.state.is_terminal() => Err(CoreError::new(
                ErrorCode::Forbidden,
                format!("job {id} belongs to another device"),
            )),
            _ => Err(CoreError::new(ErrorCode::NotFound, format!("no job {id}"))),
        }
    }

    /// A job's payload as stored.
    pub fn stored_payload(&self, id: &JobId) -> CoreResult<Option<Vec<u8>>> {
        Ok(self
            .committer
            .store()
            .get(&Kind::Payload.key(id.as_str()))?)
    }

    /// Up to `limit` finished jobs that finished before `cutoff`, oldest finish first.
    pub fn finished_before(
        &self,
        cutoff: UnixMillis,
        limit: usize,
    ) -> CoreResult<Vec<FinishedJob>> {
        let store = self.committer.store();
        let start = Kind::Finished.prefix().as_bytes();
        let end = format!("{}{:016x}", Kind::Finished.prefix(), cutoff.0).into_bytes();
        let mut found = Vec::new();
        for (k, _) in store.range(start, &end, limit)? {
            let job = match job_of_key(&k) {
                Some(id) => self.stored_job(&id)?,
                None => None,
            };
            found.push(FinishedJob { index_key: k, job });
        }
        Ok(found)
    }

    /// Deletes finished jobs for good: record, payload, and their entries in every index, in
    /// one batch (all of them or none survive a crash). Only finished jobs are in the `z/`
    /// index, and a finished job never changes again, so this needs no lock.
    pub fn forget_finished(&self, finished: &[FinishedJob]) -> CoreResult<Ticket> {
        let store = self.committer.store();
        let mut batch = Batch::default();
        for f in finished {
            batch.delete(f.index_key.clone());
            let Some(job) = &f.job else { continue };
            debug_assert!(job.state.is_terminal());
            let id = &job.job_id;
            batch.delete(Kind::Job.key(id.as_str()));
            batch.delete(Kind::Payload.key(id.as_str()));
            batch.delete(device_job_key(&job.device_id, id));
            if let Some(key) = &job.idempotency_key {
                let slot = idempotency_key(&job.device_id, key);
                if store.get(&slot)?.as_deref() == Some(id.as_str().as_bytes()) {
                    batch.delete(slot);
                }
            }
            debug_assert_eq!(
                f.index_key,
                finished_key(super::tx::finished_at(job), id),
                "the index entry names the job's finish"
            );
        }
        Ok(self.committer.apply(batch)?)
    }

    /// Forgets, in memory and on disk, what belongs to no device and was settled before
    /// `cutoff`: applications whose registration codes expired (with their codes and the
    /// use-start instructions they sent), other instructions taken or expired, and held jobs
    /// released or expired (an expired one's payload with it; a released one's is its job's).
    /// At most `limit` records; how many.
    pub fn forget_settled(
        &self,
        cutoff: UnixMillis,
        now: UnixMillis,
        limit: usize,
    ) -> CoreResult<(usize, Ticket)> {
        use schemas::print::HeldState;
        let mut reg = self.registry.write().unwrap_or_else(|p| p.into_inner());
        let settled = |at: UnixMillis| at < cutoff && at <= now;
        let apps: Vec<ApplicationId> = reg
            .applications
            .values()
            .filter(|a| settled(a.expires_at))
            .map(|a| a.application_id.clone())
            .take(limit)
            .collect();
        // An instruction of an application goes with it, never before.
        let of_apps: HashSet<&InstructionId> = reg
            .applications
            .values()
            .flat_map(|a| a.devices.iter().map(|e| &e.instruction_id))
            .collect();
        let instructions: Vec<InstructionId> = reg
            .instructions
            .values()
            .filter(|i| !of_apps.contains(&i.instruction_id))
            .filter(|i| settled(i.taken_at.unwrap_or(i.expires_at)))
            .map(|i| i.instruction_id.clone())
            .take(limit.saturating_sub(apps.len()))
            .collect();
        let held: Vec<(JobId, bool)> = reg
            .held
            .values()
            .filter_map(|h| match h.state {
                HeldState::Released { at, .. } if settled(at) => Some((h.job_id.clone(), false)),
                HeldState::Expired { at } if settled(at) => Some((h.job_id.clone(), true)),
                // Expired without anyone having asked since.
                HeldState::Held if settled(h.expires_at) => Some((h.job_id.clone(), true)),
                _ => None,
            })
            .take(limit.saturating_sub(apps.len() + instructions.len()))
            .collect();
        let mut batch = Batch::default();
        for id in &apps {
            batch.delete(Kind::Application.key(id.as_str()));
            for e in &reg.applications[id].devices {
                batch.delete(Kind::Instruction.key(e.instruction_id.as_str()));
            }
        }
        for id in &instructions {
            batch.delete(Kind::Instruction.key(id.as_str()));
        }
        for (id, expired) in &held {
            batch.delete(Kind::HeldJob.key(id.as_str()));
            if *expired {
                batch.delete(Kind::Payload.key(id.as_str()));
            }
        }
        let ticket = self.committer.apply(batch)?;
        // The store has accepted: memory follows, still under the registry's lock.
        for id in &apps {
            if let Some(app) = reg.applications.remove(id) {
                for e in app.devices {
                    reg.codes.remove(&e.code_sha256);
                    reg.instructions.remove(&e.instruction_id);
                }
            }
        }
        for id in &instructions {
            reg.instructions.remove(id);
        }
        for (id, _) in &held {
            reg.held.remove(id);
            if self.jobs.get(id) == Some(super::state::JobHome::Held) {
                self.jobs.remove(id);
            }
        }
        Ok((apps.len() + instructions.len() + held.len(), ticket))
    }

    /// The keys of accepted outbox requests received before `cutoff`, oldest first for each
    /// device, at most `limit` in all.
    pub fn requests_before(&self, cutoff: UnixMillis, limit: usize) -> CoreResult<Vec<Vec<u8>>> {
        let mut devices = Vec::new();
        self.each_shard(|s| devices.extend(s.devices.keys().cloned()));
        let store = self.committer.store();
        let mut keys = Vec::new();
        for device in devices {
            if keys.len() >= limit {
                break;
            }
            let start = request_key(&device, RequestNo(0));
            let end = device_range_end(Kind::DeviceRequest, &device);
            for (k, v) in store.range(&start, &end, limit - keys.len())? {
                let request: DeviceRequestRecord = decode(&k, &v)?;
                if request.received_at >= cutoff {
                    break;
                }
                keys.push(k);
            }
        }
        Ok(keys)
    }

    /// Deletes accepted outbox requests (by their keys, from [`Self::requests_before`]). The
    /// device's highest accepted number, which is what makes a resend a duplicate, is in its
    /// record and stays.
    pub fn forget_requests(&self, keys: Vec<Vec<u8>>) -> CoreResult<Ticket> {
        let mut batch = Batch::default();
        for k in keys {
            batch.delete(k);
        }
        Ok(self.committer.apply(batch)?)
    }

    /// The job an idempotency key of `device` was used for, as the store says.
    pub(super) fn stored_idempotency(
        &self,
        device: &DeviceId,
        key: &str,
    ) -> CoreResult<Option<JobId>> {
        let slot = idempotency_key(device, key);
        match self.committer.store().get(&slot)? {
            Some(v) => Ok(JobId::parse(&String::from_utf8_lossy(&v)).ok()),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
impl Core {
    /// Checks that the job indexes say exactly what the job records and memory say: a job is
    /// in memory if and only if it is open and marked open; every job is in its device's list
    /// (and its key, if any, names it); a finished job has its finish time; no index entry
    /// names a job that is not there.
    pub(crate) fn check_job_indexes(&self) -> Result<(), String> {
        use std::collections::BTreeSet;
        let store = self.committer.store();
        let keys = |kind: Kind| -> Result<BTreeSet<Vec<u8>>, String> {
            let pairs = store
                .scan_prefix(kind.prefix().as_bytes())
                .map_err(|e| e.to_string())?;
            Ok(pairs.into_iter().map(|(k, _)| k).collect())
        };
        let (mut open, mut lists, mut finished) = (
            keys(Kind::OpenJob)?,
            keys(Kind::DeviceJob)?,
            keys(Kind::Finished)?,
        );
        let records = store
            .scan_prefix(Kind::Job.prefix().as_bytes())
            .map_err(|e| e.to_string())?;
        for (k, v) in records {
            let job: JobRecord = decode(&k, &v).map_err(|e| e.to_string())?;
            let id = &job.job_id;
            let in_memory = self.with_shard(&job.device_id, |s| s.jobs.get(id).cloned());
            if !lists.remove(&device_job_key(&job.device_id, id)) {
                return Err(format!("{id} is not in its device's list"));
            }
            if let Some(key) = &job.idempotency_key {
                let named = self.stored_idempotency(&job.device_id, key);
                if !matches!(named, Ok(Some(ref n)) if n == id) {
                    return Err(format!("{id}'s idempotency key names {named:?}"));
                }
            }
            if job.state.is_terminal() {
                if in_memory.is_some() {
                    return Err(format!("finished {id} is in memory"));
                }
                if !finished.remove(&finished_key(super::tx::finished_at(&job), id)) {
                    return Err(format!("finished {id} has no finish time"));
                }
            } else {
                if in_memory.as_ref() != Some(&job) {
                    return Err(format!("open {id} is not in memory as stored"));
                }
                if !open.remove(&Kind::OpenJob.key(id.as_str())) {
                    return Err(format!("open {id} is not marked open"));
                }
            }
        }
        for (what, left) in [("open", open), ("list", lists), ("finish", finished)] {
            if let Some(k) = left.first() {
                let k = String::from_utf8_lossy(k);
                return Err(format!("the {what} index names a job not stored: {k}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use schemas::FeedSeq;
    use schemas::job::{JobState, JobUpdate};

    use super::*;
    use crate::core::NewPrincipal;
    use crate::core::tests::{
        T0, core, core_with_device, error_code, instruct, job, new_job, policy, registered,
    };
    use crate::store::{MemStore, Store};

    /// Every stored key that names `id`, as text.
    fn keys_naming(core: &Core, id: &JobId) -> Vec<String> {
        let all = core.committer.store().scan_prefix(b"").unwrap();
        let id = id.as_str();
        all.into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
            .filter(|(k, v)| k.contains(id) || v.as_slice() == id.as_bytes())
            .map(|(k, _)| k)
            .collect()
    }

    /// A registered device, a new job with the idempotency key `order-1`, and the job
    /// submitted with it.
    fn keyed_job(core: &Core) -> (DeviceId, crate::core::NewJob, JobId) {
        let dev = registered(core, 1);
        let mut keyed = new_job();
        keyed.idempotency_key = Some("order-1".into());
        let id = core.submit_job(&dev, keyed.clone(), T0).unwrap().0.job_id;
        (dev, keyed, id)
    }

    fn finish(core: &Core, dev: &DeviceId, id: &JobId, at: UnixMillis) {
        core.fetch_job(dev, id, true, at).unwrap();
        let done = JobUpdate::Succeeded { detail: None };
        core.update_job(dev, id, 1, done, at).unwrap();
    }

    #[test]
    fn a_finished_job_leaves_memory_and_is_still_answered_for_from_disk() {
        let core = core();
        let (dev, keyed, id) = keyed_job(&core);
        let open = job(&core, &dev);
        finish(&core, &dev, &id, T0);
        assert!(
            core.with_shard(&dev, |s| !s.jobs.contains_key(&id)
                && s.jobs.contains_key(&open)),
            "the finished job left memory, the open one did not"
        );
        assert_eq!(core.counts().1, 1, "health counts open jobs");
        // The admin API, the device's list, the key and a resent report still find it.
        assert_eq!(core.job(&id).unwrap().state, JobState::Succeeded);
        let listed: Vec<JobId> = core
            .device_jobs(&dev, &schemas::api::JobsQuery::default())
            .unwrap()
            .into_iter()
            .map(|j| j.job_id)
            .collect();
        assert_eq!(listed, [id.clone(), open.clone()]);
        let (again, created, ..) = core.submit_job(&dev, keyed.clone(), T0).unwrap();
        assert_eq!((again.job_id.clone(), created), (id.clone(), false));
        let mut different = keyed.clone();
        different.payload = b"other".to_vec();
        assert_eq!(
            error_code(core.submit_job(&dev, different, T0)),
            ErrorCode::Conflict
        );
        let resent = JobUpdate::Succeeded { detail: None };
        let (state, attempt, ..) = core.update_job(&dev, &id, 1, resent, T0).unwrap();
        assert_eq!((state, attempt), (JobState::Succeeded, 1));
        let late = JobUpdate::Failed { reason: "x".into() };
        assert_eq!(
            error_code(core.update_job(&dev, &id, 1, late, T0)),
            ErrorCode::InvalidState
        );
        assert_eq!(
            error_code(core.fetch_job(&dev, &id, true, T0)),
            ErrorCode::InvalidState
        );
        assert_eq!(
            error_code(core.cancel_job(&id, None, T0)),
            ErrorCode::InvalidState
        );
        // Another device learns nothing it may not.
        let other = registered(&core, 2);
        assert_eq!(
            error_code(core.fetch_job(&other, &id, true, T0)),
            ErrorCode::Forbidden
        );
        // After a restart it is on disk only, as before.
        let reloaded = Core::load(core.committer.clone(), policy(), 4).unwrap();
        assert_eq!(core.snapshot(), reloaded.snapshot());
        assert_eq!(reloaded.job(&id).unwrap().state, JobState::Succeeded);
        core.check_job_indexes().unwrap();
    }

    #[test]
    fn the_sweep_forgets_finished_jobs_past_retention_and_nothing_else() {
        let core = core();
        let (dev, keyed, old) = keyed_job(&core);
        let recent = job(&core, &dev);
        let open = job(&core, &dev);
        finish(&core, &dev, &old, T0.saturating_add_ms(1000));
        finish(&core, &dev, &recent, T0.saturating_add_ms(5000));
        // Retention ends for what finished before T0 + 2 s.
        let due = core
            .finished_before(T0.saturating_add_ms(2000), 100)
            .unwrap();
        let due_ids: Vec<_> = due.iter().filter_map(|f| f.job.as_ref()).collect();
        assert_eq!(due_ids.len(), 1);
        assert_eq!(due_ids[0].job_id, old);
        core.forget_finished(&due).unwrap();
        assert_eq!(keys_naming(&core, &old), Vec::<String>::new(), "all of it");
        assert_eq!(error_code(core.job(&old)), ErrorCode::NotFound);
        assert_eq!(core.job(&recent).unwrap().state, JobState::Succeeded);
        assert_eq!(core.job(&open).unwrap().state, JobState::Queued);
        assert!(!keys_naming(&core, &open).is_empty());
        core.check_job_indexes().unwrap();
        // The key is free again: a new job.
        let (fresh, created, ..) = core.submit_job(&dev, keyed, T0).unwrap();
        assert!(created && fresh.job_id != old);
        // An open job is never due, however old.
        let all = core.finished_before(UnixMillis(u64::MAX), 100).unwrap();
        assert!(
            all.iter()
                .all(|f| f.job.as_ref().is_some_and(|j| j.job_id == recent))
        );
    }

    #[test]
    fn acknowledged_feed_entries_are_deleted() {
        let (core, dev) = core_with_device();
        for _ in 0..3 {
            job(&core, &dev);
        }
        core.ack(&dev, FeedSeq(2)).unwrap();
        let feed = core.committer.store().scan_prefix(b"f/").unwrap();
        assert_eq!(feed.len(), 1, "only the unacknowledged entry is left");
        let (entries, newest) = core.feed_after(&dev, FeedSeq::ZERO, 10).unwrap();
        assert_eq!(newest, FeedSeq(3));
        let seqs: Vec<_> = entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [FeedSeq(3)]);
        core.ack(&dev, FeedSeq(3)).unwrap();
        assert!(
            core.committer
                .store()
                .scan_prefix(b"f/")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn settled_records_and_old_outbox_requests_are_forgotten_and_nothing_newer() {
        use schemas::api::SubmitHeldJob;
        use schemas::outbox::{DeviceRequest, OutboxItem};
        let (core, dev) = core_with_device();
        let taken = instruct(&core, &dev, 1, 1000);
        let waiting = instruct(&core, &dev, 2, 60_000);
        core.take_instruction(&dev, &taken, T0).unwrap();
        let user = schemas::UserId::from_random([3; 8]);
        let pin = schemas::Secret::new("1234");
        let new = NewPrincipal::new(user.clone(), "Anna", pin.clone());
        core.create_user(&new, &pin, T0).unwrap();
        let held = |ttl_secs| SubmitHeldJob {
            ttl_secs: Some(ttl_secs),
            ..Default::default()
        };
        let expiring = core
            .submit_held(&user, held(1), b"a".to_vec(), T0)
            .unwrap()
            .0;
        let lasting = core
            .submit_held(&user, held(3600), b"b".to_vec(), T0)
            .unwrap()
            .0;
        let panel = |no| OutboxItem {
            no: RequestNo(no),
            made_at: T0,
            body: DeviceRequest::PanelJob {
                action: "scan_to_cloud".into(),
                params: Default::default(),
            },
        };
        core.deliver(&dev, vec![panel(1)], T0).unwrap();
        core.deliver(&dev, vec![panel(2)], T0.saturating_add_ms(10_000))
            .unwrap();

        // Settled before T0 + 5 s: the taken instruction and the expired held job; received
        // before it: the first request.
        let cutoff = T0.saturating_add_ms(5000);
        let (n, _) = core.forget_settled(cutoff, cutoff, 100).unwrap();
        assert_eq!(n, 2);
        let requests = core.requests_before(cutoff, 100).unwrap();
        assert_eq!(requests.len(), 1);
        core.forget_requests(requests).unwrap();

        let store = core.committer.store();
        let listed: Vec<_> = core
            .instructions(&dev, cutoff)
            .unwrap()
            .into_iter()
            .map(|i| i.instruction_id)
            .collect();
        assert_eq!(listed, [waiting]);
        assert!(
            store
                .get(&Kind::Instruction.key(taken.as_str()))
                .unwrap()
                .is_none()
        );
        let held_left: Vec<JobId> = core.with_registry(|r| r.held.keys().cloned().collect());
        assert_eq!(held_left, [lasting.job_id.clone()].as_slice());
        assert!(
            store
                .get(&Kind::Payload.key(expiring.job_id.as_str()))
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .get(&Kind::Payload.key(lasting.job_id.as_str()))
                .unwrap()
                .is_some()
        );
        assert_eq!(core.jobs.get(&expiring.job_id), None);
        let numbers: Vec<u64> = core
            .device_requests(&dev, &schemas::api::RequestsQuery::default())
            .unwrap()
            .into_iter()
            .map(|r| r.no.0)
            .collect();
        assert_eq!(numbers, [2]);
        // A resend of the forgotten request is still a duplicate: nothing new is recorded.
        core.deliver(&dev, vec![panel(1)], cutoff).unwrap();
        assert_eq!(
            core.requests_before(UnixMillis(u64::MAX), 100)
                .unwrap()
                .len(),
            1
        );
        // Memory is what the store holds.
        let reloaded = Core::load(core.committer.clone(), policy(), 4).unwrap();
        assert_eq!(core.snapshot(), reloaded.snapshot());
        // Nothing more is due at the same cutoff.
        assert_eq!(core.forget_settled(cutoff, cutoff, 100).unwrap().0, 0);
    }

    #[test]
    fn a_store_written_before_the_indexes_gets_them_at_start() {
        let (core, dev) = core_with_device();
        let done = job(&core, &dev);
        let open = job(&core, &dev);
        finish(&core, &dev, &done, T0);
        // The store as an older bridge left it: records, no indexes.
        let store = core.committer.store();
        let old = Arc::new(MemStore::default());
        let mut batch = Batch::default();
        for (k, v) in store.scan_prefix(b"").unwrap() {
            let kind = Kind::ALL
                .iter()
                .find(|kind| k.starts_with(kind.prefix().as_bytes()));
            if kind.is_some_and(|kind| !kind.is_index()) {
                batch.put(k, v);
            }
        }
        old.apply(batch).unwrap();
        let committer = Committer::new(old, std::time::Duration::ZERO);
        let loaded = Core::load(committer, policy(), 4).unwrap();
        loaded.check_job_indexes().unwrap();
        assert_eq!(loaded.snapshot(), core.snapshot());
        assert_eq!(loaded.job(&done).unwrap().state, JobState::Succeeded);
        assert_eq!(loaded.job(&open).unwrap().state, JobState::Queued);
    }
}
