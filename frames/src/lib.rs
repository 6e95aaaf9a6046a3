//! The data channel's framing, the same at both ends (the bridge's `data_channel` and the
//! agent's `session`): every frame is one binary WebSocket message holding one MessagePack
//! value (see `schemas::data`). A [`FrameSocket`] sends frames under a write deadline and reads
//! them as typed values, saying in one [`Incoming`] what else arrived instead.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use schemas::data::{ErrorBody, ErrorCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};

/// The WebSocket settings of both ends: frames of at most `max_frame_bytes`, small buffers
/// (about 20 KB per open connection instead of tungstenite's default 135 KB).
pub fn config(max_frame_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(max_frame_bytes * 2)
        .max_message_size(Some(max_frame_bytes))
        .max_frame_size(Some(max_frame_bytes))
}

/// What reading the next frame gave.
#[derive(Debug)]
pub enum Incoming<T> {
    Frame(T),
    /// A text message: not part of the protocol (the bridge refuses it).
    Text,
    /// The peer closed the connection, with the reason it gave.
    Closed(Option<String>),
    /// The peer broke the framing: a frame too large, a bad WebSocket frame, or bytes that do
    /// not decode. The error is what to answer.
    Bad(ErrorBody),
    /// The connection failed.
    Failed(String),
}

/// A WebSocket carrying MessagePack frames.
#[derive(Debug)]
pub struct FrameSocket<S> {
    ws: WebSocketStream<S>,
    write_timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> FrameSocket<S> {
    /// Frames over `ws`; every write must finish within `write_timeout`.
    pub fn new(ws: WebSocketStream<S>, write_timeout: Duration) -> FrameSocket<S> {
        FrameSocket { ws, write_timeout }
    }

    /// Sends one frame.
    pub async fn send<T: Serialize>(&mut self, frame: &T) -> Result<(), String> {
        let bytes = schemas::encode(frame).map_err(|e| e.to_string())?;
        self.write(Message::Binary(bytes.into())).await
    }

    pub async fn ping(&mut self) -> Result<(), String> {
        self.write(Message::Ping(Default::default())).await
    }

    async fn write(&mut self, message: Message) -> Result<(), String> {
        match tokio::time::timeout(self.write_timeout, self.ws.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("write timed out".into()),
        }
    }

    /// The next frame, or what came instead. Pings, pongs and raw frames are skipped.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Incoming<T> {
        self.recv_with(|bytes| {
            schemas::decode::<T>(bytes)
                .map_err(|e| ErrorBody::new(ErrorCode::BadFrame, e.to_string()))
        })
        .await
    }

    /// As [`FrameSocket::recv`], decoding with `decode` (an `Err` is [`Incoming::Bad`]): for
    /// the tolerant readers of `schemas::tolerant`.
    pub async fn recv_with<T>(
        &mut self,
        decode: impl FnOnce(&[u8]) -> Result<T, ErrorBody>,
    ) -> Incoming<T> {
        loop {
            let bytes = match self.ws.next().await {
                None => return Incoming::Closed(None),
                Some(Ok(Message::Binary(b))) => b,
                Some(Ok(Message::Close(frame))) => {
                    return Incoming::Closed(frame.map(|f| format!("{} {}", f.code, f.reason)));
                }
                Some(Ok(Message::Text(_))) => return Incoming::Text,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Err(
                    e @ (tungstenite::Error::Capacity(_) | tungstenite::Error::Protocol(_)),
                )) => {
                    return Incoming::Bad(read_error(&e));
                }
                Some(Err(e)) => return Incoming::Failed(e.to_string()),
            };
            return match decode(&bytes) {
                Ok(frame) => Incoming::Frame(frame),
                Err(error) => Incoming::Bad(error),
            };
        }
    }

    /// Closes with `code` and `reason` (within the write deadline).
    pub async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: code.into(),
            reason: reason.to_owned().into(),
        };
        let _ = tokio::time::timeout(self.write_timeout, self.ws.close(Some(frame))).await;
    }

    /// Closes without a code (within the write deadline).
    pub async fn close_plain(&mut self) {
        let _ = tokio::time::timeout(self.write_timeout, self.ws.close(None)).await;
    }
}

/// A read error of tungstenite as a typed protocol error.
fn read_error(e: &tungstenite::Error) -> ErrorBody {
    match e {
        tungstenite::Error::Capacity(c) => ErrorBody::new(ErrorCode::FrameTooLarge, c.to_string()),
        other => ErrorBody::new(ErrorCode::BadFrame, other.to_string()),
    }
}
