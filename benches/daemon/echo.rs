//! `echo`: throughput and server CPU per job, 4 calls keeping the daemon busy with echo batches.

use std::time::{Duration, Instant};

use crate::support::client::{connect, open_call};
use crate::support::daemon::Daemon;
use crate::support::flow::{echo_batches, Flow};
use crate::support::procfs::self_cpu_s;
use crate::support::report::figure;

/// Concurrent calls, jobs per batch, payload bytes, warm-up and measured time.
pub const CALLS: usize = 4;
const BATCH: usize = 100;
const PAYLOAD: usize = 64;
const WARMUP: Duration = Duration::from_secs(1);
const RUN: Duration = Duration::from_secs(5);
/// Jobs a call may have sent and not seen the result of: twice the default session window, so the
/// server always has the next batch waiting while its window is full.
const IN_FLIGHT: usize = 2 * 1024;

/// What one echo run measured.
pub struct EchoRun {
    /// Results received in the measured time.
    pub jobs: u64,
    pub wall: Duration,
    /// The daemon's CPU time in the measured time: from schedstat and from ticks.
    pub server_cpu_s: f64,
    pub server_tick_s: f64,
    pub client_cpu_s: f64,
    /// Results that were not OK, over the whole run.
    pub not_ok: u64,
    pub threads: u64,
}

impl EchoRun {
    /// The figure of issues 2 and 15.
    pub fn jobs_per_server_cpu_s(&self) -> f64 {
        self.jobs as f64 / self.server_cpu_s
    }
}

pub async fn run() {
    println!("\n== echo: {CALLS} calls, batches of {BATCH}, {PAYLOAD}-byte payloads ==");
    let d = Daemon::spawn(&[]);
    let r = measure(&d).await;
    let wall = r.wall.as_secs_f64();
    figure("echo_jobs", r.jobs);
    figure("echo_wall_s", format!("{wall:.2}"));
    figure("echo_not_ok_results", r.not_ok);
    figure(
        "echo_throughput_jobs_per_s",
        format!("{:.0}", r.jobs as f64 / wall),
    );
    figure("echo_server_cpu_s", format!("{:.3}", r.server_cpu_s));
    figure(
        "echo_server_cpu_s_from_ticks",
        format!("{:.2}", r.server_tick_s),
    );
    figure(
        "echo_server_cpu_utilisation_cores",
        format!("{:.2}", r.server_cpu_s / wall),
    );
    figure(
        "echo_jobs_per_server_cpu_s",
        format!("{:.0}", r.jobs_per_server_cpu_s()),
    );
    figure("echo_client_cpu_s", format!("{:.2}", r.client_cpu_s));
    figure("echo_server_threads", r.threads);
}

/// Runs the echo load against `d`: 1 s of warm-up, then 5 s measured.
pub async fn measure(d: &Daemon) -> EchoRun {
    let url = d.url();
    let mut flows = Vec::new();
    for c in 0..CALLS {
        let client = connect(&url).await;
        let call = open_call(&client, 16).await;
        let rt = tokio::runtime::Handle::current();
        let batches = echo_batches(c, PAYLOAD, BATCH);
        flows.push(Flow::start(&rt, call, client, IN_FLIGHT, BATCH, batches));
    }
    let received = |flows: &[Flow]| flows.iter().map(Flow::done).sum::<u64>();
    tokio::time::sleep(WARMUP).await;
    let (cpu0, client0, jobs0, t0) = (d.cpu(), self_cpu_s(), received(&flows), Instant::now());
    tokio::time::sleep(RUN).await;
    let (cpu1, client1, jobs1, wall) = (d.cpu(), self_cpu_s(), received(&flows), t0.elapsed());
    let threads = d.threads();
    let not_ok = flows.iter().map(Flow::not_ok).sum();
    for f in flows {
        f.stop().await;
    }
    let (server_cpu_s, server_tick_s) = cpu1.since(cpu0);
    EchoRun {
        jobs: jobs1 - jobs0,
        wall,
        server_cpu_s,
        server_tick_s,
        client_cpu_s: client1 - client0,
        not_ok,
        threads,
    }
}
