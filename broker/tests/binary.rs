#![allow(clippy::unwrap_used)]
//! The standalone `broker` binary admits exactly the devices in its credentials file and
//! refuses a malformed file with the line number.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
use sha2::{Digest, Sha256};

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn connect(port: u16, id: &str, pass: &str) -> Result<(), String> {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_credentials(id, pass);
    let (_client, mut eventloop) = AsyncClient::new(opts, 10);
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn admits_listed_devices_only() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    let hash: String = Sha256::digest(b"s3cret")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(
        &creds,
        format!("# device secrets\ndev-00000000000000aa {hash}\n"),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--credentials"])
        .arg(&creds)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _guard = Killed(child);
    // The binary prints its address only once a CONNECT has been answered.
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    assert_eq!(
        connect(port, "dev-00000000000000aa", "s3cret").await,
        Ok(())
    );
    assert!(
        connect(port, "dev-00000000000000aa", "wrong")
            .await
            .is_err()
    );
    assert!(
        connect(port, "dev-00000000000000bb", "s3cret")
            .await
            .is_err()
    );
}

#[test]
fn malformed_credentials_file_is_refused_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    std::fs::write(&creds, "# ok\ndev-1 not-a-hash\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["--listen", "127.0.0.1:0", "--credentials"])
        .arg(&creds)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"));
}
