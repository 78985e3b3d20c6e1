//! Who a call is: `[[principal]]` tables, bearer tokens and client-certificate names.
//!
//! A principal is identified by a bearer token (`authorization: Bearer …` metadata) or by the client
//! certificate of an mTLS connection (its subject CN or a subject alternative name). Tokens are never
//! stored: the config holds their SHA-256, and a call's token is hashed and compared with every
//! principal's in constant time (`subtle`), so neither the comparison nor which entry matched shows
//! in the time it takes. With no principal configured, every call is anonymous.
//!
//! This module only parses, validates and matches; the engine keeps the table in force (and swaps
//! it on reload), the service applies it at the edge.

mod cert;

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

pub use cert::{CertName, CertNameError};

/// The principal of every call when none is configured (the `principal` label of the metrics).
pub const ANONYMOUS: &str = "_anonymous";

/// Largest `max_calls` and `max_running` of a principal: the daemon's own count cap (2^20).
pub const MAX_QUOTA: usize = 1 << 20;

/// Largest `weight`: far beyond any useful ratio, and the scheduler's products stay exact.
pub const MAX_WEIGHT: u32 = 10_000;

/// Longest principal name.
const MAX_NAME: usize = 64;

/// One `[[principal]]` table: who it is, what it may run and its share of the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalSpec {
    /// The principal's name, in logs, spans, metrics and error messages.
    pub name: String,
    /// Hex SHA-256 of its bearer token, or a list of them (old and new during a rotation).
    #[serde(default, skip_serializing_if = "Tokens::is_empty")]
    pub token_sha256: Tokens,
    /// Identity from the mTLS client certificate: `CN=…`, `DNS:…`, `URI:…`, `email:…` or `IP:…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<String>,
    /// Handlers its jobs may use; `None`: every handler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handlers: Option<Vec<String>>,
    /// Calls it may have open at once; more get RESOURCE_EXHAUSTED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_calls: Option<usize>,
    /// Worker slots its calls may hold at once; beyond, its jobs wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_running: Option<usize>,
    /// Its share of the worker pool when the pool is contended, relative to the others' (default 1).
    #[serde(default = "one")]
    pub weight: u32,
}

/// `token_sha256`: one hex digest or a list of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Tokens {
    /// No token: the principal is identified by its client certificate only.
    #[default]
    None,
    /// One digest.
    One(String),
    /// Several digests, each valid (a rotation in progress).
    Many(Vec<String>),
}

/// A `[[principal]]` table that cannot be used; the message names the principal and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("principal {principal}: {field}: {reason}")]
pub struct PrincipalError {
    /// The principal's name, quoted, or `#N` (1-based) when it has none.
    pub principal: String,
    /// The field.
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

/// What a call presented to prove who it is, read at the edge.
#[derive(Debug, Default)]
pub struct Credentials<'a> {
    /// The `authorization` metadata: `None` when absent; `Some(Err)` when it is not `Bearer <token>`.
    bearer: Option<Result<&'a [u8], ()>>,
    /// The client's end-entity certificate (DER), on mTLS connections.
    cert: Option<&'a [u8]>,
}

/// Why a call is not authenticated. The messages never hint at which tokens or names exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Neither a token nor a client certificate.
    #[error(
        "credentials required: send `authorization: Bearer <token>` metadata or a client certificate"
    )]
    Missing,
    /// A malformed `authorization` value, an unknown token, or a certificate of no principal.
    #[error("invalid credentials")]
    Invalid,
}

/// The identity half of the principal table: token digests and certificate names, each with the
/// index of its principal.
#[derive(Debug, Default)]
pub struct Identities {
    tokens: Vec<([u8; 32], usize)>,
    certs: Vec<(CertName, usize)>,
}

fn one() -> u32 {
    1
}

// === impl Tokens ===

impl Tokens {
    /// Whether there is no token.
    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }

    /// Every digest, as written.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        let (one, many): (Option<&String>, &[String]) = match self {
            Self::None => (None, &[]),
            Self::One(t) => (Some(t), &[]),
            Self::Many(ts) => (None, ts),
        };
        one.into_iter().chain(many).map(String::as_str)
    }
}

// === impl PrincipalSpec ===

impl PrincipalSpec {
    /// A principal named `name` with weight 1, no identity, no quota and every handler.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            token_sha256: Tokens::None,
            client_cert: None,
            handlers: None,
            max_calls: None,
            max_running: None,
            weight: 1,
        }
    }

    /// The table's name for messages: quoted, or `#N` when it has none.
    fn label(&self, i: usize) -> String {
        if self.name.is_empty() {
            format!("#{}", i + 1)
        } else {
            format!("{:?}", self.name)
        }
    }
}

/// Checks every `[[principal]]` table and the tables together (unique names, tokens and
/// certificate names), so a bad table stops the daemon before it binds or is refused at reload.
pub fn validate(specs: &[PrincipalSpec]) -> Result<(), PrincipalError> {
    let mut names = HashSet::new();
    let mut tokens = std::collections::HashMap::new();
    let mut certs = std::collections::HashMap::new();
    for (i, p) in specs.iter().enumerate() {
        let err = |field, reason: String| PrincipalError {
            principal: p.label(i),
            field,
            reason,
        };
        check_name(&p.name).map_err(|r| err("name", r))?;
        if !names.insert(p.name.as_str()) {
            return Err(err("name", "another [[principal]] has this name".into()));
        }
        if p.token_sha256.is_empty() && p.client_cert.is_none() {
            return Err(err(
                "token_sha256",
                "a principal needs token_sha256 or client_cert (nothing could identify it)".into(),
            ));
        }
        for t in p.token_sha256.iter() {
            let digest = parse_digest(t).map_err(|r| err("token_sha256", r))?;
            if let Some(other) = tokens.insert(digest, p.name.as_str()) {
                let reason = format!("the same token as principal {other:?}");
                return Err(err("token_sha256", reason));
            }
        }
        if let Some(c) = &p.client_cert {
            let name = CertName::parse(c).map_err(|e| err("client_cert", e.to_string()))?;
            if let Some(other) = certs.insert(name, p.name.as_str()) {
                let reason = format!("the same certificate name as principal {other:?}");
                return Err(err("client_cert", reason));
            }
        }
        if let Some(handlers) = &p.handlers {
            let mut seen = HashSet::new();
            for h in handlers {
                if h.is_empty() {
                    return Err(err("handlers", "a handler name is empty".into()));
                }
                if !seen.insert(h) {
                    return Err(err("handlers", format!("{h:?} is listed twice")));
                }
            }
        }
        for (field, n) in [("max_calls", p.max_calls), ("max_running", p.max_running)] {
            match n {
                Some(0) => return Err(err(field, "must be at least 1".into())),
                Some(n) if n > MAX_QUOTA => {
                    return Err(err(field, format!("must be at most {MAX_QUOTA}")))
                }
                _ => {}
            }
        }
        if p.weight == 0 || p.weight > MAX_WEIGHT {
            let reason = format!("must be between 1 and {MAX_WEIGHT}");
            return Err(err("weight", reason));
        }
    }
    Ok(())
}

/// Checks that every handler a principal lists exists (`known`), so a typo is an error at start
/// (or at reload) rather than a handler nobody may use.
pub fn check_handlers(
    specs: &[PrincipalSpec],
    known: impl Fn(&str) -> bool,
) -> Result<(), PrincipalError> {
    for (i, p) in specs.iter().enumerate() {
        for h in p.handlers.iter().flatten() {
            if !known(h) {
                return Err(PrincipalError {
                    principal: p.label(i),
                    field: "handlers",
                    reason: format!("unknown handler {h:?}"),
                });
            }
        }
    }
    Ok(())
}

/// A name for labels and logs: letters, digits, `_`, `-`, `.`, not starting with `_` (kept for
/// the daemon's own, like [`ANONYMOUS`]).
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!("must be at most {MAX_NAME} characters"));
    }
    if name.starts_with('_') {
        return Err("must not start with `_` (kept for batchd's own names)".into());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err("may hold only letters, digits, `_`, `-` and `.`".into());
    }
    Ok(())
}

/// A hex SHA-256 digest (64 digits, either case). The value is never quoted back: an operator who
/// pasted the token itself must not find it in the logs.
fn parse_digest(hex: &str) -> Result<[u8; 32], String> {
    let bad = || {
        "must be the hex SHA-256 of the token (64 hex digits: `printf %s \"$TOKEN\" | sha256sum`), \
         not the token itself"
            .to_owned()
    };
    let hex = hex.trim();
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
        let digit = |b: u8| (b as char).to_digit(16);
        match (digit(pair[0]), digit(pair[1])) {
            (Some(h), Some(l)) => *o = (h * 16 + l) as u8,
            _ => return Err(bad()),
        }
    }
    Ok(out)
}

// === impl Credentials ===

impl<'a> Credentials<'a> {
    /// The credentials of a call: its `authorization` metadata value (if any) and its client's
    /// end-entity certificate as DER (if the connection is mTLS).
    pub fn new(authorization: Option<&'a [u8]>, cert: Option<&'a [u8]>) -> Self {
        Self {
            bearer: authorization.map(bearer_token),
            cert,
        }
    }
}

/// The token of an `authorization: Bearer <token>` value (the scheme in any case, RFC 7235).
fn bearer_token(value: &[u8]) -> Result<&[u8], ()> {
    const SCHEME: &[u8] = b"bearer ";
    if value.len() <= SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return Err(());
    }
    let token = value[SCHEME.len()..].trim_ascii();
    if token.is_empty() {
        return Err(());
    }
    Ok(token)
}

// === impl Identities ===

impl Identities {
    /// The identities of `specs` (already validated: a digest or name that does not parse is
    /// skipped, so it identifies nobody).
    pub fn new(specs: &[PrincipalSpec]) -> Self {
        let mut ids = Self::default();
        for (i, p) in specs.iter().enumerate() {
            for t in p.token_sha256.iter() {
                if let Ok(d) = parse_digest(t) {
                    ids.tokens.push((d, i));
                }
            }
            if let Some(name) = p
                .client_cert
                .as_deref()
                .and_then(|c| CertName::parse(c).ok())
            {
                ids.certs.push((name, i));
            }
        }
        ids
    }

    /// The index of the principal `creds` identify. A bearer token, when present, decides (a bad one
    /// is refused even if a certificate would match); otherwise the client certificate does, the
    /// first table whose name it carries winning.
    pub fn identify(&self, creds: &Credentials<'_>) -> Result<usize, AuthError> {
        match (creds.bearer, creds.cert) {
            (Some(Ok(token)), _) => self.by_token(token).ok_or(AuthError::Invalid),
            (Some(Err(())), _) => Err(AuthError::Invalid),
            (None, Some(leaf)) => {
                let names = cert::names(leaf).map_err(|_| AuthError::Invalid)?;
                self.certs
                    .iter()
                    .find(|(name, _)| names.carries(name))
                    .map(|(_, i)| *i)
                    .ok_or(AuthError::Invalid)
            }
            (None, None) => Err(AuthError::Missing),
        }
    }

    /// Compares the token's digest with every principal's, in time independent of the digests and
    /// of which one matched.
    fn by_token(&self, token: &[u8]) -> Option<usize> {
        let digest: [u8; 32] = Sha256::digest(token).into();
        let mut found = subtle::Choice::from(0);
        let mut index = 0u64;
        for (d, i) in &self.tokens {
            let eq = d.ct_eq(&digest);
            index = u64::conditional_select(&index, &(*i as u64), eq);
            found |= eq;
        }
        bool::from(found).then_some(index as usize)
    }
}

#[cfg(test)]
mod tests;
