#![allow(clippy::unwrap_used)]

use rcgen::{CertificateParams, DnType, Issuer, KeyPair, SanType};

use super::*;

fn digest(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn with_token(name: &str, token: &str) -> PrincipalSpec {
    PrincipalSpec {
        token_sha256: Tokens::One(digest(token)),
        ..PrincipalSpec::new(name)
    }
}

fn with_cert(name: &str, cert: &str) -> PrincipalSpec {
    PrincipalSpec {
        client_cert: Some(cert.into()),
        ..PrincipalSpec::new(name)
    }
}

/// A client certificate with subject CN `cn` and these SANs, signed by a throwaway CA (as a TLS
/// layer that verified it would hand it over).
fn client_cert(cn: &str, sans: Vec<SanType>) -> Vec<u8> {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "batchd test CA");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "batchd tests");
    params.subject_alt_names = sans;
    params.signed_by(&key, &issuer).unwrap().der().to_vec()
}

fn bearer(token: &str) -> Vec<u8> {
    format!("Bearer {token}").into_bytes()
}

#[test]
fn a_token_identifies_its_principal_and_nothing_else_does() {
    let specs = [
        with_token("a", "alpha-token"),
        with_token("b", "beta-token"),
    ];
    validate(&specs).unwrap();
    let ids = Identities::new(&specs);
    let auth = |v: &[u8]| ids.identify(&Credentials::new(Some(v), None));
    assert_eq!(auth(&bearer("alpha-token")), Ok(0));
    assert_eq!(auth(&bearer("beta-token")), Ok(1));
    assert_eq!(auth(b"bearer  beta-token "), Ok(1), "scheme in any case");
    assert_eq!(auth(&bearer("gamma-token")), Err(AuthError::Invalid));
    assert_eq!(auth(&bearer("alpha-toke")), Err(AuthError::Invalid));
    for malformed in [
        &b"alpha-token"[..],
        b"Basic YTpi",
        b"Bearer",
        b"Bearer   ",
        b"",
    ] {
        assert_eq!(auth(malformed), Err(AuthError::Invalid), "{malformed:?}");
    }
    assert_eq!(
        ids.identify(&Credentials::new(None, None)),
        Err(AuthError::Missing)
    );
}

#[test]
fn a_rotation_keeps_two_tokens_valid() {
    let spec = PrincipalSpec {
        token_sha256: Tokens::Many(vec![digest("old"), digest("new").to_uppercase()]),
        ..PrincipalSpec::new("rotating")
    };
    validate(std::slice::from_ref(&spec)).unwrap();
    let ids = Identities::new(&[spec]);
    for token in ["old", "new"] {
        let value = bearer(token);
        assert_eq!(ids.identify(&Credentials::new(Some(&value), None)), Ok(0));
    }
}

#[test]
fn certificate_names_match_the_cn_or_a_san() {
    let specs = [
        with_cert("by-cn", "CN=thumbnailer"),
        with_cert("by-dns", "DNS:Worker.Example.com"),
        with_cert("by-uri", "URI=spiffe://example.org/ns/batch/sa/hasher"),
        with_cert("by-email", "email:ops@example.com"),
        with_cert("by-ip", "IP:10.1.2.3"),
    ];
    validate(&specs).unwrap();
    let ids = Identities::new(&specs);
    let who = |der: &[u8]| ids.identify(&Credentials::new(None, Some(der)));

    assert_eq!(who(&client_cert("thumbnailer", vec![])), Ok(0));
    let dns = SanType::DnsName("worker.example.COM".try_into().unwrap());
    assert_eq!(who(&client_cert("someone", vec![dns])), Ok(1));
    let uri = SanType::URI(
        "spiffe://example.org/ns/batch/sa/hasher"
            .try_into()
            .unwrap(),
    );
    assert_eq!(who(&client_cert("someone", vec![uri])), Ok(2));
    let email = SanType::Rfc822Name("ops@example.com".try_into().unwrap());
    assert_eq!(who(&client_cert("someone", vec![email])), Ok(3));
    let ip = SanType::IpAddress("10.1.2.3".parse().unwrap());
    assert_eq!(who(&client_cert("someone", vec![ip])), Ok(4));

    // A CN is not a DNS name and the other way round; unknown names and garbage identify nobody.
    let dns_cn = SanType::DnsName("thumbnailer".try_into().unwrap());
    assert_eq!(
        who(&client_cert("worker.example.com", vec![dns_cn])),
        Err(AuthError::Invalid)
    );
    assert_eq!(
        who(&client_cert("stranger", vec![])),
        Err(AuthError::Invalid)
    );
    assert_eq!(who(b"not a certificate"), Err(AuthError::Invalid));
}

#[test]
fn the_first_matching_table_wins_and_a_token_decides_over_the_certificate() {
    let specs = [
        with_cert("first", "CN=shared"),
        with_cert("second", "DNS:shared.example"),
        with_token("tok", "t0ken"),
    ];
    let ids = Identities::new(&specs);
    let dns = SanType::DnsName("shared.example".try_into().unwrap());
    let der = client_cert("shared", vec![dns]);
    assert_eq!(ids.identify(&Credentials::new(None, Some(&der))), Ok(0));
    let good = bearer("t0ken");
    assert_eq!(
        ids.identify(&Credentials::new(Some(&good), Some(&der))),
        Ok(2)
    );
    let bad = bearer("wrong");
    assert_eq!(
        ids.identify(&Credentials::new(Some(&bad), Some(&der))),
        Err(AuthError::Invalid),
        "a bad token is refused even with a good certificate"
    );
}

#[test]
fn validation_names_the_principal_and_the_field() {
    let err = |specs: &[PrincipalSpec]| validate(specs).unwrap_err().to_string();

    let mut short = with_token("a", "x");
    short.token_sha256 = Tokens::One("abc123".into());
    let e = err(&[short]);
    assert!(
        e.starts_with("principal \"a\": token_sha256: must be the hex SHA-256"),
        "{e}"
    );
    assert!(!e.contains("abc123"), "the value is never echoed: {e}");

    let mut not_hex = with_token("a", "x");
    not_hex.token_sha256 = Tokens::One("z".repeat(64));
    assert!(err(&[not_hex]).contains("token_sha256"));

    let e = err(&[with_token("a", "x"), with_token("a", "y")]);
    assert_eq!(
        e,
        "principal \"a\": name: another [[principal]] has this name"
    );
    let e = err(&[with_token("a", "same"), with_token("b", "same")]);
    assert_eq!(
        e,
        "principal \"b\": token_sha256: the same token as principal \"a\""
    );
    let e = err(&[with_cert("a", "CN=x"), with_cert("b", "cn = x")]);
    assert!(
        e.contains("principal \"b\": client_cert: the same certificate name"),
        "{e}"
    );

    let e = err(&[PrincipalSpec {
        weight: 0,
        ..with_token("w", "x")
    }]);
    assert_eq!(e, "principal \"w\": weight: must be between 1 and 10000");
    let e = err(&[PrincipalSpec {
        max_calls: Some(0),
        ..with_token("q", "x")
    }]);
    assert_eq!(e, "principal \"q\": max_calls: must be at least 1");
    let e = err(&[PrincipalSpec {
        max_running: Some(MAX_QUOTA + 1),
        ..with_token("q", "x")
    }]);
    assert!(
        e.starts_with("principal \"q\": max_running: must be at most"),
        "{e}"
    );

    let e = err(&[PrincipalSpec::new("nobody")]);
    assert!(
        e.starts_with("principal \"nobody\": token_sha256: a principal needs"),
        "{e}"
    );
    assert!(err(&[with_token("", "x")]).starts_with("principal #1: name: must not be empty"));
    assert!(err(&[with_token("_anonymous", "x")]).contains("must not start with `_`"));
    assert!(err(&[with_token("a b", "x")]).contains("may hold only"));
    assert!(err(&[with_cert("c", "CN=")]).contains("client_cert: empty name"));
    assert!(err(&[with_cert("c", "OU=x")]).contains("client_cert: unknown kind"));
    assert!(err(&[with_cert("c", "IP:nope")]).contains("not an IP address"));
    let dup = PrincipalSpec {
        handlers: Some(vec!["echo".into(), "echo".into()]),
        ..with_token("h", "x")
    };
    assert!(err(&[dup]).contains("handlers: \"echo\" is listed twice"));
}

#[test]
fn handlers_must_exist() {
    let spec = PrincipalSpec {
        handlers: Some(vec!["echo".into(), "thumbnial".into()]),
        ..with_token("t", "x")
    };
    let known = |h: &str| h == "echo" || h == "thumbnail";
    let e = check_handlers(std::slice::from_ref(&spec), known).unwrap_err();
    assert_eq!(
        e.to_string(),
        "principal \"t\": handlers: unknown handler \"thumbnial\""
    );
    assert!(check_handlers(&[with_token("all", "x")], known).is_ok());
}
