#![allow(clippy::unwrap_used)]
//! A connection's end is news only about that connection (rumqttd patch 14). The router reuses
//! a connection's slot for the next connection; a link that ends after the router has already
//! let its connection go (its client sent DISCONNECT, or another connection took its client id
//! over) must not close whichever connection has the slot now. Seen as a device that moved to a
//! new broker address losing its new connection the moment its old one closed.

use std::sync::Arc;
use std::time::Duration;

use broker::{Authenticator, BrokerSettings, EmbeddedBroker, Login, Refusal};
use bytes::BytesMut;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{Connect, Login as MqttLogin, Packet, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every device's secret is `right`.
struct Devices;

impl Authenticator for Devices {
    fn authenticate(&self, client_id: &str, user: &str, pass: &str) -> Result<Login, Refusal> {
        if client_id == user && pass == "right" {
            Ok(Login::Device(user.to_owned()))
        } else {
            Err(Refusal::BadCredentials)
        }
    }
}

const WAIT: Duration = Duration::from_secs(10);

fn encode(packet: Packet) -> Vec<u8> {
    let mut wire = BytesMut::new();
    V4.write(packet, &mut wire).unwrap();
    wire.to_vec()
}

fn connect(client_id: &str) -> Vec<u8> {
    let connect = Connect {
        keep_alive: 30,
        client_id: client_id.into(),
        clean_session: false,
    };
    let login = MqttLogin {
        username: client_id.into(),
        password: "right".into(),
    };
    encode(Packet::Connect(connect, None, None, None, Some(login)))
}

/// Reads one packet's bytes (fixed header, remaining length up to 127) or `None` at EOF.
async fn read_packet(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = [0u8; 2];
    tokio::time::timeout(WAIT, stream.read_exact(&mut head))
        .await
        .expect("nothing from the broker")
        .ok()?;
    let mut rest = vec![0u8; usize::from(head[1])];
    stream.read_exact(&mut rest).await.ok()?;
    Some([&head[..], &rest].concat())
}

async fn connected(addr: std::net::SocketAddr, client_id: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&connect(client_id)).await.unwrap();
    let ack = read_packet(&mut stream).await.expect("no CONNACK");
    assert_eq!(ack[0], 0x20, "{client_id}: expected a CONNACK, got {ack:?}");
    assert_eq!(ack[3], 0, "{client_id}: refused");
    stream
}

/// `old` closes (DISCONNECT, then its socket) while `next_id` connects; afterwards the new
/// connection must still answer a PINGREQ. Returns whether it did.
async fn survives(addr: std::net::SocketAddr, old_id: &str, next_id: &str) -> bool {
    let mut old = connected(addr, old_id).await;
    let mut next = TcpStream::connect(addr).await.unwrap();
    let hello = connect(next_id);
    let ((), sent) = tokio::join!(
        async {
            old.write_all(&[0xE0, 0x00]).await.unwrap();
            old.shutdown().await.unwrap();
        },
        next.write_all(&hello)
    );
    sent.unwrap();
    let ack = read_packet(&mut next).await.expect("no CONNACK");
    assert_eq!(ack[0], 0x20);
    // The old link has ended (and said so to the router) once its socket is closed.
    while read_packet(&mut old).await.is_some() {}
    // Everything the old link sent the router came before this ping.
    next.write_all(&[0xC0, 0x00]).await.unwrap();
    matches!(read_packet(&mut next).await.as_deref(), Some([0xD0, 0x00]))
}

async fn count_losses(old_id: &str, next_id: &str) -> usize {
    let settings = BrokerSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..BrokerSettings::default()
    };
    let (broker, _link) = EmbeddedBroker::start(&settings, Arc::new(Devices)).unwrap();
    let mut lost = 0;
    for _ in 0..5000 {
        if !survives(broker.addr(), old_id, next_id).await {
            lost += 1;
        }
    }
    lost
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_taken_over_as_the_old_connection_closes_stays_up() {
    assert_eq!(count_losses("dev-a", "dev-a").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_closing_does_not_close_the_next_device_to_connect() {
    assert_eq!(count_losses("dev-a", "dev-b").await, 0);
}
