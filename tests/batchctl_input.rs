#![allow(clippy::unwrap_used, clippy::expect_used)]
//! batchctl's input: big files, stdin, bad and over-long lines, `--strict`, defaults for missing
//! fields, and requests cut to `--max-message` (the real binary against an in-process daemon).
mod support;

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine as _;
use batchd::config::ByteSize;
use batchd::proto::{process_request::Kind, JobBatch, ProcessRequest};
use prost::Message as _;
use sha2::Digest as _;
use support::batchctl::*;
use support::TestServer;

#[tokio::test]
async fn a_100k_line_file_completes_with_every_id_exactly_once() {
    const N: usize = 100_000;
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(
        dir.path(),
        "jobs.jsonl",
        (0..N).map(|i| echo_line(&format!("j{i}"), &format!("p{i}"))),
    );
    let output = dir.path().join("out.jsonl");
    let args = with_endpoint(
        &server,
        &[
            "run",
            "--quiet",
            "--output",
            path_str(&output),
            path_str(&input),
        ],
    );
    let done = Ctl::spawn(&strs(&args), None)
        .finish(Duration::from_secs(90))
        .await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    assert_eq!(done.stdout, "", "results go to --output");
    assert!(
        done.stderr.contains(&format!("{N} jobs in")) && done.stderr.contains(&format!("{N} ok")),
        "summary: {}",
        done.stderr
    );

    let out = read_records(&output);
    assert_eq!(out.len(), N);
    let mut seen = HashSet::new();
    for r in &out {
        let id = id(r);
        assert!(seen.insert(id.to_owned()), "two results for {id}");
        assert_eq!(r["outcome"], "ok", "{r}");
        assert_eq!(
            r["output"].as_str(),
            Some(format!("p{}", &id[1..]).as_str())
        );
    }
    assert!((0..N).all(|i| seen.contains(&format!("j{i}"))));
    assert_eq!(server.stats().jobs_admitted, N as u64, "each job sent once");
}

#[tokio::test]
async fn bad_lines_are_reported_with_their_numbers_and_the_run_goes_on() {
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(
        dir.path(),
        "jobs.jsonl",
        [
            echo_line("a", "1"),
            "{not json".into(),
            echo_line("b", "3"),
            r#"{"id":"c","payload":"no handler"}"#.into(),
            String::new(),
            r#"{"id":"d","handler":"echo","colour":"red"}"#.into(),
            echo_line("e", "7"),
        ],
    );
    let done = against(&server, &["run", "--quiet", path_str(&input)]).await;
    assert_eq!(done.code, Some(EXIT_INPUT), "{done:?}");
    let err = &done.stderr;
    assert!(err.contains("batchctl: line 2: not valid JSON"), "{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("batchctl: line 4:") && l.contains("handler")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.starts_with("batchctl: line 6:") && l.contains("colour")),
        "{err}"
    );
    assert!(
        !err.contains("line 5"),
        "a blank line is not an error: {err}"
    );
    assert!(err.contains("3 ok") && err.contains("3 bad lines"), "{err}");

    let out = assert_ran(&done, &["a", "b", "e"]);
    assert!(out.iter().all(|r| r["outcome"] == "ok"), "{out:?}");
}

#[tokio::test]
async fn strict_stops_at_the_first_bad_line() {
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(
        dir.path(),
        "jobs.jsonl",
        [
            echo_line("a1", "x"),
            echo_line("a2", "x"),
            echo_line("a3", "x"),
            "[1, 2]".into(),
            echo_line("b5", "x"),
            echo_line("b6", "x"),
            echo_line("b7", "x"),
            "{nope".into(),
        ],
    );
    let done = against(&server, &["run", "--strict", "--quiet", path_str(&input)]).await;
    assert_eq!(done.code, Some(EXIT_INPUT), "{done:?}");
    assert!(
        done.stderr
            .lines()
            .any(|l| l.starts_with("batchctl: line 4:") && l.contains("--strict")),
        "{}",
        done.stderr
    );
    assert!(!done.stderr.contains("line 8"), "{}", done.stderr);
    let out = records(&done.stdout);
    assert!(
        ids(&out).iter().all(|id| id.starts_with('a')),
        "nothing after the bad line runs: {out:?}"
    );
    assert!(server.stats().jobs_admitted <= 3, "{:?}", server.stats());
}

#[tokio::test]
async fn a_line_over_the_length_limit_is_skipped_and_the_run_goes_on() {
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let long = "x".repeat(batchd::client::MAX_LINE + 1024);
    let input = write_lines(
        dir.path(),
        "jobs.jsonl",
        [echo_line("before", "x"), long, echo_line("after", "x")],
    );
    let done = against(&server, &["run", "--quiet", path_str(&input)]).await;
    assert_eq!(done.code, Some(EXIT_INPUT), "{done:?}");
    assert!(
        done.stderr.contains("batchctl: line 2: longer than"),
        "{}",
        done.stderr
    );
    // The line after the long one runs too.
    assert_ran(&done, &["before", "after"]);
}

#[tokio::test]
async fn large_payloads_are_sent_in_requests_the_daemon_accepts() {
    // The thumbnail case: 256 jobs (one batch by count) of 70 KiB each. With the defaults, one such
    // batch is over the daemon's default max_message_size. With a daemon limited to 1 MiB, so are
    // the batches a count-only client sends even when it cuts them at its 2 MiB input reads; over
    // the limit, the daemon ends the whole call RESOURCE_EXHAUSTED.
    const N: usize = 256;
    const PAYLOAD: usize = 70 * 1024;
    let default_limit = batchd::config::Config::default().max_message_size;
    assert!(
        N * PAYLOAD > default_limit.as_usize(),
        "one batch by count is too large"
    );
    let dir = tempfile::tempdir().unwrap();
    let payload = |i: usize| format!("{i:06}{}", "x".repeat(PAYLOAD - 6));
    let input = write_lines(
        dir.path(),
        "jobs.jsonl",
        (0..N).map(|i| {
            format!(
                r#"{{"id":"t{i}","handler":"sha256","payload":"{}"}}"#,
                payload(i)
            )
        }),
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    for (limit, flags) in [
        (default_limit, &[][..]),
        (ByteSize::mib(1), &["--max-message", "1MiB"][..]),
    ] {
        let server = TestServer::start(|c| {
            c.max_message_size = limit;
            c.max_payload = limit;
        });
        let mut args = vec!["run", "--quiet"];
        args.extend(flags);
        args.push(path_str(&input));
        let done = against(&server, &args).await;
        assert_eq!(done.code, Some(EXIT_OK), "{limit}: {}", done.stderr);
        let out = records(&done.stdout);
        let out = by_id(&out);
        assert_eq!(out.len(), N, "{limit}: {}", done.stderr);
        for i in 0..N {
            let r = out[format!("t{i}").as_str()];
            assert_eq!(r["outcome"], "ok", "{limit}: {r}");
            let digest = b64.decode(r["output_b64"].as_str().unwrap()).unwrap();
            assert_eq!(digest, sha2::Sha256::digest(payload(i)).to_vec(), "t{i}");
        }
        assert_eq!(server.stats().jobs_admitted, N as u64, "each job sent once");
    }
}

/// The encoded size of the request that carries the job of `line` alone, as batchctl reads it.
fn request_size(line: &str) -> usize {
    let job = batchd::client::parse_line(1, line, &Default::default())
        .unwrap()
        .unwrap();
    ProcessRequest {
        kind: Some(Kind::Batch(JobBatch {
            batch_id: job.batch,
            jobs: vec![job.job],
        })),
    }
    .encoded_len()
}

#[tokio::test]
async fn max_message_fills_requests_to_the_byte_and_skips_a_job_too_large_alone() {
    // A daemon that takes requests of up to 64 KiB, and a run told so.
    const LIMIT: u64 = 64 * 1024;
    let server = TestServer::start(|c| {
        c.max_message_size = ByteSize(LIMIT);
        c.max_payload = ByteSize(LIMIT);
    });
    // A job whose request is exactly the limit (the daemon accepts it), and one a byte larger.
    let size = (0..LIMIT as usize)
        .rev()
        .find(|n| request_size(&echo_line("edge", &"y".repeat(*n))) <= LIMIT as usize)
        .unwrap();
    let edge = echo_line("edge", &"y".repeat(size));
    let over = echo_line("over", &"y".repeat(size + 1));
    assert_eq!(request_size(&edge), LIMIT as usize);
    assert_eq!(request_size(&over), LIMIT as usize + 1);
    // Around them, jobs of 1 B to 20 kB: 3 MB in all, so requests are cut many times and some end
    // within bytes of the limit.
    let sizes: Vec<usize> = (0..300).map(|i| i * 7919 % 20_000 + 1).collect();
    let mut lines: Vec<String> = sizes[..150]
        .iter()
        .enumerate()
        .map(|(i, n)| echo_line(&format!("j{i}"), &"z".repeat(*n)))
        .collect();
    lines.push(edge);
    lines.push(over);
    let over_line = lines.len();
    lines.extend(
        sizes[150..]
            .iter()
            .enumerate()
            .map(|(i, n)| echo_line(&format!("j{}", 150 + i), &"z".repeat(*n))),
    );
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(dir.path(), "jobs.jsonl", lines);

    let done = against(
        &server,
        &["run", "--quiet", "--max-message", "64KiB", path_str(&input)],
    )
    .await;
    assert_eq!(done.code, Some(EXIT_INPUT), "a bad line: {}", done.stderr);
    let reported: Vec<&str> = done
        .stderr
        .lines()
        .filter(|l| l.starts_with("batchctl: line "))
        .collect();
    assert_eq!(reported.len(), 1, "{}", done.stderr);
    assert!(
        reported[0].starts_with(&format!("batchctl: line {over_line}: "))
            && reported[0].contains(&format!("{} bytes", LIMIT + 1))
            && reported[0].contains("--max-message (64KiB)"),
        "names the line, the size and the flag: {}",
        reported[0]
    );
    assert!(
        done.stderr.contains("301 ok") && done.stderr.contains("1 bad line"),
        "{}",
        done.stderr
    );
    let out = records(&done.stdout);
    let out = by_id(&out);
    assert_eq!(out.len(), 301, "every other job ran");
    assert!(!out.contains_key("over"));
    assert!(out.values().all(|r| r["outcome"] == "ok"), "{out:?}");
    assert_eq!(out["edge"]["output"].as_str().map(str::len), Some(size));
    for (i, n) in sizes.iter().enumerate() {
        let r = out[format!("j{i}").as_str()];
        assert_eq!(r["output"].as_str().map(str::len), Some(*n), "{r}");
    }
    assert_eq!(
        server.stats().jobs_admitted,
        301,
        "the big job was not sent"
    );
}

#[tokio::test]
async fn a_line_under_the_length_limit_but_over_max_message_is_skipped() {
    // 17 MiB: under MAX_LINE, over the default --max-message (the daemon's default limit).
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let big = echo_line("big", &"x".repeat(17 << 20));
    assert!(big.len() < batchd::client::MAX_LINE);
    let input = write_lines(
        dir.path(),
        "jobs.jsonl",
        [echo_line("before", "x"), big, echo_line("after", "x")],
    );
    let done = against(&server, &["run", "--quiet", path_str(&input)]).await;
    assert_eq!(done.code, Some(EXIT_INPUT), "{done:?}");
    assert!(
        done.stderr
            .lines()
            .any(|l| l.starts_with("batchctl: line 2: ") && l.contains("--max-message (16MiB)")),
        "{}",
        done.stderr
    );
    assert_ran(&done, &["before", "after"]);
    assert_eq!(server.stats().jobs_admitted, 2);
}

#[tokio::test]
async fn jobs_can_come_from_stdin() {
    let server = TestServer::start(|_| {});
    let url = server.url();
    let input = (0..50)
        .map(|i| echo_line(&format!("j{i}"), &format!("p{i}")))
        .collect::<Vec<_>>()
        .join("\n");
    // "-" and no file at all both read stdin.
    for file in [Some("-"), None] {
        let mut args = vec!["--endpoint", url.as_str(), "run", "-q"];
        args.extend(file);
        let done = Ctl::spawn(&args, Some(input.clone().into_bytes()))
            .finish(LIVENESS)
            .await;
        assert_eq!(done.code, Some(EXIT_OK), "{file:?}: {done:?}");
        let out = records(&done.stdout);
        let out = by_id(&out);
        assert_eq!(out.len(), 50, "{file:?}");
        for i in 0..50 {
            let r = out[format!("j{i}").as_str()];
            assert_eq!(r["outcome"], "ok");
            assert_eq!(r["output"].as_str(), Some(format!("p{i}").as_str()));
        }
    }
}

#[tokio::test]
async fn handler_flag_and_line_numbers_fill_in_missing_fields() {
    let server = TestServer::start(|_| {});
    let url = server.url();
    let input = [
        r#"{"payload":"a"}"#,
        "",
        r#"{"id":"x","payload":"b"}"#,
        r#"{"handler":"sha256","payload":"c"}"#,
        r#"{"id":7,"payload":"d"}"#,
    ]
    .join("\n");
    let done = Ctl::spawn(
        &["--endpoint", &url, "run", "--handler", "echo", "-"],
        Some(input.into_bytes()),
    )
    .finish(LIVENESS)
    .await;
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    let out = records(&done.stdout);
    let out = by_id(&out);
    assert_eq!(
        out.keys().copied().collect::<HashSet<_>>(),
        HashSet::from(["1", "x", "4", "7"]),
        "missing ids are line numbers (blank lines count): {out:?}"
    );
    assert_eq!(out["1"]["output"], "a");
    assert_eq!(out["x"]["output"], "b");
    assert_eq!(out["7"]["output"], "d");
    let digest = base64::engine::general_purpose::STANDARD
        .decode(out["4"]["output_b64"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        digest,
        sha2::Sha256::digest(b"c").to_vec(),
        "a line's own handler wins over --handler"
    );
    assert!(out.values().all(|r| r["outcome"] == "ok"), "{out:?}");
}
