//! Configuration: one TOML file, every key optional, unknown keys refused. Flags and
//! environment variables (`CLOUD_BRIDGE_*`) override the file; see `cloud-bridge serve --help`.
//! `cloud-bridge config` prints [`COMMENTED_DEFAULTS`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use schemas::Secret;
use serde::Deserialize;

use crate::core::JobPolicy;
use crate::data_channel::DataChannelSettings;

/// The defaults, as a commented TOML file (`cloud-bridge/defaults.toml`, a starting point for
/// an operator's own). A test checks that it parses to `Config::default()`.
pub const COMMENTED_DEFAULTS: &str = include_str!("../defaults.toml");

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub data_dir: PathBuf,
    pub admin_token: RedactedString,
    pub listen: Listen,
    pub broker: BrokerConfig,
    pub jobs: Jobs,
    pub devices: Devices,
    pub store: StoreConfig,
    pub retention: RetentionConfig,
    pub data_channel: DataChannel,
    pub tls: TlsConfig,
    pub admin: AdminConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("data"),
            admin_token: RedactedString::default(),
            listen: Listen::default(),
            broker: BrokerConfig::default(),
            jobs: Jobs::default(),
            devices: Devices::default(),
            store: StoreConfig::default(),
            retention: RetentionConfig::default(),
            data_channel: DataChannel::default(),
            tls: TlsConfig::default(),
            admin: AdminConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub handshake_timeout_ms: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            handshake_timeout_ms: 5000,
        }
    }
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        !self.cert.as_os_str().is_empty()
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub max_connections: usize,
    pub header_timeout_secs: u64,
    pub request_timeout_secs: u64,
    pub metrics_token: RedactedString,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            max_connections: 512,
            header_timeout_secs: 10,
            request_timeout_secs: 30,
            metrics_token: RedactedString::default(),
        }
    }
}

/// A string that `Debug` never shows.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct RedactedString(pub String);

impl std::fmt::Debug for RedactedString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("<redacted>")
        }
    }
}

/// A listen address: `ip:port`, or `host:port` with a name resolved now (its first IPv4
/// address, else its first), so that `localhost:8080` works.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(s)
        .map_err(|e| format!("{s}: {e} (a listen address is ip:port or host:port)"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{s}: the name resolves to no address"))
}

fn listen_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    parse_listen(&s).map_err(serde::de::Error::custom)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    #[serde(deserialize_with = "listen_addr")]
    pub admin: SocketAddr,
    #[serde(deserialize_with = "listen_addr")]
    pub data: SocketAddr,
    pub allow_plaintext: bool,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            admin: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data: SocketAddr::from(([127, 0, 0, 1], 8081)),
            allow_plaintext: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BrokerMode {
    Embedded,
    External,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    pub mode: BrokerMode,
    #[serde(deserialize_with = "listen_addr")]
    pub listen: SocketAddr,
    pub max_connections: usize,
    pub url: String,
    pub ca_file: PathBuf,
    pub client_id: String,
    pub username: String,
    pub password: RedactedString,
    pub queue: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            mode: BrokerMode::Embedded,
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            max_connections: 10_000,
            url: "mqtt://127.0.0.1:1883".into(),
            ca_file: PathBuf::new(),
            client_id: "cloud-bridge".into(),
            username: String::new(),
            password: RedactedString::default(),
            queue: 65536,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Jobs {
    pub lease_secs: u64,
    pub default_ttl_secs: u64,
    pub default_max_attempts: u32,
    pub print_session_secs: u64,
}

impl Default for Jobs {
    fn default() -> Self {
        Jobs {
            lease_secs: 60,
            default_ttl_secs: 86400,
            default_max_attempts: 3,
            print_session_secs: 300,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Devices {
    pub owner_check_window_secs: u64,
    pub poll_interval_secs: u32,
    pub presence_grace_ms: u64,
}

impl Default for Devices {
    fn default() -> Self {
        Devices {
            owner_check_window_secs: 600,
            poll_interval_secs: 86400,
            presence_grace_ms: 5000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub min_flush_interval_us: u64,
    /// 0: [`crate::core::default_shards`].
    pub shards: usize,
    /// fdatasync at every flush (see [`crate::store::SledStore::open`]).
    pub fsync: bool,
    pub cache_mb: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            min_flush_interval_us: 1000,
            shards: 0,
            fsync: true,
            cache_mb: 64,
        }
    }
}

impl StoreConfig {
    pub fn min_flush_interval(&self) -> Duration {
        Duration::from_micros(self.min_flush_interval_us)
    }

    pub fn shard_count(&self) -> usize {
        match self.shards {
            0 => crate::core::default_shards(),
            n => n,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    pub finished_jobs_secs: u64,
    pub archive: PathBuf,
    pub device_requests_secs: u64,
    pub settled_secs: u64,
    pub console_actions_secs: u64,
    pub sweep_interval_ms: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            finished_jobs_secs: 7 * 24 * 3600,
            archive: PathBuf::new(),
            device_requests_secs: 7 * 24 * 3600,
            settled_secs: 7 * 24 * 3600,
            console_actions_secs: 90 * 24 * 3600,
            sweep_interval_ms: 60_000,
        }
    }
}

impl RetentionConfig {
    pub fn retention(&self) -> crate::sweeper::Retention {
        let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        crate::sweeper::Retention {
            finished_jobs: secs(self.finished_jobs_secs),
            device_requests: secs(self.device_requests_secs),
            settled: secs(self.settled_secs),
            console_actions: secs(self.console_actions_secs),
            archive: (!self.archive.as_os_str().is_empty()).then(|| self.archive.clone()),
            interval: Duration::from_millis(self.sweep_interval_ms.max(10)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataChannel {
    pub hello_timeout_ms: u64,
    pub ping_interval_secs: u64,
    pub idle_timeout_secs: u64,
    pub max_connections: usize,
    pub max_inflight: usize,
}

impl Default for DataChannel {
    fn default() -> Self {
        DataChannel {
            hello_timeout_ms: 5000,
            ping_interval_secs: 15,
            idle_timeout_secs: 45,
            max_connections: 8_000,
            max_inflight: 8,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.devices.poll_interval_secs == 0 {
            return bad("devices.poll_interval_secs must be at least 1");
        }
        if self.devices.owner_check_window_secs == 0 {
            return bad("devices.owner_check_window_secs must be at least 1");
        }
        if self.jobs.lease_secs == 0 {
            return bad("jobs.lease_secs must be at least 1");
        }
        if self.jobs.default_ttl_secs == 0 {
            return bad("jobs.default_ttl_secs must be at least 1");
        }
        if !(1..=100).contains(&self.jobs.default_max_attempts) {
            return bad("jobs.default_max_attempts must be 1 to 100");
        }
        if self.data_channel.ping_interval_secs == 0
            || self.data_channel.idle_timeout_secs <= self.data_channel.ping_interval_secs
        {
            return bad(
                "data_channel.idle_timeout_secs must be larger than ping_interval_secs (> 0)",
            );
        }
        if self.data_channel.hello_timeout_ms == 0 || self.data_channel.max_inflight == 0 {
            return bad("data_channel.hello_timeout_ms and max_inflight must be positive");
        }
        if self.store.min_flush_interval_us > 100_000 {
            return bad("store.min_flush_interval_us must be at most 100000 (0.1 s)");
        }
        if self.store.shards > 4096 {
            return bad("store.shards must be at most 4096 (0: four per core)");
        }
        if self.broker.max_connections < 2 {
            return bad("broker.max_connections must be at least 2 (the bridge's link is one)");
        }
        if self.broker.queue == 0 {
            return bad("broker.queue must be positive");
        }
        if self.broker.mode == BrokerMode::External {
            self.external_endpoint()?;
        }
        if self.tls.cert.as_os_str().is_empty() != self.tls.key.as_os_str().is_empty() {
            return bad("tls.cert and tls.key go together: set both or neither");
        }
        if self.tls.handshake_timeout_ms == 0 {
            return bad("tls.handshake_timeout_ms must be positive");
        }
        if self.admin.max_connections == 0
            || self.admin.header_timeout_secs == 0
            || self.admin.request_timeout_secs == 0
        {
            return bad(
                "admin.max_connections, header_timeout_secs and request_timeout_secs must be positive",
            );
        }
        if self.data_channel.max_connections == 0 {
            return bad("data_channel.max_connections must be positive");
        }
        if !self.tls.enabled() && !self.listen.allow_plaintext {
            let mut exposed = vec![
                ("listen.admin", self.listen.admin),
                ("listen.data", self.listen.data),
            ];
            if self.broker.mode == BrokerMode::Embedded {
                exposed.push(("broker.listen", self.broker.listen));
            }
            if let Some((name, addr)) = exposed.into_iter().find(|(_, a)| !a.ip().is_loopback()) {
                return Err(ConfigError::Invalid(format!(
                    "{name} is {addr}, reachable from other machines, and TLS is off: device \
                     secrets, the admin token and job payloads would cross the network in \
                     clear. Set tls.cert and tls.key (`cloud-bridge tls init` makes a private \
                     CA and a certificate), or pass --allow-plaintext (listen.allow_plaintext) \
                     if plain text is intended (TLS ends in front of the bridge)"
                )));
            }
        }
        Ok(())
    }

    /// Host and port of `broker.url`.
    pub fn external_addr(&self) -> Result<(String, u16), ConfigError> {
        Ok(self.external_endpoint()?.0)
    }

    /// Host, port and TLS of `broker.url`.
    pub fn external_endpoint(&self) -> Result<((String, u16), bool), ConfigError> {
        let url = &self.broker.url;
        let (rest, tls, default_port) = if let Some(r) = url.strip_prefix("mqtts://") {
            (r, true, 8883)
        } else if let Some(r) = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
        {
            (r, false, 1883)
        } else {
            return Err(ConfigError::Invalid(format!(
                "broker.url {url:?} must start with mqtt:// or mqtts://"
            )));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| ConfigError::Invalid(format!("broker.url {url:?}: bad port")))?,
            ),
            _ => (rest, default_port),
        };
        if host.is_empty() {
            return Err(ConfigError::Invalid(format!("broker.url {url:?}: no host")));
        }
        Ok(((host.trim_matches(['[', ']']).to_owned(), port), tls))
    }

    pub fn job_policy(&self) -> JobPolicy {
        JobPolicy {
            owner_check_ms: self.devices.owner_check_window_secs.saturating_mul(1000),
            poll_interval_secs: self.devices.poll_interval_secs,
            print_session_ms: self.jobs.print_session_secs.max(1).saturating_mul(1000),
            lease_ms: self.jobs.lease_secs.saturating_mul(1000),
            default_ttl_ms: self.jobs.default_ttl_secs.saturating_mul(1000),
            default_max_attempts: self.jobs.default_max_attempts,
            max_attempts_limit: 100,
        }
    }

    pub fn data_channel_settings(&self) -> DataChannelSettings {
        DataChannelSettings {
            hello_timeout: Duration::from_millis(self.data_channel.hello_timeout_ms),
            ping_interval: Duration::from_secs(self.data_channel.ping_interval_secs),
            idle_timeout: Duration::from_secs(self.data_channel.idle_timeout_secs),
            max_connections: self.data_channel.max_connections,
            max_inflight: self.data_channel.max_inflight,
            ..DataChannelSettings::default()
        }
    }

    pub fn admin_secret(&self) -> Option<Secret> {
        (!self.admin_token.0.is_empty()).then(|| Secret::new(self.admin_token.0.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commented_defaults_are_the_defaults() {
        assert_eq!(
            Config::from_toml(COMMENTED_DEFAULTS).unwrap(),
            Config::default()
        );
        Config::default().validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::from_toml("[jobs]\nlease_sec = 5\n").unwrap_err();
        assert!(err.contains("lease_sec"), "{err}");
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let c = Config::from_toml("admin_token = \"tok-123\"\n[broker]\npassword = \"pw-456\"\n")
            .unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("tok-123") && !shown.contains("pw-456"),
            "{shown}"
        );
    }

    #[test]
    fn invalid_values_are_explained() {
        let c = Config::from_toml("[jobs]\nlease_secs = 0\n").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("lease_secs"));
        let c = Config::from_toml("[broker]\nmode = \"external\"\nurl = \"http://x\"\n").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("mqtt://"));
        let c = Config::from_toml("[tls]\ncert = \"a.pem\"\n").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("tls.key"));
    }

    #[test]
    fn a_listener_beyond_loopback_needs_tls_or_an_explicit_plaintext() {
        for (section, key) in [
            ("listen", "admin"),
            ("listen", "data"),
            ("broker", "listen"),
        ] {
            let text = format!("[{section}]\n{key} = \"0.0.0.0:9000\"\n");
            let c = Config::from_toml(&text).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(
                e.contains(&format!("{section}.{key}")) && e.contains("TLS"),
                "{e}"
            );
            let text = format!(
                "[{section}]\n{key} = \"0.0.0.0:9000\"\n[tls]\ncert = \"c\"\nkey = \"k\"\n"
            );
            Config::from_toml(&text).unwrap().validate().unwrap();
        }
        let c = Config::from_toml("[listen]\nadmin = \"0.0.0.0:9000\"\nallow_plaintext = true\n")
            .unwrap();
        c.validate().unwrap();
        // An external broker's address is not ours to listen on.
        let c = Config::from_toml("[broker]\nmode = \"external\"\nlisten = \"0.0.0.0:1883\"\n")
            .unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn external_broker_urls() {
        let at = |url: &str| {
            let mut c = Config::default();
            c.broker.url = url.into();
            c.external_endpoint().map_err(|e| e.to_string())
        };
        assert_eq!(at("mqtt://b:1884"), Ok((("b".into(), 1884), false)));
        assert_eq!(at("mqtts://b"), Ok((("b".into(), 8883), true)));
        assert_eq!(at("mqtts://[::1]:8884"), Ok((("::1".into(), 8884), true)));
        assert!(at("ws://b").is_err());
    }

    #[test]
    fn external_url_parses() {
        let c = Config::from_toml("[broker]\nurl = \"mqtt://broker.local:1884\"\n").unwrap();
        assert_eq!(c.external_addr().unwrap(), ("broker.local".into(), 1884));
    }
}
