#![allow(clippy::unwrap_used, clippy::expect_used)]
//! PROTOCOL.md cannot drift from the types: its test vectors are written here from the real
//! frames (`UPDATE_PROTOCOL=1` rewrites them), and every request kind, response kind, error
//! code and close code the types know must be in it.

use std::fmt::Write as _;

use schemas::data::{
    self, ClientFrame, ErrorBody, ErrorCode, Hello, HelloAuth, JobOffer, OwnerClaim, Registration,
    Request, Response, ServerEvent, ServerFrame, Welcome,
};
use schemas::feed::{FeedBody, FeedEntry};
use schemas::hint::{Hint, HintKind, Presence};
use schemas::job::{JobState, JobUpdate};
use schemas::outbox::{DeviceRequest, OutboxItem, RequestNo};
use schemas::status::{DeviceState, DeviceStatus};
use schemas::tolerant::{request_kinds, response_kinds, variant_names};
use schemas::{DeviceId, FeedSeq, JobId, OwnerId, RequestId, Secret, UnixMillis};
use serde::de::{self, Deserialize, MapAccess, SeqAccess, Visitor};

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../PROTOCOL.md");
const BEGIN: &str = "<!-- vectors:begin -->\n";
const END: &str = "<!-- vectors:end -->";

fn device() -> DeviceId {
    DeviceId::parse("dev-0123456789abcdef").unwrap()
}

fn job() -> JobId {
    JobId::parse("job-fedcba9876543210").unwrap()
}

const AT: UnixMillis = UnixMillis(1_767_225_600_000);

fn request(id: u32, body: Request) -> ClientFrame {
    ClientFrame::Request {
        id: RequestId(id),
        body,
    }
}

fn response(id: u32, body: Response) -> ServerFrame {
    ServerFrame::Response {
        id: RequestId(id),
        body,
    }
}

/// Who sends a vector: it must read back as that side's peer reads it.
#[derive(Clone, Copy)]
enum From {
    Device,
    Server,
    Mqtt,
}

/// The examples, in the order of PROTOCOL.md: a title, who sends it, and the encoded frame.
fn vectors() -> Vec<(&'static str, From, Vec<u8>)> {
    let d = |v: &ClientFrame| schemas::encode(v).unwrap();
    let s = |v: &ServerFrame| schemas::encode(v).unwrap();
    let m = |v: &dyn erased::Encode| v.encode();
    vec![
        (
            "hello, a registered device",
            From::Device,
            d(&ClientFrame::Hello(Hello {
                protocol: schemas::PROTOCOL_VERSION,
                auth: HelloAuth::Device {
                    device_id: device(),
                    secret: Secret::new("s3cret"),
                },
                agent: "acme-agent/2.1".into(),
            })),
        ),
        (
            "hello, registering",
            From::Device,
            d(&ClientFrame::Hello(Hello {
                protocol: schemas::PROTOCOL_VERSION,
                auth: HelloAuth::Register(Registration {
                    enrollment_token: Secret::new("enr-token"),
                    serial: "SN-1".into(),
                    model: "MFP-9".into(),
                    destination: "EU".into(),
                    time_zone: "Europe/Berlin".into(),
                    owner: Some(OwnerClaim {
                        owner_id: OwnerId::parse("own-00000000000000aa").unwrap(),
                        pin: Secret::new("2468"),
                    }),
                    registration_id: Some("k3Jd9_x-0aQ1b2C3".into()),
                }),
                agent: "acme-agent/2.1".into(),
            })),
        ),
        (
            "welcome after a registration",
            From::Server,
            s(&ServerFrame::Welcome(Welcome {
                protocol: schemas::PROTOCOL_VERSION,
                device_id: device(),
                credentials: Some(Secret::new("s3cret")),
                newest: FeedSeq(0),
                acked: FeedSeq(0),
                server_time: AT,
                poll_interval_secs: Some(86_400),
            })),
        ),
        (
            "sync: a long-poll that also acknowledges",
            From::Device,
            d(&request(
                1,
                Request::Sync {
                    after: FeedSeq(7),
                    wait_ms: 30_000,
                    limit: 16,
                    ack: Some(FeedSeq(7)),
                },
            )),
        ),
        (
            "its answer: one entry",
            From::Server,
            s(&response(
                1,
                Response::Feed {
                    entries: vec![FeedEntry {
                        seq: FeedSeq(8),
                        at: AT,
                        body: FeedBody::JobOffered { job_id: job() },
                    }],
                    newest: FeedSeq(8),
                },
            )),
        ),
        (
            "fetch_job, starting at once",
            From::Device,
            d(&request(
                2,
                Request::FetchJob {
                    job_id: job(),
                    start: true,
                },
            )),
        ),
        (
            "its answer: the payload (bin) and the lease",
            From::Server,
            s(&response(
                2,
                Response::Job(JobOffer {
                    job_id: job(),
                    attempt: 1,
                    lease_until: UnixMillis(AT.0 + 60_000),
                    content_type: "text/plain".into(),
                    payload: b"hello".to_vec(),
                    print: None,
                }),
            )),
        ),
        (
            "job_update: progress",
            From::Device,
            d(&request(
                3,
                Request::JobUpdate {
                    job_id: job(),
                    attempt: 1,
                    update: JobUpdate::Progress { percent: 50 },
                },
            )),
        ),
        (
            "job_update: succeeded",
            From::Device,
            d(&request(
                4,
                Request::JobUpdate {
                    job_id: job(),
                    attempt: 1,
                    update: JobUpdate::Succeeded { detail: None },
                },
            )),
        ),
        (
            "its answer",
            From::Server,
            s(&response(
                4,
                Response::JobState {
                    job_id: job(),
                    state: JobState::Succeeded,
                    attempt: 1,
                },
            )),
        ),
        (
            "complete_registration (a kind without fields)",
            From::Device,
            d(&request(5, Request::CompleteRegistration)),
        ),
        (
            "deliver: a status from the outbox",
            From::Device,
            d(&request(
                6,
                Request::Deliver {
                    items: vec![OutboxItem {
                        no: RequestNo(1),
                        made_at: AT,
                        body: DeviceRequest::Status {
                            status: DeviceStatus {
                                state: DeviceState::Error,
                                detail: "paper jam".into(),
                                observed_at: AT,
                            },
                        },
                    }],
                },
            )),
        ),
        (
            "an error for one request",
            From::Server,
            s(&ServerFrame::Error {
                id: Some(RequestId(9)),
                error: ErrorBody::new(ErrorCode::UnknownRequest, "unknown request kind `teleport`"),
            }),
        ),
        (
            "an error for the connection (a close follows)",
            From::Server,
            s(&ServerFrame::Error {
                id: None,
                error: ErrorBody::new(ErrorCode::Unauthorized, "unknown device or wrong secret"),
            }),
        ),
        (
            "the bridge is going away",
            From::Server,
            s(&ServerFrame::Event(ServerEvent::Closing {
                reason: "server shutting down".into(),
            })),
        ),
        (
            "MQTT: a hint on devices/<id>/notify",
            From::Mqtt,
            m(&Hint::new(HintKind::Feed, FeedSeq(8))),
        ),
        (
            "MQTT: presence on devices/<id>/presence",
            From::Mqtt,
            m(&Presence::Online),
        ),
        ("MQTT: the last will", From::Mqtt, m(&Presence::Offline)),
    ]
}

/// Encoding behind a trait object, so that the list above can mix types.
mod erased {
    pub(crate) trait Encode {
        fn encode(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Encode for T {
        fn encode(&self) -> Vec<u8> {
            schemas::encode(self).unwrap()
        }
    }
}

/// A MessagePack value as compact JSON, keys in the order they were written, bin as an array
/// of byte values.
struct Json(String);

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Json, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any MessagePack value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
        Ok(Json(v.to_string()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
        Ok(Json(v.to_string()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Json, E> {
        Ok(Json(v.to_string()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
        Ok(Json(v.to_string()))
    }
    fn visit_str<E>(self, v: &str) -> Result<Json, E> {
        Ok(Json(serde_json::to_string(v).unwrap()))
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Json, E> {
        Ok(Json(serde_json::to_string(v).unwrap()))
    }
    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json("null".into()))
    }
    fn visit_none<E>(self) -> Result<Json, E> {
        Ok(Json("null".into()))
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Json, D::Error> {
        Json::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::new();
        while let Some(Json(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json(format!("[{}]", items.join(","))))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut items = Vec::new();
        while let Some((Json(k), Json(v))) = map.next_entry()? {
            items.push(format!("{k}:{v}"));
        }
        Ok(Json(format!("{{{}}}", items.join(","))))
    }
}

fn hex(bytes: &[u8]) -> String {
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    hex.join(" ")
}

/// `1048576` as `1,048,576`, as PROTOCOL.md writes numbers.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let groups: Vec<&str> = digits
        .as_bytes()
        .rchunks(3)
        .rev()
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    groups.join(",")
}

fn render() -> String {
    let mut out = String::new();
    for (title, _, bytes) in vectors() {
        let Json(json) = rmp_serde::from_slice(&bytes).unwrap();
        writeln!(
            out,
            "**{title}** ({} bytes)\n\n```json\n{json}\n```\n\n```text",
            bytes.len()
        )
        .unwrap();
        for line in bytes.chunks(24) {
            writeln!(out, "{}", hex(line)).unwrap();
        }
        writeln!(out, "```\n").unwrap();
    }
    out
}

#[test]
fn the_test_vectors_in_protocol_md_are_what_the_types_encode() {
    let doc = std::fs::read_to_string(DOC).unwrap();
    let (start, end) = (
        doc.find(BEGIN)
            .expect("PROTOCOL.md lost its vectors:begin marker")
            + BEGIN.len(),
        doc.find(END)
            .expect("PROTOCOL.md lost its vectors:end marker"),
    );
    let vectors = render();
    if std::env::var_os("UPDATE_PROTOCOL").is_some() {
        std::fs::write(DOC, format!("{}{vectors}{}", &doc[..start], &doc[end..])).unwrap();
        return;
    }
    assert!(
        doc[start..end] == vectors,
        "PROTOCOL.md's test vectors differ from what the types encode: if the change is \
         meant, run `UPDATE_PROTOCOL=1 cargo test -p schemas --test protocol` and say in \
         PROTOCOL.md what a device must do about it"
    );
}

#[test]
fn every_vector_reads_back_as_its_peer_reads_it() {
    use schemas::tolerant::{FromDevice, FromServer};
    for (title, from, bytes) in vectors() {
        let read = match from {
            From::Device => matches!(FromDevice::decode(&bytes), Ok(FromDevice::Frame(_))),
            From::Server => matches!(FromServer::decode(&bytes), Ok(FromServer::Frame(_))),
            From::Mqtt => {
                schemas::codec::decode_limited::<Hint>(&bytes, schemas::hint::MAX_HINT_BYTES)
                    .is_ok()
                    || schemas::decode::<Presence>(&bytes).is_ok()
            }
        };
        assert!(read, "{title} does not read back");
    }
}

#[test]
fn protocol_md_names_every_kind_and_code_the_types_know() {
    let doc = std::fs::read_to_string(DOC).unwrap();
    for kind in request_kinds() {
        assert!(
            doc.contains(&format!("| `{kind}` |")),
            "request kind `{kind}` is not in the table"
        );
    }
    for kind in response_kinds() {
        assert!(
            doc.contains(&format!("\"{kind}\"")),
            "response kind \"{kind}\" is not in PROTOCOL.md"
        );
    }
    for code in variant_names::<ErrorCode>() {
        if *code != "unknown" {
            assert!(
                doc.contains(&format!("`{code}`")),
                "error code `{code}` is not in PROTOCOL.md"
            );
        }
    }
    for close in [
        data::CLOSE_BAD_FRAME,
        data::CLOSE_UNAUTHORIZED,
        data::CLOSE_FORBIDDEN,
        data::CLOSE_TIMEOUT,
        data::CLOSE_TOO_LARGE,
        data::CLOSE_UNSUPPORTED_VERSION,
    ] {
        assert!(
            doc.contains(&format!("| {close} |")),
            "close code {close} is not in the table"
        );
    }
    for limit in [
        format!("{} bytes", thousands(schemas::MAX_FRAME_BYTES)),
        format!("at most {}", thousands(data::MAX_SYNC_WAIT_MS as usize)),
        format!("at most {}", data::MAX_SYNC_ENTRIES),
        format!("at most {}", schemas::outbox::MAX_DELIVER_ITEMS),
        format!("at most {} bytes", schemas::hint::MAX_HINT_BYTES),
    ] {
        assert!(doc.contains(&limit), "PROTOCOL.md does not say {limit:?}");
    }
    for presence in [Presence::Online, Presence::Offline] {
        let bytes = schemas::encode(&presence).unwrap();
        let said = format!("(bytes `{}`)", hex(&bytes));
        assert!(
            doc.contains(&said),
            "PROTOCOL.md does not give {presence:?} as {said}"
        );
    }
}
