//! `cloud-bridge export`: every record as JSON lines, so data can be inspected, backed up, or
//! moved to another store. One object per line, with a `"type"` of `device`, `enrollment`,
//! `job` (with `payload_base64`), `feed`, `device_request`, `owner`, `companion`, `service`,
//! `application`, `instruction`, `contract`, `user`, `held_job` (with `payload_base64`) or
//! `ops_login` (with the password as its SHA-256 only).

use std::io::Write;

use base64::Engine as _;
use schemas::feed::FeedEntry;
use schemas::print::{HeldJobRecord, UserRecord};
use schemas::records::{
    CompanionRecord, DeviceRecord, DeviceRequestRecord, EnrollmentRecord, JobRecord,
    OpsLoginRecord, OwnerRecord,
};
use schemas::services::{ApplicationRecord, ContractRecord, InstructionRecord, ServiceRecord};
use serde::Serialize;

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
    Job {
        #[serde(flatten)]
        job: JobRecord,
        payload_base64: String,
    },
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
    HeldJob {
        #[serde(flatten)]
        held: HeldJobRecord,
        payload_base64: String,
    },
    OpsLogin(OpsLoginRecord),
}

/// A job and its payload as one line of the export (the format of the retention archive too).
pub(crate) fn job_line(job: JobRecord, payload: &[u8]) -> Result<Vec<u8>, ExportError> {
    let line = Line::Job {
        payload_base64: base64::engine::general_purpose::STANDARD.encode(payload),
        job,
    };
    let mut out = Vec::new();
    write_line(&mut out, &line)?;
    Ok(out)
}

fn write_line(out: &mut impl Write, line: &Line) -> Result<(), ExportError> {
    serde_json::to_writer(&mut *out, line).map_err(std::io::Error::other)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// Writes all records of `store`, kind by kind in the order of [`Kind::ALL`] (payloads with
/// their job or held job, not on lines of their own); returns how many lines were written.
pub fn export(store: &dyn Store, out: &mut impl Write) -> Result<u64, ExportError> {
    let payload_base64 = |id: &str| -> Result<String, StoreError> {
        let payload = store.get(&Kind::Payload.key(id))?.unwrap_or_default();
        Ok(base64::engine::general_purpose::STANDARD.encode(payload))
    };
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
                Kind::Job => {
                    let job: JobRecord = decode(&k, &v)?;
                    Line::Job {
                        payload_base64: payload_base64(job.job_id.as_str())?,
                        job,
                    }
                }
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
                Kind::HeldJob => {
                    let held: HeldJobRecord = decode(&k, &v)?;
                    Line::HeldJob {
                        payload_base64: payload_base64(held.job_id.as_str())?,
                        held,
                    }
                }
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
