//! Services, applications and the mailbox, end to end in the core.

use schemas::api::{ApplicationView, ApplyForService, CreateService};
use schemas::data::ErrorCode;
use schemas::feed::FeedBody;
use schemas::ops::OpsEvent;
use schemas::services::{EnrollmentState, InstructionBody, registration_url};
use schemas::{ApplicationId, DeviceId, InstructionId, Secret, UnixMillis};

use super::ServiceRegistration;
use crate::core::tests::{T0, core, error_code, instruct, registered_as};
use crate::core::{Core, CoreResult, Effects};

fn device(core: &Core, n: u8, customer: &str, model: &str) -> DeviceId {
    registered_as(core, n, customer, model)
}

/// A core that knows the service "toner", for models A and B.
fn with_toner() -> Core {
    let core = core();
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
    core
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
    let core = with_toner();
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
        // Well-formed, but not what this customer's devices and the service allow now.
        assert_eq!(
            apply(&core, bad).unwrap_err().code(),
            ErrorCode::InvalidState
        );
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
    let core = with_toner();
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
    let core = with_toner();
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
    let soon = instruct(&core, &a, 1, 1000);
    let later = instruct(&core, &a, 2, 1000);
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
    assert_eq!(
        error_code(core.take_instruction(&a, &later, T0.saturating_add_ms(1001))),
        ErrorCode::Expired
    );
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

#[test]
fn a_settled_application_goes_with_its_codes_and_instructions_once_retention_ends() {
    let core = with_toner();
    let a = device(&core, 1, "acme", "A");
    let app = apply(
        &core,
        ApplyForService {
            service_id: "toner".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let code = code_of(&core, &a);
    let instructions = || core.with_registry(|r| r.instructions.len());
    assert_eq!(instructions(), 1);
    // Open (its codes still valid): kept, instructions included, whatever the cutoff.
    let (n, _) = core.forget_settled(UnixMillis(u64::MAX), T0, 100).unwrap();
    assert_eq!(n, 0);
    assert_eq!(instructions(), 1);
    // Its codes expired and the retention after that ended: all of it goes.
    let after = app.expires_at.saturating_add_ms(1);
    let (n, _) = core
        .forget_settled(after.saturating_add_ms(1), after, 100)
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(instructions(), 0);
    assert_eq!(
        error_code(core.application(&app.application_id, after)),
        ErrorCode::NotFound
    );
    let (outcome, _) = register(&core, &a, &code, after);
    assert_eq!(refused_code(outcome), ErrorCode::RegistrationCodeInvalid);
    let reloaded = Core::load(core.committer.clone(), crate::core::tests::policy(), 4).unwrap();
    assert_eq!(core.snapshot(), reloaded.snapshot());
}

#[test]
fn applications_are_listed_newest_first_as_each_is_shown_alone() {
    let core = with_toner();
    let a = device(&core, 1, "acme", "A");
    let req = |d: &DeviceId| ApplyForService {
        service_id: "toner".into(),
        devices: Some(vec![d.clone()]),
        ..ApplyForService::default()
    };
    let first = apply(&core, req(&a)).unwrap();
    let b = device(&core, 2, "acme", "B");
    let second = apply(&core, req(&b)).unwrap();
    let listed = core.applications(T0).unwrap();
    let ids: Vec<_> = listed.iter().map(|v| v.application_id.clone()).collect();
    let mut expected = vec![first.application_id.clone(), second.application_id.clone()];
    expected.sort();
    expected.reverse();
    assert_eq!(ids, expected, "the same time: the greater id first");
    for view in &listed {
        let alone = core.application(&view.application_id, T0).unwrap();
        assert_eq!(
            serde_json::to_value(view).unwrap(),
            serde_json::to_value(alone).unwrap()
        );
    }

    let users = [("Bo", 9u8), ("Ana", 8)].map(|(name, n)| {
        let id = schemas::UserId::from_random([n; 8]);
        let new = crate::core::NewPrincipal::new(id.clone(), name, Secret::new("t"));
        core.create_user(&new, &Secret::new("2468"), T0).unwrap();
        id
    });
    let listed: Vec<_> = core.users().into_iter().map(|u| u.user_id).collect();
    let mut expected = users.to_vec();
    expected.sort();
    assert_eq!(listed, expected, "created at the same time: by id");
}
