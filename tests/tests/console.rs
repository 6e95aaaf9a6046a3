#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The console's sessions at the HTTP level: who may sign in, what its cookie opens (an admin
//! session reads and, with its CSRF token, changes; an ops session only reads), that a revoked
//! login or a signed-out session opens nothing, that what was changed through the console is
//! on disk (listed after a `kill -9`, exported), and that the live stream carries an event
//! within a second of its change being durable and ends when the bridge stops.

use std::time::{Duration, Instant};

use e2e_tests::{BridgeProcess, Device, InProcessBridge, export, socket_addr};
use schemas::api::SubmitJob;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// What an answer says: status, headers (names lowercase), body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

fn head_of(text: &str) -> (u16, Vec<(String, String)>) {
    let mut lines = text.lines();
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (n.to_ascii_lowercase(), v.to_owned()))
        .collect();
    (status, headers)
}

async fn http(
    admin: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut tcp = tokio::net::TcpStream::connect(socket_addr(admin))
        .await
        .unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: bridge\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body);
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let (status, headers) = head_of(head);
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// A signed-in session: the cookie to send and the CSRF token.
struct Signed {
    cookie: String,
    csrf: String,
}

async fn sign_in(admin: &str, body: serde_json::Value) -> (Answer, Option<Signed>) {
    let answer = http(admin, "POST", "/console/session", &[], &body.to_string()).await;
    let signed = answer.header("set-cookie").map(|c| Signed {
        cookie: c.split(';').next().unwrap().to_owned(),
        csrf: answer.json()["csrf"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    });
    (answer, signed)
}

async fn with_cookie(
    admin: &str,
    s: &Signed,
    method: &str,
    path: &str,
    csrf: Option<&str>,
) -> Answer {
    let body = if method == "POST" {
        r#"{"customer":"acme"}"#
    } else {
        ""
    };
    let mut headers = vec![("Cookie", s.cookie.as_str())];
    if let Some(csrf) = csrf {
        headers.push(("X-CSRF-Token", csrf));
    }
    http(admin, method, path, &headers, body).await
}

/// The status of listing the devices with the session's cookie.
async fn reads(admin: &str, s: &Signed) -> u16 {
    with_cookie(admin, s, "GET", "/v1/devices", None)
        .await
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_open_what_their_login_may_and_nothing_after_revocation_or_sign_out() {
    let bridge = InProcessBridge::start().await;
    let ep = &bridge.endpoints;
    let admin = ep.admin.as_str();

    let page = http(admin, "GET", "/console/", &[], "").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("/console/app.js"));
    assert!(
        page.header("content-security-policy")
            .unwrap()
            .contains("default-src 'none'")
    );

    let (refused, none) = sign_in(admin, serde_json::json!({ "token": "not the token" })).await;
    assert_eq!((refused.status, none.is_none()), (401, true));
    let (both, _) = sign_in(
        admin,
        serde_json::json!({ "token": ep.admin_token.expose(), "ops_id": "x", "password": "y" }),
    )
    .await;
    assert_eq!(both.status, 400, "{}", both.body);

    let (answer, admin_session) = sign_in(
        admin,
        serde_json::json!({ "token": ep.admin_token.expose() }),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["role"], "admin");
    let cookie = answer.header("set-cookie").unwrap();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=28800"] {
        assert!(cookie.contains(part), "{cookie}");
    }
    assert!(
        !cookie.contains("Secure"),
        "plain HTTP on loopback: {cookie}"
    );
    let s = admin_session.unwrap();

    // Reads with the cookie alone; changes only with the session's CSRF token.
    assert_eq!(http(admin, "GET", "/v1/devices", &[], "").await.status, 401);
    assert_eq!(reads(admin, &s).await, 200);
    let tokens = "/v1/enrollment-tokens";
    let no_csrf = with_cookie(admin, &s, "POST", tokens, None).await;
    assert_eq!(no_csrf.status, 403, "{}", no_csrf.body);
    assert_eq!(no_csrf.json()["code"], "forbidden");
    let wrong = with_cookie(admin, &s, "POST", tokens, Some("0123")).await;
    assert_eq!(wrong.status, 403);
    let made = with_cookie(admin, &s, "POST", tokens, Some(&s.csrf)).await;
    assert_eq!(made.status, 201, "{}", made.body);
    let again = with_cookie(admin, &s, "GET", "/console/session", None).await;
    assert_eq!(
        again.json()["csrf"],
        s.csrf.as_str(),
        "a reloaded page gets its token again"
    );

    // An ops login reads everything and changes nothing, until it is revoked.
    let client = ep.client();
    let login = client.create_ops_login("night shift").await.unwrap();
    let (wrong_pw, _) = sign_in(
        admin,
        serde_json::json!({ "ops_id": login.ops_id.as_str(), "password": "guess" }),
    )
    .await;
    assert_eq!(wrong_pw.status, 401);
    let (answer, ops) = sign_in(
        admin,
        serde_json::json!({ "ops_id": login.ops_id.as_str(), "password": login.password.expose() }),
    )
    .await;
    assert_eq!(answer.json()["role"], "ops", "{}", answer.body);
    let ops = ops.unwrap();
    assert_eq!(reads(admin, &ops).await, 200);
    let change = with_cookie(admin, &ops, "POST", tokens, Some(&ops.csrf)).await;
    assert_eq!(change.status, 403, "{}", change.body);
    assert!(change.json()["message"].as_str().unwrap().contains("read"));
    // Every change asked for through the console is recorded with how it ended, newest first.
    let actions = with_cookie(admin, &s, "GET", "/console/actions", None)
        .await
        .json();
    let seen: Vec<(String, u64)> = actions
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["by"].as_str().unwrap().to_owned(),
                a["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let ops_by = format!("ops:{}", login.ops_id);
    let expected = [
        (ops_by.as_str(), 403),
        ("admin", 201),
        ("admin", 403),
        ("admin", 403),
    ];
    let expected: Vec<(String, u64)> = expected.iter().map(|(b, c)| (b.to_string(), *c)).collect();
    assert_eq!(seen, expected, "{actions}");
    assert_eq!(actions[0]["path"], tokens);
    client.revoke_ops_login(&login.ops_id).await.unwrap();
    assert_eq!(reads(admin, &ops).await, 401);

    // Signing out needs the token too, and ends the session.
    let path = "/console/session";
    assert_eq!(
        with_cookie(admin, &s, "DELETE", path, None).await.status,
        403
    );
    let out = with_cookie(admin, &s, "DELETE", path, Some(&s.csrf)).await;
    assert_eq!(out.status, 204);
    assert!(out.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(reads(admin, &s).await, 401);
}

/// Reads server-sent events until one of `event: ops` whose data holds every one of `needles`.
async fn next_ops_event(lines: &mut (impl AsyncBufReadExt + Unpin), needles: &[&str]) -> String {
    let mut kind = String::new();
    loop {
        let mut line = String::new();
        assert!(
            lines.read_line(&mut line).await.unwrap() > 0,
            "the stream ended"
        );
        let line = line.trim_end();
        if let Some(k) = line.strip_prefix("event: ") {
            kind = k.to_owned();
        } else if let Some(data) = line.strip_prefix("data: ")
            && kind == "ops"
            && needles.iter().all(|n| data.contains(n))
        {
            return data.to_owned();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_stream_carries_each_event_within_a_second_and_ends_with_the_bridge() {
    let mut bridge = InProcessBridge::start().await;
    let ep = bridge.endpoints.clone();
    let device = ep
        .online_device("SN-LIVE", Device::simulated(), |_| {})
        .await;

    assert_eq!(
        http(&ep.admin, "GET", "/console/events", &[], "")
            .await
            .status,
        401
    );
    let (_, s) = sign_in(
        &ep.admin,
        serde_json::json!({ "token": ep.admin_token.expose() }),
    )
    .await;
    let s = s.unwrap();
    let mut tcp = tokio::net::TcpStream::connect(socket_addr(&ep.admin))
        .await
        .unwrap();
    let request = format!(
        "GET /console/events HTTP/1.1\r\nHost: bridge\r\nCookie: {}\r\n\r\n",
        s.cookie
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(tcp);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        lines.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let (status, headers) = head_of(&head);
    assert_eq!(status, 200, "{head}");
    assert!(
        headers
            .iter()
            .any(|(n, v)| n == "content-type" && v.starts_with("text/event-stream"))
    );

    let job = SubmitJob {
        payload: Some("live".into()),
        ..Default::default()
    };
    let (submitted, _) = ep.client().submit_job(&device.id, &job).await.unwrap();
    // The submission is answered once it is durable: its event is on the stream within 1 s.
    let durable = Instant::now();
    let id = submitted.job_id.to_string();
    let queued = tokio::time::timeout(
        Duration::from_secs(1),
        next_ops_event(&mut lines, &[&id, r#""to":"queued""#]),
    )
    .await
    .expect("the queued transition within a second");
    assert!(
        queued.contains(r#""topic":"fleet/events/jobs/queued""#),
        "{queued}"
    );
    assert!(durable.elapsed() < Duration::from_secs(1));
    next_ops_event(&mut lines, &[&id, r#""to":"succeeded""#]).await;

    // The overview counts what the stream carried: the device online, the job's minute.
    let fleet = with_cookie(&ep.admin, &s, "GET", "/v1/fleet", None).await;
    assert_eq!(fleet.status, 200, "{}", fleet.body);
    let fleet = fleet.json();
    assert_eq!(
        (fleet["devices"].as_u64(), fleet["active"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(fleet["online"].as_u64() == Some(1), "{fleet}");
    assert_eq!(fleet["groups"][0]["devices"], 1);
    let minutes = fleet["minutes"].as_array().unwrap();
    let succeeded: u64 = minutes.iter().filter_map(|m| m["succeeded"].as_u64()).sum();
    assert_eq!(succeeded, 1, "{fleet}");
    assert!(
        minutes.iter().any(|m| m["latency_p50_ms"].is_u64()),
        "{fleet}"
    );
    let path = format!("/v1/devices/{}", device.id);
    let view = with_cookie(&ep.admin, &s, "GET", &path, None).await.json();
    assert_eq!(view["presence"]["mqtt"], true, "{view}");
    assert!(view["presence"]["left_at"].is_null(), "{view}");

    // Stopping the bridge ends the stream (it does not hold the shutdown up).
    bridge.running.take().unwrap().shutdown().await;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), lines.read_to_end(&mut rest))
        .await
        .expect("the stream ends")
        .unwrap();
}

/// The newest recorded console actions: (by, method, path, status).
async fn recorded(admin: &str, s: &Signed) -> Vec<(String, String, String, Option<u64>)> {
    let answer = with_cookie(admin, s, "GET", "/console/actions", None).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let text = |a: &serde_json::Value, k: &str| a[k].as_str().unwrap().to_owned();
    answer
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let status = a["status"].as_u64();
            (text(a, "by"), text(a, "method"), text(a, "path"), status)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_was_changed_through_the_console_outlives_a_kill_and_is_exported() {
    let dir = tempfile::tempdir().unwrap();
    let mut bridge = BridgeProcess::start(dir.path(), &[]).await;
    let admin = bridge.endpoints.admin.clone();
    let token = serde_json::json!({ "token": bridge.endpoints.admin_token.expose() });
    let (_, s) = sign_in(&admin, token.clone()).await;
    let s = s.unwrap();
    let tokens = "/v1/enrollment-tokens";
    let refused = with_cookie(&admin, &s, "POST", tokens, None).await;
    assert_eq!(refused.status, 403);
    let made = with_cookie(&admin, &s, "POST", tokens, Some(&s.csrf)).await;
    assert_eq!(made.status, 201, "{}", made.body);
    let post = |status| ("admin".into(), "POST".into(), tokens.into(), Some(status));
    let expected: Vec<(String, String, String, Option<u64>)> = vec![post(201), post(403)];
    assert_eq!(recorded(&admin, &s).await, expected);

    // No shutdown, no last flush: what was answered was on disk already.
    bridge.kill9().await;
    let exported: Vec<serde_json::Value> = export(dir.path())
        .into_iter()
        .filter(|l| l["type"] == "console_action")
        .collect();
    let statuses: Vec<u64> = exported
        .iter()
        .filter_map(|l| l["status"].as_u64())
        .collect();
    assert_eq!(statuses.len(), 2, "{exported:?}");
    assert!(statuses.contains(&201) && statuses.contains(&403));

    bridge.restart().await;
    let (_, s) = sign_in(&admin, token).await;
    let s = s.unwrap();
    assert_eq!(recorded(&admin, &s).await, expected);
}
