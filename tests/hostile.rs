//! Hostile clients, plaintext and TLS: a slowloris that never finishes its TLS handshake or its
//! HTTP/2 preface is closed at `handshake_timeout`; connections beyond `max_connections` wait in
//! the listen backlog until one closes; one address beyond `max_connections_per_peer` is closed at
//! once; a header flood is refused by the HTTP/2 limits and the daemon goes on serving.
//! (What these cost in memory is measured by `cargo bench --bench daemon -- hostile`.)
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use batchd::config::Config;
use batchd::server::incoming::PREFACE;
use support::h2frames::{flood_request, frame, read_until, GOAWAY, RST_STREAM, SETTINGS};
use support::tls::{Ca, Files};
use support::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tonic::metadata::MetadataValue;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Far beyond any deadline these tests set: "at once" and "eventually" both fit in it.
const LIMIT: Duration = Duration::from_secs(20);

/// Connects from `local` (any loopback address) to `addr`.
async fn connect_from(local: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Whether the daemon hands a connection from `local` to HTTP/2: after the preface, its SETTINGS.
async fn served_from(local: &str, addr: SocketAddr) -> bool {
    let mut conn = connect_from(local, addr).await;
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    if conn.write_all(&hello).await.is_err() {
        return false;
    }
    matches!(
        tokio::time::timeout(LIMIT, read_until(&mut conn, &[SETTINGS])).await,
        Ok(Some(SETTINGS))
    )
}

/// Waits until the daemon closes `conn` (end of stream or reset); how long that took.
async fn closed_after(conn: &mut TcpStream) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(LIMIT, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the daemon still holds the connection after {LIMIT:?}"
    );
    start.elapsed()
}

async fn health(addr: SocketAddr) -> Result<(), tonic::Status> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(drop)
}

fn deadline(secs: u64) -> impl FnOnce(&mut Config) {
    move |c| c.handshake_timeout = Duration::from_secs(secs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_is_closed_at_the_handshake_deadline() {
    let server = TestServer::start(deadline(1));
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut half = TcpStream::connect(server.addr).await.unwrap();
    half.write_all(&PREFACE[..12]).await.unwrap();
    let (silent, half) = tokio::join!(closed_after(&mut silent), closed_after(&mut half));
    for took in [silent, half] {
        assert!(took >= Duration::from_millis(900), "closed early: {took:?}");
    }
    // Meanwhile and after, clients that speak are served.
    health(server.addr).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_slowloris_is_closed_at_the_handshake_deadline() {
    let ca = Ca::new("CA");
    let files = Files::new(&ca.server(&[]), None);
    let server = TestServer::start(|c| {
        c.tls_cert = files.cert();
        c.tls_key = files.key();
        c.handshake_timeout = Duration::from_secs(1);
    });
    // The start of a ClientHello record, and nothing more.
    let mut stalled = TcpStream::connect(server.addr).await.unwrap();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    // A whole handshake, then no HTTP/2 preface.
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut tls = tls_connect(tcp, &ca).await;
    let (stalled, quiet) = tokio::join!(closed_after(&mut stalled), async {
        let start = Instant::now();
        let mut buf = [0u8; 64];
        let ended = tokio::time::timeout(LIMIT, async {
            while let Ok(1..) = tls.read(&mut buf).await {}
        })
        .await;
        assert!(
            ended.is_ok(),
            "a TLS connection without a preface is still held"
        );
        start.elapsed()
    });
    assert!(stalled >= Duration::from_millis(900), "{stalled:?}");
    assert!(quiet >= Duration::from_millis(500), "{quiet:?}");
}

async fn tls_connect(tcp: TcpStream, ca: &Ca) -> tokio_rustls::client::TlsStream<TcpStream> {
    use std::sync::Arc;
    use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    use tokio_rustls::rustls::{crypto::ring, ClientConfig, RootCertStore};
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap())
        .unwrap();
    let mut config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_wait_until_one_closes() {
    let server = TestServer::start(|c| {
        c.max_connections = 2;
        c.handshake_timeout = Duration::from_secs(60);
    });
    let a = TcpStream::connect(server.addr).await.unwrap();
    let b = TcpStream::connect(server.addr).await.unwrap();
    let waiting = tokio::spawn(health(server.addr));
    // Not served while both slots are held (the kernel queued its connection in the backlog).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a third connection was served past max_connections"
    );
    drop((a, b));
    tokio::time::timeout(LIMIT, waiting)
        .await
        .expect("served once a slot is free")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_beyond_its_share_is_closed_at_once() {
    let server = TestServer::start(|c| {
        c.max_connections_per_peer = 2;
        c.handshake_timeout = Duration::from_secs(60);
    });
    let a = connect_from("127.0.0.1", server.addr).await;
    let b = connect_from("127.0.0.1", server.addr).await;
    let mut third = connect_from("127.0.0.1", server.addr).await;
    // Closed at once (far sooner than the 60 s handshake deadline).
    let took = closed_after(&mut third).await;
    assert!(took < Duration::from_secs(30), "{took:?}");
    // Another address is served meanwhile; the first one again once its connections go.
    assert!(served_from("127.0.0.2", server.addr).await);
    drop((a, b));
    let start = Instant::now();
    while !served_from("127.0.0.1", server.addr).await {
        assert!(start.elapsed() < LIMIT, "127.0.0.1 is never served again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_flood_is_refused_by_http2_limits_and_serving_goes_on() {
    let server = TestServer::start(|_| {});
    let limit = server_header_limit();

    // Over the limit: the call gets a 431 answer (tonic: a status naming it), not a crash.
    let channel = tonic::transport::Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut request = tonic::Request::new(HealthCheckRequest::default());
    let value = MetadataValue::try_from("x".repeat(limit)).unwrap();
    request.metadata_mut().insert("x-flood", value);
    let status = HealthClient::new(channel.clone())
        .check(request)
        .await
        .unwrap_err();
    assert!(status.message().contains("431"), "{status:?}");
    // The same connection serves the next call.
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .unwrap();

    // A megabyte of headers over CONTINUATION frames: the connection is told to go away long
    // before the block ends; the daemon never buffers it.
    let mut conn = TcpStream::connect(server.addr).await.unwrap();
    conn.write_all(PREFACE).await.unwrap();
    conn.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    let flood = flood_request(1 << 20);
    let (mut rd, mut wr) = conn.split();
    let (_, answer) = tokio::join!(
        async {
            // The daemon may close before all is written.
            let _ = wr.write_all(&flood).await;
        },
        async {
            let mut head = [0u8; 9];
            tokio::time::timeout(LIMIT, async {
                loop {
                    rd.read_exact(&mut head).await.ok()?;
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let mut payload = vec![0u8; len];
                    rd.read_exact(&mut payload).await.ok()?;
                    if [GOAWAY, RST_STREAM].contains(&head[3]) {
                        return Some(head[3]);
                    }
                }
            })
            .await
            .unwrap()
        }
    );
    assert_eq!(answer, Some(GOAWAY), "the flooding connection is sent away");
    health(server.addr).await.unwrap();
}

fn server_header_limit() -> usize {
    Config::default().http2_max_header_list_size.as_usize()
}
