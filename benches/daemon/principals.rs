//! Fairness by principal (issue 11), two scenarios:
//! - `principals`: echo throughput of 3 principals of weights 1, 2 and 4, each with the same number
//!   of calls and far more jobs than its share: each one's share of the jobs done, against its
//!   weight's, with 7 workers (the pool limits echo) and with 70 (the clients do); `WEIGHT_WORKERS`
//!   picks one.
//! - `principals_cost`: what the hierarchy costs when no principal is configured: echo jobs per
//!   server CPU-second (the `echo` scenario). With `BATCHD_BENCH_BASE_BIN` set to another build,
//!   interleaved pairs base/new (`PAIRS` of them, default 5), each pair's figures, the ratios and
//!   their spread; "new" is the harness's daemon (`BATCHD_BENCH_BIN` or this build's).

use std::ffi::OsString;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::echo;
use crate::support::client::{connect, open_call_as};
use crate::support::daemon::Daemon;
use crate::support::flow::{echo_batches, Flow};
use crate::support::report::figure;
use crate::support::scenarios::knob;

const BATCH: usize = 100;
const PAYLOAD: usize = 64;
/// Jobs a call may have sent and not had answered, with a session window to match: each principal
/// keeps a backlog of about 0.1 s of its share, so a client that the busy machine stalls for a
/// moment does not leave its principal without jobs (its share would go to the others, as it
/// should).
const WEIGHTS_IN_FLIGHT: usize = 16_384;
const WEIGHTS_WINDOW: &str = "session_window=8192";
const WARMUP: Duration = Duration::from_secs(1);
const RUN: Duration = Duration::from_secs(5);
const WEIGHTS: [u32; 3] = [1, 2, 4];
const CALLS_PER_PRINCIPAL: usize = 2;

// === weights ===

pub async fn weights() {
    let workers = std::env::var("WEIGHT_WORKERS");
    // The pool is what the weights share: with 7 slots it is what limits echo here. With 70, echo
    // jobs leave their slots at once and the limit is how fast the clients (on the same two cores)
    // send: each principal gets what its client sends.
    for w in workers.as_deref().map_or(vec!["7", "70"], |w| vec![w]) {
        weights_with(w).await;
    }
}

async fn weights_with(workers: &str) {
    println!(
        "\n== principals: 3 principals of weights {WEIGHTS:?}, {CALLS_PER_PRINCIPAL} calls each, \
         echo batches of {BATCH}, workers {workers} =="
    );
    let mut config = String::new();
    for w in WEIGHTS {
        let digest = hex(&Sha256::digest(format!("token-w{w}").as_bytes()));
        config.push_str(&format!(
            "[[principal]]\nname = \"w{w}\"\ntoken_sha256 = \"{digest}\"\nweight = {w}\n\n"
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("batchd.toml");
    std::fs::write(&path, config).unwrap();
    let path = path.to_str().unwrap();
    let args = [
        "--config",
        path,
        "--workers",
        workers,
        "--set",
        WEIGHTS_WINDOW,
    ];
    let d = Daemon::spawn(&args);
    let mut loads = Vec::new();
    for w in WEIGHTS {
        let token = format!("token-w{w}");
        let calls = CALLS_PER_PRINCIPAL;
        loads.push(Load::start(&d.url(), calls, &token, WEIGHTS_IN_FLIGHT).await);
    }
    tokio::time::sleep(WARMUP).await;
    let before: Vec<u64> = loads.iter().map(Load::done).collect();
    let t0 = Instant::now();
    tokio::time::sleep(RUN).await;
    let after: Vec<u64> = loads.iter().map(Load::done).collect();
    let wall = t0.elapsed().as_secs_f64();
    for l in loads {
        l.stop().await;
    }
    let jobs: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let total: u64 = jobs.iter().sum();
    let weight_sum: u32 = WEIGHTS.iter().sum();
    let mut worst: f64 = 0.0;
    for (w, n) in WEIGHTS.iter().zip(&jobs) {
        let share = *n as f64 / total as f64;
        let want = f64::from(*w) / f64::from(weight_sum);
        let off = (share / want - 1.0) * 100.0;
        worst = worst.max(off.abs());
        figure(
            &format!("weights_{workers}_w{w}_jobs_per_s"),
            format!(
                "{:.0}  share {share:.3} (weight share {want:.3}, {off:+.1}%)",
                *n as f64 / wall
            ),
        );
    }
    figure(
        &format!("weights_{workers}_total_jobs_per_s"),
        format!("{:.0}", total as f64 / wall),
    );
    figure(
        &format!("weights_{workers}_max_share_deviation_pct"),
        format!("{worst:.1}"),
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Echo calls of one principal that keep `in_flight` jobs each outstanding; counts the results.
struct Load {
    flows: Vec<Flow>,
}

impl Load {
    /// Opens `calls` calls on `url`, each on its own connection, with the bearer `token`.
    async fn start(url: &str, calls: usize, token: &str, in_flight: usize) -> Self {
        let mut flows = Vec::new();
        for c in 0..calls {
            let client = connect(url).await;
            let call = open_call_as(&client, 16, Some(token)).await;
            let rt = tokio::runtime::Handle::current();
            let batches = echo_batches(c, PAYLOAD, BATCH);
            flows.push(Flow::start(&rt, call, client, in_flight, BATCH, batches));
        }
        Self { flows }
    }

    fn done(&self) -> u64 {
        self.flows.iter().map(Flow::done).sum()
    }

    async fn stop(self) {
        for f in self.flows {
            f.stop().await;
        }
    }
}

// === cost of the hierarchy without principals, or of any change: interleaved echo pairs ===

/// Echo jobs per server CPU-second of `bin` (the harness's daemon when `None`).
async fn echo_per_cpu_s(bin: Option<&OsString>) -> f64 {
    let d = match bin {
        Some(bin) => Daemon::spawn_bin(bin, &[]),
        None => Daemon::spawn(&[]),
    };
    echo::measure(&d).await.jobs_per_server_cpu_s()
}

pub async fn cost() {
    println!(
        "\n== principals_cost: echo, {} calls, no principal (one implicit group) ==",
        echo::CALLS
    );
    let Some(base) = std::env::var_os("BATCHD_BENCH_BASE_BIN") else {
        figure(
            "cost_echo_jobs_per_server_cpu_s",
            format!("{:.0}", echo_per_cpu_s(None).await),
        );
        println!("(set BATCHD_BENCH_BASE_BIN to another build for interleaved pairs)");
        return;
    };
    let pairs: usize = knob("PAIRS", 5);
    let mut ratios = Vec::new();
    let (mut bases, mut news) = (Vec::new(), Vec::new());
    for i in 0..pairs {
        // Alternate which runs first, so that drift on a shared machine hits both alike.
        let (b, n) = if i % 2 == 0 {
            let b = echo_per_cpu_s(Some(&base)).await;
            (b, echo_per_cpu_s(None).await)
        } else {
            let n = echo_per_cpu_s(None).await;
            (echo_per_cpu_s(Some(&base)).await, n)
        };
        let load = crate::support::procfs::load_average();
        figure(
            &format!("cost_pair_{i}"),
            format!(
                "base {b:.0}  new {n:.0}  new/base {:.3}  load {load}",
                n / b
            ),
        );
        ratios.push(n / b);
        bases.push(b);
        news.push(n);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (mean_ratio, n) = (mean(&ratios), ratios.len() as f64);
    let sd =
        (ratios.iter().map(|r| (r - mean_ratio).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
    let ahead = ratios.iter().filter(|r| **r > 1.0).count();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let spread = |v: &[f64]| v.last().unwrap() / v.first().unwrap();
    let (mb, mn, mr) = (median(&mut bases), median(&mut news), median(&mut ratios));
    figure(
        "cost_base_median_jobs_per_server_cpu_s",
        format!(
            "{mb:.0} (max/min {:.2}, mean {:.0})",
            spread(&bases),
            mean(&bases)
        ),
    );
    figure(
        "cost_new_median_jobs_per_server_cpu_s",
        format!(
            "{mn:.0} (max/min {:.2}, mean {:.0})",
            spread(&news),
            mean(&news)
        ),
    );
    figure(
        "cost_new_over_base_median",
        format!(
            "{mr:.3} (pairs from {:.3} to {:.3})",
            ratios.first().unwrap(),
            ratios.last().unwrap()
        ),
    );
    figure(
        "cost_new_over_base_mean",
        format!(
            "{mean_ratio:.4} ± {:.4} SE (sd {sd:.4}), new ahead in {ahead} of {pairs}",
            sd / n.sqrt()
        ),
    );
}
