//! What the core's tests build on: a core over a memory store, registered devices, jobs,
//! instructions.

use super::*;
use crate::store::MemStore;
use schemas::data::Registration;
use schemas::{InstructionId, Secret, UnixMillis};

pub(crate) const T0: UnixMillis = UnixMillis(1_000_000);

pub(crate) fn policy() -> JobPolicy {
    JobPolicy {
        owner_check_ms: 5000,
        poll_interval_secs: 3600,
        print_session_ms: 1000,
        lease_ms: 1000,
        default_ttl_ms: 10_000,
        default_max_attempts: 2,
        max_attempts_limit: 10,
    }
}

pub(crate) fn core() -> Core {
    let committer = Committer::new(Arc::new(MemStore::default()), std::time::Duration::ZERO);
    Core::load(committer, policy(), 4).unwrap()
}

/// The code of the error an operation is expected to refuse with.
pub(crate) fn error_code<T: std::fmt::Debug>(result: CoreResult<T>) -> ErrorCode {
    result.unwrap_err().code()
}

/// A core with one registered device, `registered(&core, 1)`.
pub(crate) fn core_with_device() -> (Core, DeviceId) {
    let core = core();
    let dev = registered(&core, 1);
    (core, dev)
}

pub(crate) fn registered(core: &Core, n: u8) -> DeviceId {
    registered_as(core, n, "acme", "MFP-1")
}

/// Device `n` (id of the byte `n`, secret "secret") of `customer`, of `model`.
pub(crate) fn registered_as(core: &Core, n: u8, customer: &str, model: &str) -> DeviceId {
    let token = Secret::new(format!("token-{n}"));
    core.create_enrollment(token.clone(), customer.into(), 1, 60_000, T0)
        .unwrap();
    let reg = Registration {
        registration_id: None,
        enrollment_token: token,
        serial: format!("SN{n}"),
        model: model.into(),
        destination: "EU".into(),
        time_zone: "Europe/Berlin".into(),
        owner: None,
    };
    let id = DeviceId::from_random([n; 8]);
    core.register(&reg, id.clone(), &Secret::new("secret"), T0)
        .unwrap();
    id
}

/// Instruction `n` (id of the byte `n`) for `device`: a custom "reboot", valid `ttl_ms`.
pub(crate) fn instruct(core: &Core, device: &DeviceId, n: u8, ttl_ms: u64) -> InstructionId {
    let id = InstructionId::from_random([n; 8]);
    let body = schemas::services::InstructionBody::Custom {
        name: "reboot".into(),
        params: Default::default(),
    };
    core.create_instruction(device, id.clone(), body, ttl_ms, T0)
        .unwrap();
    id
}

pub(crate) fn job(core: &Core, device: &DeviceId) -> JobId {
    core.submit_job(device, new_job(), T0).unwrap().0.job_id
}

pub(crate) fn new_job() -> NewJob {
    NewJob {
        payload: b"%PDF".to_vec(),
        content_type: "application/pdf".into(),
        ttl_ms: None,
        max_attempts: None,
        idempotency_key: None,
        submitted_by: None,
        print: None,
    }
}
