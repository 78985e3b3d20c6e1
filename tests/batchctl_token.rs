//! batchctl against a daemon with principals: the token comes from `--token-file` or `BATCHD_TOKEN`,
//! and a missing or wrong one is reported as the daemon's UNAUTHENTICATED.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use batchd::auth::PrincipalSpec;
use support::principals::principal;
use support::TestServer;

/// Runs batchctl with `args`, `env` (and no other `BATCHD_*` variable) and `stdin`, off the runtime.
async fn batchctl(
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    stdin: &'static str,
) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_batchctl"));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("BATCHD_") {
                cmd.env_remove(key);
            }
        }
        let mut child = cmd
            .args(&args)
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batchctl_sends_the_token_from_a_file_or_the_environment() {
    let server = TestServer::start(|c| {
        c.principal = vec![PrincipalSpec {
            handlers: Some(vec!["echo".into()]),
            ..principal("cli", "s3cret-token")
        }];
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "s3cret-token\n").unwrap();
    let endpoint = format!("--endpoint={}", server.url());
    let jobs = "{\"id\": \"a\", \"handler\": \"echo\", \"payload\": \"hi\"}\n";

    let out = batchctl(
        vec![
            "run".into(),
            "-q".into(),
            endpoint.clone(),
            format!("--token-file={}", file.display()),
        ],
        vec![],
        jobs,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"outcome\":\"ok\""));

    let env = vec![("BATCHD_TOKEN", "s3cret-token".to_owned())];
    let out = batchctl(vec!["handlers".into(), endpoint.clone()], env, "").await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next(),
        Some("echo")
    );

    // No token, a wrong one: the daemon's refusal, not a transport dump.
    let env = vec![("BATCHD_TOKEN", "wrong".to_owned())];
    for env in [vec![], env] {
        let out = batchctl(vec!["run".into(), "-q".into(), endpoint.clone()], env, jobs).await;
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("the call failed") && err.contains("credentials"),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
    }
    // An unreadable token file is a usage error.
    let missing = format!("--token-file={}", dir.path().join("nope").display());
    let out = batchctl(vec!["handlers".into(), endpoint, missing], vec![], "").await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the token file"));
}
