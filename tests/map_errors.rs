#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `batchctl map` with inputs it cannot send: unreadable files and files too large (for
//! `--max-message`, by their size before they are read, and for the daemon's `max_payload`, learnt
//! from its rejection) are reported with their path (and size) and skipped, the run goes on, and the
//! exit code is 2; `--strict` stops at the first.
mod support;

use std::os::unix::ffi::OsStrExt as _;

use batchd::client::call::request_size_with_payload;
use batchd::proto;
use batchd::units::ByteSize;
use support::map::*;
use support::TestServer;

#[tokio::test]
async fn unreadable_inputs_are_named_and_skipped() {
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "good/a", b"a");
    write(root, "good/b", b"b");
    write(root, "tree/ok", b"ok");
    std::fs::create_dir(root.join("a-directory")).unwrap();
    std::os::unix::fs::symlink(root.join("nowhere"), root.join("dangling")).unwrap();
    std::os::unix::fs::symlink(root.join("nowhere"), root.join("tree/dangling")).unwrap();
    let mut expect = vec![
        ("missing", "cannot read: No such file or directory"),
        ("dangling", "cannot read: No such file or directory"),
        (
            "a-directory",
            "is a directory (-r walks directories); skipped",
        ),
        ("from-the-list", "cannot read: No such file or directory"),
    ];
    let mut args = vec![
        "map",
        "echo",
        "--out",
        "out/{}",
        "good/a",
        "missing",
        "dangling",
        "a-directory",
    ];
    // Permissions stop only a user who is not root.
    if !rustix::process::geteuid().is_root() {
        let locked = write(root, "locked", b"secret");
        std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o000))
            .unwrap();
        args.push("locked");
        expect.push(("locked", "cannot read: Permission denied"));
    }
    args.extend(["-", "good/b"]);
    let list = b"from-the-list\n".to_vec();
    let done = map_stdin(&server, root, &args, &list).await;
    assert_eq!(done.code, Some(EXIT_INPUT), "{done:?}");
    for (path, why) in &expect {
        assert!(
            done.stderr.contains(&format!("batchctl: {path}: {why}")),
            "{path}: {}",
            done.stderr
        );
    }
    let n = expect.len();
    assert!(
        summary(&done).ends_with(&format!(": 2 ok, {n} unreadable")),
        "{}",
        done.stderr
    );
    assert_eq!(files_below(&root.join("out")), ["good/a", "good/b"]);
    assert_eq!(server.stats().jobs_admitted, 2);

    // A walk that follows links meets a dangling one, and a name that is not UTF-8.
    let odd = std::ffi::OsStr::from_bytes(b"odd-\xffname");
    std::fs::write(root.join("tree").join(odd), b"x").unwrap();
    let done = map_in(
        &server,
        root,
        &["map", "echo", "-r", "--follow", "tree", "--out", "out/{}"],
    )
    .await;
    assert_eq!(done.code, Some(EXIT_INPUT), "{done:?}");
    assert!(
        done.stderr
            .contains("batchctl: tree/dangling: cannot read: No such file or directory"),
        "{}",
        done.stderr
    );
    assert!(
        done.stderr.contains(
            "batchctl: tree/odd-\u{fffd}name: the name is not valid UTF-8 (job ids are text); skipped"
        ),
        "{}",
        done.stderr
    );
    assert!(
        summary(&done).ends_with(": 1 ok, 2 unreadable"),
        "{}",
        done.stderr
    );
    // Without --follow, links met by the walk are left alone.
    let done = map_in(&server, root, &["map", "echo", "-r", "tree"]).await;
    assert!(
        summary(&done).ends_with(": 1 ok, 1 unreadable"),
        "{}",
        done.stderr
    );
    assert_eq!(records(&done.stdout).len(), 1);
}

#[tokio::test]
async fn files_over_max_message_are_skipped_by_their_size_before_being_read() {
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let max = 64 * 1024;
    // The largest payload a request of --max-message bytes carries for the job of "in/fits".
    let job = |id: &str| proto::Job {
        id: id.into(),
        handler: "sha256".into(),
        ..Default::default()
    };
    let largest = (0..max)
        .rev()
        .find(|n| request_size_with_payload("", &job("in/fits"), *n) <= max)
        .unwrap();
    assert_eq!(
        request_size_with_payload("", &job("in/over"), largest + 1),
        request_size_with_payload("", &job("in/fits"), largest + 1),
        "same id length, same size"
    );
    write(dir.path(), "in/fits", &content(1, largest));
    write(dir.path(), "in/over", &content(2, largest + 1));
    write(dir.path(), "in/small", b"small");
    let done = map_in(
        &server,
        dir.path(),
        &[
            "map",
            "sha256",
            "-r",
            "in",
            "--max-message",
            "64KiB",
            "--out",
            "out/{/}",
        ],
    )
    .await;
    assert_eq!(done.code, Some(EXIT_INPUT), "{done:?}");
    let line = format!(
        "batchctl: in/over: {} bytes, too large to send within --max-message (64KiB); skipped",
        largest + 1
    );
    assert!(done.stderr.contains(&line), "{}", done.stderr);
    assert!(
        summary(&done).ends_with(": 2 ok, 1 too large"),
        "{}",
        done.stderr
    );
    assert_eq!(files_below(&dir.path().join("out")), ["fits", "small"]);
    assert_eq!(
        std::fs::read(dir.path().join("out/fits")).unwrap(),
        sha256(&content(1, largest))
    );
    assert_eq!(
        server.stats().jobs_admitted,
        2,
        "the large file was not sent"
    );
}

#[tokio::test]
async fn files_over_the_daemons_max_payload_are_reported_and_later_ones_not_sent() {
    let server = TestServer::start(|c| c.max_payload = ByteSize(100 * 1024));
    let dir = tempfile::tempdir().unwrap();
    let sizes = [
        ("1-small", 50_000),
        ("2-big", 200_000),
        ("3-bigger", 300_000),
        ("4-small", 60_000),
    ];
    for (i, (name, size)) in sizes.iter().enumerate() {
        write(dir.path(), &format!("in/{name}"), &content(i as u64, *size));
    }
    // One job at a time: the rejection of 2-big is back before 3-bigger is looked at.
    let done = map_in(
        &server,
        dir.path(),
        &[
            "map",
            "sha256",
            "-r",
            "in",
            "--max-in-flight",
            "1",
            "--out",
            "out/{/}",
        ],
    )
    .await;
    assert_eq!(done.code, Some(EXIT_INPUT), "{done:?}");
    for line in [
        "batchctl: in/2-big: 200000 bytes, over the daemon's max_payload (100KiB); skipped",
        "batchctl: in/3-bigger: 300000 bytes, over the daemon's max_payload (100KiB); skipped",
    ] {
        assert!(done.stderr.contains(line), "{line}\n{}", done.stderr);
    }
    assert!(
        summary(&done).ends_with(": 2 ok, 2 too large"),
        "{}",
        done.stderr
    );
    assert!(
        summary(&done).starts_with("batchctl: 2 jobs in") && !summary(&done).contains("no result"),
        "the rejected file is not counted as a job: {}",
        done.stderr
    );
    assert_eq!(files_below(&dir.path().join("out")), ["1-small", "4-small"]);
    assert_eq!(
        server.stats().jobs_admitted,
        2,
        "3-bigger was skipped before it was sent (2-big was rejected, not admitted)"
    );
}

#[tokio::test]
async fn strict_stops_at_the_first_bad_input() {
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a", b"a");
    write(dir.path(), "c", b"c");
    let done = map_in(
        &server,
        dir.path(),
        &[
            "map",
            "sha256",
            "--strict",
            "--max-in-flight",
            "1",
            "a",
            "missing",
            "c",
        ],
    )
    .await;
    assert_eq!(done.code, Some(EXIT_INPUT), "{done:?}");
    assert!(
        done.stderr
            .contains("batchctl: missing: cannot read: No such file or directory (os error 2) (stopping: --strict)"),
        "{}",
        done.stderr
    );
    let ids: Vec<String> = records(&done.stdout)
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(!ids.contains(&"c".to_owned()), "{ids:?}");
}
