//! A small fleet under load with a link-cut fault: zero jobs lost and zero run twice, as
//! decided from the cloud's records against what the devices saw; the cut devices keep
//! working through the data channel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use device_sim::fleet::{Fault, FleetConfig};
use e2e_tests::InProcessBridge;

/// A small fleet against `ep`; `adjust` sets the run's size and fault.
fn fleet(
    ep: &e2e_tests::Endpoints,
    label: &str,
    adjust: impl FnOnce(&mut FleetConfig),
) -> FleetConfig {
    let mut cfg = FleetConfig::new(
        &ep.admin,
        ep.admin_token.clone(),
        &ep.data_url,
        Some(ep.mqtt.clone()),
    );
    cfg.label = label.into();
    cfg.load.drain = Duration::from_secs(40);
    adjust(&mut cfg);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_devices_with_cut_links_lose_nothing_and_run_nothing_twice() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let cfg = fleet(ep, "test-fleet", |cfg| {
        cfg.devices = 50;
        cfg.load.rate = 40.0;
        cfg.load.duration = Duration::from_secs(6);
        cfg.device.job_time = Duration::from_millis(20);
        cfg.device.long_poll = Duration::from_secs(2);
        cfg.faults.cut_mqtt = Some(Fault {
            share: 0.2,
            at: Duration::from_secs(1),
            length: Duration::from_secs(3),
        });
    });
    let report = device_sim::fleet::run(cfg).await.unwrap();
    eprintln!("{}", report.to_markdown());

    assert_eq!(report.devices_connected, 50);
    assert!(
        report.jobs_acknowledged >= 200,
        "{} acknowledged",
        report.jobs_acknowledged
    );
    assert_eq!(report.jobs_lost, 0);
    assert_eq!(report.jobs_duplicated, 0);
    assert_eq!(report.jobs_completed, report.jobs_acknowledged);
    assert!(
        report.fallback_share > 0.0,
        "cut devices should have fetched without hints"
    );
    assert!(report.submit_to_complete.count > 0 && report.submit_to_complete.p50_ms > 0.0);
    assert_eq!(report.faults.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_restarted_devices_lose_nothing_and_print_nothing_twice() {
    // A short lease, so jobs held by killed devices come back within the drain window.
    let bridge = InProcessBridge::start_with(|c| c.jobs.lease_secs = 2).await;
    let ep = &bridge.endpoints;
    let cfg = fleet(ep, "test-restart", |cfg| {
        cfg.devices = 30;
        cfg.load.rate = 30.0;
        cfg.load.duration = Duration::from_secs(5);
        // Long enough that a kill lands in the middle of some prints.
        cfg.device.job_time = Duration::from_millis(300);
        cfg.faults.restart_devices = Some(Fault {
            share: 0.3,
            at: Duration::from_secs(2),
            length: Duration::from_secs(1),
        });
    });
    let report = device_sim::fleet::run(cfg).await.unwrap();
    eprintln!("{}", report.to_markdown());

    assert_eq!(report.jobs_lost, 0);
    assert_eq!(report.jobs_duplicated, 0);
    assert_eq!(report.jobs_completed, report.jobs_acknowledged);
    assert!(
        report.faults.iter().any(|f| f.contains("9 devices killed")),
        "{:?}",
        report.faults
    );
}
