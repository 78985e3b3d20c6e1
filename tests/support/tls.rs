//! Test certificates made at test time with rcgen (never committed), the files a daemon reads them
//! from, and a raw TLS client that shows which certificate a handshake got.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use batchd::client::{ClientTls, Remote};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

/// A certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its private key, in PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

/// A directory with a daemon's TLS files: `server.crt`, `server.key`, `clients.crt`, and a client's
/// `client.crt`, `client.key`, `ca.crt`.
pub struct Files {
    pub dir: tempfile::TempDir,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    /// The CA certificate in PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `localhost` and 127.0.0.1 (and `names`).
    pub fn server(&self, names: &[&str]) -> Leaf {
        let mut sans = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        sans.extend(names.iter().map(|n| (*n).to_owned()));
        let mut params = CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "batchd test server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A server certificate for `names` only (no IP address).
    pub fn server_named(&self, names: &[&str]) -> Leaf {
        let sans = names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        let mut params = CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "batchd test server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate with common name `cn`.
    pub fn client(&self, cn: &str) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

impl Leaf {
    /// The certificate's DER.
    pub fn der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.cert.as_bytes()).unwrap()
    }
}

impl Files {
    /// The server's certificate and key; with `client_ca`, clients must present one it signed.
    pub fn new(server: &Leaf, client_ca: Option<&str>) -> Self {
        let files = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        files.write_server(server);
        if let Some(ca) = client_ca {
            std::fs::write(files.client_ca(), ca).unwrap();
        }
        files
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("server.crt")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    pub fn client_ca(&self) -> PathBuf {
        self.dir.path().join("clients.crt")
    }

    /// Replaces the server's certificate and key the way tools do: new files renamed over the old.
    pub fn write_server(&self, leaf: &Leaf) {
        replace(&self.cert(), &leaf.cert);
        replace(&self.key(), &leaf.key);
    }

    /// `--set` flags for the daemon.
    pub fn daemon_args(&self, mtls: bool) -> Vec<String> {
        let mut args = vec![
            "--set".to_owned(),
            format!("tls_cert={}", self.cert().display()),
            "--set".to_owned(),
            format!("tls_key={}", self.key().display()),
        ];
        if mtls {
            args.push("--set".to_owned());
            args.push(format!("tls_client_ca={}", self.client_ca().display()));
        }
        args
    }

    /// Writes a client's files (`NAME.crt`, `NAME.key`) and returns their paths.
    pub fn write_client(&self, name: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
        let cert = self.dir.path().join(format!("{name}.crt"));
        let key = self.dir.path().join(format!("{name}.key"));
        std::fs::write(&cert, &leaf.cert).unwrap();
        std::fs::write(&key, &leaf.key).unwrap();
        (cert, key)
    }

    /// Writes `pem` as `NAME` and returns its path.
    pub fn write(&self, name: &str, pem: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    }
}

/// Writes `text` to a temporary file beside `path`, then renames it over `path`.
pub fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A client target for `https://{addr}` trusting `ca` (a PEM file), with an optional identity.
pub fn target(addr: SocketAddr, ca: &Path, identity: Option<(PathBuf, PathBuf)>) -> Remote {
    let (cert, key) = identity.unzip();
    Remote::with_tls(
        format!("https://{addr}"),
        ClientTls {
            ca: Some(ca.to_owned()),
            cert,
            key,
            server_name: None,
        },
    )
}

/// A raw TLS handshake with `addr` (ALPN h2, trusting `ca`, presenting `identity`): the certificate
/// the server presented, or the handshake's error.
pub async fn handshake(
    addr: SocketAddr,
    ca: &str,
    identity: Option<&Leaf>,
) -> Result<CertificateDer<'static>, String> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![leaf.der()],
                PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (_, session) = tls.get_ref();
    Ok(session.peer_certificates().unwrap()[0].clone())
}
