//! Certificates rotate without a restart: on SIGHUP and when the files change, new handshakes get
//! the new certificate while open calls go on; a file that does not load keeps the one in force.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use batchd::client;
use batchd::config::Config;
use batchd::proto::{self, ProcessRequest, ProcessResponse};
use batchd::server::tls::Tls;
use support::daemon::Daemon;
use support::tls::{handshake, replace, target, Ca, Files};
use support::{batch, job, TestServer};
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tonic::Streaming;

/// Generous bound for a reload to show (the file watch looks every 2 s).
const RELOAD_LIMIT: Duration = Duration::from_secs(30);

/// Polls handshakes with `addr` until the server presents `cert`.
async fn until_served(addr: SocketAddr, ca: &str, cert: &CertificateDer<'static>) {
    let start = Instant::now();
    loop {
        if handshake(addr, ca, None).await.as_ref() == Ok(cert) {
            return;
        }
        assert!(
            start.elapsed() < RELOAD_LIMIT,
            "the new certificate is not served after {RELOAD_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Process call left open: batches go in through `tx`, results come out of `rx`.
struct OpenCall {
    tx: mpsc::Sender<ProcessRequest>,
    rx: Streaming<ProcessResponse>,
}

impl OpenCall {
    async fn open(addr: SocketAddr, ca_file: &std::path::Path) -> Self {
        let mut client = client::connect_to(&target(addr, ca_file, None))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(4);
        let rx = client
            .process(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self { tx, rx }
    }

    /// Sends one echo job and waits for its result on the same call.
    async fn echo(&mut self, id: &str) {
        self.tx
            .send(batch(id, vec![job(id, "echo", id.as_bytes(), &[])]))
            .await
            .unwrap();
        let msg = tokio::time::timeout(Duration::from_secs(20), self.rx.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(msg.results[0].job_id, id);
        assert_eq!(msg.results[0].outcome, proto::Outcome::Ok as i32);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_certificate_and_a_bad_file_keeps_the_old_one() {
    let ca = Ca::new("CA");
    let (a, b, c) = (ca.server(&[]), ca.server(&[]), ca.server(&[]));
    let files = Files::new(&a, None);
    let ca_file = files.write("ca.crt", &ca.pem());
    let args = files.daemon_args(false);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::serving(&args).await;
    let addr: SocketAddr = daemon.url["http://".len()..].parse().unwrap();
    assert_eq!(handshake(addr, &ca.pem(), None).await.unwrap(), a.der());
    let mut call = OpenCall::open(addr, &ca_file).await;
    call.echo("before").await;

    files.write_server(&b);
    daemon.signal("HUP");
    daemon.wait_for_log("TLS reloaded").await;
    until_served(addr, &ca.pem(), &b.der()).await;
    call.echo("after-rotation").await;

    // Not a certificate: refused, logged with the field, B stays.
    replace(&files.cert(), "garbage\n");
    daemon.signal("HUP");
    daemon.wait_for_log("TLS reload failed").await;
    let log = daemon.stderr();
    assert!(log.contains("tls_cert"), "{log}");
    assert_eq!(handshake(addr, &ca.pem(), None).await.unwrap(), b.der());

    // C's certificate with B's key (a rotation caught half-way): refused too, naming the key.
    replace(&files.cert(), &c.cert);
    daemon.signal("HUP");
    daemon
        .wait_for_log("is not the private key of the certificate")
        .await;
    assert_eq!(handshake(addr, &ca.pem(), None).await.unwrap(), b.der());

    // The key follows, and the file watch alone picks it up.
    replace(&files.key(), &c.key);
    until_served(addr, &ca.pem(), &c.der()).await;
    call.echo("after-second-rotation").await;
    assert!(daemon.running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_files_rotate_without_a_signal_and_open_calls_go_on() {
    let server_ca = Ca::new("server CA");
    let (a, b) = (server_ca.server(&[]), server_ca.server(&[]));
    let files = Files::new(&a, None);
    let ca_file = files.write("ca.crt", &server_ca.pem());
    let server = TestServer::start(|c| {
        c.tls_cert = files.cert();
        c.tls_key = files.key();
    });
    let mut call = OpenCall::open(server.addr, &ca_file).await;
    call.echo("before").await;

    files.write_server(&b);
    until_served(server.addr, &server_ca.pem(), &b.der()).await;
    call.echo("after").await;
    // A new client trusts the same CA and gets in.
    let n = client::connect_to(&target(server.addr, &ca_file, None))
        .await
        .unwrap()
        .list_handlers(proto::ListHandlersRequest {})
        .await
        .unwrap();
    assert!(!n.into_inner().handlers.is_empty());
}

#[test]
fn a_reload_that_fails_keeps_what_is_in_force() {
    let (ca, clients) = (Ca::new("CA"), Ca::new("clients"));
    let (a, b) = (ca.server(&[]), ca.server(&[]));
    let files = Files::new(&a, Some(&clients.pem()));
    let config = Config {
        tls_cert: files.cert(),
        tls_key: files.key(),
        tls_client_ca: files.client_ca(),
        ..Config::default()
    };
    let tls = Tls::from_config(&config).unwrap().unwrap();
    assert!(tls.mutual());
    let in_force = tls.fingerprint();

    let fails = |write: &dyn Fn(), field: &str| {
        write();
        let e = tls.reload().unwrap_err().to_string();
        assert!(e.contains(field), "{e}");
        assert_eq!(tls.fingerprint(), in_force, "after {e}");
        files.write_server(&a);
        std::fs::write(files.client_ca(), clients.pem()).unwrap();
    };
    fails(&|| replace(&files.cert(), "garbage"), "tls_cert");
    fails(
        &|| std::fs::remove_file(files.key()).unwrap(),
        "tls_key: cannot read",
    );
    fails(&|| replace(&files.key(), &b.key), "tls_key");
    fails(&|| replace(&files.client_ca(), &b.key), "tls_client_ca");

    files.write_server(&b);
    tls.reload().unwrap();
    assert_ne!(tls.fingerprint(), in_force);
}
