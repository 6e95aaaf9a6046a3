//! Services, applications and the instruction mailbox (see [`schemas::services`]).
//!
//! - An administrator defines services and the models they apply to.
//! - Applying for a service for some of a customer's devices puts a use-start instruction,
//!   with the service's registration URL and a one-time code, in each device's mailbox (a feed
//!   entry pointing at an `i/` record).
//! - A device takes an instruction (the time is recorded; after the expiry it is refused and
//!   the device never acts on it) and redeems the code over its data channel. The cloud permits
//!   the device to use the service only when the code is the one issued to that device, unused
//!   and unexpired; every refusal is recorded on the device's enrollment with its reason.

use std::collections::BTreeMap;

use schemas::UnixMillis;
use schemas::api::{CreateService, CustomerView, UpdateService};
use schemas::data::ErrorCode;
use schemas::records::DeviceRecord;
use schemas::services::{MAX_SERVICE_MODELS, ServiceRecord, check_service_id};

use crate::core::state::Registry;
use crate::core::tx::{Access, Tx};
use crate::core::{Core, CoreError, CoreResult, check_name};
use crate::store::Ticket;

mod applications;
mod mailbox;
#[cfg(test)]
mod tests;

/// What became of a registration call. A refusal is recorded (and committed) before the device
/// hears it.
#[derive(Debug)]
pub enum ServiceRegistration {
    Registered { service_id: String, at: UnixMillis },
    Refused(CoreError),
}

fn check_models(models: &[String]) -> CoreResult<()> {
    if models.is_empty() || models.len() > MAX_SERVICE_MODELS {
        return Err(CoreError::new(
            ErrorCode::BadRequest,
            format!("a service lists 1 to {MAX_SERVICE_MODELS} models"),
        ));
    }
    if models
        .iter()
        .any(|m| !(1..=128).contains(&m.chars().count()))
    {
        return Err(CoreError::new(
            ErrorCode::BadRequest,
            "model names are 1 to 128 characters",
        ));
    }
    Ok(())
}

/// Data types are short snake_case names (`cartridge_type`, `level`), at most 32.
fn check_data_types(types: &[String]) -> CoreResult<()> {
    let ok = types.len() <= 32
        && types.iter().all(|t| {
            !t.is_empty()
                && t.len() <= 64
                && t.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(bad(
            "data types are at most 32 names of 1 to 64 of a-z, 0-9 and _",
        ))
    }
}

fn bad(message: impl Into<String>) -> CoreError {
    CoreError::new(ErrorCode::BadRequest, message)
}

impl Core {
    pub fn create_service(
        &self,
        req: CreateService,
        now: UnixMillis,
    ) -> CoreResult<(ServiceRecord, Ticket)> {
        check_service_id(&req.service_id).map_err(bad)?;
        check_name(&req.name)?;
        check_models(&req.models)?;
        let data_types = req.data_types.unwrap_or_default();
        check_data_types(&data_types)?;
        let kind = req.kind.unwrap_or_default();
        if kind.chars().count() > 64 {
            return Err(bad("kind is at most 64 characters"));
        }
        if kind.is_empty() && !data_types.is_empty() {
            return Err(bad(
                "a service that asks for data types is a support service: give its kind",
            ));
        }
        let record = ServiceRecord {
            service_id: req.service_id,
            name: req.name,
            models: req.models,
            created_at: now,
            kind,
            data_types,
            report_every_secs: req.report_every_secs.unwrap_or(0),
        };
        self.create(record, |tx, record| {
            if tx.service_record(&record.service_id)?.is_some() {
                return Err(CoreError::new(
                    ErrorCode::Conflict,
                    format!("service {} exists", record.service_id),
                ));
            }
            tx.put_service(record)
        })
    }

    pub fn update_service(
        &self,
        service_id: &str,
        req: UpdateService,
    ) -> CoreResult<(ServiceRecord, Ticket)> {
        let mut tx = Tx::new(self, Access::Write, &[]);
        let mut record = tx.service(service_id)?.clone();
        if let Some(name) = req.name {
            check_name(&name)?;
            record.name = name;
        }
        if let Some(models) = req.models {
            check_models(&models)?;
            record.models = models;
        }
        if let Some(types) = req.data_types {
            check_data_types(&types)?;
            record.data_types = types;
        }
        if let Some(every) = req.report_every_secs {
            record.report_every_secs = every;
        }
        tx.put_service(record.clone())?;
        tx.commit_answer(record)
    }

    pub fn service(&self, service_id: &str) -> CoreResult<ServiceRecord> {
        self.with_registry(|r| service_in(r, service_id).cloned())
    }

    /// Every service, by id.
    pub fn services(&self) -> Vec<ServiceRecord> {
        self.with_registry(|r| r.services.values().cloned().collect())
    }

    /// Every customer with devices in use, and those devices by model.
    pub fn customers(&self) -> Vec<CustomerView> {
        let mut by: BTreeMap<String, CustomerView> = BTreeMap::new();
        self.each_shard(|s| {
            for d in s.devices.values().filter(|d| in_use(d)) {
                let view = by
                    .entry(d.customer.clone())
                    .or_insert_with(|| CustomerView {
                        customer: d.customer.clone(),
                        devices: 0,
                        models: BTreeMap::new(),
                    });
                view.devices += 1;
                *view.models.entry(d.model.clone()).or_default() += 1;
            }
        });
        by.into_values().collect()
    }

    /// The customer's devices that are in use (not disabled, not invalidated), in no
    /// particular order.
    pub fn customer_devices(&self, customer: &str) -> Vec<DeviceRecord> {
        self.devices_where(|d| d.customer == customer && in_use(d))
    }

    /// The customer's devices a service can be applied for: a model the service supports, and
    /// not yet permitted to use it. Oldest registration first.
    pub fn candidates(&self, customer: &str, service_id: &str) -> CoreResult<Vec<DeviceRecord>> {
        let service = self.service(service_id)?;
        let mut list = self.devices_where(|d| is_candidate(d, customer, &service));
        list.sort_by_key(|d| (d.registered_at, d.device_id.clone()));
        Ok(list)
    }
}

fn in_use(d: &DeviceRecord) -> bool {
    !d.disabled && d.invalidated.is_none()
}

/// Whether a service can be applied for for `d`: the customer's, in use, of a model the
/// service supports, and not yet permitted to use it.
fn is_candidate(d: &DeviceRecord, customer: &str, service: &ServiceRecord) -> bool {
    d.customer == customer
        && in_use(d)
        && service.models.contains(&d.model)
        && !d
            .services
            .iter()
            .any(|s| s.service_id == service.service_id)
}

fn service_in<'r>(reg: &'r Registry, service_id: &str) -> CoreResult<&'r ServiceRecord> {
    reg.services
        .get(service_id)
        .ok_or_else(|| CoreError::new(ErrorCode::NotFound, format!("no service {service_id:?}")))
}
