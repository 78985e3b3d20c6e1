#![allow(clippy::unwrap_used, clippy::expect_used)]
//! batchctl's results and their flow: binary payloads, `--ordered`, a closed stdout, and the bound
//! `--max-in-flight` puts on the jobs the daemon holds for a run.
mod support;

use std::collections::HashMap;
use std::process::{Command, Stdio};

use base64::Engine as _;
use serde_json::Value;
use sha2::Digest as _;
use support::batchctl::*;
use support::{gated_server, wait_until, TestServer};

#[tokio::test]
async fn binary_payloads_round_trip() {
    let server = TestServer::start(|_| {});
    let b64 = base64::engine::general_purpose::STANDARD;
    let bytes: Vec<u8> = (0..=255u8).rev().collect();
    assert!(std::str::from_utf8(&bytes).is_err());
    let encoded = b64.encode(&bytes);
    let input = [
        format!(r#"{{"id":"bin","handler":"echo","payload_b64":"{encoded}"}}"#),
        format!(r#"{{"id":"digest","handler":"sha256","payload_b64":"{encoded}"}}"#),
        r#"{"id":"text","handler":"echo","payload":"h\u00e9llo \ud83d\udc4b"}"#.into(),
    ]
    .join("\n");
    let url = server.url();
    let done = Ctl::spawn(
        &["--endpoint", &url, "run", "--quiet"],
        Some(input.into_bytes()),
    )
    .finish(LIVENESS)
    .await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    let out = records(&done.stdout);
    let out = by_id(&out);

    let bin = out["bin"];
    assert_eq!(bin["outcome"], "ok");
    assert_eq!(bin["output_b64"].as_str(), Some(encoded.as_str()), "{bin}");
    assert!(bin.get("output").is_none(), "{bin}");

    let digest = b64
        .decode(out["digest"]["output_b64"].as_str().unwrap())
        .unwrap();
    assert_eq!(digest, sha2::Sha256::digest(&bytes).to_vec());

    let text = out["text"];
    assert_eq!(text["output"], "héllo 👋", "{text}");
    assert!(text.get("output_b64").is_none(), "{text}");
}

#[tokio::test]
async fn ordered_restores_input_order() {
    let (server, gate) = gated_server(|_| {});
    let dir = tempfile::tempdir().unwrap();
    // The first job finishes last (its gate opens once every other job is done); the sleeps finish
    // in reverse input order.
    let mut lines = vec![r#"{"id":"first","handler":"gate","payload":"g"}"#.to_owned()];
    for (i, ms) in [80u64, 60, 40, 20, 0].into_iter().enumerate() {
        lines.push(sleep_line(&format!("s{ms}"), ms));
        lines.push(echo_line(&format!("e{i}"), "x"));
    }
    let expected: Vec<String> = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let input = write_lines(dir.path(), "jobs.jsonl", lines);

    let mut order = HashMap::new();
    for ordered in [false, true] {
        let mut args = vec!["run", "--quiet", path_str(&input)];
        if ordered {
            args.push("--ordered");
        }
        let base = finished(&server);
        let ctl = Ctl::spawn(&strs(&with_endpoint(&server, &args)), None);
        wait_until("every job but the gated one is done", LIVENESS, || {
            finished(&server) == base + expected.len() as u64 - 1
        })
        .await;
        gate.add_permits(1);
        let done = ctl.finish(LIVENESS).await;
        assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
        let out = records(&done.stdout);
        assert!(out.iter().all(|r| r["outcome"] == "ok"), "{out:?}");
        order.insert(
            ordered,
            ids(&out).into_iter().map(str::to_owned).collect::<Vec<_>>(),
        );
    }
    assert_eq!(
        order[&false].last().map(String::as_str),
        Some("first"),
        "without --ordered, results come in completion order: {:?}",
        order[&false]
    );
    assert_eq!(order[&true], expected, "--ordered keeps input order");
}

#[tokio::test]
async fn max_in_flight_bounds_the_jobs_the_daemon_holds_for_the_run() {
    const N: u64 = 8;
    const TOTAL: u64 = 40;
    let (server, gate) = gated_server(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(
        dir.path(),
        "gated.jsonl",
        (0..TOTAL).map(|i| format!(r#"{{"id":"g{i}","handler":"gate","payload":"{i}"}}"#)),
    );
    let n = N.to_string();
    let args = with_endpoint(
        &server,
        &["run", "--quiet", "--max-in-flight", &n, path_str(&input)],
    );
    let ctl = Ctl::spawn(&strs(&args), None);
    // Jobs admitted and not finished. Admitted is read first: a job that finishes between the two
    // reads can only make the count smaller, never larger than what the daemon held.
    let held = || {
        let admitted = server.stats().jobs_admitted;
        (admitted, admitted.saturating_sub(finished(&server)))
    };
    // Each job finishes only when the test opens the gate once; after each opening, batchctl may
    // send exactly one more. A run that ignored the bound would have sent all 40 at the start.
    for opened in 0..TOTAL {
        let expected = (N + opened).min(TOTAL);
        wait_until(&format!("{expected} jobs admitted"), LIVENESS, || {
            let (admitted, held) = held();
            assert!(
                held <= N,
                "the daemon holds {held} unfinished jobs of a run with --max-in-flight {N}"
            );
            admitted == expected
        })
        .await;
        gate.add_permits(1);
    }
    let done = ctl.finish(LIVENESS).await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    let out = records(&done.stdout);
    let out = by_id(&out);
    assert_eq!(out.len(), TOTAL as usize);
    assert!(out.values().all(|r| r["outcome"] == "ok"), "{out:?}");
    assert_eq!(server.stats().jobs_admitted, TOTAL);
}

#[tokio::test]
async fn a_closed_stdout_is_not_a_panic() {
    let server = TestServer::start(|_| {});
    let url = server.url();
    for args in [
        vec!["completions", "bash"],
        vec!["--endpoint", &url, "handlers"],
        vec!["--endpoint", &url, "health"],
    ] {
        // A pipe nobody reads: every write fails with EPIPE (Rust ignores SIGPIPE).
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let child = Command::new(env!("CARGO_BIN_EXE_batchctl"))
            .args(&args)
            .env_remove("BATCHD_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked") && out.status.code() != Some(101),
            "{args:?}: {:?}: {stderr}",
            out.status
        );
        assert!(
            stderr.lines().count() <= 1,
            "{args:?}: one line at most: {stderr}"
        );
    }
}
