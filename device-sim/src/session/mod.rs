//! The device side of the data channel: a cloneable [`DataSession`] handle and one task that
//! owns the WebSocket. Requests go to the task over a bounded channel; each reply comes back on
//! a oneshot, matched by request id, so many requests can be in flight at once. Each request
//! has a typed method (`calls.rs`); [`DataSession::request`] sends any.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use frames::{FrameSocket, Incoming};
use schemas::data::{
    ClientFrame, ErrorBody, ErrorCode, Hello, HelloAuth, Request, Response, ServerEvent,
    ServerFrame, Welcome,
};
use schemas::tolerant::FromServer;
use schemas::{PROTOCOL_VERSION, RequestId};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

mod calls;
pub use calls::LoggedIn;

#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    #[error("cannot connect to {url}: {detail}")]
    Connect { url: String, detail: String },
    /// The server refused the connection (bad credentials, disabled device, bad version...).
    #[error("refused by the server: {0}")]
    Refused(ErrorBody),
    /// The server answered this request with an error.
    #[error("request failed: {0}")]
    Request(ErrorBody),
    #[error("the data channel closed: {0}")]
    Closed(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The server answered with a response of another kind than the request asks for.
    #[error("unexpected answer: {0}")]
    Unexpected(String),
}

impl SessionError {
    /// The typed code, when the server gave one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            SessionError::Refused(b) | SessionError::Request(b) => Some(b.code),
            _ => None,
        }
    }
}

/// TCP to the URL's host and port (TCP_NODELAY on), then TLS for `wss://`, verifying the server
/// with `tls`.
async fn open_stream(
    url: &str,
    tls: Option<&Arc<tls::rustls::ClientConfig>>,
) -> Result<tls::MaybeTls, String> {
    let secure = schemas::settings::parse_data_url(url)?;
    let authority = url
        .split_once("://")
        .map(|(_, rest)| rest.split('/').next().unwrap_or_default())
        .unwrap_or_default();
    let (host, port) = schemas::settings::parse_broker(authority)?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    if !secure {
        return Ok(tls::MaybeTls::Plain(tcp));
    }
    let config = tls.ok_or_else(|| {
        "wss:// needs a way to verify the server: a CA file (ca_file) or the system's roots"
            .to_owned()
    })?;
    let name = tls::server_name(&host).map_err(|e| e.to_string())?;
    let stream = tls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    Ok(stream.into())
}

/// Timeouts of the device side.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub connect_timeout: Duration,
    /// Extra time allowed for a reply beyond the request's own long-poll wait.
    pub reply_timeout: Duration,
    pub ping_interval: Duration,
    /// Nothing heard from the server for this long: the connection is dead.
    pub idle_timeout: Duration,
    /// How `wss://` servers are verified (the agent builds it from its `ca_file`, or the
    /// system's roots). `None`: `wss://` endpoints cannot be used.
    pub tls: Option<Arc<tls::rustls::ClientConfig>>,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            connect_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(15),
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            tls: None,
        }
    }
}

type Reply = oneshot::Sender<Result<Response, SessionError>>;

#[derive(Debug)]
struct Call {
    body: Request,
    reply: Reply,
}

/// A connected, authenticated data channel. Clone it freely; it closes when every clone is
/// dropped, on [`DataSession::close`], or when the connection fails.
#[derive(Debug, Clone)]
pub struct DataSession {
    calls: mpsc::Sender<Call>,
    closed: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
    settings: SessionSettings,
}

impl DataSession {
    /// Connects, sends the hello, and waits for the welcome.
    pub async fn connect(
        url: &str,
        auth: HelloAuth,
        agent: &str,
        settings: SessionSettings,
    ) -> Result<(DataSession, Welcome), SessionError> {
        let connect_err = |detail: String| SessionError::Connect {
            url: url.to_owned(),
            detail,
        };
        let config = frames::config(schemas::MAX_FRAME_BYTES);
        let ws = tokio::time::timeout(settings.connect_timeout, async {
            let stream = open_stream(url, settings.tls.as_ref()).await?;
            tokio_tungstenite::client_async_with_config(url, stream, Some(config))
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|_| connect_err("timed out".into()))?
        .map_err(connect_err)?
        .0;
        let mut ws = FrameSocket::new(ws, settings.reply_timeout);

        let hello = ClientFrame::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            auth,
            agent: agent.to_owned(),
        });
        ws.send(&hello).await.map_err(connect_err)?;
        let welcome = tokio::time::timeout(settings.connect_timeout, async {
            loop {
                return match ws.recv::<ServerFrame>().await {
                    Incoming::Frame(ServerFrame::Welcome(w)) => Ok(w),
                    Incoming::Frame(ServerFrame::Error { error, .. }) => {
                        Err(SessionError::Refused(error))
                    }
                    Incoming::Frame(other) => Err(SessionError::Closed(format!(
                        "expected a welcome, got {other:?}"
                    ))),
                    Incoming::Text => continue,
                    Incoming::Bad(e) => Err(SessionError::Closed(format!(
                        "undecodable welcome: {}",
                        e.message
                    ))),
                    Incoming::Closed(frame) => Err(SessionError::Closed(format!(
                        "closed before welcome: {frame:?}"
                    ))),
                    Incoming::Failed(e) => Err(SessionError::Closed(e)),
                };
            }
        })
        .await
        .map_err(|_| SessionError::Timeout(settings.connect_timeout))??;

        let (calls, rx) = mpsc::channel(64);
        let closed = CancellationToken::new();
        let reason = Arc::new(Mutex::new(None));
        tokio::spawn(run(
            ws,
            rx,
            closed.clone(),
            reason.clone(),
            settings.clone(),
        ));
        Ok((
            DataSession {
                calls,
                closed,
                reason,
                settings,
            },
            welcome,
        ))
    }

    /// Sends a request and waits for its reply.
    pub async fn request(&self, body: Request) -> Result<Response, SessionError> {
        let wait = match &body {
            Request::Sync { wait_ms, .. } => Duration::from_millis(u64::from(*wait_ms)),
            _ => Duration::ZERO,
        };
        let timeout = wait + self.settings.reply_timeout;
        let (reply, rx) = oneshot::channel();
        // If the connection has ended, say why it ended rather than that it did.
        let ended = || {
            SessionError::Closed(
                self.close_reason()
                    .unwrap_or_else(|| "session task ended".into()),
            )
        };
        self.calls
            .send(Call { body, reply })
            .await
            .map_err(|_| ended())?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ended()),
            Err(_) => Err(SessionError::Timeout(timeout)),
        }
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Resolves when the connection has ended.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    pub fn close(&self) {
        self.closed.cancel();
    }
}

type Ws = FrameSocket<tls::MaybeTls>;

async fn run(
    mut ws: Ws,
    mut calls: mpsc::Receiver<Call>,
    closed: CancellationToken,
    close_reason: Arc<Mutex<Option<String>>>,
    settings: SessionSettings,
) {
    let mut pending: HashMap<RequestId, Reply> = HashMap::new();
    let mut next_id = 0u32;
    let mut ping = tokio::time::interval(settings.ping_interval);
    ping.reset();
    let mut last_heard = tokio::time::Instant::now();
    let reason = loop {
        tokio::select! {
            _ = closed.cancelled() => break "closed by the device".to_owned(),
            _ = tokio::time::sleep_until(last_heard + settings.idle_timeout) => {
                break format!("nothing heard for {:?}", settings.idle_timeout);
            }
            _ = ping.tick() => {
                if ws.ping().await.is_err() {
                    break "ping failed".to_owned();
                }
            }
            call = calls.recv() => {
                let Some(Call { body, reply }) = call else { break "every handle dropped".to_owned() };
                next_id = next_id.wrapping_add(1);
                let id = RequestId(next_id);
                let frame = ClientFrame::Request { id, body };
                if let Err(e) = ws.send(&frame).await {
                    let _ = reply.send(Err(SessionError::Closed(e.clone())));
                    break format!("write failed: {e}");
                }
                pending.insert(id, reply);
            }
            msg = ws.recv_with(FromServer::decode) => {
                last_heard = tokio::time::Instant::now();
                match msg {
                    Incoming::Frame(FromServer::Unreadable { id, error }) => {
                        tracing::debug!(message = %error.message, "an answer from a newer server");
                        if let Some(reply) = pending.remove(&id) {
                            let _ = reply.send(Err(SessionError::Request(error)));
                        }
                    }
                    Incoming::Frame(FromServer::UnknownEvent) => continue,
                    Incoming::Frame(FromServer::Frame(ServerFrame::Response { id, body })) => {
                        if let Some(reply) = pending.remove(&id) {
                            let _ = reply.send(Ok(body));
                        }
                    }
                    Incoming::Frame(FromServer::Frame(ServerFrame::Error { id: Some(id), error })) => {
                        if let Some(reply) = pending.remove(&id) {
                            let _ = reply.send(Err(SessionError::Request(error)));
                        }
                    }
                    Incoming::Frame(FromServer::Frame(ServerFrame::Error { id: None, error })) => {
                        for (_, reply) in pending.drain() {
                            let _ = reply.send(Err(SessionError::Refused(error.clone())));
                        }
                        break format!("server error: {error}");
                    }
                    Incoming::Frame(FromServer::Frame(ServerFrame::Event(ServerEvent::Closing { reason }))) => break format!("server closing: {reason}"),
                    Incoming::Frame(FromServer::Frame(ServerFrame::Welcome(_))) | Incoming::Text => continue,
                    Incoming::Closed(frame) => break format!("closed by the server: {frame:?}"),
                    Incoming::Bad(e) => break format!("undecodable frame from the server: {}", e.message),
                    Incoming::Failed(e) => break e,
                }
            }
        }
    };
    tracing::debug!(%reason, "data channel closed");
    *close_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
    closed.cancel();
    for (_, reply) in pending.drain() {
        let _ = reply.send(Err(SessionError::Closed(reason.clone())));
    }
    ws.close_plain().await;
}
