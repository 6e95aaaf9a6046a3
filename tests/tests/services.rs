//! Service enrollment through the instruction mailbox: an application for a service puts a
//! use-start instruction with a one-time code in the mailbox of exactly the customer's devices
//! of supported models; the devices register on their own; wrong, reused and expired codes are
//! refused and shown with their reason; an instruction not taken before it expires is never
//! acted on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use device_sim::AgentEvent;
use device_sim::session::{DataSession, SessionError, SessionSettings};
use e2e_tests::{
    Device, Endpoints, InProcessBridge, OpsWatcher, SOON, device_info, eventually, wait_for_event,
};
use schemas::api::{ApplyForService, CreateEnrollmentToken, CreateInstruction, CreateService};
use schemas::data::{ErrorCode, HelloAuth, Registration, Request, Response};
use schemas::feed::FeedBody;
use schemas::ops::OpsEvent;
use schemas::services::{EnrollmentState, InstructionBody, InstructionState, registration_url};
use schemas::{DeviceId, FeedSeq, InstructionId, Secret};

const MODELS: [&str; 4] = ["MFP-A", "MFP-B", "MFP-C", "MFP-D"];

async fn toner_service(ep: &Endpoints) {
    ep.client()
        .create_service(&CreateService {
            service_id: "toner".into(),
            name: "Automatic toner delivery".into(),
            models: vec!["MFP-A".into(), "MFP-C".into()],
            ..CreateService::default()
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_enrolls_exactly_the_matching_devices_without_touching_them() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let admin = ep.client();
    let mut ops = OpsWatcher::start(ep).await;
    toner_service(ep).await;

    // 30 devices of customer acme, four models; one of another customer.
    let mut devices = Vec::new();
    for i in 0..30 {
        let model = MODELS[i % 4];
        let device = ep
            .online_device(&format!("SN-{i:02}"), Device::simulated(), |c| {
                c.info.model = model.into();
            })
            .await;
        devices.push((device, model));
    }
    let globex = admin
        .create_enrollment(&CreateEnrollmentToken {
            customer: "globex".into(),
            max_uses: Some(1),
            ttl_secs: None,
        })
        .await
        .unwrap()
        .token;
    let stranger = ep
        .online_device("SN-GLOBEX", Device::simulated(), |c| {
            c.info.model = "MFP-A".into();
            c.enrollment_token = Some(globex);
        })
        .await;

    let matching: Vec<&DeviceId> = devices
        .iter()
        .filter(|(_, m)| *m == "MFP-A" || *m == "MFP-C")
        .map(|(d, _)| &d.id)
        .collect();
    assert_eq!(matching.len(), 15);
    let acme = admin
        .customers()
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.customer == "acme")
        .unwrap();
    assert_eq!(acme.devices, 30);
    assert_eq!(acme.models["MFP-A"], 8);
    let candidates = admin.candidates("acme", "toner").await.unwrap();
    assert_eq!(candidates.len(), 15);

    let app = admin
        .apply_for_service(
            "acme",
            &ApplyForService {
                service_id: "toner".into(),
                ..ApplyForService::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(app.devices.len(), 15);
    let mut chosen: Vec<&DeviceId> = app.devices.iter().map(|e| &e.device_id).collect();
    chosen.sort();
    let mut expected = matching.clone();
    expected.sort();
    assert_eq!(chosen, expected);

    // Every chosen device registers by itself; the operator hears of each and of the end.
    eventually(SOON, "all 15 registered", || async {
        let view = admin.application(&app.application_id).await.unwrap();
        view.registered == 15 && view.settled
    })
    .await;
    let mut registered = Vec::new();
    let settled = ops
        .wait_for(SOON, |e| match e {
            OpsEvent::ServiceRegistered { device_id, .. } => {
                registered.push(device_id.clone());
                None
            }
            OpsEvent::ApplicationSettled {
                application_id,
                registered,
                failed,
                ..
            } if *application_id == app.application_id => Some((*registered, *failed)),
            _ => None,
        })
        .await;
    assert_eq!(settled, (15, 0));
    registered.sort();
    registered.dedup();
    assert_eq!(registered.len(), 15);
    assert!(admin.instructions(&stranger.id).await.unwrap().is_empty());
    for (device, model) in &devices {
        let view = admin.device(&device.id).await.unwrap();
        let permitted = view.services.iter().any(|s| s.service_id == "toner");
        assert_eq!(permitted, matching.contains(&&device.id), "{model}");
        let mailbox = admin.instructions(&device.id).await.unwrap();
        if permitted {
            assert_eq!(mailbox.len(), 1);
            assert_eq!(mailbox[0].state, InstructionState::Taken);
            // Views never show the code.
            let InstructionBody::UseStart {
                registration_code, ..
            } = &mailbox[0].body
            else {
                panic!("a use-start instruction")
            };
            assert_eq!(registration_code.expose(), "");
        } else {
            assert!(mailbox.is_empty(), "{model} got an instruction");
        }
    }

    // An instruction of the device maker's own kind reaches the device through the mailbox.
    let (first, _) = &mut devices[0];
    let custom = admin
        .create_instruction(
            &first.id,
            &CreateInstruction {
                name: "calibrate".into(),
                params: BTreeMap::from([("tray".into(), "2".into())]),
                ttl_secs: None,
            },
        )
        .await
        .unwrap();
    let params = wait_for_event(&mut first.events, SOON, |e| match e {
        AgentEvent::CustomInstruction {
            instruction_id,
            name,
            params,
        } if *instruction_id == custom.instruction_id => {
            assert_eq!(name, "calibrate");
            Some(params.clone())
        }
        _ => None,
    })
    .await;
    assert_eq!(params["tray"], "2");
}

/// A device without an agent: registered over the data channel by the test.
async fn bare_device(ep: &Endpoints, serial: &str) -> (DataSession, DeviceId) {
    let token = ep.enrollment_token(1).await;
    let info = device_info(serial);
    let (session, welcome) = DataSession::connect(
        &ep.data_url,
        HelloAuth::Register(Registration {
            registration_id: None,
            enrollment_token: token,
            serial: info.serial,
            model: "MFP-A".into(),
            destination: info.destination,
            time_zone: info.time_zone,
            owner: None,
        }),
        "test",
        SessionSettings::default(),
    )
    .await
    .unwrap();
    (session, welcome.device_id)
}

/// Takes the use-start instruction waiting in the device's feed; its registration code.
async fn take_code(session: &DataSession) -> Result<Secret, SessionError> {
    let Response::Feed { entries, .. } = session
        .request(Request::Sync {
            after: FeedSeq::ZERO,
            wait_ms: 0,
            limit: 64,
            ack: None,
        })
        .await?
    else {
        panic!("a feed")
    };
    let instruction_id: InstructionId = entries
        .iter()
        .rev()
        .find_map(|e| match &e.body {
            FeedBody::Instruction { instruction_id, .. } => Some(instruction_id.clone()),
            _ => None,
        })
        .expect("an instruction in the feed");
    let Response::Instruction(offer) = session
        .request(Request::TakeInstruction { instruction_id })
        .await?
    else {
        panic!("an instruction")
    };
    match offer.body {
        InstructionBody::UseStart {
            registration_code, ..
        } => Ok(registration_code),
        other => panic!("expected use-start, got {other:?}"),
    }
}

async fn redeem(session: &DataSession, code: &Secret) -> Result<Response, SessionError> {
    session
        .request(Request::RegisterService {
            url: registration_url("toner"),
            code: code.clone(),
        })
        .await
}

fn refusal(result: Result<Response, SessionError>) -> ErrorCode {
    match result {
        Err(SessionError::Request(body)) => body.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_reused_and_expired_codes_are_refused_and_shown_with_their_reason() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let admin = ep.client();
    toner_service(ep).await;
    let (x, x_id) = bare_device(ep, "SN-X").await;
    let (y, y_id) = bare_device(ep, "SN-Y").await;
    let (z, z_id) = bare_device(ep, "SN-Z").await;
    let apply = |devices: Vec<DeviceId>, ttl_secs| ApplyForService {
        service_id: "toner".into(),
        devices: Some(devices),
        ttl_secs: Some(ttl_secs),
        ..ApplyForService::default()
    };
    let app = admin
        .apply_for_service("acme", &apply(vec![x_id.clone(), y_id.clone()], 3600))
        .await
        .unwrap();
    let code_x = take_code(&x).await.unwrap();

    // Wrong code, then the right one; then x's used code presented by y.
    assert_eq!(
        refusal(redeem(&x, &Secret::new("0000")).await),
        ErrorCode::RegistrationCodeInvalid
    );
    let state_of = |view: &schemas::api::ApplicationView, id: &DeviceId| {
        view.devices
            .iter()
            .find(|e| e.device_id == *id)
            .unwrap()
            .state
            .clone()
    };
    let view = admin.application(&app.application_id).await.unwrap();
    assert_eq!(
        state_of(&view, &x_id),
        EnrollmentState::Failed {
            reason: "wrong registration code".into()
        }
    );
    assert!(matches!(
        redeem(&x, &code_x).await.unwrap(),
        Response::ServiceRegistered { .. }
    ));
    assert_eq!(
        refusal(redeem(&y, &code_x).await),
        ErrorCode::RegistrationCodeInvalid
    );
    let view = admin.application(&app.application_id).await.unwrap();
    assert!(matches!(
        state_of(&view, &x_id),
        EnrollmentState::Registered { .. }
    ));
    assert_eq!(
        state_of(&view, &y_id),
        EnrollmentState::Failed {
            reason: "the registration code was already used".into()
        }
    );
    assert!(admin.device(&y_id).await.unwrap().services.is_empty());

    // Taken in time, used too late.
    let short = admin
        .apply_for_service("acme", &apply(vec![z_id.clone()], 60))
        .await
        .unwrap();
    let code_z = take_code(&z).await.unwrap();
    bridge.clock.advance_past(short.expires_at);
    assert_eq!(refusal(redeem(&z, &code_z).await), ErrorCode::Expired);
    let view = admin.application(&short.application_id).await.unwrap();
    assert_eq!(
        state_of(&view, &z_id),
        EnrollmentState::Failed {
            reason: "the registration code expired".into()
        }
    );
    assert!(view.settled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instruction_not_taken_before_it_expires_is_never_acted_on() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let admin = ep.client();
    toner_service(ep).await;
    let Device {
        agent,
        id,
        store,
        config,
        ..
    } = ep
        .online_device("SN-ASLEEP", Device::simulated(), |c| {
            c.info.model = "MFP-A".into();
        })
        .await;
    // The device is off while the instruction waits, and until it has expired.
    agent.stop().await.unwrap();
    let app = admin
        .apply_for_service(
            "acme",
            &ApplyForService {
                service_id: "toner".into(),
                devices: Some(vec![id.clone()]),
                ttl_secs: Some(60),
                ..ApplyForService::default()
            },
        )
        .await
        .unwrap();
    bridge.clock.advance_past(app.expires_at);

    let agent = device_sim::start(config, Device::simulated(), store);
    let mut events = agent.subscribe();
    let error = wait_for_event(&mut events, SOON, |e| match e {
        AgentEvent::InstructionSkipped { error, .. } => Some(error.clone()),
        AgentEvent::InstructionTaken { .. } | AgentEvent::ServiceRegistered { .. } => {
            panic!("an expired instruction was acted on: {e:?}")
        }
        _ => None,
    })
    .await;
    assert_eq!(error.code, ErrorCode::Expired);
    let mailbox = admin.instructions(&id).await.unwrap();
    assert_eq!(mailbox[0].state, InstructionState::Expired);
    assert_eq!(mailbox[0].taken_at, None);
    let view = admin.application(&app.application_id).await.unwrap();
    assert!(matches!(
        view.devices[0].state,
        EnrollmentState::Failed { .. }
    ));
    assert!(admin.device(&id).await.unwrap().services.is_empty());
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_without_notifications_reads_its_mailbox_on_the_clouds_regular_poll() {
    let bridge = InProcessBridge::start_with(|c| c.devices.poll_interval_secs = 1).await;
    let ep = &bridge.endpoints;
    let admin = ep.client();
    let token = ep.enrollment_token(1).await;
    let mut config = ep.agent_config(&token, "SN-POLLER");
    // No broker, no long-poll, no poll interval of its own: only the cloud's schedule.
    config.endpoints.mqtt.clear();
    config.long_poll = Duration::ZERO;
    config.poll_interval = None;
    let store = device_sim::MemoryStateStore::default();
    let agent = device_sim::start(config, Device::simulated(), store.clone());
    let mut events = agent.subscribe();
    let id = wait_for_event(&mut events, SOON, |e| match e {
        AgentEvent::Registered(id) => Some(id.clone()),
        _ => None,
    })
    .await;
    let created = admin
        .create_instruction(
            &id,
            &CreateInstruction {
                name: "ping".into(),
                ..CreateInstruction::default()
            },
        )
        .await
        .unwrap();
    // Jitter keeps each poll between half and all of the second.
    wait_for_event(&mut events, Duration::from_secs(5), |e| match e {
        AgentEvent::CustomInstruction { instruction_id, .. }
            if *instruction_id == created.instruction_id =>
        {
            Some(())
        }
        _ => None,
    })
    .await;
    assert_eq!(store.snapshot().unwrap().poll_interval_secs, Some(1));
    agent.stop().await.unwrap();
}
