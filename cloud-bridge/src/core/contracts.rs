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

#[cfg(test)]
mod tests {
    use schemas::api::CreateService;
    use schemas::outbox::{DeviceRequest, OutboxItem, RequestNo};

    use super::*;
    use crate::core::tests::{T0, core, registered};

    fn support(core: &mut Core, id: &str, kind: &str, types: &[&str]) {
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
        let mut core = core();
        let dev = registered(&mut core, 1);
        support(&mut core, "toner-a", "consumables", &["level"]);
        support(
            &mut core,
            "toner-b",
            "consumables",
            &["level", "page_count"],
        );
        support(&mut core, "paper", "paper", &["paper_level"]);
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
        let err = core
            .put_contract(&dev, "plain", contract("X"), T0)
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::BadRequest);
    }

    #[test]
    fn activation_needs_the_standing_contract_and_then_only_asked_types_are_accepted() {
        let mut core = core();
        let dev = registered(&mut core, 1);
        support(
            &mut core,
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
