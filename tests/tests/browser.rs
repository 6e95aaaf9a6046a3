#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The console in a real browser: `tests/browser/console.mjs` drives Debian's Chromium with
//! Playwright against this bridge and two simulated devices, one that prints (slowly, so a job
//! can be watched on its way) and one that is offline (its jobs stay queued). Its screenshots
//! are left in `target/console-screenshots/`. `scripts/test.sh` installs Chromium and the
//! script's packages (`npm ci` in `tests/browser`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use device_sim::executor::SimulatedExecutor;
use e2e_tests::{Device, InProcessBridge};
use schemas::Secret;
use schemas::api::{ApplyForService, CreateService, CreateUser, SubmitHeldJob};

const SCRIPT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/browser");
const SHOTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/console-screenshots");
/// Well above a run on a loaded 2-core machine (about 15 s idle).
const RUN_LIMIT: Duration = Duration::from_secs(5 * 60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_in_chromium() {
    assert!(
        Path::new(SCRIPT_DIR)
            .join("node_modules/playwright-core")
            .exists(),
        "run `npm ci` in tests/browser first (scripts/test.sh does)"
    );
    // Screenshots of an earlier run must not pass for this one's.
    let _ = std::fs::remove_dir_all(SHOTS);
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let slow = Arc::new(SimulatedExecutor {
        duration: Duration::from_secs(3),
        ..SimulatedExecutor::default()
    });
    let live = ep.online_device("SN-CONSOLE", slow, |_| {}).await;
    let idle = ep
        .online_device("SN-IDLE", Device::simulated(), |_| {})
        .await;
    let idle_id = idle.id.clone();
    idle.agent.stop().await.unwrap();
    let client = ep.client();
    let ops = client.create_ops_login("console test").await.unwrap();
    // An application of a service to the printing device, and a user with a held job.
    let service = CreateService {
        service_id: "toner".into(),
        name: "Toner delivery".into(),
        models: vec![live.config.info.model.clone()],
        ..CreateService::default()
    };
    client.create_service(&service).await.unwrap();
    let apply = ApplyForService {
        service_id: "toner".into(),
        devices: Some(vec![live.id.clone()]),
        ..ApplyForService::default()
    };
    client.apply_for_service("acme", &apply).await.unwrap();
    let user = CreateUser {
        name: "Ana".into(),
        pin: Secret::new("2468"),
    };
    let user = client.create_user(&user).await.unwrap();
    let held = SubmitHeldJob {
        title: Some("quarterly report".into()),
        payload: Some("%PDF".into()),
        ..SubmitHeldJob::default()
    };
    client.submit_held(&user.user_id, &held).await.unwrap();

    let mut child = tokio::process::Command::new("node")
        .arg("console.mjs")
        .current_dir(SCRIPT_DIR)
        .env("CONSOLE_URL", format!("{}/console/", ep.admin))
        .env("ADMIN_TOKEN", ep.admin_token.expose())
        .env("OPS_ID", ops.ops_id.as_str())
        .env("OPS_PASSWORD", ops.password.expose())
        .env("LIVE_DEVICE", live.id.as_str())
        .env("LIVE_SERIAL", "SN-CONSOLE")
        .env("IDLE_DEVICE", idle_id.as_str())
        .env("SCREENSHOTS", SHOTS)
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let status = tokio::time::timeout(RUN_LIMIT, child.wait())
        .await
        .expect("the browser run ends in time")
        .unwrap();
    assert!(status.success(), "the browser checks failed: {status}");
    for screen in [
        "sign-in",
        "overview",
        "devices",
        "device",
        "job",
        "events",
        "applications",
        "held",
    ] {
        assert!(
            Path::new(SHOTS).join(format!("{screen}.png")).exists(),
            "no screenshot of {screen}"
        );
    }
}
