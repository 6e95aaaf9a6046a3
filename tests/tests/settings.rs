//! Server settings from outside and endpoint fallback: the owner points a device at other
//! endpoints through the API (an entry in its feed); the device applies them, keeps them across
//! a crash, and reports what it uses. With its first endpoint down each channel works through
//! its second, on its own, and returns to the first once it answers again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use admin_client::{AdminClient, ClientError};
use device_sim::AgentEvent;
use e2e_tests::{
    Device, InProcessBridge, SOON, TcpProxy, eventually, socket_addr, wait_for_event, wait_reported,
};
use hyper::StatusCode;
use schemas::api::SubmitJob;
use schemas::data::{ErrorCode, OwnerClaim};
use schemas::settings::Endpoints;
use schemas::{DeviceId, Secret};
use tokio::sync::broadcast;

fn ws(proxy: &TcpProxy) -> String {
    format!("ws://{}", proxy.addr)
}

fn broker(proxy: &TcpProxy) -> String {
    proxy.addr.to_string()
}

async fn run_job(
    api: &AdminClient,
    events: &mut broadcast::Receiver<AgentEvent>,
    device: &DeviceId,
) {
    let (job, _) = api
        .submit_job(
            device,
            &SubmitJob {
                payload: Some("%PDF-1.7".into()),
                ..SubmitJob::default()
            },
        )
        .await
        .unwrap();
    wait_reported(events, &job.job_id).await;
}

async fn wait_mqtt_on(events: &mut broadcast::Receiver<AgentEvent>, endpoint: &str) {
    wait_for_event(events, SOON, |e| match e {
        AgentEvent::MqttUp { endpoint: e } if e == endpoint => Some(()),
        _ => None,
    })
    .await
}

async fn wait_data_on(events: &mut broadcast::Receiver<AgentEvent>, endpoint: &str) {
    wait_for_event(events, SOON, |e| match e {
        AgentEvent::DataUp { endpoint: e } if e == endpoint => Some(()),
        _ => None,
    })
    .await
}

fn refusal(result: Result<impl std::fmt::Debug, ClientError>) -> (StatusCode, ErrorCode) {
    match result {
        Err(ClientError::Api { status, error }) => (status, error.code),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_pushed_through_the_feed_are_applied_kept_and_reported() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let admin = ep.client();
    let anna = admin.create_owner("Anna").await.unwrap();
    let as_anna = admin.with_token(anna.token.clone());
    let bo = admin.create_owner("Bo").await.unwrap();
    let as_bo = admin.with_token(bo.token.clone());
    let claim = OwnerClaim {
        owner_id: anna.owner_id.clone(),
        pin: Secret::new("2468"),
    };
    let Device {
        agent,
        mut events,
        id,
        store,
        config,
    } = ep
        .online_device("SN-SETTINGS", Device::simulated(), |c| {
            c.owner = Some(claim.clone());
        })
        .await;
    let data = TcpProxy::start(socket_addr(&ep.data_url)).await.unwrap();
    let mqtt = TcpProxy::start(format!("{}:{}", ep.mqtt.0, ep.mqtt.1).parse().unwrap())
        .await
        .unwrap();
    let moved = Endpoints {
        data: vec![ws(&data)],
        mqtt: vec![broker(&mqtt)],
    };

    // Refused, and nothing reaches the device: another owner, a companion, bad endpoints.
    let newest_before = admin.device(&id).await.unwrap().feed_newest;
    let (status, code) = refusal(as_bo.set_settings(&id, &moved).await);
    assert_eq!(
        (status, code),
        (StatusCode::FORBIDDEN, ErrorCode::Forbidden)
    );
    let phone = as_anna.create_companion("phone").await.unwrap();
    let as_phone = admin.with_token(phone.token.clone());
    let (status, _) = refusal(as_phone.set_settings(&id, &moved).await);
    assert_eq!(status, StatusCode::FORBIDDEN);
    // No data endpoint is outside the schema (400); a URL that does not parse is a value the
    // schema cannot judge (422).
    for (bad, expected) in [
        (
            Endpoints {
                data: vec![],
                mqtt: vec![broker(&mqtt)],
            },
            (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
        ),
        (
            Endpoints {
                data: vec!["http://example.com:80".into()],
                mqtt: vec![],
            },
            (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::InvalidValue),
        ),
        (
            Endpoints {
                data: vec![ws(&data)],
                mqtt: vec!["no-port".into()],
            },
            (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::InvalidValue),
        ),
    ] {
        let (status, code) = refusal(as_anna.set_settings(&id, &bad).await);
        assert_eq!((status, code), expected, "{bad:?}");
    }
    assert_eq!(admin.device(&id).await.unwrap().feed_newest, newest_before);
    assert!(as_anna.settings(&id).await.unwrap().desired.is_none());

    // The owner moves the device to other endpoints.
    let view = as_anna.set_settings(&id, &moved).await.unwrap();
    let desired = view.desired.unwrap();
    assert_eq!(desired.revision, 1);
    assert_eq!(desired.set_by, format!("owner:{}", anna.owner_id));
    wait_for_event(&mut events, SOON, |e| {
        (*e == AgentEvent::SettingsApplied { revision: 1 }).then_some(())
    })
    .await;
    wait_mqtt_on(&mut events, &broker(&mqtt)).await;
    // The cloud is told which endpoints are in use, and work goes through them.
    eventually(
        SOON,
        "the device reports the new endpoints in use",
        || async {
            let view = as_anna.settings(&id).await.unwrap();
            view.applied
                && view.reported.is_some_and(|r| {
                    r.report.revision == 1
                        && r.report.endpoints == moved
                        && r.report.data_in_use == Some(ws(&data))
                        && r.report.mqtt_in_use == Some(broker(&mqtt))
                })
        },
    )
    .await;
    run_job(&admin, &mut events, &id).await;
    assert_eq!(mqtt.open_connections(), 1);
    assert!(data.open_connections() >= 1);

    // Kept across a crash: restarted with its factory configuration, it still uses them.
    agent.kill();
    let agent = device_sim::start(config, Device::simulated(), store.clone());
    let mut events = agent.subscribe();
    wait_mqtt_on(&mut events, &broker(&mqtt)).await;
    run_job(&admin, &mut events, &id).await;
    let in_use = agent.settings_in_use().await.unwrap();
    assert_eq!(in_use.revision, 1);
    assert_eq!(in_use.endpoints, moved);
    assert_eq!(in_use.mqtt_in_use, Some(broker(&mqtt)));

    // A mistyped setting cannot cut the device off: while none of the new endpoints has
    // answered, the ones used before are tried after them.
    let dead = TcpProxy::start(socket_addr(&ep.data_url)).await.unwrap();
    dead.cut();
    let wrong = Endpoints {
        data: vec![ws(&dead)],
        mqtt: vec![broker(&dead)],
    };
    as_anna.set_settings(&id, &wrong).await.unwrap();
    wait_for_event(&mut events, SOON, |e| {
        (*e == AgentEvent::SettingsApplied { revision: 2 }).then_some(())
    })
    .await;
    wait_mqtt_on(&mut events, &broker(&mqtt)).await;
    run_job(&admin, &mut events, &id).await;
    eventually(
        SOON,
        "revision 2 reported, working through the old endpoints",
        || async {
            let view = as_anna.settings(&id).await.unwrap();
            view.applied
                && view.reported.is_some_and(|r| {
                    r.report.revision == 2
                        && r.report.endpoints.data == vec![ws(&dead), ws(&data)]
                        && r.report.data_in_use == Some(ws(&data))
                        && r.report.mqtt_in_use == Some(broker(&mqtt))
                })
        },
    )
    .await;

    // No broker at all: the device drops MQTT and long-polls the data channel.
    let data_only = Endpoints {
        data: vec![ws(&data)],
        mqtt: vec![],
    };
    as_anna.set_settings(&id, &data_only).await.unwrap();
    wait_for_event(&mut events, SOON, |e| {
        (*e == AgentEvent::SettingsApplied { revision: 3 }).then_some(())
    })
    .await;
    run_job(&admin, &mut events, &id).await;
    let in_use = agent.settings_in_use().await.unwrap();
    assert_eq!((in_use.revision, in_use.mqtt_in_use), (3, None));
    assert!(in_use.endpoints.mqtt.is_empty());
    eventually(SOON, "the MQTT link closed", || async {
        mqtt.open_connections() == 0
    })
    .await;
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_channel_falls_back_to_its_second_endpoint_and_returns_to_the_first() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let admin = ep.client();
    let data_target = socket_addr(&ep.data_url);
    let mqtt_target = format!("{}:{}", ep.mqtt.0, ep.mqtt.1).parse().unwrap();
    let data_1 = TcpProxy::start(data_target).await.unwrap();
    let data_2 = TcpProxy::start(data_target).await.unwrap();
    let mqtt_1 = TcpProxy::start(mqtt_target).await.unwrap();
    let mqtt_2 = TcpProxy::start(mqtt_target).await.unwrap();
    // The first endpoints are down when the device starts.
    data_1.cut();
    mqtt_1.cut();
    let Device {
        agent,
        mut events,
        id,
        ..
    } = ep
        .online_device("SN-FALLBACK", Device::simulated(), |c| {
            c.endpoints = Endpoints {
                data: vec![ws(&data_1), ws(&data_2)],
                mqtt: vec![broker(&mqtt_1), broker(&mqtt_2)],
            };
            c.probe_interval = Duration::from_millis(300);
            // Keep the data channel open, so returning to the first is the probe's doing.
            c.data_idle_close = Duration::from_secs(3600);
        })
        .await;
    // Registered and working through the second endpoints.
    run_job(&admin, &mut events, &id).await;
    assert_eq!(
        (mqtt_1.open_connections(), mqtt_2.open_connections()),
        (0, 1)
    );
    assert_eq!(data_1.open_connections(), 0);
    assert!(data_2.open_connections() >= 1);

    // The first endpoints come back: both channels return to them.
    data_1.restore();
    mqtt_1.restore();
    wait_mqtt_on(&mut events, &broker(&mqtt_1)).await;
    eventually(
        SOON,
        "both channels back on their first endpoints",
        || async {
            mqtt_1.open_connections() == 1
                && mqtt_2.open_connections() == 0
                && data_1.open_connections() >= 1
                && data_2.open_connections() == 0
        },
    )
    .await;
    run_job(&admin, &mut events, &id).await;

    // Only the data channel's first endpoint fails: the data channel moves, MQTT stays.
    data_1.cut();
    let (job, _) = admin
        .submit_job(
            &id,
            &SubmitJob {
                payload: Some("%PDF-1.7".into()),
                ..SubmitJob::default()
            },
        )
        .await
        .unwrap();
    wait_for_event(&mut events, SOON, |e| match e {
        AgentEvent::MqttDown(reason) => panic!("MQTT must not notice the data channel: {reason}"),
        AgentEvent::JobReported { job_id } if *job_id == job.job_id => Some(()),
        _ => None,
    })
    .await;
    assert_eq!(
        (mqtt_1.open_connections(), mqtt_2.open_connections()),
        (1, 0)
    );
    assert_eq!(data_1.open_connections(), 0);
    assert!(data_2.open_connections() >= 1);
    data_1.restore();
    wait_data_on(&mut events, &ws(&data_1)).await;

    // Only the first broker fails: MQTT moves, the data channel stays.
    mqtt_1.cut();
    wait_for_event(&mut events, SOON, |e| match e {
        AgentEvent::DataUp { endpoint } if *endpoint != ws(&data_1) => {
            panic!("the data channel must not move: {endpoint}")
        }
        AgentEvent::MqttUp { endpoint } if *endpoint == broker(&mqtt_2) => Some(()),
        _ => None,
    })
    .await;
    run_job(&admin, &mut events, &id).await;
    assert_eq!(data_2.open_connections(), 0);
    assert!(data_1.open_connections() >= 1);
    mqtt_1.restore();
    wait_mqtt_on(&mut events, &broker(&mqtt_1)).await;
    eventually(SOON, "MQTT back on the first broker only", || async {
        mqtt_1.open_connections() == 1 && mqtt_2.open_connections() == 0
    })
    .await;
    agent.stop().await.unwrap();
}
