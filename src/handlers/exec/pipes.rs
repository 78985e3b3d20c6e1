//! The command's three pipes: the payload in, the output out (capped), the end of stderr kept.

use std::io;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::handlers::HandlerError;

/// Bytes of stderr kept for the error of a failed job.
pub(super) const STDERR_TAIL: usize = 2048;
/// Bytes read from a pipe at a time.
const CHUNK: usize = 64 * 1024;

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
