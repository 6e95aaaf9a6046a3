//! Who may connect: the [`Authenticator`] the embedder gives, what a login is, and why one is
//! refused (each refusal is a CONNACK return code).

use std::collections::HashMap;

use rumqttd::protocol::ConnectReturnCode;
use sha2::{Digest, Sha256};

/// Who an accepted MQTT CONNECT is, which decides what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    /// A device, by its id: it may subscribe to its own notify topic and publish its own
    /// presence, nothing else.
    Device(String),
    /// An operations tool, by its login (username): it may subscribe under `fleet/events/`
    /// and publish nothing.
    Ops(String),
}

/// Why an MQTT CONNECT was refused: each is answered with its MQTT 3.1.1 CONNACK return code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 2, identifier rejected: the client id is not the one these credentials may use.
    IdentifierRejected,
    /// 4, bad user name or password.
    BadCredentials,
    /// 5, not authorized: the credentials are right but the client may not log in (a
    /// disabled or invalidated device).
    NotAuthorized,
}

impl Refusal {
    pub(crate) fn return_code(self) -> ConnectReturnCode {
        match self {
            Refusal::IdentifierRejected => ConnectReturnCode::ClientIdentifierNotValid,
            Refusal::BadCredentials => ConnectReturnCode::BadUserNamePassword,
            Refusal::NotAuthorized => ConnectReturnCode::NotAuthorized,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::IdentifierRejected => "identifier_rejected",
            Refusal::BadCredentials => "bad_credentials",
            Refusal::NotAuthorized => "not_authorized",
        }
    }
}

/// Decides who an MQTT CONNECT is, or why it is refused. Called on a listener thread for every
/// CONNECT, so it must not block for long.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> Result<Login, Refusal>;
}

/// An authenticator for the standalone broker binary: a fixed table of device id → SHA-256 of
/// the secret (hex), where username and client id must both be the device id.
#[derive(Debug, Clone, Default)]
pub struct StaticAuthenticator {
    secrets_sha256: HashMap<String, String>,
}

impl StaticAuthenticator {
    /// Reads `device_id sha256hex` pairs, one per line; `#` starts a comment.
    pub fn from_lines(text: &str) -> Result<StaticAuthenticator, String> {
        let mut secrets_sha256 = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(id), Some(hash), None) if hash.len() == 64 => {
                    secrets_sha256.insert(id.to_owned(), hash.to_ascii_lowercase());
                }
                _ => {
                    return Err(format!(
                        "line {}: expected `<device id> <sha256 of secret, 64 hex digits>`",
                        n + 1
                    ));
                }
            }
        }
        Ok(StaticAuthenticator { secrets_sha256 })
    }

    pub fn len(&self) -> usize {
        self.secrets_sha256.len()
    }

    pub fn is_empty(&self) -> bool {
        self.secrets_sha256.is_empty()
    }
}

impl Authenticator for StaticAuthenticator {
    fn authenticate(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> Result<Login, Refusal> {
        let Some(expected) = self.secrets_sha256.get(username) else {
            return Err(Refusal::BadCredentials);
        };
        let actual: String = Sha256::digest(password.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if !constant_time_eq(actual.as_bytes(), expected.as_bytes()) {
            return Err(Refusal::BadCredentials);
        }
        if client_id != username {
            return Err(Refusal::IdentifierRejected);
        }
        Ok(Login::Device(username.to_owned()))
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
