//! The seeds of each target's corpus: real encodings of what its peer sends, made with this
//! process's world (its device, owner, user), so that the fuzzer begins inside the formats.

use cloud_bridge::core::NewPrincipal;
use schemas::data::{ClientFrame, Request, ServerFrame};
use schemas::records::{OpsLoginRecord, OwnerRecord};
use schemas::{OpsId, OwnerId, Secret, UserId};

use crate::{World, with_world};

/// Inputs each target starts from: real encodings of what its peer sends, so that the fuzzer
/// begins inside the formats instead of searching for them.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    with_world(seeds_in)
}

fn seeds_in(w: &World) -> Vec<(&'static str, Vec<u8>)> {
    use schemas::data::{ErrorBody, ErrorCode, Hello, HelloAuth, ServerEvent};
    use schemas::hint::{Hint, HintKind, Presence};
    use schemas::{FeedSeq, JobId, RequestId, UnixMillis};

    let mut seeds: Vec<(&'static str, Vec<u8>)> = Vec::new();

    // The data channel: a hello and requests.
    let hello = ClientFrame::Hello(Hello {
        protocol: schemas::PROTOCOL_VERSION,
        auth: HelloAuth::Device {
            device_id: w.device.clone(),
            secret: w.device_secret.clone(),
        },
        agent: "fuzz".into(),
    });
    seeds.push(("data_frame", enc(&hello)));
    let job = JobId::parse("job-0000000000000000").expect("a job id");
    for (n, body) in [
        Request::Sync {
            after: FeedSeq(0),
            wait_ms: 0,
            limit: 16,
            ack: Some(FeedSeq(0)),
        },
        Request::Ack { upto: FeedSeq(1) },
        Request::FetchJob {
            job_id: job.clone(),
            start: true,
        },
        Request::CompleteRegistration,
        Request::Contracts,
        Request::Release {
            session: Secret::new("s"),
            jobs: vec![job.clone()],
        },
    ]
    .into_iter()
    .enumerate()
    {
        let frame = ClientFrame::Request {
            id: RequestId(n as u32 + 1),
            body,
        };
        seeds.push(("data_frame", enc(&frame)));
    }

    // What the agent reads.
    seeds.push((
        "server_frame",
        enc(&ServerFrame::Error {
            id: None,
            error: ErrorBody::new(ErrorCode::DeviceDisabled, "device is disabled"),
        }),
    ));
    seeds.push((
        "server_frame",
        enc(&ServerFrame::Event(ServerEvent::Closing {
            reason: "shutting down".into(),
        })),
    ));
    for kind in [HintKind::Feed, HintKind::Pending, HintKind::PollNow] {
        seeds.push(("hint", enc(&Hint::new(kind, FeedSeq(7)))));
    }

    // Presence: topic length, topic, payload.
    for presence in [Presence::Online, Presence::Offline] {
        let topic = schemas::topics::presence(&w.device);
        let mut seed = vec![topic.len() as u8];
        seed.extend_from_slice(topic.as_bytes());
        seed.extend_from_slice(&enc(&presence));
        seeds.push(("presence", seed));
    }

    // Stored records, as the world's store holds them after some work.
    let core = w.bridge.core();
    let now = UnixMillis::now();
    let token = Secret::new("fuzz-token");
    let user = NewPrincipal::new(UserId::from_random([2; 8]), "fuzz", token);
    let _ = core.create_user(&user, &Secret::new("2468"), now);
    let owner = OwnerRecord {
        owner_id: OwnerId::from_random([1; 8]),
        name: "fuzz".into(),
        token_sha256: "ab".repeat(32),
        created_at: now,
    };
    let ops = OpsLoginRecord {
        ops_id: OpsId::from_random([3; 8]),
        name: "fuzz".into(),
        password_sha256: "cd".repeat(32),
        created_at: now,
        revoked_at: Some(now),
    };
    seeds.push(("stored_record", [vec![4], enc(&owner)].concat()));
    seeds.push(("stored_record", [vec![13], enc(&ops)].concat()));
    let job = cloud_bridge::core::NewJob {
        payload: b"seed".to_vec(),
        content_type: "text/plain".into(),
        ttl_ms: None,
        max_attempts: None,
        idempotency_key: None,
        submitted_by: None,
        print: None,
    };
    let _ = core.submit_job(&w.device, job, now);
    let _ = core.record_console_action(&schemas::records::ConsoleActionRecord {
        id: "0000000000000001".into(),
        at: now,
        by: "admin".into(),
        method: "POST".into(),
        path: format!("/v1/devices/{}/disable", w.device),
        status: Some(200),
    });
    for (kind, prefix) in [
        (0u8, "d/"),
        (1, "j/"),
        (2, "f/"),
        (3, "e/"),
        (11, "u/"),
        (15, "x/"),
    ] {
        let records = w
            .committer
            .store()
            .scan_prefix(prefix.as_bytes())
            .unwrap_or_default();
        for (_key, value) in records.into_iter().take(2) {
            let mut seed = vec![kind];
            seed.extend_from_slice(&value);
            seeds.push(("stored_record", seed));
        }
    }
    let mut state = vec![14u8];
    state.extend_from_slice(&enc(&schemas::agent::AgentState::default()));
    seeds.push(("stored_record", state));

    // MQTT 3.1.1: CONNECT, SUBSCRIBE, PUBLISH at QoS 1, PUBACK, PINGREQ, DISCONNECT.
    seeds.push((
        "mqtt_packet",
        mqtt_connect_packet(w.device.as_str(), w.device_secret.expose()),
    ));
    let notify = schemas::topics::notify(&w.device);
    let mut subscribe = vec![0x82, (2 + 2 + notify.len() + 1) as u8, 0, 1];
    subscribe.extend_from_slice(&(notify.len() as u16).to_be_bytes());
    subscribe.extend_from_slice(notify.as_bytes());
    subscribe.push(1);
    seeds.push(("mqtt_packet", subscribe));
    let topic = schemas::topics::presence(&w.device);
    let payload = enc(&Presence::Online);
    let mut publish = vec![0x32, (2 + topic.len() + 2 + payload.len()) as u8];
    publish.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    publish.extend_from_slice(topic.as_bytes());
    publish.extend_from_slice(&[0, 2]);
    publish.extend_from_slice(&payload);
    seeds.push(("mqtt_packet", publish));
    seeds.push(("mqtt_packet", vec![0x40, 2, 0, 1, 0xc0, 0, 0xe0, 0]));

    // Admin API bodies, by route (see `admin_request`).
    for (route, body) in [
        (
            0u8,
            r#"{"payload":"hello","content_type":"text/plain","idempotency_key":"k1","ttl_secs":60}"#,
        ),
        (
            0,
            r#"{"payload_base64":"aGVsbG8=","print":{"duplex":true,"copies":2}}"#,
        ),
        (1, r#"{"customer":"acme","max_uses":5,"ttl_secs":3600}"#),
        (
            2,
            r#"{"endpoints":{"data":["wss://a:8081"],"mqtt":["mqtts://a:8883"]}}"#,
        ),
        (
            3,
            r#"{"name":"reboot","params":{"at":"now"},"ttl_secs":60}"#,
        ),
        (
            4,
            r#"{"service_id":"svc-fuzz","name":"toner","models":["MFP-4000"],"kind":"consumables","data_types":["toner_level"],"report_every_secs":3600}"#,
        ),
        (
            5,
            r#"{"service_id":"svc-fuzz","models":["MFP-4000"],"ttl_secs":60}"#,
        ),
        (
            6,
            r#"{"devices":[],"via":"lan","fanout":3,"stagger_ms":1000}"#,
        ),
        (8, r#"{"name":"Ana","pin":"2468"}"#),
        (10, r#"{"name":"grafana"}"#),
        (15, "after=0&limit=10&order=newest"),
        (16, r#"{"token":"not-the-token"}"#),
        (16, r#"{"ops_id":"ops-00000000000000a1","password":"pw"}"#),
        (17, "q=SN&condition=active&limit=10"),
        (18, "order=newest&limit=5"),
        (19, "bridge_console=00; other=1"),
    ] {
        let mut seed = vec![route];
        seed.extend_from_slice(body.as_bytes());
        seeds.push(("admin_request", seed));
    }

    // The same bodies for the decoder alone (the first byte picks the type the same way).
    let bodies: Vec<Vec<u8>> = seeds
        .iter()
        .filter(|(t, _)| *t == "admin_request")
        .map(|(_, b)| b.clone())
        .collect();
    for body in bodies {
        seeds.push(("admin_json", body));
    }

    // A nudge as the LAN endpoint reads it.
    let nudge = serde_json::json!({
        "nudge_id": "0123456789abcdef0123456789abcdef",
        "not_after": UnixMillis(1_800_000_000_000).0,
        "node": {
            "device_id": "dev-00000000000000aa",
            "lan": "127.0.0.1:7000",
            "delay_ms": 300,
            "token": "00",
            "children": [],
        }
    });
    seeds.push(("lan_nudge", nudge.to_string().into_bytes()));
    seeds
}

/// An MQTT 3.1.1 CONNECT with these credentials (client id = username).
fn mqtt_connect_packet(id: &str, password: &str) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut body = Vec::new();
    string(&mut body, "MQTT");
    body.push(4);
    body.push(0b1100_0010);
    body.extend_from_slice(&30u16.to_be_bytes());
    string(&mut body, id);
    string(&mut body, id);
    string(&mut body, password);
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

fn enc<T: serde::Serialize>(value: &T) -> Vec<u8> {
    schemas::encode(value).expect("a seed encodes")
}
