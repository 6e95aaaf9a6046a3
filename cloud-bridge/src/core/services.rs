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

use super::state::Registry;
use super::tx::{Access, Tx};
use super::{Core, CoreError, CoreResult, Effects, check_name, sha256_hex, ttl_ms};
use crate::store::Ticket;

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
        let mut tx = Tx::new(self, Access::Write, &[]);
        if tx.service_record(&record.service_id)?.is_some() {
            return Err(CoreError::new(
                ErrorCode::Conflict,
                format!("service {} exists", record.service_id),
            ));
        }
        tx.put_service(record.clone())?;
        let (ticket, _) = tx.commit()?;
        Ok((record, ticket))
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
        let (ticket, _) = tx.commit()?;
        Ok((record, ticket))
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

    /// Applies for a service for some of a customer's devices: one use-start instruction with
    /// a fresh code (from `fresh`) in each chosen device's mailbox.
    ///
    /// Two steps: the devices are chosen from a reading of the shards, one at a time; then one
    /// transaction locks the registry and the chosen devices' shards, checks that each is
    /// still a candidate (else nothing is written and the caller is told to retry), and writes.
    pub fn apply_for_service(
        &self,
        customer: &str,
        req: ApplyForService,
        application_id: ApplicationId,
        fresh: &mut dyn FnMut() -> (InstructionId, Secret),
        now: UnixMillis,
    ) -> CoreResult<(ApplicationView, Ticket, Effects)> {
        let service = self.service(&req.service_id)?;
        let candidates = self.candidates(customer, &req.service_id)?;
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
        let fresh: Vec<(InstructionId, Secret, String)> = chosen
            .iter()
            .map(|_| {
                let (id, code) = fresh();
                let hash = sha256_hex(code.expose().as_bytes());
                (id, code, hash)
            })
            .collect();
        let ids: Vec<&DeviceId> = chosen.iter().map(|d| &d.device_id).collect();
        let mut tx = Tx::new(self, Access::Write, &ids);
        // Every id is checked before anything changes: a collision leaves no trace.
        let mut instruction_ids: Vec<&InstructionId> = fresh.iter().map(|(id, ..)| id).collect();
        instruction_ids.sort();
        instruction_ids.dedup();
        let taken = |id: &InstructionId| tx.instruction(id).map(|i| i.is_some());
        if instruction_ids.len() < fresh.len()
            || instruction_ids.iter().any(|id| taken(id).unwrap_or(true))
            || tx.application_record(&application_id)?.is_some()
        {
            return Err(CoreError::new(ErrorCode::Conflict, "id collision; retry"));
        }
        for device in &chosen {
            if !is_candidate(tx.device(&device.device_id)?, customer, &service) {
                return Err(CoreError::new(
                    ErrorCode::Conflict,
                    format!(
                        "device {} changed while the application was made; retry",
                        device.device_id
                    ),
                ));
            }
        }
        let mut devices = Vec::with_capacity(chosen.len());
        for (device, (instruction_id, code, code_sha256)) in chosen.into_iter().zip(fresh) {
            let body = InstructionBody::UseStart {
                service_id: service.service_id.clone(),
                application_id: application_id.clone(),
                registration_url: registration_url(&service.service_id),
                registration_code: code,
            };
            tx.put_instruction(
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
                code_sha256,
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
        tx.put_application(app)?;
        let (ticket, effects) = tx.commit()?;
        Ok((self.application(&application_id, now)?, ticket, effects))
    }

    /// An application's progress.
    pub fn application(&self, id: &ApplicationId, now: UnixMillis) -> CoreResult<ApplicationView> {
        self.with_registry(|r| application_view(r, id, now))
    }

    /// An instruction of the device maker's own kind, for one device.
    pub fn create_instruction(
        &self,
        device_id: &DeviceId,
        instruction_id: InstructionId,
        body: InstructionBody,
        ttl_ms: u64,
        now: UnixMillis,
    ) -> CoreResult<(InstructionView, Ticket, Effects)> {
        let mut tx = Tx::new(self, Access::Write, &[device_id]);
        tx.active_device(device_id)?;
        let expires_at = now.saturating_add_ms(ttl_ms);
        let record = tx.put_instruction(instruction_id, device_id, body, expires_at, now)?;
        let (ticket, effects) = tx.commit()?;
        Ok((InstructionView::new(&record, now), ticket, effects))
    }

    /// A device's mailbox, oldest first.
    pub fn instructions(
        &self,
        device_id: &DeviceId,
        now: UnixMillis,
    ) -> CoreResult<Vec<InstructionView>> {
        self.device(device_id)?;
        let mut list: Vec<InstructionView> = self.with_registry(|r| {
            r.instructions
                .values()
                .filter(|i| i.device_id == *device_id)
                .map(|i| InstructionView::new(i, now))
                .collect()
        });
        list.sort_by_key(|i| (i.created_at, i.instruction_id.clone()));
        Ok(list)
    }

    /// The device takes an instruction. Taking it again answers the same (a device that crashed
    /// in between); after its expiry an instruction not yet taken is refused for good.
    pub fn take_instruction(
        &self,
        device_id: &DeviceId,
        instruction_id: &InstructionId,
        now: UnixMillis,
    ) -> CoreResult<(InstructionOffer, Ticket)> {
        let mut tx = Tx::new(self, Access::Write, &[device_id]);
        tx.active_device(device_id)?;
        let record = tx
            .instruction(instruction_id)?
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
        let answer = offer(&record, now);
        tx.put_instruction_record(record)?;
        let (ticket, _) = tx.commit()?;
        Ok((answer, ticket))
    }

    /// A device calls a service's registration URL with its code.
    pub fn register_service(
        &self,
        device_id: &DeviceId,
        url: &str,
        code: &Secret,
        now: UnixMillis,
    ) -> CoreResult<(ServiceRegistration, Ticket, Effects)> {
        let service_id = service_of_url(url)
            .ok_or_else(|| bad(format!("{url:?} is not a service registration URL")))?
            .to_owned();
        let hash = sha256_hex(code.expose().as_bytes());
        let mut tx = Tx::new(self, Access::Write, &[device_id]);
        tx.service(&service_id)?;
        tx.active_device(device_id)?;
        const INVALID: ErrorCode = ErrorCode::RegistrationCodeInvalid;
        let reg = tx.registry()?;
        let issued = reg.codes.get(&hash).cloned();
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
            Some((app_id, owner)) if owner != device_id => {
                let used = reg.applications.get(app_id).is_some_and(|app| {
                    app.devices
                        .iter()
                        .any(|e| e.device_id == *owner && e.registered_at.is_some())
                });
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
                let app = reg.applications.get(app_id).ok_or_else(|| {
                    CoreError::new(ErrorCode::Internal, format!("no application {app_id}"))
                })?;
                let registered_at = app
                    .devices
                    .iter()
                    .find(|e| e.device_id == *device_id)
                    .and_then(|e| e.registered_at);
                if app.service_id != service_id {
                    Err((
                        INVALID,
                        "the registration code is for another service",
                        Some(app_id.clone()),
                    ))
                } else if let Some(at) = registered_at {
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
        match verdict {
            Ok(app_id) => {
                let mut app = tx.registry()?.applications[&app_id].clone();
                if let Some(e) = app.devices.iter_mut().find(|e| e.device_id == *device_id) {
                    e.registered_at = Some(now);
                }
                let mut device = tx.active_device(device_id)?.clone();
                device.services.retain(|s| s.service_id != service_id);
                device.services.push(ServiceUse {
                    service_id: service_id.clone(),
                    application_id: app_id.clone(),
                    since: now,
                });
                tx.put_device(device)?;
                tx.effects.events.push(OpsEvent::ServiceRegistered {
                    application_id: app_id.clone(),
                    service_id: service_id.clone(),
                    device_id: device_id.clone(),
                    at: now,
                });
                let event = settled(tx.registry()?, &app, now);
                tx.effects.events.extend(event);
                tx.put_application(app)?;
                let (ticket, effects) = tx.commit()?;
                let registered = ServiceRegistration::Registered {
                    service_id,
                    at: now,
                };
                Ok((registered, ticket, effects))
            }
            Err((code, reason, on)) => {
                let target = on.or_else(|| open_enrollment(reg, &service_id, device_id));
                let refused = ServiceRegistration::Refused(refuse(code, reason));
                let Some(app_id) = target else {
                    return Ok((refused, self.read_ticket(), Effects::default()));
                };
                let mut app = reg.applications[&app_id].clone();
                if let Some(e) = app.devices.iter_mut().find(|e| e.device_id == *device_id) {
                    e.refusals.push(RefusedRegistration {
                        at: now,
                        reason: reason.to_owned(),
                    });
                    let excess = e.refusals.len().saturating_sub(MAX_REFUSALS);
                    e.refusals.drain(..excess);
                }
                let event = settled(reg, &app, now);
                tx.effects.events.extend(event);
                tx.put_application(app)?;
                let (ticket, effects) = tx.commit()?;
                Ok((refused, ticket, effects))
            }
        }
    }
}

impl Tx<'_> {
    /// Puts an instruction in a device's mailbox: an `i/` record and a feed entry.
    pub(super) fn put_instruction(
        &mut self,
        instruction_id: InstructionId,
        device_id: &DeviceId,
        body: InstructionBody,
        expires_at: UnixMillis,
        now: UnixMillis,
    ) -> CoreResult<InstructionRecord> {
        if self.instruction(&instruction_id)?.is_some() {
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
        self.put_instruction_record(record.clone())?;
        let entry = FeedBody::Instruction {
            instruction_id,
            expires_at,
        };
        self.append_feed(device_id, entry, now)?;
        Ok(record)
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

fn application_view(
    reg: &Registry,
    id: &ApplicationId,
    now: UnixMillis,
) -> CoreResult<ApplicationView> {
    let app = reg
        .applications
        .get(id)
        .ok_or_else(|| CoreError::new(ErrorCode::NotFound, format!("no application {id}")))?;
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
                taken_at: reg
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

/// The newest application for `service_id` in which `device_id` has not registered.
fn open_enrollment(
    reg: &Registry,
    service_id: &str,
    device_id: &DeviceId,
) -> Option<ApplicationId> {
    reg.applications
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

/// The settled event, when `app` (as it is about to be stored) has nobody pending and had
/// before (in `reg`).
fn settled(reg: &Registry, app: &ApplicationRecord, now: UnixMillis) -> Option<OpsEvent> {
    let was_pending = reg
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
        return None;
    }
    let registered = states
        .iter()
        .filter(|s| matches!(s, EnrollmentState::Registered { .. }))
        .count() as u32;
    Some(OpsEvent::ApplicationSettled {
        application_id: app.application_id.clone(),
        service_id: app.service_id.clone(),
        customer: app.customer.clone(),
        registered,
        failed: states.len() as u32 - registered,
        at: now,
    })
}

#[cfg(test)]
mod tests {
    use schemas::data::Registration;

    use super::*;
    use crate::core::tests::{T0, core};

    fn device(core: &Core, n: u8, customer: &str, model: &str) -> DeviceId {
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

    fn toner(core: &Core) {
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
    fn apply(core: &Core, req: ApplyForService) -> CoreResult<ApplicationView> {
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
        core.with_registry(|r| {
            r.instructions.values().find_map(|i| match &i.body {
                InstructionBody::UseStart {
                    registration_code, ..
                } if i.device_id == *device => Some(registration_code.clone()),
                _ => None,
            })
        })
        .unwrap()
    }

    fn register(
        core: &Core,
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
        let core = core();
        toner(&core);
        let a = device(&core, 1, "acme", "A");
        let b = device(&core, 2, "acme", "B");
        let c = device(&core, 3, "acme", "C");
        let other = device(&core, 4, "globex", "A");
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
                    &core,
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
        assert_eq!(chosen(apply(&core, by_model).unwrap()), vec![b.clone()]);
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
            assert_eq!(apply(&core, bad).unwrap_err().code(), ErrorCode::BadRequest);
        }
        let missing = ApplyForService {
            service_id: "nope".into(),
            ..Default::default()
        };
        assert_eq!(
            apply(&core, missing).unwrap_err().code(),
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
        let core = core();
        toner(&core);
        let a = device(&core, 1, "acme", "A");
        let b = device(&core, 2, "acme", "B");
        let req = ApplyForService {
            service_id: "toner".into(),
            ttl_secs: Some(60),
            ..Default::default()
        };
        let app = apply(&core, req).unwrap();
        let (code_a, code_b) = (code_of(&core, &a), code_of(&core, &b));

        // Wrong code, and b using a's unused code: refused, recorded on b.
        let (outcome, _) = register(&core, &b, &Secret::new("guess"), T0);
        assert_eq!(refused_code(outcome), ErrorCode::RegistrationCodeInvalid);
        let (outcome, _) = register(&core, &b, &code_a, T0);
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
        let (outcome, effects) = register(&core, &a, &code_a, T0);
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
        let (outcome, effects) = register(&core, &a, &code_a, T0.saturating_add_ms(5));
        assert!(matches!(
            outcome,
            ServiceRegistration::Registered { at: T0, .. }
        ));
        assert!(effects.events.is_empty());
        assert_eq!(core.device(&a).unwrap().services.len(), 1);
        // a's code reused by b: refused as used.
        let (outcome, _) = register(&core, &b, &code_a, T0);
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
        let (outcome, effects) = register(&core, &b, &code_b, late);
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
        let core = core();
        toner(&core);
        let a = device(&core, 1, "acme", "A");
        let b = device(&core, 2, "acme", "B");
        apply(
            &core,
            ApplyForService {
                service_id: "toner".into(),
                ..Default::default()
            },
        )
        .unwrap();
        let (code_a, code_b) = (code_of(&core, &a), code_of(&core, &b));
        let (_, effects) = register(&core, &a, &code_a, T0);
        assert!(
            !effects
                .events
                .iter()
                .any(|e| matches!(e, OpsEvent::ApplicationSettled { .. }))
        );
        let (_, effects) = register(&core, &b, &code_b, T0);
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
        let core = core();
        let a = device(&core, 1, "acme", "A");
        let b = device(&core, 2, "acme", "A");
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
