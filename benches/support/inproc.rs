//! `batchd::Server` on its own 2-thread tokio runtime inside the bench process: the engine's
//! counters and the runtime's live tasks can be read, and commands run by exec handlers are
//! children of the bench process. A small copy of `tests/support`'s `TestServer` (see the module
//! map for why), without the admin listener. [`InProc::start_exec`] sets exec handlers up the way
//! the `batchd` binary does.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use batchd::config::Config;
use batchd::handlers::exec::{self, Reaper};
use batchd::{Engine, Registry, Server};
use tokio_util::sync::CancellationToken;

/// The server, stopped (and its jobs cancelled) when dropped.
pub struct InProc {
    /// The gRPC address it serves on.
    pub addr: SocketAddr,
    pub engine: Engine,
    runtime: tokio::runtime::Handle,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProc {
    /// Serves `config` (listening on 127.0.0.1:0 instead of its `listen`) with `registry`.
    pub fn start(config: Config, registry: Registry) -> Self {
        Self::start_then(config, registry, async {})
    }

    /// [`InProc::start`]; `after` runs on the server's runtime once the server has stopped.
    pub fn start_then(
        config: Config,
        registry: Registry,
        after: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        Self::launch(config, registry, || {}, after)
    }

    /// The built-in handlers and the config's `[[exec]]` handlers, set up as `batchd` sets them
    /// up: `exec::start_up` on the server's runtime before it serves (this process becomes the
    /// subreaper of the commands' orphans and reaps them, and the isolation is decided), and,
    /// once the server has stopped, a wait for the reaper's kill tasks. Returns the reaper too.
    ///
    /// Reaping orphans takes every exited child of this process's main thread: from here on the
    /// bench's own thread must not wait for children of its own by pid (std's `Command::status`,
    /// `Child::wait`). Run such scenarios first.
    pub fn start_exec(config: Config) -> (Self, Reaper) {
        let mut registry = Registry::builtin();
        let reaper = exec::register(&mut registry, &config.exec)
            .unwrap_or_else(|e| panic!("the bench's exec handlers: {e}"));
        let (up, down) = (reaper.clone(), reaper.clone());
        let server = Self::launch(config, registry, move || exec::start_up(&up), async move {
            down.shutdown().await;
        });
        (server, reaper)
    }

    /// Serves on a thread of its own: `before` runs on the server's runtime before it serves,
    /// `after` once it has stopped.
    fn launch(
        mut config: Config,
        registry: Registry,
        before: impl FnOnce() + Send + 'static,
        after: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = listener.local_addr().expect("the listener's address");
        config.listen = addr;
        config.validate().expect("a valid config");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("the server's runtime");
        let handle = runtime.handle().clone();
        let server = Server::new(config, registry);
        let engine = server.engine().clone();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let thread = std::thread::spawn(move || {
            runtime
                .block_on(async move {
                    before();
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    let res = server.serve(listener, token.cancelled_owned()).await;
                    after.await;
                    res
                })
                .expect("the in-process server failed");
            runtime.shutdown_timeout(Duration::from_secs(2));
        });
        Self {
            addr,
            engine,
            runtime: handle,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Tasks alive on the server's runtime.
    pub fn alive_tasks(&self) -> usize {
        self.runtime.metrics().num_alive_tasks()
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        self.stop.cancel();
        self.engine.cancel_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
