//! The WebSocket data channel: one authenticated connection per device.
//!
//! Each connection is one task that owns the socket. Every wait on the peer has a deadline: the
//! WebSocket handshake, the hello, and silence after it (the server pings; a peer that answers
//! nothing for `idle_timeout` is closed). Requests run concurrently, at most `max_inflight` per
//! connection (a long-polling sync must not hold up a status report); a device sending more gets
//! `overloaded` errors. Responses are written in completion order, each with a write deadline.

use std::sync::Arc;
use std::time::Duration;

use frames::{FrameSocket, Incoming};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use schemas::data::{
    CLOSE_BAD_FRAME, CLOSE_FORBIDDEN, CLOSE_TIMEOUT, CLOSE_TOO_LARGE, CLOSE_UNAUTHORIZED,
    CLOSE_UNSUPPORTED_VERSION, ClientFrame, ErrorBody, ErrorCode, Hello, HelloAuth, ServerEvent,
    ServerFrame, Welcome,
};
use schemas::tolerant::FromDevice;
use schemas::{DeviceId, PROTOCOL_VERSION};
use tokio_tungstenite::tungstenite;
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

type Ws = FrameSocket<listener::Connection>;

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

impl Connection {
    async fn run(self, accepted: Accepted) {
        let peer = accepted.peer;
        // The TLS handshake (if any) and the WebSocket handshake share one deadline.
        let accepted = tokio::time::timeout(self.settings.handshake_timeout, async {
            let (stream, slot) = accepted.handshake().await.map_err(tungstenite::Error::Io)?;
            let ws = tokio_tungstenite::accept_async_with_config(
                stream,
                Some(frames::config(self.settings.max_frame_bytes)),
            )
            .await?;
            let ws = FrameSocket::new(ws, self.settings.write_timeout);
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
                let _ = ws.send(&frame).await;
                ws.close(1001, "shutting down").await;
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
        let frame = ServerFrame::Error {
            id: None,
            error: error.clone(),
        };
        let _ = ws.send(&frame).await;
        ws.close(code, error.code.as_str()).await;
    }

    /// Reads and checks the hello; returns the authenticated device.
    async fn hello(&self, ws: &mut Ws) -> Result<DeviceId, ErrorBody> {
        let first =
            tokio::time::timeout(self.settings.hello_timeout, ws.recv::<ClientFrame>()).await;
        let hello = match first {
            Err(_) => {
                return Err(ErrorBody::new(
                    ErrorCode::HelloTimeout,
                    "no hello before the deadline",
                ));
            }
            Ok(Incoming::Frame(ClientFrame::Hello(h))) => h,
            Ok(Incoming::Frame(_)) => {
                return Err(ErrorBody::new(
                    ErrorCode::BadFrame,
                    "the first frame must be a hello",
                ));
            }
            Ok(Incoming::Closed(_)) => {
                return Err(ErrorBody::new(ErrorCode::BadFrame, "closed before hello"));
            }
            Ok(Incoming::Text) => {
                return Err(ErrorBody::new(
                    ErrorCode::BadFrame,
                    "expected a binary hello frame",
                ));
            }
            Ok(Incoming::Bad(error)) => return Err(error),
            Ok(Incoming::Failed(e)) => return Err(ErrorBody::new(ErrorCode::BadFrame, e)),
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
        ws.send(&welcome)
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
                    if ws.ping().await.is_err() {
                        return End::Io("ping failed".into());
                    }
                }
                Some(frame) = inflight.next(), if !inflight.is_empty() => {
                    if let Err(e) = ws.send(&frame).await {
                        return End::Io(e);
                    }
                }
                msg = ws.recv_with(FromDevice::decode) => {
                    last_heard = tokio::time::Instant::now();
                    let (id, body) = match msg {
                        Incoming::Frame(FromDevice::Frame(ClientFrame::Request { id, body })) => (id, body),
                        Incoming::Frame(FromDevice::Rejected { id, error }) => {
                            tracing::debug!(code = error.code.as_str(), message = %error.message, "request not understood");
                            if let Err(e) = ws.send(&ServerFrame::Error { id: Some(id), error }).await {
                                return End::Io(e);
                            }
                            continue;
                        }
                        Incoming::Frame(FromDevice::Frame(ClientFrame::Hello(_))) => {
                            return End::Refused(ErrorBody::new(ErrorCode::BadFrame, "hello sent twice"));
                        }
                        Incoming::Closed(_) => return End::Closed,
                        Incoming::Text => {
                            return End::Refused(ErrorBody::new(ErrorCode::BadFrame, "text frames are not part of the protocol"));
                        }
                        Incoming::Bad(error) => return End::Refused(error),
                        Incoming::Failed(e) => return End::Io(e),
                    };
                    if inflight.len() >= self.settings.max_inflight {
                        let frame = ServerFrame::Error {
                            id: Some(id),
                            error: ErrorBody::new(ErrorCode::Overloaded, format!("more than {} requests in flight", self.settings.max_inflight)),
                        };
                        if let Err(e) = ws.send(&frame).await {
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
