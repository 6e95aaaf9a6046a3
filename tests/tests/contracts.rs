//! Contracts and support services: a device with two contracted services, one disabled at the
//! device, activates only the other and sends it exactly the data types it asked for when a
//! cartridge crosses a threshold; a canceled contract stops the telemetry from the next sync;
//! contracting another provider of the same kind redirects it, without touching the device.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use device_sim::consumables::{Cartridge, Consumables};
use device_sim::{AgentEvent, SimulatedExecutor};
use e2e_tests::{Device, InProcessBridge, OpsWatcher, SOON, eventually, wait_for_event};
use schemas::api::{CreateService, PutContract, SubmitJob};
use schemas::ops::OpsEvent;
use schemas::outbox::DeviceRequest;
use tokio::sync::broadcast;

fn types(list: &[&str]) -> Vec<String> {
    list.iter().map(|t| t.to_string()).collect()
}

async fn wait_active(events: &mut broadcast::Receiver<AgentEvent>, service: &str) -> Vec<String> {
    wait_for_event(events, SOON, |e| match e {
        AgentEvent::SupportActivated {
            service_id,
            data_types,
        } if service_id == service => Some(data_types.clone()),
        AgentEvent::SupportActivated { service_id, .. } if service_id == "paper" => {
            panic!("paper is disabled at the device")
        }
        _ => None,
    })
    .await
}

async fn wait_queued(events: &mut broadcast::Receiver<AgentEvent>) -> (String, Vec<String>) {
    wait_for_event(events, SOON, |e| match e {
        AgentEvent::TelemetryQueued {
            service_id,
            data_types,
        } => Some((service_id.clone(), data_types.clone())),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_follows_the_contracts_and_the_devices_own_settings() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let admin = ep.client();
    let mut ops = OpsWatcher::start(ep).await;
    for (id, kind, wanted) in [
        (
            "toner-a",
            "consumables",
            types(&["cartridge_type", "colour", "level"]),
        ),
        ("toner-b", "consumables", types(&["level", "page_count"])),
        ("paper", "paper", types(&["paper_level"])),
    ] {
        admin
            .create_service(&CreateService {
                service_id: id.into(),
                name: id.into(),
                models: vec!["MFP-4000".into()],
                kind: Some(kind.into()),
                data_types: Some(wanted),
                report_every_secs: None,
            })
            .await
            .unwrap();
    }
    // One black cartridge at 25 %, 10 % per job: the first job crosses 20 %.
    let cartridges = Consumables::new(
        vec![Cartridge {
            colour: "black".into(),
            cartridge_type: "TN-900K".into(),
            level: 25,
        }],
        10,
        vec![20, 10, 0],
    );
    let executor = Arc::new(SimulatedExecutor {
        consumables: Some(cartridges.clone()),
        ..SimulatedExecutor::default()
    });
    let readings = cartridges.clone();
    let Device {
        agent,
        mut events,
        id,
        ..
    } = ep
        .online_device("SN-TONER", executor, move |c| {
            c.readings = Some(Arc::new(readings));
            c.support_services = BTreeMap::from([
                ("toner-a".into(), true),
                ("toner-b".into(), true),
                ("paper".into(), false),
            ]);
        })
        .await;
    let contract = |app: &str| PutContract {
        application_id: app.into(),
        outline: "automatic delivery".into(),
    };

    // Two contracts; paper is disabled at the device, so only toner-a is activated.
    admin
        .put_contract(&id, "paper", &contract("P-1"))
        .await
        .unwrap();
    admin
        .put_contract(&id, "toner-a", &contract("A-1"))
        .await
        .unwrap();
    let asked = wait_active(&mut events, "toner-a").await;
    assert_eq!(asked, types(&["cartridge_type", "colour", "level"]));
    let activated = ops
        .wait_for(SOON, |e| match e {
            OpsEvent::ServiceActivated { service_id, .. } => Some(service_id.clone()),
            _ => None,
        })
        .await;
    assert_eq!(activated, "toner-a");
    let contracts = admin.contracts(&id).await.unwrap();
    let paper = contracts.iter().find(|c| c.service_id == "paper").unwrap();
    assert_eq!(paper.activated_at, None);

    // A job drains the cartridge below 20 %: toner-a gets exactly its three types.
    admin
        .submit_job(
            &id,
            &SubmitJob {
                payload: Some("%PDF".into()),
                ..SubmitJob::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        wait_queued(&mut events).await,
        (
            "toner-a".into(),
            types(&["cartridge_type", "colour", "level"])
        )
    );
    let readings = ops
        .wait_for(SOON, |e| match e {
            OpsEvent::Telemetry {
                service_id,
                readings,
                ..
            } if service_id == "toner-a" => Some(readings.clone()),
            _ => None,
        })
        .await;
    assert_eq!(readings["level"], "15");
    assert_eq!(
        readings.keys().cloned().collect::<Vec<_>>(),
        types(&["cartridge_type", "colour", "level"])
    );

    // Canceled: the device stops at its next sync; a replaced cartridge is reported to nobody.
    admin.cancel_contract(&id, "toner-a").await.unwrap();
    wait_for_event(&mut events, SOON, |e| match e {
        AgentEvent::SupportDeactivated { service_id } if service_id == "toner-a" => Some(()),
        _ => None,
    })
    .await;
    cartridges.replace("black");
    let sent = agent
        .report_readings(BTreeMap::from([("level".into(), "100".into())]))
        .await
        .unwrap();
    assert!(sent.is_empty(), "nothing is active: {sent:?}");

    // Contracted again, then another provider of the same kind: the cloud cancels the first,
    // the device follows at its next sync, and the next event goes to the new provider with
    // its own data types.
    admin
        .put_contract(&id, "toner-a", &contract("A-2"))
        .await
        .unwrap();
    wait_active(&mut events, "toner-a").await;
    admin
        .put_contract(&id, "toner-b", &contract("B-1"))
        .await
        .unwrap();
    let asked = wait_active(&mut events, "toner-b").await;
    assert_eq!(asked, types(&["level", "page_count"]));
    let contracts = admin.contracts(&id).await.unwrap();
    let a = contracts
        .iter()
        .find(|c| c.service_id == "toner-a")
        .unwrap();
    assert_eq!(
        a.application_id, "",
        "switching provider canceled the first contract"
    );
    cartridges.replace("black");
    assert_eq!(
        wait_queued(&mut events).await,
        ("toner-b".into(), types(&["level", "page_count"]))
    );

    // What the cloud accepted, in order: toner-a's three types, then toner-b's two.
    eventually(SOON, "toner-b's telemetry accepted", || async {
        let log = admin.all_device_requests(&id).await.unwrap();
        log.iter()
            .any(|r| matches!(&r.body, DeviceRequest::Telemetry { service_id, .. } if service_id == "toner-b"))
    })
    .await;
    let log = admin.all_device_requests(&id).await.unwrap();
    let telemetry: Vec<(String, Vec<String>)> = log
        .into_iter()
        .filter_map(|r| match r.body {
            DeviceRequest::Telemetry {
                service_id,
                readings,
            } => Some((service_id, readings.into_keys().collect())),
            _ => None,
        })
        .collect();
    assert_eq!(
        telemetry,
        vec![
            (
                "toner-a".into(),
                types(&["cartridge_type", "colour", "level"])
            ),
            ("toner-b".into(), types(&["level", "page_count"])),
        ]
    );
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_service_is_also_sent_its_data_periodically() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let admin = ep.client();
    admin
        .create_service(&CreateService {
            service_id: "counter".into(),
            name: "Page counter reading".into(),
            models: vec!["MFP-4000".into()],
            kind: Some("counters".into()),
            data_types: Some(types(&["page_count"])),
            report_every_secs: Some(1),
        })
        .await
        .unwrap();
    let readings = Consumables::colour_printer();
    let Device {
        agent,
        mut events,
        id,
        ..
    } = ep
        .online_device("SN-COUNTER", Device::simulated(), move |c| {
            c.readings = Some(Arc::new(readings));
            c.support_services = BTreeMap::from([("counter".into(), true)]);
        })
        .await;
    admin
        .put_contract(
            &id,
            "counter",
            &PutContract {
                application_id: "C-1".into(),
                outline: String::new(),
            },
        )
        .await
        .unwrap();
    wait_active(&mut events, "counter").await;
    // No event happens on the device: two reports a second apart come from the schedule.
    let started = tokio::time::Instant::now();
    for _ in 0..2 {
        assert_eq!(
            wait_queued(&mut events).await,
            ("counter".into(), types(&["page_count"]))
        );
    }
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
    agent.stop().await.unwrap();
}
