//! Server settings a device can be given from outside (by its owner or an administrator,
//! through the API and the device's feed), and what the device reports it uses.

use serde::{Deserialize, Serialize};

use crate::UnixMillis;

/// Most endpoints of one kind a device holds.
pub const MAX_ENDPOINTS: usize = 8;
/// Longest endpoint, in bytes.
pub const MAX_ENDPOINT_LEN: usize = 256;

/// Where a device reaches the cloud, best first. The two lists are used independently: the
/// notification channel may run on its second broker while the data channel uses its first
/// URL.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Endpoints {
    /// Data channel URLs, `ws://host:port[/path]` or `wss://host:port[/path]` (TLS); at least
    /// one.
    #[schemars(length(min = 1, max = 8), inner(length(max = 256)))]
    #[schemars(extend("uniqueItems" = true))]
    pub data: Vec<String>,
    /// MQTT brokers, `host:port` or `mqtt://host:port`, or `mqtts://host:port` (TLS). Empty:
    /// no notification channel (the device long-polls).
    #[serde(default)]
    #[schemars(length(max = 8), inner(length(max = 256)))]
    #[schemars(extend("uniqueItems" = true))]
    pub mqtt: Vec<String>,
}

/// Why a list of endpoints cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("at least one data channel endpoint is needed")]
    NoDataEndpoint,
    #[error("at most {MAX_ENDPOINTS} {kind} endpoints (got {got})")]
    TooMany { kind: &'static str, got: usize },
    #[error("endpoint {endpoint:?}: {problem}")]
    Bad { endpoint: String, problem: String },
}

impl Endpoints {
    /// Checks that a device can use these endpoints: a data URL of the form `ws://host:port`,
    /// brokers of the form `host:port`, no duplicates, within the limits.
    pub fn validate(&self) -> Result<(), EndpointError> {
        self.check_bounds()?;
        if self.data.is_empty() {
            return Err(EndpointError::NoDataEndpoint);
        }
        for url in &self.data {
            parse_data_url(url).map_err(|problem| bad(url, problem))?;
        }
        for broker in &self.mqtt {
            parse_mqtt_endpoint(broker).map_err(|problem| bad(broker, problem))?;
        }
        for list in [&self.data, &self.mqtt] {
            if let Some(dup) = list
                .iter()
                .enumerate()
                .find(|(i, e)| list[..*i].contains(e))
            {
                return Err(bad(dup.1, "listed twice".into()));
            }
        }
        Ok(())
    }

    /// Only the limits (counts and lengths): what the cloud checks in a device's report, whose
    /// factory endpoints may use schemes this version does not offer.
    pub fn check_bounds(&self) -> Result<(), EndpointError> {
        for (kind, list) in [("data", &self.data), ("mqtt", &self.mqtt)] {
            if list.len() > MAX_ENDPOINTS {
                return Err(EndpointError::TooMany {
                    kind,
                    got: list.len(),
                });
            }
            if let Some(long) = list.iter().find(|e| e.len() > MAX_ENDPOINT_LEN) {
                return Err(bad(long, format!("longer than {MAX_ENDPOINT_LEN} bytes")));
            }
        }
        Ok(())
    }

    /// These endpoints first, then those of `fallback` not already listed, each list cut at
    /// [`MAX_ENDPOINTS`].
    pub fn followed_by(&self, fallback: &Endpoints) -> Endpoints {
        let chain = |first: &[String], then: &[String]| {
            let mut out: Vec<String> = Vec::new();
            for e in first.iter().chain(then) {
                if !out.contains(e) && out.len() < MAX_ENDPOINTS {
                    out.push(e.clone());
                }
            }
            out
        };
        Endpoints {
            data: chain(&self.data, &fallback.data),
            mqtt: chain(&self.mqtt, &fallback.mqtt),
        }
    }
}

fn bad(endpoint: &str, problem: String) -> EndpointError {
    let mut endpoint = endpoint.to_owned();
    if endpoint.len() > 64 {
        let cut = (0..=64)
            .rev()
            .find(|i| endpoint.is_char_boundary(*i))
            .unwrap_or(0);
        endpoint.truncate(cut);
        endpoint.push('…');
    }
    EndpointError::Bad { endpoint, problem }
}

/// Splits `host:port` (`[v6]:port` for IPv6) into host and port.
pub fn parse_broker(endpoint: &str) -> Result<(String, u16), String> {
    let (host, port) = endpoint
        .rsplit_once(':')
        .ok_or_else(|| "must be host:port".to_owned())?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/' || c == '@') {
        return Err("bad host".into());
    }
    let port: u16 = port.parse().map_err(|_| "bad port".to_owned())?;
    if port == 0 {
        return Err("port 0".into());
    }
    Ok((host.to_owned(), port))
}

/// An MQTT broker a device connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttEndpoint {
    pub host: String,
    pub port: u16,
    /// `mqtts://`: TLS, the server verified against the device's CA (or the system's roots).
    pub tls: bool,
}

/// Parses `host:port`, `mqtt://host:port` or `mqtts://host:port` (`mqtts://host` means port
/// 8883).
pub fn parse_mqtt_endpoint(endpoint: &str) -> Result<MqttEndpoint, String> {
    if let Some(rest) = endpoint.strip_prefix("mqtts://") {
        let rest = rest.trim_end_matches('/');
        let (host, port) = if rest
            .rsplit_once(':')
            .is_some_and(|(h, _)| !h.ends_with(':'))
        {
            parse_broker(rest)?
        } else {
            parse_broker(&format!("{rest}:8883"))?
        };
        return Ok(MqttEndpoint {
            host,
            port,
            tls: true,
        });
    }
    if endpoint.contains("://") && !endpoint.starts_with("mqtt://") {
        return Err("must be host:port, mqtt://host:port or mqtts://host:port".into());
    }
    let rest = endpoint.trim_start_matches("mqtt://").trim_end_matches('/');
    let (host, port) = parse_broker(rest)?;
    Ok(MqttEndpoint {
        host,
        port,
        tls: false,
    })
}

/// Checks a data channel URL, `ws://host:port[/path]` or `wss://host:port[/path]`; returns
/// whether it asks for TLS.
pub fn parse_data_url(url: &str) -> Result<bool, String> {
    let (rest, tls) = match (url.strip_prefix("ws://"), url.strip_prefix("wss://")) {
        (Some(rest), _) => (rest, false),
        (_, Some(rest)) => (rest, true),
        _ => return Err("must start with ws:// or wss://".to_owned()),
    };
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace".into());
    }
    let authority = rest.split('/').next().unwrap_or_default();
    parse_broker(authority)
        .map(|_| tls)
        .map_err(|e| format!("{e} (ws://host:port or wss://host:port expected)"))
}

/// Settings given to a device. New kinds of settings are added as optional fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeviceSettings {
    pub endpoints: Endpoints,
}

/// What a device says it uses, sent over the data channel whenever it changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SettingsReport {
    /// The newest settings revision the device applied; 0: its factory settings.
    pub revision: u64,
    /// The endpoint lists the device now works from, best first.
    pub endpoints: Endpoints,
    /// The data channel endpoint this report travels over.
    pub data_in_use: Option<String>,
    /// The broker the notification channel is connected to; `None`: not connected now.
    pub mqtt_in_use: Option<String>,
    /// Where the device accepts poll-now nudges on its LAN (`host:port`), if it does.
    #[serde(default)]
    pub lan_endpoint: Option<String>,
}

/// Settings as the cloud holds them for a device (`PUT /v1/devices/{id}/settings`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SettingsRecord {
    /// Counts up from 1 for each change; the device applies a revision once.
    pub revision: u64,
    pub settings: DeviceSettings,
    pub set_at: UnixMillis,
    /// Who set them (`admin`, `owner:own-…`).
    pub set_by: String,
}

/// The device's last report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ReportedSettings {
    pub report: SettingsReport,
    pub at: UnixMillis,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(data: &[&str], mqtt: &[&str]) -> Endpoints {
        Endpoints {
            data: data.iter().map(|s| s.to_string()).collect(),
            mqtt: mqtt.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn mqtt_endpoints_say_whether_they_want_tls() {
        let at = |s: &str| parse_mqtt_endpoint(s).map(|e| (e.host, e.port, e.tls));
        assert_eq!(at("a:1883"), Ok(("a".into(), 1883, false)));
        assert_eq!(at("mqtt://a:1884/"), Ok(("a".into(), 1884, false)));
        assert_eq!(at("mqtts://a"), Ok(("a".into(), 8883, true)));
        assert_eq!(at("mqtts://[::1]:8884"), Ok(("::1".into(), 8884, true)));
        assert_eq!(parse_data_url("wss://a:443/x"), Ok(true));
        assert_eq!(parse_data_url("ws://a:80"), Ok(false));
    }

    #[test]
    fn validates_endpoints() {
        assert!(
            eps(
                &[
                    "ws://a.example:8081",
                    "ws://10.0.0.2:80/data",
                    "wss://a.example:443"
                ],
                &[
                    "a:1883",
                    "[::1]:1884",
                    "mqtt://b:1883",
                    "mqtts://c:8883",
                    "mqtts://d"
                ]
            )
            .validate()
            .is_ok()
        );
        assert!(eps(&["ws://a:1"], &[]).validate().is_ok());
        assert_eq!(
            eps(&[], &["a:1"]).validate(),
            Err(EndpointError::NoDataEndpoint)
        );
        for bad_data in ["http://a:1", "wss://a", "ws://a", "ws://:80", "ws://a b:1"] {
            assert!(
                matches!(
                    eps(&[bad_data], &[]).validate(),
                    Err(EndpointError::Bad { .. })
                ),
                "{bad_data}"
            );
        }
        for bad_broker in [
            "a",
            "a:0",
            "a:99999",
            ":1883",
            "tcp://a:1883",
            "ws://a:1",
            "mqtts://:1",
        ] {
            assert!(
                matches!(
                    eps(&["ws://a:1"], &[bad_broker]).validate(),
                    Err(EndpointError::Bad { .. })
                ),
                "{bad_broker}"
            );
        }
        let nine: Vec<String> = (1..=9).map(|p| format!("ws://a:{p}")).collect();
        let too_many = Endpoints {
            data: nine,
            mqtt: vec![],
        };
        assert_eq!(
            too_many.validate(),
            Err(EndpointError::TooMany {
                kind: "data",
                got: 9
            })
        );
        assert!(matches!(
            eps(&["ws://a:1", "ws://a:1"], &[]).validate(),
            Err(EndpointError::Bad { .. })
        ));
        let long = format!("ws://{}:1", "h".repeat(300));
        assert!(eps(&[&long], &[]).check_bounds().is_err());
    }

    #[test]
    fn fallback_follows_without_duplicates() {
        let new = eps(&["ws://b:1", "ws://c:1"], &["b:1"]);
        let old = eps(&["ws://a:1", "ws://b:1"], &["a:1"]);
        assert_eq!(
            new.followed_by(&old),
            eps(&["ws://b:1", "ws://c:1", "ws://a:1"], &["b:1", "a:1"])
        );
    }
}
