//! The real `batchd` binary under systemd's protocols, with this test in systemd's place: sd_notify
//! over a real Unix datagram socket (`NOTIFY_SOCKET`), the watchdog variables set for the child
//! alone (`WATCHDOG_PID` is the child's own pid, set by `sh` before it execs the daemon), and socket
//! activation with real listening sockets passed as fds 3 and 4 (`LISTEN_FDS`, `LISTEN_PID`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::net::UnixDatagram;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Generous bound on anything the daemon should do promptly (busy CI machines).
const LIVENESS: Duration = Duration::from_secs(30);

/// The watchdog interval the tests give the daemon: pings are due every 300 ms.
const WATCHDOG: Duration = Duration::from_millis(600);

/// systemd's side of sd_notify: a datagram socket in a temporary directory.
struct NotifySocket {
    socket: UnixDatagram,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        Self {
            socket,
            path,
            _dir: dir,
        }
    }

    fn env(&self) -> (String, String) {
        ("NOTIFY_SOCKET".into(), self.path.display().to_string())
    }

    /// The next message and when it came, or `None` after `limit` of silence.
    async fn next(&self, limit: Duration) -> Option<(Instant, String)> {
        let mut buf = vec![0; 4096];
        let n = tokio::time::timeout(limit, self.socket.recv(&mut buf))
            .await
            .ok()?
            .unwrap();
        Some((
            Instant::now(),
            String::from_utf8_lossy(&buf[..n]).into_owned(),
        ))
    }

    /// Messages up to and including the first that contains `line`; panics after `limit`.
    async fn until(&self, line: &str, limit: Duration) -> Vec<(Instant, String)> {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(msg) = self.next(left).await else {
                panic!("no {line:?} within {limit:?}; got {seen:?}");
            };
            let done = msg.1.lines().any(|l| l.starts_with(line));
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }
}

/// Whether a message holds the line `line` (e.g. `WATCHDOG=1`).
fn has(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l.starts_with(line))
}

/// A running `batchd`, started through `sh` so that the `$$` of its variables is its own pid.
struct Batchd {
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// While set, stderr is not read: the pipe fills and the daemon's log writes block.
    stop_reading: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl Batchd {
    /// Starts `batchd args…`; `vars` may use `$$` (the daemon's pid), `fds` become fds 3, 4, ….
    fn start(args: &[&str], env: &[(String, String)], vars: &str, fds: Vec<OwnedFd>) -> Self {
        assert!(fds.len() <= 2, "stdin and stdout carry at most two fds");
        // stdin → 3 and stdout → 4, then the real stdin and stdout are /dev/null again.
        let moves = match fds.len() {
            0 => "",
            1 => "exec 3<&0 </dev/null; ",
            _ => "exec 3<&0 4>&1 </dev/null >/dev/null; ",
        };
        let script = format!("{moves}{vars} exec \"$@\"");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .arg("sh")
            .arg(env!("CARGO_BIN_EXE_batchd"))
            .args(args);
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("BATCHD_")
                || key.starts_with("LISTEN_")
                || key.starts_with("WATCHDOG_")
                || key == "NOTIFY_SOCKET"
            {
                cmd.env_remove(&*key);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let mut fds = fds.into_iter();
        cmd.stdin(fds.next().map_or_else(Stdio::null, Stdio::from));
        cmd.stdout(fds.next().map_or_else(Stdio::null, Stdio::from));
        cmd.stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut pipe = child.stderr.take().unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stop_reading = Arc::new(AtomicBool::new(false));
        let (sink, stop) = (Arc::clone(&stderr), Arc::clone(&stop_reading));
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            loop {
                if stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                match pipe.read(&mut buf) {
                    Ok(n @ 1..) => sink.lock().unwrap().extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
        });
        Self {
            child,
            stderr,
            stop_reading,
            reader: Some(reader),
        }
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// The gRPC address from the daemon's "serving" log line.
    async fn addr(&self) -> SocketAddr {
        let deadline = Instant::now() + LIVENESS;
        loop {
            let log = self.stderr();
            let found = log
                .lines()
                .filter(|l| l.contains("serving"))
                .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")));
            if let Some(addr) = found {
                return addr.parse().unwrap();
            }
            assert!(Instant::now() < deadline, "no serving line; stderr:\n{log}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name}");
    }

    async fn exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + LIVENESS;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.stop_reading.store(false, Ordering::SeqCst);
                if let Some(reader) = self.reader.take() {
                    reader.join().unwrap();
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "batchd still runs; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Names of the daemon's threads.
    fn threads(&self) -> Vec<String> {
        let dir = format!("/proc/{}/task", self.child.id());
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|c| c.trim().to_owned())
            .collect()
    }
}

impl Drop for Batchd {
    fn drop(&mut self) {
        self.stop_reading.store(false, Ordering::SeqCst);
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn health(addr: SocketAddr, service: &str) -> Result<ServingStatus, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = HealthClient::new(channel);
    let res = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?;
    Ok(res.into_inner().status())
}

fn watchdog_env(notify: &NotifySocket) -> Vec<(String, String)> {
    vec![
        notify.env(),
        ("WATCHDOG_USEC".into(), WATCHDOG.as_micros().to_string()),
    ]
}

const PORT_0: &[&str] = &["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_once_serving_then_pings_at_half_the_interval_and_stopping_on_sigterm() {
    let notify = NotifySocket::bind();
    let mut daemon = Batchd::start(
        PORT_0,
        &watchdog_env(&notify),
        "export WATCHDOG_PID=$$;",
        vec![],
    );
    let (_, first) = notify.next(LIVENESS).await.expect("a first message");
    assert!(has(&first, "READY=1"), "READY first: {first:?}");
    assert!(has(&first, "STATUS=serving: 0 calls"), "{first:?}");
    // READY means the port accepts and serves.
    let addr = daemon.addr().await;
    TcpStream::connect(addr).expect("the port accepts once READY");
    assert_eq!(health(addr, "").await.unwrap(), ServingStatus::Serving);

    // Pings that came while the test was busy above were not timed on arrival: drop them.
    while notify.next(Duration::from_millis(1)).await.is_some() {}
    let mut pings = Vec::new();
    while pings.len() < 8 {
        let (at, msg) = notify.next(LIVENESS).await.expect("pings");
        assert!(!has(&msg, "READY=1") && !has(&msg, "STOPPING=1"), "{msg:?}");
        if has(&msg, "WATCHDOG=1") {
            pings.push(at);
        }
    }
    let mut gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort();
    let half = WATCHDOG / 2;
    // The typical gap is half the interval; none is much shorter (the receiving end may read one
    // late and the next on time), and a loaded machine may delay a few, not most.
    let median = gaps[gaps.len() / 2];
    assert!(gaps[0] >= half / 2, "gaps {gaps:?}");
    assert!(
        median >= half * 8 / 10 && median < half * 3 / 2,
        "gaps {gaps:?}"
    );

    daemon.signal("TERM");
    let seen = notify.until("STOPPING=1", LIVENESS).await;
    let stopping = seen.last().unwrap();
    assert!(has(&stopping.1, "STATUS=draining"), "{stopping:?}");
    // Nothing more pings after STOPPING, until the daemon is gone.
    while let Some((_, msg)) = notify.next(WATCHDOG).await {
        assert!(!has(&msg, "WATCHDOG=1"), "a ping after STOPPING: {msg:?}");
    }
    assert!(daemon.exit().await.success(), "{}", daemon.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watchdog_meant_for_another_process_gets_no_pings() {
    let notify = NotifySocket::bind();
    // systemd sets WATCHDOG_PID to the main process; here that is pid 1, not the daemon.
    let mut env = watchdog_env(&notify);
    env.push(("WATCHDOG_PID".into(), "1".into()));
    let mut daemon = Batchd::start(PORT_0, &env, "", vec![]);
    let (_, first) = notify.next(LIVENESS).await.expect("READY");
    assert!(has(&first, "READY=1"), "{first:?}");
    while let Some((_, msg)) = notify.next(WATCHDOG * 3).await {
        assert!(!has(&msg, "WATCHDOG=1"), "{msg:?}");
    }
    daemon.signal("TERM");
    notify.until("STOPPING=1", LIVENESS).await;
    assert!(daemon.exit().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_systemd_there_is_no_notifier_at_all() {
    // The watchdog variables alone (no NOTIFY_SOCKET) start nothing.
    let env = vec![("WATCHDOG_USEC".into(), WATCHDOG.as_micros().to_string())];
    let mut daemon = Batchd::start(PORT_0, &env, "export WATCHDOG_PID=$$;", vec![]);
    let addr = daemon.addr().await;
    assert_eq!(health(addr, "").await.unwrap(), ServingStatus::Serving);
    let threads = daemon.threads();
    assert!(
        !threads.iter().any(|t| t.contains("sd-notify")),
        "{threads:?}"
    );
    assert!(
        !daemon.stderr().contains("sd_notify"),
        "{}",
        daemon.stderr()
    );
    daemon.signal("TERM");
    assert!(daemon.exit().await.success());
}

/// A real wedge: the daemon logs every frame (`log=trace`) to a stderr pipe that stops being read,
/// as when journald or a log shipper stalls. Its threads block in write(2), the engine no longer
/// runs, and the pings must stop, though the notifier's own thread is free to go on; once the
/// pipe is read again the engine recovers and the pings resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_engine_gets_no_pings_until_it_makes_progress_again() {
    let notify = NotifySocket::bind();
    let mut args = PORT_0.to_vec();
    args.extend(["--set", "log=trace", "--set", "stall_timeout=500ms"]);
    let mut daemon = Batchd::start(
        &args,
        &watchdog_env(&notify),
        "export WATCHDOG_PID=$$;",
        vec![],
    );
    notify.until("READY=1", LIVENESS).await;
    let addr = daemon.addr().await;
    notify.until("WATCHDOG=1", LIVENESS).await;

    daemon.stop_reading.store(true, Ordering::SeqCst);
    // Calls make the daemon log until its stderr pipe is full; then each thread that logs blocks,
    // and calls keep coming until every runtime thread has (bounded: a few hundred calls).
    let load = tokio::spawn(async move {
        for _ in 0..300 {
            let _ = tokio::time::timeout(Duration::from_millis(200), health(addr, "")).await;
        }
    });
    let seen = notify.until("STATUS=wedged", LIVENESS).await;
    load.abort();
    let (wedged_at, msg) = seen.last().unwrap().clone();
    assert!(msg.contains("watchdog pings stopped"), "{msg:?}");
    // Several intervals without a single ping.
    while let Some((at, msg)) = notify.next(WATCHDOG * 3).await {
        assert!(!has(&msg, "WATCHDOG=1"), "a ping while wedged: {msg:?}");
        assert!(at - wedged_at < LIVENESS, "messages keep coming: {msg:?}");
    }

    daemon.stop_reading.store(false, Ordering::SeqCst);
    notify.until("WATCHDOG=1", LIVENESS).await;
    notify.until("STATUS=serving", LIVENESS).await;
    assert_eq!(health(addr, "").await.unwrap(), ServingStatus::Serving);
    daemon.signal("TERM");
    assert!(daemon.exit().await.success());
}

/// Reads one HTTP/2 frame header from `stream`; returns its type.
fn frame_type(stream: &mut TcpStream) -> u8 {
    let mut header = [0u8; 9];
    stream.read_exact(&mut header).unwrap();
    header[3]
}

/// An HTTP/1.1 GET of the admin `path`; returns the status line.
fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(LIVENESS)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: batchd\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_serves_the_passed_sockets_and_a_restart_loses_no_connection() {
    let grpc = TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").unwrap();
    let (grpc_addr, admin_addr) = (grpc.local_addr().unwrap(), admin.local_addr().unwrap());
    // The configured addresses are the passed sockets' own: binding them again would fail.
    let listen = grpc_addr.to_string();
    let admin_listen = admin_addr.to_string();
    let args = [
        "--listen",
        listen.as_str(),
        "--admin-listen",
        admin_listen.as_str(),
    ];
    let vars = "export LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=grpc:admin;";
    let pass = || {
        vec![
            OwnedFd::from(grpc.try_clone().unwrap()),
            OwnedFd::from(admin.try_clone().unwrap()),
        ]
    };

    let mut first = Batchd::start(&args, &[], vars, pass());
    let ok = tokio::time::timeout(LIVENESS, async {
        loop {
            if let Ok(status) = health(grpc_addr, "batchd.v1.BatchService").await {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no answer on the passed socket; {}", first.stderr()));
    assert_eq!(ok, ServingStatus::Serving);
    assert_eq!(http_get(admin_addr, "/healthz"), "HTTP/1.1 200 OK");
    assert!(
        first.stderr().contains("socket activation"),
        "{}",
        first.stderr()
    );
    first.signal("TERM");
    assert!(first.exit().await.success(), "{}", first.stderr());

    // The daemon is down, the socket is not: a client connects and speaks first.
    let mut early = TcpStream::connect(grpc_addr).expect("the backlog takes the connection");
    early.set_read_timeout(Some(LIVENESS)).unwrap();
    early
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .unwrap();

    let mut second = Batchd::start(&args, &[], vars, pass());
    // The restarted daemon answers that connection with its SETTINGS frame.
    assert_eq!(frame_type(&mut early), 0x4, "{}", second.stderr());
    assert_eq!(health(grpc_addr, "").await.unwrap(), ServingStatus::Serving);
    second.signal("TERM");
    assert!(second.exit().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_socket_that_does_not_listen_is_refused() {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let vars = "export LISTEN_PID=$$ LISTEN_FDS=1;";
    let mut daemon = Batchd::start(PORT_0, &[], vars, vec![OwnedFd::from(udp)]);
    let status = daemon.exit().await;
    assert_eq!(status.code(), Some(1), "{}", daemon.stderr());
    assert!(
        daemon.stderr().contains("is not a listening TCP socket"),
        "{}",
        daemon.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_makes_progress_asks_for_more_time() {
    use batchd::proto::batch_service_client::BatchServiceClient;
    use batchd::proto::{Job, JobBatch};

    let notify = NotifySocket::bind();
    let mut daemon = Batchd::start(
        PORT_0,
        &watchdog_env(&notify),
        "export WATCHDOG_PID=$$;",
        vec![],
    );
    notify.until("READY=1", LIVENESS).await;
    let addr = daemon.addr().await;
    let mut client = BatchServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    // Jobs ending one after another over 2.4 s: the drain advances at every status tick (300 ms).
    let jobs = (1..=8)
        .map(|i| Job {
            id: i.to_string(),
            handler: "sleep".into(),
            params: [("ms".to_owned(), (300 * i).to_string())].into(),
            ..Job::default()
        })
        .collect();
    let mut results = client
        .run_batch(JobBatch {
            batch_id: "drain".into(),
            jobs,
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(LIVENESS, results.message())
        .await
        .unwrap()
        .unwrap()
        .expect("the first result");
    daemon.signal("TERM");

    let mut stopping = false;
    let mut extends = Vec::new();
    let deadline = Instant::now() + LIVENESS;
    while daemon.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "batchd does not exit");
        let Some((_, msg)) = notify.next(Duration::from_millis(100)).await else {
            continue;
        };
        stopping |= has(&msg, "STOPPING=1");
        if let Some(v) = msg
            .lines()
            .find_map(|l| l.strip_prefix("EXTEND_TIMEOUT_USEC="))
        {
            assert!(stopping, "EXTEND_TIMEOUT_USEC before STOPPING: {msg:?}");
            assert!(has(&msg, "STATUS=draining: "), "{msg:?}");
            extends.push(v.parse::<u64>().unwrap());
        }
    }
    assert!(stopping, "no STOPPING=1");
    assert!(
        !extends.is_empty(),
        "the drain advanced but asked for no time"
    );
    // Three status ticks of 300 ms: longer than the wait for the next one.
    assert!(extends.iter().all(|&us| us == 900_000), "{extends:?}");

    // The drain let every job finish.
    let mut done = first.results.len();
    while let Some(msg) = results.message().await.unwrap() {
        done += msg.results.len();
    }
    assert_eq!(done, 8);
    assert!(daemon.exit().await.success(), "{}", daemon.stderr());
}
