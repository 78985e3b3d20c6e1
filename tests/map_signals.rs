#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Interrupting `batchctl map` (and `run`): Ctrl-C mid-run cancels every job on the daemon, exits
//! 130 and leaves only complete outputs; a `kill -9` mid-write leaves no partial output either; a
//! second Ctrl-C exits at once at any time, even while the trace is exported after the first; a
//! Ctrl-C while batchctl waits for paths on stdin stops it.
mod support;

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use support::map::*;
use support::{wait_until, TestServer};

/// The outputs below `dir` (temporary files left out) and the temporary files.
fn outputs_and_temps(dir: &Path) -> (Vec<String>, Vec<String>) {
    files_below(dir).into_iter().partition(|f| {
        !Path::new(f)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".batchctl-")
    })
}

/// `n` files `in/NN` of `size` bytes below `dir`.
fn inputs(dir: &Path, n: u64, size: usize) {
    for i in 0..n {
        write(dir, &format!("in/{i:02}"), &content(i, size));
    }
}

/// Each output below `dir/out` is its input, whole (the handler is `echo` or `sleep`).
fn assert_complete(dir: &Path, outputs: &[String]) {
    for name in outputs {
        let input = std::fs::read(dir.join("in").join(name)).unwrap();
        let output = std::fs::read(dir.join("out").join(name)).unwrap();
        assert!(
            input == output,
            "out/{name} has {} bytes, its input {}",
            output.len(),
            input.len()
        );
    }
}

#[tokio::test]
async fn ctrl_c_mid_run_cancels_every_job_leaves_only_whole_outputs_and_exits_130() {
    const N: u64 = 60;
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    inputs(dir.path(), N, 1 << 20);
    // Job k sleeps k × 100 ms: outputs appear one by one while the later jobs still run.
    let args = [
        "map", "sleep", "-r", "in", "--param", "ms={#}00", "--out", "out/{/}", "--quiet",
    ];
    let ctl = Ctl::spawn(&server.url(), dir.path(), &args, None);
    wait_until("3 outputs are written while jobs run", LIVENESS, || {
        outputs_and_temps(&dir.path().join("out")).0.len() >= 3 && server.stats().jobs_running > 0
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
    assert!(
        summary(&done).contains("(interrupted"),
        "the summary is printed: {}",
        done.stderr
    );
    assert!(!done.stderr.contains("panicked"), "{}", done.stderr);
    let (outputs, temps) = outputs_and_temps(&dir.path().join("out"));
    assert!(temps.is_empty(), "temporary files left: {temps:?}");
    assert!(
        outputs.len() >= 3 && (outputs.len() as u64) < N,
        "{outputs:?}"
    );
    assert_complete(dir.path(), &outputs);
    let cancelled = server.stats().finished[batchd::outcome::Outcome::Cancelled.index()];
    assert!(cancelled > 0, "the jobs still running were cancelled");
}

#[tokio::test]
async fn kill_9_mid_write_leaves_no_partial_output() {
    const N: u64 = 40;
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    inputs(dir.path(), N, 4 << 20);
    let args = ["map", "echo", "-r", "in", "--out", "out/{/}", "--quiet"];
    let mut ctl = Ctl::spawn(&server.url(), dir.path(), &args, None);
    wait_until("2 outputs are written", LIVENESS, || {
        outputs_and_temps(&dir.path().join("out")).0.len() >= 2
    })
    .await;
    ctl.signal("KILL");
    wait_until("batchctl is gone", LIVENESS, || ctl.exited()).await;
    let done = ctl.finish(LIVENESS).await;
    assert_eq!(done.code, None, "killed by a signal: {done:?}");
    // A temporary file may stay behind (nothing runs after SIGKILL); an output is whole or absent.
    let (outputs, _temps) = outputs_and_temps(&dir.path().join("out"));
    assert_complete(dir.path(), &outputs);
}

/// An OTLP "collector" that accepts connections and never answers: an export can only time out.
async fn silent_collector() -> (String, tokio::task::JoinHandle<()>) {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
        }
    });
    (url, holder)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_ctrl_c_exits_at_once_even_while_the_trace_is_exported() {
    let (otlp, holder) = silent_collector().await;
    // The export would wait a minute for the silent collector.
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "60000"),
    ];
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    inputs(dir.path(), 3, 10);
    let jobs: String = (0..3)
        .map(|i| format!("{{\"id\":\"s{i}\",\"handler\":\"sleep\",\"params\":{{\"ms\":60000}}}}\n"))
        .collect();
    write(dir.path(), "jobs.jsonl", jobs.as_bytes());
    let map = ["map", "sleep", "-r", "in", "--param", "ms=60000", "--quiet"];
    let run = ["run", "jobs.jsonl", "--quiet"];
    for args in [&map[..], &run[..]] {
        let ctl = Ctl::spawn_env(&server.url(), dir.path(), args, None, &env);
        wait_until("the 3 jobs run", LIVENESS, || {
            server.stats().jobs_running == 3
        })
        .await;
        ctl.signal("INT");
        // The run is over once its summary is out; then comes the export.
        wait_until("the summary is printed", LIVENESS, || {
            ctl.stderr_so_far().contains("(interrupted")
        })
        .await;
        let second = Instant::now();
        ctl.signal("INT");
        let done = ctl.finish(LIVENESS).await;
        assert_eq!(done.code, Some(EXIT_INTERRUPTED), "{args:?}: {done:?}");
        assert!(done.stderr.contains("interrupted again"), "{}", done.stderr);
        assert!(
            second.elapsed() < Duration::from_secs(20),
            "{args:?}: the second Ctrl-C took {:?}",
            second.elapsed()
        );
        wait_until("the daemon has no job left", LIVENESS, || server.is_idle()).await;
    }

    // A completed run: a Ctrl-C during the export exits at once too.
    let ctl = Ctl::spawn_env(
        &server.url(),
        dir.path(),
        &["map", "echo", "in/00"],
        None,
        &env,
    );
    wait_until("the summary is printed", LIVENESS, || {
        ctl.stderr_so_far().contains(": 1 ok")
    })
    .await;
    let pressed = Instant::now();
    ctl.signal("INT");
    let done = ctl.finish(LIVENESS).await;
    assert_eq!(done.code, Some(EXIT_INTERRUPTED), "{done:?}");
    assert!(pressed.elapsed() < Duration::from_secs(20));
    assert_eq!(
        records(&done.stdout).len(),
        1,
        "the result was written first"
    );
    holder.abort();
}

#[tokio::test]
async fn ctrl_c_while_waiting_for_paths_on_stdin_stops_the_run() {
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    inputs(dir.path(), 2, 10);
    let (ctl, mut stdin) = Ctl::spawn_open_stdin(&server.url(), dir.path(), &["map", "echo"]);
    // One path, then nothing: the list stays open.
    stdin.write_all(b"in/00\n").unwrap();
    stdin.flush().unwrap();
    wait_until("the first result is written", LIVENESS, || {
        ctl.stdout_so_far().ends_with('\n')
    })
    .await;
    ctl.signal("INT");
    let done = ctl.finish(LIVENESS).await;
    assert_eq!(done.code, Some(EXIT_INTERRUPTED), "{done:?}");
    assert!(summary(&done).contains(": 1 ok"), "{}", done.stderr);
    assert_eq!(records(&done.stdout).len(), 1);
    drop(stdin);
}
