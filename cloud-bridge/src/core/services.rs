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

use std::collections::{BTreeMap, HashMap};

use schemas::api::{
    ApplicationView, ApplyForService, CreateService, CustomerView, EnrollmentView, InstructionView,
    UpdateService,
};
use schemas::data::ErrorCode;
use schemas::feed::FeedBody;
use schemas::ops::OpsEvent;
use schemas::records::DeviceRecord;
use schemas::services::{
    ApplicationRecord, Enrollment, EnrollmentState, InstructionBody, InstructionOffer,
    InstructionRecord, MAX_REFUSALS, MAX_SERVICE_MODELS, RefusedRegistration, ServiceRecord,
    ServiceUse, check_service_id, registration_url, service_of_url,
};
use schemas::{ApplicationId, DeviceId, InstructionId, Secret, UnixMillis};

use super::{Core, CoreError, CoreResult, Effects, check_name, encode, key, sha256_hex, ttl_ms};
use crate::store::{Batch, Ticket};

/// What became of a registration call. A refusal is recorded (and committed) before the device
/// hears it.
#[derive(Debug)]
pub enum ServiceRegistration {
    Registered { service_id: String, at: UnixMillis },
    Refused(CoreError),
}

/// The in-memory side of services: loaded at start from `s/`, `a/` and `i/`.
#[derive(Debug, Default)]
pub(super) struct ServiceIndex {
    pub(super) services: BTreeMap<String, ServiceRecord>,
    pub(super) applications: HashMap<ApplicationId, ApplicationRecord>,
    pub(super) instructions: HashMap<InstructionId, InstructionRecord>,
    /// SHA-256 of a registration code → the application and device it was issued for.
    pub(super) codes: HashMap<String, (ApplicationId, DeviceId)>,
}

impl ServiceIndex {
    pub(super) fn add_application(&mut self, app: ApplicationRecord) {
        for e in &app.devices {
            self.codes.insert(
                e.code_sha256.clone(),
                (app.application_id.clone(), e.device_id.clone()),
            );
        }
        self.applications.insert(app.application_id.clone(), app);
    }
}

fn check_models(models: &[String]) -> CoreResult<()> {
    if models.is_empty() || models.len() > MAX_SERVICE_MODELS {
        return Err(CoreError::new(
            ErrorCode::BadRequest,
            format!("a service lists 1 to {MAX_SERVICE_MODELS} models"),
        ));
    }
    if models.iter().any(|m| m.trim().is_empty() || m.len() > 128) {
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
        &mut self,
        req: CreateService,
        now: UnixMillis,
    ) -> CoreResult<(ServiceRecord, Ticket)> {
        check_service_id(&req.service_id).map_err(bad)?;
        check_name(&req.name)?;
        check_models(&req.models)?;
        if self.svc.services.contains_key(&req.service_id) {
            return Err(CoreError::new(
                ErrorCode::Conflict,
                format!("service {} exists", req.service_id),
            ));
        }
        let data_types = req.data_types.unwrap_or_default();
        check_data_types(&data_types)?;
        let kind = req.kind.unwrap_or_default();
        if kind.len() > 64 || (kind.is_empty() && !data_types.is_empty()) {
            return Err(bad(
                "a service that asks for data types is a support service: give its kind (1 to 64 characters)",
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
        self.put_service(record)
    }

    pub fn update_service(
        &mut self,
        service_id: &str,
        req: UpdateService,
    ) -> CoreResult<(ServiceRecord, Ticket)> {
        let mut record = self.service(service_id)?.clone();
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
        self.put_service(record)
    }

    fn put_service(&mut self, record: ServiceRecord) -> CoreResult<(ServiceRecord, Ticket)> {
        let mut batch = Batch::default();
        batch.put(key("s", &record.service_id), encode(&record)?);
        let ticket = self.commit(batch)?;
        self.svc
            .services
            .insert(record.service_id.clone(), record.clone());
        Ok((record, ticket))
    }

    pub fn service(&self, service_id: &str) -> CoreResult<&ServiceRecord> {
        self.svc.services.get(service_id).ok_or_else(|| {
            CoreError::new(ErrorCode::NotFound, format!("no service {service_id:?}"))
        })
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceRecord> {
        self.svc.services.values()
    }

    /// Every customer with devices in use, and those devices by model.
    pub fn customers(&self) -> Vec<CustomerView> {
        let mut by: BTreeMap<&str, CustomerView> = BTreeMap::new();
        for d in self
            .devices
            .values()
            .filter(|d| !d.disabled && d.invalidated.is_none())
        {
            let view = by.entry(&d.customer).or_insert_with(|| CustomerView {
                customer: d.customer.clone(),
                devices: 0,
                models: BTreeMap::new(),
            });
            view.devices += 1;
            *view.models.entry(d.model.clone()).or_default() += 1;
        }
        by.into_values().collect()
    }

    /// The customer's devices that are in use (not disabled, not invalidated).
    pub fn customer_devices<'a>(
        &'a self,
        customer: &'a str,
    ) -> impl Iterator<Item = &'a DeviceRecord> + 'a {
        self.devices
            .values()
            .filter(move |d| d.customer == customer && !d.disabled && d.invalidated.is_none())
    }

    /// The customer's devices a service can be applied for: a model the service supports, and
    /// not yet permitted to use it.
    pub fn candidates<'a>(
        &'a self,
        customer: &'a str,
        service_id: &str,
    ) -> CoreResult<Vec<&'a DeviceRecord>> {
        let service = self.service(service_id)?;
        let mut list: Vec<&DeviceRecord> = self
            .customer_devices(customer)
            .filter(|d| service.models.contains(&d.model))
            .filter(|d| !d.services.iter().any(|s| s.service_id == service_id))
            .collect();
        list.sort_by_key(|d| (d.registered_at, d.device_id.clone()));
        Ok(list)
    }

    /// Applies for a service for some of a customer's devices: one use-start instruction with
    /// a fresh code (from `fresh`) in each chosen device's mailbox.
    pub fn apply_for_service(
        &mut self,
        customer: &str,
        req: ApplyForService,
        application_id: ApplicationId,
        fresh: &mut dyn FnMut() -> (InstructionId, Secret),
        now: UnixMillis,
    ) -> CoreResult<(ApplicationView, Ticket, Effects)> {
        let service = self.service(&req.service_id)?.clone();
        let candidates: Vec<DeviceRecord> = self
            .candidates(customer, &req.service_id)?
            .into_iter()
            .cloned()
            .collect();
        let chosen: Vec<DeviceRecord> = match (&req.models, &req.devices) {
            (Some(_), Some(_)) => return Err(bad("give models or devices, not both")),
            (None, None) => candidates,
            (Some(models), None) => {
                if let Some(m) = models.iter().find(|m| !service.models.contains(m)) {
                    return Err(bad(format!(
                        "service {} does not support model {m:?}",
                        service.service_id
                    )));
                }
                candidates
                    .into_iter()
                    .filter(|d| models.contains(&d.model))
                    .collect()
            }
            (None, Some(ids)) => {
                let mut out = Vec::new();
                for id in ids {
                    match candidates.iter().find(|d| d.device_id == *id) {
                        Some(d) => out.push(d.clone()),
                        None => {
                            return Err(bad(format!(
                                "device {id} is not a candidate: not customer {customer}'s, not \
                                 in use, of a model service {} does not support, or already \
                                 permitted to use it",
                                service.service_id
                            )));
                        }
                    }
                }
                out
            }
        };
        if chosen.is_empty() {
            return Err(bad(format!(
                "no device of customer {customer:?} can be enrolled in service {}",
                service.service_id
            )));
        }
        let expires_at =
            now.saturating_add_ms(ttl_ms(req.ttl_secs, 7 * 24 * 3600, 365 * 24 * 3600));
        // Every id is checked before anything changes: a collision leaves no trace.
        let fresh: Vec<(InstructionId, Secret)> = chosen.iter().map(|_| fresh()).collect();
        let mut ids: Vec<&InstructionId> = fresh.iter().map(|(id, _)| id).collect();
        ids.sort();
        ids.dedup();
        if ids.len() < fresh.len()
            || ids.iter().any(|id| self.svc.instructions.contains_key(*id))
            || self.svc.applications.contains_key(&application_id)
        {
            return Err(CoreError::new(ErrorCode::Conflict, "id collision; retry"));
        }
        let mut batch = Batch::default();
        let mut effects = Effects::default();
        let mut devices = Vec::with_capacity(chosen.len());
        for (device, (instruction_id, code)) in chosen.into_iter().zip(fresh) {
            let body = InstructionBody::UseStart {
                service_id: service.service_id.clone(),
                application_id: application_id.clone(),
                registration_url: registration_url(&service.service_id),
                registration_code: code.clone(),
            };
            self.put_instruction(
                &mut batch,
                &mut effects,
                instruction_id.clone(),
                &device.device_id,
                body,
                expires_at,
                now,
            )?;
            devices.push(Enrollment {
                device_id: device.device_id,
                model: device.model,
                instruction_id,
                code_sha256: sha256_hex(code.expose().as_bytes()),
                registered_at: None,
                refusals: Vec::new(),
            });
        }
        let app = ApplicationRecord {
            application_id: application_id.clone(),
            customer: customer.to_owned(),
            service_id: service.service_id,
            created_at: now,
            expires_at,
            devices,
        };
        batch.put(key("a", application_id.as_str()), encode(&app)?);
        let ticket = self.commit(batch)?;
        self.svc.add_application(app);
        Ok((self.application(&application_id, now)?, ticket, effects))
    }

    /// An application's progress.
    pub fn application(&self, id: &ApplicationId, now: UnixMillis) -> CoreResult<ApplicationView> {
        let app =
            self.svc.applications.get(id).ok_or_else(|| {
                CoreError::new(ErrorCode::NotFound, format!("no application {id}"))
            })?;
        let (mut pending, mut registered, mut failed) = (0, 0, 0);
        let devices = app
            .devices
            .iter()
            .map(|e| {
                let state = e.state(app.expires_at, now);
                match state {
                    EnrollmentState::Pending => pending += 1,
                    EnrollmentState::Registered { .. } => registered += 1,
                    EnrollmentState::Failed { .. } => failed += 1,
                }
                EnrollmentView {
                    device_id: e.device_id.clone(),
                    model: e.model.clone(),
                    instruction_id: e.instruction_id.clone(),
                    taken_at: self
                        .svc
                        .instructions
                        .get(&e.instruction_id)
                        .and_then(|i| i.taken_at),
                    state,
                    refusals: e.refusals.clone(),
                }
            })
            .collect();
        Ok(ApplicationView {
            application_id: app.application_id.clone(),
            customer: app.customer.clone(),
            service_id: app.service_id.clone(),
            created_at: app.created_at,
            expires_at: app.expires_at,
            pending,
            registered,
            failed,
            settled: pending == 0,
            devices,
        })
    }

    /// Puts an instruction in a device's mailbox: an `i/` record and a feed entry.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn put_instruction(
        &mut self,
        batch: &mut Batch,
        effects: &mut Effects,
        instruction_id: InstructionId,
        device_id: &DeviceId,
        body: InstructionBody,
        expires_at: UnixMillis,
        now: UnixMillis,
    ) -> CoreResult<InstructionRecord> {
        if self.svc.instructions.contains_key(&instruction_id) {
            return Err(CoreError::new(
                ErrorCode::Conflict,
                "instruction id collision; retry",
            ));
        }
        let record = InstructionRecord {
            instruction_id: instruction_id.clone(),
            device_id: device_id.clone(),
            body,
            created_at: now,
            expires_at,
            taken_at: None,
        };
        batch.put(key("i", instruction_id.as_str()), encode(&record)?);
        let entry = FeedBody::Instruction {
            instruction_id: instruction_id.clone(),
            expires_at,
        };
        self.append_feed(batch, device_id, entry, now, effects)?;
        self.svc.instructions.insert(instruction_id, record.clone());
        Ok(record)
    }

    /// An instruction of the device maker's own kind, for one device.
    pub fn create_instruction(
        &mut self,
        device_id: &DeviceId,
        instruction_id: InstructionId,
        body: InstructionBody,
        ttl_ms: u64,
        now: UnixMillis,
    ) -> CoreResult<(InstructionView, Ticket, Effects)> {
        self.active_device(device_id)?;
        let mut batch = Batch::default();
        let mut effects = Effects::default();
        let record = self.put_instruction(
            &mut batch,
            &mut effects,
            instruction_id,
            device_id,
            body,
            now.saturating_add_ms(ttl_ms),
            now,
        )?;
        let ticket = self.commit(batch)?;
        Ok((InstructionView::new(&record, now), ticket, effects))
    }

    /// A device's mailbox, oldest first.
    pub fn instructions(
        &self,
        device_id: &DeviceId,
        now: UnixMillis,
    ) -> CoreResult<Vec<InstructionView>> {
        self.device(device_id)?;
        let mut list: Vec<InstructionView> = self
            .svc
            .instructions
            .values()
            .filter(|i| i.device_id == *device_id)
            .map(|i| InstructionView::new(i, now))
            .collect();
        list.sort_by_key(|i| (i.created_at, i.instruction_id.clone()));
        Ok(list)
    }

    /// The device takes an instruction. Taking it again answers the same (a device that crashed
    /// in between); after its expiry an instruction not yet taken is refused for good.
    pub fn take_instruction(
        &mut self,
        device_id: &DeviceId,
        instruction_id: &InstructionId,
        now: UnixMillis,
    ) -> CoreResult<(InstructionOffer, Ticket)> {
        self.active_device(device_id)?;
        let record = self
            .svc
            .instructions
            .get(instruction_id)
            .filter(|i| i.device_id == *device_id)
            .ok_or_else(|| {
                CoreError::new(
                    ErrorCode::NotFound,
                    format!("no instruction {instruction_id}"),
                )
            })?;
        let offer = |r: &InstructionRecord, taken_at| InstructionOffer {
            instruction_id: r.instruction_id.clone(),
            body: r.body.clone(),
            created_at: r.created_at,
            expires_at: r.expires_at,
            taken_at,
        };
        if let Some(at) = record.taken_at {
            return Ok((offer(record, at), self.read_ticket()));
        }
        if now > record.expires_at {
            return Err(CoreError::new(
                ErrorCode::Expired,
                format!(
                    "instruction {instruction_id} expired at {} (unix ms); it must not be acted on",
                    record.expires_at.0
                ),
            ));
        }
        let mut record = record.clone();
        record.taken_at = Some(now);
        let mut batch = Batch::default();
        batch.put(key("i", instruction_id.as_str()), encode(&record)?);
        let ticket = self.commit(batch)?;
        let answer = offer(&record, now);
        self.svc.instructions.insert(instruction_id.clone(), record);
        Ok((answer, ticket))
    }

    /// A device calls a service's registration URL with its code.
    pub fn register_service(
        &mut self,
        device_id: &DeviceId,
        url: &str,
        code: &Secret,
        now: UnixMillis,
    ) -> CoreResult<(ServiceRegistration, Ticket, Effects)> {
        let service_id = service_of_url(url)
            .ok_or_else(|| bad(format!("{url:?} is not a service registration URL")))?
            .to_owned();
        self.service(&service_id)?;
        self.active_device(device_id)?;
        const INVALID: ErrorCode = ErrorCode::RegistrationCodeInvalid;
        let hash = sha256_hex(code.expose().as_bytes());
        let issued = self.svc.codes.get(&hash).cloned();
        let refuse = |code: ErrorCode, reason: &str| {
            CoreError::new(
                code,
                format!("registration for {service_id} refused: {reason}"),
            )
        };
        // The enrollment a refusal is recorded on: the one the code belongs to when it is this
        // device's, else this device's newest one for the service that is not registered.
        let verdict = match &issued {
            None => Err((INVALID, "wrong registration code", None)),
            Some((_, owner)) if owner != device_id => {
                let app = &self.svc.applications[&issued.as_ref().expect("some").0];
                let used = app
                    .devices
                    .iter()
                    .any(|e| e.device_id == *owner && e.registered_at.is_some());
                Err((
                    INVALID,
                    if used {
                        "the registration code was already used"
                    } else {
                        "the registration code was issued to another device"
                    },
                    None,
                ))
            }
            Some((app_id, _)) => {
                let app = &self.svc.applications[app_id];
                let entry = app
                    .devices
                    .iter()
                    .find(|e| e.device_id == *device_id)
                    .expect("indexed codes belong to their application's devices");
                if app.service_id != service_id {
                    Err((
                        INVALID,
                        "the registration code is for another service",
                        Some(app_id.clone()),
                    ))
                } else if let Some(at) = entry.registered_at {
                    // The same call again (the device crashed before it heard the answer).
                    return Ok((
                        ServiceRegistration::Registered { service_id, at },
                        self.read_ticket(),
                        Effects::default(),
                    ));
                } else if now > app.expires_at {
                    Err((
                        ErrorCode::Expired,
                        "the registration code expired",
                        Some(app_id.clone()),
                    ))
                } else {
                    Ok(app_id.clone())
                }
            }
        };
        let mut batch = Batch::default();
        let mut effects = Effects::default();
        match verdict {
            Ok(app_id) => {
                let mut app = self.svc.applications[&app_id].clone();
                if let Some(e) = app.devices.iter_mut().find(|e| e.device_id == *device_id) {
                    e.registered_at = Some(now);
                }
                let mut device = self.active_device(device_id)?.clone();
                device.services.retain(|s| s.service_id != service_id);
                device.services.push(ServiceUse {
                    service_id: service_id.clone(),
                    application_id: app_id.clone(),
                    since: now,
                });
                batch.put(key("d", device_id.as_str()), encode(&device)?);
                batch.put(key("a", app_id.as_str()), encode(&app)?);
                effects.events.push(OpsEvent::ServiceRegistered {
                    application_id: app_id.clone(),
                    service_id: service_id.clone(),
                    device_id: device_id.clone(),
                    at: now,
                });
                self.push_settled(&app, now, &mut effects);
                let ticket = self.commit(batch)?;
                self.devices.insert(device_id.clone(), device);
                self.svc.applications.insert(app_id, app);
                Ok((
                    ServiceRegistration::Registered {
                        service_id,
                        at: now,
                    },
                    ticket,
                    effects,
                ))
            }
            Err((code, reason, on)) => {
                let target = on.or_else(|| self.open_enrollment(&service_id, device_id));
                let mut ticket = self.read_ticket();
                if let Some(app_id) = target {
                    let mut app = self.svc.applications[&app_id].clone();
                    if let Some(e) = app.devices.iter_mut().find(|e| e.device_id == *device_id) {
                        e.refusals.push(RefusedRegistration {
                            at: now,
                            reason: reason.to_owned(),
                        });
                        let excess = e.refusals.len().saturating_sub(MAX_REFUSALS);
                        e.refusals.drain(..excess);
                    }
                    batch.put(key("a", app_id.as_str()), encode(&app)?);
                    self.push_settled(&app, now, &mut effects);
                    ticket = self.commit(batch)?;
                    self.svc.applications.insert(app_id, app);
                }
                Ok((
                    ServiceRegistration::Refused(refuse(code, reason)),
                    ticket,
                    effects,
                ))
            }
        }
    }

    /// The newest application for `service_id` in which `device_id` has not registered.
    fn open_enrollment(&self, service_id: &str, device_id: &DeviceId) -> Option<ApplicationId> {
        self.svc
            .applications
            .values()
            .filter(|a| a.service_id == service_id)
            .filter(|a| {
                a.devices
                    .iter()
                    .any(|e| e.device_id == *device_id && e.registered_at.is_none())
            })
            .max_by_key(|a| (a.created_at, a.application_id.clone()))
            .map(|a| a.application_id.clone())
    }

    /// Adds the settled event when `app` (as it is about to be stored) has nobody pending and
    /// had before.
    fn push_settled(&self, app: &ApplicationRecord, now: UnixMillis, effects: &mut Effects) {
        let was_pending = self
            .svc
            .applications
            .get(&app.application_id)
            .is_some_and(|old| {
                old.devices
                    .iter()
                    .any(|e| e.state(old.expires_at, now) == EnrollmentState::Pending)
            });
        let states: Vec<EnrollmentState> = app
            .devices
            .iter()
            .map(|e| e.state(app.expires_at, now))
            .collect();
        if !was_pending || states.contains(&EnrollmentState::Pending) {
            return;
        }
        let registered = states
            .iter()
            .filter(|s| matches!(s, EnrollmentState::Registered { .. }))
            .count() as u32;
        effects.events.push(OpsEvent::ApplicationSettled {
            application_id: app.application_id.clone(),
            service_id: app.service_id.clone(),
            customer: app.customer.clone(),
            registered,
            failed: states.len() as u32 - registered,
            at: now,
        });
    }
}

#[cfg(test)]
mod tests {
    use schemas::data::Registration;

    use super::*;
    use crate::core::tests::{T0, core};

    fn device(core: &mut Core, n: u8, customer: &str, model: &str) -> DeviceId {
        let token = Secret::new(format!("token-{n}"));
        core.create_enrollment(token.clone(), customer.into(), 1, 60_000, T0)
            .unwrap();
        let reg = Registration {
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

    fn toner(core: &mut Core) {
        core.create_service(
            CreateService {
                service_id: "toner".into(),
                name: "Toner delivery".into(),
                models: vec!["A".into(), "B".into()],
                ..CreateService::default()
            },
            T0,
        )
        .unwrap();
    }

    /// Applies with codes "code-1", "code-2", ... in the order of the chosen devices.
    fn apply(core: &mut Core, req: ApplyForService) -> CoreResult<ApplicationView> {
        static N: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
        let mut fresh = || {
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (
                InstructionId::from_random([n; 8]),
                Secret::new(format!("code-{n}")),
            )
        };
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = ApplicationId::from_random([n; 8]);
        core.apply_for_service("acme", req, id, &mut fresh, T0)
            .map(|(view, ..)| view)
    }

    fn code_of(core: &Core, device: &DeviceId) -> Secret {
        core.svc
            .instructions
            .values()
            .find_map(|i| match &i.body {
                InstructionBody::UseStart {
                    registration_code, ..
                } if i.device_id == *device => Some(registration_code.clone()),
                _ => None,
            })
            .unwrap()
    }

    fn register(
        core: &mut Core,
        device: &DeviceId,
        code: &Secret,
        now: UnixMillis,
    ) -> (ServiceRegistration, Effects) {
        let (outcome, _, effects) = core
            .register_service(device, &registration_url("toner"), code, now)
            .unwrap();
        (outcome, effects)
    }

    fn refused_code(outcome: ServiceRegistration) -> ErrorCode {
        match outcome {
            ServiceRegistration::Refused(e) => e.code(),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn applications_choose_the_customers_devices_of_supported_models() {
        let mut core = core();
        toner(&mut core);
        let a = device(&mut core, 1, "acme", "A");
        let b = device(&mut core, 2, "acme", "B");
        let c = device(&mut core, 3, "acme", "C");
        let other = device(&mut core, 4, "globex", "A");
        let chosen = |view: ApplicationView| -> Vec<DeviceId> {
            let mut ids: Vec<_> = view.devices.into_iter().map(|d| d.device_id).collect();
            ids.sort();
            ids
        };
        let mut both = vec![a.clone(), b.clone()];
        both.sort();
        let candidates: Vec<_> = core
            .candidates("acme", "toner")
            .unwrap()
            .into_iter()
            .map(|d| d.device_id.clone())
            .collect();
        assert_eq!(candidates.len(), 2);
        assert_eq!(
            chosen(
                apply(
                    &mut core,
                    ApplyForService {
                        service_id: "toner".into(),
                        ..Default::default()
                    }
                )
                .unwrap()
            ),
            both
        );
        let by_model = ApplyForService {
            service_id: "toner".into(),
            models: Some(vec!["B".into()]),
            ..Default::default()
        };
        assert_eq!(chosen(apply(&mut core, by_model).unwrap()), vec![b.clone()]);
        for bad in [
            ApplyForService {
                service_id: "toner".into(),
                models: Some(vec!["C".into()]),
                ..Default::default()
            },
            ApplyForService {
                service_id: "toner".into(),
                devices: Some(vec![c.clone()]),
                ..Default::default()
            },
            ApplyForService {
                service_id: "toner".into(),
                devices: Some(vec![other.clone()]),
                ..Default::default()
            },
        ] {
            assert_eq!(
                apply(&mut core, bad).unwrap_err().code(),
                ErrorCode::BadRequest
            );
        }
        let missing = ApplyForService {
            service_id: "nope".into(),
            ..Default::default()
        };
        assert_eq!(
            apply(&mut core, missing).unwrap_err().code(),
            ErrorCode::NotFound
        );
        // Each chosen device has a use-start instruction in its feed.
        let (entries, _) = core.feed_after(&a, schemas::FeedSeq::ZERO, 10).unwrap();
        assert!(matches!(entries[0].body, FeedBody::Instruction { .. }));
        let (entries, _) = core.feed_after(&c, schemas::FeedSeq::ZERO, 10).unwrap();
        assert!(entries.is_empty());
    }

    #[test]
    fn only_the_devices_own_unused_unexpired_code_registers() {
        let mut core = core();
        toner(&mut core);
        let a = device(&mut core, 1, "acme", "A");
        let b = device(&mut core, 2, "acme", "B");
        let req = ApplyForService {
            service_id: "toner".into(),
            ttl_secs: Some(60),
            ..Default::default()
        };
        let app = apply(&mut core, req).unwrap();
        let (code_a, code_b) = (code_of(&core, &a), code_of(&core, &b));

        // Wrong code, and b using a's unused code: refused, recorded on b.
        let (outcome, _) = register(&mut core, &b, &Secret::new("guess"), T0);
        assert_eq!(refused_code(outcome), ErrorCode::RegistrationCodeInvalid);
        let (outcome, _) = register(&mut core, &b, &code_a, T0);
        assert_eq!(refused_code(outcome), ErrorCode::RegistrationCodeInvalid);
        let view = core.application(&app.application_id, T0).unwrap();
        let of = |view: &ApplicationView, d: &DeviceId| {
            view.devices
                .iter()
                .find(|e| e.device_id == *d)
                .unwrap()
                .state
                .clone()
        };
        assert_eq!(
            of(&view, &b),
            EnrollmentState::Failed {
                reason: "the registration code was issued to another device".into()
            }
        );
        assert_eq!(of(&view, &a), EnrollmentState::Pending);

        // a registers (b has failed, so nobody is pending: settled); again is the same
        // answer, with no new event.
        let (outcome, effects) = register(&mut core, &a, &code_a, T0);
        assert!(matches!(
            outcome,
            ServiceRegistration::Registered { at: T0, .. }
        ));
        assert!(matches!(
            effects.events.as_slice(),
            [
                OpsEvent::ServiceRegistered { .. },
                OpsEvent::ApplicationSettled {
                    registered: 1,
                    failed: 1,
                    ..
                }
            ]
        ));
        let (outcome, effects) = register(&mut core, &a, &code_a, T0.saturating_add_ms(5));
        assert!(matches!(
            outcome,
            ServiceRegistration::Registered { at: T0, .. }
        ));
        assert!(effects.events.is_empty());
        assert_eq!(core.device(&a).unwrap().services.len(), 1);
        // a's code reused by b: refused as used.
        let (outcome, _) = register(&mut core, &b, &code_a, T0);
        assert_eq!(refused_code(outcome), ErrorCode::RegistrationCodeInvalid);
        let view = core.application(&app.application_id, T0).unwrap();
        assert_eq!(
            of(&view, &b),
            EnrollmentState::Failed {
                reason: "the registration code was already used".into()
            }
        );

        // b's own code after the expiry: refused, and the application settles.
        let late = T0.saturating_add_ms(61_000);
        let (outcome, effects) = register(&mut core, &b, &code_b, late);
        assert_eq!(refused_code(outcome), ErrorCode::Expired);
        assert!(
            effects.events.is_empty(),
            "already failed before: nothing newly settled"
        );
        let view = core.application(&app.application_id, late).unwrap();
        assert_eq!(
            (view.registered, view.failed, view.pending, view.settled),
            (1, 1, 0, true)
        );
        assert!(core.device(&b).unwrap().services.is_empty());
    }

    #[test]
    fn the_last_registration_settles_the_application() {
        let mut core = core();
        toner(&mut core);
        let a = device(&mut core, 1, "acme", "A");
        let b = device(&mut core, 2, "acme", "B");
        apply(
            &mut core,
            ApplyForService {
                service_id: "toner".into(),
                ..Default::default()
            },
        )
        .unwrap();
        let (code_a, code_b) = (code_of(&core, &a), code_of(&core, &b));
        let (_, effects) = register(&mut core, &a, &code_a, T0);
        assert!(
            !effects
                .events
                .iter()
                .any(|e| matches!(e, OpsEvent::ApplicationSettled { .. }))
        );
        let (_, effects) = register(&mut core, &b, &code_b, T0);
        assert!(effects.events.iter().any(|e| matches!(
            e,
            OpsEvent::ApplicationSettled {
                registered: 2,
                failed: 0,
                ..
            }
        )));
    }

    #[test]
    fn an_instruction_is_taken_once_and_never_after_its_expiry() {
        let mut core = core();
        let a = device(&mut core, 1, "acme", "A");
        let b = device(&mut core, 2, "acme", "A");
        let body = InstructionBody::Custom {
            name: "reboot".into(),
            params: BTreeMap::new(),
        };
        let soon = InstructionId::from_random([1; 8]);
        let later = InstructionId::from_random([2; 8]);
        core.create_instruction(&a, soon.clone(), body.clone(), 1000, T0)
            .unwrap();
        core.create_instruction(&a, later.clone(), body, 1000, T0)
            .unwrap();
        // Another device cannot take it.
        assert_eq!(
            core.take_instruction(&b, &soon, T0).unwrap_err().code(),
            ErrorCode::NotFound
        );
        let (first, _) = core
            .take_instruction(&a, &soon, T0.saturating_add_ms(10))
            .unwrap();
        let (again, _) = core
            .take_instruction(&a, &soon, T0.saturating_add_ms(20))
            .unwrap();
        assert_eq!(first, again);
        assert_eq!(first.taken_at, T0.saturating_add_ms(10));
        let err = core
            .take_instruction(&a, &later, T0.saturating_add_ms(1001))
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::Expired);
        let states: Vec<_> = core
            .instructions(&a, T0.saturating_add_ms(1001))
            .unwrap()
            .into_iter()
            .map(|i| i.state)
            .collect();
        assert_eq!(
            states,
            vec![
                schemas::services::InstructionState::Taken,
                schemas::services::InstructionState::Expired
            ]
        );
    }
}
