//! For the `batchctl map` tests: the real `batchctl` binary as a process, files, digests, a handler
//! that shows its params, and the `--help` snapshots (`UPDATE_SNAPSHOTS=1` rewrites them).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use batchd::handlers::{Handler, HandlerError, JobContext, JobInput};
use batchd::Registry;
use bytes::Bytes;
use sha2::Digest as _;

use super::{wait_until, TestServer};

/// Generous deadline for anything that should happen "at once".
pub const LIVENESS: Duration = Duration::from_secs(30);

pub const EXIT_OK: i32 = 0;
pub const EXIT_NOT_OK: i32 = 1;
pub const EXIT_INPUT: i32 = 2;
pub const EXIT_INTERRUPTED: i32 = 130;

/// Variables that would change batchctl's tracing or endpoint: removed unless a test sets them.
const CLEARED: [&str; 9] = [
    "BATCHD_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SDK_DISABLED",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "TRACEPARENT",
    "TRACESTATE",
];

/// What a pipe gave so far, and the thread reading it to its end.
struct Drained {
    buf: Arc<Mutex<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
}

/// A running `batchctl`; killed if a test ends while it still runs.
pub struct Ctl {
    pub child: Child,
    stdout: Drained,
    stderr: Drained,
}

/// How a `batchctl` run ended.
#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ctl {
    /// Starts `batchctl --endpoint URL args…` in `cwd`, feeding it `stdin` (or nothing).
    pub fn spawn(url: &str, cwd: &Path, args: &[&str], stdin: Option<Vec<u8>>) -> Self {
        Self::spawn_env(url, cwd, args, stdin, &[])
    }

    /// Like [`Ctl::spawn`], with `env` set.
    pub fn spawn_env(
        url: &str,
        cwd: &Path,
        args: &[&str],
        stdin: Option<Vec<u8>>,
        env: &[(&str, &str)],
    ) -> Self {
        let mut ctl = Self::start(url, cwd, args, stdin.is_some(), env);
        if let Some(data) = stdin {
            let mut pipe = ctl.child.stdin.take().unwrap();
            // batchctl may stop reading early (--strict); a broken pipe is its business.
            std::thread::spawn(move || {
                let _ = pipe.write_all(&data);
            });
        }
        ctl
    }

    fn start(url: &str, cwd: &Path, args: &[&str], piped: bool, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_batchctl"));
        for var in CLEARED {
            cmd.env_remove(var);
        }
        cmd.arg("--endpoint")
            .arg(url)
            .args(args)
            .current_dir(cwd)
            .envs(env.iter().copied())
            .env("COLUMNS", "100")
            .stdin(if piped { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        // Drained all along, so batchctl never blocks on a full pipe.
        let drain = |mut pipe: Box<dyn Read + Send>| {
            let buf = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&buf);
            let thread = std::thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                    sink.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            });
            Drained {
                buf,
                thread: Some(thread),
            }
        };
        let stdout = drain(Box::new(child.stdout.take().unwrap()));
        let stderr = drain(Box::new(child.stderr.take().unwrap()));
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// What batchctl wrote on stdout so far.
    pub fn stdout_so_far(&self) -> String {
        String::from_utf8_lossy(&self.stdout.buf.lock().unwrap()).into_owned()
    }

    /// What batchctl wrote on stderr so far.
    pub fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&self.stderr.buf.lock().unwrap()).into_owned()
    }

    /// Like [`Ctl::spawn`], with stdin a pipe the test holds open (and may write to).
    pub fn spawn_open_stdin(
        url: &str,
        cwd: &Path,
        args: &[&str],
    ) -> (Self, std::process::ChildStdin) {
        let mut ctl = Self::start(url, cwd, args, true, &[]);
        let stdin = ctl.child.stdin.take().unwrap();
        (ctl, stdin)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
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

    /// batchctl's `/proc/PID/status` field `key` (e.g. `VmHWM:`) in KiB, while it runs.
    pub fn status_kib(&self, key: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }

    /// Whether batchctl has exited (it is not reaped until [`Ctl::finish`]).
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// Waits (at most `limit`) for batchctl to exit; returns its code and all of its output.
    pub async fn finish(mut self, limit: Duration) -> Finished {
        let child = &mut self.child;
        wait_until("batchctl exits", limit, || {
            child.try_wait().unwrap().is_some()
        })
        .await;
        let code = self.child.wait().unwrap().code();
        let threads = [self.stdout.thread.take(), self.stderr.thread.take()];
        tokio::task::spawn_blocking(move || {
            for t in threads.into_iter().flatten() {
                t.join().unwrap();
            }
        })
        .await
        .unwrap();
        let text = |d: &Drained| String::from_utf8(d.buf.lock().unwrap().clone()).expect("UTF-8");
        Finished {
            code,
            stdout: text(&self.stdout),
            stderr: text(&self.stderr),
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

/// Runs `batchctl --endpoint SERVER args…` in `cwd` to its end.
pub async fn map_in(server: &TestServer, cwd: &Path, args: &[&str]) -> Finished {
    Ctl::spawn(&server.url(), cwd, args, None)
        .finish(LIVENESS)
        .await
}

/// Like [`map_in`], feeding `stdin`.
pub async fn map_stdin(server: &TestServer, cwd: &Path, args: &[&str], stdin: &[u8]) -> Finished {
    Ctl::spawn(&server.url(), cwd, args, Some(stdin.to_vec()))
        .finish(LIVENESS)
        .await
}

/// The summary line (batchctl's last line on stderr).
pub fn summary(done: &Finished) -> &str {
    done.stderr.lines().last().unwrap_or_default()
}

/// Writes `bytes` to `dir/name` (directories made); returns the path.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    path
}

/// `n` bytes that differ from file to file (`seed`).
pub fn content(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The SHA-256 digest of `bytes`, by the `sha2` crate.
pub fn sha256(bytes: &[u8]) -> Vec<u8> {
    sha2::Sha256::digest(bytes).to_vec()
}

/// Every file below `dir`, relative to it, sorted.
pub fn files_below(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let path = e.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// JSON Lines, parsed.
pub fn records(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

// === a handler that shows what it got ===

/// Returns `{"params": {…}, "len": N}`: the job's params and its payload's length.
pub struct ShowParams;

#[async_trait::async_trait]
impl Handler for ShowParams {
    fn description(&self) -> &str {
        "test: returns the job's params and payload length as JSON"
    }

    async fn run(
        self: std::sync::Arc<Self>,
        input: JobInput,
        _ctx: JobContext,
    ) -> Result<Bytes, HandlerError> {
        let params: std::collections::BTreeMap<_, _> = input.params.into_iter().collect();
        let json = serde_json::json!({ "params": params, "len": input.payload.len() });
        Ok(json.to_string().into())
    }
}

/// A server with the builtin handlers and `params` ([`ShowParams`]).
pub fn server_with_params() -> TestServer {
    let mut registry = Registry::builtin();
    registry.register("params", ShowParams);
    TestServer::start_with(|_| {}, registry)
}

// === --help snapshots ===

/// Compares `actual` with `tests/snapshots/NAME`, or rewrites it when `UPDATE_SNAPSHOTS=1`.
pub fn check_snapshot(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(name);
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some_and(|v| v == "1") {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read the snapshot {}: {e}\n(UPDATE_SNAPSHOTS=1 cargo test --test map creates it)",
            path.display()
        )
    });
    if expected != actual {
        let (old, new): (Vec<&str>, Vec<&str>) =
            (expected.lines().collect(), actual.lines().collect());
        let first = old
            .iter()
            .zip(&new)
            .position(|(a, b)| a != b)
            .unwrap_or(old.len().min(new.len()));
        panic!(
            "the output differs from the snapshot {} from line {} on (UPDATE_SNAPSHOTS=1 rewrites \
             it):\n- {}\n+ {}",
            path.display(),
            first + 1,
            old.get(first).unwrap_or(&"(end)"),
            new.get(first).unwrap_or(&"(end)"),
        );
    }
}
