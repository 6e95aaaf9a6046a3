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
use schemas::services::{ContractInfo, ContractRecord, DeviceControl, ServiceRecord};
use schemas::{DeviceId, UnixMillis};

use super::tx::{Access, Tx};
use super::{Core, CoreError, CoreResult, Effects};
use crate::store::Ticket;

impl Core {
    /// A transaction reading the registry (the services) and writing one device's shard.
    fn contract_tx(&self, device_id: &DeviceId) -> Tx<'_> {
        Tx::new(self, Access::Read, &[device_id])
    }

    /// Sets a device's contract for a support service. A standing contract of another service
    /// of the same kind is canceled: the device switches provider.
    pub fn put_contract(
        &self,
        device_id: &DeviceId,
        service_id: &str,
        req: PutContract,
        now: UnixMillis,
    ) -> CoreResult<(Vec<ContractRecord>, Ticket, Effects)> {
        let tx = self.contract_tx(device_id);
        let service = tx.service(service_id)?.clone();
        if service.kind.is_empty() {
            return Err(CoreError::new(
                ErrorCode::InvalidState,
                format!("service {service_id} is not a support service (it has no kind)"),
            ));
        }
        if req.application_id.chars().count() > 128 || req.outline.chars().count() > 1024 {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                "application_id is at most 128 characters, outline at most 1,024",
            ));
        }
        tx.active_device(device_id)?;
        let mut changed = Vec::new();
        if !req.application_id.is_empty() {
            let services = &tx.registry()?.services;
            for c in tx.shard(device_id)?.device_contracts(device_id) {
                let same_kind = services
                    .get(&c.service_id)
                    .is_some_and(|s| s.kind == service.kind);
                if c.service_id != service_id && same_kind && !c.application_id.is_empty() {
                    changed.push(ContractRecord {
                        application_id: String::new(),
                        changed_at: now,
                        activated_at: None,
                        ..c
                    });
                }
            }
        }
        let old = tx.contract(device_id, service_id)?;
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
        store_contracts(tx, device_id, changed, now)
    }

    /// Cancels a device's contract for a service (its application id becomes empty).
    pub fn cancel_contract(
        &self,
        device_id: &DeviceId,
        service_id: &str,
        now: UnixMillis,
    ) -> CoreResult<(Vec<ContractRecord>, Ticket, Effects)> {
        let tx = self.contract_tx(device_id);
        let current = tx.contract(device_id, service_id)?.ok_or_else(|| {
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
        store_contracts(tx, device_id, vec![canceled], now)
    }

    /// A device's contracts, by service id.
    pub fn device_contracts(&self, device_id: &DeviceId) -> CoreResult<Vec<ContractRecord>> {
        self.with_shard(device_id, |shard| {
            if !shard.devices.contains_key(device_id) {
                return Err(CoreError::new(
                    ErrorCode::NotFound,
                    format!("no device {device_id}"),
                ));
            }
            Ok(shard.device_contracts(device_id))
        })
    }

    /// What the device is told about its contracts.
    pub fn contract_info(&self, device_id: &DeviceId) -> CoreResult<Vec<ContractInfo>> {
        let tx = self.contract_tx(device_id);
        tx.active_device(device_id)?;
        let services = &tx.registry()?.services;
        Ok(tx
            .shard(device_id)?
            .device_contracts(device_id)
            .into_iter()
            .filter_map(|c| {
                let s = services.get(&c.service_id)?;
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
        &self,
        device_id: &DeviceId,
        service_id: &str,
        application_id: &str,
        now: UnixMillis,
    ) -> CoreResult<(DeviceControl, Ticket, Effects)> {
        let mut tx = self.contract_tx(device_id);
        let device = tx.active_device(device_id)?;
        let service = tx.service(service_id)?.clone();
        if !service.models.contains(&device.model) {
            return Err(CoreError::new(
                ErrorCode::Forbidden,
                format!(
                    "service {service_id} does not support model {}",
                    device.model
                ),
            ));
        }
        let contract = tx
            .contract(device_id, service_id)?
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
        tx.put_contract(contract)?;
        tx.effects.events.push(OpsEvent::ServiceActivated {
            device_id: device_id.clone(),
            service_id: service_id.to_owned(),
            application_id: application_id.to_owned(),
            data_types: service.data_types,
            at: now,
        });
        let (ticket, effects) = tx.commit()?;
        Ok((control, ticket, effects))
    }
}

/// Stages changed contracts and the feed entry announcing them, and commits. Returns the
/// device's contracts as they are then, by service id.
fn store_contracts(
    mut tx: Tx<'_>,
    device_id: &DeviceId,
    changed: Vec<ContractRecord>,
    now: UnixMillis,
) -> CoreResult<(Vec<ContractRecord>, Ticket, Effects)> {
    let mut list: BTreeMap<String, ContractRecord> = tx
        .shard(device_id)?
        .device_contracts(device_id)
        .into_iter()
        .map(|c| (c.service_id.clone(), c))
        .collect();
    for c in changed {
        list.insert(c.service_id.clone(), c.clone());
        tx.put_contract(c)?;
    }
    tx.append_feed(device_id, FeedBody::ContractsChanged, now)?;
    let (ticket, effects) = tx.commit()?;
    Ok((list.into_values().collect(), ticket, effects))
}

impl Tx<'_> {
    /// A service, from the registry.
    pub(super) fn service(&self, service_id: &str) -> CoreResult<&ServiceRecord> {
        self.service_record(&service_id.to_owned())?.ok_or_else(|| {
            CoreError::new(ErrorCode::NotFound, format!("no service {service_id:?}"))
        })
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
            .contract(device_id, service_id)?
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

#[cfg(test)]
mod tests {
    use schemas::api::CreateService;
    use schemas::outbox::{DeviceRequest, OutboxItem, RequestNo};

    use super::*;
    use crate::core::tests::{T0, core_with_device, error_code};

    fn support(core: &Core, id: &str, kind: &str, types: &[&str]) {
        core.create_service(
            CreateService {
                service_id: id.into(),
                name: id.into(),
                models: vec!["MFP-1".into()],
                kind: Some(kind.into()),
                data_types: Some(types.iter().map(|t| t.to_string()).collect()),
                report_every_secs: None,
            },
            T0,
        )
        .unwrap();
    }

    fn contract(app: &str) -> PutContract {
        PutContract {
            application_id: app.into(),
            outline: "toner when low".into(),
        }
    }

    fn app_of(core: &Core, dev: &DeviceId, service: &str) -> String {
        core.device_contracts(dev)
            .unwrap()
            .into_iter()
            .find(|c| c.service_id == service)
            .map(|c| c.application_id)
            .unwrap_or_default()
    }

    fn telemetry(no: u64, service: &str, types: &[&str]) -> OutboxItem {
        OutboxItem {
            no: RequestNo(no),
            made_at: T0,
            body: DeviceRequest::Telemetry {
                service_id: service.into(),
                readings: types.iter().map(|t| (t.to_string(), "1".into())).collect(),
            },
        }
    }

    #[test]
    fn another_provider_of_the_same_kind_replaces_the_contract() {
        let (core, dev) = core_with_device();
        support(&core, "toner-a", "consumables", &["level"]);
        support(&core, "toner-b", "consumables", &["level", "page_count"]);
        support(&core, "paper", "paper", &["paper_level"]);
        let (_, _, effects) = core
            .put_contract(&dev, "toner-a", contract("A-1"), T0)
            .unwrap();
        assert_eq!(
            effects.feed_grew.len(),
            1,
            "the device is told through its feed"
        );
        core.put_contract(&dev, "paper", contract("P-1"), T0)
            .unwrap();
        core.put_contract(&dev, "toner-b", contract("B-1"), T0)
            .unwrap();
        assert_eq!(app_of(&core, &dev, "toner-a"), "");
        assert_eq!(app_of(&core, &dev, "toner-b"), "B-1");
        assert_eq!(
            app_of(&core, &dev, "paper"),
            "P-1",
            "another kind is untouched"
        );
        core.cancel_contract(&dev, "toner-b", T0).unwrap();
        assert_eq!(app_of(&core, &dev, "toner-b"), "");
        let info = core.contract_info(&dev).unwrap();
        assert_eq!(info.len(), 3);
        // Services that are not support services take no contracts.
        core.create_service(
            CreateService {
                service_id: "plain".into(),
                name: "plain".into(),
                models: vec!["MFP-1".into()],
                ..CreateService::default()
            },
            T0,
        )
        .unwrap();
        assert_eq!(
            error_code(core.put_contract(&dev, "plain", contract("X"), T0)),
            ErrorCode::InvalidState
        );
    }

    #[test]
    fn activation_needs_the_standing_contract_and_then_only_asked_types_are_accepted() {
        let (core, dev) = core_with_device();
        support(
            &core,
            "toner-a",
            "consumables",
            &["cartridge_type", "level"],
        );
        let err = core
            .activate_service(&dev, "toner-a", "A-1", T0)
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::Forbidden, "no contract");
        core.put_contract(&dev, "toner-a", contract("A-1"), T0)
            .unwrap();
        let err = core
            .activate_service(&dev, "toner-a", "A-0", T0)
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::Conflict, "an older contract");
        // Telemetry before activation is refused.
        let (_, refused, ..) = core
            .deliver(&dev, vec![telemetry(1, "toner-a", &["level"])], T0)
            .unwrap();
        assert_eq!(refused.len(), 1);
        let (control, _, effects) = core.activate_service(&dev, "toner-a", "A-1", T0).unwrap();
        assert_eq!(control.data_types, vec!["cartridge_type", "level"]);
        assert!(matches!(
            effects.events[..],
            [OpsEvent::ServiceActivated { .. }]
        ));
        let (_, _, effects) = core.activate_service(&dev, "toner-a", "A-1", T0).unwrap();
        assert!(effects.events.is_empty(), "activating again is not news");
        let (upto, refused, _, effects) = core
            .deliver(
                &dev,
                vec![
                    telemetry(2, "toner-a", &["level"]),
                    telemetry(3, "toner-a", &["level", "serial_number"]),
                ],
                T0,
            )
            .unwrap();
        assert_eq!(upto, RequestNo(3));
        assert_eq!(
            refused.iter().map(|r| r.no).collect::<Vec<_>>(),
            vec![RequestNo(3)]
        );
        assert!(refused[0].error.message.contains("serial_number"));
        assert!(matches!(effects.events[..], [OpsEvent::Telemetry { .. }]));
        // Canceled: nothing more is accepted.
        core.cancel_contract(&dev, "toner-a", T0).unwrap();
        let (_, refused, ..) = core
            .deliver(&dev, vec![telemetry(4, "toner-a", &["level"])], T0)
            .unwrap();
        assert_eq!(refused.len(), 1);
    }
}
