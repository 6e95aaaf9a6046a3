//! Applications: a service applied for on some of a customer's devices, each with a one-time
//! code in its mailbox, and the registrations that redeem the codes.

use schemas::api::{ApplicationView, ApplyForService, EnrollmentView};
use schemas::data::ErrorCode;
use schemas::ops::OpsEvent;
use schemas::records::DeviceRecord;
use schemas::services::{
    ApplicationRecord, Enrollment, EnrollmentState, InstructionBody, MAX_REFUSALS,
    RefusedRegistration, ServiceUse, registration_url, service_of_url,
};
use schemas::{ApplicationId, DeviceId, InstructionId, Secret, UnixMillis};

use crate::core::state::Registry;
use crate::core::tx::{Access, Tx};
use crate::core::{Core, CoreError, CoreResult, Effects, pick_devices, sha256_hex, ttl_ms};
use crate::store::Ticket;

use super::{ServiceRegistration, bad, is_candidate};

impl Core {
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
                    return Err(CoreError::new(
                        ErrorCode::InvalidState,
                        format!(
                            "service {} does not support model {m:?}",
                            service.service_id
                        ),
                    ));
                }
                candidates
                    .into_iter()
                    .filter(|d| models.contains(&d.model))
                    .collect()
            }
            (None, Some(ids)) => pick_devices(&candidates, ids, |id| {
                let why = format!(
                    "device {id} is not a candidate: not customer {customer}'s, not in use, of a \
                     model service {} does not support, or already permitted to use it",
                    service.service_id
                );
                CoreError::new(ErrorCode::InvalidState, why)
            })?,
        };
        if chosen.is_empty() {
            return Err(CoreError::new(
                ErrorCode::InvalidState,
                format!(
                    "no device of customer {customer:?} can be enrolled in service {}",
                    service.service_id
                ),
            ));
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

    /// Every application, newest first.
    pub fn applications(&self, now: UnixMillis) -> CoreResult<Vec<ApplicationView>> {
        let mut all = self.with_registry(|r| {
            r.applications
                .keys()
                .map(|id| application_view(r, id, now))
                .collect::<CoreResult<Vec<_>>>()
        })?;
        all.sort_by(|a, b| {
            (b.created_at, &b.application_id).cmp(&(a.created_at, &a.application_id))
        });
        Ok(all)
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
