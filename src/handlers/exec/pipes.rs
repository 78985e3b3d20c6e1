//! The command's pipes: the payload in, the output out (capped), the end of stderr kept.
//!
//! A job with an empty payload gets `/dev/null` as stdin instead of a pipe: it reads the same end
//! of input, for two system calls and an fd fewer.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use rustix::pipe::PipeFlags;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe::{Receiver, Sender};

use crate::handlers::HandlerError;

/// Bytes of stderr kept for the error of a failed job.
pub(super) const STDERR_TAIL: usize = 2048;
/// Bytes read from a pipe at a time.
const CHUNK: usize = 64 * 1024;

/// The daemon's ends of a command's pipes.
pub(super) struct Pipes {
    /// `None` when the payload is empty (stdin is `/dev/null`).
    pub(super) stdin: Option<Sender>,
    pub(super) stdout: Receiver,
    pub(super) stderr: Receiver,
}

/// The command's ends, given to the spawn and closed in the daemon right after it.
pub(super) struct ChildEnds {
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

/// `/dev/null`, opened once.
static DEV_NULL: OnceLock<io::Result<File>> = OnceLock::new();

/// Makes the command's pipes: stdin only if `stdin`.
pub(super) fn open(stdin: bool) -> io::Result<(Pipes, ChildEnds)> {
    let (stdin_tx, stdin_rx) = match stdin {
        true => {
            let (rx, tx) = pipe()?;
            (
                Some(Sender::from_owned_fd_unchecked(nonblocking(tx)?)?),
                Some(rx),
            )
        }
        false => (None, None),
    };
    let (out_rx, out_tx) = pipe()?;
    let (err_rx, err_tx) = pipe()?;
    let pipes = Pipes {
        stdin: stdin_tx,
        stdout: Receiver::from_owned_fd_unchecked(nonblocking(out_rx)?)?,
        stderr: Receiver::from_owned_fd_unchecked(nonblocking(err_rx)?)?,
    };
    let ends = ChildEnds {
        stdin: stdin_rx,
        stdout: out_tx,
        stderr: err_tx,
    };
    if ends.stdin.is_none() {
        dev_null()?;
    }
    Ok((pipes, ends))
}

/// A pipe, both ends close-on-exec: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(PipeFlags::CLOEXEC)?)
}

/// `fd` in non-blocking mode (the daemon's end only: the command's end stays blocking).
fn nonblocking(fd: OwnedFd) -> io::Result<OwnedFd> {
    rustix::io::ioctl_fionbio(&fd, true)?;
    Ok(fd)
}

fn dev_null() -> io::Result<BorrowedFd<'static>> {
    match DEV_NULL.get_or_init(|| File::open("/dev/null")) {
        Ok(file) => Ok(file.as_fd()),
        Err(e) => Err(io::Error::new(e.kind(), format!("opening /dev/null: {e}"))),
    }
}

// === impl ChildEnds ===

impl ChildEnds {
    /// stdin, stdout and stderr of the command.
    pub(super) fn fds(&self) -> [BorrowedFd<'_>; 3] {
        let stdin = match &self.stdin {
            Some(fd) => fd.as_fd(),
            // `open` made sure it is there.
            None => dev_null().unwrap_or(self.stdout.as_fd()),
        };
        [stdin, self.stdout.as_fd(), self.stderr.as_fd()]
    }
}

/// The last [`STDERR_TAIL`] bytes of a stream, and how long it was.
#[derive(Debug, Default)]
pub(super) struct Tail {
    pub(super) buf: Vec<u8>,
    total: u64,
}

/// Writes `payload` to the command's stdin, then closes it. A command that exits or closes its stdin
/// without reading everything is its own business, not an error.
pub(super) async fn feed<W: AsyncWrite + Unpin>(
    mut stdin: W,
    payload: Bytes,
) -> Result<(), HandlerError> {
    let res = async {
        stdin.write_all(&payload).await?;
        stdin.shutdown().await
    }
    .await;
    match res {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(HandlerError(format!(
            "writing the payload to the command's stdin: {e}"
        ))),
        _ => Ok(()),
    }
}

/// Reads the command's stdout to its end; fails as soon as it is longer than `max` bytes.
pub(super) async fn read_capped<R: AsyncRead + Unpin>(
    stdout: R,
    max: usize,
) -> Result<Bytes, HandlerError> {
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    let mut stdout = stdout.take(limit);
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(CHUNK);
        match stdout.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Err(HandlerError(format!("reading the command's stdout: {e}"))),
        }
        if buf.len() > max {
            return Err(HandlerError(format!(
                "the command's output is over max_output ({max} bytes); the command was killed"
            )));
        }
    }
    Ok(buf.freeze())
}

/// Reads the command's stderr to its end, keeping only its last [`STDERR_TAIL`] bytes.
pub(super) async fn read_tail<R: AsyncRead + Unpin>(mut stderr: R) -> Result<Tail, HandlerError> {
    let mut tail = Tail::default();
    let mut chunk = vec![0u8; 8 * 1024];
    loop {
        match stderr.read(&mut chunk).await {
            Ok(0) => return Ok(tail),
            Ok(n) => tail.push(&chunk[..n]),
            Err(e) => return Err(HandlerError(format!("reading the command's stderr: {e}"))),
        }
    }
}

// === impl Tail ===

impl Tail {
    /// Appends `bytes`, forgetting what is older than the last [`STDERR_TAIL`] bytes.
    pub(super) fn push(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        if bytes.len() >= STDERR_TAIL {
            self.buf.clear();
            self.buf
                .extend_from_slice(&bytes[bytes.len() - STDERR_TAIL..]);
            return;
        }
        self.buf.extend_from_slice(bytes);
        // Trimmed in amortised steps: at most twice the tail is ever held.
        if self.buf.len() > 2 * STDERR_TAIL {
            self.buf.drain(..self.buf.len() - STDERR_TAIL);
        }
    }

    /// The kept bytes as text, for an error message: `(empty)`, or the tail with how much came before.
    pub(super) fn describe(&self) -> String {
        let kept = &self.buf[self.buf.len().saturating_sub(STDERR_TAIL)..];
        let text = String::from_utf8_lossy(kept);
        let text = text.trim();
        if self.total == 0 || text.is_empty() {
            return "stderr is empty".into();
        }
        if self.total > kept.len() as u64 {
            format!(
                "stderr (last {} of {} bytes): {text}",
                kept.len(),
                self.total
            )
        } else {
            format!("stderr: {text}")
        }
    }
}
