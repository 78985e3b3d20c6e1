//! The real `batchd` binary as a child process: port 0, stderr captured, killed when dropped.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use batchd::proto::batch_service_client::BatchServiceClient;

use super::wait_until;

/// Generous deadline for a daemon to start, log or exit.
const LIVENESS: Duration = Duration::from_secs(30);

/// Writes `text` as `batchd.toml` in `dir`; returns its path for `--config`.
pub fn write_config(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("batchd.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A running `batchd`; killed (SIGKILL) if a test ends while it still runs.
pub struct Daemon {
    pub child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
    pub url: String,
}

impl Daemon {
    /// Starts `batchd args…` with `env` and no other `BATCHD_*` variable.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn_command(Command::new(env!("CARGO_BIN_EXE_batchd")), args, env)
    }

    /// Like [`Daemon::spawn`], with the daemon started in the cgroup v2 directory `cgroup` (a
    /// shell moves itself there, then execs batchd: the daemon's pid is the shell's).
    pub fn spawn_in_cgroup(cgroup: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", r#"echo $$ > "$0/cgroup.procs" && exec "$@""#])
            .arg(cgroup)
            .arg(env!("CARGO_BIN_EXE_batchd"));
        Self::spawn_command(cmd, args, env)
    }

    /// Starts `program args…` that runs batchd (a wrapper such as `setpriv`), as [`Daemon::spawn`].
    pub fn spawn_program(program: &str, args: &[&str]) -> Self {
        Self::spawn_command(Command::new(program), args, &[])
    }

    fn spawn_command(mut cmd: Command, args: &[&str], env: &[(&str, &str)]) -> Self {
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("BATCHD_") {
                cmd.env_remove(key);
            }
        }
        // Parallel daemons: each its own admin port.
        cmd.env("BATCHD_ADMIN_LISTEN", "127.0.0.1:0");
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut pipe = child.stderr.take().unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&stderr);
        // Drained all along, so the daemon never blocks on a full pipe.
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self {
            child,
            stderr,
            reader: Some(reader),
            url: String::new(),
        }
    }

    /// Starts `batchd --listen 127.0.0.1:0 args…` and waits until it serves; `url` is its address.
    pub async fn serving(args: &[&str]) -> Self {
        Self::serving_with(args, &[]).await
    }

    /// Starts `batchd --listen LISTEN args…` (e.g. `[::1]:7000`) and waits until it serves, or
    /// returns `None` if it exits first (its address is taken).
    pub async fn try_serving_on(listen: &str, args: &[&str]) -> Option<Self> {
        let mut all = vec!["--listen", listen];
        all.extend_from_slice(args);
        let mut daemon = Self::spawn(&all, &[]);
        let stderr = Arc::clone(&daemon.stderr);
        let child = &mut daemon.child;
        let found = tokio::time::timeout(
            LIVENESS,
            wait_until("batchd serves or exits", LIVENESS * 2, || {
                serving_addr(&String::from_utf8_lossy(&stderr.lock().unwrap())).is_some()
                    || child.try_wait().unwrap().is_some()
            }),
        )
        .await;
        let addr = serving_addr(&daemon.stderr())?;
        (found.is_ok() && daemon.running()).then(|| {
            daemon.url = format!("http://{addr}");
            daemon
        })
    }

    /// The address of its admin listener (`/metrics`), from its log.
    pub fn admin_addr(&self) -> std::net::SocketAddr {
        let log = self.stderr();
        let line = log
            .lines()
            .find(|l| l.contains("admin listener"))
            .unwrap_or_else(|| panic!("no admin listener line in\n{log}"));
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        addr.parse().unwrap()
    }

    /// [`Daemon::serving`] with `env` set.
    pub async fn serving_with(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut all = vec!["--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        Self::wait_serving(Self::spawn(&all, env)).await
    }

    /// [`Daemon::serving`] in the cgroup v2 directory `cgroup` ([`Daemon::spawn_in_cgroup`]).
    pub async fn serving_in_cgroup(cgroup: &std::path::Path, args: &[&str]) -> Self {
        let mut all = vec!["--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        Self::wait_serving(Self::spawn_in_cgroup(cgroup, &all, &[])).await
    }

    /// Waits until `daemon` logs that it serves; sets its `url`.
    async fn wait_serving(mut daemon: Self) -> Self {
        let stderr = Arc::clone(&daemon.stderr);
        let child = &mut daemon.child;
        // The whole "serving" line, with the address the kernel chose.
        let found = tokio::time::timeout(
            LIVENESS,
            wait_until("batchd logs its address", LIVENESS * 2, || {
                serving_addr(&String::from_utf8_lossy(&stderr.lock().unwrap())).is_some()
                    || child.try_wait().unwrap().is_some()
            }),
        )
        .await;
        let addr = serving_addr(&daemon.stderr());
        match (found, addr) {
            (Ok(()), Some(addr)) if daemon.running() => daemon.url = format!("http://{addr}"),
            _ => panic!("batchd does not serve; stderr:\n{}", daemon.stderr()),
        }
        daemon
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends `signal` (e.g. `TERM`) to the daemon.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits until stderr contains `text` or the daemon exits.
    pub async fn wait_for_log(&mut self, text: &str) {
        let what = format!("batchd logs {text:?}");
        let stderr = Arc::clone(&self.stderr);
        let child = &mut self.child;
        let seen = tokio::time::timeout(
            LIVENESS,
            wait_until(&what, LIVENESS * 2, || {
                String::from_utf8_lossy(&stderr.lock().unwrap()).contains(text)
                    || child.try_wait().unwrap().is_some()
            }),
        )
        .await;
        if seen.is_err() {
            panic!("timed out waiting until {what}; stderr:\n{}", self.stderr());
        }
    }

    /// Waits for the daemon to exit; returns its status once all of its stderr is read.
    pub async fn exit(&mut self) -> ExitStatus {
        let child = &mut self.child;
        let exited = tokio::time::timeout(
            LIVENESS,
            wait_until("batchd exits", LIVENESS * 2, || {
                child.try_wait().unwrap().is_some()
            }),
        )
        .await;
        if exited.is_err() {
            panic!(
                "batchd still runs after {LIVENESS:?}; stderr:\n{}",
                self.stderr()
            );
        }
        if let Some(reader) = self.reader.take() {
            tokio::task::spawn_blocking(move || reader.join().unwrap())
                .await
                .unwrap();
        }
        self.child.wait().unwrap()
    }

    pub async fn client(&self) -> BatchServiceClient<tonic::transport::Channel> {
        BatchServiceClient::connect(self.url.clone()).await.unwrap()
    }
}

/// The address of the first complete "serving" line of a log, in text (`addr=…`) or JSON
/// (`"addr":"…"`) format.
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

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
