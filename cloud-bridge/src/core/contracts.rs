//! Contracts for support services (see [`schemas::services::ContractRecord`]).
//!
//! The cloud holds, per device and support service, the contract's application id (empty: no
//! contract or canceled) and an outline. Every change appends `contracts_changed` to the
//! device's feed, so the device fetches them again on its next sync. A device activates a
//! service it has a contract for (and that it has enabled, and that supports its model) and is
//! told what to report; the cloud then accepts from it exactly those data types for that
//! service, and only while the contract stands.

use std::collections::BTreeMap;

use schemas::api::PutContract;
use schemas::data::ErrorCode;
use schemas::feed::FeedBody;
use schemas::ops::OpsEvent;
use schemas::services::{ContractInfo, ContractRecord, DeviceControl};
use schemas::{DeviceId, UnixMillis};

use super::{Core, CoreError, CoreResult, Effects, encode};
use crate::store::{Batch, Ticket};

fn contract_key(device: &DeviceId, service: &str) -> Vec<u8> {
    format!("k/{device}/{service}").into_bytes()
}

impl Core {
    /// Sets a device's contract for a support service. A standing contract of another service
    /// of the same kind is canceled: the device switches provider.
    pub fn put_contract(
        &mut self,
        device_id: &DeviceId,
        service_id: &str,
        req: PutContract,
        now: UnixMillis,
    ) -> CoreResult<(Vec<ContractRecord>, Ticket, Effects)> {
        let service = self.service(service_id)?.clone();
        if service.kind.is_empty() {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                format!("service {service_id} is not a support service (it has no kind)"),
            ));
        }
        if req.application_id.len() > 128 || req.outline.len() > 1024 {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                "application_id is at most 128 bytes, outline at most 1,024",
            ));
        }
        self.active_device(device_id)?;
        let mut changed = Vec::new();
        if !req.application_id.is_empty() {
            for ((d, other), c) in &self.contracts {
                let same_kind = self
                    .svc
                    .services
                    .get(other)
                    .is_some_and(|s| s.kind == service.kind);
                if d == device_id
                    && other != service_id
                    && same_kind
                    && !c.application_id.is_empty()
                {
                    changed.push(ContractRecord {
                        application_id: String::new(),
                        changed_at: now,
                        activated_at: None,
                        ..c.clone()
                    });
                }
            }
        }
        let old = self
            .contracts
            .get(&(device_id.clone(), service_id.to_owned()));
        let keeps_activation = old.is_some_and(|o| o.application_id == req.application_id);
        changed.push(ContractRecord {
            device_id: device_id.clone(),
            service_id: service_id.to_owned(),
            application_id: req.application_id,
            outline: req.outline,
            changed_at: now,
            activated_at: old
                .and_then(|o| o.activated_at)
                .filter(|_| keeps_activation),
        });
        self.store_contracts(device_id, changed, now)
    }

    /// Cancels a device's contract for a service (its application id becomes empty).
    pub fn cancel_contract(
        &mut self,
        device_id: &DeviceId,
        service_id: &str,
        now: UnixMillis,
    ) -> CoreResult<(Vec<ContractRecord>, Ticket, Effects)> {
        let current = self
            .contracts
            .get(&(device_id.clone(), service_id.to_owned()))
            .ok_or_else(|| {
                CoreError::new(
                    ErrorCode::NotFound,
                    format!("device {device_id} has no contract for {service_id}"),
                )
            })?;
        let canceled = ContractRecord {
            application_id: String::new(),
            changed_at: now,
            activated_at: None,
            ..current.clone()
        };
        self.store_contracts(device_id, vec![canceled], now)
    }

    fn store_contracts(
        &mut self,
        device_id: &DeviceId,
        changed: Vec<ContractRecord>,
        now: UnixMillis,
    ) -> CoreResult<(Vec<ContractRecord>, Ticket, Effects)> {
        let mut batch = Batch::default();
        let mut effects = Effects::default();
        for c in &changed {
            batch.put(contract_key(device_id, &c.service_id), encode(c)?);
        }
        self.append_feed(
            &mut batch,
            device_id,
            FeedBody::ContractsChanged,
            now,
            &mut effects,
        )?;
        let ticket = self.commit(batch)?;
        for c in changed {
            self.contracts
                .insert((device_id.clone(), c.service_id.clone()), c);
        }
        Ok((self.device_contracts(device_id), ticket, effects))
    }

    /// A device's contracts, by service id.
    pub fn device_contracts(&self, device_id: &DeviceId) -> Vec<ContractRecord> {
        let mut list: Vec<ContractRecord> = self
            .contracts
            .iter()
            .filter(|((d, _), _)| d == device_id)
            .map(|(_, c)| c.clone())
            .collect();
        list.sort_by(|a, b| a.service_id.cmp(&b.service_id));
        list
    }

    /// What the device is told about its contracts.
    pub fn contract_info(&self, device_id: &DeviceId) -> CoreResult<Vec<ContractInfo>> {
        self.active_device(device_id)?;
        Ok(self
            .device_contracts(device_id)
            .into_iter()
            .filter_map(|c| {
                let s = self.svc.services.get(&c.service_id)?;
                Some(ContractInfo {
                    service_id: c.service_id,
                    kind: s.kind.clone(),
                    application_id: c.application_id,
                    outline: c.outline,
                    models: s.models.clone(),
                })
            })
            .collect())
    }

    /// The device activates a support service under its contract's application id.
    pub fn activate_service(
        &mut self,
        device_id: &DeviceId,
        service_id: &str,
        application_id: &str,
        now: UnixMillis,
    ) -> CoreResult<(DeviceControl, Ticket, Effects)> {
        let device = self.active_device(device_id)?;
        let service = self.service(service_id)?.clone();
        if !service.models.contains(&device.model) {
            return Err(CoreError::new(
                ErrorCode::Forbidden,
                format!(
                    "service {service_id} does not support model {}",
                    device.model
                ),
            ));
        }
        let contract = self
            .contracts
            .get(&(device_id.clone(), service_id.to_owned()))
            .filter(|c| !c.application_id.is_empty())
            .ok_or_else(|| {
                CoreError::new(
                    ErrorCode::Forbidden,
                    format!("device {device_id} has no contract for {service_id}"),
                )
            })?;
        if contract.application_id != application_id {
            return Err(CoreError::new(
                ErrorCode::Conflict,
                format!(
                    "the contract for {service_id} is now {:?}; fetch the contracts again",
                    contract.application_id
                ),
            ));
        }
        let control = DeviceControl {
            service_id: service_id.to_owned(),
            data_types: service.data_types.clone(),
            report_every_secs: service.report_every_secs,
        };
        if contract.activated_at.is_some() {
            return Ok((control, self.read_ticket(), Effects::default()));
        }
        let mut contract = contract.clone();
        contract.activated_at = Some(now);
        let mut batch = Batch::default();
        batch.put(contract_key(device_id, service_id), encode(&contract)?);
        let ticket = self.commit(batch)?;
        self.contracts
            .insert((device_id.clone(), service_id.to_owned()), contract);
        let effects = Effects {
            feed_grew: vec![],
            events: vec![OpsEvent::ServiceActivated {
                device_id: device_id.clone(),
                service_id: service_id.to_owned(),
                application_id: application_id.to_owned(),
                data_types: service.data_types,
                at: now,
            }],
        };
        Ok((control, ticket, effects))
    }

    /// Checks telemetry from a device: the service is activated under a standing contract and
    /// asked for every type reported.
    pub(super) fn check_telemetry(
        &self,
        device_id: &DeviceId,
        service_id: &str,
        readings: &BTreeMap<String, String>,
    ) -> Result<(), CoreError> {
        let active = self
            .contracts
            .get(&(device_id.clone(), service_id.to_owned()))
            .is_some_and(|c| !c.application_id.is_empty() && c.activated_at.is_some());
        if !active {
            return Err(CoreError::new(
                ErrorCode::Forbidden,
                format!("{service_id} is not active for this device (no contract, or canceled)"),
            ));
        }
        let wanted = &self.service(service_id)?.data_types;
        if let Some(extra) = readings.keys().find(|k| !wanted.contains(k)) {
            return Err(CoreError::new(
                ErrorCode::Forbidden,
                format!("{service_id} did not ask for {extra:?}"),
            ));
        }
        if readings.is_empty() || readings.values().any(|v| v.len() > 256) {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                "telemetry holds 1 or more readings of at most 256 bytes",
            ));
        }
        Ok(())
    }
}
