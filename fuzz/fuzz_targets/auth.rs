//! Authentication at the edge: `authorization` metadata (and a client certificate's DER) →
//! the `Authenticate` interceptor in front of `BatchService` / `Engine::authenticate` → the
//! principal, against a table of three principals (one token, two tokens in rotation, a
//! certificate name). Also batchctl's side: a token as `Token::new` reads it, sent as metadata,
//! must prove its principal after a reload that installs its digest.
//!
//! Input: a byte of flags (bit 0: an `authorization` value, bit 1: a certificate, bits 2-3: a
//! known token (1-3) to put before the value, bits 4-5 the scheme's case, bits 6-7 spaces), a
//! length byte and the value, a length byte and batchctl's token text, then the certificate.
//!
//! Properties:
//! - Never a panic; a call is a principal or UNAUTHENTICATED.
//! - The outcome agrees with an independent reading of the header: `Bearer` in any case, one or
//!   more spaces, the token without surrounding whitespace; a present token decides alone (a
//!   known one → its principal, else refused), no header and no certificate → "credentials
//!   required", a certificate of nobody's name → refused, with one of two fixed messages
//!   (nothing the call presented is quoted back).
//! - Without principals every call is anonymous, whatever it presents.
//! - Every token batchctl accepts authenticates as the principal holding its SHA-256.
#![no_main]

use batchd::auth::{AuthError, Credentials};
use batchd::auth::{PrincipalSpec, Tokens};
use batchd::client::Token;
use batchd::service::Authenticate;
use batchd::Engine;
use batchd_fuzz::{daemon, sha256_hex, ALICE_TOKEN, BOB_TOKENS};
use libfuzzer_sys::fuzz_target;
use tonic::metadata::MetadataMap;
use tonic::service::Interceptor;
use tonic::{Code, Request};

/// One fuzz input, read from the bytes.
#[derive(Debug)]
struct Input<'a> {
    /// The raw `authorization` value, or none.
    authorization: Option<&'a [u8]>,
    /// A known token (0-2) to put before the value, with the scheme's casing and spaces.
    known: Option<(u8, u8, u8)>,
    /// A client certificate's DER.
    cert: Option<&'a [u8]>,
    /// A token as batchctl reads it from a file or `BATCHD_TOKEN`.
    client_token: String,
}

fuzz_target!(|data: &[u8]| {
    if let Some(input) = Input::read(data) {
        run(input);
    }
});

impl<'a> Input<'a> {
    fn read(data: &'a [u8]) -> Option<Self> {
        let (&flags, rest) = data.split_first()?;
        let (&n, rest) = rest.split_first()?;
        let (authorization, rest) = rest.split_at_checked(usize::from(n))?;
        let (&n, rest) = rest.split_first()?;
        let (token, cert) = rest.split_at_checked(usize::from(n))?;
        let known = match (flags >> 2) & 3 {
            0 => None,
            k => Some((k - 1, (flags >> 4) & 3, flags >> 6)),
        };
        Some(Self {
            authorization: (flags & 1 != 0).then_some(authorization),
            known,
            cert: (flags & 2 != 0).then_some(cert),
            client_token: String::from_utf8_lossy(token).into_owned(),
        })
    }
}

fn run(input: Input<'_>) {
    let d = daemon();
    let mut header = input.authorization.map(<[u8]>::to_vec);
    if let Some((token, case, pad)) = input.known {
        let token = [ALICE_TOKEN, BOB_TOKENS[0], BOB_TOKENS[1]][usize::from(token % 3)];
        let scheme = ["Bearer", "bearer", "BEARER", "bEaReR"][usize::from(case % 4)];
        let pad = " \t".repeat(usize::from(pad % 3));
        let mut v = format!("{scheme} {pad}{token}{pad}").into_bytes();
        v.extend(header.unwrap_or_default());
        header = Some(v);
    }
    let header = header.as_deref();

    // The engine's own answer.
    let creds = Credentials::new(header, input.cert);
    let got = d.engine.authenticate(&creds).map(|p| p.name().to_owned());
    let want = expected(header, input.cert);
    match (&got, &want) {
        (Ok(p), Some(Ok(w))) => assert_eq!(p, w),
        (Err(e), Some(Err(w))) => {
            // One of two fixed messages: nothing the call presented comes back in it.
            let want = batchd::Error::Unauthenticated(w.to_string()).to_string();
            assert_eq!(e.to_string(), want);
        }
        // A certificate: only the principals with a certificate name may come out of it.
        (Ok(p), None) => assert!(p == "bob" || p == "carol", "{p}"),
        (Err(_), None) => {}
        _ => panic!("engine: {got:?}, expected: {want:?} for {header:?}"),
    }
    let anonymous = d.anonymous.authenticate(&creds).expect("anonymous daemon");
    assert_eq!(anonymous.name(), batchd::auth::ANONYMOUS);

    // Through the interceptor, as a call's metadata arrives over HTTP/2 (values HTTP accepts).
    if let Some(value) = header.and_then(|h| http::HeaderValue::from_bytes(h).ok()) {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, value);
        let request =
            Request::from_parts(MetadataMap::from_headers(headers), Default::default(), ());
        let through = Authenticate::batch_service(d.engine.clone()).call(request);
        match (&through, &got) {
            (Ok(_), Ok(_)) => {}
            (Err(s), Err(_)) => assert_eq!(s.code(), Code::Unauthenticated),
            _ => panic!("interceptor: {through:?}, engine: {got:?}"),
        }
    }

    client_token(&input.client_token);
}

/// The principal (or refusal) the header decides; `None` when the certificate decides.
fn expected(header: Option<&[u8]>, cert: Option<&[u8]>) -> Option<Result<String, AuthError>> {
    let Some(header) = header else {
        return cert.is_none().then_some(Err(AuthError::Missing));
    };
    let Some(token) = token_of(header) else {
        return Some(Err(AuthError::Invalid));
    };
    Some(if token == ALICE_TOKEN.as_bytes() {
        Ok("alice".to_owned())
    } else if BOB_TOKENS.iter().any(|t| t.as_bytes() == token) {
        Ok("bob".to_owned())
    } else {
        Err(AuthError::Invalid)
    })
}

/// RFC 6750's `Bearer <token>`, the scheme in any case, whitespace around the token dropped.
fn token_of(header: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = header.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// A token batchctl accepts proves the principal whose `token_sha256` is its digest.
fn client_token(text: &str) {
    let Ok(token) = Token::new(text, "fuzz") else {
        return;
    };
    let trimmed = text.trim();
    let mut spec = PrincipalSpec::new("rotated");
    spec.token_sha256 = Tokens::One(sha256_hex(trimmed.as_bytes()));
    let engine = rotating();
    engine
        .set_principals(&[spec], false)
        .expect("a principal with one token installs");
    let mut metadata = MetadataMap::new();
    token.insert_into(&mut metadata);
    let request = Request::from_parts(metadata, Default::default(), ());
    let through = Authenticate::batch_service(engine.clone()).call(request);
    assert!(through.is_ok(), "token {trimmed:?}: {through:?}");
    let value = format!("Bearer {trimmed}");
    let p = engine
        .authenticate(&Credentials::new(Some(value.as_bytes()), None))
        .expect("the token proves its principal");
    assert_eq!(p.name(), "rotated");
}

/// An engine whose principal table each input replaces, as a reload does.
fn rotating() -> &'static Engine {
    static ENGINE: std::sync::OnceLock<Engine> = std::sync::OnceLock::new();
    ENGINE.get_or_init(|| {
        let d = daemon();
        Engine::refusing(d.engine.limits().clone(), batchd::Registry::builtin())
    })
}
