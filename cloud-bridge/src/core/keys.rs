//! The store's key space: one table of record kinds and their prefixes, used to build keys, to
//! load the state at start ([`super::Core::load`]) and to export it ([`crate::export`]).
//!
//! Ids never contain `/`. Keys of a device's feed and outbox end in a zero-padded hex number,
//! so that key order is number order and a range read returns entries in sequence; a page of
//! a device's range, from either end, is [`super::Core::device_page`].

use schemas::outbox::RequestNo;
use schemas::{DeviceId, FeedSeq, JobId, UnixMillis};

use super::CoreResult;

/// Every kind of record the bridge stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `d/{device_id}` → `DeviceRecord`
    Device,
    /// `e/{sha256(token)}` → `EnrollmentRecord`
    Enrollment,
    /// `q/{ops_id}` → `OpsLoginRecord`
    OpsLogin,
    /// `j/{job_id}` → `JobRecord`
    Job,
    /// `f/{device_id}/{seq as 16 hex digits}` → `FeedEntry`
    Feed,
    /// `r/{device_id}/{request no as 16 hex digits}` → `DeviceRequestRecord`
    DeviceRequest,
    /// `o/{owner_id}` → `OwnerRecord`
    Owner,
    /// `c/{companion_id}` → `CompanionRecord`
    Companion,
    /// `s/{service_id}` → `ServiceRecord`
    Service,
    /// `a/{application_id}` → `ApplicationRecord`
    Application,
    /// `i/{instruction_id}` → `InstructionRecord`
    Instruction,
    /// `k/{device_id}/{service_id}` → `ContractRecord`
    Contract,
    /// `u/{user_id}` → `UserRecord`
    User,
    /// `h/{job_id}` → `HeldJobRecord`
    HeldJob,
    /// `p/{job_id}` → the payload bytes of a job or a held job
    Payload,
    /// `n/{job_id}` → nothing: the job is open (not finished). What a start loads.
    OpenJob,
    /// `l/{device_id}/{job_id}` → nothing: the device's jobs, open and finished, in id order
    /// (ids grow with submission time).
    DeviceJob,
    /// `y/{device_id}/{idempotency key}` → the job id the key was used for.
    IdempotencyKey,
    /// `z/{finished_at as 16 hex digits}/{job_id}` → nothing: finished jobs, oldest finish
    /// first, for retention.
    Finished,
    /// `x/{at as 16 hex digits}/{id}` → `ConsoleActionRecord`: the console's audit trail,
    /// oldest first.
    ConsoleAction,
    /// `m/{name}` → facts about the store itself (the layout version).
    Meta,
}

impl Kind {
    /// Every kind, in the order an export lists them.
    pub const ALL: [Kind; 21] = [
        Kind::Device,
        Kind::Enrollment,
        Kind::OpsLogin,
        Kind::Job,
        Kind::Feed,
        Kind::DeviceRequest,
        Kind::Owner,
        Kind::Companion,
        Kind::Service,
        Kind::Application,
        Kind::Instruction,
        Kind::Contract,
        Kind::User,
        Kind::HeldJob,
        Kind::Payload,
        Kind::OpenJob,
        Kind::DeviceJob,
        Kind::IdempotencyKey,
        Kind::Finished,
        Kind::ConsoleAction,
        Kind::Meta,
    ];

    /// Whether the kind is an index over records of other kinds (derived from them, never
    /// exported, rebuilt by [`super::Core::load`] when the layout is older).
    pub const fn is_index(self) -> bool {
        matches!(
            self,
            Kind::OpenJob | Kind::DeviceJob | Kind::IdempotencyKey | Kind::Finished | Kind::Meta
        )
    }

    pub const fn prefix(self) -> &'static str {
        match self {
            Kind::Device => "d/",
            Kind::Enrollment => "e/",
            Kind::OpsLogin => "q/",
            Kind::Job => "j/",
            Kind::Feed => "f/",
            Kind::DeviceRequest => "r/",
            Kind::Owner => "o/",
            Kind::Companion => "c/",
            Kind::Service => "s/",
            Kind::Application => "a/",
            Kind::Instruction => "i/",
            Kind::Contract => "k/",
            Kind::User => "u/",
            Kind::HeldJob => "h/",
            Kind::Payload => "p/",
            Kind::OpenJob => "n/",
            Kind::DeviceJob => "l/",
            Kind::IdempotencyKey => "y/",
            Kind::Finished => "z/",
            Kind::ConsoleAction => "x/",
            Kind::Meta => "m/",
        }
    }

    /// The key of the record with this id.
    pub fn key(self, id: &str) -> Vec<u8> {
        format!("{}{id}", self.prefix()).into_bytes()
    }
}

pub(crate) fn feed_key(device: &DeviceId, seq: FeedSeq) -> Vec<u8> {
    format!("f/{device}/{:016x}", seq.0).into_bytes()
}

pub(crate) fn request_key(device: &DeviceId, no: RequestNo) -> Vec<u8> {
    format!("r/{device}/{:016x}", no.0).into_bytes()
}

pub(crate) fn contract_key(device: &DeviceId, service: &str) -> Vec<u8> {
    format!("k/{device}/{service}").into_bytes()
}

pub(crate) fn device_job_key(device: &DeviceId, job: &JobId) -> Vec<u8> {
    format!("l/{device}/{job}").into_bytes()
}

pub(crate) fn idempotency_key(device: &DeviceId, key: &str) -> Vec<u8> {
    format!("y/{device}/{key}").into_bytes()
}

pub(crate) fn console_action_key(at: UnixMillis, id: &str) -> Vec<u8> {
    format!("x/{:016x}/{id}", at.0).into_bytes()
}

pub(crate) fn finished_key(at: UnixMillis, job: &JobId) -> Vec<u8> {
    format!("z/{:016x}/{job}", at.0).into_bytes()
}

/// The job id at the end of a `j/`, `n/`, `l/` or `z/` key.
pub(crate) fn job_of_key(key: &[u8]) -> Option<JobId> {
    let key = std::str::from_utf8(key).ok()?;
    JobId::parse(key.rsplit('/').next()?).ok()
}

/// The end (exclusive) of the keys `{kind}{device}/…`, for range reads of one device's entries.
pub(crate) fn device_range_end(kind: Kind, device: &DeviceId) -> Vec<u8> {
    format!("{}{device}/~", kind.prefix()).into_bytes()
}

impl super::Core {
    /// A page of the device's stored records of `kind`, keyed from `first` to the end of the
    /// device's range: in `page`'s order, after the key `after` (itself left out) when given.
    pub(crate) fn device_page<A>(
        &self,
        kind: Kind,
        device: &DeviceId,
        first: Vec<u8>,
        after: Option<Vec<u8>>,
        page: &schemas::api::PageQuery<A>,
    ) -> CoreResult<crate::store::Pairs> {
        use schemas::api::Order;
        let end = device_range_end(kind, device);
        let (store, limit) = (self.committer.store(), page.page_size());
        Ok(match (page.order, after) {
            (Order::Oldest, None) => store.range(&first, &end, limit)?,
            (Order::Oldest, Some(mut after)) => {
                after.push(0); // the least key above `after`'s own
                store.range(&after, &end, limit)?
            }
            (Order::Newest, None) => store.range_back(&first, &end, limit)?,
            (Order::Newest, Some(after)) => store.range_back(&first, &after, limit)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_distinct_and_one_letter() {
        let mut seen: Vec<&str> = Kind::ALL.iter().map(|k| k.prefix()).collect();
        assert!(seen.iter().all(|p| p.len() == 2 && p.ends_with('/')));
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), Kind::ALL.len());
    }
}
