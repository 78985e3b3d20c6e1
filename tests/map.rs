#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `batchctl map` as a process against an in-process daemon, on real files: outputs byte-equal to
//! the handler's (sha256 digests checked with the `sha2` crate), replacement strings in `--out` and
//! `--param`, `-0` with names holding spaces and newlines, `--skip-existing`, `--joblog`/`--resume`,
//! two inputs mapping to one output, failed jobs, JSON Lines without `--out`, and the `--help`
//! snapshot.
mod support;

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use serde_json::Value;
use support::map::*;
use support::TestServer;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Files of many sizes below `dir/in`, by path relative to `dir`.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for i in 0..60u64 {
        let size = match i {
            0 => 0,
            1 => 1,
            2 => 3 << 20,
            _ => (i as usize * 7919) % 70_000,
        };
        let name = format!("in/d{}/f{i:02}.bin", i % 4);
        let bytes = content(i, size);
        write(dir, &name, &bytes);
        files.insert(name, bytes);
    }
    files
}

#[tokio::test]
async fn sha256_outputs_are_the_sha2_digests_of_the_files() {
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let files = tree(dir.path());

    let done = map_in(
        &server,
        dir.path(),
        &["map", "sha256", "-r", "in", "--out", "sums/{}.sha256"],
    )
    .await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    assert!(
        summary(&done).starts_with("batchctl: 60 jobs in") && summary(&done).ends_with(": 60 ok"),
        "{}",
        done.stderr
    );
    assert_eq!(done.stdout, "", "with --out, nothing on stdout");
    let expected: Vec<String> = files.keys().map(|f| format!("{f}.sha256")).collect();
    assert_eq!(
        files_below(&dir.path().join("sums")),
        expected,
        "one output per file and nothing else (no temporary file)"
    );
    for (name, bytes) in &files {
        let out = std::fs::read(dir.path().join(format!("sums/{name}.sha256"))).unwrap();
        assert_eq!(out, sha256(bytes), "{name}");
    }

    // Without --out: JSON Lines, the id being the path.
    let done = map_in(
        &server,
        dir.path(),
        &["map", "sha256", "in/d1/f01.bin", "in/d2/f02.bin"],
    )
    .await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    let recs = records(&done.stdout);
    assert_eq!(recs.len(), 2);
    for r in &recs {
        let id = r["id"].as_str().unwrap();
        assert_eq!(r["outcome"], "ok");
        assert_eq!(r["output_b64"], b64(&sha256(&files[id])), "{id}");
    }
}

#[tokio::test]
async fn replacement_strings_fill_out_and_params() {
    let server = server_with_params();
    let dir = tempfile::tempdir().unwrap();
    let inputs = ["photos/a.tar.gz", "photos/2024/b.jpg", "c", "d.x/.hidden"];
    for (i, name) in inputs.iter().enumerate() {
        write(dir.path(), name, &content(i as u64, 10 + i));
    }
    let mut args = vec!["map", "params", "--out", "out/{//}/{/.}.{#}.json"];
    for p in [
        "path={}",
        "base={/}",
        "dir={//}",
        "noext={.}",
        "basenoext={/.}",
        "n={#}",
        "lit={{x}} {{}}",
        "plain=100x100",
    ] {
        args.extend(["--param", p]);
    }
    args.extend(inputs);
    let done = map_in(&server, dir.path(), &args).await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");

    // As GNU parallel 20221122 renders them.
    let expected = [
        (
            "photos/a.tar.gz",
            "photos",
            "a.tar.gz",
            "photos/a.tar",
            "a.tar",
            1,
        ),
        (
            "photos/2024/b.jpg",
            "photos/2024",
            "b.jpg",
            "photos/2024/b",
            "b",
            2,
        ),
        ("c", ".", "c", "c", "c", 3),
        ("d.x/.hidden", "d.x", ".hidden", "d.x/", "", 4),
    ];
    let mut outputs = Vec::new();
    for (i, (path, dirname, base, noext, basenoext, n)) in expected.into_iter().enumerate() {
        let out = format!("{dirname}/{basenoext}.{n}.json");
        outputs.push(format!("out/{out}").replace("/./", "/"));
        let text = std::fs::read_to_string(dir.path().join("out").join(&out)).unwrap();
        let got: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(got["len"], 10 + i, "{path}: the payload is the file");
        let p = &got["params"];
        assert_eq!(p["path"], path);
        assert_eq!(p["base"], base);
        assert_eq!(p["dir"], dirname);
        assert_eq!(p["noext"], noext);
        assert_eq!(p["basenoext"], basenoext);
        assert_eq!(p["n"], n.to_string());
        assert_eq!(p["lit"], "{x} {}");
        assert_eq!(p["plain"], "100x100");
    }
    outputs.sort();
    assert_eq!(
        files_below(&dir.path().join("out")),
        outputs
            .into_iter()
            .map(|o| o.trim_start_matches("out/").to_owned())
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn null_separated_paths_may_hold_spaces_and_newlines() {
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let names = [
        "with space.txt",
        "new\nline.txt",
        " leading and trailing ",
        "tab\there/x",
        "ünïcödé",
    ];
    let mut list = Vec::new();
    for (i, name) in names.iter().enumerate() {
        write(dir.path(), name, &content(i as u64, 100 + i));
        list.extend_from_slice(name.as_bytes());
        list.push(0);
    }
    let done = map_stdin(
        &server,
        dir.path(),
        &["map", "sha256", "-0", "--out", "{}.sha256"],
        &list,
    )
    .await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    for (i, name) in names.iter().enumerate() {
        let out = std::fs::read(dir.path().join(format!("{name}.sha256"))).unwrap();
        assert_eq!(out, sha256(&content(i as u64, 100 + i)), "{name:?}");
    }

    // JSON Lines: the ids are the names as they are.
    let done = map_stdin(
        &server,
        dir.path(),
        &["map", "sha256", "--null", "-"],
        &list,
    )
    .await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    let mut ids: Vec<String> = records(&done.stdout)
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    let mut expected: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    expected.sort();
    assert_eq!(ids, expected);

    // One path a line without -0: the name with a newline is two names that do not exist.
    let lines: Vec<u8> = list
        .iter()
        .map(|b| if *b == 0 { b'\n' } else { *b })
        .collect();
    let done = map_stdin(&server, dir.path(), &["map", "sha256"], &lines).await;
    assert_eq!(done.code, Some(EXIT_INPUT), "{done:?}");
    assert!(
        done.stderr.contains("batchctl: new: cannot read"),
        "{}",
        done.stderr
    );
    assert!(
        summary(&done).ends_with(": 4 ok, 2 unreadable"),
        "{}",
        done.stderr
    );
}

#[tokio::test]
async fn skip_existing_maps_only_the_files_without_an_output() {
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    for i in 0..5u64 {
        write(dir.path(), &format!("in/{i}.txt"), &content(i, 50));
    }
    let args = [
        "map",
        "sha256",
        "-r",
        "in",
        "--out",
        "out/{/.}.sum",
        "--skip-existing",
    ];
    let done = map_in(&server, dir.path(), &args).await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    assert_eq!(server.stats().jobs_admitted, 5);

    // Three new files; one old output removed, one replaced by something else.
    for i in 5..8u64 {
        write(dir.path(), &format!("in/{i}.txt"), &content(i, 50));
    }
    std::fs::remove_file(dir.path().join("out/0.sum")).unwrap();
    std::fs::write(dir.path().join("out/1.sum"), b"stale").unwrap();
    let done = map_in(&server, dir.path(), &args).await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    assert!(
        summary(&done).ends_with(": 4 ok, 4 skipped"),
        "{}",
        done.stderr
    );
    assert_eq!(
        server.stats().jobs_admitted,
        5 + 4,
        "only the four were sent"
    );
    assert_eq!(
        std::fs::read(dir.path().join("out/1.sum")).unwrap(),
        b"stale",
        "an existing output is left alone"
    );
    for i in [0u64, 2, 5, 6, 7] {
        let out = std::fs::read(dir.path().join(format!("out/{i}.sum"))).unwrap();
        assert_eq!(out, sha256(&content(i, 50)), "{i}");
    }

    // Without --skip-existing, every output is made again (replaced atomically).
    let done = map_in(&server, dir.path(), &args[..args.len() - 1]).await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    let out = std::fs::read(dir.path().join("out/1.sum")).unwrap();
    assert_eq!(out, sha256(&content(1, 50)));
}

#[tokio::test]
async fn resume_sends_only_what_the_job_log_does_not_record_as_ok() {
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    for i in 0..4u64 {
        write(dir.path(), &format!("in/{i}"), &content(i, 10));
    }
    let base = ["map", "sha256", "--joblog", "log.jsonl", "--out", "out/{/}"];
    let first: Vec<&str> = base.iter().copied().chain(["in/0", "in/1"]).collect();
    let done = map_in(&server, dir.path(), &first).await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");

    let mut second: Vec<&str> = base.to_vec();
    second.extend(["--resume", "-r", "in"]);
    let done = map_in(&server, dir.path(), &second).await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    assert!(
        summary(&done).ends_with(": 2 ok, 2 skipped"),
        "{}",
        done.stderr
    );
    assert_eq!(server.stats().jobs_admitted, 4, "each file sent once");
    let log = std::fs::read_to_string(dir.path().join("log.jsonl")).unwrap();
    let ids = batchd::client::ok_ids(&log);
    assert_eq!(ids.len(), 4, "{log}");
    assert!(ids.contains("in/3"));
    assert_eq!(files_below(&dir.path().join("out")), ["0", "1", "2", "3"]);
}

#[tokio::test]
async fn a_second_input_mapping_to_a_taken_output_is_reported_and_skipped() {
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a/x.txt", b"first");
    write(dir.path(), "b/x.txt", b"second");
    write(dir.path(), "b/y.txt", b"third");
    let done = map_in(
        &server,
        dir.path(),
        &["map", "echo", "-r", "a", "b", "--out", "out/{/}"],
    )
    .await;
    assert_eq!(done.code, Some(EXIT_INPUT), "{done:?}");
    assert!(
        done.stderr.contains(
            "batchctl: b/x.txt: its output out/x.txt is that of a/x.txt already; skipped"
        ),
        "{}",
        done.stderr
    );
    assert!(
        summary(&done).ends_with(": 2 ok, 1 duplicate"),
        "{}",
        done.stderr
    );
    assert_eq!(
        std::fs::read(dir.path().join("out/x.txt")).unwrap(),
        b"first"
    );
    assert_eq!(
        std::fs::read(dir.path().join("out/y.txt")).unwrap(),
        b"third"
    );
    assert_eq!(
        server.stats().jobs_admitted,
        2,
        "the duplicate was not sent"
    );

    // The same path named twice is the same case.
    let done = map_in(
        &server,
        dir.path(),
        &["map", "echo", "a/x.txt", "a/x.txt", "--out", "again/{}"],
    )
    .await;
    assert_eq!(done.code, Some(EXIT_INPUT), "{done:?}");
    assert!(
        summary(&done).ends_with(": 1 ok, 1 duplicate"),
        "{}",
        done.stderr
    );
}

#[tokio::test]
async fn failed_jobs_are_reported_and_write_no_output() {
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "in/a", b"a");
    write(dir.path(), "in/b", b"b");
    // `sleep` takes only `ms`: every job is REJECTED by the handler's check.
    let done = map_in(
        &server,
        dir.path(),
        &[
            "map",
            "sleep",
            "-r",
            "in",
            "--param",
            "colour={/}",
            "--out",
            "out/{/}",
        ],
    )
    .await;
    assert_eq!(done.code, Some(EXIT_NOT_OK), "{done:?}");
    for f in ["in/a", "in/b"] {
        assert!(
            done.stderr.contains(&format!("batchctl: {f}: rejected: ")),
            "{}",
            done.stderr
        );
    }
    assert!(
        summary(&done).ends_with(": 0 ok, 2 rejected"),
        "{}",
        done.stderr
    );
    assert!(files_below(&dir.path().join("out")).is_empty());
    assert!(
        !dir.path().join("out").exists(),
        "no directory made for nothing"
    );
}

#[tokio::test]
async fn ordered_json_lines_follow_the_input_order() {
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    // Each file is named by how long its job sleeps; the first ones sleep longest, so in
    // completion order they would come out reversed.
    let names: Vec<String> = (1..=30u64).rev().map(|i| (i * 4).to_string()).collect();
    for (i, name) in names.iter().enumerate() {
        write(dir.path(), name, &content(i as u64, 5));
    }
    let mut args = vec!["map", "sleep", "--ordered", "--param", "ms={/}"];
    args.extend(names.iter().map(String::as_str));
    let done = map_in(&server, dir.path(), &args).await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    let ids: Vec<String> = records(&done.stdout)
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, names);
}

#[tokio::test]
async fn usage_errors_exit_2() {
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    for (args, word) in [
        (
            &["map", "sha256", "--out", "fixed.txt", "x"][..],
            "no replacement string",
        ),
        (
            &["map", "sha256", "--param", "a={1}", "x"][..],
            "unknown replacement string {1}",
        ),
        (
            &["map", "sha256", "--param", "novalue", "x"][..],
            "KEY=VALUE",
        ),
        (&["map", "sha256", "--skip-existing", "x"][..], "--out"),
        (&["map", "sha256", "--follow", "x"][..], "--recursive"),
        (
            &["map", "sha256", "--out", "{}.o", "--ordered", "x"][..],
            "cannot be used with",
        ),
    ] {
        let done = map_in(&server, dir.path(), args).await;
        assert_eq!(done.code, Some(EXIT_INPUT), "{args:?}: {done:?}");
        assert!(done.stderr.contains(word), "{args:?}: {}", done.stderr);
    }
}

#[tokio::test]
async fn map_help_matches_its_snapshot() {
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let done = map_in(&server, dir.path(), &["map", "--help"]).await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    check_snapshot("batchctl-map-help.txt", &done.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_map_exports_its_span() {
    use support::otlp::{attr, Collector};
    let collector = Collector::start().await;
    let otlp = collector.url();
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "in/a", b"a");
    write(dir.path(), "in/b", b"b");
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str())];
    let args = ["map", "sha256", "-r", "in", "missing", "--out", "out/{/}"];
    let done = Ctl::spawn_env(&server.url(), dir.path(), &args, None, &env)
        .finish(LIVENESS)
        .await;
    assert_eq!(done.code, Some(EXIT_INPUT), "{done:?}");
    let run = collector.take_one("batchctl.run", LIVENESS).await;
    assert_eq!(attr(&run.span, "rpc.method").as_deref(), Some("Process"));
    assert_eq!(attr(&run.span, "batchctl.jobs.sent").as_deref(), Some("2"));
    assert_eq!(attr(&run.span, "batchctl.results.ok").as_deref(), Some("2"));
    assert_eq!(
        attr(&run.span, "batchctl.end").as_deref(),
        Some("completed")
    );
    assert_eq!(attr(&run.span, "process.exit.code").as_deref(), Some("2"));
}

#[tokio::test]
async fn the_deadline_stops_every_job() {
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    for i in 0..3u64 {
        write(dir.path(), &format!("in/{i}"), b"x");
    }
    let args = [
        "map",
        "sleep",
        "-r",
        "in",
        "--param",
        "ms=60000",
        "--deadline",
        "300ms",
        "--out",
        "out/{/}",
    ];
    let done = map_in(&server, dir.path(), &args).await;
    assert_eq!(done.code, Some(EXIT_NOT_OK), "{done:?}");
    assert!(
        done.stderr.contains("DeadlineExceeded") || done.stderr.contains("deadline"),
        "{}",
        done.stderr
    );
    assert!(!dir.path().join("out").exists());
    support::wait_until("the daemon has no job left", LIVENESS, || server.is_idle()).await;
}
