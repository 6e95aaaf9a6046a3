//! Poll-now through the LAN: the cloud gives one device the plan, which passes the nudge on as a
//! tree; every device polls within its stagger window, and a nudge without a valid token is
//! refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use device_sim::AgentEvent;
use device_sim::lan;
use e2e_tests::{Device, InProcessBridge, SOON, eventually, wait_for_event};
use schemas::api::{CreateInstruction, PollNow, PollNowVia};
use schemas::nudge::{Nudge, NudgeAnswer, NudgeNode};
use schemas::services::InstructionState;
use schemas::{DeviceId, InstructionId, UnixMillis};
use tokio::sync::broadcast;

const STAGGER_MS: u32 = 300;

struct Member {
    agent: device_sim::AgentHandle,
    events: broadcast::Receiver<AgentEvent>,
    id: DeviceId,
    lan: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_now_through_one_device_reaches_twenty_others_through_the_lan_tree() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let admin = ep.client();
    let loopback = "127.0.0.1:0".parse().unwrap();

    // The root hears the cloud over MQTT; the twenty others have no notification channel and
    // poll once a day: only the nudge can make them poll now.
    let root = ep
        .online_device("SN-ROOT", Device::simulated(), |c| {
            c.lan_listen = Some(loopback)
        })
        .await;
    let token = ep.enrollment_token(20).await;
    let mut members = Vec::new();
    for i in 0..20 {
        let mut config = ep.agent_config(&token, &format!("SN-LAN-{i:02}"));
        config.endpoints.mqtt.clear();
        config.long_poll = Duration::ZERO;
        config.poll_interval = None;
        config.lan_listen = Some(loopback);
        let agent = device_sim::start(
            config,
            Device::simulated(),
            device_sim::MemoryStateStore::default(),
        );
        let mut events = agent.subscribe();
        wait_for_event(&mut events, SOON, |e| {
            matches!(e, AgentEvent::SettingsReported { .. }).then_some(())
        })
        .await;
        let id = agent.device_id().unwrap();
        let lan = agent.settings_in_use().await.unwrap().lan_endpoint.unwrap();
        members.push(Member {
            agent,
            events,
            id,
            lan,
        });
    }
    eventually(SOON, "every LAN endpoint known to the cloud", || async {
        let mut known = 0;
        for m in members.iter().map(|m| &m.id).chain([&root.id]) {
            let s = admin.settings(m).await.unwrap();
            known += usize::from(s.reported.is_some_and(|r| r.report.lan_endpoint.is_some()));
        }
        known == 21
    })
    .await;

    // Each of the twenty has an instruction waiting: taking it shows it polled, and when.
    let mut waiting = Vec::new();
    for m in &members {
        let view = admin
            .create_instruction(
                &m.id,
                &CreateInstruction {
                    name: "ping".into(),
                    ..CreateInstruction::default()
                },
            )
            .await
            .unwrap();
        waiting.push(view.instruction_id);
    }

    // Nudges without a valid token are refused, and nothing polls.
    let forged = Nudge {
        nudge_id: "00112233445566778899aabbccddeeff".into(),
        not_after: UnixMillis(UnixMillis::now().0 + 60_000),
        node: NudgeNode {
            device_id: members[0].id.clone(),
            lan: members[0].lan.clone(),
            delay_ms: 0,
            token: "ab".repeat(32),
            children: vec![],
        },
    };
    let answer = lan::send(&members[0].lan, &forged).await.unwrap();
    assert!(matches!(answer, NudgeAnswer::Refused { .. }), "{answer:?}");
    let reason = wait_for_event(&mut members[0].events, SOON, |e| match e {
        AgentEvent::NudgeRefused { reason } => Some(reason.clone()),
        AgentEvent::NudgeAccepted { .. } => panic!("a forged nudge was accepted"),
        _ => None,
    })
    .await;
    assert!(reason.contains("token"), "{reason}");
    // Someone else's node (a valid shape, sent to the wrong device) is refused too.
    let mut misdirected = forged.clone();
    misdirected.node.device_id = members[1].id.clone();
    let answer = lan::send(&members[0].lan, &misdirected).await.unwrap();
    assert!(matches!(answer, NudgeAnswer::Refused { .. }), "{answer:?}");
    for (m, id) in members.iter().zip(&waiting) {
        assert_eq!(
            state_of(&admin, &m.id, id).await.0,
            InstructionState::Waiting
        );
    }

    // The real thing, through the root's mailbox.
    let mut all: Vec<DeviceId> = members.iter().map(|m| m.id.clone()).collect();
    all.push(root.id.clone());
    let plan = admin
        .poll_now(
            "acme",
            &PollNow {
                devices: Some(all),
                via: PollNowVia::Lan,
                root: Some(root.id.clone()),
                fanout: Some(3),
                stagger_ms: Some(STAGGER_MS),
                ttl_secs: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(plan.root.as_ref(), Some(&root.id));
    assert!(plan.hinted.is_empty());
    assert_eq!(plan.schedule.len(), 21);
    assert!(plan.schedule.iter().all(|p| p.children.len() <= 3));
    assert_eq!(plan.schedule[0].device_id, root.id);
    let depth_of = |id: &DeviceId| {
        let mut depth = 0;
        let mut at = id.clone();
        while let Some(parent) = plan.schedule.iter().find(|p| p.children.contains(&at)) {
            depth += 1;
            at = parent.device_id.clone();
        }
        depth
    };
    assert_eq!(
        plan.schedule.iter().map(|p| depth_of(&p.device_id)).max(),
        Some(3),
        "21 devices with fanout 3 make a tree three levels below the root"
    );

    eventually(SOON, "all twenty took their instruction", || async {
        let mut taken = 0;
        for (m, id) in members.iter().zip(&waiting) {
            taken += usize::from(state_of(&admin, &m.id, id).await.0 == InstructionState::Taken);
        }
        taken == 20
    })
    .await;
    for (m, id) in members.iter().zip(&waiting) {
        let delay = plan
            .schedule
            .iter()
            .find(|p| p.device_id == m.id)
            .unwrap()
            .delay_ms;
        let taken_at = state_of(&admin, &m.id, id).await.1.unwrap();
        let after = taken_at.0 - plan.created_at.0;
        assert!(
            after >= u64::from(delay) && after < u64::from(delay + STAGGER_MS),
            "device {} polled {after} ms after the plan; its window is [{delay}, {})",
            m.id,
            delay + STAGGER_MS
        );
    }
    for m in members {
        m.agent.stop().await.unwrap();
    }
}

async fn state_of(
    admin: &admin_client::AdminClient,
    device: &DeviceId,
    id: &InstructionId,
) -> (InstructionState, Option<UnixMillis>) {
    let list = admin.instructions(device).await.unwrap();
    let i = list.iter().find(|i| i.instruction_id == *id).unwrap();
    (i.state, i.taken_at)
}
