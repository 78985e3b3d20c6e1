#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The real `batchctl` binary as a process against an in-process daemon: big files, bad lines, binary
//! payloads, `--max-message`, `--max-in-flight`, `--ordered`, Ctrl-C, `--joblog`/`--resume`,
//! `--retry`, exit codes, the other subcommands, the `batchctl.run` span received by a real OTLP
//! receiver, and the `--help` snapshots (`UPDATE_SNAPSHOTS=1` rewrites them).
mod support;

use std::collections::{HashMap, HashSet};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use batchd::config::ByteSize;
use batchd::handlers::{Handler, HandlerError, JobContext, JobInput};
use batchd::proto::{process_request::Kind, JobBatch, ProcessRequest};
use batchd::Registry;
use bytes::Bytes;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode};
use prost::Message as _;
use serde_json::Value;
use sha2::Digest as _;
use support::otlp::{attr, hex, Collector};
use support::{wait_until, TestServer};
use tokio::sync::Semaphore;

/// Generous deadline for anything that should happen "at once".
const LIVENESS: Duration = Duration::from_secs(20);

const EXIT_OK: i32 = 0;
const EXIT_NOT_OK: i32 = 1;
const EXIT_INPUT: i32 = 2;
const EXIT_UNREACHABLE: i32 = 3;
const EXIT_INTERRUPTED: i32 = 130;

// === the process ===

/// A thread reading a pipe to its end.
type Reader = JoinHandle<Vec<u8>>;

/// A running `batchctl`; killed if a test ends while it still runs.
struct Ctl {
    child: Child,
    /// stdout and stderr.
    readers: Option<(Reader, Reader)>,
}

/// How a `batchctl` run ended.
#[derive(Debug)]
struct Finished {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Variables that would change batchctl's tracing: removed unless a test sets them.
const TRACE_VARS: [&str; 8] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SDK_DISABLED",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "TRACEPARENT",
    "TRACESTATE",
];

impl Ctl {
    /// Starts `batchctl args…`, feeding it `stdin` (or nothing), with no `BATCHD_ENDPOINT` set.
    fn spawn(args: &[&str], stdin: Option<Vec<u8>>) -> Self {
        Self::spawn_env(args, stdin, &[])
    }

    /// Like [`Ctl::spawn`], with `env` as the only tracing variables.
    fn spawn_env(args: &[&str], stdin: Option<Vec<u8>>, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_batchctl"));
        for var in TRACE_VARS {
            cmd.env_remove(var);
        }
        cmd.args(args)
            .env_remove("BATCHD_ENDPOINT")
            .envs(env.iter().copied())
            .env("COLUMNS", "100")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(data) = stdin {
            let mut pipe = child.stdin.take().unwrap();
            // batchctl may stop reading early (--strict); a broken pipe is its business.
            std::thread::spawn(move || {
                let _ = pipe.write_all(&data);
            });
        }
        // Drained all along, so batchctl never blocks on a full pipe.
        let drain = |mut pipe: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                buf
            })
        };
        let out = drain(Box::new(child.stdout.take().unwrap()));
        let err = drain(Box::new(child.stderr.take().unwrap()));
        Self {
            child,
            readers: Some((out, err)),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `INT`) to batchctl.
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits (at most `limit`) for batchctl to exit; returns its code and all of its output.
    async fn finish(mut self, limit: Duration) -> Finished {
        let child = &mut self.child;
        wait_until("batchctl exits", limit, || {
            child.try_wait().unwrap().is_some()
        })
        .await;
        let code = self.child.wait().unwrap().code();
        let (out, err) = self.readers.take().unwrap();
        let (stdout, stderr) =
            tokio::task::spawn_blocking(move || (out.join().unwrap(), err.join().unwrap()))
                .await
                .unwrap();
        Finished {
            code,
            stdout: String::from_utf8(stdout).expect("stdout is UTF-8"),
            stderr: String::from_utf8(stderr).expect("stderr is UTF-8"),
        }
    }
}

impl Drop for Ctl {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `batchctl args…` to its end.
async fn batchctl(args: &[&str]) -> Finished {
    Ctl::spawn(args, None).finish(LIVENESS).await
}

/// Runs `batchctl --endpoint SERVER args…` to its end.
async fn against(server: &TestServer, args: &[&str]) -> Finished {
    let url = server.url();
    let mut all = vec!["--endpoint", url.as_str()];
    all.extend_from_slice(args);
    batchctl(&all).await
}

/// `--endpoint SERVER args…` as owned strings, for [`Ctl::spawn`].
fn with_endpoint(server: &TestServer, args: &[&str]) -> Vec<String> {
    let mut all = vec!["--endpoint".to_owned(), server.url()];
    all.extend(args.iter().map(|a| a.to_string()));
    all
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

// === files and records ===

/// Writes `lines` (each followed by a newline) to `dir/name`.
fn write_lines(dir: &Path, name: &str, lines: impl IntoIterator<Item = String>) -> PathBuf {
    let path = dir.join(name);
    let mut f = BufWriter::new(std::fs::File::create(&path).unwrap());
    for line in lines {
        f.write_all(line.as_bytes()).unwrap();
        f.write_all(b"\n").unwrap();
    }
    f.flush().unwrap();
    path
}

/// Every output line as JSON, in output order.
fn records(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad output line {l:?}: {e}")))
        .collect()
}

fn read_records(path: &Path) -> Vec<Value> {
    records(&std::fs::read_to_string(path).unwrap())
}

fn id(r: &Value) -> &str {
    r["id"].as_str().unwrap()
}

fn ids(records: &[Value]) -> Vec<&str> {
    records.iter().map(id).collect()
}

/// Records by id; panics on a duplicate id.
fn by_id(records: &[Value]) -> HashMap<&str, &Value> {
    let mut map = HashMap::new();
    for r in records {
        assert!(map.insert(id(r), r).is_none(), "two results for {}", id(r));
    }
    map
}

fn sleep_line(id: &str, ms: u64) -> String {
    format!(r#"{{"id":"{id}","handler":"sleep","params":{{"ms":{ms}}}}}"#)
}

fn echo_line(id: &str, payload: &str) -> String {
    format!(r#"{{"id":"{id}","handler":"echo","payload":"{payload}"}}"#)
}

fn finished(server: &TestServer) -> u64 {
    server.stats().finished.iter().sum()
}

/// An endpoint that refuses connections for as long as the returned socket lives.
///
/// The socket is bound and never listens. Bound, its port cannot be handed to a parallel test
/// meanwhile (a listener bound to port 0 and dropped frees it for anyone); not listening, a connect
/// is refused at once, which is what every caller needs: "cannot reach the daemon". A listener that
/// never accepts would not do: the kernel completes handshakes into its backlog, so batchctl would
/// hang on the HTTP/2 handshake instead. No SO_REUSEADDR is set, so no other socket can share the
/// port (the listeners of other tests set it, and Linux shares a port only when both sockets do).
fn refused_endpoint() -> (String, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let url = format!("http://{}", socket.local_addr().unwrap());
    (url, socket)
}

// === a handler the test opens ===

/// Waits for one permit of its semaphore (the test hands them out), then returns the payload.
struct Gate(Arc<Semaphore>);

#[async_trait::async_trait]
impl Handler for Gate {
    fn description(&self) -> &str {
        "Waits until the test opens the gate, then returns the payload."
    }

    async fn run(
        self: Arc<Self>,
        input: JobInput,
        _ctx: JobContext,
    ) -> Result<Bytes, HandlerError> {
        self.0.acquire().await.unwrap().forget();
        Ok(input.payload)
    }
}

/// A server with the builtin handlers and `gate`, closed until permits are added.
fn gated_server() -> (TestServer, Arc<Semaphore>) {
    let gate = Arc::new(Semaphore::new(0));
    let mut registry = Registry::builtin();
    registry.register("gate", Gate(Arc::clone(&gate)));
    (TestServer::start_with(|_| {}, registry), gate)
}

// === runs ===

#[tokio::test]
async fn a_100k_line_file_completes_with_every_id_exactly_once() {
    const N: usize = 100_000;
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(
        dir.path(),
        "jobs.jsonl",
        (0..N).map(|i| echo_line(&format!("j{i}"), &format!("p{i}"))),
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
    let done = Ctl::spawn(&strs(&args), None)
        .finish(Duration::from_secs(90))
        .await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    assert_eq!(done.stdout, "", "results go to --output");
    assert!(
        done.stderr.contains(&format!("{N} jobs in")) && done.stderr.contains(&format!("{N} ok")),
        "summary: {}",
        done.stderr
    );

    let out = read_records(&output);
    assert_eq!(out.len(), N);
    let mut seen = HashSet::new();
    for r in &out {
        let id = id(r);
        assert!(seen.insert(id.to_owned()), "two results for {id}");
        assert_eq!(r["outcome"], "ok", "{r}");
        assert_eq!(
            r["output"].as_str(),
            Some(format!("p{}", &id[1..]).as_str())
        );
    }
    assert!((0..N).all(|i| seen.contains(&format!("j{i}"))));
    assert_eq!(server.stats().jobs_admitted, N as u64, "each job sent once");
}

#[tokio::test]
async fn bad_lines_are_reported_with_their_numbers_and_the_run_goes_on() {
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(
        dir.path(),
        "jobs.jsonl",
        [
            echo_line("a", "1"),
            "{not json".into(),
            echo_line("b", "3"),
            r#"{"id":"c","payload":"no handler"}"#.into(),
            String::new(),
            r#"{"id":"d","handler":"echo","colour":"red"}"#.into(),
            echo_line("e", "7"),
        ],
    );
    let done = against(&server, &["run", "--quiet", path_str(&input)]).await;
    assert_eq!(done.code, Some(EXIT_INPUT), "{done:?}");
    let err = &done.stderr;
    assert!(err.contains("batchctl: line 2: not valid JSON"), "{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("batchctl: line 4:") && l.contains("handler")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.starts_with("batchctl: line 6:") && l.contains("colour")),
        "{err}"
    );
    assert!(
        !err.contains("line 5"),
        "a blank line is not an error: {err}"
    );
    assert!(err.contains("3 ok") && err.contains("3 bad lines"), "{err}");

    let out = records(&done.stdout);
    let out = by_id(&out);
    assert_eq!(
        out.keys().copied().collect::<HashSet<_>>(),
        HashSet::from(["a", "b", "e"])
    );
    assert!(out.values().all(|r| r["outcome"] == "ok"), "{out:?}");
}

#[tokio::test]
async fn strict_stops_at_the_first_bad_line() {
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(
        dir.path(),
        "jobs.jsonl",
        [
            echo_line("a1", "x"),
            echo_line("a2", "x"),
            echo_line("a3", "x"),
            "[1, 2]".into(),
            echo_line("b5", "x"),
            echo_line("b6", "x"),
            echo_line("b7", "x"),
            "{nope".into(),
        ],
    );
    let done = against(&server, &["run", "--strict", "--quiet", path_str(&input)]).await;
    assert_eq!(done.code, Some(EXIT_INPUT), "{done:?}");
    assert!(
        done.stderr
            .lines()
            .any(|l| l.starts_with("batchctl: line 4:") && l.contains("--strict")),
        "{}",
        done.stderr
    );
    assert!(!done.stderr.contains("line 8"), "{}", done.stderr);
    let out = records(&done.stdout);
    assert!(
        ids(&out).iter().all(|id| id.starts_with('a')),
        "nothing after the bad line runs: {out:?}"
    );
    assert!(server.stats().jobs_admitted <= 3, "{:?}", server.stats());
}

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
    let (server, gate) = gated_server();
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
async fn resume_after_an_interrupted_run_finishes_only_the_rest() {
    let (server, gate) = gated_server();
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

#[tokio::test]
async fn retry_resends_a_job_that_times_out() {
    let server = TestServer::start(|_| {});
    let input = [
        r#"{"id":"slow","handler":"sleep","params":{"ms":60000},"timeout_ms":1}"#,
        r#"{"id":"fine","handler":"echo","payload":"x"}"#,
    ]
    .join("\n");
    let url = server.url();
    let done = Ctl::spawn(
        &["--endpoint", &url, "run", "--retry", "2", "-"],
        Some(input.into_bytes()),
    )
    .finish(LIVENESS)
    .await;
    assert_eq!(done.code, Some(EXIT_NOT_OK), "{done:?}");
    let out = records(&done.stdout);
    let out = by_id(&out);
    assert_eq!(out["slow"]["outcome"], "timed_out", "{:?}", out["slow"]);
    assert_eq!(out["slow"]["attempts"], 3, "{:?}", out["slow"]);
    assert_eq!(out["fine"]["outcome"], "ok");
    assert!(out["fine"].get("attempts").is_none(), "{:?}", out["fine"]);
    assert_eq!(server.stats().jobs_admitted, 4, "slow sent 3 times");
    assert!(done.stderr.contains("2 retries"), "{}", done.stderr);
}

#[tokio::test]
async fn a_line_over_the_length_limit_is_skipped_and_the_run_goes_on() {
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let long = "x".repeat(batchd::client::MAX_LINE + 1024);
    let input = write_lines(
        dir.path(),
        "jobs.jsonl",
        [echo_line("before", "x"), long, echo_line("after", "x")],
    );
    let done = against(&server, &["run", "--quiet", path_str(&input)]).await;
    assert_eq!(done.code, Some(EXIT_INPUT), "{done:?}");
    assert!(
        done.stderr.contains("batchctl: line 2: longer than"),
        "{}",
        done.stderr
    );
    let out = records(&done.stdout);
    assert_eq!(
        ids(&out).into_iter().collect::<HashSet<_>>(),
        HashSet::from(["before", "after"]),
        "the line after the long one runs too: {}",
        done.stderr
    );
}

#[tokio::test]
async fn large_payloads_are_sent_in_requests_the_daemon_accepts() {
    // The thumbnail case: 256 jobs (one batch by count) of 70 KiB each. With the defaults, one such
    // batch is over the daemon's default max_message_size. With a daemon limited to 1 MiB, so are
    // the batches a count-only client sends even when it cuts them at its 2 MiB input reads; over
    // the limit, the daemon ends the whole call RESOURCE_EXHAUSTED.
    const N: usize = 256;
    const PAYLOAD: usize = 70 * 1024;
    let default_limit = batchd::config::Config::default().max_message_size;
    assert!(
        N * PAYLOAD > default_limit.as_usize(),
        "one batch by count is too large"
    );
    let dir = tempfile::tempdir().unwrap();
    let payload = |i: usize| format!("{i:06}{}", "x".repeat(PAYLOAD - 6));
    let input = write_lines(
        dir.path(),
        "jobs.jsonl",
        (0..N).map(|i| {
            format!(
                r#"{{"id":"t{i}","handler":"sha256","payload":"{}"}}"#,
                payload(i)
            )
        }),
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    for (limit, flags) in [
        (default_limit, &[][..]),
        (ByteSize::mib(1), &["--max-message", "1MiB"][..]),
    ] {
        let server = TestServer::start(|c| {
            c.max_message_size = limit;
            c.max_payload = limit;
        });
        let mut args = vec!["run", "--quiet"];
        args.extend(flags);
        args.push(path_str(&input));
        let done = against(&server, &args).await;
        assert_eq!(done.code, Some(EXIT_OK), "{limit}: {}", done.stderr);
        let out = records(&done.stdout);
        let out = by_id(&out);
        assert_eq!(out.len(), N, "{limit}: {}", done.stderr);
        for i in 0..N {
            let r = out[format!("t{i}").as_str()];
            assert_eq!(r["outcome"], "ok", "{limit}: {r}");
            let digest = b64.decode(r["output_b64"].as_str().unwrap()).unwrap();
            assert_eq!(digest, sha2::Sha256::digest(payload(i)).to_vec(), "t{i}");
        }
        assert_eq!(server.stats().jobs_admitted, N as u64, "each job sent once");
    }
}

/// The encoded size of the request that carries the job of `line` alone, as batchctl reads it.
fn request_size(line: &str) -> usize {
    let job = batchd::client::parse_line(1, line, &Default::default())
        .unwrap()
        .unwrap();
    ProcessRequest {
        kind: Some(Kind::Batch(JobBatch {
            batch_id: job.batch,
            jobs: vec![job.job],
        })),
    }
    .encoded_len()
}

#[tokio::test]
async fn max_message_fills_requests_to_the_byte_and_skips_a_job_too_large_alone() {
    // A daemon that takes requests of up to 64 KiB, and a run told so.
    const LIMIT: u64 = 64 * 1024;
    let server = TestServer::start(|c| {
        c.max_message_size = ByteSize(LIMIT);
        c.max_payload = ByteSize(LIMIT);
    });
    // A job whose request is exactly the limit (the daemon accepts it), and one a byte larger.
    let size = (0..LIMIT as usize)
        .rev()
        .find(|n| request_size(&echo_line("edge", &"y".repeat(*n))) <= LIMIT as usize)
        .unwrap();
    let edge = echo_line("edge", &"y".repeat(size));
    let over = echo_line("over", &"y".repeat(size + 1));
    assert_eq!(request_size(&edge), LIMIT as usize);
    assert_eq!(request_size(&over), LIMIT as usize + 1);
    // Around them, jobs of 1 B to 20 kB: 3 MB in all, so requests are cut many times and some end
    // within bytes of the limit.
    let sizes: Vec<usize> = (0..300).map(|i| i * 7919 % 20_000 + 1).collect();
    let mut lines: Vec<String> = sizes[..150]
        .iter()
        .enumerate()
        .map(|(i, n)| echo_line(&format!("j{i}"), &"z".repeat(*n)))
        .collect();
    lines.push(edge);
    lines.push(over);
    let over_line = lines.len();
    lines.extend(
        sizes[150..]
            .iter()
            .enumerate()
            .map(|(i, n)| echo_line(&format!("j{}", 150 + i), &"z".repeat(*n))),
    );
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(dir.path(), "jobs.jsonl", lines);

    let done = against(
        &server,
        &["run", "--quiet", "--max-message", "64KiB", path_str(&input)],
    )
    .await;
    assert_eq!(done.code, Some(EXIT_INPUT), "a bad line: {}", done.stderr);
    let reported: Vec<&str> = done
        .stderr
        .lines()
        .filter(|l| l.starts_with("batchctl: line "))
        .collect();
    assert_eq!(reported.len(), 1, "{}", done.stderr);
    assert!(
        reported[0].starts_with(&format!("batchctl: line {over_line}: "))
            && reported[0].contains(&format!("{} bytes", LIMIT + 1))
            && reported[0].contains("--max-message (64KiB)"),
        "names the line, the size and the flag: {}",
        reported[0]
    );
    assert!(
        done.stderr.contains("301 ok") && done.stderr.contains("1 bad line"),
        "{}",
        done.stderr
    );
    let out = records(&done.stdout);
    let out = by_id(&out);
    assert_eq!(out.len(), 301, "every other job ran");
    assert!(!out.contains_key("over"));
    assert!(out.values().all(|r| r["outcome"] == "ok"), "{out:?}");
    assert_eq!(out["edge"]["output"].as_str().map(str::len), Some(size));
    for (i, n) in sizes.iter().enumerate() {
        let r = out[format!("j{i}").as_str()];
        assert_eq!(r["output"].as_str().map(str::len), Some(*n), "{r}");
    }
    assert_eq!(
        server.stats().jobs_admitted,
        301,
        "the big job was not sent"
    );
}

#[tokio::test]
async fn a_line_under_the_length_limit_but_over_max_message_is_skipped() {
    // 17 MiB: under MAX_LINE, over the default --max-message (the daemon's default limit).
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let big = echo_line("big", &"x".repeat(17 << 20));
    assert!(big.len() < batchd::client::MAX_LINE);
    let input = write_lines(
        dir.path(),
        "jobs.jsonl",
        [echo_line("before", "x"), big, echo_line("after", "x")],
    );
    let done = against(&server, &["run", "--quiet", path_str(&input)]).await;
    assert_eq!(done.code, Some(EXIT_INPUT), "{done:?}");
    assert!(
        done.stderr
            .lines()
            .any(|l| l.starts_with("batchctl: line 2: ") && l.contains("--max-message (16MiB)")),
        "{}",
        done.stderr
    );
    let out = records(&done.stdout);
    assert_eq!(
        ids(&out).into_iter().collect::<HashSet<_>>(),
        HashSet::from(["before", "after"]),
        "{}",
        done.stderr
    );
    assert_eq!(server.stats().jobs_admitted, 2);
}

#[tokio::test]
async fn max_in_flight_bounds_the_jobs_the_daemon_holds_for_the_run() {
    const N: u64 = 8;
    const TOTAL: u64 = 40;
    let (server, gate) = gated_server();
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

// === other subcommands, stdin, defaults ===

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
async fn jobs_can_come_from_stdin() {
    let server = TestServer::start(|_| {});
    let url = server.url();
    let input = (0..50)
        .map(|i| echo_line(&format!("j{i}"), &format!("p{i}")))
        .collect::<Vec<_>>()
        .join("\n");
    // "-" and no file at all both read stdin.
    for file in [Some("-"), None] {
        let mut args = vec!["--endpoint", url.as_str(), "run", "-q"];
        args.extend(file);
        let done = Ctl::spawn(&args, Some(input.clone().into_bytes()))
            .finish(LIVENESS)
            .await;
        assert_eq!(done.code, Some(EXIT_OK), "{file:?}: {done:?}");
        let out = records(&done.stdout);
        let out = by_id(&out);
        assert_eq!(out.len(), 50, "{file:?}");
        for i in 0..50 {
            let r = out[format!("j{i}").as_str()];
            assert_eq!(r["outcome"], "ok");
            assert_eq!(r["output"].as_str(), Some(format!("p{i}").as_str()));
        }
    }
}

#[tokio::test]
async fn handler_flag_and_line_numbers_fill_in_missing_fields() {
    let server = TestServer::start(|_| {});
    let url = server.url();
    let input = [
        r#"{"payload":"a"}"#,
        "",
        r#"{"id":"x","payload":"b"}"#,
        r#"{"handler":"sha256","payload":"c"}"#,
        r#"{"id":7,"payload":"d"}"#,
    ]
    .join("\n");
    let done = Ctl::spawn(
        &["--endpoint", &url, "run", "--handler", "echo", "-"],
        Some(input.into_bytes()),
    )
    .finish(LIVENESS)
    .await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    let out = records(&done.stdout);
    let out = by_id(&out);
    assert_eq!(
        out.keys().copied().collect::<HashSet<_>>(),
        HashSet::from(["1", "x", "4", "7"]),
        "missing ids are line numbers (blank lines count): {out:?}"
    );
    assert_eq!(out["1"]["output"], "a");
    assert_eq!(out["x"]["output"], "b");
    assert_eq!(out["7"]["output"], "d");
    let digest = base64::engine::general_purpose::STANDARD
        .decode(out["4"]["output_b64"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        digest,
        sha2::Sha256::digest(b"c").to_vec(),
        "a line's own handler wins over --handler"
    );
    assert!(out.values().all(|r| r["outcome"] == "ok"), "{out:?}");
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

// === traces ===

/// Short enough that the daemon's spans reach the collector at once.
const BATCH_DELAY: Duration = Duration::from_millis(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_run_exports_its_span_and_the_daemons_spans_are_its_children() {
    let collector = Collector::start().await;
    let otlp = collector.url();
    let daemon = collector.traced_daemon(BATCH_DELAY, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(
        dir.path(),
        "jobs.jsonl",
        [
            echo_line("a", "1"),
            echo_line("b", "2"),
            r#"{"id":"c","handler":"no-such-handler"}"#.to_owned(),
        ],
    );
    // A CI job's trace: batchctl joins it.
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let parent = "b7ad6b7169203331";
    let traceparent = format!("00-{trace}-{parent}-01");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
        ("TRACEPARENT", traceparent.as_str()),
        ("TRACESTATE", "ci=7"),
    ];
    let args = [
        "--endpoint",
        &daemon.url,
        "run",
        "--quiet",
        path_str(&input),
    ];
    let done = Ctl::spawn_env(&args, None, &env).finish(LIVENESS).await;
    assert_eq!(done.code, Some(EXIT_NOT_OK), "one job rejected: {done:?}");
    assert_eq!(records(&done.stdout).len(), 3);
    assert_eq!(
        done.stderr.lines().count(),
        1,
        "only the summary: {}",
        done.stderr
    );

    let run = collector.take_one("batchctl.run", LIVENESS).await;
    let span = &run.span;
    assert_eq!(run.service, "batchctl", "the default service name");
    assert_eq!(span.kind, SpanKind::Client as i32);
    assert_eq!(
        hex(&span.trace_id),
        trace,
        "batchctl joins the caller's trace"
    );
    assert_eq!(
        hex(&span.parent_span_id),
        parent,
        "its parent is $TRACEPARENT"
    );
    assert_eq!(span.trace_state, "ci=7", "$TRACESTATE is carried on");
    let port = daemon.url.rsplit(':').next().unwrap();
    for (key, expected) in [
        ("rpc.system", "grpc"),
        ("rpc.service", "batchd.v1.BatchService"),
        ("rpc.method", "Process"),
        ("server.address", "127.0.0.1"),
        ("server.port", port),
        ("batchctl.jobs.sent", "3"),
        ("batchctl.jobs.done", "3"),
        ("batchctl.results.ok", "2"),
        ("batchctl.results.failed", "0"),
        ("batchctl.results.rejected", "1"),
        ("batchctl.bad_lines", "0"),
        ("batchctl.end", "completed"),
        ("process.exit.code", "1"),
    ] {
        assert_eq!(attr(span, key).as_deref(), Some(expected), "{key}");
    }
    let status = span.status.clone().unwrap_or_default();
    assert_eq!(status.code, StatusCode::Unset as i32, "{status:?}");

    // The daemon got the span's context as traceparent: its session span is the child.
    let spans = collector
        .wait_for("the daemon's session span arrives", LIVENESS, |s| {
            s.iter()
                .any(|e| e.span.name == "batchd.session" && hex(&e.span.trace_id) == trace)
        })
        .await;
    let session = spans
        .iter()
        .find(|e| e.span.name == "batchd.session")
        .unwrap();
    assert_eq!(
        session.span.parent_span_id, span.span_id,
        "batchd.session is a child of batchctl.run"
    );
    assert_eq!(attr(&session.span, "session.jobs").as_deref(), Some("3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_span_says_how_the_run_ended() {
    let collector = Collector::start().await;
    let otlp = collector.url();
    let (server, gate) = gated_server();
    let dir = tempfile::tempdir().unwrap();

    // Cancelled by Ctrl-C; only the traces endpoint set; no $TRACEPARENT: a trace of its own.
    let input = write_lines(
        dir.path(),
        "gated.jsonl",
        (0..5).map(|i| format!(r#"{{"id":"g{i}","handler":"gate"}}"#)),
    );
    let args = with_endpoint(&server, &["run", "--quiet", path_str(&input)]);
    let env = [
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", otlp.as_str()),
        ("OTEL_SERVICE_NAME", "ci-batchctl"),
    ];
    let ctl = Ctl::spawn_env(&strs(&args), None, &env);
    wait_until("the 5 jobs run", LIVENESS, || {
        server.stats().jobs_running == 5
    })
    .await;
    ctl.signal("INT");
    let done = ctl.finish(LIVENESS).await;
    assert_eq!(done.code, Some(EXIT_INTERRUPTED), "{done:?}");
    let run = collector.take_one("batchctl.run", LIVENESS).await;
    assert_eq!(run.service, "ci-batchctl", "OTEL_SERVICE_NAME is honoured");
    assert!(run.span.parent_span_id.is_empty(), "a root span");
    assert_eq!(
        attr(&run.span, "batchctl.end").as_deref(),
        Some("cancelled")
    );
    assert_eq!(attr(&run.span, "batchctl.jobs.sent").as_deref(), Some("5"));
    assert_eq!(attr(&run.span, "process.exit.code").as_deref(), Some("130"));
    drop(gate);

    // An error: the daemon cannot be reached.
    let (url, _refusing) = refused_endpoint();
    let args = ["--endpoint", url.as_str(), "run", path_str(&input)];
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str())];
    let done = Ctl::spawn_env(&args, None, &env).finish(LIVENESS).await;
    assert_eq!(done.code, Some(EXIT_UNREACHABLE), "{done:?}");
    assert_eq!(done.stderr.lines().count(), 1, "{}", done.stderr);
    let run = collector.take_one("batchctl.run", LIVENESS).await;
    assert_eq!(attr(&run.span, "batchctl.end").as_deref(), Some("error"));
    assert_eq!(attr(&run.span, "process.exit.code").as_deref(), Some("3"));
    let status = run.span.status.clone().unwrap_or_default();
    assert_eq!(status.code, StatusCode::Error as i32);
    assert!(
        status.message.starts_with("cannot reach the daemon at"),
        "{status:?}"
    );

    // OTEL_SDK_DISABLED=true wins over the endpoint, and the sampler is the SDK's. A traced
    // batchctl delivers its span before it exits (the runs above), so nothing received once this
    // one has exited means nothing sent.
    let input = write_lines(dir.path(), "echo.jsonl", [echo_line("e", "x")]);
    let args = with_endpoint(&server, &["run", "--quiet", path_str(&input)]);
    for off in [
        ("OTEL_SDK_DISABLED", "true"),
        ("OTEL_TRACES_SAMPLER", "always_off"),
    ] {
        let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()), off];
        let done = Ctl::spawn_env(&strs(&args), None, &env)
            .finish(LIVENESS)
            .await;
        assert_eq!(done.code, Some(EXIT_OK), "{off:?}: {done:?}");
        assert!(
            collector.spans().is_empty(),
            "{off:?}: {:?}",
            collector.spans()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_does_not_answer_does_not_hold_the_exit() {
    // Accepts connections, holds them open for the whole test and never says a word: the export can
    // only time out, so an exit at all shows that the flush gave up instead of waiting for it.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("http://{}", silent.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(dir.path(), "jobs.jsonl", [echo_line("a", "x")]);
    let args = with_endpoint(&server, &["run", "--quiet", path_str(&input)]);
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "300"),
    ];
    let started = Instant::now();
    // Generous: a loaded machine may be slow to start and run the process; a hang never ends.
    let done = Ctl::spawn_env(&strs(&args), None, &env)
        .finish(Duration::from_secs(30))
        .await;
    let took = started.elapsed();
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    assert_eq!(
        records(&done.stdout).len(),
        1,
        "the results are written first"
    );
    assert!(!done.stderr.contains("panicked"), "{}", done.stderr);
    // It tried the export and waited for its timeout before giving up.
    wait_until("the collector got batchctl's connection", LIVENESS, || {
        accepted.load(Ordering::SeqCst) > 0
    })
    .await;
    assert!(
        took >= Duration::from_millis(300),
        "exited before the export timeout: {took:?}"
    );
    holder.abort();
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
            "cannot read the snapshot {}: {e}\n(UPDATE_SNAPSHOTS=1 cargo test --test batchctl creates it)",
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
