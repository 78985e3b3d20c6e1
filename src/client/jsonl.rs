//! Results as JSON Lines on a writer, in completion order or (`--ordered`) in input order: the sink
//! of `batchctl run`, and of `batchctl map` without `--out`.

use std::collections::BTreeMap;

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};

use super::call::{Finished, Sink};
use super::record::ResultRecord;
use super::ClientError;

/// Writes each result as a [`ResultRecord`] line.
#[derive(Debug)]
pub struct JsonlSink<W> {
    out: BufWriter<W>,
    ordered: bool,
    /// Lines waiting for earlier ones (`--ordered`), by input sequence; `None`: no line will come.
    reorder: BTreeMap<u64, Option<Vec<u8>>>,
    next_out: u64,
}

// === impl JsonlSink ===

impl<W: AsyncWrite + Unpin> JsonlSink<W> {
    /// Lines to `out`, in input order when `ordered`.
    pub fn new(out: W, ordered: bool) -> Self {
        Self {
            out: BufWriter::new(out),
            ordered,
            reorder: BTreeMap::new(),
            next_out: 0,
        }
    }

    /// Files `line` (or the news that `seq` has none) and writes every line now due.
    async fn put(&mut self, seq: u64, line: Option<Vec<u8>>) -> Result<(), ClientError> {
        if !self.ordered {
            return match line {
                Some(line) => self.write(&line).await,
                None => Ok(()),
            };
        }
        self.reorder.insert(seq, line);
        while let Some(line) = self.reorder.remove(&self.next_out) {
            if let Some(line) = line {
                self.write(&line).await?;
            }
            self.next_out += 1;
        }
        Ok(())
    }

    async fn write(&mut self, line: &[u8]) -> Result<(), ClientError> {
        self.out.write_all(line).await.map_err(ClientError::Output)
    }
}

impl<W: AsyncWrite + Unpin, T> Sink<T> for JsonlSink<W> {
    async fn deliver(&mut self, done: &[Finished<T>]) -> Result<(), ClientError> {
        for f in done {
            let line = ResultRecord::new(&f.result, f.attempts).to_line();
            self.put(f.seq, Some(line)).await?;
        }
        // Pushed out, so an interrupted run keeps what it reported.
        self.out.flush().await.map_err(ClientError::Output)
    }

    fn skip(&mut self, seq: u64) {
        if self.ordered {
            self.reorder.insert(seq, None);
        }
    }

    fn held(&self) -> usize {
        self.reorder.len()
    }

    async fn finish(&mut self) -> Result<(), ClientError> {
        // The run stopped early: the lines still waiting for earlier ones go out as they are.
        for line in std::mem::take(&mut self.reorder).into_values().flatten() {
            self.write(&line).await?;
        }
        self.out.flush().await.map_err(ClientError::Output)
    }
}
