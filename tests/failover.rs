//! Failover with real daemons on loopback (the `batchd` binary) and the real `batchctl`: 100,000
//! short jobs over three replicas, one of them killed (`kill -9`) or drained (SIGTERM) at about a
//! third, or started in the middle of the run; every replica killed, then `--resume`. Each time
//! the output holds each id exactly once, all `ok`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::batchctl::{command, path_str, read_records, refused_endpoint, Ctl, EXIT_OK};
use support::batchctl::{EXIT_UNREACHABLE, LIVENESS};
use support::daemon::Daemon;
use support::failover::*;
use support::tls::{Ca, Files};

/// Three daemons on `127.0.0.1:0`.
async fn three() -> [Daemon; 3] {
    [
        Daemon::serving(&[]).await,
        Daemon::serving(&[]).await,
        Daemon::serving(&[]).await,
    ]
}

/// `--endpoint a,b,c` as batchctl takes it.
fn list(daemons: &[&Daemon]) -> String {
    daemons
        .iter()
        .map(|d| d.url.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// Starts `batchctl --endpoint ENDPOINTS run -q -o OUTPUT args… INPUT`.
fn start_run(endpoints: &str, output: &std::path::Path, input: &str, args: &[&str]) -> Ctl {
    let mut all = vec!["--endpoint", endpoints, "run", "-q", "-o", path_str(output)];
    all.extend_from_slice(args);
    all.push(input);
    Ctl::spawn(&all, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_of_three_replicas_loses_no_job_and_duplicates_none() {
    let dir = tempfile::tempdir().unwrap();
    let input = job_file_of(dir.path(), JOBS, kill_run_line);
    let output = dir.path().join("out.jsonl");
    let (hold_not, hold_forever) = hold_configs(dir.path());
    let [a, mut b, c] = [
        Daemon::serving(&["--config", path_str(&hold_not)]).await,
        Daemon::serving(&["--config", path_str(&hold_forever)]).await,
        Daemon::serving(&["--config", path_str(&hold_not)]).await,
    ];
    let ctl = start_run(&list(&[&a, &b, &c]), &output, path_str(&input), &[]);
    kill_while_it_holds_a_job(ctl, &b, &b.url, &output, JOBS).await;
    assert!(!b.running());
}

/// A third of the run's `n` results in, waits until `b` runs a hold job and kills it (-9); then
/// checks that the run ends well with each job's result once, `b`'s loss reported (as `url`),
/// and its jobs sent to the others.
async fn kill_while_it_holds_a_job(
    mut ctl: Ctl,
    b: &Daemon,
    url: &str,
    output: &std::path::Path,
    n: usize,
) {
    wait_for_results(&mut ctl, output, n / 3).await;
    support::wait_until("the replica to kill holds a hold job", RUN_LIMIT, || {
        assert!(ctl.running(), "the run ended before the kill");
        running(b, "hold") >= 1.0
    })
    .await;
    b.kill_now();
    let done = ctl.finish(RUN_LIMIT).await;

    assert_eq!(done.code, Some(EXIT_OK), "{}", done.stderr);
    assert_each_once_ok(&[output], n);
    assert!(
        done.stderr
            .contains(&format!("batchctl: lost replica {url}: ")),
        "the loss is reported: {}",
        done.stderr
    );
    // The killed replica held jobs (its hold ones at least): all of them went to the others.
    let summary = done.stderr.lines().last().unwrap();
    assert!(
        summary.contains(" resubmitted") && summary.contains("replicas 2/3 live, 1 lost"),
        "{summary}"
    );
}

/// Three replicas with mutual TLS, and the batchctl that reaches them.
struct Mtls {
    files: Files,
    /// batchctl's TLS flags.
    flags: Vec<String>,
}

impl Mtls {
    fn new() -> Self {
        let (server_ca, clients) = (Ca::new("server CA"), Ca::new("clients"));
        let files = Files::new(&server_ca.server(&[]), Some(&clients.pem()));
        let ca = files.write("ca.crt", &server_ca.pem());
        let (cert, key) = files.write_client("batchctl", &clients.client("batchctl"));
        let flags = [("--tls-ca", ca), ("--tls-cert", cert), ("--tls-key", key)]
            .into_iter()
            .flat_map(|(flag, path)| [flag.to_owned(), path_str(&path).to_owned()])
            .collect();
        Self { files, flags }
    }

    fn dir(&self) -> &std::path::Path {
        self.files.dir.path()
    }

    /// A daemon with mTLS and `args`.
    async fn daemon(&self, args: &[&str]) -> Daemon {
        let tls = self.files.daemon_args(true);
        let mut all = args.to_vec();
        all.extend(tls.iter().map(String::as_str));
        Daemon::serving(&all).await
    }

    /// Starts `batchctl --endpoint https://… TLS flags run -q -o OUTPUT args… INPUT`.
    fn run(
        &self,
        daemons: &[&Daemon],
        output: &std::path::Path,
        input: &str,
        args: &[&str],
    ) -> Ctl {
        let endpoints = daemons
            .iter()
            .map(|d| https(d))
            .collect::<Vec<_>>()
            .join(",");
        let mut all = vec!["--endpoint", &endpoints];
        all.extend(self.flags.iter().map(String::as_str));
        all.extend(["run", "-q", "-o", path_str(output)]);
        all.extend_from_slice(args);
        all.push(input);
        Ctl::spawn(&all, None)
    }
}

/// The daemon's URL as batchctl names it with TLS.
fn https(d: &Daemon) -> String {
    d.url.replacen("http://", "https://", 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_of_three_mtls_replicas_loses_no_job_either() {
    // The same over mutual TLS: batchctl's calls to the others go on over their own TLS
    // connections, and the jobs it resubmits need no new handshake with the dead one.
    let n = 30_000;
    let tls = Mtls::new();
    let input = job_file_of(tls.dir(), n, kill_run_line);
    let output = tls.dir().join("out.jsonl");
    let (hold_not, hold_forever) = hold_configs(tls.dir());
    let [a, b, c] = [
        tls.daemon(&["--config", path_str(&hold_not)]).await,
        tls.daemon(&["--config", path_str(&hold_forever)]).await,
        tls.daemon(&["--config", path_str(&hold_not)]).await,
    ];
    let ctl = tls.run(&[&a, &b, &c], &output, path_str(&input), &[]);
    kill_while_it_holds_a_job(ctl, &b, &https(&b), &output, n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_mtls_replica_hands_its_jobs_to_the_others_too() {
    let n = 30_000;
    let tls = Mtls::new();
    let input = job_file(tls.dir(), n);
    let output = tls.dir().join("out.jsonl");
    let [a, b, c] = [
        tls.daemon(&[]).await,
        tls.daemon(&[]).await,
        tls.daemon(&[]).await,
    ];
    let ctl = tls.run(&[&a, &b, &c], &output, path_str(&input), &["--ordered"]);
    let url = https(&b);
    drain_mid_run(ctl, b, &url, &output, n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_replica_hands_its_jobs_to_the_others_and_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let input = job_file(dir.path(), JOBS);
    let output = dir.path().join("out.jsonl");
    let [a, b, c] = three().await;
    // In input order, too: the reorder buffer holds what the resubmitted jobs hold back.
    let ctl = start_run(
        &list(&[&a, &b, &c]),
        &output,
        path_str(&input),
        &["--ordered"],
    );
    let url = b.url.clone();
    drain_mid_run(ctl, b, &url, &output, JOBS).await;
}

/// A third of the `--ordered` run's `n` results in, drains `b` (SIGTERM); checks that it exits at
/// once, not after the run, and that the run ends well: each job's result once, in input order,
/// `b` (as `url`) left as draining or lost while shutting down.
async fn drain_mid_run(mut ctl: Ctl, mut b: Daemon, url: &str, output: &std::path::Path, n: usize) {
    wait_for_results(&mut ctl, output, n / 3).await;
    let drained_at = Instant::now();
    b.signal("TERM");
    // The drain does not wait for batchctl's run: its own jobs are given back, its running ones
    // finish (milliseconds), and it exits.
    let status = b.exit().await;
    assert!(status.success(), "{status}; {}", b.stderr());
    let drain = drained_at.elapsed();
    let done = ctl.finish(RUN_LIMIT).await;

    assert_eq!(done.code, Some(EXIT_OK), "{}", done.stderr);
    assert_each_once_ok(&[output], n);
    let ids: Vec<String> = read_records(output)
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    let expected: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    assert!(ids == expected, "--ordered: input order");
    // Draining, it gives back what it has not started (a call that held nothing at that moment
    // just ends UNAVAILABLE): either way batchctl leaves it.
    assert!(
        done.stderr
            .contains(&format!("batchctl: replica {url} is draining"))
            || done.stderr.contains(&format!(
                "batchctl: lost replica {url}: UNAVAILABLE: batchd is shutting down"
            )),
        "{}",
        done.stderr
    );
    assert!(
        drain < Duration::from_secs(10),
        "the drained daemon took {drain:?} to exit (shutdown_grace is 30s): it did not wait for \
         the run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_of_the_list_started_mid_run_gets_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.jsonl");
    let a = Daemon::serving(&[]).await;
    let b = Daemon::serving(&[]).await;
    // The third address refuses connections until its daemon starts.
    let (late_url, hold) = refused_endpoint();
    let endpoints = format!("{},{},{late_url}", a.url, b.url);
    let mut cmd = command(
        &[
            "--endpoint",
            &endpoints,
            "run",
            "-q",
            "-o",
            path_str(&output),
            "-",
        ],
        &[],
    );
    cmd.stdin(Stdio::piped());
    let mut ctl = Ctl::start(cmd, None);
    let (joined, writer) = feed(&mut ctl, JOBS, JOBS / 3);

    wait_for_results(&mut ctl, &output, JOBS / 3).await;
    let addr = hold.local_addr().unwrap().to_string();
    drop(hold);
    let c = Daemon::try_serving_on(&addr, &[])
        .await
        .expect("the third daemon serves on its address");
    // Tried again with backoff (at most 5 s apart), it joins while jobs still come.
    support::wait_until("the new replica gets jobs", RUN_LIMIT, || {
        assert!(ctl.running(), "the run ended before the new replica joined");
        admitted(&c) > 0.0
    })
    .await;
    joined.store(true, Ordering::Relaxed);
    let done = ctl.finish(RUN_LIMIT).await;
    writer.join().unwrap();

    assert_eq!(done.code, Some(EXIT_OK), "{}", done.stderr);
    assert_each_once_ok(&[&output], JOBS);
    assert!(
        done.stderr
            .contains(&format!("batchctl: replica {late_url} is live")),
        "{}",
        done.stderr
    );
    assert!(admitted(&a) > 0.0 && admitted(&b) > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_replica_killed_batchctl_exits_3_and_resume_finishes_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let input = job_file(dir.path(), JOBS);
    let (first, second) = (dir.path().join("1.jsonl"), dir.path().join("2.jsonl"));
    let joblog = dir.path().join("done.log");
    let [mut a, mut b, mut c] = three().await;
    let endpoints = list(&[&a, &b, &c]);
    let mut ctl = start_run(
        &endpoints,
        &first,
        path_str(&input),
        &["--joblog", path_str(&joblog), "--reconnect-timeout", "2s"],
    );

    wait_for_results(&mut ctl, &first, JOBS / 3).await;
    for d in [&a, &b, &c] {
        d.signal("KILL");
    }
    let killed = Instant::now();
    let done = ctl.finish(LIVENESS).await;
    let took = killed.elapsed();

    assert_eq!(done.code, Some(EXIT_UNREACHABLE), "{}", done.stderr);
    let last = done.stderr.lines().last().unwrap();
    assert!(
        last.starts_with(&format!("batchctl: no replica of {} reachable for 2.", {
            endpoints.replace(',', ", ")
        })),
        "names the endpoints and the wait: {last}"
    );
    assert!(last.contains("--resume"), "{last}");
    // The wait is --reconnect-timeout (2 s) after the last loss, plus a connection attempt.
    assert!(took < Duration::from_secs(15), "exit 3 took {took:?}");
    for d in [&mut a, &mut b, &mut c] {
        d.exit().await;
    }

    // Daemons again (new addresses): the job log says what finished; the rest runs now.
    let [d, e, f] = three().await;
    let ctl = start_run(
        &list(&[&d, &e, &f]),
        &second,
        path_str(&input),
        &["--joblog", path_str(&joblog), "--resume"],
    );
    let done = ctl.finish(RUN_LIMIT).await;
    assert_eq!(done.code, Some(EXIT_OK), "{}", done.stderr);
    assert_each_once_ok(&[&first, &second], JOBS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_spreads_files_over_replicas_and_survives_losing_one() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    let n = 3_000;
    for i in 0..n {
        std::fs::write(inputs.join(format!("f{i}")), format!("file {i}")).unwrap();
    }
    let joblog = dir.path().join("done.log");
    let out = dir.path().join("out");
    let [a, b, c] = three().await;
    let endpoints = list(&[&a, &b, &c]);
    let template = format!("{}/{{/}}.out", out.display());
    let mut ctl = Ctl::spawn(
        &[
            "--endpoint",
            &endpoints,
            "map",
            "sleep",
            "--param",
            "ms=3",
            "-q",
            "-r",
            path_str(&inputs),
            "--out",
            &template,
            "--joblog",
            path_str(&joblog),
        ],
        None,
    );
    wait_for_results(&mut ctl, &joblog, n / 3).await;
    b.signal("KILL");
    let done = ctl.finish(RUN_LIMIT).await;

    assert_eq!(done.code, Some(EXIT_OK), "{}", done.stderr);
    // The job log has one line per finished job: each file exactly once, ok.
    let mut seen = std::collections::HashMap::new();
    for r in read_records(&joblog) {
        assert_eq!(r["outcome"], "ok", "{r}");
        *seen
            .entry(r["id"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(seen.len(), n, "{}", done.stderr);
    assert!(seen.values().all(|c| *c == 1), "a file finished twice");
    for i in 0..n {
        let got = std::fs::read_to_string(out.join(format!("f{i}.out"))).unwrap();
        assert_eq!(got, format!("file {i}"));
    }
    assert!(
        done.stderr
            .contains(&format!("batchctl: lost replica {}: ", b.url)),
        "{}",
        done.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replica_is_lost_when_its_keepalive_pings_go_unanswered() {
    // The library's runner (batchd::client::run), with pings every 500 ms: a daemon that stops
    // answering without closing its connection (SIGSTOP: the kernel still acknowledges TCP) is
    // lost within a second, and its jobs go to the other one.
    let dir = tempfile::tempdir().unwrap();
    let n = 30_000;
    let input = job_file(dir.path(), n);
    let output = dir.path().join("out.jsonl");
    let a = Daemon::serving(&[]).await;
    let b = Daemon::serving(&[]).await;
    let endpoints = batchd::client::Endpoints::parse(&[list(&[&a, &b])], false).unwrap();
    let opts = batchd::client::RunOptions {
        keepalive: Duration::from_millis(500),
        ..Default::default()
    };
    let (file, out) = (
        tokio::fs::File::open(&input).await.unwrap(),
        tokio::fs::File::create(&output).await.unwrap(),
    );
    let run = tokio::spawn(async move {
        let progress = batchd::client::Progress::new(false);
        batchd::client::run(
            &endpoints,
            file,
            out,
            None::<tokio::io::Sink>,
            &opts,
            &progress,
            std::future::pending(),
        )
        .await
    });
    let mut counter = LineCounter::new(&output);
    support::wait_until("a third of the results", RUN_LIMIT, || {
        counter.count() >= n / 3
    })
    .await;
    b.signal("STOP");
    let (summary, res) = within_limit(run).await;
    b.signal("CONT");
    res.unwrap_or_else(|e| panic!("{e}: {}", summary.line()));
    assert_eq!(summary.replicas_lost, 1, "{}", summary.line());
    assert!(summary.resubmitted > 0, "{}", summary.line());
    assert_each_once_ok(&[&output], n);
}

async fn within_limit<T>(task: tokio::task::JoinHandle<T>) -> T {
    support::within(RUN_LIMIT, "the run ends", task)
        .await
        .unwrap()
}
