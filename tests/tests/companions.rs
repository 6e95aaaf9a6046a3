//! Companion devices: a phone linked by the device's owner submits jobs to that device, and is
//! refused for devices it is not linked to and for devices that have not finished registering.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use admin_client::ClientError;
use device_sim::session::{DataSession, SessionSettings};
use e2e_tests::{Device, InProcessBridge, SOON, device_info, eventually, wait_reported};
use hyper::StatusCode;
use schemas::api::SubmitJob;
use schemas::data::{ErrorCode, HelloAuth, OwnerClaim, Registration};
use schemas::job::JobState;
use schemas::{DeviceId, Secret};

fn refusal(result: Result<impl std::fmt::Debug, ClientError>) -> (StatusCode, ErrorCode, String) {
    match result {
        Err(ClientError::Api { status, error }) => (status, error.code, error.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn companion_submits_only_to_linked_registered_devices() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let admin = ep.client();
    let owner = admin.create_owner("Anna").await.unwrap();
    let as_owner = admin.with_token(owner.token.clone());
    let phone = as_owner.create_companion("Anna's phone").await.unwrap();
    let as_phone = admin.with_token(phone.token.clone());
    let claim = OwnerClaim {
        owner_id: owner.owner_id.clone(),
        pin: Secret::new("2468"),
    };

    // Two devices of Anna's that completed registration ...
    let with_owner = |c: &mut device_sim::AgentConfig| c.owner = Some(claim.clone());
    let Device {
        agent: linked_agent,
        events: mut linked_events,
        id: linked,
        ..
    } = ep
        .online_device("SN-LINKED", Device::simulated(), with_owner)
        .await;
    let Device { id: unlinked, .. } = ep
        .online_device("SN-UNLINKED", Device::simulated(), with_owner)
        .await;
    for id in [&linked, &unlinked] {
        eventually(SOON, "registration completed", || async {
            admin
                .device(id)
                .await
                .unwrap()
                .registration_completed_at
                .is_some()
        })
        .await;
    }
    // ... and one that received its credentials and never confirmed storing them.
    let token = ep.enrollment_token(1).await;
    let info = device_info("SN-HALFWAY");
    let (session, welcome) = DataSession::connect(
        &ep.data_url,
        HelloAuth::Register(Registration {
            registration_id: None,
            enrollment_token: token,
            serial: info.serial,
            model: info.model,
            destination: info.destination,
            time_zone: info.time_zone,
            owner: Some(claim.clone()),
        }),
        "test",
        SessionSettings::default(),
    )
    .await
    .unwrap();
    session.close();
    let halfway: DeviceId = welcome.device_id;
    assert_eq!(
        admin.device(&halfway).await.unwrap().owner_id,
        Some(owner.owner_id.clone())
    );

    // The owner links the phone to two of them.
    for id in [&linked, &halfway] {
        as_owner
            .link_companion(&phone.companion_id, id, true)
            .await
            .unwrap();
    }
    let view = as_phone.companion(&phone.companion_id).await.unwrap();
    assert_eq!(view.devices, [linked.clone(), halfway.clone()]);

    let job = SubmitJob {
        payload: Some("photo.jpg from the phone".into()),
        content_type: Some("image/jpeg".into()),
        ..Default::default()
    };
    let (submitted, _) = as_phone.submit_job(&linked, &job).await.unwrap();
    wait_reported(&mut linked_events, &submitted.job_id).await;
    let seen = as_phone.job(&submitted.job_id).await.unwrap();
    assert_eq!(seen.state, JobState::Succeeded);
    assert_eq!(
        seen.submitted_by,
        Some(format!("companion:{}", phone.companion_id))
    );

    let (status, code, message) = refusal(as_phone.submit_job(&unlinked, &job).await);
    assert_eq!(
        (status, code),
        (StatusCode::FORBIDDEN, ErrorCode::Forbidden)
    );
    assert!(message.contains("not linked"), "{message}");

    let (status, code, message) = refusal(as_phone.submit_job(&halfway, &job).await);
    assert_eq!(
        (status, code),
        (StatusCode::CONFLICT, ErrorCode::RegistrationIncomplete)
    );
    assert!(message.contains("registration"), "{message}");

    // Nothing reached the refused devices.
    for id in [&unlinked, &halfway] {
        assert!(admin.device_jobs(id).await.unwrap().is_empty());
    }

    // The phone cannot widen its own rights, nor use the administrator's routes.
    let (status, ..) = refusal(
        as_phone
            .link_companion(&phone.companion_id, &unlinked, true)
            .await,
    );
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, ..) = refusal(as_phone.devices().await);
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Unlinked, it is refused again.
    as_owner
        .link_companion(&phone.companion_id, &linked, false)
        .await
        .unwrap();
    let (status, ..) = refusal(as_phone.submit_job(&linked, &job).await);
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Another owner cannot link Anna's devices to their companion, nor read her jobs.
    let other = admin.create_owner("Bob").await.unwrap();
    let as_other = admin.with_token(other.token);
    let bobs_phone = as_other.create_companion("Bob's phone").await.unwrap();
    let (status, ..) = refusal(
        as_other
            .link_companion(&bobs_phone.companion_id, &linked, true)
            .await,
    );
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, ..) = refusal(as_other.job(&submitted.job_id).await);
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, ..) = refusal(
        admin
            .with_token(Secret::new("not-a-token"))
            .submit_job(&linked, &job)
            .await,
    );
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    tokio::time::timeout(Duration::from_secs(10), linked_agent.stop())
        .await
        .unwrap()
        .unwrap();
}
