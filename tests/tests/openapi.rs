#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The OpenAPI document is what the bridge serves and what it enforces: the document served at
//! `/v1/openapi.json` is the one built from the declarations (the committed `openapi.json` is
//! held equal to it in `schemas/tests/openapi.rs`), and schemathesis runs every one of its
//! checks against a live bridge, with a device, a job, a user and the rest to find
//! (`tests/api/schemathesis.toml`; `scripts/test.sh` installs schemathesis).

use std::fmt::Write as _;
use std::process::Stdio;
use std::time::Duration;

use e2e_tests::{Device, InProcessBridge};
use schemas::Secret;
use schemas::admin::GetOpenApi;
use schemas::api::{
    ApplyForService, CreateCompanion, CreateService, CreateUser, SubmitHeldJob, SubmitJob,
};

const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/api/schemathesis.toml");
/// Examples per operation ("a few hundred"); `API_EXAMPLES` sets another number.
const EXAMPLES: &str = "300";
/// The seed, so that a failure in CI can be replayed; `API_SEED` sets another.
const SEED: &str = "20261203";
/// Well above what a run takes on a loaded 2-core machine (about 2 minutes idle).
const RUN_LIMIT: Duration = Duration::from_secs(20 * 60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_document_is_the_built_one_and_schemathesis_passes_every_check() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let admin = ep.client();
    let served = admin.call::<GetOpenApi>(&(), &(), &()).await.unwrap();
    assert!(
        served == schemas::openapi::document(),
        "the bridge serves another document than the one built from the declarations"
    );

    // Something for each kind of path parameter to name.
    let device = ep
        .online_device("SN-API", Device::simulated(), |_| {})
        .await;
    let model = admin.device(&device.id).await.unwrap().model;
    let (job, _) = admin
        .submit_job(
            &device.id,
            &SubmitJob {
                payload: Some("for the API test".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    admin
        .create_service(&CreateService {
            service_id: "toner".into(),
            name: "Toner delivery".into(),
            models: vec![model],
            kind: Some("toner".into()),
            data_types: Some(vec!["level".into()]),
            report_every_secs: Some(3600),
        })
        .await
        .unwrap();
    let application = admin
        .apply_for_service(
            "acme",
            &ApplyForService {
                service_id: "toner".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let user = admin
        .create_user(&CreateUser {
            name: "Ada".into(),
            pin: Secret::new("2468"),
        })
        .await
        .unwrap();
    admin
        .submit_held(
            &user.user_id,
            &SubmitHeldJob {
                payload: Some("held".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let owner = admin.create_owner("Bo").await.unwrap();
    let companion = admin
        .with_token(owner.token.clone())
        .call::<schemas::admin::CreateCompanionOp>(
            &(),
            &(),
            &CreateCompanion {
                name: "Bo's phone".into(),
            },
        )
        .await
        .unwrap();
    let ops = admin.create_ops_login("dashboard").await.unwrap();

    let dictionaries = [
        ("devices", device.id.to_string()),
        ("jobs", job.job_id.to_string()),
        ("services", "toner".to_owned()),
        ("customers", "acme".to_owned()),
        ("applications", application.application_id.to_string()),
        ("users", user.user_id.to_string()),
        ("companions", companion.companion_id.to_string()),
        ("ops", ops.ops_id.to_string()),
    ];
    // Which parameter names which kind of record, by path.
    let bindings = [
        (r"^/v1/devices/\\{id\\}", "path.id", "devices"),
        (r"\\{device\\}", "path.device", "devices"),
        (r"^/v1/jobs/\\{id\\}", "path.id", "jobs"),
        (r"^/v1/services/\\{id\\}", "path.id", "services"),
        (r"\\{service\\}", "path.service", "services"),
        (r"\\{customer\\}", "path.customer", "customers"),
        (r"^/v1/applications/\\{id\\}", "path.id", "applications"),
        (r"^/v1/users/\\{id\\}", "path.id", "users"),
        (r"^/v1/companions/\\{id\\}", "path.id", "companions"),
        (r"^/v1/ops-logins/\\{id\\}", "path.id", "ops"),
    ];
    let mut config = std::fs::read_to_string(CONFIG).unwrap();
    for (name, value) in dictionaries {
        writeln!(config, "\n[dictionaries.{name}]\nvalues = [\"{value}\"]").unwrap();
    }
    writeln!(
        config,
        "\n[parameters]\n\"body.to\" = {{ dictionary = \"devices\", probability = 0.8 }}\n\
         \"body.service_id\" = {{ dictionary = \"services\", probability = 0.8 }}\n\
         \"query.service\" = {{ dictionary = \"services\", probability = 0.8 }}"
    )
    .unwrap();
    for (path, parameter, dictionary) in bindings {
        writeln!(
            config,
            "\n[[operations]]\ninclude-path-regex = \"{path}\"\n\
             parameters = {{ \"{parameter}\" = {{ dictionary = \"{dictionary}\", probability = 0.8 }} }}"
        )
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("schemathesis.toml");
    std::fs::write(&config_path, config).unwrap();

    let examples = std::env::var("API_EXAMPLES").unwrap_or_else(|_| EXAMPLES.into());
    let seed = std::env::var("API_SEED").unwrap_or_else(|_| SEED.into());
    let run = tokio::process::Command::new("python3")
        .args(["-m", "schemathesis.cli", "--no-color", "--config-file"])
        .arg(&config_path)
        .args(["run", &format!("{}/v1/openapi.json", ep.admin)])
        .args([
            "--checks",
            "all",
            "--max-examples",
            &examples,
            "--seed",
            &seed,
        ])
        .args(["--workers", "2", "--report", "json", "--report-json-path"])
        .arg(dir.path().join("report.json"))
        .arg("-H")
        .arg(format!("Authorization: Bearer {}", ep.admin_token.expose()))
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(RUN_LIMIT, run)
        .await
        .expect("schemathesis did not finish in time")
        .expect("python3 runs (scripts/test.sh installs tests/api/requirements.txt)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "schemathesis failed (replay with API_SEED={seed}):\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // A run that tested nothing would also end well: every operation was tested (schemathesis
    // may leave out the document's own `GET /v1/openapi.json`), with no failure and no error.
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap()).unwrap();
    let operations = &report["operations"];
    let declared = served["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len() as u64)
        .sum::<u64>();
    let tested = operations["tested"].as_u64().unwrap();
    assert!(
        report["complete"] == true
            && tested == operations["selected"].as_u64().unwrap()
            && tested + 1 >= declared,
        "not every operation was tested ({declared} declared): {operations}\n{stdout}"
    );
    assert_eq!(report["failures"], serde_json::json!([]), "{stdout}");
    assert_eq!(report["errors"], serde_json::json!([]), "{stdout}");
}
