//! `dns:///NAME:PORT` endpoints: every address of the name is a replica, and the name is resolved
//! again during the run, so a replica added to it joins.
//!
//! The names are the test's own: batchctl runs in a mount namespace of its own (`unshare
//! --map-root-user --mount`) where a private file is bind-mounted over `/etc/hosts`; the machine's
//! `/etc/hosts` is never touched. (On this kind of machine `localhost` resolves to 127.0.0.1 only,
//! though `[::1]` works: the private file gives it both, as most distributions' files do.)
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;

use support::batchctl::{command, path_str, Ctl, EXIT_OK};
use support::daemon::Daemon;
use support::failover::*;

/// `batchctl args…` (stdin piped) in a mount namespace where `hosts` is `/etc/hosts`.
fn batchctl_with_hosts(hosts: &Path, args: &[&str]) -> Ctl {
    let inner = command(args, &[]);
    let mut cmd = Command::new("unshare");
    cmd.args(["--map-root-user", "--mount", "sh", "-c"])
        .arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#)
        .arg(hosts)
        .arg(inner.get_program())
        .args(inner.get_args());
    for (key, value) in inner.get_envs() {
        match value {
            Some(v) => cmd.env(key, v),
            None => cmd.env_remove(key),
        };
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ctl::start(cmd, None)
}

/// A daemon on `host:PORT` for each of `hosts`, all on one port (the first one's, chosen by the
/// kernel; tried again if another is taken there).
async fn same_port(hosts: &[&str]) -> (u16, Vec<Daemon>) {
    for _ in 0..10 {
        let first = Daemon::try_serving_on(&format!("{}:0", hosts[0]), &[])
            .await
            .expect("a daemon on port 0");
        let port: u16 = first.url.rsplit(':').next().unwrap().parse().unwrap();
        let mut daemons = vec![first];
        for host in &hosts[1..] {
            match Daemon::try_serving_on(&format!("{host}:{port}"), &[]).await {
                Some(d) => daemons.push(d),
                None => break,
            }
        }
        if daemons.len() == hosts.len() {
            return (port, daemons);
        }
    }
    panic!("no port free on all of {hosts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_address_of_localhost_gets_jobs_ipv4_and_ipv6() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n::1 localhost\n").unwrap();
    let (port, daemons) = same_port(&["127.0.0.1", "[::1]"]).await;
    let n = 20_000;
    let input = job_file(dir.path(), n);
    let output = dir.path().join("out.jsonl");
    let endpoint = format!("dns:///localhost:{port}");
    let ctl = batchctl_with_hosts(
        &hosts,
        &[
            "--endpoint",
            &endpoint,
            "run",
            "-q",
            "-o",
            path_str(&output),
            path_str(&input),
        ],
    );
    let done = ctl.finish(RUN_LIMIT).await;
    assert_eq!(done.code, Some(EXIT_OK), "{}", done.stderr);
    assert_each_once_ok(&[&output], n);
    for d in &daemons {
        assert!(admitted(d) > 0.0, "{} got no job: {}", d.url, done.stderr);
    }
    assert!(
        done.stderr.contains("replicas 2/2 live, 0 lost"),
        "{}",
        done.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_added_to_the_name_mid_run_joins_it() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    let name = "replicas.batchd.test";
    std::fs::write(&hosts, format!("127.0.0.1 {name}\n127.0.0.2 {name}\n")).unwrap();
    let (port, daemons) = same_port(&["127.0.0.1", "127.0.0.2", "127.0.0.3"]).await;
    let [a, b, c] = <[Daemon; 3]>::try_from(daemons).ok().unwrap();
    let output = dir.path().join("out.jsonl");
    let endpoint = format!("dns:///{name}:{port}");
    let mut ctl = batchctl_with_hosts(
        &hosts,
        &[
            "--endpoint",
            &endpoint,
            "run",
            "-q",
            "--resolve-every",
            "200ms",
            "-o",
            path_str(&output),
            "-",
        ],
    );
    let (joined, writer) = feed(&mut ctl, JOBS, JOBS / 3);

    wait_for_results(&mut ctl, &output, JOBS / 3).await;
    assert_eq!(admitted(&c), 0.0, "not in the name yet");
    // Written in place: the bind mount shows the new content.
    std::fs::write(
        &hosts,
        format!("127.0.0.1 {name}\n127.0.0.2 {name}\n127.0.0.3 {name}\n"),
    )
    .unwrap();
    support::wait_until("the added replica gets jobs", RUN_LIMIT, || {
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
        done.stderr.contains(&format!(
            "batchctl: replica http://127.0.0.3:{port} (dns:///{name}:{port}) is live"
        )),
        "{}",
        done.stderr
    );
    assert!(admitted(&a) > 0.0 && admitted(&b) > 0.0);
}
