//! What `--endpoint` names: daemon URLs, bare `host:port` and `dns:///host:port` names, parsed
//! into [`Endpoints`]; the scheme a bare address gets; a name resolved to every address.

use std::net::SocketAddr;

use tonic::transport::{Channel, Uri};

use super::tls::is_https;
use super::{connection_error, transport, Alert, ClientError, ClientTls, TlsSetup};
use crate::proto::batch_service_client::BatchServiceClient;

/// The prefix of a name resolved to every address (gRPC's naming: `dns:[//authority/]host:port`).
const DNS_PREFIX: &str = "dns:///";

/// The daemons a run spreads its jobs over: each target is one replica, or (`dns:///`) as many as
/// its name has addresses.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub(super) targets: Vec<Target>,
    /// The TLS of `https://` targets ([`Endpoints::with_tls`]); `None`: the system's CAs.
    pub(super) tls: Option<TlsSetup>,
    /// What the connections read that explains a failure ([`Endpoints::explain`]).
    pub(super) alert: Alert,
}

/// One `--endpoint` item.
#[derive(Debug, Clone)]
pub enum Target {
    /// One daemon at a URL (`http://host:port`): tonic resolves the host and connects to one of its
    /// addresses.
    Url(String),
    /// Every address of `host` (`dns:///host:port`), one replica each, resolved again now and
    /// then and whenever a replica is lost.
    Dns {
        /// The name.
        host: String,
        /// The port.
        port: u16,
        /// `http` or `https` ([`scheme`]).
        scheme: &'static str,
    },
    /// A client made by the caller (its own channel, TLS, interceptors): one replica, without
    /// health checks (its channel is not reachable).
    Client(BatchServiceClient<Channel>),
    /// A channel made by the caller: one replica.
    Channel(Channel),
}

/// The scheme of a bare `host:port` or a `dns:///` name: `http`, or `https` when TLS options are
/// given. The one place that chooses it.
pub fn scheme(tls: bool) -> &'static str {
    if tls {
        "https"
    } else {
        "http"
    }
}

// === impl Endpoints ===

impl Endpoints {
    /// Parses `--endpoint` values, each a comma-separated list of `http://host:port`,
    /// `https://host:port`, bare `host:port` (`http://`, or `https://` when `tls`) or
    /// `dns:///host:port`.
    pub fn parse<S: AsRef<str>>(values: &[S], tls: bool) -> Result<Self, ClientError> {
        let mut targets = Vec::new();
        for value in values {
            for item in value.as_ref().split(',') {
                let item = item.trim();
                if item.is_empty() {
                    continue;
                }
                targets.push(Target::parse(item, tls)?);
            }
        }
        if targets.is_empty() {
            return Err(ClientError::BadEndpoint(
                values
                    .iter()
                    .map(AsRef::as_ref)
                    .collect::<Vec<_>>()
                    .join(","),
                "no endpoint given".into(),
            ));
        }
        Ok(Self::of(targets))
    }

    /// Endpoints of these targets, without TLS settings of their own.
    fn of(targets: Vec<Target>) -> Self {
        Self {
            targets,
            tls: None,
            alert: Alert::default(),
        }
    }

    /// The endpoints with these TLS settings (files read and checked now). With a TLS flag set,
    /// every target must speak TLS: an `http://` one is a usage error (`--tls-ca needs an
    /// https:// endpoint`). Without, `https://` targets trust the system's CAs.
    pub fn with_tls(mut self, tls: &ClientTls) -> Result<Self, ClientError> {
        if let Some(flag) = tls.flag_set() {
            let plain = self.targets.iter().find(|t| match t {
                Target::Url(url) => !is_https(url),
                Target::Dns { scheme, .. } => *scheme != "https",
                Target::Client(_) | Target::Channel(_) => false,
            });
            if let Some(t) = plain {
                return Err(ClientError::BadEndpoint(
                    t.name(),
                    format!("{flag} needs an https:// endpoint"),
                ));
            }
        }
        let https = self.targets.iter().any(|t| match t {
            Target::Url(url) => is_https(url),
            Target::Dns { scheme, .. } => *scheme == "https",
            Target::Client(_) | Target::Channel(_) => false,
        });
        if https || tls.is_set() {
            self.tls = Some(tls.prepare()?);
        }
        Ok(self)
    }

    /// A failed call on one of their channels, told better when a connection recorded why (a
    /// certificate refused, TLS where plaintext was expected).
    pub fn explain(&self, e: ClientError) -> ClientError {
        super::tls::explain(&self.alert, &self.names(), e)
    }

    /// The targets, in the order given.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// A connected channel to every replica the endpoints name now (`dns:///` names resolved),
    /// each with its name, for one-shot calls (`handlers`, `health`). Callers' clients have no
    /// channel to give and are left out.
    pub async fn channels(&self) -> Vec<(String, Result<Channel, ClientError>)> {
        let mut out = Vec::new();
        for target in &self.targets {
            match target {
                Target::Url(url) => out.push((url.clone(), self.connect(url, None).await)),
                Target::Channel(c) => out.push((target.name(), Ok(c.clone()))),
                Target::Client(_) => {}
                Target::Dns { host, port, scheme } => match resolve(host, *port).await {
                    Ok(addrs) if !addrs.is_empty() => {
                        for addr in addrs {
                            let (url, origin) = address_urls(scheme, host, *port, addr);
                            out.push((url.clone(), self.connect(&url, Some(&origin)).await));
                        }
                    }
                    Ok(_) => out.push((
                        target.name(),
                        Err(unreachable(
                            target,
                            format!("{host} resolves to no address"),
                        )),
                    )),
                    Err(e) => out.push((
                        target.name(),
                        Err(unreachable(target, format!("cannot resolve {host}: {e}"))),
                    )),
                },
            }
        }
        out
    }

    /// A channel to `url`, its calls naming `origin` (a `dns:///` name's address).
    async fn connect(&self, url: &str, origin: Option<&str>) -> Result<Channel, ClientError> {
        transport(url, origin, self.tls.as_ref(), &self.alert)?
            .connect()
            .await
            .map_err(|e| connection_error(url, is_https(url), &e))
    }

    /// The endpoints as given, for messages: `http://a:1, dns:///b:2`.
    pub fn names(&self) -> String {
        self.targets
            .iter()
            .map(Target::name)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl From<Target> for Endpoints {
    fn from(target: Target) -> Self {
        Self::of(vec![target])
    }
}

impl From<&Endpoints> for Endpoints {
    fn from(e: &Endpoints) -> Self {
        e.clone()
    }
}

impl From<BatchServiceClient<Channel>> for Endpoints {
    fn from(client: BatchServiceClient<Channel>) -> Self {
        Target::Client(client).into()
    }
}

impl From<&mut BatchServiceClient<Channel>> for Endpoints {
    fn from(client: &mut BatchServiceClient<Channel>) -> Self {
        Target::Client(client.clone()).into()
    }
}

impl From<Channel> for Endpoints {
    fn from(channel: Channel) -> Self {
        Target::Channel(channel).into()
    }
}

// === impl Target ===

impl Target {
    /// One `--endpoint` item.
    pub fn parse(item: &str, tls: bool) -> Result<Self, ClientError> {
        let bad = |why: &str| ClientError::BadEndpoint(item.to_owned(), why.to_owned());
        if let Some(rest) = item.strip_prefix(DNS_PREFIX) {
            let (host, port) = split_host_port(rest).ok_or_else(|| {
                bad("a dns:/// name needs a port, as in dns:///batchd-headless:50051")
            })?;
            return Ok(Self::Dns {
                host,
                port,
                scheme: scheme(tls),
            });
        }
        if item.starts_with("dns:") {
            return Err(bad(
                "only dns:///NAME:PORT is supported (no DNS server authority)",
            ));
        }
        let url = match item.split_once("://") {
            Some((s, _)) if s == "http" || s == "https" => item.to_owned(),
            Some((s, _)) => {
                return Err(bad(&format!(
                    "unknown scheme {s:?}: use http, https or dns"
                )))
            }
            None => {
                split_host_port(item).ok_or_else(|| {
                    bad("expected host:port, http://host:port or dns:///host:port")
                })?;
                format!("{}://{item}", scheme(tls))
            }
        };
        let uri = url.parse::<Uri>().map_err(|e| bad(&e.to_string()))?;
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad("no host"));
        }
        Ok(Self::Url(url))
    }

    /// The target as given, for messages.
    pub fn name(&self) -> String {
        match self {
            Self::Url(url) => url.clone(),
            Self::Dns { host, port, .. } => format!("{DNS_PREFIX}{}", join_host_port(host, *port)),
            Self::Client(_) => "a client given by the caller".into(),
            Self::Channel(_) => "a channel given by the caller".into(),
        }
    }
}

fn unreachable(target: &Target, reason: String) -> ClientError {
    ClientError::Unreachable {
        endpoint: target.name(),
        reason,
    }
}

/// `host:port` → (`host`, port); `[::1]:50051` → (`::1`, 50051). `None` without a valid port.
fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.strip_suffix(']')?,
        None if host.contains(':') => return None,
        None => host,
    };
    (!host.is_empty() && !host.contains('/')).then(|| (host.to_owned(), port))
}

/// `host:port`, with brackets around an IPv6 address.
fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Every address of `host` (deduplicated, in the resolver's order).
pub(super) async fn resolve(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for a in tokio::net::lookup_host((host, port)).await? {
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    Ok(addrs)
}

/// The URL of one address of a `dns:///` target, and the origin its calls name (the host name,
/// so that `:authority`, and a TLS server name, are the name and not the address).
pub(super) fn address_urls(
    scheme: &str,
    host: &str,
    port: u16,
    addr: SocketAddr,
) -> (String, String) {
    (
        format!("{scheme}://{addr}"),
        format!("{scheme}://{}", join_host_port(host, port)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(values: &[&str], tls: bool) -> Vec<String> {
        Endpoints::parse(values, tls)
            .unwrap()
            .targets
            .iter()
            .map(Target::name)
            .collect()
    }

    #[test]
    fn lists_are_split_and_bare_addresses_get_a_scheme() {
        assert_eq!(
            urls(
                &["127.0.0.1:1, http://b:2", "dns:///svc:3", "[::1]:4"],
                false
            ),
            [
                "http://127.0.0.1:1",
                "http://b:2",
                "dns:///svc:3",
                "http://[::1]:4"
            ]
        );
        assert_eq!(
            urls(&["localhost:50051"], true),
            ["https://localhost:50051"]
        );
        assert_eq!(urls(&["https://x:1"], false), ["https://x:1"]);
        match &Endpoints::parse(&["dns:///a:5"], true).unwrap().targets[0] {
            Target::Dns { scheme, .. } => assert_eq!(*scheme, "https"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_endpoints_are_named() {
        for bad in [
            "localhost",
            "::1:5",
            "dns:///svc",
            "dns://8.8.8.8/svc:1",
            "ftp://x:1",
            "host:99999",
            ":5",
            "",
            ",",
        ] {
            let e = Endpoints::parse(&[bad], false).unwrap_err();
            assert!(matches!(e, ClientError::BadEndpoint(..)), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_dns_address_keeps_the_name_as_origin() {
        let (url, origin) = address_urls("http", "svc", 7, "[::1]:7".parse().unwrap());
        assert_eq!(url, "http://[::1]:7");
        assert_eq!(origin, "http://svc:7");
        let (_, origin) = address_urls("http", "::1", 7, "[::1]:7".parse().unwrap());
        assert_eq!(origin, "http://[::1]:7");
    }
}
