//! TLS for the gRPC listener, reloaded without a restart.
//!
//! tonic 0.14 keeps rustls private and cannot change a certificate once it serves, so the daemon
//! terminates TLS itself (in [`super::incoming`], with tokio-rustls) and hands tonic streams that
//! are already decrypted; tonic's own `tls_config` is never set (TLS would be wrapped twice).
//!
//! [`Tls`] holds the `rustls::ServerConfig` in force behind a lock. Each handshake takes the one
//! in force when its ClientHello arrives; a reload builds a new one from the three files
//! (certificate chain, key, client CAs: all swapped together) and puts it in place, so new
//! handshakes get the new certificate while open connections keep the session they have. A reload
//! that fails keeps the config in force and logs why; at start the same failure is a config error
//! naming the field (exit 64). A reloaded config starts with an empty session cache: a session
//! resumed across a reload would skip the new client CAs.
//!
//! Reloads come from SIGHUP (the binary calls [`Tls::reload`]) and from [`Tls::watch`], which
//! polls the files' metadata every [`WATCH_EVERY`]. Polling rather than inotify: it sees the
//! symlink swaps of Kubernetes Secret volumes, files replaced by rename and files on any file
//! system, with no extra thread or crate, and two seconds is well within a rotation's overlap.
//!
//! One crypto provider: ring, passed explicitly (no process-wide default is installed or needed).

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_rustls::rustls::crypto::{ring, CryptoProvider};
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

use crate::config::{Config, ConfigError};

/// How often [`Tls::watch`] looks at the files' metadata.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

/// The one application protocol offered: gRPC runs over HTTP/2.
const ALPN_H2: &[u8] = b"h2";

/// The daemon's TLS: the config in force, and the files it is read from. Cheap to clone; clones
/// share the config, so a reload through one is seen by all.
#[derive(Clone)]
pub struct Tls {
    inner: Arc<Inner>,
}

struct Inner {
    files: Files,
    current: RwLock<Loaded>,
    /// The files' metadata when they were last read; [`Tls::watch`] reloads when it changes.
    /// Also held across a reload, so two reloads never interleave.
    seen: Mutex<Stamp>,
}

/// The paths of the three config fields.
#[derive(Debug, Clone)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

/// A config built from the files, and what the logs say about it.
#[derive(Clone)]
struct Loaded {
    config: Arc<ServerConfig>,
    /// SHA-256 of the leaf certificate, as `openssl x509 -noout -fingerprint -sha256` prints it.
    fingerprint: String,
    /// Certificates in the chain.
    chain: usize,
    /// CA certificates client certificates are checked against (0: no mTLS).
    client_cas: usize,
}

/// Device, inode, size and modification time (s, ns) of each file; `None` when it cannot be read.
type Stamp = Vec<Option<(u64, u64, u64, i64, i64)>>;

// === impl Tls ===

impl Tls {
    /// The TLS of `config`: `None` for plaintext; an error naming the field when a file cannot be
    /// read or used (the daemon then exits 64).
    pub fn from_config(config: &Config) -> Result<Option<Self>, ConfigError> {
        if !config.tls_enabled() {
            return Ok(None);
        }
        let files = Files {
            cert: config.tls_cert.clone(),
            key: config.tls_key.clone(),
            client_ca: config.mtls_enabled().then(|| config.tls_client_ca.clone()),
        };
        let seen = files.stamp();
        let loaded = files.load()?;
        Ok(Some(Self {
            inner: Arc::new(Inner {
                files,
                current: RwLock::new(loaded),
                seen: Mutex::new(seen),
            }),
        }))
    }

    /// Reads the files again and puts the new config in force for new handshakes. On failure the
    /// config in force stays; either way the outcome is logged.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let mut seen = self
            .inner
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.reload_locked(&mut seen)
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.inner.files.client_ca.is_some()
    }

    /// SHA-256 fingerprint of the certificate in force (`AB:CD:…`, as openssl prints it).
    pub fn fingerprint(&self) -> String {
        self.loaded().fingerprint
    }

    /// Reloads whenever the files change, every [`WATCH_EVERY`], for as long as it is polled.
    pub async fn watch(self) {
        let mut every = tokio::time::interval(WATCH_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            every.tick().await;
            // Small local files: read in place rather than on a blocking thread of its own.
            let mut seen = self
                .inner
                .seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if self.inner.files.stamp() != *seen {
                tracing::info!("TLS files changed; reloading");
                let _ = self.reload_locked(&mut seen);
            }
        }
    }

    /// The config for a handshake starting now.
    pub(crate) fn config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.loaded().config)
    }

    fn loaded(&self) -> Loaded {
        self.inner
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn reload_locked(&self, seen: &mut Stamp) -> Result<(), ConfigError> {
        let files = &self.inner.files;
        // Taken before reading: a file that changes while it is read is read again next time.
        *seen = files.stamp();
        match files.load() {
            Ok(loaded) => {
                tracing::info!(
                    cert = %files.cert.display(),
                    sha256 = %loaded.fingerprint,
                    chain = loaded.chain,
                    client_cas = loaded.client_cas,
                    "TLS reloaded: new handshakes use this certificate, open connections keep theirs"
                );
                *self
                    .inner
                    .current
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = loaded;
                Ok(())
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    sha256 = %self.fingerprint(),
                    "TLS reload failed; the certificate in force stays"
                );
                Err(e)
            }
        }
    }
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("files", &self.inner.files)
            .field("sha256", &self.fingerprint())
            .finish()
    }
}

// === impl Files ===

impl Files {
    fn stamp(&self) -> Stamp {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|p| {
                // Follows symlinks: a Secret volume's `..data` swap changes the target.
                std::fs::metadata(p)
                    .ok()
                    .map(|m| (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
            })
            .collect()
    }

    /// A server config from the files: the chain and its key, and a client-certificate verifier
    /// when client CAs are configured.
    fn load(&self) -> Result<Loaded, ConfigError> {
        let provider = Arc::new(ring::default_provider());
        let chain = certificates("tls_cert", &self.cert)?;
        let key = private_key(&self.key)?;
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("tls_cert", format!("no TLS version to offer: {e}")))?;
        let (builder, client_cas) = match &self.client_ca {
            None => (builder.with_no_client_auth(), 0),
            Some(path) => {
                let (verifier, n) = client_verifier(path, &provider)?;
                (builder.with_client_cert_verifier(verifier), n)
            }
        };
        let fingerprint = chain.first().map(fingerprint).unwrap_or_default();
        let n = chain.len();
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| self.key_error(&e))?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Loaded {
            config: Arc::new(config),
            fingerprint,
            chain: n,
            client_cas,
        })
    }

    /// Which field a failure of `with_single_cert` is about.
    fn key_error(&self, e: &rustls::Error) -> ConfigError {
        let (cert, key) = (self.cert.display(), self.key.display());
        match e {
            rustls::Error::InconsistentKeys(_) => invalid(
                "tls_key",
                format!("{key} is not the private key of the certificate in {cert}"),
            ),
            rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
                invalid("tls_cert", format!("{cert}: {e}"))
            }
            _ => invalid("tls_key", format!("{key}: {e}")),
        }
    }
}

fn invalid(field: &'static str, reason: String) -> ConfigError {
    ConfigError::Invalid { field, reason }
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| invalid(field, format!("cannot read {}: {e}", path.display())))
}

/// Every certificate of a PEM file; at least one.
fn certificates(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let pem = read(field, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(field, format!("{} is not valid PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(
            field,
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
    let pem = read("tls_key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        let why = match e {
            pem::Error::NoItemsFound => {
                "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".to_owned()
            }
            e => format!("is not a valid PEM private key: {e}"),
        };
        invalid("tls_key", format!("{} {why}", path.display()))
    })
}

/// A verifier that accepts client certificates signed by any CA of the file, and requires one.
fn client_verifier(
    path: &Path,
    provider: &Arc<CryptoProvider>,
) -> Result<(Arc<dyn rustls::server::danger::ClientCertVerifier>, usize), ConfigError> {
    let cas = certificates("tls_client_ca", path)?;
    let n = cas.len();
    let mut roots = RootCertStore::empty();
    for (i, ca) in cas.into_iter().enumerate() {
        roots.add(ca).map_err(|e| {
            invalid(
                "tls_client_ca",
                format!(
                    "certificate {} of {} is not a usable CA certificate: {e}",
                    i + 1,
                    path.display()
                ),
            )
        })?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
            .build()
            .map_err(|e| invalid("tls_client_ca", format!("{}: {e}", path.display())))?;
    Ok((verifier, n))
}

/// `AB:CD:…`: the SHA-256 of a certificate's DER, as openssl prints it.
fn fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}
