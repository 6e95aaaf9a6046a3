//! Store-and-forward and consent: what a device asks for while offline reaches the cloud once
//! and in order; device information leaves the device only with the user's consent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use device_sim::{AgentEvent, AgentHandle, MemoryStateStore, Submitted};
use e2e_tests::{
    Device, Endpoints, InProcessBridge, OpsWatcher, SOON, TcpProxy, socket_addr, wait_for_event,
    wait_reported,
};
use schemas::api::SubmitJob;
use schemas::data::{DeviceState, DeviceStatus};
use schemas::job::JobState;
use schemas::ops::OpsEvent;
use schemas::outbox::{DeviceRequest, RequestNo};
use schemas::records::DeviceRequestRecord;
use tokio::sync::broadcast;

/// Both of a device's links run through proxies the test can cut.
struct Links {
    data: TcpProxy,
    mqtt: TcpProxy,
}

impl Links {
    async fn start(ep: &Endpoints) -> Links {
        Links {
            data: TcpProxy::start(socket_addr(&ep.data_url)).await.unwrap(),
            mqtt: TcpProxy::start(format!("{}:{}", ep.mqtt.0, ep.mqtt.1).parse().unwrap())
                .await
                .unwrap(),
        }
    }

    fn adjust(&self) -> impl FnOnce(&mut device_sim::AgentConfig) + '_ {
        move |c| {
            c.endpoints.data = vec![format!("ws://{}", self.data.addr)];
            c.endpoints.mqtt = vec![self.mqtt.addr.to_string()];
        }
    }

    fn cut(&self) {
        self.data.cut();
        self.mqtt.cut();
    }

    fn restore(&self) {
        self.data.restore();
        self.mqtt.restore();
    }
}

async fn wait_delivered(events: &mut broadcast::Receiver<AgentEvent>, no: RequestNo) {
    wait_for_event(events, SOON, |e| match e {
        AgentEvent::RequestDelivered { no: n, .. } if *n == no => Some(()),
        AgentEvent::RequestRefused { no: n, error } if *n == no => panic!("refused: {error}"),
        _ => None,
    })
    .await
}

async fn go_offline(links: &Links, events: &mut broadcast::Receiver<AgentEvent>) {
    links.cut();
    wait_for_event(events, SOON, |e| {
        matches!(e, AgentEvent::MqttDown(_)).then_some(())
    })
    .await;
}

fn status(detail: &str) -> DeviceStatus {
    DeviceStatus {
        state: DeviceState::Idle,
        detail: detail.into(),
        observed_at: schemas::UnixMillis::now(),
    }
}

async fn queued(agent: &AgentHandle, status_detail: &str) -> RequestNo {
    match agent.report_status(status(status_detail)).await.unwrap() {
        Submitted::Queued(no) => no,
        other => panic!("expected the status to be queued, got {other:?}"),
    }
}

fn statuses(log: &[DeviceRequestRecord]) -> Vec<String> {
    log.iter()
        .filter_map(|r| match &r.body {
            DeviceRequest::Status { status } => Some(status.detail.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_offline_requests_are_acted_on_once_and_in_order() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let links = Links::start(ep).await;
    let Device {
        agent,
        mut events,
        id: device,
        store,
        config,
    } = ep
        .online_device("SN-OUTBOX", Device::simulated(), links.adjust())
        .await;
    // What the cloud does with a panel request is announce it to the services: counted here.
    let mut ops = OpsWatcher::start(ep).await;

    go_offline(&links, &mut events).await;
    let mut last = RequestNo::ZERO;
    for n in 0..100 {
        let params = BTreeMap::from([("n".to_owned(), n.to_string())]);
        match agent.panel_request("scan_to_cloud", params).await.unwrap() {
            Submitted::Queued(no) => last = no,
            other => panic!("panel request not queued: {other:?}"),
        }
    }
    agent.kill();
    let before_delivery = store.snapshot().unwrap();
    assert!(before_delivery.outbox.len() >= 100);

    // Restarted and back online: the outbox goes out.
    links.restore();
    let agent = device_sim::start(config.clone(), Device::simulated(), store.clone());
    let mut events = agent.subscribe();
    wait_delivered(&mut events, last).await;
    assert!(store.snapshot().unwrap().outbox.is_empty());
    agent.kill();

    // As if the device had crashed after sending and before recording it: the same 100 are
    // sent again. The cloud acknowledges them without acting twice.
    let replay = MemoryStateStore::from_state(before_delivery);
    let agent = device_sim::start(config, Device::simulated(), replay.clone());
    let mut events = agent.subscribe();
    wait_delivered(&mut events, last).await;
    assert!(replay.snapshot().unwrap().outbox.is_empty());
    // A last request marks the end of the announcements (they are published in order).
    let Submitted::Queued(sentinel) = agent
        .panel_request("sentinel", BTreeMap::new())
        .await
        .unwrap()
    else {
        panic!("sentinel not queued")
    };
    let mut announced = Vec::new();
    ops.wait_for(SOON, |e| match e {
        OpsEvent::DeviceRequest { no, .. } if *no == sentinel => Some(()),
        OpsEvent::DeviceRequest { no, .. } => {
            announced.push(no.0);
            None
        }
        _ => None,
    })
    .await;
    assert_eq!(announced.len(), 100, "announced {announced:?}");
    assert!(announced.windows(2).all(|w| w[0] < w[1]), "{announced:?}");

    let log = ep.client().all_device_requests(&device).await.unwrap();
    let panel: Vec<(u64, String)> = log
        .iter()
        .filter_map(|r| match &r.body {
            DeviceRequest::PanelJob { action, params } if action == "scan_to_cloud" => {
                Some((r.no.0, params["n"].clone()))
            }
            _ => None,
        })
        .collect();
    let expected: Vec<String> = (0..100).map(|n| n.to_string()).collect();
    assert_eq!(
        panel.iter().map(|(_, n)| n.clone()).collect::<Vec<_>>(),
        expected,
        "each request once, in the order made"
    );
    assert!(panel.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(
        ep.client()
            .device(&device)
            .await
            .unwrap()
            .requests_delivered,
        sentinel
    );
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_information_leaves_the_device_only_with_consent() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let client = ep.client();
    let links = Links::start(ep).await;
    let adjust = links.adjust();
    let Device {
        agent,
        mut events,
        id: device,
        ..
    } = ep
        .online_device("SN-CONSENT", Device::simulated(), |c| {
            adjust(c);
            c.consent_at_setup = false;
        })
        .await;
    let job = SubmitJob {
        payload: Some("a job runs without consent".into()),
        ..Default::default()
    };

    // Online, consent off: status stays on the device, jobs run.
    assert_eq!(
        agent
            .report_status(status("online, no consent"))
            .await
            .unwrap(),
        Submitted::Withheld
    );
    let (first, _) = client.submit_job(&device, &job).await.unwrap();
    wait_reported(&mut events, &first.job_id).await;
    let view = client.device(&device).await.unwrap();
    assert_eq!(view.consent.map(|c| c.granted), Some(false));

    // Offline: more status collected without consent, then consent given at the panel.
    go_offline(&links, &mut events).await;
    let (second, _) = client.submit_job(&device, &job).await.unwrap();
    assert_eq!(
        agent
            .report_status(status("offline, no consent"))
            .await
            .unwrap(),
        Submitted::Withheld
    );
    let consent = agent.set_consent(true).await.unwrap();
    assert!(consent.granted);
    assert_eq!(agent.consent().await.unwrap(), Some(consent));
    queued(&agent, "offline, after consent").await;
    let last = queued(&agent, "still offline, after consent").await;

    links.restore();
    wait_delivered(&mut events, last).await;
    wait_reported(&mut events, &second.job_id).await;
    for id in [&first.job_id, &second.job_id] {
        assert_eq!(client.job(id).await.unwrap().state, JobState::Succeeded);
    }
    let log = client.all_device_requests(&device).await.unwrap();
    assert_eq!(
        statuses(&log),
        ["offline, after consent", "still offline, after consent"],
        "only what was collected after consent was given"
    );
    let view = client.device(&device).await.unwrap();
    assert_eq!(
        view.last_status.map(|s| s.detail).as_deref(),
        Some("still offline, after consent")
    );
    let changes: Vec<_> = view
        .consent_changes
        .iter()
        .map(|c| (c.granted, c.changed_at))
        .collect();
    assert_eq!(changes.len(), 2);
    assert!(!changes[0].0, "first recorded: consent off at set-up");
    assert_eq!(changes[1], (true, consent.changed_at));

    // The cloud asks for the consent state; the device answers through its outbox.
    let recorded = view.consent.unwrap().recorded_at;
    client.query_consent(&device).await.unwrap();
    wait_for_event(&mut events, SOON, |e| {
        matches!(
            e,
            AgentEvent::RequestDelivered {
                kind: "consent",
                ..
            }
        )
        .then_some(())
    })
    .await;
    let asked = client.device(&device).await.unwrap().consent.unwrap();
    assert!(asked.granted);
    assert_eq!(asked.changed_at, consent.changed_at);
    assert!(asked.recorded_at >= recorded);
    assert_eq!(
        client.device(&device).await.unwrap().consent_changes.len(),
        2,
        "a report without a change is not a change"
    );

    // Withdrawn again: nothing more leaves.
    agent.set_consent(false).await.unwrap();
    assert_eq!(
        agent.report_status(status("withdrawn")).await.unwrap(),
        Submitted::Withheld
    );
    agent.stop().await.unwrap();
}
