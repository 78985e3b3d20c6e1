//! Client-certificate identities: the name a `[[principal]]` expects (`client_cert`), and the names
//! an end-entity certificate carries (its subject CN and its subject alternative names).
//!
//! The certificate has already been verified against `tls_client_ca` by the TLS layer when the
//! engine sees it; here it is only read.

use std::net::IpAddr;

use x509_parser::extensions::GeneralName;

/// A name a principal's client certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CertName {
    /// `CN=…`: a common name of the certificate's subject.
    CommonName(String),
    /// `DNS:…`: a DNS subject alternative name (compared without regard to ASCII case).
    Dns(String),
    /// `URI:…`: a URI subject alternative name (e.g. a SPIFFE id).
    Uri(String),
    /// `email:…`: an e-mail (RFC 822) subject alternative name.
    Email(String),
    /// `IP:…`: an IP address subject alternative name.
    Ip(IpAddr),
}

/// A `client_cert` value that is not a name batchd can match.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0}: expected CN=<name>, DNS:<name>, URI:<uri>, email:<address> or IP:<address> \
     (`=` or `:` after the kind)"
)]
pub struct CertNameError(String);

/// The names of one certificate.
#[derive(Debug, Default)]
pub(super) struct CertNames {
    names: Vec<CertName>,
}

/// The certificate could not be parsed.
#[derive(Debug)]
pub(super) struct BadCertificate;

impl CertName {
    /// Parses `KIND=value` or `KIND:value`, the kind in any case.
    pub fn parse(s: &str) -> Result<Self, CertNameError> {
        let bad = |why: &str| CertNameError(why.to_owned());
        let split = s.find(['=', ':']).ok_or_else(|| bad("no kind"))?;
        let (kind, value) = (s[..split].trim(), s[split + 1..].trim());
        if value.is_empty() {
            return Err(bad("empty name"));
        }
        let value = value.to_owned();
        match kind.to_ascii_uppercase().as_str() {
            "CN" => Ok(Self::CommonName(value)),
            "DNS" => Ok(Self::Dns(value.to_ascii_lowercase())),
            "URI" => Ok(Self::Uri(value)),
            "EMAIL" => Ok(Self::Email(value)),
            "IP" => value
                .parse()
                .map(Self::Ip)
                .map_err(|_| bad("not an IP address")),
            _ => Err(bad("unknown kind")),
        }
    }
}

impl std::fmt::Display for CertName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::CommonName(n) => write!(f, "CN={n}"),
            Self::Dns(n) => write!(f, "DNS:{n}"),
            Self::Uri(n) => write!(f, "URI:{n}"),
            Self::Email(n) => write!(f, "email:{n}"),
            Self::Ip(n) => write!(f, "IP:{n}"),
        }
    }
}

impl CertNames {
    /// Whether the certificate carries `name`.
    pub(super) fn carries(&self, name: &CertName) -> bool {
        self.names.contains(name)
    }
}

/// The subject common names and subject alternative names of a DER certificate.
pub(super) fn names(der: &[u8]) -> Result<CertNames, BadCertificate> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| BadCertificate)?;
    let mut names: Vec<CertName> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(|cn| CertName::CommonName(cn.to_owned()))
        .collect();
    let san = cert
        .subject_alternative_name()
        .map_err(|_| BadCertificate)?;
    for name in san.iter().flat_map(|ext| &ext.value.general_names) {
        let name = match name {
            GeneralName::DNSName(n) => CertName::Dns(n.to_ascii_lowercase()),
            GeneralName::URI(n) => CertName::Uri((*n).to_owned()),
            GeneralName::RFC822Name(n) => CertName::Email((*n).to_owned()),
            GeneralName::IPAddress(bytes) => match ip(bytes) {
                Some(ip) => CertName::Ip(ip),
                None => continue,
            },
            _ => continue,
        };
        names.push(name);
    }
    Ok(CertNames { names })
}

fn ip(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}
