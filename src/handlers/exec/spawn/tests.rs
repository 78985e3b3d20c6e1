//! The spawn on its own: statuses, errors, pipes, and what the child gets set before exec.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use super::*;

/// A started command with its pipes, reaped by [`Run::finish`].
#[derive(Debug)]
struct Run {
    spawned: Spawned,
    stdin: Option<std::fs::File>,
    stdout: std::fs::File,
    stderr: std::fs::File,
}

fn cstrings(items: &[&str]) -> Vec<CString> {
    items.iter().map(|s| CString::new(*s).unwrap()).collect()
}

fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap()
}

fn path() -> Vec<u8> {
    std::env::var("PATH").unwrap_or_default().into_bytes()
}

/// Starts `argv` with `env`, searching `search`, in `cwd`.
fn start(
    argv: &[&str],
    env: &[&str],
    search: Option<&[u8]>,
    cwd: Option<&str>,
) -> Result<Run, SpawnError> {
    let argv = cstrings(argv);
    let env = cstrings(env);
    let cwd = cwd.map(|c| CString::new(c).unwrap());
    let (in_r, in_w) = pipe();
    let (out_r, out_w) = pipe();
    let (err_r, err_w) = pipe();
    let spawned = spawn(&Request {
        program: &argv[0],
        argv: &argv,
        env: &env,
        search_path: search,
        cwd: cwd.as_deref(),
        stdio: [in_r.as_fd(), out_w.as_fd(), err_w.as_fd()],
        cgroup_procs: None,
    })?;
    Ok(Run {
        spawned,
        stdin: Some(in_w.into()),
        stdout: out_r.into(),
        stderr: err_r.into(),
    })
}

/// Like [`start`] with the test's `PATH` and no environment besides it.
fn sh(script: &str) -> Run {
    let path = path();
    start(&["sh", "-c", script], &[], Some(&path), None).unwrap()
}

impl Run {
    /// Closes stdin, reads stdout and stderr to their end, waits for the exit and reaps.
    fn finish(mut self) -> (ExitStatus, String, String) {
        drop(self.stdin.take());
        let mut out = String::new();
        let mut err = String::new();
        self.stdout.read_to_string(&mut out).unwrap();
        self.stderr.read_to_string(&mut err).unwrap();
        (self.wait(), out, err)
    }

    /// Waits for the exit (polling the pidfd) and reaps.
    fn wait(&self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = reap(self.spawned.pidfd.as_fd()).unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the command still runs");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn pid(&self) -> i32 {
        self.spawned.pid.as_raw_nonzero().get()
    }
}

/// Field `n` (1-based, as in proc(5)) of /proc/PID/stat.
fn stat_field(pid: i32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(n - 3).map(str::to_owned)
}

#[test]
fn exit_statuses_are_those_of_the_command() {
    for (script, code) in [
        ("exit 0", Some(0)),
        ("exit 3", Some(3)),
        ("exit 255", Some(255)),
    ] {
        let (status, _, _) = sh(script).finish();
        assert_eq!(status.code(), code, "{script}");
    }
    let (status, _, _) = sh("kill -TERM $$").finish();
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    assert_eq!(status.to_string(), "signal: 15 (SIGTERM)");
    let (status, _, _) = sh("exit 3").finish();
    assert_eq!(status.to_string(), "exit status: 3");
}

#[test]
fn stdio_are_the_pipes_given() {
    let mut run = sh("cat; echo to-stderr >&2");
    run.stdin.as_mut().unwrap().write_all(b"hello\n").unwrap();
    let (status, out, err) = run.finish();
    assert!(status.success());
    assert_eq!(out, "hello\n");
    assert_eq!(err, "to-stderr\n");
}

#[test]
fn the_environment_is_exactly_the_one_given() {
    let path = path();
    let run = start(&["env"], &["A=1", "B=two words"], Some(&path), None).unwrap();
    let (status, out, _) = run.finish();
    assert!(status.success());
    assert_eq!(out, "A=1\nB=two words\n");
}

#[test]
fn programs_are_searched_in_the_path_given() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("hello-batchd");
    std::fs::write(&script, "#!/bin/sh\necho found\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let search = format!("/nonexistent-batchd:{}", dir.path().display());
    let run = start(&["hello-batchd"], &[], Some(search.as_bytes()), None).unwrap();
    assert_eq!(run.finish().1, "found\n");

    // Found but not executable: EACCES, as execvp says (after trying every directory).
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let err = start(&["hello-batchd"], &[], Some(search.as_bytes()), None).unwrap_err();
    assert_eq!(
        (err.step, err.error.raw_os_error()),
        (Some(Step::Exec), Some(libc::EACCES))
    );
    assert_eq!(err.to_string(), "Permission denied (os error 13)");

    let err = start(&["no-such-batchd-program"], &[], Some(&path()), None).unwrap_err();
    assert_eq!(err.error.raw_os_error(), Some(libc::ENOENT));
    // A path is not searched.
    let err = start(&["./hello-batchd"], &[], Some(search.as_bytes()), None).unwrap_err();
    assert_eq!(err.error.raw_os_error(), Some(libc::ENOENT));
    // Without a PATH, execvp's default.
    let run = start(&["true"], &[], None, None).unwrap();
    assert!(run.finish().0.success());
    let run = start(
        &["./hello-batchd"],
        &[],
        None,
        Some(dir.path().to_str().unwrap()),
    );
    assert_eq!(run.unwrap_err().error.raw_os_error(), Some(libc::EACCES));
}

#[test]
fn a_bad_cwd_names_the_step_and_leaves_no_zombie() {
    // On a thread of its own: the failed child was this thread's child, and other tests' children
    // are their threads'.
    let (err, children) = std::thread::spawn(|| {
        let err = start(
            &["true"],
            &[],
            Some(&path()),
            Some("/nonexistent-batchd-dir"),
        )
        .unwrap_err();
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let children = std::fs::read_to_string(format!("/proc/self/task/{tid}/children")).unwrap();
        (err, children)
    })
    .join()
    .unwrap();
    assert_eq!(err.step, Some(Step::Cwd));
    assert_eq!(
        err.to_string(),
        "changing to cwd: No such file or directory (os error 2)"
    );
    assert_eq!(children.trim(), "", "the failed child was reaped");
}

#[test]
fn the_command_leads_a_new_process_group() {
    let run = sh("sleep 60");
    let pid = run.pid();
    assert_eq!(stat_field(pid, 5), Some(pid.to_string()), "pgid = pid");
    rustix::process::kill_process_group(run.spawned.pid, rustix::process::Signal::KILL).unwrap();
    assert_eq!(run.wait().signal(), Some(libc::SIGKILL));
}

#[test]
fn signals_are_unblocked_and_at_their_defaults_and_other_fds_are_closed() {
    // An fd without close-on-exec, as C code might leave one: the command must not get it.
    let leaked: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    rustix::io::fcntl_setfd(&leaked, rustix::io::FdFlags::empty()).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&leaked);
    let (status, out, _) = sh(&format!(
        "grep -E '^Sig(Blk|Ign)' /proc/self/status; test -e /proc/self/fd/{fd} && echo leaked"
    ))
    .finish();
    assert!(status.success() || status.code() == Some(1));
    // Ignored signals stay ignored across exec (this test's harness may ignore some), except
    // SIGPIPE, which the Rust runtime ignores and a command expects at its default.
    let ours = std::fs::read_to_string("/proc/self/status").unwrap();
    let ignored = ours
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:\t"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .unwrap();
    let want = ignored & !(1 << (libc::SIGPIPE - 1));
    assert_eq!(
        out,
        format!("SigBlk:\t0000000000000000\nSigIgn:\t{want:016x}\n"),
        "fd {fd}"
    );
    drop(leaked);
}

#[test]
fn the_parent_death_signal_fires_when_the_spawning_thread_ends() {
    // The kernel sends it when the thread that spawned the command ends (for batchd: when the
    // daemon dies, its worker threads with it).
    let run = std::thread::spawn(|| start(&["sleep", "60"], &[], Some(&path()), None).unwrap())
        .join()
        .unwrap();
    assert_eq!(run.wait().signal(), Some(libc::SIGKILL));
}

#[test]
fn spawning_from_many_threads_at_once_gives_each_its_own_child() {
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..50 {
                    let (status, out, _) = sh(&format!("echo {t}-{i}")).finish();
                    assert!(status.success());
                    assert_eq!(out, format!("{t}-{i}\n"));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}
