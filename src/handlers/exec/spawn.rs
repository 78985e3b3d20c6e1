//! Starting a command the way `posix_spawn` does, with batchd's own steps between clone and exec:
//! the one module of batchd that uses `unsafe`.
//!
//! Why not `std::process::Command`: a `pre_exec` hook (needed for the parent-death signal and to
//! enter a cgroup) makes std `fork`, which copies the daemon's page tables (about 4× the parent's
//! CPU per spawn), and std hands back no pidfd.
//!
//! How: `clone(CLONE_VM | CLONE_VFORK | CLONE_PIDFD)`, as glibc's `posix_spawn` does. The child
//! runs [`child_main`] on a stack of its own, *inside the parent's memory*, while the calling
//! thread is suspended until the child has exec'd or exited. The pidfd turns readable when the
//! command exits: waiting needs no SIGCHLD handling, and `waitid(P_PIDFD)` reaps exactly this
//! child. (A child cloned with no exit signal would not save the daemon SIGCHLD: once it has
//! exec'd, the kernel sends SIGCHLD and treats it as an ordinary child anyway.)
//!
//! The child, in order: resets every signal handler to the default (it shares the parent's
//! memory, so a handler must never run in it) and unblocks every signal; sets the parent-death
//! signal (SIGKILL) and checks that the parent is still there; leads a new process group; enters
//! the job's cgroup by writing `0` to its `cgroup.procs`; puts the pipes on fds 0–2; marks every
//! other fd close-on-exec (`close_range`); changes to the working directory; and execs, searching
//! `PATH` itself as `execvp` would. A step that fails stores the step and its errno where the parent
//! reads them and exits 127; `spawn` then reaps it and returns the error.
//!
//! Rules for the child (what makes this sound): it reads only [`ChildArgs`] and what it points to,
//! owned by the suspended caller's frame and unchanged until `clone` returns; it writes only its
//! own stack, the two atomics of `ChildArgs`, and (through libc's wrappers) the calling thread's
//! `errno`, which the caller does not read after a successful `clone`; it makes plain system calls
//! through libc and never allocates, locks or unwinds (an unexpected panic aborts the child:
//! `extern "C"`).
//!
//! The module also registers the pidfd with tokio ([`Exit`]): since tokio 1.54 that registration
//! is `unsafe` too (the fd must stay open and the same while registered).

#![allow(unsafe_code)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::ptr;
use std::sync::atomic::{AtomicI32, Ordering};

use rustix::process::{Pid, WaitId, WaitIdOptions};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Size of each thread's child stack: the child needs a few KiB (its frame and a `PATH_MAX` buffer).
const STACK_SIZE: usize = 128 * 1024;
/// Longest program path tried while searching `PATH` (Linux's `PATH_MAX`).
const PATH_MAX: usize = 4096;
/// `PATH` when the command's environment has none (glibc's `execvp` default).
const DEFAULT_PATH: &[u8] = b"/bin:/usr/bin";

/// What to start. Everything is prepared by the caller: the child may not allocate.
pub(super) struct Request<'a> {
    /// The program: a path, or a name looked up in `search_path`.
    pub(super) program: &'a CStr,
    /// Every argument, the program as given first.
    pub(super) argv: &'a [CString],
    /// The whole environment, as `KEY=value` strings.
    pub(super) env: &'a [CString],
    /// `PATH` of the command's environment, searched when `program` has no `/` (without one, or
    /// when it is empty: `/bin:/usr/bin`, as `execvp`).
    pub(super) search_path: Option<&'a [u8]>,
    /// Working directory, if not the daemon's.
    pub(super) cwd: Option<&'a CStr>,
    /// Becomes the command's stdin, stdout and stderr.
    pub(super) stdio: [BorrowedFd<'a>; 3],
    /// The `cgroup.procs` file of the cgroup to start in, open for writing.
    pub(super) cgroup_procs: Option<BorrowedFd<'a>>,
}

/// A started command: its pid and a pidfd, which turns readable when it exits.
#[derive(Debug)]
pub(super) struct Spawned {
    pub(super) pid: Pid,
    pub(super) pidfd: OwnedFd,
}

/// The step of the child that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub(super) enum Step {
    /// Resetting signal handlers and the signal mask.
    Signals = 1,
    /// Setting the parent-death signal.
    DeathSignal,
    /// The daemon died while the child was starting.
    ParentGone,
    /// Leading a new process group.
    ProcessGroup,
    /// Entering the job's cgroup.
    Cgroup,
    /// Putting the pipes on fds 0–2.
    Stdio,
    /// Changing to the working directory.
    Cwd,
    /// Executing the program.
    Exec,
}

/// The child's failure: which step, and the OS error.
#[derive(Debug)]
pub(super) struct SpawnError {
    pub(super) step: Option<Step>,
    pub(super) error: io::Error,
}

/// What the child reads: raw pointers into the caller's [`Request`] and vectors, which outlive the
/// child's use of them (the caller is suspended until the child has exec'd or exited).
struct ChildArgs {
    program: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    /// `PATH` to search, or null when `program` is a path.
    search: *const u8,
    search_len: usize,
    cwd: *const c_char,
    stdio: [RawFd; 3],
    /// `cgroup.procs` of the job's cgroup, or -1.
    cgroup_procs: RawFd,
    /// The daemon's pid: the child's parent, unless the daemon died meanwhile.
    parent: libc::pid_t,
    /// The failed [`Step`] (0: none) and its errno, written by the child.
    failed_step: AtomicI32,
    errno: AtomicI32,
}

/// A child stack: an anonymous mapping with a guard page at its low end. One per thread, reused:
/// the thread is suspended while a child runs on it.
struct Stack {
    base: *mut c_void,
    len: usize,
}

thread_local! {
    static STACK: RefCell<Option<Stack>> = const { RefCell::new(None) };
}

// === spawn ===

/// Starts `req`: returns once the program runs (or failed to start, with the step and error).
pub(super) fn spawn(req: &Request<'_>) -> Result<Spawned, SpawnError> {
    let outside = |error| SpawnError { step: None, error };
    let argv = null_terminated(req.argv);
    let envp = null_terminated(req.env);
    let search = match req.search_path {
        _ if req.program.to_bytes().contains(&b'/') => None,
        Some(path) if !path.is_empty() => Some(path),
        _ => Some(DEFAULT_PATH),
    };
    let args = ChildArgs {
        program: req.program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        search: search.map_or(ptr::null(), <[u8]>::as_ptr),
        search_len: search.map_or(0, <[u8]>::len),
        cwd: req.cwd.map_or(ptr::null(), CStr::as_ptr),
        stdio: req.stdio.map(|fd| fd.as_raw_fd()),
        cgroup_procs: req.cgroup_procs.map_or(-1, |fd| fd.as_raw_fd()),
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
        failed_step: AtomicI32::new(0),
        errno: AtomicI32::new(0),
    };
    let mut pidfd: c_int = -1;
    let pid = STACK
        .with(|cell| -> io::Result<c_int> {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(Stack::new()?);
            }
            let top = slot.as_ref().map_or(ptr::null_mut(), Stack::top);
            Ok(clone_vfork(&args, top, &mut pidfd))
        })
        .map_err(outside)?;
    if pid < 0 {
        return Err(outside(io::Error::from_raw_os_error(-pid)));
    }
    // SAFETY: clone succeeded with CLONE_PIDFD: `pidfd` is a new fd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let pid =
        Pid::from_raw(pid).ok_or_else(|| outside(io::Error::other("clone returned pid 0")))?;
    let step = args.failed_step.load(Ordering::Acquire);
    if step == 0 {
        return Ok(Spawned { pid, pidfd });
    }
    let errno = args.errno.load(Ordering::Acquire);
    // The child has exited (or is exiting): reap it, so that no zombie is left.
    let _ = rustix::process::waitid(WaitId::PidFd(pidfd.as_fd()), wait_options(false));
    Err(SpawnError {
        step: Step::from_raw(step),
        error: io::Error::from_raw_os_error(errno),
    })
}

/// A started command's pidfd, registered with the runtime: waits for its exit without SIGCHLD.
#[derive(Debug)]
pub(super) struct Exit {
    pidfd: AsyncFd<OwnedFd>,
}

impl Exit {
    /// Registers `pidfd` (of a child of this process) with the current runtime's reactor.
    pub(super) fn register(pidfd: OwnedFd) -> io::Result<Self> {
        // SAFETY: the `OwnedFd` is a valid open fd, owned by the `AsyncFd` from here on and never
        // replaced or closed while it is (tokio 1.54 made this registration `unsafe`).
        let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE)? };
        Ok(Self { pidfd })
    }

    /// Waits until the command has exited, and reaps it. Cancel-safe.
    pub(super) async fn wait(&self) -> io::Result<ExitStatus> {
        loop {
            let mut ready = self.pidfd.readable().await?;
            match reap(self.pidfd.get_ref().as_fd())? {
                Some(status) => return Ok(status),
                None => ready.clear_ready(),
            }
        }
    }
}

/// Reaps the command behind `pidfd` if it has exited: `None` while it runs.
pub(super) fn reap(pidfd: BorrowedFd<'_>) -> io::Result<Option<ExitStatus>> {
    let Some(status) = rustix::process::waitid(WaitId::PidFd(pidfd), wait_options(true))? else {
        return Ok(None);
    };
    let raw = if let Some(code) = status.exit_status() {
        (code & 0xff) << 8
    } else if let Some(signal) = status.terminating_signal() {
        signal | if status.dumped() { 0x80 } else { 0 }
    } else {
        return Err(io::Error::other("waitid: neither an exit nor a signal"));
    };
    Ok(Some(ExitStatus::from_raw(raw)))
}

/// Waits for the command `pid` (a child of this process that was not reaped) and reaps it.
pub(super) fn reap_blocking(pid: Pid) {
    let _ = rustix::process::waitid(WaitId::Pid(pid), wait_options(false));
}

/// `WEXITED | __WALL` (any kind of child), and `WNOHANG` if `nohang`.
fn wait_options(nohang: bool) -> WaitIdOptions {
    let wall = WaitIdOptions::from_bits_retain(libc::__WALL as u32);
    let options = WaitIdOptions::EXITED | wall;
    if nohang {
        options | WaitIdOptions::NOHANG
    } else {
        options
    }
}

/// Pointers to `strings`, then a null pointer (what `execve` takes).
fn null_terminated(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(ptr::null()))
        .collect()
}

/// Clones the child onto `stack_top` with every signal of the calling thread blocked; returns the
/// child's pid, or minus the errno.
fn clone_vfork(args: &ChildArgs, stack_top: *mut c_void, pidfd: &mut c_int) -> c_int {
    if stack_top.is_null() {
        return -libc::ENOMEM;
    }
    // SAFETY: plain calls on valid, local sigset_t values. Blocking every signal means that none
    // is delivered in the child before it has reset its handlers (it shares our memory).
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD;
    // SAFETY: `child_main` keeps the rules of this module's doc; `args` and everything it points
    // to stay alive and unchanged until clone returns, which CLONE_VFORK delays until the child
    // has exec'd or exited; `stack_top` is the 16-byte aligned top of a mapping that no other
    // child uses meanwhile (one per thread, and this thread is suspended). With CLONE_PIDFD the
    // pidfd is stored through the parent_tid argument.
    let pid = unsafe {
        libc::clone(
            child_main,
            stack_top,
            flags,
            ptr::from_ref(args).cast_mut().cast::<c_void>(),
            ptr::from_mut(pidfd),
        )
    };
    let res = if pid < 0 {
        -io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL)
    } else {
        pid
    };
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, ptr::null_mut());
    }
    res
}

// === the child ===

/// The child's whole life until exec: see the module's doc for its rules.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `ChildArgs` of `spawn`, alive and unchanged while the parent waits.
    let args = unsafe { &*(arg as *const ChildArgs) };
    // SAFETY: `args` is valid as above; `setup` returns only on failure.
    let (step, errno) = unsafe { setup(args) };
    args.errno.store(errno, Ordering::Release);
    args.failed_step.store(step as i32, Ordering::Release);
    127
}

/// The errno of the last failed libc call.
fn errno() -> c_int {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EINVAL)
}

/// `Err((step, errno))` when a libc call returned -1.
fn check(step: Step, ret: c_int) -> Result<c_int, (Step, c_int)> {
    if ret == -1 {
        Err((step, errno()))
    } else {
        Ok(ret)
    }
}

/// Everything between clone and exec; returns only when a step failed.
///
/// # Safety
/// Only in the child of [`clone_vfork`], with `args` valid.
unsafe fn setup(args: &ChildArgs) -> (Step, c_int) {
    match unsafe { prepare(args) } {
        Err(failed) => failed,
        Ok(()) => (Step::Exec, unsafe { exec(args) }),
    }
}

/// The steps before exec.
///
/// # Safety
/// Only in the child of [`clone_vfork`], with `args` valid.
unsafe fn prepare(args: &ChildArgs) -> Result<(), (Step, c_int)> {
    unsafe {
        // Handlers to default while every signal is still blocked; SIGPIPE too (the Rust runtime
        // ignores it, a command expects the default). Other ignored signals stay ignored, as
        // across any exec. Errors are for signals that cannot be changed: nothing to do.
        let mut action: libc::sigaction = std::mem::zeroed();
        for signal in 1..=libc::SIGRTMAX() {
            if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                continue;
            }
            if libc::sigaction(signal, ptr::null(), &mut action) != 0 {
                continue;
            }
            let handled =
                action.sa_sigaction != libc::SIG_DFL && action.sa_sigaction != libc::SIG_IGN;
            if handled || signal == libc::SIGPIPE {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(signal, &default, ptr::null_mut());
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        check(
            Step::Signals,
            libc::sigprocmask(libc::SIG_SETMASK, &empty, ptr::null_mut()),
        )?;

        check(
            Step::DeathSignal,
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ),
        )?;
        // The daemon may have died before prctl: then no signal would ever come.
        if libc::getppid() != args.parent {
            return Err((Step::ParentGone, libc::ESRCH));
        }
        check(Step::ProcessGroup, libc::setpgid(0, 0))?;
        if args.cgroup_procs >= 0 {
            // "0" is the writer itself: the child joins the job's cgroup before it runs anything.
            let written = libc::write(args.cgroup_procs, b"0".as_ptr().cast(), 1);
            if written != 1 {
                return Err((Step::Cgroup, if written < 0 { errno() } else { libc::EIO }));
            }
        }

        // A source fd below 3 could be overwritten by an earlier dup2: move it up first.
        let mut stdio = args.stdio;
        for fd in &mut stdio {
            if *fd < 3 {
                *fd = check(Step::Stdio, libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 3))?;
            }
        }
        for (target, source) in (0..).zip(stdio) {
            // dup2 clears close-on-exec on the new fd.
            check(Step::Stdio, libc::dup2(source, target))?;
        }
        // Nothing else reaches the command, whoever opened an fd without O_CLOEXEC. (Before Linux
        // 5.11 this fails with EINVAL or ENOSYS; std's own fds are close-on-exec anyway.)
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        if !args.cwd.is_null() {
            check(Step::Cwd, libc::chdir(args.cwd))?;
        }
    }
    Ok(())
}

/// Executes the program, searching `PATH` when it has no `/`; returns the errno if nothing ran.
///
/// # Safety
/// Only in the child of [`clone_vfork`], with `args` valid.
unsafe fn exec(args: &ChildArgs) -> c_int {
    unsafe {
        if args.search.is_null() {
            libc::execve(args.program, args.argv, args.envp);
            return errno();
        }
        let name = CStr::from_ptr(args.program).to_bytes();
        let path = std::slice::from_raw_parts(args.search, args.search_len);
        let mut buf = [0u8; PATH_MAX];
        let mut denied = false;
        for dir in path.split(|b| *b == b':') {
            let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
            let len = dir.len() + 1 + name.len();
            let Some(full) = buf.get_mut(..=len) else {
                continue;
            };
            let (d, rest) = full.split_at_mut(dir.len());
            d.copy_from_slice(dir);
            let (slash, rest) = rest.split_at_mut(1);
            slash[0] = b'/';
            let (n, nul) = rest.split_at_mut(name.len());
            n.copy_from_slice(name);
            nul[0] = 0;
            libc::execve(buf.as_ptr().cast(), args.argv, args.envp);
            match errno() {
                libc::EACCES => denied = true,
                libc::ENOENT
                | libc::ENOTDIR
                | libc::ELOOP
                | libc::ENAMETOOLONG
                | libc::ESTALE
                | libc::ENODEV
                | libc::ETIMEDOUT => {}
                other => return other,
            }
        }
        if denied {
            libc::EACCES
        } else {
            libc::ENOENT
        }
    }
}

// === impl Step ===

impl Step {
    const ALL: [Step; 8] = [
        Step::Signals,
        Step::DeathSignal,
        Step::ParentGone,
        Step::ProcessGroup,
        Step::Cgroup,
        Step::Stdio,
        Step::Cwd,
        Step::Exec,
    ];

    fn from_raw(raw: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|s| *s as i32 == raw)
    }

    /// What the step does, for an error message.
    fn describe(self) -> &'static str {
        match self {
            Step::Signals => "resetting signals",
            Step::DeathSignal => "setting the parent-death signal",
            Step::ParentGone => "the daemon went away while the command started",
            Step::ProcessGroup => "creating its process group",
            Step::Cgroup => "entering its cgroup",
            Step::Stdio => "setting up its stdin, stdout and stderr",
            Step::Cwd => "changing to cwd",
            Step::Exec => "executing it",
        }
    }
}

// === impl SpawnError ===

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.step {
            // The OS error alone says it best: "No such file or directory", "Permission denied".
            None | Some(Step::Exec) => write!(f, "{}", self.error),
            Some(step) => write!(f, "{}: {}", step.describe(), self.error),
        }
    }
}

impl std::error::Error for SpawnError {}

// === impl Stack ===

impl Stack {
    fn new() -> io::Result<Self> {
        let page = 4096;
        // SAFETY: an anonymous private mapping of fresh memory; nothing aliases it.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                STACK_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = Self {
            base,
            len: STACK_SIZE,
        };
        // The stack grows down: its lowest page faults instead of running into other memory.
        // SAFETY: the first page of the mapping made above.
        if unsafe { libc::mprotect(base, page, libc::PROT_NONE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The highest address, where the child's stack starts (16-byte aligned: mappings are).
    fn top(&self) -> *mut c_void {
        self.base.wrapping_byte_add(self.len)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; no child runs on it (its thread is exiting).
        unsafe {
            libc::munmap(self.base, self.len);
        }
    }
}

#[cfg(test)]
mod tests;
