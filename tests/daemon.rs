//! The real `batchd` binary as a process: configuration errors and their exit code, the config file
//! named by `BATCHD_CONFIG`, serving on a real port, SIGTERM/SIGINT shutdown with its grace period
//! (the spans it flushes, the exec process groups it waits for, a second signal while it does), and
//! JSON logs.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use batchd::proto::Outcome;
use support::daemon::{write_config, Daemon};
use support::otlp::{attr, fresh_trace, hex, named, open_traced, Collector, CALLER_SPAN};
use support::{batch, by_id, job, outcome, run_batch_on, wait_until, within, OpenCall};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Generous deadline for anything that should happen "at once".
const LIVENESS: Duration = Duration::from_secs(10);
/// batchd's exit code for an unusable configuration.
const EXIT_CONFIG: i32 = 64;

// === the process ===

/// Runs `batchd args…` with `env`, expecting it to exit on its own; returns its code and stderr.
async fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut daemon = Daemon::spawn(args, env);
    let status = daemon.exit().await;
    (status.code(), daemon.stderr())
}

/// Opens a call running an echo job and a 60 s sleep job; returns once the echo result is back,
/// which proves the batch was admitted (so the sleep job runs: no worker limit is near).
async fn call_with_a_sleeping_job(daemon: &Daemon) -> OpenCall {
    let mut client = daemon.client().await;
    let mut call = OpenCall::open(&mut client).await;
    call.send(batch(
        "b",
        vec![
            job("echo", "echo", b"hi", &[]),
            job("sleep", "sleep", b"", &[("ms", "60000")]),
        ],
    ))
    .await;
    let first = call.results(1, LIVENESS).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].job_id, "echo");
    call
}

/// The admin listener's address from the first complete "admin listener" line of a log, in text
/// (`addr=…`) or JSON (`"addr":"…"`) format.
fn admin_addr(log: &str) -> Option<SocketAddr> {
    let line = log
        .split_inclusive('\n')
        .find(|l| l.ends_with('\n') && l.contains("admin listener"))?;
    let addr = match line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
    {
        Some(addr) => addr,
        None => {
            let rest = &line[line.find("\"addr\":\"")? + "\"addr\":\"".len()..];
            &rest[..rest.find('"')?]
        }
    };
    addr.parse().ok()
}

/// A daemon serving gRPC and the admin endpoints, each on a port the kernel chose; returns it with
/// the admin address it logged.
fn serving_with_admin(daemon: Daemon) -> (Daemon, SocketAddr) {
    // The admin line is logged before the "serving" line `Daemon::serving` waited for.
    let admin = admin_addr(&daemon.stderr())
        .unwrap_or_else(|| panic!("no admin listener address logged:\n{}", daemon.stderr()));
    (daemon, admin)
}

/// Processes still running (zombies are not) whose environment carries `BATCHD_TEST_MARK=mark`.
///
/// Zombies count as gone: this sandbox's PID 1 does not reap orphans.
fn marked_running(mark: &str) -> Vec<i32> {
    let needle = format!("BATCHD_TEST_MARK={mark}\0");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            // The state follows the command name, which is in parentheses and may hold anything.
            let running = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| stat.get(stat.rfind(')')? + 2..)?.chars().next())
                .is_some_and(|state| state != 'Z' && state != 'X');
            running
                && std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.windows(needle.len()).any(|w| w == needle.as_bytes()))
        })
        .collect()
}

// === configuration errors ===

#[tokio::test]
async fn zero_workers_exits_64_naming_the_field() {
    let (code, stderr) = run_to_exit(&["--workers", "0", "--listen", "127.0.0.1:0"], &[]).await;
    assert_eq!(code, Some(EXIT_CONFIG), "stderr: {stderr}");
    assert!(stderr.contains("workers"), "stderr: {stderr}");
    assert!(!stderr.contains("serving"), "stderr: {stderr}");
}

#[tokio::test]
async fn a_bad_environment_variable_exits_64_naming_it() {
    let (code, stderr) = run_to_exit(
        &["--listen", "127.0.0.1:0"],
        &[("BATCHD_SESSION_WINDOW", "abc")],
    )
    .await;
    assert_eq!(code, Some(EXIT_CONFIG), "stderr: {stderr}");
    assert!(stderr.contains("BATCHD_SESSION_WINDOW"), "stderr: {stderr}");
}

#[tokio::test]
async fn an_unknown_field_in_the_config_file_exits_64_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("batchd.toml");
    std::fs::write(&path, "workers = 4\nwrokers = 8\n").unwrap();
    let (code, stderr) = run_to_exit(
        &[
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    )
    .await;
    assert_eq!(code, Some(EXIT_CONFIG), "stderr: {stderr}");
    assert!(stderr.contains("wrokers"), "stderr: {stderr}");
}

// === the config file ===

/// The handler names a daemon lists.
async fn handler_names(daemon: &Daemon) -> Vec<String> {
    daemon
        .client()
        .await
        .list_handlers(batchd::proto::ListHandlersRequest {})
        .await
        .unwrap()
        .into_inner()
        .handlers
        .into_iter()
        .map(|h| h.name)
        .collect()
}

/// A config file in `dir` adding an exec handler named `name` (`cat`).
fn config_with_handler(dir: &tempfile::TempDir, name: &str) -> String {
    let text = format!("[[exec]]\nname = \"{name}\"\ncommand = [\"cat\"]\n");
    write_config(dir, &text).to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batchd_config_names_the_config_file_and_config_wins_over_it() {
    let (env_dir, flag_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let env_file = config_with_handler(&env_dir, "from_env_file");
    let flag_file = config_with_handler(&flag_dir, "from_flag_file");
    let env = [("BATCHD_CONFIG", env_file.as_str())];

    // Without --config, the file BATCHD_CONFIG names is the config: its handler is served.
    let mut daemon = Daemon::serving_with(&[], &env).await;
    let names = handler_names(&daemon).await;
    assert!(names.iter().any(|n| n == "from_env_file"), "{names:?}");
    let mut client = daemon.client().await;
    let jobs = vec![job("c", "from_env_file", b"via BATCHD_CONFIG", &[])];
    let results = run_batch_on(&mut client, jobs, LIVENESS).await;
    assert_eq!(outcome(&results["c"]), Outcome::Ok, "{:?}", results["c"]);
    assert_eq!(&results["c"].output[..], b"via BATCHD_CONFIG");
    drop(client);
    daemon.signal("TERM");
    assert_eq!(daemon.exit().await.code(), Some(0), "{}", daemon.stderr());

    // A flag beats the environment: --config replaces the file, not merges with it.
    let mut daemon = Daemon::serving_with(&["--config", &flag_file], &env).await;
    let names = handler_names(&daemon).await;
    assert!(names.iter().any(|n| n == "from_flag_file"), "{names:?}");
    assert!(!names.iter().any(|n| n == "from_env_file"), "{names:?}");
    daemon.signal("TERM");
    assert_eq!(daemon.exit().await.code(), Some(0), "{}", daemon.stderr());
}

#[tokio::test]
async fn a_bad_file_named_by_batchd_config_exits_64_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, "workers = 4\nwrokers = 8\n");
    let env = [("BATCHD_CONFIG", path.to_str().unwrap())];
    let (code, stderr) = run_to_exit(&["--listen", "127.0.0.1:0"], &env).await;
    assert_eq!(code, Some(EXIT_CONFIG), "stderr: {stderr}");
    assert!(stderr.contains("wrokers"), "stderr: {stderr}");
}

// === serving and signals ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_jobs_then_exits_0_on_sigterm() {
    let mut daemon = Daemon::serving(&[]).await;

    let channel = tonic::transport::Channel::from_shared(daemon.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "batchd.v1.BatchService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);

    let mut client = daemon.client().await;
    let jobs = (0..20)
        .map(|i| job(&format!("j{i}"), "echo", format!("p{i}").as_bytes(), &[]))
        .collect();
    let results = run_batch_on(&mut client, jobs, LIVENESS).await;
    assert_eq!(results.len(), 20);
    for i in 0..20 {
        let r = &results[&format!("j{i}")];
        assert_eq!(outcome(r), Outcome::Ok);
        assert_eq!(&r.output[..], format!("p{i}").as_bytes());
    }

    daemon.signal("TERM");
    let status = daemon.exit().await;
    let stderr = daemon.stderr();
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    let serving = stderr.lines().find(|l| l.contains("serving")).unwrap();
    assert!(
        !serving.trim_start().starts_with('{'),
        "logs are text by default: {serving}"
    );
}

/// A collector that accepts connections and never answers: an export to it hangs until the
/// exporter's own timeout. Holds its connections until the runtime goes.
async fn black_hole() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_metrics_on_the_admin_listener_and_exits_promptly_with_tracing_on() {
    // The collector never answers: the spans' final flush at exit can only end at its timeout,
    // `trace_flush_timeout`, set here to 1 s (the default is 5 s).
    let collector = format!("otlp_endpoint=http://{}", black_hole().await);
    let (mut daemon, admin) = serving_with_admin(
        Daemon::serving(&[
            "--admin-listen",
            "127.0.0.1:0",
            "--set",
            &collector,
            "--set",
            "trace_flush_timeout=1s",
        ])
        .await,
    );
    let mut client = daemon.client().await;
    let results = run_batch_on(&mut client, vec![job("j", "echo", b"x", &[])], LIVENESS).await;
    assert_eq!(results.len(), 1);
    drop(client);

    let (code, metrics) = tokio::task::spawn_blocking(move || support::http_get(admin, "/metrics"))
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("batchd_jobs_finished_total{handler=\"echo\",outcome=\"ok\"} 1\n"),
        "{metrics}"
    );
    let started = std::time::Instant::now();
    daemon.signal("TERM");
    let status = daemon.exit().await;
    let took = started.elapsed();
    assert_eq!(status.code(), Some(0), "stderr:\n{}", daemon.stderr());
    // With no call open, exit takes the 1 s flush and little else. The bound leaves 3 s for a busy
    // machine and stays under the default flush timeout (5 s), so a daemon that ignored the setting
    // (or waited on the export without a bound) fails here.
    eprintln!("exit {took:?} after SIGTERM (trace_flush_timeout 1 s, collector silent)");
    assert!(
        took < Duration::from_secs(4),
        "exit took {took:?} with trace_flush_timeout=1s; stderr:\n{}",
        daemon.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_pending_spans() {
    let collector = Collector::start().await;
    // The batch processor's timer (10 min) does not fire during the test: only shutdown exports.
    let (mut daemon, admin) = serving_with_admin(
        collector
            .traced_daemon(Duration::from_secs(600), &["--admin-listen", "127.0.0.1:0"])
            .await,
    );
    let trace = &fresh_trace();
    let mut client = daemon.client().await;
    let mut call = open_traced(&mut client, trace, |_| {}).await;
    call.send(batch(
        "b",
        vec![job("a", "echo", b"1", &[]), job("b", "echo", b"2", &[])],
    ))
    .await;
    call.half_close();
    let results = by_id(call.finish_ok(LIVENESS).await);
    assert_eq!(results.len(), 2);
    assert!(
        results.values().all(|r| outcome(r) == Outcome::Ok),
        "{results:?}"
    );
    drop((call, client));

    // The session is over in the daemon, so its spans have ended: pending in the batch processor.
    wait_until("the daemon counts the call as ended", LIVENESS, || {
        let metrics = support::http_get(admin, "/metrics").1;
        metrics.contains("\nbatchd_calls_open 0\n")
            && metrics.contains("\nbatchd_calls_ended_total{reason=\"half_close\"} 1\n")
    })
    .await;
    let early = collector.spans();
    assert!(early.is_empty(), "exported before shutdown: {early:?}");

    daemon.signal("TERM");
    let status = daemon.exit().await;
    assert_eq!(status.code(), Some(0), "stderr:\n{}", daemon.stderr());
    // batchd waits for the collector's answer before it exits: the spans are here now.
    let spans = collector.spans();
    let sessions = named(&spans, trace, "batchd.session");
    assert_eq!(sessions.len(), 1, "{spans:?}");
    let session = sessions[0];
    assert_eq!(
        hex(&session.parent_span_id),
        CALLER_SPAN,
        "the caller's span"
    );
    assert_eq!(
        attr(session, "session.end").as_deref(),
        Some("half_close"),
        "it ended before shutdown"
    );
    assert_eq!(attr(session, "session.ok").as_deref(), Some("2"));
    let batches = named(&spans, trace, "batchd.batch");
    assert_eq!(batches.len(), 1, "{spans:?}");
    assert_eq!(batches[0].parent_span_id, session.span_id);
    let mut jobs: Vec<(String, String)> = named(&spans, trace, "batchd.job")
        .into_iter()
        .inspect(|s| assert_eq!(s.parent_span_id, batches[0].span_id, "{s:?}"))
        .map(|s| (attr(s, "job.id").unwrap(), attr(s, "job.outcome").unwrap()))
        .collect();
    jobs.sort();
    assert_eq!(
        jobs,
        [("a".into(), "ok".into()), ("b".into(), "ok".into())],
        "both job spans, flushed at shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cancels_a_running_job_after_the_grace_period_and_exits_0() {
    // The default grace (30 s) is longer than the liveness deadline: the setting must take effect.
    let mut daemon = Daemon::serving(&["--set", "shutdown_grace=300ms"]).await;
    let mut call = call_with_a_sleeping_job(&daemon).await;

    daemon.signal("TERM");
    // The call ends once the grace period is over, with a status.
    let (results, _) = call.finish_err(Code::Unavailable, LIVENESS).await;
    let results = by_id(results);
    let sleep = results.get("sleep").expect("the sleeping job has a result");
    assert_eq!(outcome(sleep), Outcome::Cancelled, "{sleep:?}");

    let exit = daemon.exit().await;
    assert_eq!(exit.code(), Some(0), "stderr:\n{}", daemon.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_during_the_grace_period_stops_at_once() {
    let mut daemon = Daemon::serving(&["--set", "shutdown_grace=60s"]).await;
    let _call = call_with_a_sleeping_job(&daemon).await;

    daemon.signal("TERM");
    daemon.wait_for_log("graceful shutdown").await;
    assert!(
        daemon.running(),
        "batchd waits for the running job during its 60 s grace period"
    );
    daemon.signal("INT");
    let exit = daemon.exit().await;
    assert_eq!(exit.code(), Some(130), "stderr:\n{}", daemon.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_while_process_groups_are_waited_for_kills_them_and_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mark = format!("second-signal-{}", std::process::id());
    // The command and its child ignore SIGTERM, so after shutdown's grace the daemon waits for
    // kill_grace (60 s) before it SIGKILLs them; the child is out of reach of the parent-death signal.
    let config = format!(
        "shutdown_grace = \"100ms\"\n\n[[exec]]\nname = \"stubborn\"\n\
         command = [\"sh\", \"-c\", \"trap '' TERM; sleep 60 & wait; wait\"]\n\
         kill_grace = \"60s\"\nenv = {{ BATCHD_TEST_MARK = \"{mark}\" }}\n"
    );
    let path = write_config(&dir, &config);
    let mut daemon = Daemon::serving(&["--config", path.to_str().unwrap()]).await;
    let call = OpenCall::open_at(daemon.url.clone()).await;
    call.send(batch("b", vec![job("s", "stubborn", b"", &[])]))
        .await;
    wait_until("the command and its child run", LIVENESS, || {
        marked_running(&mark).len() == 2
    })
    .await;

    daemon.signal("TERM");
    daemon.wait_for_log("waiting for the process groups").await;
    assert!(
        daemon.running(),
        "batchd waits up to kill_grace for the group; stderr:\n{}",
        daemon.stderr()
    );
    assert_eq!(
        marked_running(&mark).len(),
        2,
        "SIGTERM did not stop the group"
    );

    daemon.signal("TERM");
    // `exit` gives up after 10 s, far less than the 60 s kill_grace.
    let exit = daemon.exit().await;
    assert_eq!(exit.code(), Some(130), "stderr:\n{}", daemon.stderr());
    assert!(
        daemon.stderr().contains("stopping at once"),
        "{}",
        daemon.stderr()
    );
    wait_until("nothing of the process group runs", LIVENESS, || {
        marked_running(&mark).is_empty()
    })
    .await;
    drop(call);
}

/// At shutdown the daemon waits for the process groups of the exec jobs it stopped, so that none
/// outlives it, and for at most the longest `kill_grace` + 1 s: a group that ignores SIGTERM is
/// SIGKILLed after its kill_grace and the daemon exits 0 right after, not after some longer wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_exec_groups_for_at_most_kill_grace_and_a_second() {
    const SHUTDOWN_GRACE: Duration = Duration::from_millis(100);
    const KILL_GRACE: Duration = Duration::from_secs(1);
    let dir = tempfile::tempdir().unwrap();
    let mark = format!("kill-grace-cap-{}", std::process::id());
    // The command and its child ignore SIGTERM; the child is out of reach of the parent-death
    // signal: only the group's SIGKILL after kill_grace stops it.
    let config = format!(
        "shutdown_grace = \"100ms\"\n\n[[exec]]\nname = \"stubborn\"\n\
         command = [\"sh\", \"-c\", \"trap '' TERM; sleep 600 & wait; wait\"]\n\
         kill_grace = \"1s\"\nenv = {{ BATCHD_TEST_MARK = \"{mark}\" }}\n"
    );
    let path = write_config(&dir, &config);
    let mut daemon = Daemon::serving(&["--config", path.to_str().unwrap()]).await;
    let mut call = OpenCall::open_at(daemon.url.clone()).await;
    call.send(batch("b", vec![job("s", "stubborn", b"", &[])]))
        .await;
    wait_until("the command and its child run", LIVENESS, || {
        marked_running(&mark).len() == 2
    })
    .await;
    // The client reads its call to the end and goes, so that no open connection holds up the exit.
    let reader = tokio::spawn(async move {
        let (_, status) = call.finish().await;
        status
    });

    let started = std::time::Instant::now();
    daemon.signal("TERM");
    let exit = daemon.exit().await;
    let took = started.elapsed();
    let stderr = daemon.stderr();
    assert_eq!(exit.code(), Some(0), "stderr:\n{stderr}");
    eprintln!("exit {took:?} after SIGTERM (shutdown_grace 100ms, kill_grace 1s)");
    assert!(
        stderr.contains("waiting for the process groups"),
        "stderr:\n{stderr}"
    );
    // The group cannot be gone before its SIGKILL, sent kill_grace after the job was stopped at the
    // end of the grace period: a slow machine only makes this longer.
    assert!(
        took >= SHUTDOWN_GRACE + KILL_GRACE,
        "batchd exited {took:?} after SIGTERM, before the group's SIGKILL was due"
    );
    // What the cap allows (the grace period, kill_grace + 1 s), and 3 s for a busy machine: far
    // under the default shutdown_grace (30 s) and the harness's own deadline.
    let bound = SHUTDOWN_GRACE + KILL_GRACE + Duration::from_secs(1) + Duration::from_secs(3);
    assert!(
        took < bound,
        "batchd exited {took:?} after SIGTERM, over {bound:?}; stderr:\n{stderr}"
    );
    // SIGKILLed with its group: nothing of it runs (a zombie that PID 1 does not reap is gone).
    wait_until("nothing of the process group runs", LIVENESS, || {
        marked_running(&mark).is_empty()
    })
    .await;
    let status = within(LIVENESS, "the client's call ends", reader)
        .await
        .unwrap();
    let status = status.expect_err("a call cut by shutdown ends with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_format_writes_one_json_object_per_line() {
    let mut daemon = Daemon::serving(&["--log-format", "json"]).await;
    daemon.signal("TERM");
    let exit = daemon.exit().await;
    let stderr = daemon.stderr();
    assert_eq!(exit.code(), Some(0), "stderr:\n{stderr}");

    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "stderr:\n{stderr}");
    let mut messages = Vec::new();
    for line in lines {
        let value = json::parse(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let json::Value::Object(fields) = value else {
            panic!("not a JSON object: {line}");
        };
        let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
        assert!(
            matches!(field("level"), Some(json::Value::String(_))),
            "{line}"
        );
        assert!(
            matches!(field("timestamp"), Some(json::Value::String(_))),
            "{line}"
        );
        if let Some(json::Value::String(m)) = field("message") {
            messages.push(m.clone());
        }
    }
    assert!(
        messages.iter().any(|m| m == "serving"),
        "messages: {messages:?}"
    );
    let admin = admin_addr(&stderr).expect("the admin address, from the JSON log");
    assert!(admin.port() != 0, "{admin}");
}

/// A strict JSON parser, just enough to check that log lines are JSON.
mod json {
    #[derive(Debug, Clone, PartialEq)]
    pub enum Value {
        Null,
        Bool(bool),
        Number(f64),
        String(String),
        Array(Vec<Value>),
        Object(Vec<(String, Value)>),
    }

    pub fn parse(text: &str) -> Result<Value, String> {
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("trailing characters at {}", p.i));
        }
        Ok(v)
    }

    struct Parser<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl Parser<'_> {
        fn ws(&mut self) {
            while self.s.get(self.i).is_some_and(|b| b" \t\r\n".contains(b)) {
                self.i += 1;
            }
        }

        fn peek(&self) -> Option<u8> {
            self.s.get(self.i).copied()
        }

        fn expect(&mut self, b: u8) -> Result<(), String> {
            if self.peek() == Some(b) {
                self.i += 1;
                Ok(())
            } else {
                Err(format!("expected {:?} at {}", b as char, self.i))
            }
        }

        fn literal(&mut self, word: &str, v: Value) -> Result<Value, String> {
            if self.s[self.i..].starts_with(word.as_bytes()) {
                self.i += word.len();
                Ok(v)
            } else {
                Err(format!("bad literal at {}", self.i))
            }
        }

        fn value(&mut self) -> Result<Value, String> {
            self.ws();
            match self.peek() {
                Some(b'{') => self.object(),
                Some(b'[') => self.array(),
                Some(b'"') => self.string().map(Value::String),
                Some(b't') => self.literal("true", Value::Bool(true)),
                Some(b'f') => self.literal("false", Value::Bool(false)),
                Some(b'n') => self.literal("null", Value::Null),
                Some(b'-' | b'0'..=b'9') => self.number(),
                _ => Err(format!("expected a value at {}", self.i)),
            }
        }

        fn object(&mut self) -> Result<Value, String> {
            self.expect(b'{')?;
            let mut fields = Vec::new();
            self.ws();
            if self.peek() == Some(b'}') {
                self.i += 1;
                return Ok(Value::Object(fields));
            }
            loop {
                self.ws();
                let key = self.string()?;
                self.ws();
                self.expect(b':')?;
                fields.push((key, self.value()?));
                self.ws();
                match self.peek() {
                    Some(b',') => self.i += 1,
                    Some(b'}') => {
                        self.i += 1;
                        return Ok(Value::Object(fields));
                    }
                    _ => return Err(format!("expected ',' or '}}' at {}", self.i)),
                }
            }
        }

        fn array(&mut self) -> Result<Value, String> {
            self.expect(b'[')?;
            let mut items = Vec::new();
            self.ws();
            if self.peek() == Some(b']') {
                self.i += 1;
                return Ok(Value::Array(items));
            }
            loop {
                items.push(self.value()?);
                self.ws();
                match self.peek() {
                    Some(b',') => self.i += 1,
                    Some(b']') => {
                        self.i += 1;
                        return Ok(Value::Array(items));
                    }
                    _ => return Err(format!("expected ',' or ']' at {}", self.i)),
                }
            }
        }

        fn string(&mut self) -> Result<String, String> {
            self.expect(b'"')?;
            let mut out = Vec::new();
            loop {
                let b = self.peek().ok_or("unterminated string")?;
                self.i += 1;
                match b {
                    b'"' => return String::from_utf8(out).map_err(|e| e.to_string()),
                    b'\\' => {
                        let e = self.peek().ok_or("unterminated escape")?;
                        self.i += 1;
                        match e {
                            b'"' | b'\\' | b'/' => out.push(e),
                            b'b' => out.push(8),
                            b'f' => out.push(12),
                            b'n' => out.push(b'\n'),
                            b'r' => out.push(b'\r'),
                            b't' => out.push(b'\t'),
                            b'u' => {
                                let hex = self
                                    .s
                                    .get(self.i..self.i + 4)
                                    .and_then(|h| std::str::from_utf8(h).ok())
                                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                                    .ok_or("bad \\u escape")?;
                                self.i += 4;
                                let c = char::from_u32(hex).unwrap_or('\u{fffd}');
                                out.extend_from_slice(c.to_string().as_bytes());
                            }
                            _ => return Err(format!("bad escape at {}", self.i)),
                        }
                    }
                    0..=0x1f => return Err(format!("control character in string at {}", self.i)),
                    _ => out.push(b),
                }
            }
        }

        fn number(&mut self) -> Result<Value, String> {
            let start = self.i;
            while self
                .peek()
                .is_some_and(|b| b"+-.eE".contains(&b) || b.is_ascii_digit())
            {
                self.i += 1;
            }
            let text = std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?;
            text.parse()
                .map(Value::Number)
                .map_err(|_| format!("bad number {text:?}"))
        }
    }

    #[test]
    fn the_parser_is_strict() {
        assert!(parse(r#"{"a":[1,-2.5e3,true,null,"x\"\u00e9"],"b":{}}"#).is_ok());
        for bad in [
            "",
            "{",
            r#"{"a":1,}"#,
            r#"{a:1}"#,
            "[1 2]",
            r#""x"#,
            "{} x",
            "tru",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
