//! The release `batchd` binary in a child process, listening on `127.0.0.1:0`.
//!
//! The program is `CARGO_BIN_EXE_batchd` (the release build `cargo bench` makes), or
//! `BATCHD_BENCH_BIN`: another build, or a wrapper script that `exec`s it under a profiler. Its
//! address comes from its "serving" log line (a daemon older than 2f46279 logs the configured
//! address there, port 0, and cannot be used). Measuring it from outside: [`Daemon::cpu`],
//! [`Daemon::rss_kb`], [`Daemon::hwm_kb`], [`Daemon::threads`].

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::procfs::{self, CpuTime};

/// How long the daemon may take to log its address (a profiler wrapper makes start-up slow).
const START_LIMIT: Duration = Duration::from_secs(30);
/// Warnings, and the server's own start-up and shutdown lines: the "serving" line has the address.
/// A bench that wants more passes `--set {LOG_FILTER},…` (the last `--set` of a field wins).
pub const LOG_FILTER: &str = "log=warn,batchd::server=info";
/// From the first SIGTERM to the second (which stops the daemon at once), and to SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
const KILL_AFTER: Duration = Duration::from_secs(6);

/// The daemon in its own process; SIGTERM when dropped (SIGKILL if it does not exit).
pub struct Daemon {
    child: Child,
    /// The gRPC address it serves on.
    pub addr: SocketAddr,
    /// Its stderr; deleted when dropped.
    log: tempfile::TempPath,
}

impl Daemon {
    /// Starts `batchd --listen 127.0.0.1:0 ARGS` and waits until it logs the address it serves on.
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_with(args, |_| {})
    }

    /// [`Daemon::spawn`] after `edit` changes the command (its environment, say).
    pub fn spawn_with(args: &[&str], edit: impl FnOnce(&mut Command)) -> Self {
        let bin = std::env::var_os("BATCHD_BENCH_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_batchd").into());
        Self::spawn_program(&bin, args, edit)
    }

    /// [`Daemon::spawn`] of the program `bin` (another build, for interleaved pairs).
    pub fn spawn_bin(bin: &std::ffi::OsStr, args: &[&str]) -> Self {
        Self::spawn_program(bin, args, |_| {})
    }

    fn spawn_program(
        bin: &std::ffi::OsStr,
        args: &[&str],
        edit: impl FnOnce(&mut Command),
    ) -> Self {
        let log = tempfile::Builder::new()
            .prefix("batchd-bench-")
            .suffix(".log")
            .tempfile()
            .expect("creating the daemon's log file");
        let mut cmd = Command::new(bin);
        cmd.args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--set", LOG_FILTER, "--set", "shutdown_grace=1s"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("reopening the daemon's log file"));
        edit(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {bin:?}: {e}"));
        let mut daemon = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log: log.into_temp_path(),
        };
        daemon.addr = daemon.wait_serving();
        // Let the start-up allocations settle before anyone reads a baseline.
        std::thread::sleep(Duration::from_millis(100));
        daemon
    }

    /// Polls the log until a complete "serving" line names the address.
    fn wait_serving(&mut self) -> SocketAddr {
        let start = Instant::now();
        loop {
            let log = self.log_text();
            if let Some(addr) = serving_addr(&log) {
                return addr
                    .parse()
                    .unwrap_or_else(|e| panic!("batchd logged the address {addr:?}: {e}"));
            }
            if let Some(status) = self.child.try_wait().expect("waiting for batchd") {
                panic!("batchd exited with {status} before serving; its log:\n{log}");
            }
            assert!(
                start.elapsed() < START_LIMIT,
                "batchd did not log its address within {START_LIMIT:?}; its log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("a pid fits in i32")
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// VmRSS in KiB.
    pub fn rss_kb(&self) -> u64 {
        procfs::status_field(self.pid(), "VmRSS")
    }

    /// RssAnon in KiB: the heap, stacks and other private memory (VmRSS less the mapped binary and
    /// libraries, `RssFile`, and shared memory).
    pub fn rss_anon_kb(&self) -> u64 {
        procfs::status_field(self.pid(), "RssAnon")
    }

    /// VmHWM (peak RSS) in KiB.
    pub fn hwm_kb(&self) -> u64 {
        procfs::status_field(self.pid(), "VmHWM")
    }

    pub fn threads(&self) -> u64 {
        procfs::status_field(self.pid(), "Threads")
    }

    /// CPU time of the daemon so far.
    pub fn cpu(&self) -> CpuTime {
        CpuTime::of(self.pid())
    }

    fn terminate(&self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid()) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
        let start = Instant::now();
        let mut second = false;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            if start.elapsed() > STOP_GRACE && !second {
                self.terminate(); // a second signal stops the daemon at once
                second = true;
            }
            if start.elapsed() > KILL_AFTER {
                eprintln!("batchd did not exit on SIGTERM within {KILL_AFTER:?}; killing it");
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The address of the first complete "serving" line of a log, in text (`addr=…`) or JSON
/// (`"addr":"…"`) format. A copy of `tests/support/daemon.rs`'s (see the module map for why).
fn serving_addr(log: &str) -> Option<String> {
    let line = log
        .split_inclusive('\n')
        .find(|l| l.ends_with('\n') && l.contains("serving"))?;
    if let Some(addr) = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
    {
        return Some(addr.to_owned());
    }
    let rest = &line[line.find("\"addr\":\"")? + "\"addr\":\"".len()..];
    Some(rest[..rest.find('"')?].to_owned())
}
