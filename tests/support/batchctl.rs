//! The real `batchctl` binary as a child process, and the files and records of its runs.

use std::collections::{HashMap, HashSet};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use super::{wait_until, TestServer};

/// Generous deadline for anything that should happen "at once".
pub const LIVENESS: Duration = Duration::from_secs(20);

// batchctl's exit codes (README, "batchctl").
pub const EXIT_OK: i32 = 0;
pub const EXIT_NOT_OK: i32 = 1;
pub const EXIT_INPUT: i32 = 2;
pub const EXIT_UNREACHABLE: i32 = 3;
pub const EXIT_INTERRUPTED: i32 = 130;

// === the process ===

/// A thread reading a pipe to its end.
type Reader = JoinHandle<Vec<u8>>;

/// A running `batchctl`; killed if a test ends while it still runs.
pub struct Ctl {
    child: Child,
    /// stdout (when piped by [`command`]) and stderr.
    readers: Option<(Option<Reader>, Reader)>,
}

/// How a `batchctl` run ended.
#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
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

/// `batchctl args…` with no tracing variable and no `BATCHD_ENDPOINT` but those in `env`; stdin
/// null, stdout and stderr piped (change them before [`Ctl::start`] if the test needs to).
pub fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_batchctl"));
    for var in TRACE_VARS {
        cmd.env_remove(var);
    }
    cmd.args(args)
        .env_remove("BATCHD_ENDPOINT")
        .envs(env.iter().copied())
        .env("COLUMNS", "100")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

impl Ctl {
    /// Starts `batchctl args…`, feeding it `stdin` (or nothing), with no `BATCHD_ENDPOINT` set.
    pub fn spawn(args: &[&str], stdin: Option<Vec<u8>>) -> Self {
        Self::spawn_env(args, stdin, &[])
    }

    /// Like [`Ctl::spawn`], with `env` as the only tracing variables and `BATCHD_ENDPOINT`.
    pub fn spawn_env(args: &[&str], stdin: Option<Vec<u8>>, env: &[(&str, &str)]) -> Self {
        Self::start(command(args, env), stdin)
    }

    /// Starts `cmd` (from [`command`]), feeding it `stdin` (or nothing). Its piped outputs are
    /// drained all along, so batchctl never blocks on a full pipe the test did not set up itself.
    pub fn start(mut cmd: Command, stdin: Option<Vec<u8>>) -> Self {
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd.spawn().unwrap();
        if let Some(data) = stdin {
            let mut pipe = child.stdin.take().unwrap();
            // batchctl may stop reading early (--strict); a broken pipe is its business.
            std::thread::spawn(move || {
                let _ = pipe.write_all(&data);
            });
        }
        let drain = |mut pipe: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                buf
            })
        };
        let out = child
            .stdout
            .take()
            .map(|p| drain(Box::new(p) as Box<dyn Read + Send>));
        let err = drain(Box::new(child.stderr.take().unwrap()));
        Self {
            child,
            readers: Some((out, err)),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its stdin, when the command set it piped and [`Ctl::start`] was given nothing to write.
    pub fn take_stdin(&mut self) -> Option<std::process::ChildStdin> {
        self.child.stdin.take()
    }

    /// Whether batchctl has not exited yet.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends `signal` (e.g. `INT`) to batchctl.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits (at most `limit`) for batchctl to exit; returns its code and all of its output.
    pub async fn finish(mut self, limit: Duration) -> Finished {
        let child = &mut self.child;
        wait_until("batchctl exits", limit, || {
            child.try_wait().unwrap().is_some()
        })
        .await;
        let code = self.child.wait().unwrap().code();
        let (out, err) = self.readers.take().unwrap();
        let (stdout, stderr) = tokio::task::spawn_blocking(move || {
            let stdout = out.map(|r| r.join().unwrap()).unwrap_or_default();
            (stdout, err.join().unwrap())
        })
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
pub async fn batchctl(args: &[&str]) -> Finished {
    Ctl::spawn(args, None).finish(LIVENESS).await
}

/// Runs `batchctl --endpoint SERVER args…` to its end.
pub async fn against(server: &TestServer, args: &[&str]) -> Finished {
    let url = server.url();
    let mut all = vec!["--endpoint", url.as_str()];
    all.extend_from_slice(args);
    batchctl(&all).await
}

/// `--endpoint SERVER args…` as owned strings, for [`Ctl::spawn`].
pub fn with_endpoint(server: &TestServer, args: &[&str]) -> Vec<String> {
    let mut all = vec!["--endpoint".to_owned(), server.url()];
    all.extend(args.iter().map(|a| a.to_string()));
    all
}

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An endpoint that refuses connections for as long as the returned socket lives.
///
/// The socket is bound and never listens. Bound, its port cannot be handed to a parallel test
/// meanwhile (a listener bound to port 0 and dropped frees it for anyone); not listening, a connect
/// is refused at once, which is what every caller needs: "cannot reach the daemon". A listener that
/// never accepts would not do: the kernel completes handshakes into its backlog, so batchctl would
/// hang on the HTTP/2 handshake instead. No SO_REUSEADDR is set, so no other socket can share the
/// port (the listeners of other tests set it, and Linux shares a port only when both sockets do).
pub fn refused_endpoint() -> (String, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let url = format!("http://{}", socket.local_addr().unwrap());
    (url, socket)
}

// === files and records ===

/// Writes `lines` (each followed by a newline) to `dir/name`.
pub fn write_lines(dir: &Path, name: &str, lines: impl IntoIterator<Item = String>) -> PathBuf {
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
pub fn records(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad output line {l:?}: {e}")))
        .collect()
}

pub fn read_records(path: &Path) -> Vec<Value> {
    records(&std::fs::read_to_string(path).unwrap())
}

pub fn id(r: &Value) -> &str {
    r["id"].as_str().unwrap()
}

pub fn ids(records: &[Value]) -> Vec<&str> {
    records.iter().map(id).collect()
}

/// Records by id; panics on a duplicate id.
pub fn by_id(records: &[Value]) -> HashMap<&str, &Value> {
    let mut map = HashMap::new();
    for r in records {
        assert!(map.insert(id(r), r).is_none(), "two results for {}", id(r));
    }
    map
}

/// Asserts that the run wrote one result for each of `expected` and for nothing else; returns the
/// results.
pub fn assert_ran(done: &Finished, expected: &[&str]) -> Vec<Value> {
    let out = records(&done.stdout);
    assert_eq!(
        by_id(&out).keys().copied().collect::<HashSet<_>>(),
        expected.iter().copied().collect::<HashSet<_>>(),
        "the jobs that ran; stderr: {}",
        done.stderr
    );
    out
}

pub fn sleep_line(id: &str, ms: u64) -> String {
    format!(r#"{{"id":"{id}","handler":"sleep","params":{{"ms":{ms}}}}}"#)
}

pub fn echo_line(id: &str, payload: &str) -> String {
    format!(r#"{{"id":"{id}","handler":"echo","payload":"{payload}"}}"#)
}

/// A job for the `gate` handler of [`super::gated_server`].
pub fn gate_line(id: &str, payload: &str) -> String {
    format!(r#"{{"id":"{id}","handler":"gate","payload":"{payload}"}}"#)
}

/// Jobs the daemon has finished, whatever their outcome.
pub fn finished(server: &TestServer) -> u64 {
    server.stats().finished.iter().sum()
}
