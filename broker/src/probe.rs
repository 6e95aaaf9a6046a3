//! The broker's own probe: an MQTT CONNECT with a one-time identity, to know that *this* broker
//! serves (at start-up, and from the watchdog).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::BrokerError;

/// A one-time identity that only the readiness probe knows, and how it reaches the listener.
#[derive(Clone)]
pub(crate) struct ProbeIdentity {
    pub(crate) client_id: String,
    pub(crate) password: String,
    /// With a TLS listener: a client that checks nothing but that its own listener answers.
    pub(crate) tls: Option<Arc<tls::rustls::ClientConfig>>,
}

impl ProbeIdentity {
    pub(crate) fn new(tls: bool) -> ProbeIdentity {
        let mut hasher = Sha256::new();
        hasher.update(format!(
            "{:?}{:?}",
            Instant::now(),
            std::thread::current().id()
        ));
        hasher.update(std::process::id().to_le_bytes());
        let digest = hasher.finalize();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        ProbeIdentity {
            client_id: format!("broker-probe-{}", &hex[..16]),
            password: hex[16..].to_owned(),
            tls: tls.then(tls::self_probe_config),
        }
    }
}

/// Sends an MQTT 3.1.1 CONNECT with the probe identity until this broker answers CONNACK 0.
pub(crate) fn wait_ready(
    addr: SocketAddr,
    probe: &ProbeIdentity,
    timeout: Duration,
) -> Result<(), BrokerError> {
    let deadline = Instant::now() + timeout;
    let mut detail = String::from("no answer");
    while Instant::now() < deadline {
        match probe_once(addr, probe) {
            Ok(()) => return Ok(()),
            Err(e) => detail = e,
        }
        // Polling a port that rumqttd's listener thread is about to bind: there is no event
        // to wait on, so back off briefly between tries.
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotReady {
        addr,
        timeout,
        detail,
    })
}

pub(crate) fn probe_once(addr: SocketAddr, probe: &ProbeIdentity) -> Result<(), String> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .map_err(|e| format!("connect: {e}"))?;
    for timeout in [
        tcp.set_read_timeout(Some(Duration::from_secs(2))),
        tcp.set_write_timeout(Some(Duration::from_secs(2))),
    ] {
        timeout.map_err(|e| e.to_string())?;
    }
    let mut stream: Box<dyn ReadWrite> = match &probe.tls {
        None => Box::new(tcp),
        Some(config) => {
            let name = tls::server_name(&addr.ip().to_string()).map_err(|e| e.to_string())?;
            let session = tls::rustls::ClientConnection::new(config.clone(), name)
                .map_err(|e| format!("TLS: {e}"))?;
            Box::new(tls::rustls::StreamOwned::new(session, tcp))
        }
    };
    stream
        .write_all(&connect_packet(probe))
        .map_err(|e| format!("write: {e}"))?;
    let mut connack = [0u8; 4];
    stream
        .read_exact(&mut connack)
        .map_err(|e| format!("no CONNACK (another process on this port?): {e}"))?;
    if connack == [0x20, 0x02, 0x00, 0x00] {
        // Just close: the probe's session is clean, so nothing is left behind. (A DISCONNECT
        // racing the close makes rumqttd log a spurious "connection already gone" error.)
        Ok(())
    } else {
        Err(format!("unexpected CONNACK {connack:02x?}"))
    }
}

pub(crate) trait ReadWrite: Read + Write {}

impl<T: Read + Write> ReadWrite for T {}

pub(crate) fn connect_packet(probe: &ProbeIdentity) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut body = Vec::new();
    string(&mut body, "MQTT");
    body.push(4); // protocol level 3.1.1
    body.push(0b1100_0010); // username, password, clean session
    body.extend_from_slice(&10u16.to_be_bytes()); // keep-alive seconds
    string(&mut body, &probe.client_id);
    string(&mut body, &probe.client_id);
    string(&mut body, &probe.password);
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}
