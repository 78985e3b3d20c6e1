//! A bounded pool for CPU-bound handler work, apart from the async runtime's workers.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::HandlerError;

/// At most `threads` pieces of CPU work at once, on tokio's blocking threads.
#[derive(Debug, Clone)]
pub struct CpuPool {
    permits: Arc<Semaphore>,
}

impl CpuPool {
    /// A pool running at most `threads` pieces of work at once (at least one).
    pub fn new(threads: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(threads.max(1))),
        }
    }

    /// Runs `work` on a blocking thread once a permit is free; cancels `cancel` if the caller goes away.
    pub(super) async fn run<F, R>(
        &self,
        cancel: CancellationToken,
        work: F,
    ) -> Result<R, HandlerError>
    where
        F: FnOnce(&CancellationToken) -> R + Send + 'static,
        R: Send + 'static,
    {
        // Blocking work cannot be aborted, only asked to stop: if this future is dropped the guard
        // cancels the token the work polls, and the permit stays taken until the work really ends.
        let _stop_on_drop = cancel.clone().drop_guard();
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| HandlerError("the CPU pool is closed".into()))?;
        let handle = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work(&cancel)
        });
        handle
            .await
            .map_err(|e| HandlerError(format!("CPU work failed: {e}")))
    }

    /// Permits currently free (for tests and stats).
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }
}
