//! End-to-end benchmark of `batchctl run` (issue 3): the release `batchctl` runs a file of echo jobs
//! through the release `batchd`, both as real processes on this machine.
//!
//! Measures wall time (spawn to exit) → jobs/s end to end, and batchctl's peak RSS: `/proc/PID/status`
//! polled every 10 ms (largest `VmHWM` / `VmRSS` seen), and, when `/usr/bin/time` is present, the
//! kernel's own maximum (`/usr/bin/time -v`, "Maximum resident set size"). Runs a 100,000-line and
//! a 1,000,000-line file to show that the peak does not grow with the input.
//! Target: peak RSS under 32 MiB whatever the input size.
//!
//! Run: `cargo bench --bench batchctl`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::daemon::Daemon;
use support::procfs::{self, first_child, status_value};
use support::report::figure;

/// Input sizes, smallest first, unless `BATCHCTL_BENCH_LINES=100000,5000000` names others.
const SIZES: [u64; 2] = [100_000, 1_000_000];
/// Runs of each size; the fastest gives the rate, the largest peak the RSS.
const RUNS: usize = 3;
/// The target of issue 3.
const RSS_TARGET_MIB: f64 = 32.0;
/// How often batchctl's `/proc/PID/status` is read.
const POLL: Duration = Duration::from_millis(10);
const TIME_V: &str = "/usr/bin/time";

fn main() {
    procfs::print_machine();
    let dir = tempfile::tempdir().unwrap();
    // A config file named in the environment would change what is measured.
    let daemon = Daemon::spawn_with(&[], |cmd| {
        cmd.env_remove("BATCHD_CONFIG");
    });
    let url = daemon.url();
    let time_v = Path::new(TIME_V).exists();
    println!(
        "batchctl bench: daemon {url} (release), /usr/bin/time -v: {}",
        if time_v { "yes" } else { "no" }
    );

    let sizes: Vec<u64> = match std::env::var("BATCHCTL_BENCH_LINES") {
        Ok(list) => list
            .split(',')
            .map(|n| {
                n.trim()
                    .replace('_', "")
                    .parse()
                    .expect("BATCHCTL_BENCH_LINES: numbers")
            })
            .collect(),
        Err(_) => SIZES.to_vec(),
    };
    let mut peaks = Vec::new();
    for n in sizes {
        let input = job_file(dir.path(), n);
        let size = std::fs::metadata(&input).unwrap().len();
        figure(&format!("input_{n}.bytes"), size);
        let mut runs: Vec<Run> = (0..RUNS).map(|_| run(&url, &input, n, time_v)).collect();
        for (i, r) in runs.iter().enumerate() {
            figure(
                &format!("run_{n}[{i}]"),
                format!(
                    "wall {:.2} s, {:.0} jobs/s, peak RSS polled {:.1} MiB (VmRSS max {:.1} MiB, {} samples){}, cpu user {} sys {}",
                    r.wall.as_secs_f64(),
                    n as f64 / r.wall.as_secs_f64(),
                    mib(r.hwm_kib),
                    mib(r.rss_kib),
                    r.samples,
                    r.time_v_kib.map_or(String::new(), |k| format!(", time -v max RSS {:.1} MiB", mib(k))),
                    r.user.as_deref().unwrap_or("?"),
                    r.sys.as_deref().unwrap_or("?"),
                ),
            );
        }
        runs.sort_by_key(|r| r.wall);
        let best = &runs[0];
        let peak = runs.iter().map(Run::peak_kib).max().unwrap();
        figure(&format!("jobs_{n}"), n);
        figure(
            &format!("wall_s_{n}"),
            format!("{:.2}", best.wall.as_secs_f64()),
        );
        figure(
            &format!("jobs_per_s_{n}"),
            format!("{:.0}", n as f64 / best.wall.as_secs_f64()),
        );
        figure(&format!("peak_rss_mib_{n}"), format!("{:.1}", mib(peak)));
        peaks.push((n, peak));
        std::fs::remove_file(&input).unwrap();
    }

    let (small_n, small) = peaks[0];
    let (big_n, big) = peaks[peaks.len() - 1];
    figure(
        &format!("peak_rss_growth_mib_{small_n}_to_{big_n}"),
        format!("{:+.1}", mib(big) - mib(small)),
    );
    let worst = peaks.iter().map(|(_, p)| mib(*p)).fold(0.0, f64::max);
    figure(
        &format!("target_peak_rss_under_{RSS_TARGET_MIB}_mib"),
        format!(
            "{} (worst {worst:.1} MiB)",
            if worst < RSS_TARGET_MIB {
                "met"
            } else {
                "NOT met"
            }
        ),
    );
    if let Some(hwm) = procfs::status(daemon.pid()).and_then(|s| status_value(&s, "VmHWM")) {
        figure("batchd_peak_rss_mib", format!("{:.1}", mib(hwm)));
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// `n` echo jobs, one JSON object a line, with a distinct id and a short payload.
fn job_file(dir: &Path, n: u64) -> PathBuf {
    let path = dir.join(format!("jobs-{n}.jsonl"));
    let mut f = BufWriter::with_capacity(1 << 20, std::fs::File::create(&path).unwrap());
    for i in 0..n {
        writeln!(
            f,
            r#"{{"id":"job-{i}","handler":"echo","payload":"payload number {i}"}}"#
        )
        .unwrap();
    }
    f.flush().unwrap();
    path
}

// === one run of batchctl ===

struct Run {
    wall: Duration,
    /// Largest VmHWM seen in /proc/PID/status, KiB.
    hwm_kib: u64,
    /// Largest VmRSS seen, KiB.
    rss_kib: u64,
    samples: u64,
    /// `/usr/bin/time -v`'s maximum resident set size, KiB.
    time_v_kib: Option<u64>,
    user: Option<String>,
    sys: Option<String>,
}

impl Run {
    fn peak_kib(&self) -> u64 {
        self.hwm_kib
            .max(self.rss_kib)
            .max(self.time_v_kib.unwrap_or(0))
    }
}

/// Runs `batchctl run --quiet --output /dev/null INPUT` (under `/usr/bin/time -v` if `time_v`).
fn run(url: &str, input: &Path, n: u64, time_v: bool) -> Run {
    let ctl = env!("CARGO_BIN_EXE_batchctl");
    let args = [
        "--endpoint",
        url,
        "run",
        "--quiet",
        "--output",
        "/dev/null",
        input.to_str().unwrap(),
    ];
    let mut cmd = if time_v {
        let mut c = Command::new(TIME_V);
        c.arg("-v").arg(ctl);
        c
    } else {
        Command::new(ctl)
    };
    cmd.args(args)
        .env_remove("BATCHD_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());

    let start = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        pipe.read_to_string(&mut s).unwrap();
        s
    });
    // Under time(1), batchctl is its child: find its pid.
    let mut pid = (!time_v).then(|| i32::try_from(child.id()).unwrap());
    let (mut hwm, mut rss, mut samples) = (0u64, 0u64, 0u64);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if pid.is_none() {
            pid = first_child(i32::try_from(child.id()).unwrap());
        }
        if let Some(status) = pid.and_then(procfs::status) {
            hwm = hwm.max(status_value(&status, "VmHWM").unwrap_or(0));
            rss = rss.max(status_value(&status, "VmRSS").unwrap_or(0));
            samples += 1;
        }
        std::thread::sleep(POLL);
    };
    let wall = start.elapsed();
    let stderr = reader.join().unwrap();
    assert!(status.success(), "batchctl failed ({status}):\n{stderr}");
    let summary = stderr
        .lines()
        .find(|l| l.starts_with("batchctl: "))
        .unwrap_or_default();
    assert!(
        summary.starts_with(&format!("batchctl: {n} jobs in"))
            && summary.ends_with(&format!(": {n} ok")),
        "every job ends ok: {stderr}"
    );
    let grab = |key: &str| {
        stderr
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .map(|v| v.trim().to_owned())
    };
    Run {
        wall,
        hwm_kib: hwm,
        rss_kib: rss,
        samples,
        time_v_kib: grab("Maximum resident set size (kbytes):").map(|v| v.parse().unwrap()),
        user: grab("User time (seconds):"),
        sys: grab("System time (seconds):"),
    }
}
