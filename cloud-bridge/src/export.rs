//! `cloud-bridge export`: every record as JSON lines, so data can be inspected, backed up, or
//! moved to another store. One object per line, with a `"type"` of `device`, `enrollment`,
//! `job` (with `payload_base64`), `feed`, `device_request`, `owner`, `companion`, `service`,
//! `application`, `instruction`, `contract`, `user`, `held_job` (with `payload_base64`),
//! `console_action` (the console's audit trail) or `ops_login` (with the password as its
//! SHA-256 only).

use std::io::Write;

use base64::Engine as _;
use schemas::JobId;
use schemas::feed::FeedEntry;
use schemas::print::{HeldJobRecord, UserRecord};
use schemas::records::{
    CompanionRecord, ConsoleActionRecord, DeviceRecord, DeviceRequestRecord, EnrollmentRecord,
    JobRecord, OpsLoginRecord, OwnerRecord,
};
use schemas::services::{ApplicationRecord, ContractRecord, InstructionRecord, ServiceRecord};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::core::decode;
use crate::core::keys::Kind;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the export: {0}")]
    Write(#[from] std::io::Error),
}

/// One line of the export. Built and written one at a time, so the size of its largest
/// variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Line {
    Device(DeviceRecord),
    Enrollment(EnrollmentRecord),
    Job(WithPayload<JobRecord>),
    Feed {
        device_id: String,
        #[serde(flatten)]
        entry: FeedEntry,
    },
    DeviceRequest(DeviceRequestRecord),
    Owner(OwnerRecord),
    Companion(CompanionRecord),
    Service(ServiceRecord),
    Application(ApplicationRecord),
    Instruction(InstructionRecord),
    Contract(ContractRecord),
    User(UserRecord),
    HeldJob(WithPayload<HeldJobRecord>),
    OpsLogin(OpsLoginRecord),
    ConsoleAction(ConsoleActionRecord),
}

/// A job or held job with its payload, on one line.
#[derive(Serialize)]
struct WithPayload<T> {
    #[serde(flatten)]
    record: T,
    payload_base64: String,
}

impl<T> WithPayload<T> {
    fn new(record: T, payload: &[u8]) -> Self {
        let payload_base64 = base64::engine::general_purpose::STANDARD.encode(payload);
        WithPayload {
            record,
            payload_base64,
        }
    }
}

/// A job and its payload as one line of the export (the format of the retention archive too).
pub(crate) fn job_line(job: JobRecord, payload: &[u8]) -> Result<Vec<u8>, ExportError> {
    let line = Line::Job(WithPayload::new(job, payload));
    let mut out = Vec::new();
    write_line(&mut out, &line)?;
    Ok(out)
}

fn write_line(out: &mut impl Write, line: &Line) -> Result<(), ExportError> {
    serde_json::to_writer(&mut *out, line).map_err(std::io::Error::other)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// A record whose payload is stored under its job id.
trait HasPayload: DeserializeOwned {
    fn job_id(&self) -> &JobId;
}

impl HasPayload for JobRecord {
    fn job_id(&self) -> &JobId {
        &self.job_id
    }
}

impl HasPayload for HeldJobRecord {
    fn job_id(&self) -> &JobId {
        &self.job_id
    }
}

/// A job or held job read with its payload.
fn with_payload<T: HasPayload>(
    store: &dyn Store,
    k: &[u8],
    v: &[u8],
) -> Result<WithPayload<T>, StoreError> {
    let record: T = decode(k, v)?;
    let payload = store.get(&Kind::Payload.key(record.job_id().as_str()))?;
    Ok(WithPayload::new(record, &payload.unwrap_or_default()))
}

/// Writes all records of `store`, kind by kind in the order of [`Kind::ALL`] (payloads with
/// their job or held job, not on lines of their own); returns how many lines were written.
pub fn export(store: &dyn Store, out: &mut impl Write) -> Result<u64, ExportError> {
    let mut lines = 0u64;
    for kind in Kind::ALL {
        if kind == Kind::Payload || kind.is_index() {
            continue;
        }
        for (k, v) in store.scan_prefix(kind.prefix().as_bytes())? {
            let line = match kind {
                Kind::Device => Line::Device(decode(&k, &v)?),
                Kind::Enrollment => Line::Enrollment(decode(&k, &v)?),
                Kind::OpsLogin => Line::OpsLogin(decode(&k, &v)?),
                Kind::Job => Line::Job(with_payload(store, &k, &v)?),
                Kind::Feed => {
                    let key = String::from_utf8_lossy(&k);
                    Line::Feed {
                        device_id: key.split('/').nth(1).unwrap_or_default().to_owned(),
                        entry: decode(&k, &v)?,
                    }
                }
                Kind::DeviceRequest => Line::DeviceRequest(decode(&k, &v)?),
                Kind::Owner => Line::Owner(decode(&k, &v)?),
                Kind::Companion => Line::Companion(decode(&k, &v)?),
                Kind::Service => Line::Service(decode(&k, &v)?),
                Kind::Application => Line::Application(decode(&k, &v)?),
                Kind::Instruction => Line::Instruction(decode(&k, &v)?),
                Kind::Contract => Line::Contract(decode(&k, &v)?),
                Kind::User => Line::User(decode(&k, &v)?),
                Kind::HeldJob => Line::HeldJob(with_payload(store, &k, &v)?),
                Kind::ConsoleAction => Line::ConsoleAction(decode(&k, &v)?),
                Kind::Payload
                | Kind::OpenJob
                | Kind::DeviceJob
                | Kind::IdempotencyKey
                | Kind::Finished
                | Kind::Meta => continue,
            };
            write_line(out, &line)?;
            lines += 1;
        }
    }
    out.flush()?;
    Ok(lines)
}
