//! Connections to backends: plain TCP, or TLS when the upstream has `tls`.
//!
//! [`UpstreamConnector`] is the pooled client's connector and is also used
//! on its own by upgraded (WebSocket) requests, which get a connection of
//! their own. The backend is found by address; the certificate is checked
//! against `server_name`, or the backend's IP address when none is given.
//! ALPN offers `h2` for `protocol: http2` and `http/1.1` otherwise.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::cert;
use crate::config::{UpstreamConfig, UpstreamProtocol, UpstreamTlsConfig};

/// The keep-alive client of one upstream (also used by its health checks).
pub type HttpClient = Client<UpstreamConnector, Full<Bytes>>;

/// Builds the keep-alive client for one upstream: HTTP/1.1, or HTTP/2 only
/// with `protocol: http2` (h2c, or h2 over TLS).
pub fn build_client(cfg: &UpstreamConfig) -> HttpClient {
    let connector = UpstreamConnector::new(cfg);
    Client::builder(TokioExecutor::new())
        .http2_only(cfg.protocol == UpstreamProtocol::Http2)
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(cfg.pool.idle_timeout.0)
        .pool_max_idle_per_host(cfg.pool.max_idle_per_backend)
        // A request on a pooled connection that the backend closed before
        // the request was written is re-sent on a new connection.
        .retry_canceled_requests(true)
        .build(connector)
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone)]
enum TlsSide {
    Off,
    On {
        connector: TlsConnector,
        server_name: Option<ServerName<'static>>,
    },
    /// The CA or client certificate could not be loaded: every connection
    /// fails with this reason (validation normally catches it first).
    Broken(Arc<str>),
}

/// Connects to backends of one upstream.
#[derive(Clone)]
pub struct UpstreamConnector {
    http: HttpConnector,
    tls: TlsSide,
}

fn client_config(
    t: &UpstreamTlsConfig,
    protocol: UpstreamProtocol,
) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    for c in cert::read_certs(&t.ca).map_err(|e| e.to_string())? {
        roots
            .add(c)
            .map_err(|e| format!("{}: unusable CA certificate: {e}", t.ca.display()))?;
    }
    let builder = ClientConfig::builder_with_provider(cert::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut cfg = match &t.client_cert {
        None => builder.with_no_client_auth(),
        Some(cc) => {
            let chain = cert::read_certs(&cc.cert).map_err(|e| e.to_string())?;
            let key = cert::read_key(&cc.key).map_err(|e| e.to_string())?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("{}: {e}", cc.key.display()))?
        }
    };
    cfg.alpn_protocols = match protocol {
        UpstreamProtocol::Http2 => vec![b"h2".to_vec()],
        UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
    };
    Ok(cfg)
}

impl UpstreamConnector {
    pub fn new(cfg: &UpstreamConfig) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(cfg.timeouts.connect.0));
        http.set_nodelay(true);
        http.enforce_http(false);
        let tls = match &cfg.tls {
            None => TlsSide::Off,
            Some(t) => match client_config(t, cfg.protocol) {
                Ok(c) => TlsSide::On {
                    connector: TlsConnector::from(Arc::new(c)),
                    server_name: t
                        .server_name
                        .as_deref()
                        .and_then(|n| ServerName::try_from(n.to_string()).ok()),
                },
                Err(e) => {
                    tracing::error!(error = %e, "upstream TLS cannot be set up; connections will fail");
                    TlsSide::Broken(e.into())
                }
            },
        };
        UpstreamConnector { http, tls }
    }

    /// Connects to `addr` (TLS included), for a connection used outside the
    /// pool.
    pub async fn connect_to(&self, addr: SocketAddr) -> Result<UpstreamStream, BoxError> {
        let uri: Uri = format!("http://{addr}/").parse()?;
        self.clone().connect(uri).await
    }

    async fn connect(mut self, uri: Uri) -> Result<UpstreamStream, BoxError> {
        use tower_service::Service;
        std::future::poll_fn(|cx| self.http.poll_ready(cx)).await?;
        let tcp = self.http.call(uri.clone()).await?;
        match self.tls {
            TlsSide::Off => Ok(UpstreamStream::Plain(tcp)),
            TlsSide::Broken(reason) => Err(io::Error::other(reason.to_string()).into()),
            TlsSide::On {
                connector,
                server_name,
            } => {
                let name = match server_name {
                    Some(n) => n,
                    None => {
                        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
                        ServerName::try_from(host.to_string())?
                    }
                };
                let tls = connector
                    .connect(name, tcp.into_inner())
                    .await
                    .map_err(|e| {
                        io::Error::new(e.kind(), format!("TLS handshake with backend: {e}"))
                    })?;
                Ok(UpstreamStream::Tls(Box::new(TokioIo::new(tls))))
            }
        }
    }
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = UpstreamStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

/// A connection to a backend.
pub enum UpstreamStream {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        match self {
            UpstreamStream::Plain(s) => s.connected(),
            UpstreamStream::Tls(s) => {
                let (tcp, session) = s.inner().get_ref();
                let c = tcp.connected();
                if session.alpn_protocol() == Some(b"h2") {
                    c.negotiated_h2()
                } else {
                    c
                }
            }
        }
    }
}

impl Read for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl Write for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }
}
