//! What each fuzz target runs on its input, and the seeds of its corpus.
//!
//! Every decoder of bytes a peer controls has a target here: data-channel frames (hellos, and
//! requests run through the real handler for a registered device), the frames the agent reads,
//! hints, presence messages, stored records as read back, the embedded broker's MQTT packet
//! reader (and writer, for what it decoded), admin API requests through the real router, and
//! LAN poll-now nudges. A target panics only on a bug: a decode error is a value, and the admin
//! API never answers 5xx. `fuzz/fuzz_targets/*.rs` hand libFuzzer's input to these functions;
//! `tests/tests/fuzz_corpus.rs` runs them on the committed corpus in the normal test suite.

use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use cloud_bridge::bridge::Bridge;
use cloud_bridge::store::{Committer, MemStore};
use rumqttd::protocol::Protocol;
use schemas::data::{ClientFrame, ErrorCode, Request, ServerFrame};
use schemas::tolerant::{FromDevice, FromServer};
use schemas::{DeviceId, Secret, UnixMillis};

mod seeds;

pub use seeds::seeds;

/// The names of the targets, as `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>/`.
pub const TARGETS: &[&str] = &[
    "data_frame",
    "server_frame",
    "hint",
    "presence",
    "stored_record",
    "mqtt_packet",
    "admin_request",
    "admin_json",
    "lan_nudge",
];

/// Runs target `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "data_frame" => data_frame(data),
        "server_frame" => server_frame(data),
        "hint" => hint(data),
        "presence" => presence(data),
        "stored_record" => stored_record(data),
        "mqtt_packet" => mqtt_packet(data),
        "admin_request" => admin_request(data),
        "admin_json" => admin_json(data),
        "lan_nudge" => lan_nudge(data),
        other => panic!("no fuzz target {other}"),
    }
}

/// A bridge in memory with one registered device, shared by every run of a process.
struct World {
    runtime: tokio::runtime::Runtime,
    bridge: Bridge,
    committer: Arc<Committer>,
    device: DeviceId,
    device_secret: Secret,
    admin: axum::Router,
    admin_token: Secret,
}

/// Runs before the world is made anew: what the runs create (tokens, jobs, users) stays in its
/// store, and millions of runs would otherwise grow it without bound.
const RUNS_PER_WORLD: u32 = 20_000;

thread_local! {
    static WORLD: std::cell::RefCell<Option<(World, u32)>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` on this thread's world, made anew every [`RUNS_PER_WORLD`] runs.
fn with_world<R>(f: impl FnOnce(&World) -> R) -> R {
    WORLD.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot
            .as_ref()
            .is_none_or(|(_, runs)| *runs >= RUNS_PER_WORLD)
        {
            *slot = None;
            *slot = Some((World::new(), 0));
        }
        let (world, runs) = slot.as_mut().expect("just made");
        *runs += 1;
        f(world)
    })
}

impl World {
    fn new() -> World {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let committer = Committer::new(Arc::new(MemStore::default()), std::time::Duration::ZERO);
        let config = cloud_bridge::Config::default();
        let shards = config.store.shard_count();
        let core = cloud_bridge::core::Core::load(committer.clone(), config.job_policy(), shards)
            .expect("an empty store loads");
        let notifier = cloud_bridge::notifier::Notifier::new(1024);
        let clock = Arc::new(cloud_bridge::clock::SystemClock);
        let bridge = Bridge::new(core, committer.clone(), notifier, "embedded", clock, 0);
        let admin_token = Secret::new("fuzz-admin-token");
        let admin = cloud_bridge::admin::router(bridge.clone(), admin_token.clone(), false);
        let (device, device_secret) = runtime.block_on(async {
            // The flusher makes writes durable; requests wait for it.
            tokio::spawn(
                committer
                    .clone()
                    .run_flusher(tokio_util::sync::CancellationToken::new()),
            );
            let token = Secret::new("fuzz-enrollment");
            bridge
                .core()
                .create_enrollment(token.clone(), "fuzz".into(), 1, 60_000, UnixMillis::now())
                .expect("an enrollment token");
            let (record, secret) = bridge
                .register(&schemas::data::Registration {
                    enrollment_token: token,
                    serial: "SN-FUZZ".into(),
                    model: "MFP-4000".into(),
                    destination: "EU".into(),
                    time_zone: "Europe/Berlin".into(),
                    owner: None,
                    registration_id: None,
                })
                .await
                .expect("a registration");
            (record.device_id, secret)
        });
        World {
            runtime,
            bridge,
            committer,
            device,
            device_secret,
            admin,
            admin_token,
        }
    }
}

/// A data-channel frame as the server reads it; a request is run through the real handler for
/// a registered device (long-polls do not wait). A decoded frame must encode and decode again.
pub fn data_frame(data: &[u8]) {
    // As the bridge reads it: a request it cannot read fails alone, under the request's id.
    let frame = match FromDevice::decode(data) {
        Ok(FromDevice::Frame(frame)) => frame,
        Ok(FromDevice::Rejected { error, .. }) => {
            assert!(
                matches!(
                    error.code,
                    ErrorCode::UnknownRequest | ErrorCode::BadRequest
                ),
                "{error}"
            );
            return;
        }
        Err(error) => {
            assert_eq!(error.code, ErrorCode::BadFrame, "{error}");
            return;
        }
    };
    let again = schemas::encode(&frame).expect("a decoded frame encodes");
    schemas::decode::<ClientFrame>(&again).expect("an encoded frame decodes");
    if let ClientFrame::Request { body, .. } = frame {
        let body = match body {
            Request::Sync {
                after, limit, ack, ..
            } => Request::Sync {
                after,
                wait_ms: 0,
                limit,
                ack,
            },
            other => other,
        };
        with_world(|w| {
            // Any answer is fine, an error included; a panic is not.
            let _ = w.runtime.block_on(w.bridge.handle(&w.device, body));
        });
    }
}

/// A frame as the device agent reads it from the server.
pub fn server_frame(data: &[u8]) {
    if let Ok(FromServer::Frame(frame)) = FromServer::decode(data) {
        assert_eq!(schemas::decode::<ServerFrame>(data).ok(), Some(frame));
    }
}

/// A hint as the agent's MQTT link reads it.
pub fn hint(data: &[u8]) {
    let _ =
        schemas::codec::decode_limited::<schemas::hint::Hint>(data, schemas::hint::MAX_HINT_BYTES);
}

/// A message on the bridge's presence subscription: the first byte is the topic's length.
pub fn presence(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (topic, payload) = rest.split_at((n as usize).min(rest.len()));
    let _ = cloud_bridge::notifier::parse_presence(topic, payload);
}

/// A stored record as the bridge (or the agent, for its state file) reads it back; the first
/// byte picks the kind.
pub fn stored_record(data: &[u8]) {
    use schemas::codec::decode_limited as d;
    let Some((&kind, v)) = data.split_first() else {
        return;
    };
    let max = usize::MAX;
    match kind % 17 {
        0 => drop(d::<schemas::records::DeviceRecord>(v, max)),
        1 => drop(d::<schemas::records::JobRecord>(v, max)),
        2 => drop(d::<schemas::feed::FeedEntry>(v, max)),
        3 => drop(d::<schemas::records::EnrollmentRecord>(v, max)),
        4 => drop(d::<schemas::records::OwnerRecord>(v, max)),
        5 => drop(d::<schemas::records::CompanionRecord>(v, max)),
        6 => drop(d::<schemas::records::DeviceRequestRecord>(v, max)),
        7 => drop(d::<schemas::services::ServiceRecord>(v, max)),
        8 => drop(d::<schemas::services::ApplicationRecord>(v, max)),
        9 => drop(d::<schemas::services::InstructionRecord>(v, max)),
        10 => drop(d::<schemas::services::ContractRecord>(v, max)),
        11 => drop(d::<schemas::print::UserRecord>(v, max)),
        12 => drop(d::<schemas::print::HeldJobRecord>(v, max)),
        13 => drop(d::<schemas::records::OpsLoginRecord>(v, max)),
        14 => drop(d::<schemas::agent::AgentState>(v, 64 * 1024 * 1024)),
        15 => drop(d::<schemas::records::ConsoleActionRecord>(v, max)),
        _ => drop(d::<schemas::settings::SettingsRecord>(v, max)),
    }
}

/// Bytes from an MQTT client as the embedded broker's 3.1.1 reader sees them, with the
/// packet size limit the broker runs with; every packet read is written back as the router
/// would write a packet.
pub fn mqtt_packet(data: &[u8]) {
    let mut protocol = rumqttd::protocol::v4::V4;
    let mut stream = BytesMut::from(data);
    for _ in 0..64 {
        match protocol.read_mut(&mut stream, 4 * 1024) {
            Ok(packet) => {
                let mut out = BytesMut::new();
                let _ = protocol.write(packet, &mut out);
            }
            Err(_) => return,
        }
    }
}

/// An admin API request through the real router: the first byte picks the route, the rest is
/// the body. Answers may be any 2xx or 4xx; a 5xx is a bug.
pub fn admin_request(data: &[u8]) {
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    with_world(|w| admin_request_in(w, route, body));
}

fn admin_request_in(w: &World, route: u8, body: &[u8]) {
    let device = w.device.as_str();
    let query = || String::from_utf8_lossy(&body[..body.len().min(64)]).into_owned();
    let (method, path) = match route % 20 {
        0 => ("POST", format!("/v1/devices/{device}/jobs")),
        1 => ("POST", "/v1/enrollment-tokens".to_owned()),
        2 => ("PUT", format!("/v1/devices/{device}/settings")),
        3 => ("POST", format!("/v1/devices/{device}/instructions")),
        4 => ("POST", "/v1/services".to_owned()),
        5 => ("POST", "/v1/customers/fuzz/applications".to_owned()),
        6 => ("POST", "/v1/customers/fuzz/poll-now".to_owned()),
        7 => ("PUT", format!("/v1/devices/{device}/contracts/svc-fuzz")),
        8 => ("POST", "/v1/users".to_owned()),
        9 => ("POST", "/v1/owners".to_owned()),
        10 => ("POST", "/v1/ops-logins".to_owned()),
        11 => ("POST", "/v1/jobs/job-0000000000000000/move".to_owned()),
        12 => ("POST", "/v1/jobs/job-0000000000000000/cancel".to_owned()),
        13 => ("PUT", "/v1/services/svc-fuzz".to_owned()),
        14 => (
            "POST",
            "/v1/users/usr-0000000000000000/held-jobs".to_owned(),
        ),
        15 => ("GET", format!("/v1/devices/{device}/requests?{}", query())),
        // The console's sign-in, and its cookie (both without the admin token).
        16 => ("POST", "/console/session".to_owned()),
        17 => ("GET", format!("/v1/devices?{}", query())),
        18 => ("GET", format!("/v1/devices/{device}/jobs?{}", query())),
        _ => ("GET", "/v1/devices".to_owned()),
    };
    let mut request = axum::http::Request::builder()
        .method(method)
        .uri(path.replace([' ', '#', '\n', '\r'], ""))
        .header("content-type", "application/json");
    match route % 20 {
        16 => {}
        19 => {
            let cookie: String = String::from_utf8_lossy(body)
                .chars()
                .filter(|c| c.is_ascii_graphic() || *c == ' ')
                .collect();
            request = request.header("cookie", cookie);
        }
        _ => {
            request = request.header(
                "authorization",
                format!("Bearer {}", w.admin_token.expose()),
            );
        }
    }
    let request = request.body(axum::body::Body::from(body.to_vec()));
    let Ok(request) = request else {
        return;
    };
    let mut router = w.admin.clone();
    let response = w
        .runtime
        .block_on(tower_service::Service::call(&mut router, request))
        .expect("the router is infallible");
    assert!(
        !response.status().is_server_error(),
        "{method} {path} answered {} to {:?}",
        response.status(),
        String::from_utf8_lossy(body)
    );
}

/// An admin API request body as its route decodes it (the first byte picks the type); what
/// decodes must encode again. Faster than [`admin_request`], so it runs many more inputs.
pub fn admin_json(data: &[u8]) {
    use schemas::api::*;
    fn check<T: serde::de::DeserializeOwned + serde::Serialize>(body: &[u8]) {
        if let Ok(value) = serde_json::from_slice::<T>(body) {
            let again = serde_json::to_vec(&value).expect("a decoded body encodes");
            serde_json::from_slice::<T>(&again).expect("an encoded body decodes");
        }
    }
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 17 {
        0 => check::<SubmitJob>(body),
        1 => check::<CreateEnrollmentToken>(body),
        2 => check::<PutSettings>(body),
        3 => check::<CreateInstruction>(body),
        4 => check::<CreateService>(body),
        5 => check::<ApplyForService>(body),
        6 => check::<PollNow>(body),
        7 => check::<PutContract>(body),
        8 => check::<CreateUser>(body),
        9 => check::<CreateOwner>(body),
        10 => check::<CreateOpsLogin>(body),
        11 => check::<MoveJob>(body),
        12 => check::<CancelJob>(body),
        13 => check::<UpdateService>(body),
        14 => check::<SubmitHeldJob>(body),
        _ => check::<CreateCompanion>(body),
    }
}

/// A line on the agent's LAN endpoint: a poll-now nudge, checked against this device.
pub fn lan_nudge(data: &[u8]) {
    let Ok(nudge) = serde_json::from_slice::<schemas::nudge::Nudge>(data) else {
        return;
    };
    static CHECK: OnceLock<device_sim::lan::NudgeCheck> = OnceLock::new();
    let check = CHECK.get_or_init(|| {
        device_sim::lan::NudgeCheck::new(
            DeviceId::parse("dev-00000000000000aa").expect("a device id"),
            &Secret::new("device secret"),
        )
    });
    let _ = check.accept(&nudge, schemas::UnixMillis(1_700_000_000_000));
}
