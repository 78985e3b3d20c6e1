#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Interrupted runs: Ctrl-C cancels the call and exits 130, a second Ctrl-C exits at once, and
//! `--joblog`/`--resume` finish only what an interrupted run left.
mod support;

use std::collections::HashSet;
use std::path::Path;

use support::batchctl::*;
use support::{gated_server, wait_until, TestServer};

#[tokio::test]
async fn ctrl_c_cancels_every_job_and_exits_130() {
    const N: u64 = 500;
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(
        dir.path(),
        "jobs.jsonl",
        (0..N).map(|i| sleep_line(&format!("s{i}"), 60_000)),
    );
    let output = dir.path().join("out.jsonl");
    let args = with_endpoint(
        &server,
        &[
            "run",
            "--quiet",
            "--output",
            path_str(&output),
            path_str(&input),
        ],
    );
    let ctl = Ctl::spawn(&strs(&args), None);
    wait_until("the daemon holds all 500 jobs", LIVENESS, || {
        let s = server.stats();
        s.jobs_running > 0 && s.jobs_running + s.jobs_queued == N
    })
    .await;

    ctl.signal("INT");
    wait_until("the daemon has no job left", LIVENESS, || {
        let s = server.stats();
        s.jobs_running == 0 && s.jobs_queued == 0 && s.calls_open == 0
    })
    .await;
    let done = ctl.finish(LIVENESS).await;
    assert_eq!(done.code, Some(EXIT_INTERRUPTED), "{done:?}");
    let summary = done.stderr.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with("batchctl: 0 jobs in") && summary.contains("interrupted"),
        "the summary is printed: {}",
        done.stderr
    );
    assert!(!done.stderr.contains("panicked"), "{}", done.stderr);
    assert_eq!(
        std::fs::read_to_string(&output).unwrap(),
        "",
        "no job finished"
    );
    assert_eq!(server.stats().jobs_admitted, N, "each job sent once");
}

#[tokio::test]
async fn a_second_ctrl_c_exits_at_once_while_the_first_is_still_finishing() {
    // What holds the first Ctrl-C up is a stdout nobody reads (a pager that stopped): `--ordered`
    // keeps the echo results behind the gated first job, and once Ctrl-C has cancelled the call
    // they are written out, which blocks for good: 2 MiB is more than any pipe holds (64 KiB by
    // default, 1 MiB at most unless root raised fs.pipe-max-size). A daemon slow to cancel would not
    // do: batchctl drops the call and does not wait for the daemon.
    const ECHOES: usize = 32;
    let (server, _gate) = gated_server(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let payload = "x".repeat(64 * 1024);
    let mut lines = vec![gate_line("first", "g")];
    lines.extend((0..ECHOES).map(|i| echo_line(&format!("e{i}"), &payload)));
    let input = write_lines(dir.path(), "jobs.jsonl", lines);
    let joblog = dir.path().join("joblog.jsonl");
    let args = with_endpoint(
        &server,
        &[
            "run",
            "--quiet",
            "--ordered",
            "--joblog",
            path_str(&joblog),
            path_str(&input),
        ],
    );
    // Held open and never read until batchctl has exited.
    let (stdout, writer) = std::io::pipe().unwrap();
    let mut cmd = command(&strs(&args), &[]);
    cmd.stdout(writer);
    let mut ctl = Ctl::start(cmd, None);
    // The job log is flushed after each response: batchctl holds every echo result.
    wait_until("batchctl holds the echo results back", LIVENESS, || {
        let log = std::fs::read_to_string(&joblog).unwrap_or_default();
        batchd::client::ok_ids(&log).len() == ECHOES && server.stats().jobs_running == 1
    })
    .await;

    ctl.signal("INT");
    // The first Ctrl-C was taken: batchctl dropped the call, so the daemon cancelled its last job.
    wait_until("the daemon has cancelled the run", LIVENESS, || {
        let s = server.stats();
        s.calls_open == 0 && s.jobs_running == 0
    })
    .await;
    assert!(
        ctl.running(),
        "batchctl cannot have written 2 MiB to a full pipe"
    );

    ctl.signal("INT");
    let done = ctl.finish(LIVENESS).await;
    assert_eq!(done.code, Some(EXIT_INTERRUPTED), "{done:?}");
    assert_eq!(
        done.stderr.trim(),
        "batchctl: interrupted again; exiting now",
        "it exits without the first Ctrl-C's summary"
    );
    drop(stdout);
}

#[tokio::test]
async fn resume_after_an_interrupted_run_finishes_only_the_rest() {
    let (server, gate) = gated_server(|_| {});
    let dir = tempfile::tempdir().unwrap();
    // 100 echo jobs finish; 20 gated ones wait until the first run is interrupted.
    let lines: Vec<String> = (1..=120)
        .map(|i| {
            if i % 6 == 0 {
                format!(r#"{{"id":"g{i}","handler":"gate","payload":"{i}"}}"#)
            } else {
                echo_line(&format!("e{i}"), &i.to_string())
            }
        })
        .collect();
    let input = write_lines(dir.path(), "jobs.jsonl", lines);
    let joblog = dir.path().join("joblog.jsonl");
    let out1 = dir.path().join("out1.jsonl");
    let out2 = dir.path().join("out2.jsonl");
    let run = |out: &Path, resume: bool| {
        let mut args = vec![
            "run",
            "--quiet",
            "--joblog",
            path_str(&joblog),
            "--output",
            path_str(out),
            path_str(&input),
        ];
        if resume {
            args.push("--resume");
        }
        Ctl::spawn(&strs(&with_endpoint(&server, &args)), None)
    };

    let first = run(&out1, false);
    wait_until(
        "the echo jobs are logged and the gated ones run",
        LIVENESS,
        || {
            let log = std::fs::read_to_string(&joblog).unwrap_or_default();
            batchd::client::ok_ids(&log).len() == 100 && server.stats().jobs_running == 20
        },
    )
    .await;
    first.signal("INT");
    let done = first.finish(LIVENESS).await;
    assert_eq!(done.code, Some(EXIT_INTERRUPTED), "{done:?}");
    wait_until("the gated jobs are cancelled", LIVENESS, || {
        server.stats().jobs_running == 0
    })
    .await;

    gate.add_permits(20);
    let done = run(&out2, true).finish(LIVENESS).await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    assert!(done.stderr.contains("100 skipped"), "{}", done.stderr);
    assert_eq!(
        server.stats().jobs_admitted,
        120 + 20,
        "the second run sends only the rest"
    );

    let first_ids: HashSet<String> = ids(&read_records(&out1))
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert!(
        first_ids.iter().all(|id| id.starts_with('e')),
        "{first_ids:?}"
    );
    let second = read_records(&out2);
    assert!(
        ids(&second).iter().all(|id| id.starts_with('g')),
        "{second:?}"
    );

    let mut all = read_records(&out1);
    all.extend(second);
    let all = by_id(&all);
    assert_eq!(all.len(), 120, "every id exactly once across both runs");
    assert!(all.values().all(|r| r["outcome"] == "ok"), "{all:?}");
    let log = std::fs::read_to_string(&joblog).unwrap();
    assert_eq!(batchd::client::ok_ids(&log).len(), 120);
    assert_eq!(log.lines().count(), 120, "each id logged once: {log}");
}
