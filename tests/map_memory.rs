#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The bytes-in-flight bound of `batchctl map`: the payload bytes it holds (read and not answered)
//! never pass `--max-in-flight-bytes` (a larger file is held alone), counted by the library, and
//! the process's peak RSS over a run of large files stays far below what the files add up to.
//! (The RSS figure itself is a benchmark's: `cargo bench --bench batchctl`.)
mod support;

use std::time::Duration;

use batchd::client::map::MapInputs;
use batchd::client::{CallOptions, MapOptions, Progress, Template};
use support::map::*;
use support::TestServer;

const MIB: usize = 1 << 20;

/// Maps every file below `dir/in` with sha256 through the library, holding at most `bound` bytes.
async fn map_with_bound(
    server: &TestServer,
    dir: &std::path::Path,
    bound: usize,
) -> batchd::client::Summary {
    let mut client = batchd::client::connect(&server.url()).await.unwrap();
    let opts = MapOptions {
        call: CallOptions {
            max_in_flight_bytes: bound,
            ..CallOptions::default()
        },
        handler: "sha256".into(),
        out: Some(Template::parse(&format!("{}/out/{{/}}", dir.display())).unwrap()),
        ..MapOptions::default()
    };
    let inputs = MapInputs {
        paths: vec![dir.join("in")],
        list: None,
        null: false,
        recursive: true,
        follow: false,
    };
    let (summary, res) = tokio::time::timeout(
        LIVENESS,
        batchd::client::map(
            &mut client,
            inputs,
            tokio::io::sink(),
            None::<tokio::io::Sink>,
            &opts,
            &Progress::new(false),
            std::future::pending(),
        ),
    )
    .await
    .unwrap();
    res.unwrap();
    summary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_payload_bytes_held_never_pass_the_bound() {
    // Room for the 12 MiB file below.
    let server = TestServer::start(|c| c.max_payload = batchd::units::ByteSize::mib(14));
    let dir = tempfile::tempdir().unwrap();
    for i in 0..40u64 {
        let size = if i % 10 == 0 { 3 * MIB } else { MIB };
        write(dir.path(), &format!("in/{i:02}"), &content(i, size));
    }
    let s = map_with_bound(&server, dir.path(), 8 * MIB).await;
    assert_eq!((s.ok(), s.sent), (40, 40), "{s:?}");
    assert!(
        s.peak_bytes <= 8 * MIB as u64 && s.peak_bytes >= 3 * MIB as u64,
        "peak {} bytes",
        s.peak_bytes
    );
    for i in 0..40u64 {
        let out = std::fs::read(dir.path().join(format!("out/{i:02}"))).unwrap();
        let size = if i % 10 == 0 { 3 * MIB } else { MIB };
        assert_eq!(out, sha256(&content(i, size)));
    }

    // A file larger than the bound is read only when nothing else is held, and held alone.
    write(dir.path(), "in/05", &content(99, 12 * MIB));
    let s = map_with_bound(&server, dir.path(), 8 * MIB).await;
    assert_eq!(s.ok(), 40, "{s:?}");
    assert_eq!(s.peak_bytes, 12 * MIB as u64, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_rss_over_large_files_stays_near_the_bound() {
    const FILES: u64 = 40;
    const SIZE: usize = 4 * MIB;
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    for i in 0..FILES {
        write(dir.path(), &format!("in/{i:02}"), &content(i, SIZE));
    }
    let args = [
        "map",
        "sha256",
        "-r",
        "in",
        "--out",
        "out/{/}",
        "--max-in-flight-bytes",
        "16MiB",
    ];
    let mut ctl = Ctl::spawn(&server.url(), dir.path(), &args, None);
    let mut peak_kib = 0;
    while !ctl.exited() {
        peak_kib = peak_kib.max(ctl.status_kib("VmHWM:").unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let done = ctl.finish(LIVENESS).await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    let total_mib = FILES as usize * SIZE / MIB;
    let peak_mib = peak_kib / 1024;
    eprintln!("batchctl peak RSS {peak_mib} MiB for {total_mib} MiB of files");
    // The bound, one request being encoded (its copy) and in the HTTP/2 send buffer, and the
    // process itself: generous, and still far below the 160 MiB of files.
    assert!(peak_mib < 100, "peak RSS {peak_mib} MiB");
    assert_eq!(files_below(&dir.path().join("out")).len(), FILES as usize);
}
