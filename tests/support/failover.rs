//! Failover runs: files of short jobs, `batchctl` runs watched while they go (their output file
//! counted as it grows, their input fed on demand), and outputs checked for each id exactly once.

use std::collections::HashMap;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::batchctl::{read_records, Ctl};
use super::daemon::Daemon;
use super::scrape;

/// The jobs of a failover run (issue 12: 100,000 short jobs).
pub const JOBS: usize = 100_000;
/// Generous bound for a whole run of [`JOBS`] jobs on a busy 2-core machine (it takes seconds).
pub const RUN_LIMIT: Duration = Duration::from_secs(120);

/// Job `i`: even ids echo, odd ones sleep 1–5 ms (a fixed pattern: runs are comparable).
pub fn job_line(i: usize) -> String {
    if i.is_multiple_of(2) {
        format!(r#"{{"id":"{i}","handler":"echo","payload":"p{i}"}}"#)
    } else {
        let ms = 1 + (i / 2 * 7) % 5;
        format!(r#"{{"id":"{i}","handler":"sleep","params":{{"ms":{ms}}}}}"#)
    }
}

/// Job `i` of a run that kills a replica: [`job_line`], but every thousandth job is a `hold`
/// ([`hold_configs`]): the replica to kill surely holds a job while it runs one (its short jobs
/// may all be answered in a stall of a loaded machine).
pub fn kill_run_line(i: usize) -> String {
    if i % 1000 == 999 {
        format!(r#"{{"id":"{i}","handler":"hold"}}"#)
    } else {
        job_line(i)
    }
}

/// Config files of the `hold` exec handler, written to `dir`: one where it ends at once (for the
/// replicas that stay) and one where it runs for 30 s (for the replica to kill).
pub fn hold_configs(dir: &Path) -> (PathBuf, PathBuf) {
    let write = |name: &str, command: &str| {
        let path = dir.join(name);
        let text = format!("[[exec]]\nname = \"hold\"\ncommand = {command}\n");
        std::fs::write(&path, text).unwrap();
        path
    };
    (
        write("hold-not.toml", r#"["true"]"#),
        write("hold-forever.toml", r#"["sleep", "30"]"#),
    )
}

/// A file of jobs `0..n` ([`job_line`]).
pub fn job_file(dir: &Path, n: usize) -> PathBuf {
    job_file_of(dir, n, job_line)
}

/// A file of jobs `0..n`, job `i` written by `line`.
pub fn job_file_of(dir: &Path, n: usize, line: impl Fn(usize) -> String) -> PathBuf {
    let path = dir.join("jobs.jsonl");
    let mut f = BufWriter::new(std::fs::File::create(&path).unwrap());
    for i in 0..n {
        writeln!(f, "{}", line(i)).unwrap();
    }
    f.flush().unwrap();
    path
}

/// Counts the lines of a file that grows (a batchctl output), reading only what is new.
pub struct LineCounter {
    path: PathBuf,
    read: u64,
    lines: usize,
}

impl LineCounter {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            read: 0,
            lines: 0,
        }
    }

    /// Complete lines so far.
    pub fn count(&mut self) -> usize {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return 0;
        };
        f.seek(SeekFrom::Start(self.read)).unwrap();
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).unwrap();
        self.read += buf.len() as u64;
        self.lines += buf.iter().filter(|b| **b == b'\n').count();
        self.lines
    }
}

/// Waits until batchctl's output file has `n` lines; panics if batchctl exits first.
pub async fn wait_for_results(ctl: &mut Ctl, output: &Path, n: usize) {
    let mut counter = LineCounter::new(output);
    super::wait_until(&format!("{n} results"), RUN_LIMIT, || {
        assert!(ctl.running(), "batchctl ended before {n} results");
        counter.count() >= n
    })
    .await;
}

/// Asserts that the outputs together hold one result for each of ids `0..n`, each `ok`.
pub fn assert_each_once_ok(outputs: &[&Path], n: usize) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for path in outputs {
        for r in read_records(path) {
            let id = r["id"].as_str().unwrap().to_owned();
            assert_eq!(r["outcome"], "ok", "{r}");
            *seen.entry(id).or_default() += 1;
        }
    }
    let twice: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).take(5).collect();
    assert!(twice.is_empty(), "ids with more than one result: {twice:?}");
    let missing: Vec<usize> = (0..n)
        .filter(|i| !seen.contains_key(&i.to_string()))
        .take(5)
        .collect();
    assert!(missing.is_empty(), "ids without a result, e.g. {missing:?}");
    assert_eq!(seen.len(), n, "results for ids that were never sent");
}

/// Jobs a daemon has admitted and not finished (queued or running): while it holds some, its
/// loss leaves jobs without a result.
pub fn holding(daemon: &Daemon) -> f64 {
    let metrics = scrape::scrape(daemon.admin_addr());
    scrape::sum(&metrics, "batchd_jobs_queued") + scrape::sum(&metrics, "batchd_jobs_running")
}

/// Jobs of `handler` a daemon runs now, from its `/metrics`.
pub fn running(daemon: &Daemon, handler: &str) -> f64 {
    let metrics = scrape::scrape(daemon.admin_addr());
    let row = format!("batchd_jobs_running{{handler=\"{handler}\"}} ");
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&row))
        .map(|v| v.parse::<f64>().unwrap())
        .sum()
}

/// Jobs a daemon has admitted, from its `/metrics`.
pub fn admitted(daemon: &Daemon) -> f64 {
    scrape::sum(
        &scrape::scrape(daemon.admin_addr()),
        "batchd_jobs_admitted_total",
    )
}

/// Feeds jobs `0..n` to batchctl's stdin from a thread: the first `first` at once, then slowly
/// (100 every 20 ms) until the returned flag is set, then the rest. The run lasts as long as the
/// test needs it to (until what it waits for happens), whatever the machine's speed.
pub fn feed(
    ctl: &mut Ctl,
    n: usize,
    first: usize,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let mut stdin = ctl.take_stdin().expect("batchctl's stdin is piped");
    let go = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&go);
    let writer = std::thread::spawn(move || {
        let mut write = |i: usize| {
            // batchctl may have stopped reading (a failed test): its business.
            stdin
                .write_all(format!("{}\n", job_line(i)).as_bytes())
                .is_ok()
        };
        for i in 0..n {
            if i >= first && i.is_multiple_of(100) && !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if !write(i) {
                return;
            }
        }
    });
    (go, writer)
}
