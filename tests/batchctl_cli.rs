#![allow(clippy::unwrap_used, clippy::expect_used)]
//! batchctl's exit codes, its other subcommands (`handlers`, `health`, `completions`), the endpoint
//! it talks to, and the `--help` snapshots (`UPDATE_SNAPSHOTS=1` rewrites them).
mod support;

use std::path::Path;
use std::time::Duration;

use support::batchctl::*;
use support::{batch, gated_server, job, wait_until, TestServer};

// === exit codes ===

#[tokio::test]
async fn an_unknown_handler_is_rejected_and_exits_1() {
    let server = TestServer::start(|_| {});
    let url = server.url();
    let input = format!(
        "{}\n{}\n",
        echo_line("ok", "x"),
        r#"{"id":"nope","handler":"no-such-handler"}"#
    );
    let done = Ctl::spawn(&["--endpoint", &url, "run"], Some(input.into_bytes()))
        .finish(LIVENESS)
        .await;
    assert_eq!(done.code, Some(EXIT_NOT_OK), "{done:?}");
    let out = records(&done.stdout);
    let out = by_id(&out);
    assert_eq!(out["ok"]["outcome"], "ok");
    assert_eq!(out["nope"]["outcome"], "rejected");
    assert!(
        out["nope"]["error"]
            .as_str()
            .unwrap()
            .contains("no-such-handler"),
        "{:?}",
        out["nope"]
    );
    assert!(done.stderr.contains("1 rejected"), "{}", done.stderr);
    assert_eq!(
        done.stderr.lines().count(),
        1,
        "no progress line when stderr is not a terminal, only the summary: {:?}",
        done.stderr
    );
}

#[tokio::test]
async fn usage_and_input_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.jsonl");
    // Nothing here may reach a daemon: the endpoint is dead, so a code of 3 would show it tried.
    let (url, _refusing) = refused_endpoint();
    for args in [
        vec!["run", "--bogus"],
        vec!["run", "--resume", "-"],
        vec!["run", "--batch-size", "0", "-"],
        vec!["run", "--max-message", "100", "-"],
        vec!["run", "--max-message", "16 parsecs", "-"],
        vec!["frobnicate"],
        vec!["completions", "no-such-shell"],
        vec!["run", path_str(&missing)],
    ] {
        let mut all = vec!["--endpoint", url.as_str()];
        all.extend(&args);
        let done = batchctl(&all).await;
        assert_eq!(done.code, Some(EXIT_INPUT), "{args:?}: {done:?}");
        assert!(!done.stderr.is_empty(), "{args:?}: says why");
        assert!(!done.stderr.contains("panicked"), "{args:?}: {done:?}");
    }
}

#[tokio::test]
async fn an_unreachable_daemon_exits_3_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(dir.path(), "jobs.jsonl", [echo_line("a", "x")]);
    let (url, _refusing) = refused_endpoint();
    for args in [
        vec!["run", path_str(&input)],
        vec!["health"],
        vec!["handlers"],
    ] {
        let mut all = vec!["--endpoint", url.as_str()];
        all.extend(&args);
        let done = batchctl(&all).await;
        assert_eq!(done.code, Some(EXIT_UNREACHABLE), "{args:?}: {done:?}");
        assert_eq!(done.stderr.lines().count(), 1, "{args:?}: {}", done.stderr);
        assert!(
            done.stderr
                .starts_with(&format!("batchctl: cannot reach the daemon at {url}")),
            "{args:?}: {}",
            done.stderr
        );
    }
}

// === subcommands and the endpoint ===

#[tokio::test]
async fn handlers_lists_the_builtin_handlers() {
    let server = TestServer::start(|_| {});
    let done = against(&server, &["handlers"]).await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    let names: Vec<&str> = done
        .stdout
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        names,
        ["echo", "sha256", "sleep", "spin"],
        "{}",
        done.stdout
    );
    assert!(
        done.stdout
            .lines()
            .all(|l| l.split_whitespace().count() > 1),
        "each with its description: {}",
        done.stdout
    );
}

#[tokio::test]
async fn health_prints_serving_and_exits_0() {
    let server = TestServer::start(|_| {});
    let done = against(&server, &["health"]).await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    assert_eq!(done.stdout, "SERVING\n");
}

#[tokio::test]
async fn completions_print_a_script() {
    let done = batchctl(&["completions", "bash"]).await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    assert!(done.stdout.contains("_batchctl()"), "{}", done.stdout);
    assert!(
        done.stdout.contains("complete -F _batchctl"),
        "{}",
        done.stdout
    );
    assert!(
        done.stdout.contains("--resume"),
        "subcommand flags complete"
    );
}

#[tokio::test]
async fn health_exits_non_zero_once_the_daemon_stops_serving() {
    // A gated job keeps the daemon draining for as long as the test looks.
    let (server, gate) = gated_server(|c| c.shutdown_grace = Duration::from_secs(60));
    let mut call = server.open_call().await;
    call.send(batch("b", vec![job("held", "gate", b"h", &[])]))
        .await;
    call.half_close();
    wait_until("the gated job runs", LIVENESS, || {
        server.stats().jobs_running == 1
    })
    .await;
    let done = against(&server, &["health"]).await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    assert_eq!(done.stdout, "SERVING\n");

    // Shutdown turns health NOT_SERVING and closes the listener at once: only calls on connections
    // already open see NOT_SERVING, and a probe on a new connection, as batchctl makes, is refused.
    server.begin_shutdown();
    wait_until("the daemon refuses new connections", LIVENESS, || {
        std::net::TcpStream::connect(server.addr).is_err()
    })
    .await;
    let done = against(&server, &["health"]).await;
    assert_eq!(done.code, Some(EXIT_UNREACHABLE), "{done:?}");
    assert_eq!(done.stdout, "");
    assert!(
        done.stderr.starts_with(&format!(
            "batchctl: cannot reach the daemon at {}",
            server.url()
        )),
        "{}",
        done.stderr
    );
    assert_eq!(
        server.stats().jobs_running,
        1,
        "asked while the daemon still drained"
    );
    gate.add_permits(1);
    let results = call.finish_ok(LIVENESS).await;
    assert_eq!(results.len(), 1, "the drain finished the job: {results:?}");
}

#[tokio::test]
async fn health_exits_1_when_the_answer_is_not_serving() {
    // A batchd that stops serving also stops accepting (above), so no new probe ever gets its
    // NOT_SERVING; a stand-in health service gives that answer to batchctl.
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let serving = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let done = batchctl(&["--endpoint", &url, "health"]).await;
    assert_eq!(done.code, Some(EXIT_NOT_OK), "{done:?}");
    assert_eq!(done.stdout, "NOT_SERVING\n");
    serving.abort();
    drop(reporter);
}

/// Runs `batchctl args…` with `BATCHD_ENDPOINT=endpoint`, feeding it `stdin`.
async fn with_env_endpoint(endpoint: &str, args: &[&str], stdin: Option<&str>) -> Finished {
    let env = [("BATCHD_ENDPOINT", endpoint)];
    Ctl::spawn_env(args, stdin.map(|s| s.as_bytes().to_vec()), &env)
        .finish(LIVENESS)
        .await
}

#[tokio::test]
async fn batchd_endpoint_is_honoured_and_the_flag_overrides_it() {
    let server = TestServer::start(|_| {});
    let url = server.url();
    let (dead, _refusing) = refused_endpoint();
    let refused = |done: &Finished| {
        done.code == Some(EXIT_UNREACHABLE)
            && done
                .stderr
                .starts_with(&format!("batchctl: cannot reach the daemon at {dead}"))
    };

    let done = with_env_endpoint(&url, &["health"], None).await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    assert_eq!(done.stdout, "SERVING\n");
    let line = echo_line("a", "x");
    let done = with_env_endpoint(&url, &["run", "-q", "-"], Some(&line)).await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    assert_ran(&done, &["a"]);
    assert_eq!(server.stats().jobs_admitted, 1);
    // The variable is what batchctl tries, not the default endpoint.
    let done = with_env_endpoint(&dead, &["health"], None).await;
    assert!(refused(&done), "{done:?}");

    // --endpoint wins, either way.
    let done = with_env_endpoint(&dead, &["--endpoint", &url, "health"], None).await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    let done = with_env_endpoint(&url, &["--endpoint", &dead, "handlers"], None).await;
    assert!(refused(&done), "{done:?}");
}

// === --help snapshots ===

#[tokio::test]
async fn help_matches_the_snapshots() {
    for (args, file) in [
        (&["--help"][..], "batchctl-help.txt"),
        (&["run", "--help"][..], "batchctl-run-help.txt"),
    ] {
        let done = batchctl(args).await;
        assert_eq!(done.code, Some(EXIT_OK), "{args:?}: {done:?}");
        check_snapshot(file, &done.stdout);
    }
}

/// Compares `actual` with `tests/snapshots/NAME`, or rewrites it when `UPDATE_SNAPSHOTS=1`.
fn check_snapshot(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(name);
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read the snapshot {}: {e}\n(UPDATE_SNAPSHOTS=1 cargo test --test batchctl_cli creates it)",
            path.display()
        )
    });
    if expected != actual {
        panic!(
            "the output differs from the snapshot {} (- snapshot, + now; \
             UPDATE_SNAPSHOTS=1 rewrites it):\n{}",
            path.display(),
            diff(&expected, actual)
        );
    }
}

/// A line diff (longest common subsequence): `  ` same, `- ` only in `old`, `+ ` only in `new`.
fn diff(old: &str, new: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut lines) = (0, 0, Vec::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            lines.push(format!("  {}", a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            lines.push(format!("- {}", a[i]));
            i += 1;
        } else {
            lines.push(format!("+ {}", b[j]));
            j += 1;
        }
    }
    // Changed lines with two lines of context each.
    let changed: Vec<usize> = (0..lines.len())
        .filter(|&k| !lines[k].starts_with("  "))
        .collect();
    let near = |k: usize| changed.iter().any(|&c| c.abs_diff(k) <= 2);
    let mut out = String::new();
    let mut skipped = false;
    for (k, line) in lines.iter().enumerate() {
        if near(k) {
            out.push_str(line);
            out.push('\n');
            skipped = false;
        } else if !skipped {
            out.push_str("  …\n");
            skipped = true;
        }
    }
    if old.ends_with('\n') != new.ends_with('\n') {
        out.push_str("(the final newline differs)\n");
    }
    out
}
