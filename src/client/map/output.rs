//! `--out`: each ok job's output written to its file atomically (a temporary file in the same
//! directory, renamed over the output), so an interrupt, a crash or a failed job never leaves a
//! half-written output; failed jobs are reported on stderr.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;

use super::super::call::{Finished, Sink};
use super::super::progress::Progress;
use super::super::record::outcome_name;
use super::super::ClientError;
use super::MapTag;
use crate::outcome::Outcome;

/// Held while an output is being written: who takes it knows that no output is half-written.
static WRITING: Mutex<()> = Mutex::new(());
/// Numbers temporary files within this process.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Waits until no output is half-written and keeps new ones from starting while the guard lives:
/// for exiting at once (a second Ctrl-C) without leaving a temporary file behind.
pub fn hold_outputs() -> MutexGuard<'static, ()> {
    WRITING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes ok outputs to the paths their tags name.
#[derive(Debug)]
pub(super) struct FileSink {
    progress: Progress,
    /// Directories known to exist.
    dirs: HashSet<PathBuf>,
}

// === impl FileSink ===

impl FileSink {
    pub(super) fn new(progress: Progress) -> Self {
        Self {
            progress,
            dirs: HashSet::new(),
        }
    }
}

impl Sink<MapTag> for FileSink {
    async fn deliver(&mut self, done: &[Finished<MapTag>]) -> Result<(), ClientError> {
        let mut writes = Vec::new();
        for f in done {
            let r = &f.result;
            match (Outcome::from_proto(r.outcome), &f.tag.out) {
                (Some(Outcome::Ok), Some(out)) => writes.push((out.clone(), r.output.clone())),
                (Some(Outcome::Ok), None) => {}
                _ => self.progress.message(&format!(
                    "batchctl: {}: {}: {}",
                    r.job_id,
                    outcome_name(r.outcome),
                    r.error
                )),
            }
        }
        if writes.is_empty() {
            return Ok(());
        }
        let mut dirs = std::mem::take(&mut self.dirs);
        let (dirs, res) = tokio::task::spawn_blocking(move || {
            let res = writes
                .iter()
                .try_for_each(|(out, bytes)| write_atomic(out, bytes, &mut dirs));
            (dirs, res)
        })
        .await
        .map_err(|e| ClientError::Output(std::io::Error::other(e)))?;
        self.dirs = dirs;
        res.map_err(ClientError::Output)
    }

    async fn finish(&mut self) -> Result<(), ClientError> {
        Ok(())
    }
}

/// Writes `bytes` to `out` through a temporary file in its directory (made if missing); on error
/// nothing is left but what was there before. The error names `out`.
pub(super) fn write_atomic(
    out: &Path,
    bytes: &Bytes,
    dirs: &mut HashSet<PathBuf>,
) -> std::io::Result<()> {
    let named =
        |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", out.display()));
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if out.file_name().is_none() {
        return Err(named(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the output path names no file",
        )));
    }
    if !dirs.contains(dir) {
        std::fs::create_dir_all(dir).map_err(named)?;
        dirs.insert(dir.to_owned());
    }
    let n = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".batchctl-{}-{n}.tmp", pid()));
    let _writing = hold_outputs();
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        drop(f);
        std::fs::rename(&tmp, out)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(named)
}

/// This process's id (read once: it is in every temporary file's name).
fn pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(std::process::id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn writes_through_a_temporary_file_and_leaves_nothing_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut dirs = HashSet::new();
        let out = dir.path().join("a/b/out.txt");
        write_atomic(&out, &Bytes::from_static(b"one"), &mut dirs).unwrap();
        write_atomic(&out, &Bytes::from_static(b"two"), &mut dirs).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"two");
        assert_eq!(entries(&dir.path().join("a/b")), ["out.txt"]);

        // A directory where the output should go: the rename fails, the temporary file goes.
        let taken = dir.path().join("a/b/taken");
        std::fs::create_dir(&taken).unwrap();
        std::fs::write(taken.join("inside"), b"x").unwrap();
        let e = write_atomic(&taken, &Bytes::from_static(b"x"), &mut dirs).unwrap_err();
        assert!(
            e.to_string().starts_with(&taken.display().to_string()),
            "{e}"
        );
        assert_eq!(entries(&dir.path().join("a/b")), ["out.txt", "taken"]);

        // A file where a directory should be.
        let e = write_atomic(&out.join("x"), &Bytes::new(), &mut dirs).unwrap_err();
        assert!(e.to_string().contains("out.txt/x"), "{e}");
        assert_eq!(std::fs::read(&out).unwrap(), b"two");
    }
}
