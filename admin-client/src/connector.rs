//! Connections for the client: TCP (TCP_NODELAY) and, for `https://`, TLS.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use hyper::Uri;
use hyper_util::rt::TokioIo;

#[derive(Debug, Clone)]
pub(super) struct Connector {
    /// Given, or built from the system's roots on the first `https://` request.
    tls: Arc<OnceLock<Result<Arc<tls::rustls::ClientConfig>, String>>>,
}

impl Connector {
    pub(super) fn new(tls: Option<Arc<tls::rustls::ClientConfig>>) -> Connector {
        let cell = OnceLock::new();
        if let Some(config) = tls {
            let _ = cell.set(Ok(config));
        }
        Connector {
            tls: Arc::new(cell),
        }
    }
}

type Connecting = Pin<Box<dyn Future<Output = io::Result<TokioIo<tls::MaybeTls>>> + Send>>;

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<tls::MaybeTls>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Connecting {
        let tls = self.tls.clone();
        Box::pin(async move {
            let secure = match uri.scheme_str() {
                Some("https") => true,
                Some("http") => false,
                other => {
                    return Err(io::Error::other(format!("unsupported scheme {other:?}")));
                }
            };
            let host = uri
                .host()
                .ok_or_else(|| io::Error::other("no host"))?
                .trim_matches(['[', ']'])
                .to_owned();
            let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            if !secure {
                return Ok(TokioIo::new(tls::MaybeTls::Plain(tcp)));
            }
            let config = tls
                .get_or_init(|| tls::client_config(None).map_err(|e| e.to_string()))
                .clone()
                .map_err(io::Error::other)?;
            let name = tls::server_name(&host).map_err(io::Error::other)?;
            let stream = tls::TlsConnector::from(config).connect(name, tcp).await?;
            Ok(TokioIo::new(stream.into()))
        })
    }
}
