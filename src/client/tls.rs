//! Reaching a daemon that serves TLS: `https://` endpoints, the CAs to trust, a client
//! certificate for mTLS, and failures that say "certificate" instead of a transport dump.
//!
//! Connections are made here (TCP, then TLS with tokio-rustls and ring), not by tonic's own
//! connector and `tls_config`: a daemon that refuses a client certificate says so in a TLS alert
//! that arrives after the client's side of a TLS 1.3 handshake is done, and hyper then fails the
//! first call with a bare "operation was canceled". The connector's streams keep what explains it
//! (the first read error; a TLS record where plaintext HTTP/2 was expected) so that
//! [`Remote::explain`] and `Endpoints::explain` can say what happened, and a run over replicas can
//! stop at once (a certificate refused by one is refused by all) instead of retrying.
//!
//! [`Transport`] is how every connection to one daemon address is made, for one-shot clients
//! ([`Remote`]), the endpoints' channels and each replica of a run alike.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tonic::codegen::http::Uri;
use tonic::codegen::Service;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use super::ClientError;

/// TLS settings of a client (batchctl's `--tls-*` flags).
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// PEM file of the CAs that sign the daemon's certificate; `None`: the system's CAs.
    pub ca: Option<PathBuf>,
    /// PEM certificate chain presented to a daemon that asks for one (mTLS), with `key`.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// Name the daemon's certificate must hold, when it is not the endpoint's host.
    pub server_name: Option<String>,
}

/// [`ClientTls`] read and checked: the rustls config every TLS connection of a client shares.
#[derive(Clone)]
pub struct TlsSetup {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("server_name", &self.server_name)
            .field(
                "client_certificate",
                &self.config.client_auth_cert_resolver.has_certs(),
            )
            .finish()
    }
}

/// One daemon to connect to, plaintext (`http://`) or TLS (`https://`), for one-shot clients:
/// its connections' failures are explained ([`Remote::explain`]).
#[derive(Debug, Clone, Default)]
pub struct Remote {
    /// `http://host:port` (plaintext) or `https://host:port` (TLS).
    pub endpoint: String,
    /// TLS settings; they need an `https://` endpoint.
    pub tls: ClientTls,
    /// The first read error of a connection to it (a TLS alert from the daemon).
    alert: Alert,
}

/// Where a client's connections leave their first read error (a TLS alert, or TLS where plaintext
/// was expected), shared by the clones of what made them.
pub(crate) type Alert = Arc<Mutex<Option<String>>>;

/// What a plaintext connection records when the daemon answers with a TLS record.
pub(crate) const SPEAKS_TLS: &str = "the daemon answered with TLS";

/// How the connections to one daemon address are made: the endpoint's settings, and the connector
/// that does TCP, then TLS for `https://` (tonic's own TLS is not used: see the module's doc).
#[derive(Clone)]
pub(crate) struct Transport {
    endpoint: Endpoint,
    connector: Connector,
}

/// Connects TCP (then TLS, when configured) to the host and port of the URI tonic passes.
#[derive(Clone)]
pub(super) struct Connector {
    tls: Option<(Arc<ClientConfig>, Option<ServerName<'static>>)>,
    alert: Alert,
}

/// A connection that keeps what explains its failure in its target's [`Alert`].
pub(super) struct Recorded {
    io: Stream,
    alert: Alert,
    /// Nothing was read yet (a plaintext connection checks the first bytes for TLS).
    first: bool,
}

/// A plaintext or TLS stream.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

// === impl Remote ===

impl Remote {
    /// A plaintext or TLS endpoint with default TLS settings (the system's CAs).
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            ..Self::default()
        }
    }

    /// A daemon reached with these TLS settings.
    pub fn with_tls(endpoint: impl Into<String>, tls: ClientTls) -> Self {
        Self {
            endpoint: endpoint.into(),
            tls,
            alert: Alert::default(),
        }
    }

    /// Whether the endpoint is `https://`.
    pub fn is_tls(&self) -> bool {
        is_https(&self.endpoint)
    }

    /// A failed call, told better when the daemon closed a TLS connection over a certificate or
    /// answered a plaintext one with TLS.
    pub fn explain(&self, e: ClientError) -> ClientError {
        explain(&self.alert, &self.endpoint, e)
    }

    /// The transport to the endpoint, with its TLS files checked: a file that cannot be used, or
    /// a TLS flag with an `http://` endpoint, is a usage error.
    pub(super) fn transport(&self) -> Result<Transport, ClientError> {
        let tls = match (self.is_tls(), self.tls.flag_set()) {
            (false, Some(flag)) => {
                return Err(ClientError::BadEndpoint(
                    self.endpoint.clone(),
                    format!("{flag} needs an https:// endpoint"),
                ))
            }
            (false, None) => None,
            (true, _) => Some(self.tls.prepare()?),
        };
        Transport::new(&self.endpoint, None, tls.as_ref(), &self.alert)
    }
}

/// Whether `url` is `https://…`.
pub(crate) fn is_https(url: &str) -> bool {
    url.get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
}

/// A failed call explained by what a connection recorded in `alert`: a certificate refused, or
/// TLS where plaintext was expected. Other failures are returned as they are.
pub(crate) fn explain(alert: &Alert, endpoint: &str, e: ClientError) -> ClientError {
    let ClientError::Call(status) = &e else {
        return e;
    };
    if !matches!(
        status.code(),
        Code::Cancelled | Code::Unknown | Code::Unavailable | Code::Internal
    ) {
        return e;
    }
    match alert_problem(alert) {
        Some(Problem::SpeaksTls(reason)) => ClientError::Unreachable {
            endpoint: endpoint.to_owned(),
            reason,
        },
        Some(Problem::Certificate(reason)) => ClientError::Certificate {
            endpoint: endpoint.to_owned(),
            reason,
        },
        None => e,
    }
}

/// What a connection's recorded read error says, when it says something a user can act on.
pub(crate) enum Problem {
    /// A certificate was refused (`certificate: …`).
    Certificate(String),
    /// A plaintext connection got TLS.
    SpeaksTls(String),
}

/// The problem `alert` holds, if any.
pub(crate) fn alert_problem(alert: &Alert) -> Option<Problem> {
    let alert = alert
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()?;
    if alert == SPEAKS_TLS {
        return Some(Problem::SpeaksTls(format!(
            "{SPEAKS_TLS}: use https:// (and --tls-ca for its CA)"
        )));
    }
    certificate_problem(&alert).map(Problem::Certificate)
}

// === impl Transport ===

impl Transport {
    /// The transport to `uri` (`http://` or `https://`; `https://` needs `tls`, else the system's
    /// CAs are used), its calls naming `origin` when given (a `dns:///` name's address: the name
    /// is also what the daemon's certificate must hold, unless `--tls-server-name` says otherwise).
    pub(crate) fn new(
        uri: &str,
        origin: Option<&str>,
        tls: Option<&TlsSetup>,
        alert: &Alert,
    ) -> Result<Self, ClientError> {
        let bad = |why: String| ClientError::BadEndpoint(uri.to_owned(), why);
        let parse = |s: &str| {
            s.parse::<Uri>()
                .map_err(|e| ClientError::BadEndpoint(s.to_owned(), e.to_string()))
        };
        if !is_https(uri) {
            let mut endpoint =
                Endpoint::from_shared(uri.to_owned()).map_err(|e| bad(e.to_string()))?;
            if let Some(origin) = origin {
                endpoint = endpoint.origin(parse(origin)?);
            }
            let connector = Connector {
                tls: None,
                alert: Arc::clone(alert),
            };
            return Ok(Self {
                endpoint,
                connector,
            });
        }
        let default;
        let tls = match tls {
            Some(tls) => tls,
            None => {
                default = ClientTls::default().prepare()?;
                &default
            }
        };
        // tonic connects to an http:// URI through the connector, which adds TLS; requests still
        // say `https` (the origin).
        let origin = parse(origin.unwrap_or(uri))?;
        let plain = format!("http://{}", &uri["https://".len()..]);
        let endpoint = Endpoint::from_shared(plain)
            .map_err(|e| bad(e.to_string()))?
            .origin(origin.clone());
        let name = match (&tls.server_name, origin.host()) {
            (Some(name), _) => Some(name.clone()),
            (None, Some(host)) => Some(
                ServerName::try_from(
                    host.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned(),
                )
                .map_err(|e| {
                    bad(format!(
                        "{host:?} cannot be checked against a certificate: {e}"
                    ))
                })?,
            ),
            (None, None) => None,
        };
        let connector = Connector {
            tls: Some((Arc::clone(&tls.config), name)),
            alert: Arc::clone(alert),
        };
        Ok(Self {
            endpoint,
            connector,
        })
    }

    /// The transport with `f` applied to its endpoint's settings (timeouts, keepalive).
    pub(crate) fn map(mut self, f: impl FnOnce(Endpoint) -> Endpoint) -> Self {
        self.endpoint = f(self.endpoint);
        self
    }

    /// Connects.
    pub(crate) async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        self.endpoint
            .connect_with_connector(self.connector.clone())
            .await
    }

    /// Whether it speaks TLS.
    pub(crate) fn is_tls(&self) -> bool {
        self.connector.tls.is_some()
    }

    /// What its connections recorded that explains a failure.
    pub(crate) fn problem(&self) -> Option<Problem> {
        alert_problem(&self.connector.alert)
    }
}

// === impl ClientTls ===

impl ClientTls {
    /// Whether any TLS flag is set.
    pub fn is_set(&self) -> bool {
        self.flag_set().is_some()
    }

    /// The first TLS flag that is set, for "needs https://".
    pub(crate) fn flag_set(&self) -> Option<&'static str> {
        [
            (self.ca.is_some(), "--tls-ca"),
            (self.cert.is_some(), "--tls-cert"),
            (self.key.is_some(), "--tls-key"),
            (self.server_name.is_some(), "--tls-server-name"),
        ]
        .into_iter()
        .find_map(|(set, flag)| set.then_some(flag))
    }

    /// Reads and checks the files: the config every connection shares.
    pub fn prepare(&self) -> Result<TlsSetup, ClientError> {
        let server_name = match &self.server_name {
            Some(name) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|e| ClientError::Tls(format!("--tls-server-name {name:?}: {e}")))?,
            ),
            None => None,
        };
        Ok(TlsSetup {
            config: Arc::new(self.client_config()?),
            server_name,
        })
    }

    /// A rustls client config (ring, ALPN h2) from the files.
    fn client_config(&self) -> Result<ClientConfig, ClientError> {
        let mut roots = RootCertStore::empty();
        match &self.ca {
            Some(path) => {
                for cert in certificates("--tls-ca", path)? {
                    roots.add(cert).map_err(|e| {
                        ClientError::Tls(format!("--tls-ca {}: {e}", path.display()))
                    })?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(native.certs);
                if added == 0 {
                    return Err(ClientError::Tls(
                        "no CA certificates found on this system; name the daemon's CA with \
                         --tls-ca"
                            .into(),
                    ));
                }
            }
        }
        let builder = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Tls(e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = certificates("--tls-cert", cert)?;
                let key = private_key(key)?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    ClientError::Tls(format!("--tls-cert {} with --tls-key: {e}", cert.display()))
                })?
            }
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) => return Err(ClientError::Tls("--tls-cert needs --tls-key".into())),
            (None, Some(_)) => return Err(ClientError::Tls("--tls-key needs --tls-cert".into())),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// Every certificate of a PEM file; at least one.
fn certificates(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let pem = read(flag, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClientError::Tls(format!("{flag} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(ClientError::Tls(format!(
            "{flag} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, ClientError> {
    let pem = read("--tls-key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        ClientError::Tls(format!(
            "--tls-key {} holds no usable PEM private key: {e}",
            path.display()
        ))
    })
}

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path)
        .map_err(|e| ClientError::Tls(format!("cannot read {flag} {}: {e}", path.display())))
}

// === impl Connector ===

impl Service<Uri> for Connector {
    type Response = TokioIo<Recorded>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host"))?;
            // `[::1]` in a URI, `::1` to connect to and to check the certificate for.
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let default_port = if this.tls.is_some() { 443 } else { 80 };
            let port = uri.port_u16().unwrap_or(default_port);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let io = match this.tls {
                None => Stream::Plain(tcp),
                Some((config, name)) => {
                    let name = match name {
                        Some(name) => name,
                        None => ServerName::try_from(host)
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
                    };
                    let tls = TlsConnector::from(config).connect(name, tcp).await?;
                    Stream::Tls(Box::new(tls))
                }
            };
            Ok(TokioIo::new(Recorded {
                io,
                alert: this.alert,
                first: true,
            }))
        })
    }
}

// === impl Recorded ===

impl AsyncRead for Recorded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = match &mut this.io {
            Stream::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Stream::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        };
        let record = match &res {
            Poll::Ready(Err(e)) => Some(e.to_string()),
            // A TLS record (alert 0x15, handshake 0x16, version 3.x) where a plaintext daemon would
            // send an HTTP/2 SETTINGS frame (length, then type 0x04).
            Poll::Ready(Ok(())) if this.first && matches!(this.io, Stream::Plain(_)) => {
                let read = &buf.filled()[before..];
                this.first = read.is_empty();
                matches!(read, [0x15 | 0x16, 0x03, ..]).then(|| SPEAKS_TLS.to_owned())
            }
            _ => None,
        };
        if let Some(what) = record {
            let mut alert = this.alert.lock().unwrap_or_else(PoisonError::into_inner);
            alert.get_or_insert(what);
        }
        res
    }
}

impl AsyncWrite for Recorded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Stream::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Stream::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Stream::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Stream::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Stream::Plain(io) => io.is_write_vectored(),
            Stream::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Stream::Plain(io) => Pin::new(io).poll_flush(cx),
            Stream::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Stream::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Stream::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What a failed connection or call says about certificates, in words: `None` when it is not about
/// them. Reads the text of the whole error chain: rustls's errors reach here typed or, through
/// h2, as text.
pub(super) fn certificate_problem(chain: &str) -> Option<String> {
    // What the daemon said about ours (TLS alerts), first: "Expired" is also in their names.
    const ALERTS: &[(&str, &str)] = &[
        (
            "CertificateRequired",
            "the daemon requires a client certificate (--tls-cert and --tls-key)",
        ),
        (
            "UnknownCA",
            "the daemon refused the client certificate: it is not signed by a CA the daemon \
             trusts (its tls_client_ca)",
        ),
        (
            "CertificateExpired",
            "the daemon refused the client certificate: it has expired",
        ),
        (
            "DecryptError",
            "the daemon refused the client certificate: --tls-key is not its key",
        ),
        (
            "BadCertificate",
            "the daemon refused the client certificate",
        ),
        (
            "CertificateUnknown",
            "the daemon refused the client certificate",
        ),
        ("AccessDenied", "the daemon refused the client certificate"),
    ];
    // What was wrong with the daemon's, and what to do about it.
    const HINTS: &[(&str, &str)] = &[
        (
            "UnknownIssuer",
            " (it is not signed by a CA batchctl trusts: --tls-ca, by default the system's CAs)",
        ),
        (
            "not valid for name",
            " (--tls-server-name sets the name to check)",
        ),
        (
            "NotValidForName",
            " (--tls-server-name sets the name to check)",
        ),
    ];
    if let Some(alert) = chain.split("received fatal alert: ").nth(1) {
        if let Some((_, what)) = ALERTS.iter().find(|(name, _)| alert.starts_with(name)) {
            return Some(format!("certificate: {what}"));
        }
        // Any other alert about a certificate (UnsupportedCertificate: a certificate not made for
        // client authentication, …).
        let name = alert.split(|c: char| !c.is_ascii_alphanumeric()).next()?;
        if name.contains("Certificate") {
            return Some(format!(
                "certificate: the daemon refused the client certificate ({name})"
            ));
        }
    }
    let detail = chain.split("invalid peer certificate: ").nth(1)?;
    let hint = HINTS
        .iter()
        .find(|(needle, _)| detail.contains(needle))
        .map_or("", |(_, hint)| hint);
    Some(format!(
        "certificate: the daemon's certificate was refused: {detail}{hint}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_flags_need_https() {
        let mut t = Remote::new("http://127.0.0.1:1");
        assert!(t.transport().is_ok());
        t.tls.server_name = Some("x".into());
        let Err(e) = t.transport() else {
            panic!("--tls-server-name with http://")
        };
        let e = e.to_string();
        assert!(
            e.contains("--tls-server-name needs an https:// endpoint"),
            "{e}"
        );
        assert!(Remote::new("HTTPS://h:1").is_tls());
    }

    #[test]
    fn certificate_problems_are_named() {
        let p = certificate_problem("transport error: invalid peer certificate: UnknownIssuer");
        assert_eq!(
            p.unwrap(),
            "certificate: the daemon's certificate was refused: UnknownIssuer (it is not signed \
             by a CA batchctl trusts: --tls-ca, by default the system's CAs)"
        );
        let p = certificate_problem("h2: received fatal alert: CertificateExpired");
        assert!(p
            .unwrap()
            .contains("refused the client certificate: it has expired"));
        let p = certificate_problem("h2 protocol error: received fatal alert: CertificateRequired");
        assert!(p.unwrap().contains("requires a client certificate"));
        let p = certificate_problem("received fatal alert: UnsupportedCertificate");
        assert_eq!(
            p.unwrap(),
            "certificate: the daemon refused the client certificate (UnsupportedCertificate)"
        );
        assert_eq!(
            certificate_problem("received fatal alert: HandshakeFailure"),
            None
        );
        assert_eq!(certificate_problem("connection refused"), None);
    }
}
