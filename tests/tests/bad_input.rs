//! Bad input gets a clear typed error or close code, loses nothing, and does not disturb other
//! devices: wrong credentials on MQTT and the data channel, another device's job, malformed
//! frames, a wrong protocol version, an oversize frame, a silent connection, admin calls
//! without a token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use device_sim::session::{DataSession, SessionError, SessionSettings};
use e2e_tests::{Device, Endpoints, InProcessBridge, SOON, mqtt_connect, wait_reported};
use futures_util::{SinkExt, StreamExt};
use hyper::Method;
use schemas::agent::Credentials;
use schemas::api::SubmitJob;
use schemas::data::{
    CLOSE_BAD_FRAME, CLOSE_FORBIDDEN, CLOSE_TIMEOUT, CLOSE_TOO_LARGE, CLOSE_UNAUTHORIZED,
    CLOSE_UNSUPPORTED_VERSION, ClientFrame, ErrorCode, Hello, HelloAuth, Request, ServerFrame,
};
use schemas::{PROTOCOL_VERSION, Secret};
use tokio_tungstenite::tungstenite::Message;

/// Registers a device with a running agent and returns the agent and its credentials.
async fn device(ep: &Endpoints, serial: &str) -> (device_sim::AgentHandle, Credentials) {
    let device = ep.online_device(serial, Device::simulated(), |_| {}).await;
    let credentials = device.credentials();
    (device.agent, credentials)
}

/// Sends `frames` on a raw WebSocket and collects what the server says until it closes.
async fn raw_exchange(url: &str, frames: Vec<Message>) -> (Vec<ServerFrame>, Option<u16>) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    for f in frames {
        if ws.send(f).await.is_err() {
            break;
        }
    }
    let mut got = Vec::new();
    let close = tokio::time::timeout(SOON, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => {
                    got.push(schemas::decode::<ServerFrame>(&b).unwrap())
                }
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("the server never closed the connection");
    (got, close)
}

fn hello(protocol: u16, auth: HelloAuth) -> Message {
    let frame = ClientFrame::Hello(Hello {
        protocol,
        auth,
        agent: "test".into(),
    });
    Message::Binary(schemas::encode(&frame).unwrap().into())
}

fn device_auth(c: &Credentials) -> HelloAuth {
    HelloAuth::Device {
        device_id: c.device_id.clone(),
        secret: c.secret.clone(),
    }
}

fn error_code(frames: &[ServerFrame]) -> Option<ErrorCode> {
    frames.iter().find_map(|f| match f {
        ServerFrame::Error { id: None, error } => Some(error.code),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_other_devices_keep_working() {
    let bridge = InProcessBridge::start_with(|c| c.data_channel.hello_timeout_ms = 300).await;
    let ep = &bridge.endpoints;
    let (healthy, healthy_creds) = device(ep, "SN-OK").await;
    let (other, other_creds) = device(ep, "SN-OTHER").await;
    other.stop().await.unwrap();
    let mut events = healthy.subscribe();

    // MQTT: right credentials pass; a wrong secret and a foreign client id do not.
    let id = other_creds.device_id.as_str();
    let secret = other_creds.secret.expose();
    assert_eq!(mqtt_connect(ep, id, id, secret).await, Ok(()));
    assert!(mqtt_connect(ep, id, id, "wrong").await.is_err());
    assert!(mqtt_connect(ep, "someone-else", id, secret).await.is_err());
    assert!(
        mqtt_connect(ep, healthy_creds.device_id.as_str(), id, secret)
            .await
            .is_err()
    );

    // Data channel: a wrong secret.
    let wrong = HelloAuth::Device {
        device_id: other_creds.device_id.clone(),
        secret: Secret::new("wrong"),
    };
    let (frames, close) =
        raw_exchange(&ep.data_url, vec![hello(PROTOCOL_VERSION, wrong.clone())]).await;
    assert_eq!(
        (error_code(&frames), close),
        (Some(ErrorCode::Unauthorized), Some(CLOSE_UNAUTHORIZED))
    );
    let refused = DataSession::connect(&ep.data_url, wrong, "t", SessionSettings::default())
        .await
        .unwrap_err();
    assert!(
        matches!(refused, SessionError::Refused(ref b) if b.code == ErrorCode::Unauthorized),
        "{refused}"
    );

    // Another device's job.
    let (job, _) = ep
        .client()
        .submit_job(
            &healthy_creds.device_id,
            &SubmitJob {
                payload: Some("mine".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let (session, _) = DataSession::connect(
        &ep.data_url,
        device_auth(&other_creds),
        "t",
        SessionSettings::default(),
    )
    .await
    .unwrap();
    let err = session
        .request(Request::FetchJob {
            job_id: job.job_id.clone(),
            start: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden), "{err}");
    let err = session
        .request(Request::JobUpdate {
            job_id: job.job_id.clone(),
            attempt: 1,
            update: schemas::job::JobUpdate::Failed { reason: "x".into() },
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden), "{err}");
    // An ack past the end of its own feed.
    let err = session
        .request(Request::Ack {
            upto: schemas::FeedSeq(999),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest), "{err}");
    // The same ack carried by a sync is refused the same way, and the sync with it.
    let err = session
        .request(Request::Sync {
            after: schemas::FeedSeq::ZERO,
            wait_ms: 0,
            limit: 8,
            ack: Some(schemas::FeedSeq(999)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest), "{err}");
    session.close();

    // Malformed MessagePack as the hello.
    let (frames, close) = raw_exchange(
        &ep.data_url,
        vec![Message::Binary(vec![0xc1, 0xff, 0x00].into())],
    )
    .await;
    assert_eq!(
        (error_code(&frames), close),
        (Some(ErrorCode::BadFrame), Some(CLOSE_BAD_FRAME))
    );
    // A text frame.
    let (frames, close) =
        raw_exchange(&ep.data_url, vec![Message::Text("{\"hello\":1}".into())]).await;
    assert_eq!(
        (error_code(&frames), close),
        (Some(ErrorCode::BadFrame), Some(CLOSE_BAD_FRAME))
    );
    // A valid hello, then garbage.
    let (frames, close) = raw_exchange(
        &ep.data_url,
        vec![
            hello(PROTOCOL_VERSION, device_auth(&other_creds)),
            Message::Binary(vec![0x93, 0x01].into()),
        ],
    )
    .await;
    assert!(matches!(frames.first(), Some(ServerFrame::Welcome(_))));
    assert_eq!(
        (error_code(&frames), close),
        (Some(ErrorCode::BadFrame), Some(CLOSE_BAD_FRAME))
    );
    // An unknown protocol version.
    let (frames, close) = raw_exchange(
        &ep.data_url,
        vec![hello(PROTOCOL_VERSION + 98, device_auth(&other_creds))],
    )
    .await;
    assert_eq!(
        (error_code(&frames), close),
        (
            Some(ErrorCode::UnsupportedVersion),
            Some(CLOSE_UNSUPPORTED_VERSION)
        )
    );
    // A frame over the limit.
    let huge = Message::Binary(vec![0u8; schemas::MAX_FRAME_BYTES + 1].into());
    let (_, close) = raw_exchange(&ep.data_url, vec![huge]).await;
    assert_eq!(close, Some(CLOSE_TOO_LARGE));
    // Silence after the upgrade.
    let (frames, close) = raw_exchange(&ep.data_url, vec![]).await;
    assert_eq!(
        (error_code(&frames), close),
        (Some(ErrorCode::HelloTimeout), Some(CLOSE_TIMEOUT))
    );
    // A bad enrollment token.
    let register = HelloAuth::Register(schemas::data::Registration {
        registration_id: None,
        enrollment_token: Secret::new("not-a-token"),
        serial: "SN-X".into(),
        model: "m".into(),
        destination: "EU".into(),
        time_zone: "UTC".into(),
        owner: None,
    });
    let (frames, close) = raw_exchange(&ep.data_url, vec![hello(PROTOCOL_VERSION, register)]).await;
    assert_eq!(
        (error_code(&frames), close),
        (Some(ErrorCode::EnrollmentInvalid), Some(CLOSE_UNAUTHORIZED))
    );

    // Through all of that, the healthy device got its job and ran it.
    wait_reported(&mut events, &job.job_id).await;

    // A disabled device is refused everywhere.
    ep.client()
        .disable_device(&other_creds.device_id)
        .await
        .unwrap();
    let (frames, close) = raw_exchange(
        &ep.data_url,
        vec![hello(PROTOCOL_VERSION, device_auth(&other_creds))],
    )
    .await;
    assert_eq!(
        (error_code(&frames), close),
        (Some(ErrorCode::DeviceDisabled), Some(CLOSE_FORBIDDEN))
    );
    assert!(mqtt_connect(ep, id, id, secret).await.is_err());
    let refused = ep
        .client()
        .submit_job(
            &other_creds.device_id,
            &SubmitJob {
                payload: Some("x".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(refused.status().map(|s| s.as_u16()), Some(403));
    healthy.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_refuses_missing_or_wrong_tokens_and_bad_bodies() {
    let bridge = InProcessBridge::start().await;
    let client = bridge.endpoints.client();
    for token in [None, Some("wrong")] {
        let (status, body) = client
            .raw(Method::GET, "/v1/devices", None, token)
            .await
            .unwrap();
        assert_eq!(status.as_u16(), 401);
        let error: schemas::api::ApiError = serde_json::from_slice(&body).unwrap();
        assert_eq!(error.code, ErrorCode::Unauthorized);
    }
    let token = bridge.endpoints.admin_token.expose().to_owned();
    let cases: [(&str, &str, Option<&str>, u16, ErrorCode); 5] = [
        (
            "POST",
            "/v1/enrollment-tokens",
            Some("{not json"),
            400,
            ErrorCode::BadRequest,
        ),
        (
            "POST",
            "/v1/enrollment-tokens",
            Some("{\"customer\":\"a\",\"surprise\":1}"),
            400,
            ErrorCode::BadRequest,
        ),
        (
            "GET",
            "/v1/devices/dev-0000000000000000",
            None,
            404,
            ErrorCode::NotFound,
        ),
        (
            "GET",
            "/v1/devices/not-an-id",
            None,
            400,
            ErrorCode::BadRequest,
        ),
        (
            "POST",
            "/v1/devices/dev-0000000000000000/jobs",
            Some("{\"payload\":\"x\"}"),
            404,
            ErrorCode::NotFound,
        ),
    ];
    for (method, path, body, status, code) in cases {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let (got, bytes) = client
            .raw(
                method,
                path,
                body.map(|b| b.as_bytes().to_vec()),
                Some(&token),
            )
            .await
            .unwrap();
        assert_eq!(
            got.as_u16(),
            status,
            "{path}: {}",
            String::from_utf8_lossy(&bytes)
        );
        let error: schemas::api::ApiError = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(error.code, code, "{path}");
    }
    // Too large: 413 naming the limit, for a body over the limit and for a payload over its own.
    let device = bridge
        .endpoints
        .online_device("SN-BIG", e2e_tests::Device::simulated(), |_| {})
        .await;
    let path = format!("/v1/devices/{}/jobs", device.id);
    for size in [5 << 20, schemas::MAX_PAYLOAD_BYTES + 1] {
        let body = format!("{{\"payload\":\"{}\"}}", "x".repeat(size));
        let (got, bytes) = client
            .raw(Method::POST, &path, Some(body.into_bytes()), Some(&token))
            .await
            .unwrap();
        let error: schemas::api::ApiError = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            (got.as_u16(), error.code),
            (413, ErrorCode::PayloadTooLarge),
            "{size}"
        );
        assert!(
            error
                .message
                .contains(&schemas::MAX_PAYLOAD_BYTES.to_string()),
            "{}",
            error.message
        );
    }
    // Health needs no token.
    let (status, _) = client
        .raw(Method::GET, "/v1/health", None, None)
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 200);
}

/// An idempotency key answers the same submission with the first job (200), and refuses
/// another submission under it with 409 naming the key; nothing is stored for the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_reused_for_another_job_is_a_conflict_naming_the_key() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let (agent, credentials) = device(ep, "SN-KEY").await;
    let device = credentials.device_id;
    let client = ep.client();
    let submission = |text: &str| SubmitJob {
        payload: Some(text.into()),
        content_type: Some("text/plain".into()),
        idempotency_key: Some("order-42".into()),
        ..SubmitJob::default()
    };
    let (first, created) = client
        .submit_job(&device, &submission("one"))
        .await
        .unwrap();
    assert!(created);
    let (again, created) = client
        .submit_job(&device, &submission("one"))
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(again.job_id, first.job_id);
    let refused = client
        .submit_job(&device, &submission("two"))
        .await
        .unwrap_err();
    let admin_client::ClientError::Api { status, error } = refused else {
        panic!("expected an API error, got {refused}");
    };
    assert_eq!(status.as_u16(), 409);
    assert_eq!(error.code, ErrorCode::Conflict);
    assert!(error.message.contains("\"order-42\""), "{}", error.message);
    let jobs = client.device_jobs(&device).await.unwrap();
    assert_eq!(jobs.len(), 1);
    agent.stop().await.unwrap();
}

/// A request as a newer device might send it: any kind, any fields.
fn raw_request(id: u32, body: impl serde::Serialize) -> Message {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "snake_case")]
    enum Frame<B> {
        Request { id: schemas::RequestId, body: B },
    }
    let frame = Frame::Request {
        id: schemas::RequestId(id),
        body,
    };
    Message::Binary(schemas::encode(&frame).unwrap().into())
}

/// One kind and its fields, as a map of one entry.
fn kind<V: serde::Serialize>(
    name: &'static str,
    fields: V,
) -> std::collections::BTreeMap<&'static str, V> {
    std::collections::BTreeMap::from([(name, fields)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_newer_device_sends_fails_request_by_request_and_the_session_goes_on() {
    use schemas::data::Response;
    use std::collections::{BTreeMap, HashMap};

    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let (agent, creds) = device(ep, "SN-NEWER").await;
    agent.stop().await.unwrap();

    let (mut ws, _) = tokio_tungstenite::connect_async(ep.data_url.as_str())
        .await
        .unwrap();
    ws.send(hello(PROTOCOL_VERSION, device_auth(&creds)))
        .await
        .unwrap();
    let mut answers: HashMap<u32, ServerFrame> = HashMap::new();
    let next = async |ws: &mut tokio_tungstenite::WebSocketStream<_>| loop {
        match tokio::time::timeout(SOON, ws.next())
            .await
            .expect("no frame in time")
        {
            Some(Ok(Message::Binary(b))) => return schemas::decode::<ServerFrame>(&b).unwrap(),
            Some(Ok(Message::Close(f))) => panic!("the server closed the session: {f:?}"),
            Some(Ok(_)) => {}
            other => panic!("the connection failed: {other:?}"),
        }
    };
    let newest = match next(&mut ws).await {
        ServerFrame::Welcome(w) => w.newest,
        other => panic!("expected the welcome, got {other:?}"),
    };

    // A long-poll in flight while the rest arrives.
    #[derive(serde::Serialize)]
    struct Sync {
        after: schemas::FeedSeq,
        wait_ms: u32,
    }
    ws.send(raw_request(
        1,
        kind(
            "sync",
            Sync {
                after: newest,
                wait_ms: 20_000,
            },
        ),
    ))
    .await
    .unwrap();
    // A request kind this bridge does not know, bare and with fields.
    ws.send(raw_request(2, "teleport")).await.unwrap();
    ws.send(raw_request(3, kind("fly_to", BTreeMap::from([("x", 1)]))))
        .await
        .unwrap();
    // A known kind with an enum value this bridge does not know.
    #[derive(serde::Serialize)]
    struct Update {
        job_id: schemas::JobId,
        attempt: u32,
        update: &'static str,
    }
    let someone = schemas::JobId::from_random([5; 8]);
    ws.send(raw_request(
        4,
        kind(
            "job_update",
            Update {
                job_id: someone,
                attempt: 1,
                update: "paused",
            },
        ),
    ))
    .await
    .unwrap();
    // A known request with a field this bridge does not know: the field is ignored.
    #[derive(serde::Serialize)]
    struct Ack {
        upto: schemas::FeedSeq,
        urgency: &'static str,
    }
    ws.send(raw_request(
        5,
        kind(
            "ack",
            Ack {
                upto: newest,
                urgency: "high",
            },
        ),
    ))
    .await
    .unwrap();
    for _ in 0..4 {
        match next(&mut ws).await {
            ServerFrame::Response { id, body } => {
                answers.insert(id.0, ServerFrame::Response { id, body })
            }
            ServerFrame::Error {
                id: Some(id),
                error,
            } => answers.insert(
                id.0,
                ServerFrame::Error {
                    id: Some(id),
                    error,
                },
            ),
            other => panic!("unexpected {other:?}"),
        };
    }
    let code = |id: u32| match &answers[&id] {
        ServerFrame::Error { error, .. } => Some(error.code),
        _ => None,
    };
    assert_eq!(
        code(2),
        Some(ErrorCode::UnknownRequest),
        "{:?}",
        answers[&2]
    );
    assert_eq!(
        code(3),
        Some(ErrorCode::UnknownRequest),
        "{:?}",
        answers[&3]
    );
    assert_eq!(code(4), Some(ErrorCode::BadRequest), "{:?}", answers[&4]);
    assert!(
        matches!(&answers[&5], ServerFrame::Response { body: Response::Acked { acked }, .. } if *acked == newest),
        "{:?}",
        answers[&5]
    );
    assert!(
        !answers.contains_key(&1),
        "the long-poll answered before there was anything"
    );

    // The long-poll in flight all along answers when a job arrives, and the job runs.
    let (job, _) = ep
        .client()
        .submit_job(
            &creds.device_id,
            &SubmitJob {
                payload: Some("after all that".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    match next(&mut ws).await {
        ServerFrame::Response {
            id,
            body: Response::Feed { entries, .. },
        } if id.0 == 1 => {
            assert_eq!(entries.len(), 1, "{entries:?}");
        }
        other => panic!("expected the long-poll's answer, got {other:?}"),
    }
    ws.send(Message::Binary(
        schemas::encode(&ClientFrame::Request {
            id: schemas::RequestId(6),
            body: Request::FetchJob {
                job_id: job.job_id.clone(),
                start: true,
            },
        })
        .unwrap()
        .into(),
    ))
    .await
    .unwrap();
    let attempt = match next(&mut ws).await {
        ServerFrame::Response {
            body: Response::Job(offer),
            ..
        } => offer.attempt,
        other => panic!("expected the job, got {other:?}"),
    };
    ws.send(Message::Binary(
        schemas::encode(&ClientFrame::Request {
            id: schemas::RequestId(7),
            body: Request::JobUpdate {
                job_id: job.job_id.clone(),
                attempt,
                update: schemas::job::JobUpdate::Succeeded { detail: None },
            },
        })
        .unwrap()
        .into(),
    ))
    .await
    .unwrap();
    assert!(matches!(
        next(&mut ws).await,
        ServerFrame::Response {
            body: Response::JobState { .. },
            ..
        }
    ));
    let view = ep.client().job(&job.job_id).await.unwrap();
    assert_eq!(view.state, schemas::job::JobState::Succeeded);
}

/// Reads one HTTP/1.1 response (head and a `content-length` body) from `stream`.
async fn read_response(stream: &mut tokio::net::TcpStream) -> std::io::Result<(u16, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status: u16 = head[9..12].parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let mut chunk = vec![0u8; length - body.len()];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok((status, body))
}

/// A client that sends the whole of a too-large body before it reads gets the 413, not a reset
/// (the bridge reads the rest before it answers), and the connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_too_large_body_sent_in_full_gets_its_413_on_a_connection_that_stays_open() {
    use tokio::io::AsyncWriteExt;
    let bridge = InProcessBridge::start().await;
    let token = bridge.endpoints.admin_token.expose().to_owned();
    let mut stream =
        tokio::net::TcpStream::connect(e2e_tests::socket_addr(&bridge.endpoints.admin))
            .await
            .unwrap();
    // Larger than the loopback socket buffers, so that a server that stops reading at the
    // limit leaves bytes unread and resets the connection.
    let body = format!("{{\"payload\":\"{}\"}}", "x".repeat(10 << 20));
    for attempt in 0..2 {
        let head = format!(
            "POST /v1/devices/dev-0000000000000000/jobs HTTP/1.1\r\nhost: bridge\r\n\
             authorization: Bearer {token}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body.as_bytes()).await.unwrap();
        let (status, bytes) = read_response(&mut stream)
            .await
            .unwrap_or_else(|e| panic!("attempt {attempt}: no response: {e}"));
        let error: schemas::api::ApiError = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            (status, error.code),
            (413, ErrorCode::PayloadTooLarge),
            "attempt {attempt}"
        );
    }
    // A body declared past the drain bound is refused from its head alone.
    let head = format!(
        "POST /v1/devices/dev-0000000000000000/jobs HTTP/1.1\r\nhost: bridge\r\n\
         authorization: Bearer {token}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        1u64 << 40
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (status, _) = read_response(&mut stream).await.unwrap();
    assert_eq!(status, 413);
}
