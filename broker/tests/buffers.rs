#![allow(clippy::unwrap_used)]
//! What the broker keeps of a packet does not keep the connection's read buffer alive
//! (rumqttd patch 12): a publish in a commit log, a last will or a retained message outlives
//! the connection it came from, and a share of the 10 KB read buffer would pin all of it. Seen
//! in heaptrack of 3,000 devices that had all disconnected: 30.7 MB still live in
//! `Network::new`'s buffers.

use bytes::BytesMut;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{Connect, LastWill, Packet, Protocol, Publish, QoS};

fn connect_with_will() -> Packet {
    let connect = Connect {
        keep_alive: 30,
        client_id: "dev-a".into(),
        clean_session: false,
    };
    let will = LastWill {
        topic: "devices/dev-a/presence".into(),
        message: "offline".into(),
        qos: QoS::AtLeastOnce,
        retain: false,
    };
    Packet::Connect(connect, None, Some(will), None, None)
}

fn publish() -> Packet {
    Packet::Publish(
        Publish::new("devices/dev-a/presence", "online", false),
        None,
    )
}

/// Writes `packets` into a read buffer of the size the broker uses, reads them back with
/// `protocol`, and returns them with the buffer's address range.
fn read_back<P: Protocol>(
    mut protocol: P,
    packets: Vec<Packet>,
) -> (Vec<Packet>, std::ops::Range<usize>) {
    let mut wire = BytesMut::new();
    for p in packets {
        protocol.write(p, &mut wire).unwrap();
    }
    let mut read = BytesMut::with_capacity(10 * 1024);
    read.extend_from_slice(&wire);
    let start = read.as_ptr() as usize;
    let range = start..start + read.capacity();
    let mut got = Vec::new();
    while !read.is_empty() {
        got.push(protocol.read_mut(&mut read, 1024 * 1024).unwrap());
    }
    (got, range)
}

fn assert_outside(what: &str, bytes: &[u8], buffer: &std::ops::Range<usize>) {
    let at = bytes.as_ptr() as usize;
    assert!(
        !buffer.contains(&at),
        "the {what} points into the connection's read buffer"
    );
}

fn check<P: Protocol>(protocol: P) {
    let (got, buffer) = read_back(protocol, vec![connect_with_will(), publish()]);
    match &got[..] {
        [
            Packet::Connect(_, _, Some(will), _, _),
            Packet::Publish(publish, _),
        ] => {
            assert_eq!(&will.message[..], b"offline");
            assert_outside("will's topic", &will.topic, &buffer);
            assert_outside("will's message", &will.message, &buffer);
            assert_eq!(&publish.payload[..], b"online");
            assert_outside("publish's topic", &publish.topic, &buffer);
            assert_outside("publish's payload", &publish.payload, &buffer);
        }
        other => panic!("read back {other:?}"),
    }
}

#[test]
fn a_packet_read_from_the_network_does_not_share_the_read_buffer_v4() {
    check(V4);
}

#[test]
fn a_packet_read_from_the_network_does_not_share_the_read_buffer_v5() {
    check(V5);
}
