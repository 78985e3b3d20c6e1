//! `conns`: 8,000 connections, each with one finished echo call, held idle and then closed; the
//! daemon's RSS fresh, while they are open, and 1 s and 3 s after they closed.

use std::time::Duration;

use futures_util::StreamExt;

use crate::churn::fresh_echo;
use crate::support::client::connect;
use crate::support::daemon::Daemon;
use crate::support::report::figure;
use crate::support::scenarios::knob;

/// Connections (unless `CONNS` says otherwise), opened how many at a time.
const CONNS: usize = 8_000;
const AT_ONCE: usize = 200;

pub async fn run() {
    let count = knob("CONNS", CONNS);
    println!("\n== conns: {count} connections, one echo call each, held idle, then closed ==");
    let d = Daemon::spawn(&["--set", "max_calls=20000"]);
    let url = d.url();
    let (fresh, fresh_anon) = (d.rss_kb(), d.rss_anon_kb());
    crate::churn::warm_up(&url).await;
    let base = d.rss_kb();
    let clients: Vec<_> = futures_util::stream::iter(0..count)
        .map(|_| {
            let url = url.clone();
            async move {
                let c = connect(&url).await;
                fresh_echo(&c).await;
                c
            }
        })
        .buffer_unordered(AT_ONCE)
        .collect()
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let open = d.rss_kb();
    drop(clients);
    // The daemon notices the closed sockets at once, but closing 8,000 takes it a moment on a busy
    // machine; it hands memory back 0.25-0.5 s after it is idle (src/bin/batchd/hand_back.rs).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after_1s = d.rss_kb();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let after = d.rss_kb();
    let after_anon = d.rss_anon_kb();
    let probe = connect(&url).await;
    let _ = fresh_echo(&probe).await;
    drop(probe);
    figure("conns_rss_fresh_kib", fresh);
    figure("conns_rss_before_kib", base);
    figure("conns_rss_open_kib", open);
    figure(
        "conns_rss_per_open_conn_bytes",
        format!(
            "{:.0}",
            (open.saturating_sub(base) * 1024) as f64 / count as f64
        ),
    );
    figure("conns_rss_1s_after_close_kib", after_1s);
    figure("conns_rss_after_close_kib", after);
    figure(
        "conns_rss_anon_after_close_vs_fresh_kib",
        format!("{:+}", after_anon as i64 - fresh_anon as i64),
    );
    figure(
        "conns_rss_after_close_vs_before_kib",
        format!("{:+}", after as i64 - base as i64),
    );
    figure("conns_peak_rss_kib", d.hwm_kb());
}
