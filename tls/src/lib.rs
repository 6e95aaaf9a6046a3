//! TLS for every listener and client of the system: rustls with ring as its one crypto provider.
//!
//! - [`server_config`]: a certificate chain and its key from PEM files, for the admin API, the
//!   data channel and the embedded broker's MQTT listener.
//! - [`client_config`]: verifies servers against a private CA from a PEM file, or against the
//!   system's roots; for the device agent and for the bridge's link to an external broker.
//! - [`create_private_ca`]: a private CA and a server certificate signed by it, written into a
//!   directory, so that a newcomer runs TLS locally in one step.
//! - [`create_private_dir`], [`create_private_file`]: where secrets are written (keys, tokens,
//!   a device's state), readable by their owner only.
//!
//! The provider is passed to every config explicitly (no process-wide default is installed),
//! so nothing depends on which other crates compiled a provider in. ring, not aws-lc: aws-lc
//! is a large C build, minutes on two cores.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

pub use rustls;
pub use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

mod private;
mod stream;
pub use private::{create_private_dir, create_private_file};
pub use stream::MaybeTls;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {detail}")]
    File { path: PathBuf, detail: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("no trusted root certificate: give a CA file ({0})")]
    NoRoots(String),
    #[error("creating certificates: {0}")]
    Generate(String),
    #[error("{path} already exists; remove the directory's certificates or pass --force")]
    Exists { path: PathBuf },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_error(path: &Path) -> impl FnOnce(rustls::pki_types::pem::Error) -> TlsError + '_ {
    move |e| TlsError::File {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

/// The certificates of a PEM file, at least one.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(file_error(path))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(file_error(path))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// A server's TLS configuration from its certificate chain and private key (PEM).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = read_certificates(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(file_error(key))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(config))
}

/// A client's TLS configuration: servers are verified against the certificates in `ca` (PEM),
/// or against the system's roots when `ca` is `None`.
pub fn client_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in read_certificates(path)? {
                roots.add(cert).map_err(|e| TlsError::File {
                    path: path.to_owned(),
                    detail: e.to_string(),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::debug!(error = %e, "a system certificate could not be read");
            }
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsError::NoRoots("the system has none".into()));
            }
        }
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The files [`create_private_ca`] writes.
#[cfg(feature = "ca")]
#[derive(Debug, Clone)]
pub struct CaFiles {
    /// The CA's certificate: what clients trust (`--ca-file`, `mosquitto_sub --cafile`).
    pub ca_cert: PathBuf,
    /// The CA's key: keep it offline once the server certificate is made.
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

#[cfg(feature = "ca")]
impl CaFiles {
    pub fn in_dir(dir: &Path) -> CaFiles {
        CaFiles {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca-key.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
        }
    }
}

/// Creates a private CA and a server certificate for `names` (DNS names or IP addresses;
/// `localhost`, `127.0.0.1` and `::1` are always included) in `dir`. Keys are written readable
/// by their owner only. Existing files are kept unless `force`.
#[cfg(feature = "ca")]
pub fn create_private_ca(dir: &Path, names: &[String], force: bool) -> Result<CaFiles, TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let files = CaFiles::in_dir(dir);
    if !force {
        for path in [
            &files.ca_cert,
            &files.ca_key,
            &files.server_cert,
            &files.server_key,
        ] {
            if path.exists() {
                return Err(TlsError::Exists { path: path.clone() });
            }
        }
    }
    let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());

    let ca_key = KeyPair::generate().map_err(generate)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "fleet events private CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).map_err(generate)?;

    let mut all: Vec<String> = ["localhost", "127.0.0.1", "::1"]
        .into_iter()
        .map(String::from)
        .collect();
    for n in names {
        if !all.contains(n) {
            all.push(n.clone());
        }
    }
    let server_key = KeyPair::generate().map_err(generate)?;
    let mut server = CertificateParams::new(all).map_err(generate)?;
    server
        .distinguished_name
        .push(DnType::CommonName, "fleet events server");
    server.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server
        .signed_by(&server_key, &ca_cert, &ca_key)
        .map_err(generate)?;

    create_dir(dir)?;
    write(&files.ca_cert, &ca_cert.pem(), false)?;
    write(&files.ca_key, &ca_key.serialize_pem(), true)?;
    write(
        &files.server_cert,
        &format!("{}{}", server_cert.pem(), ca_cert.pem()),
        false,
    )?;
    write(&files.server_key, &server_key.serialize_pem(), true)?;
    Ok(files)
}

#[cfg(feature = "ca")]
fn create_dir(dir: &Path) -> Result<(), TlsError> {
    create_private_dir(dir).map_err(|e| TlsError::File {
        path: dir.to_owned(),
        detail: e.to_string(),
    })
}

#[cfg(feature = "ca")]
fn write(path: &Path, text: &str, private: bool) -> Result<(), TlsError> {
    use std::io::Write;
    let io = |e: std::io::Error| TlsError::File {
        path: path.to_owned(),
        detail: e.to_string(),
    };
    let mut file = if private {
        create_private_file(path).map_err(io)?
    } else {
        std::fs::File::create(path).map_err(io)?
    };
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

/// A client configuration that accepts any server certificate: only for a process checking
/// that its own listener answers (the embedded broker's readiness probe and watchdog), never
/// for talking to another party.
pub fn self_probe_config() -> Arc<ClientConfig> {
    let provider = provider();
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports rustls's default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    Arc::new(config)
}

/// The handshake-signature checks of [`AnyServer`], the same for both TLS versions but for the
/// check they call.
macro_rules! verify_signature {
    ($($name:ident => $check:path),*) => {$(
        fn $name(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            $check(message, cert, dss, &self.0.signature_verification_algorithms)
        }
    )*};
}

/// Accepts any certificate, still checking that the handshake is signed by it.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    verify_signature!(
        verify_tls12_signature => rustls::crypto::verify_tls12_signature,
        verify_tls13_signature => rustls::crypto::verify_tls13_signature
    );

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The server name to verify for `host` (a DNS name or an IP address).
pub fn server_name(host: &str) -> Result<rustls::pki_types::ServerName<'static>, TlsError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| TlsError::Config(format!("{host:?} is not a server name: {e}")))
}

#[cfg(all(test, feature = "ca"))]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_client_trusting_the_private_ca_talks_to_the_server_and_others_do_not() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("tls");
        let files = create_private_ca(&dir, &["printers.example".into()], false).unwrap();
        assert!(matches!(
            create_private_ca(&dir, &[], false),
            Err(TlsError::Exists { .. })
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&files.ca_key), 0o600);
            assert_eq!(mode(&files.server_key), 0o600);
            assert_eq!(mode(&dir), 0o700);
        }
        let acceptor =
            TlsAcceptor::from(server_config(&files.server_cert, &files.server_key).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let _ = tls.write_all(b"hello").await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });

        for name in ["localhost", "127.0.0.1", "printers.example"] {
            let connector = TlsConnector::from(client_config(Some(&files.ca_cert)).unwrap());
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut tls = connector
                .connect(server_name(name).unwrap(), tcp)
                .await
                .unwrap();
            let mut got = Vec::new();
            tls.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello", "{name}");
        }
        // A name the certificate does not carry, and a CA the server was not signed by.
        let handshake = async |ca: &Path, name: &str| {
            let connector = TlsConnector::from(client_config(Some(ca)).unwrap());
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            connector.connect(server_name(name).unwrap(), tcp).await
        };
        assert!(
            handshake(&files.ca_cert, "elsewhere.example")
                .await
                .is_err()
        );
        let other = tempfile::tempdir().unwrap();
        let other = create_private_ca(other.path(), &[], false).unwrap();
        assert!(handshake(&other.ca_cert, "localhost").await.is_err());
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(matches!(
            client_config(Some(&empty)),
            Err(TlsError::NoCertificate { .. })
        ));
        let missing = dir.path().join("missing.pem");
        let e = server_config(&missing, &missing).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
    }
}
