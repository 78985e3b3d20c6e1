//! A TCP proxy in front of a server that can reset its connections or freeze them silently.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A TCP proxy in front of the server, which can reset its connections or freeze them silently.
pub struct Proxy {
    pub addr: SocketAddr,
    /// Cancel to close every connection with RST (SO_LINGER 0), both ways.
    pub reset: CancellationToken,
    /// Cancel to stop copying: every connection stays open and goes silent.
    pub freeze: CancellationToken,
    /// Frozen connections, kept open (and silent) until the proxy is dropped.
    frozen: Arc<Mutex<Vec<(TcpStream, TcpStream)>>>,
    stop: CancellationToken,
}

impl Proxy {
    /// A proxy on a free port of 127.0.0.1 to `target`, serving on the current runtime.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = Self {
            addr,
            reset: CancellationToken::new(),
            freeze: CancellationToken::new(),
            frozen: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (reset, freeze, frozen, stop) = (
            proxy.reset.clone(),
            proxy.freeze.clone(),
            Arc::clone(&proxy.frozen),
            proxy.stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    () = stop.cancelled() => return,
                    conn = listener.accept() => conn.unwrap(),
                };
                let mut server = TcpStream::connect(target).await.unwrap();
                let (reset, freeze, frozen, stop) = (
                    reset.clone(),
                    freeze.clone(),
                    Arc::clone(&frozen),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        () = stop.cancelled() => {}
                        () = reset.cancelled() => {
                            // SO_LINGER 0: closing sends RST instead of FIN, both ways.
                            server.set_zero_linger().unwrap();
                            client.set_zero_linger().unwrap();
                        }
                        () = freeze.cancelled() => frozen.lock().unwrap().push((client, server)),
                    }
                });
            }
        });
        proxy
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.frozen.lock().unwrap().clear();
    }
}
