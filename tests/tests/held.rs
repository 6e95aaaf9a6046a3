//! Pull printing: a user's held jobs wait in the cloud until the user logs in at a device and
//! releases them there; each is released once, to one device, only inside a session at that
//! device.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use device_sim::{AgentError, AgentEvent, AgentHandle};
use e2e_tests::{Device, InProcessBridge, SOON, wait_for_event, wait_reported};
use schemas::api::{CreateUser, SubmitHeldJob};
use schemas::data::ErrorCode;
use schemas::job::JobState;
use schemas::print::{Capabilities, HeldState};
use schemas::{JobId, Secret, UserId};

fn printer() -> Capabilities {
    Capabilities {
        media_sizes: vec!["A4".into()],
        color: true,
        duplex: true,
        resolutions_dpi: vec![600],
        finishing: vec![],
        max_copies: 99,
    }
}

fn code(r: Result<impl std::fmt::Debug, AgentError>) -> ErrorCode {
    match r {
        Err(AgentError::Refused(body)) => body.code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn hold(admin: &admin_client::AdminClient, user: &UserId, title: &str) -> JobId {
    admin
        .submit_held(
            user,
            &SubmitHeldJob {
                title: Some(title.into()),
                payload: Some(format!("%PDF {title}")),
                content_type: Some("application/pdf".into()),
                ..SubmitHeldJob::default()
            },
        )
        .await
        .unwrap()
        .job_id
}

async fn printers(ep: &e2e_tests::Endpoints) -> (Device, Device) {
    let a = ep
        .online_device("SN-A", Device::simulated(), |c| c.printer = Some(printer()))
        .await;
    let b = ep
        .online_device("SN-B", Device::simulated(), |c| c.printer = Some(printer()))
        .await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_jobs_are_released_once_where_the_user_logs_in() {
    let bridge = InProcessBridge::start_with(|c| c.jobs.print_session_secs = 60).await;
    let ep = &bridge.endpoints;
    let admin = ep.client();
    let ana = admin
        .create_user(&CreateUser {
            name: "Ana".into(),
            pin: Secret::new("2468"),
        })
        .await
        .unwrap()
        .user_id;
    let jobs = [
        hold(&admin, &ana, "report").await,
        hold(&admin, &ana, "slides").await,
        hold(&admin, &ana, "invoice").await,
    ];
    let (mut a, mut b) = printers(ep).await;

    // No login, a wrong PIN: refused.
    assert_eq!(
        code(a.agent.login(ana.clone(), Secret::new("0000")).await),
        ErrorCode::Unauthorized
    );
    let mut session = a
        .agent
        .login(ana.clone(), Secret::new("2468"))
        .await
        .unwrap();
    let forged = forge(&session);
    assert_eq!(
        code(a.agent.release(&forged, vec![jobs[0].clone()]).await),
        ErrorCode::Unauthorized
    );

    // A session is for the device it was opened at.
    assert_eq!(
        code(b.agent.release(&session, vec![jobs[0].clone()]).await),
        ErrorCode::Unauthorized
    );

    // At A: three listed, two released and printed there.
    let mut listed: Vec<JobId> = session.held.iter().map(|h| h.job_id.clone()).collect();
    listed.sort();
    let mut all = jobs.to_vec();
    all.sort();
    assert_eq!(listed, all);
    let (released, refused) = a
        .agent
        .release(&session, vec![jobs[0].clone(), jobs[1].clone()])
        .await
        .unwrap();
    assert_eq!((released.len(), refused.len()), (2, 0));
    for j in &jobs[..2] {
        wait_reported(&mut a.events, j).await;
    }
    // While Ana is logged in at A, a new held job makes A refresh its list.
    let later = hold(&admin, &ana, "late").await;
    wait_for_event(&mut a.events, SOON, |e| match e {
        AgentEvent::HeldJobsChanged { user_id } if *user_id == ana => Some(()),
        _ => None,
    })
    .await;
    let mut now_held: Vec<JobId> = a
        .agent
        .held_jobs(&session)
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.job_id)
        .collect();
    now_held.sort();
    let mut expected = vec![jobs[2].clone(), later.clone()];
    expected.sort();
    assert_eq!(now_held, expected);
    a.agent.logout(&session).await.unwrap();
    assert_eq!(
        code(a.agent.release(&session, vec![jobs[2].clone()]).await),
        ErrorCode::Unauthorized,
        "after logout"
    );

    // At B later: the first two are gone; the third is released there.
    session = b
        .agent
        .login(ana.clone(), Secret::new("2468"))
        .await
        .unwrap();
    assert_eq!(session.held.len(), 2);
    let (released, refused) = b
        .agent
        .release(&session, vec![jobs[0].clone(), jobs[2].clone()])
        .await
        .unwrap();
    assert_eq!(released, vec![jobs[2].clone()]);
    assert_eq!(refused[0].0, jobs[0]);
    assert_eq!(refused[0].1.code, ErrorCode::InvalidState);
    wait_reported(&mut b.events, &jobs[2]).await;

    // A session unused past its timeout is over.
    let idle = b
        .agent
        .login(ana.clone(), Secret::new("2468"))
        .await
        .unwrap();
    bridge.clock.advance_past(idle.expires_at);
    assert_eq!(
        code(b.agent.release(&idle, vec![later.clone()]).await),
        ErrorCode::Unauthorized,
        "after the timeout"
    );

    // Each printed once, where it was released.
    for (j, at) in [(&jobs[0], &a.id), (&jobs[1], &a.id), (&jobs[2], &b.id)] {
        let job = admin.job(j).await.unwrap();
        assert_eq!(
            (job.state, &job.device_id, job.attempt),
            (JobState::Succeeded, at, 1)
        );
    }
    let held = admin.held_jobs(&ana).await.unwrap();
    let released_to = |j: &JobId| {
        held.iter()
            .find(|h| h.job_id == *j)
            .and_then(|h| match &h.state {
                HeldState::Released { device_id, .. } => Some(device_id.clone()),
                _ => None,
            })
    };
    assert_eq!(released_to(&jobs[0]), Some(a.id.clone()));
    assert_eq!(released_to(&jobs[1]), Some(a.id.clone()));
    assert_eq!(released_to(&jobs[2]), Some(b.id.clone()));
    assert_eq!(released_to(&later), None);
}

/// A session whose token is not the one the cloud issued.
fn forge(session: &device_sim::PrintSession) -> device_sim::PrintSession {
    session.forged_for_tests()
}

async fn release_race(a: &AgentHandle, b: &AgentHandle, user: &UserId, job: &JobId) -> usize {
    let pin = || Secret::new("2468");
    let (sa, sb) = tokio::join!(a.login(user.clone(), pin()), b.login(user.clone(), pin()));
    let (sa, sb) = (sa.unwrap(), sb.unwrap());
    let (ra, rb) = tokio::join!(
        a.release(&sa, vec![job.clone()]),
        b.release(&sb, vec![job.clone()])
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    for refused in ra.1.iter().chain(&rb.1) {
        assert_eq!(refused.1.code, ErrorCode::InvalidState, "{refused:?}");
    }
    ra.0.len() + rb.0.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_releasing_the_same_job_at_once_exactly_one_gets_it() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let admin = ep.client();
    let ana = admin
        .create_user(&CreateUser {
            name: "Ana".into(),
            pin: Secret::new("2468"),
        })
        .await
        .unwrap()
        .user_id;
    let (a, b) = printers(ep).await;
    for i in 0..10 {
        let job = hold(&admin, &ana, &format!("race-{i}")).await;
        assert_eq!(release_race(&a.agent, &b.agent, &ana, &job).await, 1);
        let queued = admin.job(&job).await.unwrap();
        assert!(queued.device_id == a.id || queued.device_id == b.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_fill_and_read_only_their_own_virtual_printer() {
    use admin_client::ClientError;
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let admin = ep.client();
    let new_user = |name: &str| CreateUser {
        name: name.into(),
        pin: Secret::new("2468"),
    };
    let ana = admin.create_user(&new_user("Ana")).await.unwrap();
    let bo = admin.create_user(&new_user("Bo")).await.unwrap();
    let as_ana = admin.with_token(ana.token.clone());
    let as_bo = admin.with_token(bo.token.clone());
    let forbidden = |r: Result<_, ClientError>| match r {
        Err(ClientError::Api { error, .. }) => assert_eq!(error.code, ErrorCode::Forbidden),
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(e) => panic!("{e}"),
    };
    let job = hold(&as_ana, &ana.user_id, "mine").await;
    let mine = as_ana.held_jobs(&ana.user_id).await.unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].job_id, job);
    forbidden(as_bo.held_jobs(&ana.user_id).await.map(|_| ()));
    forbidden(
        as_bo
            .submit_held(
                &ana.user_id,
                &SubmitHeldJob {
                    payload: Some("not yours".into()),
                    ..SubmitHeldJob::default()
                },
            )
            .await
            .map(|_| ()),
    );
    // Creating users is the administrator's.
    forbidden(as_ana.create_user(&new_user("Cy")).await.map(|_| ()));
}
