//! Exec handlers with real processes: process trees gone when their call goes away, timeouts, large
//! payloads, output caps, exit status and stderr, params that never reach a shell, SIGKILL after
//! kill_grace, a `kill -9`ed daemon, shutdown, config errors and spawn failures.
//!
//! Processes are found through /proc: each test's commands carry a unique `BATCHD_TEST_MARK`
//! variable (inherited by everything they start), and a process group is "gone" when none of its
//! processes runs any more. This sandbox's PID 1 does not reap orphans, so grandchildren whose
//! parent died stay zombies here: zombies count as gone, except the direct child, which batchd
//! itself must reap.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use batchd::config::{ByteSize, Config, ExecSpec};
use batchd::handlers::exec::{self, Reaper, MAX_KILL_GRACE};
use batchd::proto::{self, Outcome};
use batchd::Registry;
use support::daemon::{write_config, Daemon};
use support::{batch, cancel, job, outcome, run_batch_on, wait_until, OpenCall, TestServer};

/// Generous deadline for anything that should happen "at once", even on a busy machine.
const LIVENESS: Duration = Duration::from_secs(30);
/// The environment variable that marks a test's processes.
const MARK: &str = "BATCHD_TEST_MARK";
const MIB: usize = 1024 * 1024;

// === processes, from /proc ===

/// One process as /proc/PID/stat shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Proc {
    pid: i32,
    ppid: i32,
    pgid: i32,
    state: char,
    /// Start time in ticks since boot: tells a process from a later one with the same pid.
    start: u64,
}

impl Proc {
    fn read(pid: i32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) is in parentheses and may contain anything: split after it.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        Some(Self {
            pid,
            state: f[0].chars().next()?,
            ppid: f[1].parse().ok()?,
            pgid: f[2].parse().ok()?,
            start: f[19].parse().ok()?,
        })
    }

    fn all() -> Vec<Self> {
        pids().into_iter().filter_map(Self::read).collect()
    }

    /// Still running (a zombie is not).
    fn is_live(&self) -> bool {
        self.state != 'Z' && self.state != 'X'
    }

    /// This very process is still running.
    fn still_live(&self) -> bool {
        Self::read(self.pid).is_some_and(|p| p.start == self.start && p.is_live())
    }

    /// This very process is gone entirely: exited and reaped.
    fn reaped(&self) -> bool {
        Self::read(self.pid).is_none_or(|p| p.start != self.start)
    }
}

/// The pids in /proc.
fn pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Running processes whose environment carries `mark`.
///
/// The environment is read before the state: a command shows the mark only once it has exec'd, so
/// the state read after that is from after its fork's child joined its process group (read the
/// other way round, it can be from before, a race that a busy machine makes likely).
fn marked(mark: &str) -> Vec<Proc> {
    let needle = format!("{MARK}={mark}\0");
    pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.windows(needle.len()).any(|w| w == needle.as_bytes()))
        })
        .filter_map(Proc::read)
        .filter(Proc::is_live)
        .collect()
}

/// Running processes of the process group `pgid`.
fn group_live(pgid: i32) -> Vec<Proc> {
    Proc::all()
        .into_iter()
        .filter(|p| p.pgid == pgid && p.is_live())
        .collect()
}

/// A mark no other test uses.
fn unique_mark(name: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Waits until `n` marked processes run, all in one process group led by one of them; returns them
/// with the leader first.
async fn wait_for_tree(mark: &str, n: usize) -> Vec<Proc> {
    let mut procs = Vec::new();
    wait_until(
        &format!("{n} processes marked {mark} run"),
        LIVENESS,
        || {
            procs = marked(mark);
            procs.len() == n
        },
    )
    .await;
    procs.sort_by_key(|p| p.pid != p.pgid);
    let leader = procs[0];
    assert_eq!(
        leader.pid, leader.pgid,
        "the command leads its group: {procs:?}"
    );
    assert!(procs.iter().all(|p| p.pgid == leader.pgid), "{procs:?}");
    procs
}

/// Waits until nothing of the group `tree` (from [`wait_for_tree`]) runs and its leader is reaped.
async fn wait_tree_gone(tree: &[Proc], what: &str) -> Duration {
    let start = Instant::now();
    let pgid = tree[0].pgid;
    wait_until(what, LIVENESS, || {
        group_live(pgid).is_empty() && tree.iter().all(|p| !p.still_live())
    })
    .await;
    let gone = start.elapsed();
    wait_until("the command is reaped", LIVENESS, || tree[0].reaped()).await;
    gone
}

/// Whether `pid` is a child of this process that exited and was not reaped: batchd spawns commands
/// from this process, so that is a leader it failed to reap. (A reused pid is not a zombie of ours.)
fn unreaped_child(pid: i32) -> bool {
    Proc::read(pid).is_some_and(|p| !p.is_live() && p.ppid == std::process::id() as i32)
}

/// Waits until the file at `path` has every line of `want`.
async fn wait_for_lines(path: &std::path::Path, want: &[&str]) {
    let what = format!("{} has the lines {want:?}", path.display());
    wait_until(&what, LIVENESS, || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        want.iter().all(|w| text.lines().any(|l| l == *w))
    })
    .await;
}

// === servers and jobs ===

/// A spec whose processes carry `mark`.
fn spec(name: &str, command: &[&str], mark: &str) -> ExecSpec {
    let mut s = ExecSpec::new(name, command);
    s.env.insert(MARK.into(), mark.into());
    s
}

/// An in-process daemon with the built-in handlers and `specs`.
fn start(specs: Vec<ExecSpec>, edit: impl FnOnce(&mut Config)) -> (TestServer, Reaper) {
    let mut registry = Registry::builtin();
    let reaper = exec::register(&mut registry, &specs).unwrap();
    let server = TestServer::start_with(
        |c| {
            c.exec = specs;
            edit(c);
        },
        registry,
    );
    (server, reaper)
}

/// [`run_batch_on`] on a client for messages of up to 256 MiB; the call ends within 3 × LIVENESS.
async fn run(
    server: &TestServer,
    jobs: Vec<proto::Job>,
) -> std::collections::HashMap<String, proto::JobResult> {
    let mut client = server.client_with_limit(256 * MIB).await;
    run_batch_on(&mut client, jobs, LIVENESS * 3).await
}

fn with_timeout(mut j: proto::Job, t: Duration) -> proto::Job {
    j.timeout = Some(prost_types::Duration::try_from(t).unwrap());
    j
}

/// The batchd binary serving with `config`, written to `dir`, as its config file.
async fn serving_with_config(dir: &tempfile::TempDir, config: &str) -> Daemon {
    let path = write_config(dir, config);
    Daemon::serving(&["--config", path.to_str().unwrap()]).await
}

/// Waits until the reaper has nothing left to do.
async fn wait_reaper_idle(reaper: &Reaper) {
    wait_until("the reaper is idle", LIVENESS, || {
        reaper.live_groups() == 0 && reaper.pending_kills() == 0
    })
    .await;
}

// === the process tree goes with its job ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_is_gone_once_its_call_is_dropped() {
    let mark = unique_mark("tree");
    let mut s = spec("tree", &["sh", "-c", "sleep 60 & sleep 60 & wait"], &mark);
    // Longer than the deadline below: the tree must go on SIGTERM, sent when the job is dropped.
    s.kill_grace = MAX_KILL_GRACE;
    let (server, _reaper) = start(vec![s], |_| {});
    let mut client = server.client().await;
    let call = OpenCall::open(&mut client).await;
    call.send(batch("b", vec![job("t", "tree", b"", &[])]))
        .await;
    let tree = wait_for_tree(&mark, 3).await;

    drop(call);
    let gone = wait_tree_gone(&tree, "the tree is gone after the call was dropped").await;
    eprintln!("tree of 3 gone {gone:?} after the call was dropped");
    wait_until("the job's slot is free", LIVENESS, || {
        server.stats().jobs_running == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_jobs_kills_the_tree() {
    let mark = unique_mark("cancel");
    let s = spec("tree", &["sh", "-c", "sleep 60 & sleep 60 & wait"], &mark);
    let (server, reaper) = start(vec![s], |_| {});
    let mut call = server.open_call().await;
    call.send(batch("b", vec![job("t", "tree", b"", &[])]))
        .await;
    let tree = wait_for_tree(&mark, 3).await;

    call.send(cancel("b", &["t"])).await;
    let r = call.results(1, LIVENESS).await;
    assert_eq!(outcome(&r[0]), Outcome::Cancelled, "{r:?}");
    wait_tree_gone(&tree, "the tree is gone after CancelJobs").await;
    wait_reaper_idle(&reaper).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_kill_the_tree() {
    // Each tree says that it is complete (both sleeps started) in a file of its own, named by its
    // mark and its leader's pid: the test reads that after the timeout rather than having to catch
    // the tree running before it, so how soon the test gets to look does not matter.
    let dir = tempfile::tempdir().unwrap();
    let tree = format!("sleep 60 & sleep 60 & echo started > \"${MARK}.$$\"; wait");
    // Long enough for the trees to start even on a loaded machine; the three jobs run at once.
    let timeout = Duration::from_secs(5);
    let mark = unique_mark("timeout");
    let mut job_timeout = spec("tree", &["sh", "-c", &tree], &mark);
    job_timeout.cwd = Some(dir.path().to_owned());
    let mark2 = unique_mark("handler-timeout");
    let mut own_timeout = spec("slow", &["sh", "-c", &tree], &mark2);
    own_timeout.timeout = timeout;
    own_timeout.cwd = Some(dir.path().to_owned());
    let (server, reaper) = start(vec![job_timeout, own_timeout], |_| {});

    let results = run(
        &server,
        vec![
            // The job's own timeout.
            with_timeout(job("t", "tree", b"", &[]), timeout),
            // The handler's timeout is the default of a job that sets none, and the cap of one
            // that does.
            job("s", "slow", b"", &[]),
            with_timeout(job("s2", "slow", b"", &[]), Duration::from_secs(3600)),
        ],
    )
    .await;
    for id in ["t", "s", "s2"] {
        let r = &results[id];
        assert_eq!(outcome(r), Outcome::TimedOut, "{r:?}");
        assert!(r.error.contains("timed out after 5s"), "{id}: {}", r.error);
    }

    // Every tree ran; now nothing of any runs, and batchd reaped each leader.
    let leaders = |mark: &str| -> Vec<i32> {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                name.strip_prefix(&format!("{mark}."))?.parse().ok()
            })
            .collect()
    };
    let (trees, trees2) = (leaders(&mark), leaders(&mark2));
    assert_eq!(
        (trees.len(), trees2.len()),
        (1, 2),
        "every tree ran before its timeout: {trees:?} {trees2:?}"
    );
    wait_until("nothing of the trees runs", LIVENESS, || {
        marked(&mark).is_empty() && marked(&mark2).is_empty()
    })
    .await;
    wait_until("the leaders are reaped", LIVENESS, || {
        trees.iter().chain(&trees2).all(|&pid| !unreaped_child(pid))
    })
    .await;
    wait_reaper_idle(&reaper).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_ignores_sigterm_gets_it_first_and_runs_on_within_kill_grace() {
    // With the longest kill_grace, the tree must still run for a minute after the cancel: however
    // slowly the test gets to look, it sees the tree after SIGTERM and before SIGKILL. The shells of
    // the tree (the leader and its child) log the SIGTERM they trap; the sleep ignores it.
    let dir = tempfile::tempdir().unwrap();
    let mark = unique_mark("patient");
    // The child shell ignores SIGTERM while it starts the sleep, which goes on ignoring it, then
    // traps it. Each shell says it is ready once its trap is set.
    let child = concat!(
        r#"trap "" TERM; sleep 60 & "#,
        r#"trap "echo child TERM >> log" TERM; echo child ready >> log; wait; wait"#,
    );
    let script = format!(
        "trap 'echo leader TERM >> log' TERM; sh -c '{child}' & echo leader ready >> log; wait; wait"
    );
    let mut s = spec("patient", &["sh", "-c", &script], &mark);
    s.kill_grace = MAX_KILL_GRACE;
    s.cwd = Some(dir.path().to_owned());
    let (server, reaper) = start(vec![s], |_| {});
    let mut call = server.open_call().await;
    call.send(batch("b", vec![job("t", "patient", b"", &[])]))
        .await;
    let tree = wait_for_tree(&mark, 3).await;
    let log = dir.path().join("log");
    wait_for_lines(&log, &["leader ready", "child ready"]).await;

    call.send(cancel("b", &["t"])).await;
    let r = call.results(1, LIVENESS).await;
    assert_eq!(outcome(&r[0]), Outcome::Cancelled, "{r:?}");
    // SIGTERM reached the group when the job ended; nothing of the tree dies of it, and SIGKILL
    // waits for kill_grace.
    wait_for_lines(&log, &["leader TERM", "child TERM"]).await;
    assert!(
        tree.iter().all(Proc::still_live),
        "the tree outlives SIGTERM and kill_grace has not passed: {tree:?}"
    );
    assert_eq!(
        (reaper.live_groups(), reaper.pending_kills()),
        (1, 1),
        "the group's kill task waits out kill_grace"
    );

    // Rather than wait a minute: SIGKILL to every group at once.
    assert_eq!(reaper.kill_all(), 1);
    wait_tree_gone(&tree, "the tree is gone after kill_all").await;
    assert_eq!(reaper.live_groups(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_ignores_sigterm_is_sigkilled_after_kill_grace() {
    let mark = unique_mark("trap");
    let grace = Duration::from_secs(2);
    let mut s = spec(
        "stubborn",
        &["sh", "-c", "trap '' TERM; sleep 60 & wait; wait"],
        &mark,
    );
    s.kill_grace = grace;
    let (server, reaper) = start(vec![s], |_| {});
    let mut call = server.open_call().await;
    call.send(batch("b", vec![job("t", "stubborn", b"", &[])]))
        .await;
    let tree = wait_for_tree(&mark, 2).await;

    let cancelled_at = Instant::now();
    call.send(cancel("b", &["t"])).await;
    let r = call.results(1, LIVENESS).await;
    assert_eq!(outcome(&r[0]), Outcome::Cancelled, "{r:?}");
    // The tree ignores SIGTERM (the test above sees it arrive), so only SIGKILL ends it, and that
    // comes after kill_grace: the tree lives at least that long after the cancel. A slow machine
    // can only make what this measures longer.
    wait_tree_gone(&tree, "the tree is SIGKILLed after kill_grace").await;
    let took = cancelled_at.elapsed();
    assert!(
        took >= grace,
        "SIGKILL came {took:?} after the cancel, before kill_grace"
    );
    eprintln!("stubborn tree gone {took:?} after the cancel (kill_grace {grace:?})");
    wait_reaper_idle(&reaper).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_finished_command_left_behind_is_killed() {
    // Holding stdout: the job would never see EOF; it ends when the command exits.
    let mark = unique_mark("holds-stdout");
    let holds = spec("holds", &["sh", "-c", "sleep 60 & echo done"], &mark);
    // Not holding any pipe: the job ends at once; the leftover is killed afterwards.
    let mark2 = unique_mark("detached");
    let detached = spec(
        "detached",
        &["sh", "-c", "sleep 60 >/dev/null 2>&1 </dev/null & echo $!"],
        &mark2,
    );
    let (server, reaper) = start(vec![holds, detached], |_| {});
    let results = run(
        &server,
        vec![job("h", "holds", b"", &[]), job("d", "detached", b"", &[])],
    )
    .await;
    assert_eq!(outcome(&results["h"]), Outcome::Ok, "{:?}", results["h"]);
    assert_eq!(&results["h"].output[..], b"done\n");
    assert_eq!(outcome(&results["d"]), Outcome::Ok, "{:?}", results["d"]);
    let pid: i32 = String::from_utf8_lossy(&results["d"].output)
        .trim()
        .parse()
        .unwrap();
    wait_until("the detached sleep is killed", LIVENESS, || {
        Proc::read(pid).is_none_or(|p| !p.is_live())
    })
    .await;
    wait_until("nothing marked runs", LIVENESS, || {
        marked(&mark).is_empty() && marked(&mark2).is_empty()
    })
    .await;
    wait_reaper_idle(&reaper).await;
}

// === input, output, exit ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_payload_round_trips_through_cat() {
    let mut s = ExecSpec::new("cat", &["cat"]);
    s.max_output = ByteSize::mib(80);
    let (server, _reaper) = start(vec![s], |c| {
        c.max_payload = ByteSize::mib(80);
        c.max_output = ByteSize::mib(80);
        c.max_message_size = ByteSize::mib(96);
        c.http2_stream_window = ByteSize::mib(16);
        c.http2_connection_window = ByteSize::mib(32);
    });
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let payload: Vec<u8> = (0..64 * MIB)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let started = Instant::now();
    let results = run(&server, vec![job("big", "cat", &payload, &[])]).await;
    let r = &results["big"];
    assert_eq!(outcome(r), Outcome::Ok, "{}", r.error);
    assert_eq!(r.output.len(), payload.len());
    assert!(
        r.output[..] == payload[..],
        "the output differs from the payload"
    );
    eprintln!("64 MiB through cat in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_output_fails_cleanly_and_kills_the_command() {
    let mark = unique_mark("flood");
    let mut s = spec(
        "flood",
        &["sh", "-c", "while :; do echo 0123456789abcdef; done"],
        &mark,
    );
    s.max_output = ByteSize(1024);
    let mut exact = ExecSpec::new("exact", &["cat"]);
    exact.max_output = ByteSize(1024);
    let (server, reaper) = start(vec![s, exact], |_| {});
    let results = run(
        &server,
        vec![
            job("f", "flood", b"", &[]),
            job("fits", "exact", &[b'a'; 1024], &[]),
            job("over", "exact", &[b'a'; 1025], &[]),
        ],
    )
    .await;
    for id in ["f", "over"] {
        let r = &results[id];
        assert_eq!(outcome(r), Outcome::Failed, "{r:?}");
        assert!(r.output.is_empty());
        assert!(
            r.error.contains("over max_output (1024 bytes)") && r.error.contains("killed"),
            "{}",
            r.error
        );
    }
    assert_eq!(outcome(&results["fits"]), Outcome::Ok);
    assert_eq!(results["fits"].output.len(), 1024);
    wait_until("the flooding command is gone", LIVENESS, || {
        marked(&mark).is_empty()
    })
    .await;
    wait_reaper_idle(&reaper).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_zero_exit_fails_with_the_status_and_the_end_of_stderr() {
    let script =
        "echo partial; i=0; while [ $i -lt 500 ]; do echo err$i >&2; i=$((i+1)); done; exit 3";
    let noisy = ExecSpec::new("noisy", &["sh", "-c", script]);
    let quiet = ExecSpec::new("quiet", &["false"]);
    let signalled = ExecSpec::new("signalled", &["sh", "-c", "echo bye >&2; kill -KILL $$"]);
    let (server, _reaper) = start(vec![noisy, quiet, signalled], |_| {});
    let results = run(
        &server,
        vec![
            job("n", "noisy", b"", &[]),
            job("q", "quiet", b"", &[]),
            job("s", "signalled", b"", &[]),
        ],
    )
    .await;
    let n = &results["n"];
    assert_eq!(outcome(n), Outcome::Failed);
    assert!(n.output.is_empty(), "no output for a failed job");
    assert!(n.error.contains("exit status: 3"), "{}", n.error);
    assert!(n.error.contains("err499"), "the end of stderr: {}", n.error);
    assert!(
        !n.error.contains("err7\n"),
        "only the end of stderr: {}",
        n.error
    );
    assert!(n.error.len() < 2048 + 200, "{} bytes", n.error.len());

    let q = &results["q"];
    assert_eq!(outcome(q), Outcome::Failed);
    assert!(
        q.error.contains("exit status: 1") && q.error.contains("stderr is empty"),
        "{}",
        q.error
    );

    let s = &results["s"];
    assert_eq!(outcome(s), Outcome::Failed);
    assert!(
        s.error.contains("SIGKILL") && s.error.contains("bye"),
        "{}",
        s.error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_does_not_read_its_input_is_fine() {
    let (server, _reaper) = start(vec![ExecSpec::new("true", &["true"])], |_| {});
    let results = run(&server, vec![job("t", "true", &vec![1u8; 4 * MIB], &[])]).await;
    assert_eq!(outcome(&results["t"]), Outcome::Ok, "{:?}", results["t"]);
    assert!(results["t"].output.is_empty());
}

// === params, environment, working directory ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn params_with_shell_metacharacters_are_rejected_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut strict = ExecSpec::new("touch", &["touch", "{name}"]);
    strict.params.insert("name".into(), "[a-z]{1,16}".into());
    strict.cwd = Some(dir.path().to_owned());
    let mut loose = ExecSpec::new("touch_any", &["touch", "{name}"]);
    loose.params.insert("name".into(), ".+".into());
    loose.cwd = Some(dir.path().to_owned());
    let (server, _reaper) = start(vec![strict, loose], |_| {});

    let hostile = "x; touch pwned";
    let literal = "a $(touch pwned2) `touch pwned3` && touch pwned4";
    let results = run(
        &server,
        vec![
            job("ok", "touch", b"", &[("name", "hello")]),
            job("bad", "touch", b"", &[("name", hostile)]),
            job("missing", "touch", b"", &[]),
            job("unknown", "touch", b"", &[("name", "a"), ("extra", "1")]),
            job("literal", "touch_any", b"", &[("name", literal)]),
        ],
    )
    .await;
    assert_eq!(outcome(&results["ok"]), Outcome::Ok, "{:?}", results["ok"]);
    for (id, words) in [
        ("bad", &["param \"name\"", "does not match"][..]),
        ("missing", &["missing param \"name\""][..]),
        ("unknown", &["unknown param \"extra\""][..]),
    ] {
        let r = &results[id];
        assert_eq!(outcome(r), Outcome::Rejected, "{r:?}");
        assert!(r.ran.is_none(), "a rejected job never ran");
        for w in words {
            assert!(r.error.contains(w), "{id}: {}", r.error);
        }
    }
    // A value the rule lets through is one argument, never shell code.
    assert_eq!(outcome(&results["literal"]), Outcome::Ok);
    let files: BTreeSet<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let want: BTreeSet<String> = ["hello".to_owned(), literal.to_owned()].into();
    assert_eq!(files, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_is_cleared_and_cwd_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = ExecSpec::new("env", &["env"]);
    env.env.insert("LC_ALL".into(), "C".into());
    let mut pwd = ExecSpec::new("pwd", &["pwd"]);
    pwd.cwd = Some(dir.path().to_owned());
    let (server, _reaper) = start(vec![env, pwd], |_| {});
    let results = run(
        &server,
        vec![job("e", "env", b"", &[]), job("p", "pwd", b"", &[])],
    )
    .await;
    let text = String::from_utf8(results["e"].output.to_vec()).unwrap();
    let names: BTreeSet<&str> = text.lines().filter_map(|l| l.split('=').next()).collect();
    let want: BTreeSet<&str> = ["LC_ALL", "PATH"].into();
    assert_eq!(names, want, "{text}");
    assert!(text.contains("LC_ALL=C\n"), "{text}");
    let pwd = String::from_utf8(results["p"].output.to_vec()).unwrap();
    assert_eq!(
        std::fs::canonicalize(pwd.trim()).unwrap(),
        std::fs::canonicalize(dir.path()).unwrap()
    );
}

// === limits, failures, listing ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_caps_the_handler_and_waiting_stays_cancellable() {
    let dir = tempfile::tempdir().unwrap();
    let mut one = ExecSpec::new(
        "one",
        &["sh", "-c", "echo start >> log; sleep 0.05; echo end >> log"],
    );
    one.concurrency = Some(1);
    one.cwd = Some(dir.path().to_owned());
    let (server, _reaper) = start(vec![one], |_| {});
    let jobs = (0..4)
        .map(|i| job(&format!("j{i}"), "one", b"", &[]))
        .collect();
    let results = run(&server, jobs).await;
    assert!(results.values().all(|r| outcome(r) == Outcome::Ok));
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert_eq!(log, "start\nend\n".repeat(4), "jobs overlapped");

    // A job waiting for the handler's only permit is cancelled at once.
    let mark = unique_mark("cap");
    let mut slow = spec("slow", &["sleep", "60"], &mark);
    slow.concurrency = Some(1);
    let (server, reaper) = start(vec![slow], |_| {});
    let mut call = server.open_call().await;
    call.send(batch(
        "b",
        vec![job("a", "slow", b"", &[]), job("w", "slow", b"", &[])],
    ))
    .await;
    let tree = wait_for_tree(&mark, 1).await;
    wait_until("both jobs hold a worker", LIVENESS, || {
        server.stats().jobs_running == 2
    })
    .await;
    call.send(cancel("b", &["w"])).await;
    let r = call.results(1, LIVENESS).await;
    assert_eq!(
        (r[0].job_id.as_str(), outcome(&r[0])),
        ("w", Outcome::Cancelled)
    );
    assert_eq!(
        marked(&mark).len(),
        1,
        "the waiting job never started a process"
    );
    call.send(cancel("b", &["a"])).await;
    let r = call.results(1, LIVENESS).await;
    assert_eq!(outcome(&r[0]), Outcome::Cancelled);
    wait_tree_gone(&tree, "the running job's process is gone").await;
    wait_reaper_idle(&reaper).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_cannot_start_fails_with_the_os_error_and_the_daemon_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let not_executable = dir.path().join("script");
    std::fs::write(&not_executable, "#!/bin/sh\necho hi\n").unwrap();
    let missing = ExecSpec::new("missing", &["/nonexistent/batchd-no-such-command"]);
    let denied = ExecSpec::new("denied", &[not_executable.to_str().unwrap()]);
    let mut bad_cwd = ExecSpec::new("bad_cwd", &["true"]);
    bad_cwd.cwd = Some("/nonexistent/batchd-no-such-dir".into());
    let (server, reaper) = start(
        vec![missing, denied, bad_cwd, ExecSpec::new("cat", &["cat"])],
        |_| {},
    );
    let results = run(
        &server,
        vec![
            job("m", "missing", b"", &[]),
            job("d", "denied", b"", &[]),
            job("c", "bad_cwd", b"", &[]),
            job("echo", "echo", b"still here", &[]),
            job("cat", "cat", b"and running", &[]),
        ],
    )
    .await;
    for (id, os_error) in [
        ("m", "No such file or directory"),
        ("d", "Permission denied"),
        ("c", "No such file or directory"),
    ] {
        let r = &results[id];
        assert_eq!(outcome(r), Outcome::Failed, "{r:?}");
        assert!(
            r.error.starts_with("cannot start") && r.error.contains(os_error),
            "{id}: {}",
            r.error
        );
    }
    assert_eq!(&results["echo"].output[..], b"still here");
    assert_eq!(&results["cat"].output[..], b"and running");
    assert_eq!(reaper.live_groups(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_handlers_shows_exec_handlers() {
    let mut thumb = ExecSpec::new("thumbnail", &["convert", "-", "{size}", "png:-"]);
    thumb.params.insert("size".into(), "[0-9]+x[0-9]+".into());
    thumb.description = "Resize an image".into();
    let (server, _reaper) = start(vec![thumb, ExecSpec::new("count", &["wc", "-c"])], |_| {});
    let handlers = server
        .client()
        .await
        .list_handlers(proto::ListHandlersRequest {})
        .await
        .unwrap()
        .into_inner()
        .handlers;
    let find = |name: &str| {
        handlers
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("{name} is listed: {handlers:?}"))
            .description
            .clone()
    };
    assert_eq!(find("thumbnail"), "Resize an image");
    assert!(find("count").contains("`wc -c`"), "{}", find("count"));
    assert!(find("echo").contains("payload"));
}

// === the real daemon binary ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_daemon_leaves_no_child_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mark = unique_mark("kill9");
    let config = format!(
        "[[exec]]\nname = \"sleeper\"\ncommand = [\"sleep\", \"60\"]\nenv = {{ {MARK} = \"{mark}\" }}\n"
    );
    let mut daemon = serving_with_config(&dir, &config).await;
    let call = OpenCall::open_at(daemon.url.clone()).await;
    call.send(batch("b", vec![job("s", "sleeper", b"", &[])]))
        .await;
    let tree = wait_for_tree(&mark, 1).await;
    assert_eq!(tree[0].ppid, daemon.pid(), "the daemon's own child");

    daemon.child.kill().unwrap(); // SIGKILL: nothing of batchd runs after this
    daemon.child.wait().unwrap();
    wait_until("the parent-death signal killed the child", LIVENESS, || {
        !tree[0].still_live()
    })
    .await;
    drop(call);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shutdown_kills_whole_trees_before_the_daemon_exits() {
    let dir = tempfile::tempdir().unwrap();
    let mark = unique_mark("shutdown");
    // The tree ignores SIGTERM, and its grandchild is out of reach of the parent-death signal:
    // only the daemon's wait for its kill tasks (SIGKILL after kill_grace) stops it.
    let config = format!(
        "shutdown_grace = \"100ms\"\n\n[[exec]]\nname = \"stubborn\"\n\
         command = [\"sh\", \"-c\", \"trap '' TERM; sleep 60 & wait; wait\"]\n\
         kill_grace = \"300ms\"\nenv = {{ {MARK} = \"{mark}\" }}\n"
    );
    let mut daemon = serving_with_config(&dir, &config).await;
    let call = OpenCall::open_at(daemon.url.clone()).await;
    call.send(batch("b", vec![job("s", "stubborn", b"", &[])]))
        .await;
    let tree = wait_for_tree(&mark, 2).await;

    daemon.signal("TERM");
    let status = daemon.exit().await;
    assert_eq!(status.code(), Some(0), "stderr:\n{}", daemon.stderr());
    wait_until("nothing of the tree runs", LIVENESS, || {
        tree.iter().all(|p| !p.still_live())
    })
    .await;
    drop(call);
}

#[tokio::test]
async fn exec_config_errors_exit_64_naming_the_handler_and_field() {
    let cases = [
        (
            "[[exec]]\nname = \"thumbnail\"\ncommand = [\"convert\", \"{size}\"]\nparams = { size = \"([0-9]\" }\n",
            "invalid config: exec \"thumbnail\": params.size: bad regex",
        ),
        (
            "[[exec]]\nname = \"t\"\ncommand = []\n",
            "invalid config: exec \"t\": command: is empty",
        ),
        (
            "[[exec]]\nname = \"echo\"\ncommand = [\"cat\"]\n",
            "exec \"echo\": name",
        ),
        (
            "[[exec]]\nname = \"t\"\ncommand = [\"cat\"]\ncomand = [\"cat\"]\n",
            "exec \"t\": unknown field `comand`",
        ),
    ];
    for (config, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(&dir, config);
        let args = [
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ];
        let mut daemon = Daemon::spawn(&args, &[]);
        // `exit` returns once all of the daemon's stderr is read.
        let status = daemon.exit().await;
        assert_eq!(status.code(), Some(64), "stderr: {}", daemon.stderr());
        assert!(
            daemon.stderr().contains(want),
            "stderr: {}",
            daemon.stderr()
        );
        assert!(!daemon.stderr().contains("serving"));
    }
}
