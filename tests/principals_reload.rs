//! Token rotation without a restart, on the real `batchd` binary: SIGHUP puts the principals of the
//! config file as it is now in force for new calls, open calls keep their principal, and a config
//! that would not start is refused with the same message while the principals in force stay.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::daemon::{write_config, Daemon};
use support::principals::*;
use support::{batch, job, outcome};
use tonic::Code;

/// Upper limit of every wait; only reached when something is wrong.
const WAIT: Duration = Duration::from_secs(30);

/// Whether a call with `token` is let in.
async fn admitted(url: &str, token: &str) -> bool {
    match try_open_as(url, Some(token)).await {
        Ok(_) => true,
        Err(s) if s.code() == Code::Unauthenticated => false,
        Err(s) => panic!("unexpected status {s:?}"),
    }
}

/// Sends SIGHUP and waits for the daemon to log `text` for the `n`th time.
async fn reload(daemon: &mut Daemon, text: &str, n: usize) {
    daemon.signal("HUP");
    let deadline = tokio::time::Instant::now() + WAIT;
    while daemon.stderr().matches(text).count() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {text:?} after SIGHUP; stderr:\n{}",
            daemon.stderr()
        );
        daemon.wait_for_log(text).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_tokens_and_refuses_a_config_that_would_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &principal_toml("app", &["old-token"], ""));
    let path = path.to_str().unwrap().to_owned();
    let mut daemon = Daemon::serving(&["--config", &path]).await;
    let url = daemon.url.clone();
    assert!(admitted(&url, "old-token").await);
    assert!(!admitted(&url, "new-token").await);

    // A call opened with the old token, still running when the token is rotated.
    let mut open = open_as(&url, "old-token").await;
    open.send(batch(
        "slow",
        vec![job("slow", "sleep", b"", &[("ms", "1500")])],
    ))
    .await;

    // Rotation, step 1: both tokens are valid while clients move over.
    write_config(
        &dir,
        &principal_toml("app", &["old-token", "new-token"], ""),
    );
    reload(&mut daemon, "principals reloaded", 1).await;
    assert!(admitted(&url, "old-token").await);
    assert!(admitted(&url, "new-token").await);

    // Step 2: the old token goes, a second principal comes.
    let text = principal_toml("app", &["new-token"], "")
        + &principal_toml("batch", &["batch-token"], "handlers = [\"echo\"]");
    write_config(&dir, &text);
    reload(&mut daemon, "principals reloaded", 2).await;
    assert!(!admitted(&url, "old-token").await);
    assert!(admitted(&url, "new-token").await);
    let mut client = daemon.client().await;
    assert_eq!(
        list_handlers(&mut client, Some("batch-token"))
            .await
            .unwrap(),
        ["echo"]
    );

    // The call opened with the old token keeps its principal and finishes.
    open.half_close();
    let results = open.finish_ok(WAIT).await;
    assert_eq!(outcome(&results[0]), batchd::proto::Outcome::Ok);

    // A config that would not start is refused at reload, with the message it stops a start with.
    let bad = principal_toml("app", &["new-token"], "weight = 0");
    write_config(&dir, &bad);
    reload(&mut daemon, "reload refused", 1).await;
    let message = "invalid config: principal \"app\": weight: must be between 1 and 10000";
    assert!(daemon.stderr().contains(message), "{}", daemon.stderr());
    assert!(
        admitted(&url, "new-token").await,
        "the principals in force stay"
    );
    assert!(admitted(&url, "batch-token").await);
    // So is one naming a handler the daemon does not run.
    let typo = principal_toml("app", &["new-token"], "handlers = [\"ecko\"]");
    write_config(&dir, &typo);
    reload(&mut daemon, "reload refused", 2).await;
    assert!(daemon
        .stderr()
        .contains("handlers: unknown handler \"ecko\""));
    assert!(admitted(&url, "batch-token").await);

    // The same bad config stops a start with exit code 64 and the same message.
    write_config(&dir, &bad);
    let mut refused = Daemon::spawn(&["--config", &path], &[]);
    let status = refused.exit().await;
    assert_eq!(status.code(), Some(64));
    assert!(refused.stderr().contains(message), "{}", refused.stderr());

    daemon.signal("TERM");
    assert!(daemon.exit().await.success());
}

/// Tokens over plaintext on an address others can reach are worth a warning at start; on loopback
/// they are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_over_plaintext_off_loopback_log_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &principal_toml("app", &["t"], ""));
    let path = path.to_str().unwrap();
    let daemon = Daemon::serving(&["--config", path]).await;
    assert!(
        !daemon.stderr().contains("plaintext"),
        "{}",
        daemon.stderr()
    );
    drop(daemon);

    // Every address of the machine, port 0: what a real deployment listens on.
    let mut daemon = Daemon::spawn(&["--config", path, "--listen", "0.0.0.0:0"], &[]);
    daemon.wait_for_log("plaintext").await;
    let log = daemon.stderr();
    assert!(
        log.contains("WARN") && log.contains("bearer tokens are accepted over plaintext"),
        "{log}"
    );
}
