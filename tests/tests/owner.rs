//! Owner binding: after a reset or relocation the owner must confirm at the panel. The right
//! owner information changes nothing; wrong or missing information invalidates the device id
//! (old credentials refused on both channels, its jobs rejected with the reason), and the
//! device registers again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use admin_client::ClientError;
use device_sim::session::{DataSession, SessionError, SessionSettings};
use device_sim::{AgentError, AgentEvent};
use e2e_tests::{
    Device, Endpoints, InProcessBridge, SOON, eventually, mqtt_connect, wait_for_event,
    wait_reported,
};
use schemas::api::SubmitJob;
use schemas::data::{ErrorCode, HelloAuth, OwnerCheckReason, OwnerClaim};
use schemas::job::JobState;
use schemas::{OwnerId, Secret, UnixMillis};

fn job() -> SubmitJob {
    SubmitJob {
        payload: Some("contract.pdf".into()),
        ..Default::default()
    }
}

async fn anna(ep: &Endpoints) -> OwnerId {
    ep.client().create_owner("Anna").await.unwrap().owner_id
}

fn claim(owner: &OwnerId, pin: &str) -> OwnerClaim {
    OwnerClaim {
        owner_id: owner.clone(),
        pin: Secret::new(pin),
    }
}

async fn check_started(device: &mut Device) -> UnixMillis {
    wait_for_event(&mut device.events, SOON, |e| match e {
        AgentEvent::OwnerCheckStarted { deadline } => *deadline,
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_owner_changes_nothing_wrong_owner_invalidates_the_id() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let client = ep.client();
    let owner = anna(ep).await;

    // The right owner after a factory reset: jobs wait, then run; the id stays valid.
    let mut good = ep
        .online_device("SN-GOOD", Device::simulated(), |c| {
            c.owner = Some(claim(&owner, "2468"));
        })
        .await;
    good.agent
        .owner_check_required(OwnerCheckReason::FactoryReset)
        .await
        .unwrap();
    let deadline = check_started(&mut good).await;
    assert!(deadline > UnixMillis::now());
    let (waiting, _) = client.submit_job(&good.id, &job()).await.unwrap();
    assert!(client.device(&good.id).await.unwrap().owner_check.is_some());
    good.agent
        .confirm_owner(claim(&owner, "2468"))
        .await
        .unwrap();
    wait_reported(&mut good.events, &waiting.job_id).await;
    assert_eq!(
        client.job(&waiting.job_id).await.unwrap().state,
        JobState::Succeeded
    );
    let view = client.device(&good.id).await.unwrap();
    assert!(view.owner_check.is_none() && view.invalidated.is_none() && !view.disabled);
    let creds = good.credentials();
    assert_eq!(creds.device_id, good.id, "same id after the confirmation");

    // The wrong owner after a move: the id is invalidated and the device registers again.
    let token = ep.enrollment_token(2).await;
    let mut bad = ep
        .online_device("SN-BAD", Device::simulated(), |c| {
            c.owner = Some(claim(&owner, "2468"));
            c.enrollment_token = Some(token);
        })
        .await;
    let old = bad.credentials();
    bad.agent
        .owner_check_required(OwnerCheckReason::TimeZoneChanged {
            time_zone: "Asia/Tokyo".into(),
        })
        .await
        .unwrap();
    check_started(&mut bad).await;
    assert_eq!(
        client.device(&old.device_id).await.unwrap().time_zone,
        "Asia/Tokyo"
    );
    let (first, _) = client.submit_job(&old.device_id, &job()).await.unwrap();
    let (second, _) = client.submit_job(&old.device_id, &job()).await.unwrap();
    let refused = bad.agent.confirm_owner(claim(&owner, "1357")).await;
    assert!(
        matches!(refused, Err(AgentError::Invalidated(_))),
        "{refused:?}"
    );
    let new_id = wait_for_event(&mut bad.events, SOON, |e| match e {
        AgentEvent::Registered(id) => Some(id.clone()),
        _ => None,
    })
    .await;
    assert_ne!(new_id, old.device_id);

    for id in [&first.job_id, &second.job_id] {
        let j = client.job(id).await.unwrap();
        assert_eq!(j.state, JobState::Rejected);
        assert!(
            j.outcome.as_deref().unwrap().contains("invalidated"),
            "{:?}",
            j.outcome
        );
    }
    let view = client.device(&old.device_id).await.unwrap();
    assert!(view.invalidated.is_some() && view.disabled);
    match client.submit_job(&old.device_id, &job()).await {
        Err(ClientError::Api { error, .. }) => assert_eq!(error.code, ErrorCode::DeviceInvalidated),
        other => panic!("a job for an invalidated id must be refused, got {other:?}"),
    }
    let old_hello = HelloAuth::Device {
        device_id: old.device_id.clone(),
        secret: old.secret.clone(),
    };
    match DataSession::connect(&ep.data_url, old_hello, "test", SessionSettings::default()).await {
        Err(SessionError::Refused(body)) => assert_eq!(body.code, ErrorCode::DeviceInvalidated),
        other => panic!(
            "the old secret must be refused, got {:?}",
            other.map(|(_, w)| w)
        ),
    }
    let id = old.device_id.as_str();
    assert!(mqtt_connect(ep, id, id, old.secret.expose()).await.is_err());

    // The device works under its new id.
    eventually(SOON, "the new id completed registration", || async {
        client
            .device(&new_id)
            .await
            .is_ok_and(|d| d.registration_completed_at.is_some())
    })
    .await;
    let (again, _) = client.submit_job(&new_id, &job()).await.unwrap();
    wait_reported(&mut bad.events, &again.job_id).await;
    bad.agent.stop().await.unwrap();
    good.agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_not_confirmed_in_time_invalidates_the_id() {
    let bridge = InProcessBridge::start_with(|c| c.devices.owner_check_window_secs = 1).await;
    let ep = &bridge.endpoints;
    let client = ep.client();
    let owner = anna(ep).await;
    let mut device = ep
        .online_device("SN-MOVED", Device::simulated(), |c| {
            c.owner = Some(claim(&owner, "2468"));
        })
        .await;
    device
        .agent
        .owner_check_required(OwnerCheckReason::NetworkChanged {
            network: "cafe-wifi".into(),
        })
        .await
        .unwrap();
    check_started(&mut device).await;
    let (waiting, _) = client.submit_job(&device.id, &job()).await.unwrap();
    // Nobody confirms. The cloud gives up at the deadline and tells the device.
    let reason = wait_for_event(&mut device.events, SOON, |e| match e {
        AgentEvent::Invalidated { reason } => Some(reason.clone()),
        _ => None,
    })
    .await;
    assert!(reason.contains("not confirmed"), "{reason}");
    let j = client.job(&waiting.job_id).await.unwrap();
    assert_eq!(j.state, JobState::Rejected);
    assert!(j.outcome.unwrap().contains("not confirmed"));
    // Its token had one use: it cannot register again, and says why.
    let ended = tokio::time::timeout(SOON, device.agent.stop())
        .await
        .unwrap();
    match ended {
        Err(AgentError::Registration(body)) => {
            assert_eq!(body.code, ErrorCode::EnrollmentInvalid)
        }
        other => panic!("expected the new registration to be refused, got {other:?}"),
    }
}
