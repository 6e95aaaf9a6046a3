//! The agent's LAN endpoint for poll-now nudges (see [`schemas::nudge`]).
//!
//! One JSON [`Nudge`] per connection, on one line; the answer is one JSON [`NudgeAnswer`] line.
//! A nudge is accepted only for this device, before its expiry, once per nudge id, and with the
//! token the cloud made for this device. An accepted nudge is passed on at once to the devices
//! below this one in the tree (each checks its own token), and this device polls after its own
//! delay.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use schemas::nudge::{MAX_NUDGE_BYTES, Nudge, NudgeAnswer, device_key, verify};
use schemas::{DeviceId, Secret, UnixMillis};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long one exchange on the LAN endpoint may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Nudge ids remembered against replays.
const SEEN: usize = 64;

/// A nudge this device accepted: it polls `delay` after receiving it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub nudge_id: String,
    pub delay: Duration,
}

/// Decides whether a nudge is for this device and made by the cloud.
#[derive(Debug)]
pub struct NudgeCheck {
    device_id: DeviceId,
    key: String,
    seen: Mutex<VecDeque<String>>,
}

impl NudgeCheck {
    pub fn new(device_id: DeviceId, secret: &Secret) -> NudgeCheck {
        NudgeCheck {
            device_id,
            key: device_key(secret.expose()),
            seen: Mutex::new(VecDeque::new()),
        }
    }

    /// Accepts `nudge` once, or says why not. `now` is the cloud's time as the device knows it.
    pub fn accept(&self, nudge: &Nudge, now: UnixMillis) -> Result<Accepted, String> {
        if nudge.node.device_id != self.device_id {
            return Err(format!("the nudge is for {}", nudge.node.device_id));
        }
        if now > nudge.not_after {
            return Err("the nudge has expired".into());
        }
        if !verify(&self.key, &nudge.nudge_id, nudge.not_after, &nudge.node) {
            return Err("the nudge's token is not valid for this device".into());
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(&nudge.nudge_id) {
            return Err("the nudge was already accepted".into());
        }
        seen.push_back(nudge.nudge_id.clone());
        if seen.len() > SEEN {
            seen.pop_front();
        }
        Ok(Accepted {
            nudge_id: nudge.nudge_id.clone(),
            delay: Duration::from_millis(u64::from(nudge.node.delay_ms)),
        })
    }
}

/// The cloud's time as the device knows it: its own clock corrected by the skew the last welcome
/// showed.
pub(crate) fn cloud_now(skew_ms: i64) -> UnixMillis {
    UnixMillis((UnixMillis::now().0 as i64 + skew_ms).max(0) as u64)
}

/// Passes an accepted nudge on to the devices below this one, each in its own task.
pub fn pass_on(nudge: &Nudge) {
    for child in &nudge.node.children {
        let next = Nudge {
            nudge_id: nudge.nudge_id.clone(),
            not_after: nudge.not_after,
            node: child.clone(),
        };
        tokio::spawn(async move {
            match send(&next.node.lan, &next).await {
                Ok(NudgeAnswer::Accepted) => {}
                Ok(NudgeAnswer::Refused { reason }) => {
                    tracing::warn!(device = %next.node.device_id, %reason, "nudge refused downstream")
                }
                Err(e) => {
                    tracing::warn!(device = %next.node.device_id, error = %e, "cannot pass the nudge on")
                }
            }
        });
    }
}

/// Sends a nudge to a device's LAN endpoint and reads its answer (what a parent device does,
/// and an administrator's tool on the LAN).
pub async fn send(lan: &str, nudge: &Nudge) -> Result<NudgeAnswer, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(lan).await.map_err(|e| e.to_string())?;
        let mut line = serde_json::to_vec(nudge).map_err(|e| e.to_string())?;
        line.push(b'\n');
        stream.write_all(&line).await.map_err(|e| e.to_string())?;
        let mut answer = String::new();
        BufReader::new(stream.take(4096))
            .read_line(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_str(&answer).map_err(|e| format!("bad answer {answer:?}: {e}"))
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer from {lan} within {EXCHANGE_TIMEOUT:?}"))?
}

/// Listens on `addr` until `shutdown`; accepted nudges go to `accepted`, refusals to
/// `refused`. Returns the address it listens on.
pub async fn listen(
    addr: SocketAddr,
    check: Arc<NudgeCheck>,
    clock_skew_ms: Arc<std::sync::atomic::AtomicI64>,
    accepted: mpsc::Sender<Accepted>,
    refused: mpsc::Sender<String>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (conn, peer) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::debug!(error = %e, "LAN accept failed");
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return,
            };
            let (check, skew) = (check.clone(), clock_skew_ms.clone());
            let (accepted, refused) = (accepted.clone(), refused.clone());
            tokio::spawn(async move {
                let skew = skew.load(std::sync::atomic::Ordering::Relaxed);
                if let Err(e) = serve(conn, &check, skew, &accepted, &refused).await {
                    tracing::debug!(%peer, error = %e, "LAN exchange failed");
                }
            });
        }
    });
    Ok(local)
}

async fn serve(
    conn: TcpStream,
    check: &NudgeCheck,
    skew_ms: i64,
    accepted: &mpsc::Sender<Accepted>,
    refused: &mpsc::Sender<String>,
) -> std::io::Result<()> {
    let (read, mut write) = conn.into_split();
    let mut line = Vec::new();
    let read = tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        BufReader::new(read.take(MAX_NUDGE_BYTES as u64 + 1))
            .read_until(b'\n', &mut line)
            .await
    })
    .await;
    let verdict = match read {
        Err(_) => Err("no nudge within the time allowed".to_owned()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(_)) if line.len() > MAX_NUDGE_BYTES => Err("the nudge is too large".to_owned()),
        Ok(Ok(_)) => match serde_json::from_slice::<Nudge>(&line) {
            Err(e) => Err(format!("not a nudge: {e}")),
            Ok(nudge) => {
                let now = cloud_now(skew_ms);
                check.accept(&nudge, now).map(|a| (a, nudge))
            }
        },
    };
    let answer = match verdict {
        Ok((a, nudge)) => {
            pass_on(&nudge);
            let _ = accepted.send(a).await;
            NudgeAnswer::Accepted
        }
        Err(reason) => {
            tracing::warn!(%reason, "nudge refused");
            let _ = refused.send(reason.clone()).await;
            NudgeAnswer::Refused { reason }
        }
    };
    let mut out = serde_json::to_vec(&answer).unwrap_or_default();
    out.push(b'\n');
    tokio::time::timeout(EXCHANGE_TIMEOUT, write.write_all(&out))
        .await
        .map_err(|_| std::io::Error::other("answer timed out"))?
}
