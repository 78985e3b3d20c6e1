//! TLS and mTLS on the gRPC listener: it serves TLS only, refuses clients without a certificate
//! its client CAs signed, hands the client's certificate to the service (`Request::peer_certs()`),
//! and a bad file at start is a config error naming the field (exit 64).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::{Arc, Mutex};

use batchd::client::{self, ClientError, Remote};
use batchd::config::Config;
use batchd::proto::{self, ListHandlersRequest};
use batchd::server::incoming::{Incoming, Limits};
use batchd::server::tls::Tls;
use support::daemon::Daemon;
use support::tls::{handshake, target, Ca, Files};
use support::TestServer;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A TLS daemon with `files`, mTLS when `mtls`.
fn tls_server(files: &Files, mtls: bool) -> TestServer {
    TestServer::start(|c| {
        c.tls_cert = files.cert();
        c.tls_key = files.key();
        if mtls {
            c.tls_client_ca = files.client_ca();
        }
    })
}

async fn list_handlers(target: &Remote) -> Result<usize, ClientError> {
    let mut client = client::connect_to(target).await?;
    let list = client
        .list_handlers(ListHandlersRequest {})
        .await
        .map_err(|status| target.explain(ClientError::from_status(status)))?;
    Ok(list.into_inner().handlers.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_tls_only() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server(&[]), None);
    let ca_file = files.write("ca.crt", &ca.pem());
    let server = tls_server(&files, false);

    assert!(
        list_handlers(&target(server.addr, &ca_file, None))
            .await
            .unwrap()
            > 0
    );
    // A whole job over TLS.
    let mut client = client::connect_to(&target(server.addr, &ca_file, None))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(support::batch(
        "b",
        vec![support::job("j", "echo", b"over tls", &[])],
    ))
    .await
    .unwrap();
    drop(tx);
    let mut results = client
        .process(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let msg = results.message().await.unwrap().unwrap();
    assert_eq!(&msg.results[0].output[..], b"over tls");
    assert_eq!(msg.results[0].outcome, proto::Outcome::Ok as i32);

    // Plaintext HTTP/2 against it is closed, never served.
    let plain = list_handlers(&Remote::new(server.url())).await;
    assert!(plain.is_err(), "{plain:?}");
    // The certificate served is the one in the files.
    let served = handshake(server.addr, &ca.pem(), None).await.unwrap();
    assert_eq!(
        served,
        files_cert(&files),
        "the server presents tls_cert's certificate"
    );
}

fn files_cert(files: &Files) -> CertificateDer<'static> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_file(files.cert()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_clients_without_a_certificate_its_cas_signed() {
    let (server_ca, clients_a, clients_b, stranger) = (
        Ca::new("server CA"),
        Ca::new("clients A"),
        Ca::new("clients B"),
        Ca::new("stranger"),
    );
    // Two CAs in the client CA file: either one's clients get in.
    let both = format!("{}{}", clients_a.pem(), clients_b.pem());
    let files = Files::new(&server_ca.server(&[]), Some(&both));
    let ca_file = files.write("ca.crt", &server_ca.pem());
    let server = tls_server(&files, true);

    for (name, ca) in [("alice", &clients_a), ("bob", &clients_b)] {
        let id = files.write_client(name, &ca.client(name));
        let n = list_handlers(&target(server.addr, &ca_file, Some(id))).await;
        assert!(n.unwrap() > 0, "{name}'s CA is in tls_client_ca");
    }

    let none = list_handlers(&target(server.addr, &ca_file, None)).await;
    match none {
        Err(ClientError::Certificate { reason, .. }) => {
            assert!(reason.contains("requires a client certificate"), "{reason}")
        }
        other => panic!("a client without a certificate: {other:?}"),
    }
    let mallory = files.write_client("mallory", &stranger.client("mallory"));
    let wrong = list_handlers(&target(server.addr, &ca_file, Some(mallory))).await;
    match wrong {
        Err(ClientError::Certificate { reason, .. }) => {
            assert!(reason.starts_with("certificate: "), "{reason}")
        }
        other => panic!("a client with a stranger's certificate: {other:?}"),
    }
}

/// The daemon's TLS connections carry the client's certificate to the services: what principals
/// (client-certificate identities) read with `Request::peer_certs()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_certificate_reaches_the_service() {
    let (server_ca, clients) = (Ca::new("server CA"), Ca::new("clients"));
    let files = Files::new(&server_ca.server(&[]), Some(&clients.pem()));
    let ca_file = files.write("ca.crt", &server_ca.pem());
    let alice = clients.client("alice");
    let id = files.write_client("alice", &alice);
    let config = Config {
        tls_cert: files.cert(),
        tls_key: files.key(),
        tls_client_ca: files.client_ca(),
        ..Config::default()
    };
    let tls = Tls::from_config(&config).unwrap().unwrap();

    type Seen = (
        Option<Vec<CertificateDer<'static>>>,
        Option<std::net::SocketAddr>,
    );
    let seen: Arc<Mutex<Option<Seen>>> = Arc::default();
    let record = Arc::clone(&seen);
    let interceptor = move |req: tonic::Request<()>| {
        let certs = req.peer_certs().map(|c| c.as_ref().clone());
        *record.lock().unwrap() = Some((certs, req.remote_addr()));
        Ok(req)
    };
    let (_, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = Incoming::new(listener, Limits::from(&config), tls);
    let serve = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(tonic::service::interceptor::InterceptedService::new(
                health,
                interceptor,
            ))
            .serve_with_incoming(incoming),
    );

    let channel = client::channel_to(&target(addr, &ca_file, Some(id)))
        .await
        .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .unwrap();
    let (certs, remote) = seen.lock().unwrap().clone().unwrap();
    let certs = certs.expect("peer_certs() is Some over TLS");
    assert_eq!(certs[0], alice.der(), "the client's leaf certificate first");
    assert!(remote.is_some_and(|a| a.ip().is_loopback()), "{remote:?}");
    serve.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_file_at_start_exits_64_naming_the_field() {
    let ca = Ca::new("CA");
    let files = Files::new(&ca.server(&[]), Some(&ca.pem()));
    let other = ca.server(&[]);
    let garbage = files.write("garbage.pem", "not a certificate\n");
    let other_key = files.write("other.key", &other.key);
    let missing = files.dir.path().join("missing.crt");
    let cert = files.cert().display().to_string();
    let key = files.key().display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                format!("tls_cert={}", missing.display()),
                format!("tls_key={key}"),
            ],
            "tls_cert: cannot read",
        ),
        (
            vec![
                format!("tls_cert={}", garbage.display()),
                format!("tls_key={key}"),
            ],
            "tls_cert: ",
        ),
        (
            vec![
                format!("tls_cert={cert}"),
                format!("tls_key={}", garbage.display()),
            ],
            "tls_key: ",
        ),
        (
            vec![
                format!("tls_cert={cert}"),
                format!("tls_key={}", other_key.display()),
            ],
            "is not the private key of the certificate",
        ),
        (
            vec![
                format!("tls_cert={cert}"),
                format!("tls_key={key}"),
                format!("tls_client_ca={}", garbage.display()),
            ],
            "tls_client_ca: ",
        ),
        (
            vec![format!("tls_cert={cert}")],
            "tls_key: must be set with tls_cert",
        ),
    ];
    for (sets, expected) in cases {
        let mut args = Vec::new();
        for s in &sets {
            args.push("--set");
            args.push(s.as_str());
        }
        let mut daemon = Daemon::spawn(&args, &[]);
        let status = daemon.exit().await;
        let stderr = daemon.stderr();
        assert_eq!(status.code(), Some(64), "{sets:?}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{sets:?}: expected {expected:?} in {stderr}"
        );
    }
}

#[test]
fn tls_enabled_tells_whether_the_listener_serves_tls() {
    let mut c = Config::default();
    assert!(!c.tls_enabled() && !c.mtls_enabled());
    c.tls_cert = "/c".into();
    c.tls_key = "/k".into();
    assert!(c.tls_enabled() && !c.mtls_enabled());
    c.tls_client_ca = "/ca".into();
    assert!(c.mtls_enabled());
    c.tls_key = "".into();
    assert!(c.validate().unwrap_err().to_string().contains("tls_key"));
}

/// The TLS acceptor's client certificate reaches the auth interceptor: with `[[principal]]`
/// tables, an mTLS client is the principal its certificate names (no token), gets only that
/// principal's handlers, and a certificate the client CAs signed that names no principal is
/// UNAUTHENTICATED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtls_client_certificate_identifies_its_principal() {
    use batchd::auth::PrincipalSpec;
    use tonic::Code;

    let (server_ca, clients) = (Ca::new("server CA"), Ca::new("clients"));
    let files = Files::new(&server_ca.server(&[]), Some(&clients.pem()));
    let ca_file = files.write("ca.crt", &server_ca.pem());
    let server = TestServer::start(|c| {
        c.tls_cert = files.cert();
        c.tls_key = files.key();
        c.tls_client_ca = files.client_ca();
        c.principal = vec![
            PrincipalSpec {
                name: "thumbnailer".into(),
                token_sha256: Default::default(),
                client_cert: Some("CN=thumbnailer".into()),
                handlers: Some(vec!["echo".into()]),
                max_calls: None,
                max_running: None,
                weight: 1,
            },
            PrincipalSpec {
                name: "admin".into(),
                token_sha256: Default::default(),
                client_cert: Some("CN=admin".into()),
                handlers: None,
                max_calls: None,
                max_running: None,
                weight: 1,
            },
        ];
    });

    let names = |target: Remote| async move {
        let mut client = client::connect_to(&target).await?;
        let list = client.list_handlers(ListHandlersRequest {}).await;
        let list = list.map_err(|status| target.explain(ClientError::from_status(status)))?;
        let mut names: Vec<String> = list
            .into_inner()
            .handlers
            .into_iter()
            .map(|h| h.name)
            .collect();
        names.sort();
        Ok::<_, ClientError>(names)
    };
    let thumbnailer = files.write_client("thumbnailer", &clients.client("thumbnailer"));
    let admin = files.write_client("admin", &clients.client("admin"));
    let nobody = files.write_client("nobody", &clients.client("nobody"));

    let seen = names(target(server.addr, &ca_file, Some(thumbnailer.clone())))
        .await
        .unwrap();
    assert_eq!(
        seen,
        ["echo"],
        "thumbnailer's certificate: only its handlers"
    );
    let all = names(target(server.addr, &ca_file, Some(admin)))
        .await
        .unwrap();
    assert!(
        all.len() > 1 && all.contains(&"sha256".to_owned()),
        "{all:?}"
    );

    // A job outside thumbnailer's handlers gets its own REJECTED result naming it.
    let mut client = client::connect_to(&target(server.addr, &ca_file, Some(thumbnailer)))
        .await
        .unwrap();
    let results = client
        .run_batch(proto::JobBatch {
            batch_id: "b".into(),
            jobs: vec![
                support::job("ok", "echo", b"hi", &[]),
                support::job("no", "sha256", b"hi", &[]),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let mut results = results;
    let mut outcomes = Vec::new();
    while let Some(msg) = results.message().await.unwrap() {
        for r in msg.results {
            outcomes.push((r.job_id.clone(), r.outcome, r.error.clone()));
        }
    }
    outcomes.sort();
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
    assert_eq!(outcomes[1].0, "ok");
    assert_eq!(outcomes[1].1, proto::Outcome::Ok as i32, "{outcomes:?}");
    assert_eq!(
        outcomes[0].1,
        proto::Outcome::Rejected as i32,
        "{outcomes:?}"
    );
    assert!(outcomes[0].2.contains("thumbnailer"), "{outcomes:?}");

    // Signed by the client CA, but naming no principal.
    match names(target(server.addr, &ca_file, Some(nobody))).await {
        Err(ClientError::Call(status)) => {
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}")
        }
        other => panic!("a certificate of no principal: {other:?}"),
    }
}

/// Bearer tokens over TLS are not readable on the path: a daemon with tokens that serves TLS on
/// every address logs no plaintext warning (tests/principals_reload.rs shows it without TLS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_over_tls_off_loopback_are_not_warned_about() {
    let ca = Ca::new("CA");
    let files = Files::new(&ca.server(&[]), None);
    let config = support::daemon::write_config(
        &files.dir,
        &support::principals::principal_toml("app", &["t"], ""),
    );
    let mut args = vec!["--config".to_owned(), config.display().to_string()];
    args.extend(files.daemon_args(false));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::try_serving_on("0.0.0.0:0", &args)
        .await
        .expect("serves on 0.0.0.0:0");
    daemon.signal("TERM");
    assert!(daemon.exit().await.success());
    let log = daemon.stderr();
    assert!(log.contains("tls=\"tls\""), "{log}");
    assert!(!log.contains("plaintext"), "{log}");
}
