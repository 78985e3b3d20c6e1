//! `hostile`: what clients that never speak HTTP/2 cost the daemon, and how long it holds them.
//!
//! Parts, each on a fresh daemon:
//! - `silent`: N (`HOSTILE_CONNS`, default 10,000) TCP connections that send nothing, with
//!   `max_connections` above N. Cost: RSS per connection while the daemon holds them all (a long
//!   `handshake_timeout`, so that none is closed while the bench still opens the others) and RSS
//!   once they are gone. Release: with the default `handshake_timeout` (10 s), how long after
//!   opening each connection the daemon closed it, and how many it still held 30 s after they
//!   opened (the issue measured 84 % before).
//! - `half`: the same with half an HTTP/2 preface sent.
//! - `tls_silent` and `tls_hello`: a TLS daemon; connections that send nothing, and connections that
//!   send a ClientHello and never finish the handshake (rustls's state per connection).
//! - `cap`: N silent connections against the default `max_connections` (4096; the per-peer limit
//!   lifted): the most the daemon holds at once and its RSS (the rest wait in the kernel's backlog).
//! - `idle_h2`: `HOSTILE_IDLE` (default 2,000) connections that send the preface and SETTINGS and
//!   then idle: the cost of an established connection, for comparison.
//! - `flood`: `HOSTILE_FLOODS` (default 200) connections that each send a 1 MiB header block: how
//!   many are sent away (GOAWAY) and the daemon's peak RSS.
//!
//! `HOSTILE_LEGACY=1` runs only `silent` and `half` without the new settings, for a daemon built
//! before them (`BATCHD_BENCH_BIN`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, pki_types::ServerName};

use crate::support::daemon::Daemon;
use crate::support::report::figure;
use crate::support::scenarios::knob;

/// The raw HTTP/2 of `tests/hostile.rs`'s peers (frames, the header flood), shared.
#[path = "../../tests/support/h2frames.rs"]
mod h2frames;
use batchd::server::incoming::PREFACE;
use h2frames::{flood_request, frame, read_until, GOAWAY, RST_STREAM, SETTINGS};

/// Connections opened at once while the bench connects.
const CONNECTING: usize = 256;
/// How long after the connections opened "still held" is counted (the measure).
const HELD_AFTER: Duration = Duration::from_secs(30);

pub async fn run() {
    let n = knob("HOSTILE_CONNS", 10_000usize);
    let legacy = knob("HOSTILE_LEGACY", 0u8) == 1;
    let lift: Vec<String> = if legacy {
        Vec::new()
    } else {
        let max = (n + 1000).to_string();
        ["max_connections", "max_connections_per_peer"]
            .iter()
            .flat_map(|f| ["--set".to_owned(), format!("{f}={max}")])
            .collect()
    };
    let lift: Vec<&str> = lift.iter().map(String::as_str).collect();
    // While the cost is measured every connection must still be open: opening 10,000 can take
    // longer than the default deadline on a busy machine.
    let mut hold = lift.clone();
    if !legacy {
        hold.extend(["--set", "handshake_timeout=5m"]);
    }
    println!("\n== hostile: {n} connections that never complete HTTP/2 ==");
    cost("silent", &hold, &[], n, None).await;
    release("silent", &lift, &[], n).await;
    cost("half", &hold, &PREFACE[..12], n, None).await;
    release("half", &lift, &PREFACE[..12], n).await;
    if legacy {
        return;
    }
    let tls = TlsFiles::new();
    let hello = tls.client_hello();
    let with_tls = |args: &[&str]| -> Vec<String> {
        args.iter()
            .map(|a| (*a).to_owned())
            .chain(tls.args.iter().cloned())
            .collect()
    };
    let (tls_hold, tls_lift) = (with_tls(&hold), with_tls(&lift));
    let tls_hold: Vec<&str> = tls_hold.iter().map(String::as_str).collect();
    let tls_lift: Vec<&str> = tls_lift.iter().map(String::as_str).collect();
    cost("tls_silent", &tls_hold, &[], n, None).await;
    cost("tls_hello", &tls_hold, &hello, n, None).await;
    release("tls_hello", &tls_lift, &hello, n).await;
    // The default max_connections, with the per-peer limit lifted (every connection here comes
    // from 127.0.0.1).
    let per_peer = format!("max_connections_per_peer={}", n + 1000);
    cost(
        "cap",
        &["--set", &per_peer, "--set", "handshake_timeout=5m"],
        &[],
        n,
        Some(4096),
    )
    .await;
    idle_h2(knob("HOSTILE_IDLE", 2_000usize), &lift).await;
    flood(knob("HOSTILE_FLOODS", 200usize)).await;
}

/// Opens `n` connections to a daemon started with `args`, each sending `first` and then nothing,
/// and measures the daemon's memory while it holds them and after they are gone.
async fn cost(tag: &str, args: &[&str], first: &[u8], n: usize, cap: Option<usize>) {
    println!(
        "\n-- {tag}: cost of {n} connections that each send {} bytes --",
        first.len()
    );
    let d = Daemon::spawn(args);
    let (base_rss, base_fds) = (d.rss_kb(), fds(&d));
    let t0 = Instant::now();
    let conns = open(d.addr, n, first).await;
    let opened = conns.len();
    let open_s = t0.elapsed().as_secs_f64();
    // Accepted and in their handshakes (or, with a cap, as many as it lets in).
    let expect = cap.unwrap_or(opened).min(opened);
    let accepted = wait_for(Duration::from_secs(60), || {
        fds(&d).saturating_sub(base_fds) >= expect
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = fds(&d).saturating_sub(base_fds);
    let rss = d.rss_kb();
    let per = (rss.saturating_sub(base_rss) * 1024) as f64 / held.max(1) as f64;
    figure(&format!("hostile_{tag}_opened"), opened);
    figure(
        &format!("hostile_{tag}_open_time_s"),
        format!("{open_s:.1}"),
    );
    figure(&format!("hostile_{tag}_held_at_once"), held);
    figure(&format!("hostile_{tag}_all_accepted"), accepted);
    figure(&format!("hostile_{tag}_baseline_rss_kib"), base_rss);
    figure(&format!("hostile_{tag}_rss_kib"), rss);
    figure(
        &format!("hostile_{tag}_rss_per_conn_bytes"),
        format!("{per:.0}"),
    );
    drop(conns);
    wait_for(Duration::from_secs(30), || fds(&d) <= base_fds);
    // Where RSS settles once they are gone (the allocator hands pages back over a few seconds).
    let mut after = d.rss_kb();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = after.min(d.rss_kb());
    }
    figure(&format!("hostile_{tag}_rss_after_close_kib"), after);
    // A second wave reuses what the first one left to the allocator.
    let again = open(d.addr, n, first).await;
    wait_for(Duration::from_secs(60), || {
        fds(&d).saturating_sub(base_fds) >= expect.min(again.len())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    figure(&format!("hostile_{tag}_rss_second_wave_kib"), d.rss_kb());
    drop(again);
    figure(
        &format!("hostile_{tag}_returned_pct"),
        format!(
            "{:.0}",
            100.0 * rss.saturating_sub(after) as f64 / rss.saturating_sub(base_rss).max(1) as f64
        ),
    );
    figure(&format!("hostile_{tag}_peak_rss_kib"), d.hwm_kb());
}

/// Opens `n` connections (each sends `first`, then nothing) to a daemon with the default
/// `handshake_timeout`, and times, for each, how long after it opened the daemon closed it.
async fn release(tag: &str, args: &[&str], first: &[u8], n: usize) {
    println!("\n-- {tag}: when the daemon lets go of {n} such connections --");
    let d = Daemon::spawn(args);
    let base_fds = fds(&d);
    let first = Arc::new(first.to_vec());
    let t0 = Instant::now();
    // Each connection's lifetime as the client sees it: opened, then read until the daemon closes.
    let watch = HELD_AFTER + Duration::from_secs(10);
    let tasks: Vec<tokio::task::JoinHandle<Option<Duration>>> = futures_util::stream::iter(0..n)
        .map(|_| {
            let first = Arc::clone(&first);
            let addr = d.addr;
            async move {
                let mut c = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
                    .await
                    .ok()?
                    .ok()?;
                let opened = Instant::now();
                if !first.is_empty() {
                    c.write_all(&first).await.ok()?;
                }
                Some(tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let closed = tokio::time::timeout(watch, async {
                        while let Ok(1..) = c.read(&mut buf).await {}
                    })
                    .await;
                    closed.ok().map(|()| opened.elapsed())
                }))
            }
        })
        .buffer_unordered(CONNECTING)
        .filter_map(|task| async move { task })
        .collect()
        .await;
    // What the daemon itself still holds 30 s after the first connection opened.
    tokio::time::sleep(HELD_AFTER.saturating_sub(t0.elapsed())).await;
    let held_30 = fds(&d).saturating_sub(base_fds);
    let mut lifetimes = Vec::with_capacity(tasks.len());
    for t in tasks {
        lifetimes.push(t.await.ok().flatten());
    }
    let opened = lifetimes.len();
    let mut closed: Vec<Duration> = lifetimes.iter().flatten().copied().collect();
    closed.sort();
    figure(&format!("hostile_{tag}_release_opened"), opened);
    // Connections the client saw open but the daemon never accepted: when the listen backlog
    // overflows, Linux completes the client's handshake and drops its final ACK; a client that
    // then sends nothing never learns (the daemon holds nothing for it).
    figure(
        &format!("hostile_{tag}_never_closed_client_side"),
        opened - closed.len(),
    );
    figure(
        &format!("hostile_{tag}_release_s_p50_max"),
        match (closed.get(closed.len() / 2), closed.last()) {
            (Some(p50), Some(max)) => format!("{:.1} {:.1}", p50.as_secs_f64(), max.as_secs_f64()),
            _ => "none closed".to_owned(),
        },
    );
    figure(
        &format!("hostile_{tag}_held_after_30s_pct"),
        format!("{:.1}", 100.0 * held_30 as f64 / opened.max(1) as f64),
    );
    figure(
        &format!("hostile_{tag}_release_run_s"),
        format!("{:.1}", t0.elapsed().as_secs_f64()),
    );
}

/// `n` connections that send the preface and an empty SETTINGS frame, then idle.
async fn idle_h2(n: usize, args: &[&str]) {
    println!("\n-- idle_h2: {n} connections that speak HTTP/2 and then idle --");
    let d = Daemon::spawn(args);
    let (base_rss, base_fds) = (d.rss_kb(), fds(&d));
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    let conns = open(d.addr, n, &hello).await;
    wait_for(Duration::from_secs(30), || {
        fds(&d).saturating_sub(base_fds) >= conns.len()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per = (d.rss_kb().saturating_sub(base_rss) * 1024) as f64 / conns.len().max(1) as f64;
    figure("hostile_idle_h2_rss_per_conn_bytes", format!("{per:.0}"));
    drop(conns);
}

/// `n` connections that each send a 1 MiB header block in CONTINUATION frames.
async fn flood(n: usize) {
    println!("\n-- flood: {n} connections, each sends a 1 MiB header block --");
    let d = Daemon::spawn(&[]);
    let base = d.rss_kb();
    let request = Arc::new(flood_request(1 << 20));
    let t0 = Instant::now();
    let answers: Vec<Option<u8>> = futures_util::stream::iter(0..n)
        .map(|_| {
            let request = Arc::clone(&request);
            let addr = d.addr;
            async move {
                let mut conn = TcpStream::connect(addr).await.ok()?;
                conn.write_all(PREFACE).await.ok()?;
                conn.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.ok()?;
                let (mut rd, mut wr) = conn.split();
                let (_, answer) = tokio::join!(
                    async {
                        let _ = wr.write_all(&request).await;
                    },
                    read_until(&mut rd, &[RST_STREAM, GOAWAY])
                );
                answer
            }
        })
        .buffer_unordered(CONNECTING)
        .collect()
        .await;
    let goaway = answers.iter().filter(|a| **a == Some(7)).count();
    figure("hostile_flood_connections", n);
    figure("hostile_flood_goaway", goaway);
    figure(
        "hostile_flood_rst_stream",
        answers.iter().filter(|a| **a == Some(3)).count(),
    );
    figure(
        "hostile_flood_time_s",
        format!("{:.2}", t0.elapsed().as_secs_f64()),
    );
    figure("hostile_flood_baseline_rss_kib", base);
    figure("hostile_flood_peak_rss_kib", d.hwm_kb());
    figure(
        "hostile_flood_peak_rss_delta_kib",
        d.hwm_kb().saturating_sub(base),
    );
}

/// Opens up to `n` connections to `addr`, each sending `first`; the ones that connected within
/// 5 s (beyond a cap and the backlog, the kernel stops answering SYNs).
async fn open(addr: SocketAddr, n: usize, first: &[u8]) -> Vec<TcpStream> {
    let first = Arc::new(first.to_vec());
    futures_util::stream::iter(0..n)
        .map(|_| {
            let first = Arc::clone(&first);
            async move {
                let mut c = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
                    .await
                    .ok()?
                    .ok()?;
                if !first.is_empty() {
                    c.write_all(&first).await.ok()?;
                }
                Some(c)
            }
        })
        .buffer_unordered(CONNECTING)
        .filter_map(|c| async move { c })
        .collect()
        .await
}

/// Open file descriptors of the daemon.
fn fds(d: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", d.pid())).map_or(0, |dir| dir.count())
}

/// Polls `cond` every 20 ms for at most `limit`; whether it held.
fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// A TLS daemon's files, made with rcgen in a temporary directory.
struct TlsFiles {
    _dir: tempfile::TempDir,
    args: Vec<String>,
    config: Arc<rustls::ClientConfig>,
}

impl TlsFiles {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "bench CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let (cert, keyf) = (dir.path().join("server.crt"), dir.path().join("server.key"));
        std::fs::write(&cert, leaf.pem()).unwrap();
        std::fs::write(&keyf, key.serialize_pem()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        Self {
            args: vec![
                "--set".into(),
                format!("tls_cert={}", cert.display()),
                "--set".into(),
                format!("tls_key={}", keyf.display()),
            ],
            _dir: dir,
            config: Arc::new(config),
        }
    }

    /// The bytes of a ClientHello for `localhost`.
    fn client_hello(&self) -> Vec<u8> {
        let name = ServerName::try_from("localhost").unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::clone(&self.config), name).unwrap();
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        hello
    }
}
