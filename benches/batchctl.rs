//! End-to-end benchmark of `batchctl run` (issue 3): the release `batchctl` runs a file of echo jobs
//! through the release `batchd`, both as real processes on this machine.
//!
//! Measures wall time (spawn to exit) → jobs/s end to end, and batchctl's peak RSS: `/proc/PID/status`
//! polled every 10 ms (largest `VmHWM` / `VmRSS` seen), and, when `/usr/bin/time` is present, the
//! kernel's own maximum (`/usr/bin/time -v`, "Maximum resident set size"). Runs a 100,000-line and
//! a 1,000,000-line file to show that the peak does not grow with the input.
//! Target: peak RSS under 32 MiB whatever the input size.
//!
//! `batchctl map` (issue 14): files per second over 10,000 small files and MB/s over 100 files of
//! 10 MB, each hashed with sha256, beside GNU `parallel` and `xargs -P` running `sha256sum` on the
//! same files (see [`map_bench`]).
//!
//! Run: `cargo bench --bench batchctl` (both), `cargo bench --bench batchctl -- run` or `-- map`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::daemon::Daemon;
use support::procfs::{self, first_child, status_value};
use support::report::figure;

use sha2::Digest as _;

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
    // `cargo bench` passes `--bench`; the other arguments name the scenarios.
    let named: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wants = |name: &str| named.is_empty() || named.iter().any(|n| n == name);
    if wants("run") {
        run_bench();
    }
    if wants("map") {
        map_bench();
    }
}

/// `batchctl run` over files of echo jobs: jobs/s and peak RSS (issue 3).
fn run_bench() {
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

// === batchctl map (issue 14) ===

/// Small files: how many, and their sizes (bytes, cycling).
const SMALL_FILES: usize = 10_000;
const SMALL_SIZES: [usize; 4] = [512, 1_024, 2_048, 4_096];
/// Large files: how many, and the size of each (10 MB).
const LARGE_FILES: usize = 100;
const LARGE_SIZE: usize = 10_000_000;
/// Runs of each tool on each set unless `MAP_BENCH_RUNS` says otherwise; the fastest counts.
const MAP_RUNS: usize = 3;

/// One way to hash every file of a set.
struct Tool {
    name: &'static str,
    /// A shell command run in the set's directory; `$CTL` is batchctl, `$URL` the daemon.
    script: String,
    /// Whether it writes one output file per input into `out/` (checked against `sha256sum`).
    per_file: bool,
}

/// `batchctl map` beside `parallel` and `xargs -P` on the same files, all hashing with sha256: one
/// output file per input (`$OUT/NAME.sha256`), and one stream to /dev/null. Every tool runs with 2
/// processes at a time (the machine's cores); the daemon's sha256 handler runs small payloads
/// inline and large ones on its CPU pool (one thread per core). Peak RSS of batchctl is polled
/// from `/proc`; for the large files it also runs with `--max-in-flight-bytes 64MiB`.
/// `MAP_BENCH_SETS=small` or `large` runs one set, `MAP_BENCH_RUNS=N` sets the runs.
fn map_bench() {
    ensure_parallel();
    let dir = tempfile::tempdir().unwrap();
    // 10 MB files are over the default max_payload (8MiB); a request still fits 16MiB.
    let daemon = Daemon::spawn_with(&["--set", "max_payload=12MiB"], |cmd| {
        cmd.env_remove("BATCHD_CONFIG");
    });
    let url = daemon.url();
    let runs: usize = std::env::var("MAP_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MAP_RUNS);
    println!(
        "batchctl map bench: daemon {url} (release), {} and {}, {runs} runs each",
        command_version("parallel"),
        command_version("xargs")
    );

    // `MAP_BENCH_SETS=large` runs one set only.
    let sets = std::env::var("MAP_BENCH_SETS").unwrap_or_else(|_| "small,large".into());
    if sets.split(',').any(|s| s == "small") {
        let small = dir.path().join("small");
        let bytes = write_set(&small, SMALL_FILES, |i| SMALL_SIZES[i % SMALL_SIZES.len()]);
        map_set(&url, &small, "small", SMALL_FILES, bytes, runs, &[]);
        std::fs::remove_dir_all(&small).unwrap();
    }
    if !sets.split(',').any(|s| s == "large") {
        return;
    }
    let large = dir.path().join("large");
    let bytes = write_set(&large, LARGE_FILES, |_| LARGE_SIZE);
    map_set(
        &url,
        &large,
        "large",
        LARGE_FILES,
        bytes,
        runs,
        &[("batchctl_map_out_64mib", "--max-in-flight-bytes 64MiB")],
    );
    if let Some(hwm) = procfs::status(daemon.pid()).and_then(|s| status_value(&s, "VmHWM")) {
        figure("map_batchd_peak_rss_mib", format!("{:.1}", mib(hwm)));
    }
}

/// Installs GNU parallel with apt when it is missing (the bench compares against it).
fn ensure_parallel() {
    if Command::new("parallel").arg("--version").output().is_ok() {
        return;
    }
    println!("installing GNU parallel with apt-get");
    let apt = |args: &[&str]| {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .expect("apt-get");
        assert!(status.success(), "apt-get {args:?} failed");
    };
    apt(&["update"]);
    apt(&["install", "-y", "parallel"]);
}

fn command_version(cmd: &str) -> String {
    Command::new(cmd)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| format!("{cmd} (version unknown)"))
}

/// Writes `n` files `dir/in/fNNNNN` of `size(i)` bytes each; returns their total size.
fn write_set(dir: &Path, n: usize, size: impl Fn(usize) -> usize) -> u64 {
    let input = dir.join("in");
    std::fs::create_dir_all(&input).unwrap();
    let mut total = 0;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for i in 0..n {
        let len = size(i);
        let mut bytes = Vec::with_capacity(len);
        while bytes.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        bytes.truncate(len);
        std::fs::write(input.join(format!("f{i:05}")), &bytes).unwrap();
        total += len as u64;
    }
    total
}

/// Runs every tool on the set in `dir` and prints files/s, MB/s and batchctl's peak RSS.
fn map_set(
    url: &str,
    dir: &Path,
    set: &str,
    n: usize,
    bytes: u64,
    runs: usize,
    extra: &[(&'static str, &str)],
) {
    figure(&format!("map_{set}_files"), n);
    figure(&format!("map_{set}_bytes"), bytes);
    let mut tools = vec![
        Tool {
            name: "batchctl_map_out",
            script: "$CTL --endpoint $URL map sha256 -r in --out \"$OUT/{/}.sha256\" --quiet".into(),
            per_file: true,
        },
        Tool {
            name: "batchctl_map_jsonl",
            script: "$CTL --endpoint $URL map sha256 -r in --quiet > /dev/null".into(),
            per_file: false,
        },
        Tool {
            name: "parallel_out",
            script: "find in -type f | parallel -j2 --will-cite \"sha256sum {} > $OUT/{/}.sha256\""
                .into(),
            per_file: true,
        },
        Tool {
            name: "parallel_stdout",
            script: "find in -type f | parallel -j2 --will-cite sha256sum > /dev/null".into(),
            per_file: false,
        },
        Tool {
            name: "xargs_n1_out",
            script: "find in -type f -print0 | xargs -0 -P2 -n1 sh -c 'sha256sum \"$1\" > \"$OUT/${1##*/}.sha256\"' sh".into(),
            per_file: true,
        },
        Tool {
            name: "xargs_n1_stdout",
            script: "find in -type f -print0 | xargs -0 -P2 -n1 sha256sum > /dev/null".into(),
            per_file: false,
        },
        Tool {
            name: "xargs_n100_stdout",
            script: "find in -type f -print0 | xargs -0 -P2 -n100 sha256sum > /dev/null".into(),
            per_file: false,
        },
    ];
    // A reference for the hashing itself: coreutils' sha256sum does not use the CPU's SHA
    // instructions; OpenSSL (like the daemon's sha2 crate) does.
    if Command::new("openssl").arg("version").output().is_ok() {
        tools.push(Tool {
            name: "xargs_n100_openssl_stdout",
            script: "find in -type f -print0 | xargs -0 -P2 -n100 openssl dgst -sha256 > /dev/null"
                .into(),
            per_file: false,
        });
    }
    for (name, flags) in extra {
        tools.push(Tool {
            name,
            script: format!(
                "$CTL --endpoint $URL map sha256 -r in --out \"$OUT/{{/}}.sha256\" --quiet {flags}"
            ),
            per_file: true,
        });
    }
    // Outputs go to a new directory each run, all removed once the set is done: creating files
    // right after deleting as many makes ext4 scan its recently deleted inodes (`recently_deleted`
    // in a kernel profile), which multiplied the time of every tool that writes files up to 10×.
    // Runs interleaved (every tool once, then again), so that a busy moment of the shared
    // machine does not fall on one tool's runs only.
    let mut results: Vec<Vec<(Duration, u64)>> = vec![Vec::new(); tools.len()];
    for run in 0..runs {
        for (tool, times) in tools.iter().zip(&mut results) {
            let out = format!("out-{}-{run}", tool.name);
            std::fs::create_dir_all(dir.join(&out)).unwrap();
            sync();
            times.push(run_script(url, dir, &tool.script, &out));
            if tool.per_file {
                check_outputs(dir, &out, n);
            }
        }
    }
    for (tool, times) in tools.iter().zip(&results) {
        let (wall, _) = *times.iter().min_by_key(|(wall, _)| *wall).unwrap();
        let walls: Vec<String> = times
            .iter()
            .map(|(w, _)| format!("{:.2}", w.as_secs_f64()))
            .collect();
        let secs = wall.as_secs_f64();
        let name = tool.name;
        figure(
            &format!("map_{set}_{name}"),
            format!(
                "best {secs:.2} s of [{}] s, {:.0} files/s, {:.1} MB/s{}",
                walls.join(", "),
                n as f64 / secs,
                bytes as f64 / 1e6 / secs,
                if name.starts_with("batchctl") {
                    let peak = times.iter().map(|(_, p)| *p).max().unwrap_or(0);
                    format!(
                        ", batchctl peak RSS {:.1} MiB (largest of the runs)",
                        mib(peak)
                    )
                } else {
                    String::new()
                }
            ),
        );
    }
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("out-")
        {
            std::fs::remove_dir_all(path).unwrap();
        }
    }
}

/// Writes dirty pages out, so that one run's writeback does not land in the next one's time.
fn sync() {
    let _ = Command::new("sync").status();
}

/// Runs `script` with `sh -c` in `dir`; returns the wall time and the largest VmHWM seen of a
/// batchctl among the shell's children (0 when none).
fn run_script(url: &str, dir: &Path, script: &str, out: &str) -> (Duration, u64) {
    let start = Instant::now();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .env("CTL", env!("CARGO_BIN_EXE_batchctl"))
        .env("URL", url)
        .env("OUT", out)
        .env_remove("BATCHD_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        pipe.read_to_string(&mut s).unwrap();
        s
    });
    let mut peak = 0;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        // The shell may exec batchctl itself, or run it as its child.
        let shell = child.id() as i32;
        for pid in [Some(shell), first_child(shell)].into_iter().flatten() {
            let is_ctl = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "batchctl");
            if is_ctl {
                if let Some(hwm) = procfs::status(pid).and_then(|s| status_value(&s, "VmHWM")) {
                    peak = peak.max(hwm);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let wall = start.elapsed();
    let stderr = reader.join().unwrap();
    assert!(status.success(), "{script} failed ({status}):\n{stderr}");
    (wall, peak)
}

/// Every `OUT/fNNNNN.sha256` holds its input's digest: raw (batchctl) or `sha256sum`'s line.
fn check_outputs(dir: &Path, out: &str, n: usize) {
    let out = dir.join(out);
    let found = std::fs::read_dir(&out).unwrap().count();
    assert_eq!(found, n, "one output per file in {}", out.display());
    for i in [0, n / 2, n - 1] {
        let name = format!("f{i:05}");
        let expected = sha2::Sha256::digest(std::fs::read(dir.join("in").join(&name)).unwrap());
        let got = std::fs::read(out.join(format!("{name}.sha256"))).unwrap();
        let hex: String = expected.iter().map(|b| format!("{b:02x}")).collect();
        assert!(
            got == expected.as_slice() || got.starts_with(hex.as_bytes()),
            "{name}: wrong digest"
        );
    }
}
