//! The domain: device registry, per-device feeds, and the job lifecycle.
//!
//! [`Core`] is synchronous and takes the time as an argument, so its rules are tested without
//! clocks or sockets. Every mutation builds one [`Batch`] and applies it through the
//! [`Committer`]; the caller ([`crate::bridge::Bridge`]) waits for the returned ticket to be
//! durable before it acknowledges anything or publishes the [`Effects`].
//!
//! Storage keys (ids never contain `/`):
//! - `d/{device_id}` → [`DeviceRecord`]
//! - `e/{sha256(token)}` → [`EnrollmentRecord`]
//! - `j/{job_id}` → [`JobRecord`]
//! - `p/{job_id}` → the job's payload bytes
//! - `f/{device_id}/{seq as 16 hex digits}` → [`FeedEntry`]
//! - `r/{device_id}/{request no as 16 hex digits}` → [`schemas::records::DeviceRequestRecord`]
//! - `o/{owner_id}` → [`OwnerRecord`], `c/{companion_id}` → [`CompanionRecord`]
//!
//! Rules by topic live in submodules: [`requests`] (a device's outbox: status, consent,
//! panel jobs), [`principals`] (owners, companions, who may submit to which device),
//! [`owner`] (owner confirmation after a reset or relocation, and invalidation).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use schemas::data::{DeviceStatus, ErrorBody, ErrorCode, JobOffer, Registration};
use schemas::feed::{FeedBody, FeedEntry};
use schemas::job::{JobState, JobUpdate, Transition};
use schemas::ops::OpsEvent;
use schemas::print::{HeldJobRecord, UserRecord};
use schemas::records::{
    CompanionRecord, DeviceRecord, EnrollmentRecord, JobRecord, OwnerBinding, OwnerRecord,
};
use schemas::services::{ContractRecord, InstructionRecord, ServiceRecord};
use schemas::{CompanionId, DeviceId, FeedSeq, JobId, OwnerId, Secret, UnixMillis, UserId};
use sha2::{Digest, Sha256};

use crate::store::{Batch, Committer, StoreError, Ticket};

mod contracts;
mod held;
mod nudge;
mod ops_logins;
mod owner;
mod principals;
mod queues;
mod requests;
mod services;
mod settings;

pub use ops_logins::OpsLoginFailure;
pub use owner::OwnerVerdict;
pub use principals::Principal;
pub use services::ServiceRegistration;

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
    if name.trim().is_empty() || name.len() > 128 {
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
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What the cloud keeps of an owner PIN: salted with the device id.
fn owner_pin_hash(device_id: &DeviceId, pin: &str) -> String {
    sha256_hex(format!("{device_id}:{pin}").as_bytes())
}

fn key(prefix: &str, id: &str) -> Vec<u8> {
    format!("{prefix}/{id}").into_bytes()
}

fn feed_key(device: &DeviceId, seq: FeedSeq) -> Vec<u8> {
    format!("f/{device}/{:016x}", seq.0).into_bytes()
}

fn encode<T: serde::Serialize>(v: &T) -> CoreResult<Vec<u8>> {
    schemas::encode(v).map_err(|e| CoreError::Store(StoreError::Engine(e.to_string())))
}

fn decode<T: serde::de::DeserializeOwned>(k: &[u8], v: &[u8]) -> Result<T, StoreError> {
    schemas::codec::decode_limited(v, usize::MAX).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(k).into_owned(),
        detail: e.to_string(),
    })
}

/// The in-memory working state, backed by the store.
#[derive(Debug)]
pub struct Core {
    committer: Arc<Committer>,
    policy: JobPolicy,
    devices: HashMap<DeviceId, DeviceRecord>,
    enrollments: HashMap<String, EnrollmentRecord>,
    jobs: HashMap<JobId, JobRecord>,
    device_jobs: HashMap<DeviceId, Vec<JobId>>,
    idempotency: HashMap<(DeviceId, String), JobId>,
    /// (deadline, job) for every leased job.
    leases: BTreeSet<(UnixMillis, JobId)>,
    /// (expires_at, job) for every job not yet started.
    expiries: BTreeSet<(UnixMillis, JobId)>,
    /// (deadline, device) for every owner check under way.
    owner_checks: BTreeSet<(UnixMillis, DeviceId)>,
    owners: HashMap<OwnerId, OwnerRecord>,
    companions: HashMap<CompanionId, CompanionRecord>,
    /// SHA-256 of an owner's or companion's API token → who it is.
    tokens: HashMap<String, Principal>,
    svc: services::ServiceIndex,
    /// (device, service) → contract.
    contracts: HashMap<(DeviceId, String), ContractRecord>,
    users: HashMap<UserId, UserRecord>,
    held: HashMap<JobId, HeldJobRecord>,
    /// SHA-256 of a print session's token → the session.
    sessions: HashMap<String, held::PrintSession>,
    ops_logins: HashMap<schemas::OpsId, schemas::records::OpsLoginRecord>,
}

impl Core {
    /// Loads the state from the store.
    pub fn load(committer: Arc<Committer>, policy: JobPolicy) -> Result<Core, StoreError> {
        let store = committer.store();
        let mut core = Core {
            committer: committer.clone(),
            policy,
            devices: HashMap::new(),
            enrollments: HashMap::new(),
            jobs: HashMap::new(),
            device_jobs: HashMap::new(),
            idempotency: HashMap::new(),
            leases: BTreeSet::new(),
            expiries: BTreeSet::new(),
            owner_checks: BTreeSet::new(),
            owners: HashMap::new(),
            companions: HashMap::new(),
            tokens: HashMap::new(),
            svc: services::ServiceIndex::default(),
            contracts: HashMap::new(),
            users: HashMap::new(),
            held: HashMap::new(),
            sessions: HashMap::new(),
            ops_logins: HashMap::new(),
        };
        for (k, v) in store.scan_prefix(b"q/")? {
            let q: schemas::records::OpsLoginRecord = decode(&k, &v)?;
            core.ops_logins.insert(q.ops_id.clone(), q);
        }
        for (k, v) in store.scan_prefix(b"u/")? {
            let u: UserRecord = decode(&k, &v)?;
            if !u.token_sha256.is_empty() {
                core.tokens
                    .insert(u.token_sha256.clone(), Principal::User(u.user_id.clone()));
            }
            core.users.insert(u.user_id.clone(), u);
        }
        for (k, v) in store.scan_prefix(b"h/")? {
            let h: HeldJobRecord = decode(&k, &v)?;
            core.held.insert(h.job_id.clone(), h);
        }
        for (k, v) in store.scan_prefix(b"k/")? {
            let c: ContractRecord = decode(&k, &v)?;
            core.contracts
                .insert((c.device_id.clone(), c.service_id.clone()), c);
        }
        for (k, v) in store.scan_prefix(b"s/")? {
            let s: ServiceRecord = decode(&k, &v)?;
            core.svc.services.insert(s.service_id.clone(), s);
        }
        for (k, v) in store.scan_prefix(b"a/")? {
            core.svc.add_application(decode(&k, &v)?);
        }
        for (k, v) in store.scan_prefix(b"i/")? {
            let i: InstructionRecord = decode(&k, &v)?;
            core.svc.instructions.insert(i.instruction_id.clone(), i);
        }
        for (k, v) in store.scan_prefix(b"o/")? {
            let o: OwnerRecord = decode(&k, &v)?;
            core.tokens
                .insert(o.token_sha256.clone(), Principal::Owner(o.owner_id.clone()));
            core.owners.insert(o.owner_id.clone(), o);
        }
        for (k, v) in store.scan_prefix(b"c/")? {
            let c: CompanionRecord = decode(&k, &v)?;
            core.tokens.insert(
                c.token_sha256.clone(),
                Principal::Companion(c.companion_id.clone()),
            );
            core.companions.insert(c.companion_id.clone(), c);
        }
        for (k, v) in store.scan_prefix(b"d/")? {
            let d: DeviceRecord = decode(&k, &v)?;
            if let Some(check) = &d.owner_check {
                core.owner_checks
                    .insert((check.deadline, d.device_id.clone()));
            }
            core.devices.insert(d.device_id.clone(), d);
        }
        for (k, v) in store.scan_prefix(b"e/")? {
            let e: EnrollmentRecord = decode(&k, &v)?;
            core.enrollments.insert(e.token_sha256.clone(), e);
        }
        let mut jobs: Vec<JobRecord> = Vec::new();
        for (k, v) in store.scan_prefix(b"j/")? {
            jobs.push(decode(&k, &v)?);
        }
        jobs.sort_by_key(|j| j.created_at);
        for j in jobs {
            core.index_job(&j);
            core.device_jobs
                .entry(j.device_id.clone())
                .or_default()
                .push(j.job_id.clone());
            if let Some(key) = &j.idempotency_key {
                core.idempotency
                    .insert((j.device_id.clone(), key.clone()), j.job_id.clone());
            }
            core.jobs.insert(j.job_id.clone(), j);
        }
        Ok(core)
    }

    pub fn policy(&self) -> &JobPolicy {
        &self.policy
    }

    fn index_job(&mut self, j: &JobRecord) {
        if let Some(until) = j.lease_until
            && matches!(j.state, JobState::Delivered | JobState::InProgress)
        {
            self.leases.insert((until, j.job_id.clone()));
        }
        if matches!(j.state, JobState::Queued | JobState::Delivered) {
            self.expiries.insert((j.expires_at, j.job_id.clone()));
        }
    }

    fn unindex_job(&mut self, j: &JobRecord) {
        if let Some(until) = j.lease_until {
            self.leases.remove(&(until, j.job_id.clone()));
        }
        self.expiries.remove(&(j.expires_at, j.job_id.clone()));
    }

    /// A new job id: the submission time in milliseconds (48 bits) then 16 random bits, so
    /// that ids, and the store's `j/` and `p/` keys, grow with time. New jobs then land in the
    /// store's newest pages instead of anywhere in the key space, so the pages a busy bridge
    /// writes stay few as the store grows. An id already taken is drawn again; after a few
    /// misses (a millisecond crowded with jobs, or a clock set back) the next millisecond is
    /// used, so this always ends.
    pub fn fresh_job_id(&self, now: UnixMillis) -> JobId {
        let mut millis = now.0;
        loop {
            for _ in 0..16 {
                let mut bytes = [0u8; 8];
                bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
                bytes[6..].copy_from_slice(&rand::random::<[u8; 2]>());
                let id = JobId::from_random(bytes);
                if !self.jobs.contains_key(&id) && !self.held.contains_key(&id) {
                    return id;
                }
            }
            millis = millis.wrapping_add(1);
        }
    }

    fn commit(&self, batch: Batch) -> CoreResult<Ticket> {
        Ok(self.committer.apply(batch)?)
    }

    /// A ticket covering everything applied so far (for reads).
    pub fn read_ticket(&self) -> Ticket {
        self.committer.current()
    }

    // ---------------------------------------------------------------- registry

    pub fn create_enrollment(
        &mut self,
        token: Secret,
        customer: String,
        max_uses: u32,
        ttl_ms: u64,
        now: UnixMillis,
    ) -> CoreResult<(EnrollmentRecord, Ticket)> {
        if customer.trim().is_empty() || customer.len() > 128 {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                "customer must be 1 to 128 characters",
            ));
        }
        if max_uses == 0 {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                "max_uses must be at least 1",
            ));
        }
        let record = EnrollmentRecord {
            token_sha256: sha256_hex(token.expose().as_bytes()),
            customer,
            created_at: now,
            expires_at: now.saturating_add_ms(ttl_ms),
            uses_left: max_uses,
        };
        let mut batch = Batch::default();
        batch.put(key("e", &record.token_sha256), encode(&record)?);
        let ticket = self.commit(batch)?;
        self.enrollments
            .insert(record.token_sha256.clone(), record.clone());
        Ok((record, ticket))
    }

    /// Registers a device with an enrollment token; the caller generated `device_id` and
    /// `secret` (only the secret's hash is kept).
    pub fn register(
        &mut self,
        reg: &Registration,
        device_id: DeviceId,
        secret: &Secret,
        now: UnixMillis,
    ) -> CoreResult<(DeviceRecord, Ticket, Effects)> {
        for (name, value, max) in [
            ("serial", &reg.serial, 64),
            ("model", &reg.model, 64),
            ("destination", &reg.destination, 32),
            ("time_zone", &reg.time_zone, 64),
        ] {
            if value.trim().is_empty() || value.len() > max {
                return Err(CoreError::new(
                    ErrorCode::BadRequest,
                    format!("{name} must be 1 to {max} characters"),
                ));
            }
        }
        let token_hash = sha256_hex(reg.enrollment_token.expose().as_bytes());
        let enrollment = match self.enrollments.get(&token_hash) {
            None => {
                return Err(CoreError::new(
                    ErrorCode::EnrollmentInvalid,
                    "unknown enrollment token",
                ));
            }
            Some(e) if e.expires_at <= now => {
                return Err(CoreError::new(
                    ErrorCode::EnrollmentInvalid,
                    "enrollment token expired",
                ));
            }
            Some(e) if e.uses_left == 0 => {
                return Err(CoreError::new(
                    ErrorCode::EnrollmentInvalid,
                    "enrollment token already used up",
                ));
            }
            Some(e) => e.clone(),
        };
        if self.devices.contains_key(&device_id) {
            return Err(CoreError::new(
                ErrorCode::Conflict,
                "device id collision; retry",
            ));
        }
        let owner = match &reg.owner {
            None => None,
            Some(claim) => {
                if !self.owners.contains_key(&claim.owner_id) {
                    return Err(CoreError::new(
                        ErrorCode::EnrollmentInvalid,
                        format!("unknown owner {}", claim.owner_id),
                    ));
                }
                let pin = claim.pin.expose();
                if pin.len() < 4 || pin.len() > 64 {
                    return Err(CoreError::new(
                        ErrorCode::BadRequest,
                        "owner PIN must be 4 to 64 characters",
                    ));
                }
                Some(OwnerBinding {
                    owner_id: claim.owner_id.clone(),
                    pin_sha256: owner_pin_hash(&device_id, pin),
                })
            }
        };
        let device = DeviceRecord {
            device_id: device_id.clone(),
            serial: reg.serial.clone(),
            model: reg.model.clone(),
            destination: reg.destination.clone(),
            time_zone: reg.time_zone.clone(),
            customer: enrollment.customer.clone(),
            secret_sha256: sha256_hex(secret.expose().as_bytes()),
            registered_at: now,
            disabled: false,
            newest: FeedSeq::ZERO,
            acked: FeedSeq::ZERO,
            last_status: None,
            last_status_at: None,
            delivered: Default::default(),
            consent: None,
            consent_changes: Vec::new(),
            owner,
            registration_completed_at: None,
            owner_check: None,
            invalidated: None,
            settings: None,
            settings_reported: None,
            services: Vec::new(),
            printer: None,
            counters: None,
        };
        let mut enrollment = enrollment;
        enrollment.uses_left -= 1;
        let mut batch = Batch::default();
        batch.put(key("d", device_id.as_str()), encode(&device)?);
        batch.put(key("e", &token_hash), encode(&enrollment)?);
        let ticket = self.commit(batch)?;
        self.enrollments.insert(token_hash, enrollment);
        self.devices.insert(device_id.clone(), device.clone());
        let effects = Effects {
            feed_grew: vec![],
            events: vec![OpsEvent::DeviceRegistered {
                device_id,
                serial: device.serial.clone(),
                model: device.model.clone(),
                at: now,
            }],
        };
        Ok((device, ticket, effects))
    }

    /// Checks a device's credentials. Read-only.
    pub fn authenticate(
        &self,
        device_id: &str,
        secret: &str,
    ) -> Result<&DeviceRecord, AuthFailure> {
        let id = DeviceId::parse(device_id).map_err(|_| AuthFailure::UnknownDevice)?;
        let device = self.devices.get(&id).ok_or(AuthFailure::UnknownDevice)?;
        let actual = sha256_hex(secret.as_bytes());
        if !broker::constant_time_eq(actual.as_bytes(), device.secret_sha256.as_bytes()) {
            return Err(AuthFailure::WrongSecret);
        }
        if device.invalidated.is_some() {
            return Err(AuthFailure::Invalidated);
        }
        if device.disabled {
            return Err(AuthFailure::Disabled);
        }
        Ok(device)
    }

    pub fn device(&self, id: &DeviceId) -> CoreResult<&DeviceRecord> {
        self.devices
            .get(id)
            .ok_or_else(|| CoreError::new(ErrorCode::NotFound, format!("no device {id}")))
    }

    pub fn devices(&self) -> impl Iterator<Item = &DeviceRecord> {
        self.devices.values()
    }

    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    pub fn job_count(&self) -> usize {
        self.jobs.len()
    }

    pub fn disable_device(
        &mut self,
        id: &DeviceId,
        now: UnixMillis,
    ) -> CoreResult<(DeviceRecord, Ticket, Effects)> {
        let mut device = self.device(id)?.clone();
        if device.disabled {
            return Ok((device, self.read_ticket(), Effects::default()));
        }
        device.disabled = true;
        let mut batch = Batch::default();
        batch.put(key("d", id.as_str()), encode(&device)?);
        let ticket = self.commit(batch)?;
        self.devices.insert(id.clone(), device.clone());
        let effects = Effects {
            feed_grew: vec![],
            events: vec![OpsEvent::DeviceDisabled {
                device_id: id.clone(),
                at: now,
            }],
        };
        Ok((device, ticket, effects))
    }

    pub fn report_status(
        &mut self,
        id: &DeviceId,
        status: DeviceStatus,
        now: UnixMillis,
    ) -> CoreResult<(Ticket, Effects)> {
        requests::check_status(&status).map_err(CoreError::Refused)?;
        let mut device = self.active_device(id)?.clone();
        requests::check_consent(&device)?;
        let event = requests::apply_status(&mut device, status, now);
        let mut batch = Batch::default();
        batch.put(key("d", id.as_str()), encode(&device)?);
        let ticket = self.commit(batch)?;
        self.devices.insert(id.clone(), device);
        let effects = Effects {
            feed_grew: vec![],
            events: vec![event],
        };
        Ok((ticket, effects))
    }

    /// The device registers (or updates) its printer queue. Unchanged: nothing is written.
    pub fn register_printer(
        &mut self,
        id: &DeviceId,
        capabilities: schemas::print::Capabilities,
        now: UnixMillis,
    ) -> CoreResult<(UnixMillis, Ticket)> {
        capabilities
            .validate()
            .map_err(|e| CoreError::new(ErrorCode::BadRequest, format!("capabilities: {e}")))?;
        let device = self.active_device(id)?;
        if let Some(p) = &device.printer
            && p.capabilities == capabilities
        {
            return Ok((p.registered_at, self.read_ticket()));
        }
        let mut device = device.clone();
        device.printer = Some(schemas::records::PrinterQueue {
            capabilities,
            registered_at: now,
        });
        let mut batch = Batch::default();
        batch.put(key("d", id.as_str()), encode(&device)?);
        let ticket = self.commit(batch)?;
        self.devices.insert(id.clone(), device);
        Ok((now, ticket))
    }

    /// The device, if it may use its connections; why not otherwise.
    pub(crate) fn active_device(&self, id: &DeviceId) -> CoreResult<&DeviceRecord> {
        let device = self.device(id)?;
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
        Ok(device)
    }

    // ---------------------------------------------------------------- feed

    /// Appends an entry to a device's feed, adding the writes to `batch`.
    fn append_feed(
        &mut self,
        batch: &mut Batch,
        device_id: &DeviceId,
        body: FeedBody,
        now: UnixMillis,
        effects: &mut Effects,
    ) -> CoreResult<()> {
        let device = self
            .devices
            .get_mut(device_id)
            .ok_or_else(|| CoreError::new(ErrorCode::NotFound, format!("no device {device_id}")))?;
        let seq = device.newest.next();
        let entry = FeedEntry { seq, at: now, body };
        batch.put(feed_key(device_id, seq), encode(&entry)?);
        device.newest = seq;
        batch.put(key("d", device_id.as_str()), encode(&*device)?);
        effects.feed_grew.retain(|(d, _)| d != device_id);
        effects.feed_grew.push((device_id.clone(), seq));
        Ok(())
    }

    /// Entries after `after`, at most `limit`, and the feed's newest sequence number.
    pub fn feed_after(
        &self,
        device_id: &DeviceId,
        after: FeedSeq,
        limit: usize,
    ) -> CoreResult<(Vec<FeedEntry>, FeedSeq)> {
        let device = self.active_device(device_id)?;
        if after >= device.newest {
            return Ok((Vec::new(), device.newest));
        }
        let start = feed_key(device_id, after.next());
        let end = format!("f/{device_id}/~").into_bytes();
        let entries = self
            .committer
            .store()
            .range(&start, &end, limit)?
            .into_iter()
            .map(|(k, v)| decode::<FeedEntry>(&k, &v))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((entries, device.newest))
    }

    /// Records that the device has handled everything up to `upto`. Idempotent; never moves
    /// the cursor backwards.
    pub fn ack(&mut self, device_id: &DeviceId, upto: FeedSeq) -> CoreResult<(FeedSeq, Ticket)> {
        let device = self.active_device(device_id)?;
        if upto > device.newest {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                format!("ack {upto} is past the newest entry {}", device.newest),
            ));
        }
        if upto <= device.acked {
            return Ok((device.acked, self.read_ticket()));
        }
        let mut device = device.clone();
        device.acked = upto;
        let mut batch = Batch::default();
        batch.put(key("d", device_id.as_str()), encode(&device)?);
        let ticket = self.commit(batch)?;
        self.devices.insert(device_id.clone(), device);
        Ok((upto, ticket))
    }

    /// Whether a connecting device should be told at once that work is waiting.
    pub fn pending_for(&self, device_id: &DeviceId) -> Option<FeedSeq> {
        let d = self.devices.get(device_id)?;
        (!d.disabled && d.acked < d.newest).then_some(d.newest)
    }

    // ---------------------------------------------------------------- jobs

    pub fn submit_job(
        &mut self,
        device_id: &DeviceId,
        job_id: JobId,
        new: NewJob,
        now: UnixMillis,
    ) -> CoreResult<(JobRecord, bool, Ticket, Effects)> {
        self.active_device(device_id)?;
        if let Some(key) = &new.idempotency_key {
            if key.is_empty() || key.len() > 128 {
                return Err(CoreError::new(
                    ErrorCode::BadRequest,
                    "idempotency_key must be 1 to 128 characters",
                ));
            }
            if let Some(existing) = self.idempotency.get(&(device_id.clone(), key.clone())) {
                let job = self.jobs.get(existing).cloned().ok_or_else(|| {
                    CoreError::new(ErrorCode::Internal, "idempotency index out of date")
                })?;
                return Ok((job, false, self.read_ticket(), Effects::default()));
            }
        }
        if new.payload.len() > schemas::MAX_PAYLOAD_BYTES {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                format!(
                    "payload of {} bytes exceeds the limit of {} bytes",
                    new.payload.len(),
                    schemas::MAX_PAYLOAD_BYTES
                ),
            ));
        }
        if new.content_type.is_empty() || new.content_type.len() > 128 {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                "content_type must be 1 to 128 characters",
            ));
        }
        let max_attempts = new.max_attempts.unwrap_or(self.policy.default_max_attempts);
        if max_attempts == 0 || max_attempts > self.policy.max_attempts_limit {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                format!(
                    "max_attempts must be 1 to {}",
                    self.policy.max_attempts_limit
                ),
            ));
        }
        let ttl_ms = new.ttl_ms.unwrap_or(self.policy.default_ttl_ms);
        if ttl_ms == 0 {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                "ttl must be positive",
            ));
        }
        if let Some(print) = &new.print {
            check_print(self.device(device_id)?, print)?;
        }
        if self.jobs.contains_key(&job_id) {
            return Err(CoreError::new(
                ErrorCode::Conflict,
                "job id collision; retry",
            ));
        }
        let job = JobRecord {
            job_id: job_id.clone(),
            device_id: device_id.clone(),
            state: JobState::Queued,
            attempt: 0,
            max_attempts,
            created_at: now,
            expires_at: now.saturating_add_ms(ttl_ms),
            lease_until: None,
            idempotency_key: new.idempotency_key.clone(),
            content_type: new.content_type,
            payload_len: new.payload.len() as u64,
            outcome: None,
            submitted_by: new.submitted_by,
            print: new.print,
            history: vec![Transition {
                from: None,
                to: JobState::Queued,
                at: now,
                attempt: 0,
                reason: None,
            }],
        };
        let mut effects = Effects::default();
        let mut batch = Batch::default();
        batch.put(key("j", job_id.as_str()), encode(&job)?);
        batch.put(key("p", job_id.as_str()), new.payload);
        self.append_feed(
            &mut batch,
            device_id,
            FeedBody::JobOffered {
                job_id: job_id.clone(),
            },
            now,
            &mut effects,
        )?;
        let ticket = self.commit(batch)?;
        effects.events.push(transition_event(&job));
        self.index_job(&job);
        self.device_jobs
            .entry(device_id.clone())
            .or_default()
            .push(job_id.clone());
        if let Some(key) = &job.idempotency_key {
            self.idempotency
                .insert((device_id.clone(), key.clone()), job_id.clone());
        }
        self.jobs.insert(job_id, job.clone());
        Ok((job, true, ticket, effects))
    }

    pub fn job(&self, id: &JobId) -> CoreResult<&JobRecord> {
        self.jobs
            .get(id)
            .ok_or_else(|| CoreError::new(ErrorCode::NotFound, format!("no job {id}")))
    }

    pub fn device_jobs(&self, device_id: &DeviceId) -> CoreResult<Vec<&JobRecord>> {
        self.device(device_id)?;
        Ok(self
            .device_jobs
            .get(device_id)
            .map(|ids| ids.iter().filter_map(|id| self.jobs.get(id)).collect())
            .unwrap_or_default())
    }

    /// The job, if it belongs to `device_id`.
    fn own_job(&self, device_id: &DeviceId, job_id: &JobId) -> CoreResult<&JobRecord> {
        let job = self.job(job_id)?;
        if &job.device_id != device_id {
            return Err(CoreError::new(
                ErrorCode::Forbidden,
                format!("job {job_id} belongs to another device"),
            ));
        }
        Ok(job)
    }

    /// Moves a job to `to`, recording the transition; writes go into `batch`.
    fn transition(
        &mut self,
        batch: &mut Batch,
        job: &mut JobRecord,
        to: JobState,
        reason: Option<String>,
        now: UnixMillis,
        effects: &mut Effects,
    ) -> CoreResult<()> {
        debug_assert!(job.state.can_become(to), "{:?} -> {:?}", job.state, to);
        self.unindex_job(job);
        job.history.push(Transition {
            from: Some(job.state),
            to,
            at: now,
            attempt: job.attempt,
            reason: reason.clone(),
        });
        job.state = to;
        if to.is_terminal() {
            job.lease_until = None;
            if reason.is_some() {
                job.outcome = reason;
            }
        }
        batch.put(key("j", job.job_id.as_str()), encode(&*job)?);
        effects.events.push(transition_event(job));
        Ok(())
    }

    fn store_job(&mut self, job: JobRecord) {
        self.index_job(&job);
        self.jobs.insert(job.job_id.clone(), job);
    }

    /// A device takes a job: the first take of an attempt moves it to `delivered` under a
    /// lease; taking again while holding the lease renews it.
    ///
    /// With `start`, the device starts the job at once: `delivered` and `in_progress` are
    /// recorded in one write (a job already in progress stays so).
    pub fn fetch_job(
        &mut self,
        device_id: &DeviceId,
        job_id: &JobId,
        start: bool,
        now: UnixMillis,
    ) -> CoreResult<(JobOffer, Ticket, Effects)> {
        if let Some(check) = &self.active_device(device_id)?.owner_check {
            return Err(CoreError::new(
                ErrorCode::OwnerCheckPending,
                format!(
                    "the owner has not yet confirmed ({}); no jobs until then",
                    check.reason
                ),
            ));
        }
        let mut job = self.own_job(device_id, job_id)?.clone();
        let mut effects = Effects::default();
        let mut batch = Batch::default();
        match job.state {
            JobState::Queued if job.expires_at <= now => {
                // The reaper records the expiry at its deadline; until then, refuse to start it.
                return Err(CoreError::new(
                    ErrorCode::InvalidState,
                    format!("job {job_id} expired"),
                ));
            }
            JobState::Queued => {
                job.attempt += 1;
                job.lease_until = Some(now.saturating_add_ms(self.policy.lease_ms));
                self.transition(
                    &mut batch,
                    &mut job,
                    JobState::Delivered,
                    None,
                    now,
                    &mut effects,
                )?;
            }
            JobState::Delivered if start => {
                job.lease_until = Some(now.saturating_add_ms(self.policy.lease_ms));
            }
            JobState::Delivered | JobState::InProgress => {
                self.unindex_job(&job);
                job.lease_until = Some(now.saturating_add_ms(self.policy.lease_ms));
                batch.put(key("j", job_id.as_str()), encode(&job)?);
            }
            state => {
                return Err(CoreError::new(
                    ErrorCode::InvalidState,
                    format!("job {job_id} is {}", state.as_str()),
                ));
            }
        }
        if start && job.state == JobState::Delivered {
            self.transition(
                &mut batch,
                &mut job,
                JobState::InProgress,
                None,
                now,
                &mut effects,
            )?;
        }
        let payload = self
            .committer
            .store()
            .get(&key("p", job_id.as_str()))?
            .ok_or_else(|| {
                CoreError::new(ErrorCode::Internal, format!("payload of {job_id} missing"))
            })?;
        let ticket = self.commit(batch)?;
        let offer = JobOffer {
            job_id: job_id.clone(),
            attempt: job.attempt,
            lease_until: job.lease_until.unwrap_or(now),
            content_type: job.content_type.clone(),
            payload,
            print: job.print.clone(),
        };
        self.store_job(job);
        Ok((offer, ticket, effects))
    }

    /// A device reports on the attempt it holds.
    pub fn update_job(
        &mut self,
        device_id: &DeviceId,
        job_id: &JobId,
        attempt: u32,
        update: JobUpdate,
        now: UnixMillis,
    ) -> CoreResult<(JobState, u32, Ticket, Effects)> {
        self.active_device(device_id)?;
        let mut job = self.own_job(device_id, job_id)?.clone();
        let final_state = match &update {
            JobUpdate::Succeeded { .. } => Some(JobState::Succeeded),
            JobUpdate::Failed { .. } => Some(JobState::Failed),
            JobUpdate::Rejected { .. } => Some(JobState::Rejected),
            JobUpdate::Started | JobUpdate::Progress { .. } => None,
        };
        if job.state.is_terminal() {
            // A resent final report of the attempt that finished the job is answered as before.
            if final_state == Some(job.state) && attempt == job.attempt {
                return Ok((
                    job.state,
                    job.attempt,
                    self.read_ticket(),
                    Effects::default(),
                ));
            }
            return Err(CoreError::new(
                ErrorCode::InvalidState,
                format!("job {job_id} is already {}", job.state.as_str()),
            ));
        }
        if job.state == JobState::Queued || attempt != job.attempt {
            return Err(CoreError::new(
                ErrorCode::LeaseLost,
                format!(
                    "attempt {attempt} of job {job_id} no longer holds the lease (job is {} at attempt {}); take it again",
                    job.state.as_str(),
                    job.attempt
                ),
            ));
        }
        let mut effects = Effects::default();
        let mut batch = Batch::default();
        let lease = Some(now.saturating_add_ms(self.policy.lease_ms));
        match update {
            JobUpdate::Started if job.state == JobState::Delivered => {
                self.transition(
                    &mut batch,
                    &mut job,
                    JobState::InProgress,
                    None,
                    now,
                    &mut effects,
                )?;
                job.lease_until = lease;
                batch.put(key("j", job_id.as_str()), encode(&job)?);
            }
            JobUpdate::Started | JobUpdate::Progress { .. } => {
                self.unindex_job(&job);
                job.lease_until = lease;
                batch.put(key("j", job_id.as_str()), encode(&job)?);
            }
            JobUpdate::Succeeded { detail } => {
                job.outcome = detail;
                self.transition(
                    &mut batch,
                    &mut job,
                    JobState::Succeeded,
                    None,
                    now,
                    &mut effects,
                )?;
            }
            JobUpdate::Failed { reason } => {
                self.transition(
                    &mut batch,
                    &mut job,
                    JobState::Failed,
                    Some(truncate(reason)),
                    now,
                    &mut effects,
                )?;
            }
            JobUpdate::Rejected { reason } => {
                self.transition(
                    &mut batch,
                    &mut job,
                    JobState::Rejected,
                    Some(truncate(reason)),
                    now,
                    &mut effects,
                )?;
            }
        }
        let ticket = self.commit(batch)?;
        let result = (job.state, job.attempt);
        self.store_job(job);
        Ok((result.0, result.1, ticket, effects))
    }

    pub fn cancel_job(
        &mut self,
        job_id: &JobId,
        reason: Option<String>,
        now: UnixMillis,
    ) -> CoreResult<(JobRecord, Ticket, Effects)> {
        let mut job = self.job(job_id)?.clone();
        if job.state.is_terminal() {
            return Err(CoreError::new(
                ErrorCode::InvalidState,
                format!("job {job_id} is already {}", job.state.as_str()),
            ));
        }
        let mut effects = Effects::default();
        let mut batch = Batch::default();
        let was_taken = job.state != JobState::Queued;
        let reason = truncate(reason.unwrap_or_else(|| "canceled by administrator".into()));
        self.transition(
            &mut batch,
            &mut job,
            JobState::Canceled,
            Some(reason),
            now,
            &mut effects,
        )?;
        if was_taken {
            let device_id = job.device_id.clone();
            self.append_feed(
                &mut batch,
                &device_id,
                FeedBody::JobCanceled {
                    job_id: job_id.clone(),
                },
                now,
                &mut effects,
            )?;
        }
        let ticket = self.commit(batch)?;
        self.store_job(job.clone());
        Ok((job, ticket, effects))
    }

    /// When the next lease, TTL or owner check falls due, if any.
    pub fn next_deadline(&self) -> Option<UnixMillis> {
        let lease = self.leases.first().map(|(t, _)| *t);
        let expiry = self.expiries.first().map(|(t, _)| *t);
        let check = self.owner_checks.first().map(|(t, _)| *t);
        [lease, expiry, check].into_iter().flatten().min()
    }

    /// Applies every lease and TTL that has fallen due by `now`.
    pub fn expire_due(&mut self, now: UnixMillis) -> CoreResult<(Option<Ticket>, Effects)> {
        let mut effects = Effects::default();
        let mut batch = Batch::default();
        let due_leases: Vec<JobId> = self
            .leases
            .iter()
            .take_while(|(t, _)| *t <= now)
            .map(|(_, id)| id.clone())
            .collect();
        for id in due_leases {
            let mut job = self.job(&id)?.clone();
            if job.attempt >= job.max_attempts {
                let reason = format!(
                    "lease expired on attempt {} of {}",
                    job.attempt, job.max_attempts
                );
                self.transition(
                    &mut batch,
                    &mut job,
                    JobState::Failed,
                    Some(reason),
                    now,
                    &mut effects,
                )?;
            } else {
                self.transition(
                    &mut batch,
                    &mut job,
                    JobState::Queued,
                    Some("lease expired".into()),
                    now,
                    &mut effects,
                )?;
                job.lease_until = None;
                batch.put(key("j", id.as_str()), encode(&job)?);
                let device_id = job.device_id.clone();
                self.append_feed(
                    &mut batch,
                    &device_id,
                    FeedBody::JobOffered { job_id: id.clone() },
                    now,
                    &mut effects,
                )?;
            }
            self.store_job(job);
        }
        let due_expiries: Vec<JobId> = self
            .expiries
            .iter()
            .take_while(|(t, _)| *t <= now)
            .map(|(_, id)| id.clone())
            .collect();
        for id in due_expiries {
            let mut job = self.job(&id)?.clone();
            if job.state.can_become(JobState::Expired) {
                self.transition(
                    &mut batch,
                    &mut job,
                    JobState::Expired,
                    Some("ttl passed before the job was started".into()),
                    now,
                    &mut effects,
                )?;
            } else {
                self.unindex_job(&job);
            }
            self.store_job(job);
        }
        self.expire_owner_checks(&mut batch, now, &mut effects)?;
        if batch.is_empty() {
            return Ok((None, effects));
        }
        let ticket = self.commit(batch)?;
        Ok((Some(ticket), effects))
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > 1024 {
        let mut cut = 1024;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

fn transition_event(job: &JobRecord) -> OpsEvent {
    let last = job.history.last();
    OpsEvent::JobTransition {
        device_id: job.device_id.clone(),
        job_id: job.job_id.clone(),
        from: last.and_then(|t| t.from),
        to: job.state,
        attempt: job.attempt,
        reason: last.and_then(|t| t.reason.clone()),
        at: last.map(|t| t.at).unwrap_or_default(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::MemStore;

    pub(crate) const T0: UnixMillis = UnixMillis(1_000_000);

    pub(crate) fn core() -> Core {
        let committer = Committer::new(Arc::new(MemStore::default()), std::time::Duration::ZERO);
        Core::load(
            committer,
            JobPolicy {
                owner_check_ms: 5000,
                poll_interval_secs: 3600,
                print_session_ms: 1000,
                lease_ms: 1000,
                default_ttl_ms: 10_000,
                default_max_attempts: 2,
                max_attempts_limit: 10,
            },
        )
        .unwrap()
    }

    pub(crate) fn registered(core: &mut Core, n: u8) -> DeviceId {
        let token = Secret::new(format!("token-{n}"));
        core.create_enrollment(token.clone(), "acme".into(), 1, 60_000, T0)
            .unwrap();
        let reg = Registration {
            enrollment_token: token,
            serial: format!("SN{n}"),
            model: "MFP-1".into(),
            destination: "EU".into(),
            time_zone: "Europe/Berlin".into(),
            owner: None,
        };
        let id = DeviceId::from_random([n; 8]);
        core.register(&reg, id.clone(), &Secret::new("secret"), T0)
            .unwrap();
        id
    }

    pub(crate) fn job(core: &mut Core, device: &DeviceId, n: u8) -> JobId {
        let id = JobId::from_random([n; 8]);
        core.submit_job(
            device,
            id.clone(),
            NewJob {
                payload: b"%PDF".to_vec(),
                content_type: "application/pdf".into(),
                ttl_ms: None,
                max_attempts: None,
                idempotency_key: None,
                submitted_by: None,
                print: None,
            },
            T0,
        )
        .unwrap();
        id
    }

    #[test]
    fn enrollment_token_is_single_use() {
        let mut core = core();
        registered(&mut core, 1);
        let reg = Registration {
            enrollment_token: Secret::new("token-1"),
            serial: "SN2".into(),
            model: "m".into(),
            destination: "EU".into(),
            time_zone: "UTC".into(),
            owner: None,
        };
        let err = core
            .register(&reg, DeviceId::from_random([2; 8]), &Secret::new("s"), T0)
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::EnrollmentInvalid);
    }

    #[test]
    fn authentication_checks_secret_and_disabled_flag() {
        let mut core = core();
        let id = registered(&mut core, 1);
        assert!(core.authenticate(id.as_str(), "secret").is_ok());
        assert_eq!(
            core.authenticate(id.as_str(), "nope").unwrap_err(),
            AuthFailure::WrongSecret
        );
        assert_eq!(
            core.authenticate("dev-0000000000000000", "secret")
                .unwrap_err(),
            AuthFailure::UnknownDevice
        );
        core.disable_device(&id, T0).unwrap();
        assert_eq!(
            core.authenticate(id.as_str(), "secret").unwrap_err(),
            AuthFailure::Disabled
        );
    }

    #[test]
    fn job_ids_grow_with_time() {
        let core = core();
        let t = UnixMillis(1_790_000_000_000);
        let ids: Vec<JobId> = (0..50)
            .map(|i| core.fresh_job_id(UnixMillis(t.0 + i)))
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        // The time is in the id (hex of the milliseconds), then random bits.
        assert!(ids[0].as_str().contains(&format!("{:012x}", t.0)));
        assert!(JobId::parse(ids[0].as_str()).is_ok());
    }

    #[test]
    fn a_millisecond_with_every_id_taken_moves_on_to_the_next() {
        let mut core = core();
        let device = registered(&mut core, 1);
        let first = job(&mut core, &device, 1);
        let template = core.jobs[&first].clone();
        let t = UnixMillis(1_790_000_000_000);
        let in_ms = |millis: u64, low: u16| {
            let mut bytes = [0u8; 8];
            bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
            bytes[6..].copy_from_slice(&low.to_be_bytes());
            JobId::from_random(bytes)
        };
        for low in 0..=u16::MAX {
            let id = in_ms(t.0, low);
            let mut taken = template.clone();
            taken.job_id = id.clone();
            core.jobs.insert(id, taken);
        }
        let id = core.fresh_job_id(t);
        assert!(!core.jobs.contains_key(&id));
        assert!(
            id > in_ms(t.0, u16::MAX) && id <= in_ms(t.0 + 1, u16::MAX),
            "{id}"
        );
    }

    #[test]
    fn fetch_with_start_records_delivered_and_in_progress_in_one_write() {
        let mut core = core();
        let dev = registered(&mut core, 1);
        let id = job(&mut core, &dev, 1);
        let (offer, _, effects) = core.fetch_job(&dev, &id, true, T0).unwrap();
        assert_eq!(offer.attempt, 1);
        let key = key("j", id.as_str());
        let stored = core.committer.store().get(&key).unwrap().unwrap();
        let stored: JobRecord = decode(&key, &stored).unwrap();
        assert_eq!(
            stored.state,
            JobState::InProgress,
            "both are in what was written"
        );
        let record = core.job(&id).unwrap();
        assert_eq!(record.state, JobState::InProgress);
        let steps: Vec<_> = record.history.iter().map(|t| (t.to, t.attempt)).collect();
        assert_eq!(
            steps,
            [
                (JobState::Queued, 0),
                (JobState::Delivered, 1),
                (JobState::InProgress, 1)
            ]
        );
        assert_eq!(effects.events.len(), 2, "ops see both transitions");
        // Taking it again while it runs renews the lease and records nothing new.
        core.fetch_job(&dev, &id, true, T0).unwrap();
        assert_eq!(core.job(&id).unwrap().history.len(), 3);
        let (state, ..) = core
            .update_job(&dev, &id, 1, JobUpdate::Succeeded { detail: None }, T0)
            .unwrap();
        assert_eq!(state, JobState::Succeeded);
        // A job taken without starting starts when taken again with `start`.
        let other = job(&mut core, &dev, 2);
        core.fetch_job(&dev, &other, false, T0).unwrap();
        assert_eq!(core.job(&other).unwrap().state, JobState::Delivered);
        core.fetch_job(&dev, &other, true, T0).unwrap();
        assert_eq!(core.job(&other).unwrap().state, JobState::InProgress);
    }

    #[test]
    fn full_lifecycle_records_every_transition() {
        let mut core = core();
        let dev = registered(&mut core, 1);
        let id = job(&mut core, &dev, 1);
        let (entries, newest) = core.feed_after(&dev, FeedSeq::ZERO, 10).unwrap();
        assert_eq!(newest, FeedSeq(1));
        assert_eq!(entries[0].body, FeedBody::JobOffered { job_id: id.clone() });
        let (offer, ..) = core.fetch_job(&dev, &id, false, T0).unwrap();
        assert_eq!(offer.payload, b"%PDF");
        assert_eq!(offer.attempt, 1);
        core.update_job(&dev, &id, 1, JobUpdate::Started, T0)
            .unwrap();
        let (state, ..) = core
            .update_job(&dev, &id, 1, JobUpdate::Succeeded { detail: None }, T0)
            .unwrap();
        assert_eq!(state, JobState::Succeeded);
        // A resent final report is answered the same, not refused.
        let (state, ..) = core
            .update_job(&dev, &id, 1, JobUpdate::Succeeded { detail: None }, T0)
            .unwrap();
        assert_eq!(state, JobState::Succeeded);
        let states: Vec<_> = core
            .job(&id)
            .unwrap()
            .history
            .iter()
            .map(|t| t.to)
            .collect();
        assert_eq!(
            states,
            [
                JobState::Queued,
                JobState::Delivered,
                JobState::InProgress,
                JobState::Succeeded
            ]
        );
    }

    #[test]
    fn another_devices_job_is_forbidden() {
        let mut core = core();
        let a = registered(&mut core, 1);
        let b = registered(&mut core, 2);
        let id = job(&mut core, &a, 1);
        let err = core.fetch_job(&b, &id, false, T0).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Forbidden);
        let err = core
            .update_job(&b, &id, 1, JobUpdate::Started, T0)
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::Forbidden);
    }

    #[test]
    fn lost_lease_requeues_then_fails_at_the_attempt_limit() {
        let mut core = core();
        let dev = registered(&mut core, 1);
        let id = job(&mut core, &dev, 1);
        core.fetch_job(&dev, &id, false, T0).unwrap();
        assert_eq!(core.next_deadline(), Some(T0.saturating_add_ms(1000)));
        let (_, effects) = core.expire_due(T0.saturating_add_ms(1000)).unwrap();
        assert_eq!(core.job(&id).unwrap().state, JobState::Queued);
        assert_eq!(effects.feed_grew, vec![(dev.clone(), FeedSeq(2))]);
        // The stale attempt can no longer report.
        let err = core
            .update_job(&dev, &id, 1, JobUpdate::Succeeded { detail: None }, T0)
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::LeaseLost);
        let t1 = T0.saturating_add_ms(2000);
        let (offer, ..) = core.fetch_job(&dev, &id, false, t1).unwrap();
        assert_eq!(offer.attempt, 2);
        core.expire_due(t1.saturating_add_ms(1000)).unwrap();
        let job = core.job(&id).unwrap();
        assert_eq!(job.state, JobState::Failed);
        assert!(job.outcome.as_deref().unwrap().contains("attempt 2 of 2"));
    }

    #[test]
    fn progress_renews_the_lease() {
        let mut core = core();
        let dev = registered(&mut core, 1);
        let id = job(&mut core, &dev, 1);
        core.fetch_job(&dev, &id, false, T0).unwrap();
        let t = T0.saturating_add_ms(900);
        core.update_job(&dev, &id, 1, JobUpdate::Progress { percent: 50 }, t)
            .unwrap();
        core.expire_due(T0.saturating_add_ms(1500)).unwrap();
        assert_eq!(core.job(&id).unwrap().state, JobState::Delivered);
    }

    #[test]
    fn ttl_expires_untaken_jobs_only() {
        let mut core = core();
        let dev = registered(&mut core, 1);
        let waiting = job(&mut core, &dev, 1);
        let running = job(&mut core, &dev, 2);
        core.fetch_job(&dev, &running, false, T0).unwrap();
        core.update_job(&dev, &running, 1, JobUpdate::Started, T0)
            .unwrap();
        // Keep the running job's lease alive past the TTL.
        let late = T0.saturating_add_ms(10_000);
        core.update_job(&dev, &running, 1, JobUpdate::Progress { percent: 1 }, late)
            .unwrap();
        core.expire_due(late).unwrap();
        assert_eq!(core.job(&waiting).unwrap().state, JobState::Expired);
        assert_eq!(core.job(&running).unwrap().state, JobState::InProgress);
    }

    #[test]
    fn idempotency_key_returns_the_first_job() {
        let mut core = core();
        let dev = registered(&mut core, 1);
        let new = NewJob {
            payload: vec![1],
            content_type: "x/y".into(),
            ttl_ms: None,
            max_attempts: None,
            idempotency_key: Some("order-7".into()),
            submitted_by: None,
            print: None,
        };
        let (first, created, ..) = core
            .submit_job(&dev, JobId::from_random([1; 8]), new.clone(), T0)
            .unwrap();
        assert!(created);
        let (second, created, ..) = core
            .submit_job(&dev, JobId::from_random([2; 8]), new, T0)
            .unwrap();
        assert!(!created);
        assert_eq!(first.job_id, second.job_id);
        assert_eq!(core.device_jobs(&dev).unwrap().len(), 1);
    }

    #[test]
    fn cancel_of_a_taken_job_tells_the_device() {
        let mut core = core();
        let dev = registered(&mut core, 1);
        let id = job(&mut core, &dev, 1);
        core.fetch_job(&dev, &id, false, T0).unwrap();
        let (_, _, effects) = core.cancel_job(&id, None, T0).unwrap();
        assert_eq!(effects.feed_grew, vec![(dev.clone(), FeedSeq(2))]);
        let err = core.cancel_job(&id, None, T0).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidState);
    }

    #[test]
    fn state_survives_reload() {
        let committer = Committer::new(Arc::new(MemStore::default()), std::time::Duration::ZERO);
        let mut core = Core::load(committer.clone(), JobPolicy::default()).unwrap();
        let dev = registered(&mut core, 1);
        let id = job(&mut core, &dev, 1);
        core.fetch_job(&dev, &id, false, T0).unwrap();
        core.ack(&dev, FeedSeq(1)).unwrap();
        let reloaded = Core::load(committer, JobPolicy::default()).unwrap();
        assert_eq!(reloaded.job(&id).unwrap(), core.job(&id).unwrap());
        assert_eq!(reloaded.device(&dev).unwrap().acked, FeedSeq(1));
        assert!(
            reloaded.next_deadline().is_some(),
            "lease must be re-indexed"
        );
    }

    #[test]
    fn ack_past_newest_is_refused_and_ack_never_goes_back() {
        let mut core = core();
        let dev = registered(&mut core, 1);
        job(&mut core, &dev, 1);
        job(&mut core, &dev, 2);
        assert_eq!(
            core.ack(&dev, FeedSeq(3)).unwrap_err().code(),
            ErrorCode::BadRequest
        );
        assert_eq!(core.ack(&dev, FeedSeq(2)).unwrap().0, FeedSeq(2));
        assert_eq!(core.ack(&dev, FeedSeq(1)).unwrap().0, FeedSeq(2));
        assert_eq!(core.pending_for(&dev), None);
    }
}
