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

use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the export: {0}")]
    Write(#[from] std::io::Error),
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Line<'a> {
    Device(&'a DeviceRecord),
    Enrollment(&'a EnrollmentRecord),
    Job {
        #[serde(flatten)]
        job: &'a JobRecord,
        payload_base64: String,
    },
    Feed {
        device_id: &'a str,
        #[serde(flatten)]
        entry: &'a FeedEntry,
    },
    DeviceRequest(&'a DeviceRequestRecord),
    Owner(&'a OwnerRecord),
    Companion(&'a CompanionRecord),
    Service(&'a ServiceRecord),
    Application(&'a ApplicationRecord),
    Instruction(&'a InstructionRecord),
    Contract(&'a ContractRecord),
    User(&'a UserRecord),
    HeldJob {
        #[serde(flatten)]
        held: &'a HeldJobRecord,
        payload_base64: String,
    },
    OpsLogin(&'a OpsLoginRecord),
}

fn decode<T: serde::de::DeserializeOwned>(k: &[u8], v: &[u8]) -> Result<T, StoreError> {
    schemas::codec::decode_limited(v, usize::MAX).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(k).into_owned(),
        detail: e.to_string(),
    })
}

fn write_line(out: &mut impl Write, line: &Line<'_>) -> Result<(), ExportError> {
    serde_json::to_writer(&mut *out, line).map_err(std::io::Error::other)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// Writes all records of `store`; returns how many lines were written.
pub fn export(store: &dyn Store, out: &mut impl Write) -> Result<u64, ExportError> {
    let mut lines = 0u64;
    for (k, v) in store.scan_prefix(b"d/")? {
        write_line(out, &Line::Device(&decode(&k, &v)?))?;
        lines += 1;
    }
    for (k, v) in store.scan_prefix(b"e/")? {
        write_line(out, &Line::Enrollment(&decode(&k, &v)?))?;
        lines += 1;
    }
    for (k, v) in store.scan_prefix(b"q/")? {
        write_line(out, &Line::OpsLogin(&decode(&k, &v)?))?;
        lines += 1;
    }
    for (k, v) in store.scan_prefix(b"j/")? {
        let job: JobRecord = decode(&k, &v)?;
        let payload = store
            .get(format!("p/{}", job.job_id).as_bytes())?
            .unwrap_or_default();
        let payload_base64 = base64::engine::general_purpose::STANDARD.encode(payload);
        write_line(
            out,
            &Line::Job {
                job: &job,
                payload_base64,
            },
        )?;
        lines += 1;
    }
    for (k, v) in store.scan_prefix(b"f/")? {
        let entry: FeedEntry = decode(&k, &v)?;
        let key = String::from_utf8_lossy(&k);
        let device_id = key.split('/').nth(1).unwrap_or_default();
        write_line(
            out,
            &Line::Feed {
                device_id,
                entry: &entry,
            },
        )?;
        lines += 1;
    }
    for (k, v) in store.scan_prefix(b"r/")? {
        write_line(out, &Line::DeviceRequest(&decode(&k, &v)?))?;
        lines += 1;
    }
    for (k, v) in store.scan_prefix(b"o/")? {
        write_line(out, &Line::Owner(&decode(&k, &v)?))?;
        lines += 1;
    }
    for (k, v) in store.scan_prefix(b"c/")? {
        write_line(out, &Line::Companion(&decode(&k, &v)?))?;
        lines += 1;
    }
    for (k, v) in store.scan_prefix(b"s/")? {
        write_line(out, &Line::Service(&decode(&k, &v)?))?;
        lines += 1;
    }
    for (k, v) in store.scan_prefix(b"a/")? {
        write_line(out, &Line::Application(&decode(&k, &v)?))?;
        lines += 1;
    }
    for (k, v) in store.scan_prefix(b"i/")? {
        write_line(out, &Line::Instruction(&decode(&k, &v)?))?;
        lines += 1;
    }
    for (k, v) in store.scan_prefix(b"k/")? {
        write_line(out, &Line::Contract(&decode(&k, &v)?))?;
        lines += 1;
    }
    for (k, v) in store.scan_prefix(b"u/")? {
        write_line(out, &Line::User(&decode(&k, &v)?))?;
        lines += 1;
    }
    for (k, v) in store.scan_prefix(b"h/")? {
        let held: HeldJobRecord = decode(&k, &v)?;
        let payload = store
            .get(format!("p/{}", held.job_id).as_bytes())?
            .unwrap_or_default();
        let payload_base64 = base64::engine::general_purpose::STANDARD.encode(payload);
        write_line(
            out,
            &Line::HeldJob {
                held: &held,
                payload_base64,
            },
        )?;
        lines += 1;
    }
    out.flush()?;
    Ok(lines)
}
