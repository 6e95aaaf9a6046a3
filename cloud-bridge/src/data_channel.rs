//! The WebSocket data channel: one authenticated connection per device.
//!
//! Each connection is one task that owns the socket. Every wait on the peer has a deadline: the
//! WebSocket handshake, the hello, and silence after it (the server pings; a peer that answers
//! nothing for `idle_timeout` is closed). Requests run concurrently, at most `max_inflight` per
//! connection (a long-polling sync must not hold up a status report); a device sending more gets
//! `overloaded` errors. Responses are written in completion order, each with a write deadline.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use schemas::data::{
    CLOSE_BAD_FRAME, CLOSE_FORBIDDEN, CLOSE_TIMEOUT, CLOSE_TOO_LARGE, CLOSE_UNAUTHORIZED,
    CLOSE_UNSUPPORTED_VERSION, ClientFrame, ErrorBody, ErrorCode, Hello, HelloAuth, ServerEvent,
    ServerFrame, Welcome,
};
use schemas::{DeviceId, PROTOCOL_VERSION};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::bridge::Bridge;
use crate::core::AuthFailure;
use crate::listener::{self, Accepted, Listener};
use crate::sessions::DataSession;

/// Deadlines and bounds of the data channel.
#[derive(Debug, Clone)]
pub struct DataChannelSettings {
    pub handshake_timeout: Duration,
    pub hello_timeout: Duration,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    pub max_frame_bytes: usize,
    pub max_inflight: usize,
    pub max_connections: usize,
}

impl Default for DataChannelSettings {
    fn default() -> Self {
        DataChannelSettings {
            handshake_timeout: Duration::from_secs(5),
            hello_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
            write_timeout: Duration::from_secs(10),
            max_frame_bytes: schemas::MAX_FRAME_BYTES,
            max_inflight: 8,
            max_connections: 8_000,
        }
    }
}

/// Accepts data-channel connections until `shutdown`; connection tasks go on `tracker`. The
/// listener caps the connections open at once (its `max_connections`) and does TLS when set.
pub async fn serve(
    listener: Listener,
    bridge: Bridge,
    settings: DataChannelSettings,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let settings = Arc::new(settings);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => return,
        };
        let peer = accepted.peer;
        let span = tracing::info_span!("data", %peer, device = tracing::field::Empty);
        let conn = Connection {
            bridge: bridge.clone(),
            settings: settings.clone(),
            shutdown: shutdown.clone(),
        };
        tracker.spawn(async move { conn.run(accepted).await }.instrument(span));
    }
}

type Ws = WebSocketStream<listener::Connection>;

struct Connection {
    bridge: Bridge,
    settings: Arc<DataChannelSettings>,
    shutdown: CancellationToken,
}

/// How a connection ended, for the log.
#[derive(Debug)]
enum End {
    Closed,
    Shutdown,
    Refused(ErrorBody),
    Io(String),
}

fn ws_config(max_frame_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(max_frame_bytes * 2)
        .max_message_size(Some(max_frame_bytes))
        .max_frame_size(Some(max_frame_bytes))
}

fn close_code_for(code: ErrorCode) -> u16 {
    match code {
        ErrorCode::BadFrame | ErrorCode::BadRequest => CLOSE_BAD_FRAME,
        ErrorCode::Unauthorized | ErrorCode::EnrollmentInvalid => CLOSE_UNAUTHORIZED,
        ErrorCode::DeviceDisabled | ErrorCode::DeviceInvalidated | ErrorCode::Forbidden => {
            CLOSE_FORBIDDEN
        }
        ErrorCode::HelloTimeout => CLOSE_TIMEOUT,
        ErrorCode::FrameTooLarge => CLOSE_TOO_LARGE,
        ErrorCode::UnsupportedVersion => CLOSE_UNSUPPORTED_VERSION,
        ErrorCode::ShuttingDown => 1001,
        _ => 1011,
    }
}

/// A read error of tungstenite as a typed protocol error.
fn read_error(e: &tungstenite::Error) -> ErrorBody {
    match e {
        tungstenite::Error::Capacity(c) => ErrorBody::new(ErrorCode::FrameTooLarge, c.to_string()),
        tungstenite::Error::Protocol(p) => ErrorBody::new(ErrorCode::BadFrame, p.to_string()),
        other => ErrorBody::new(ErrorCode::BadFrame, other.to_string()),
    }
}

impl Connection {
    async fn run(self, accepted: Accepted) {
        let peer = accepted.peer;
        // The TLS handshake (if any) and the WebSocket handshake share one deadline.
        let accepted = tokio::time::timeout(self.settings.handshake_timeout, async {
            let (stream, slot) = accepted.handshake().await.map_err(tungstenite::Error::Io)?;
            let ws = tokio_tungstenite::accept_async_with_config(
                stream,
                Some(ws_config(self.settings.max_frame_bytes)),
            )
            .await?;
            Ok::<_, tungstenite::Error>((ws, slot))
        })
        .await;
        // The slot is held as long as the connection is open.
        let (mut ws, _slot) = match accepted {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "websocket handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "websocket handshake timed out");
                return;
            }
        };
        let device = match self.hello(&mut ws).await {
            Ok(device) => device,
            Err(error) => {
                tracing::info!(code = error.code.as_str(), message = %error.message, "data channel refused");
                self.refuse(&mut ws, error).await;
                return;
            }
        };
        tracing::Span::current().record("device", tracing::field::display(&device));
        // Registered before the second check: a revocation between the hello and here is seen
        // by the check, one after it cancels the session.
        let session = self.bridge.data_session(&device);
        if let Some(e) = self.bridge.refusal(&device) {
            self.refuse(&mut ws, e.body()).await;
            return;
        }
        self.bridge.data_connected(&device, true);
        let end = self.serve(&mut ws, &device, &session).await;
        drop(session);
        self.bridge.data_connected(&device, false);
        match end {
            End::Refused(error) => {
                tracing::info!(code = error.code.as_str(), message = %error.message, "data channel closed on error");
                self.refuse(&mut ws, error).await;
            }
            End::Shutdown => {
                let frame = ServerFrame::Event(ServerEvent::Closing {
                    reason: "server shutting down".into(),
                });
                let _ = self.send(&mut ws, &frame).await;
                self.close(&mut ws, 1001, "shutting down").await;
            }
            End::Closed => tracing::debug!("data channel closed by device"),
            End::Io(e) => tracing::debug!(error = %e, "data channel lost"),
        }
    }

    /// Why a revoked device is refused (disabled, or invalidated with the reason).
    fn refused(&self, device: &DeviceId) -> ErrorBody {
        self.bridge.refusal(device).map_or_else(
            || ErrorBody::new(ErrorCode::DeviceDisabled, "device is disabled"),
            |e| e.body(),
        )
    }

    /// Sends a connection-level error, then closes with the matching code.
    async fn refuse(&self, ws: &mut Ws, error: ErrorBody) {
        let code = close_code_for(error.code);
        let _ = self
            .send(
                ws,
                &ServerFrame::Error {
                    id: None,
                    error: error.clone(),
                },
            )
            .await;
        self.close(ws, code, error.code.as_str()).await;
    }

    async fn close(&self, ws: &mut Ws, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: code.into(),
            reason: reason.to_owned().into(),
        };
        let _ = tokio::time::timeout(self.settings.write_timeout, ws.close(Some(frame))).await;
    }

    async fn send(&self, ws: &mut Ws, frame: &ServerFrame) -> Result<(), String> {
        let bytes = schemas::encode(frame).map_err(|e| e.to_string())?;
        match tokio::time::timeout(
            self.settings.write_timeout,
            ws.send(Message::Binary(bytes.into())),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("write timed out".into()),
        }
    }

    /// Reads and checks the hello; returns the authenticated device.
    async fn hello(&self, ws: &mut Ws) -> Result<DeviceId, ErrorBody> {
        let first = tokio::time::timeout(self.settings.hello_timeout, ws.next()).await;
        let bytes = match first {
            Err(_) => {
                return Err(ErrorBody::new(
                    ErrorCode::HelloTimeout,
                    "no hello before the deadline",
                ));
            }
            Ok(None) => return Err(ErrorBody::new(ErrorCode::BadFrame, "closed before hello")),
            Ok(Some(Err(e))) => return Err(read_error(&e)),
            Ok(Some(Ok(Message::Binary(b)))) => b,
            Ok(Some(Ok(_))) => {
                return Err(ErrorBody::new(
                    ErrorCode::BadFrame,
                    "expected a binary hello frame",
                ));
            }
        };
        let hello = match schemas::decode::<ClientFrame>(&bytes) {
            Ok(ClientFrame::Hello(h)) => h,
            Ok(_) => {
                return Err(ErrorBody::new(
                    ErrorCode::BadFrame,
                    "the first frame must be a hello",
                ));
            }
            Err(e) => return Err(ErrorBody::new(ErrorCode::BadFrame, e.to_string())),
        };
        let Hello {
            protocol,
            auth,
            agent,
        } = hello;
        if protocol != PROTOCOL_VERSION {
            return Err(ErrorBody::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "protocol {protocol} is not supported; this server speaks {PROTOCOL_VERSION}"
                ),
            ));
        }
        let (record, credentials) = match auth {
            HelloAuth::Device { device_id, secret } => {
                match self
                    .bridge
                    .authenticate(device_id.as_str(), secret.expose())
                {
                    Ok(d) => (d, None),
                    // With the reason (why it was invalidated), as its requests would get it.
                    Err(AuthFailure::Invalidated | AuthFailure::Disabled) => {
                        return Err(self.refused(&device_id));
                    }
                    Err(AuthFailure::UnknownDevice | AuthFailure::WrongSecret) => {
                        return Err(ErrorBody::new(
                            ErrorCode::Unauthorized,
                            "unknown device or wrong secret",
                        ));
                    }
                }
            }
            HelloAuth::Register(reg) => match self.bridge.register(&reg).await {
                Ok((d, secret)) => {
                    tracing::info!(device = %d.device_id, serial = %d.serial, "device registered");
                    (d, Some(secret))
                }
                Err(e) => return Err(e.body()),
            },
        };
        let (device, newest, acked) = (record.device_id, record.newest, record.acked);
        tracing::debug!(%agent, "hello accepted");
        let welcome = ServerFrame::Welcome(Welcome {
            protocol: PROTOCOL_VERSION,
            device_id: device.clone(),
            credentials,
            newest,
            acked,
            server_time: self.bridge.now(),
            poll_interval_secs: Some(self.bridge.poll_interval_secs()),
        });
        self.send(ws, &welcome)
            .await
            .map_err(|e| ErrorBody::new(ErrorCode::Internal, e))?;
        Ok(device)
    }

    async fn serve(&self, ws: &mut Ws, device: &DeviceId, session: &DataSession) -> End {
        let mut inflight = FuturesUnordered::new();
        let mut ping = tokio::time::interval(self.settings.ping_interval);
        ping.reset();
        let mut last_heard = tokio::time::Instant::now();
        loop {
            let idle_deadline = last_heard + self.settings.idle_timeout;
            tokio::select! {
                _ = self.shutdown.cancelled() => return End::Shutdown,
                _ = session.revoked() => return End::Refused(self.refused(device)),
                _ = tokio::time::sleep_until(idle_deadline) => {
                    return End::Refused(ErrorBody::new(ErrorCode::HelloTimeout, "no frame from the device within the idle timeout"));
                }
                _ = ping.tick() => {
                    if !self.bridge.is_active(device) {
                        return End::Refused(ErrorBody::new(ErrorCode::DeviceDisabled, "device is disabled"));
                    }
                    let sent = tokio::time::timeout(self.settings.write_timeout, ws.send(Message::Ping(Default::default()))).await;
                    if !matches!(sent, Ok(Ok(()))) {
                        return End::Io("ping failed".into());
                    }
                }
                Some(frame) = inflight.next(), if !inflight.is_empty() => {
                    if let Err(e) = self.send(ws, &frame).await {
                        return End::Io(e);
                    }
                }
                msg = ws.next() => {
                    last_heard = tokio::time::Instant::now();
                    let bytes = match msg {
                        None => return End::Closed,
                        Some(Err(e @ (tungstenite::Error::Capacity(_) | tungstenite::Error::Protocol(_)))) => {
                            return End::Refused(read_error(&e));
                        }
                        Some(Err(e)) => return End::Io(e.to_string()),
                        Some(Ok(Message::Binary(b))) => b,
                        Some(Ok(Message::Close(_))) => return End::Closed,
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                        Some(Ok(Message::Text(_))) => {
                            return End::Refused(ErrorBody::new(ErrorCode::BadFrame, "text frames are not part of the protocol"));
                        }
                    };
                    let (id, body) = match schemas::decode::<ClientFrame>(&bytes) {
                        Ok(ClientFrame::Request { id, body }) => (id, body),
                        Ok(ClientFrame::Hello(_)) => {
                            return End::Refused(ErrorBody::new(ErrorCode::BadFrame, "hello sent twice"));
                        }
                        Err(e) => return End::Refused(ErrorBody::new(ErrorCode::BadFrame, e.to_string())),
                    };
                    if inflight.len() >= self.settings.max_inflight {
                        let frame = ServerFrame::Error {
                            id: Some(id),
                            error: ErrorBody::new(ErrorCode::Overloaded, format!("more than {} requests in flight", self.settings.max_inflight)),
                        };
                        if let Err(e) = self.send(ws, &frame).await {
                            return End::Io(e);
                        }
                        continue;
                    }
                    let bridge = self.bridge.clone();
                    let device = device.clone();
                    inflight.push(async move {
                        match bridge.handle(&device, body).await {
                            Ok(body) => ServerFrame::Response { id, body },
                            Err(e) => ServerFrame::Error { id: Some(id), error: e.body() },
                        }
                    });
                }
            }
        }
    }
}
