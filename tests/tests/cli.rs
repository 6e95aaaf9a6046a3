//! The `cloud-bridge` command line: `config` prints defaults that `serve --config` accepts;
//! unknown keys and bad values stop the start with a message naming them; `export` writes every
//! record as JSON lines.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use e2e_tests::{BridgeProcess, SOON, bridge_binary, init_tracing};
use schemas::api::SubmitJob;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(bridge_binary()).args(args).output().unwrap()
}

#[test]
fn config_prints_defaults_and_bad_files_are_refused_by_name() {
    let out = run(&["config"]);
    assert!(out.status.success());
    let defaults = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        cloud_bridge::Config::from_toml(&defaults).unwrap(),
        cloud_bridge::Config::default()
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    for (text, named) in [
        ("[jobs]\nleas_secs = 5\n", "leas_secs"),
        ("[jobs]\nlease_secs = 0\n", "lease_secs"),
        ("[broker]\nmode = \"cluster\"\n", "cluster"),
    ] {
        std::fs::write(&bad, text).unwrap();
        let out = run(&[
            "serve",
            "--config",
            bad.to_str().unwrap(),
            "--data-dir",
            dir.path().to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "{text} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(named),
            "error for {text:?} does not name {named}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_writes_every_record_as_json_lines() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut bridge = BridgeProcess::start(dir.path(), &[]).await;
    let ep = bridge.endpoints.clone();
    let token = ep.enrollment_token(1).await;
    let (session, welcome) = device_sim::session::DataSession::connect(
        &ep.data_url,
        schemas::data::HelloAuth::Register(schemas::data::Registration {
            registration_id: None,
            enrollment_token: token,
            serial: "SN-EXPORT".into(),
            model: "m".into(),
            destination: "EU".into(),
            time_zone: "UTC".into(),
            owner: None,
        }),
        "test",
        Default::default(),
    )
    .await
    .unwrap();
    session.close();
    let job = SubmitJob {
        payload_base64: Some("AAEC/w==".into()),
        ..Default::default()
    };
    let (job, _) = ep
        .client()
        .submit_job(&welcome.device_id, &job)
        .await
        .unwrap();
    let owner = ep.client().create_owner("Anna").await.unwrap();
    ep.client()
        .with_token(owner.token)
        .create_companion("Anna's phone")
        .await
        .unwrap();
    let user = ep
        .client()
        .create_user(&schemas::api::CreateUser {
            name: "Ana".into(),
            pin: schemas::Secret::new("2468"),
        })
        .await
        .unwrap();
    ep.client()
        .submit_held(
            &user.user_id,
            &schemas::api::SubmitHeldJob {
                payload: Some("held".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    ep.client()
        .create_service(&schemas::api::CreateService {
            service_id: "toner".into(),
            name: "Toner".into(),
            models: vec!["MFP-4000".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    bridge.signal("TERM");
    assert!(bridge.wait_exit(SOON).await.success());

    let lines = e2e_tests::export(dir.path());
    let of = |t: &str| lines.iter().filter(|l| l["type"] == t).count();
    assert_eq!(
        (of("device"), of("enrollment"), of("job"), of("feed")),
        (1, 1, 1, 1)
    );
    assert_eq!((of("owner"), of("companion")), (1, 1));
    assert_eq!((of("user"), of("held_job"), of("service")), (1, 1, 1));
    let held = lines.iter().find(|l| l["type"] == "held_job").unwrap();
    assert_eq!(held["payload_base64"], "aGVsZA==");
    let user = lines.iter().find(|l| l["type"] == "user").unwrap();
    assert!(user.get("pin").is_none() && user["pin_sha256"].is_string());
    let companion = lines.iter().find(|l| l["type"] == "companion").unwrap();
    assert!(companion.get("token").is_none() && companion["token_sha256"].is_string());
    let exported = lines.iter().find(|l| l["type"] == "job").unwrap();
    assert_eq!(exported["job_id"], job.job_id.as_str());
    assert_eq!(exported["payload_base64"], "AAEC/w==");
    let device = lines.iter().find(|l| l["type"] == "device").unwrap();
    assert!(
        device.get("secret").is_none() && device["secret_sha256"].as_str().unwrap().len() == 64
    );
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_and_the_admin_token_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    let data = parent.path().join("var/data");
    let bridge = e2e_tests::InProcessBridge::start_with(|c| c.data_dir = data.clone()).await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&parent.path().join("var")), 0o700);
    assert_eq!(mode(&data.join("admin-token")), 0o600);
    drop(bridge);
}

#[test]
fn listening_beyond_loopback_without_tls_is_refused_unless_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&[
        "serve",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--admin-listen",
        "0.0.0.0:0",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("listen.admin")
            && stderr.contains("TLS")
            && stderr.contains("--allow-plaintext"),
        "{stderr}"
    );
}

#[test]
fn listen_addresses_may_be_host_names_and_a_failed_start_leaves_no_new_data_dir() {
    let parent = tempfile::tempdir().unwrap();
    let data = parent.path().join("data");
    // The embedded broker's port is taken: the start fails after the admin and data listeners
    // (given as host names) were bound.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mqtt = taken.local_addr().unwrap().to_string();
    let out = run(&[
        "serve",
        "--data-dir",
        data.to_str().unwrap(),
        "--admin-listen",
        "localhost:0",
        "--data-listen",
        "localhost:0",
        "--mqtt-listen",
        &mqtt,
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&mqtt), "{stderr}");
    assert!(
        !data.exists(),
        "a failed start left {} behind",
        data.display()
    );
    // A name that does not resolve is refused by name.
    let out = run(&["serve", "--admin-listen", "no-such-host.invalid:80"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no-such-host.invalid"), "{stderr}");
}

#[test]
fn tls_init_writes_a_ca_and_a_certificate_and_keeps_existing_ones() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let out = run(&[
        "tls",
        "init",
        "--data-dir",
        data,
        "--name",
        "printers.example",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("--tls-cert") && printed.contains("ca.pem"),
        "{printed}"
    );
    let tls_dir = dir.path().join("tls");
    tls::server_config(&tls_dir.join("server.pem"), &tls_dir.join("server-key.pem")).unwrap();
    tls::client_config(Some(&tls_dir.join("ca.pem"))).unwrap();
    let again = run(&["tls", "init", "--data-dir", data]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
}
