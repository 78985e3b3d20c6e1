//! batchctl over TLS: `https://` endpoints, `--tls-ca`, `--tls-cert`/`--tls-key`,
//! `--tls-server-name` and their `BATCHD_TLS_*` variables, and errors that say "certificate"
//! (exit 3) or name the flag (exit 2) instead of dumping the transport's.
#![allow(clippy::unwrap_used)]

mod support;

use support::batchctl::{
    batchctl, command, echo_line, path_str, records, write_lines, Ctl, EXIT_INPUT, EXIT_OK,
    EXIT_UNREACHABLE, LIVENESS,
};
use support::tls::{Ca, Files};
use support::TestServer;

/// A daemon with TLS from `files` (mTLS when `mtls`), and its `https://` endpoint.
fn tls_server(files: &Files, mtls: bool) -> (TestServer, String) {
    let server = TestServer::start(|c| {
        c.tls_cert = files.cert();
        c.tls_key = files.key();
        if mtls {
            c.tls_client_ca = files.client_ca();
        }
    });
    let endpoint = format!("https://{}", server.addr);
    (server, endpoint)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_jobs_over_tls_and_mtls() {
    let (server_ca, clients) = (Ca::new("server CA"), Ca::new("clients"));
    let files = Files::new(&server_ca.server(&[]), Some(&clients.pem()));
    let ca = files.write("ca.crt", &server_ca.pem());
    let (cert, key) = files.write_client("client", &clients.client("batchctl"));
    let (_server, endpoint) = tls_server(&files, true);
    let jobs = write_lines(
        files.dir.path(),
        "jobs.jsonl",
        (0..20).map(|i| echo_line(&format!("j{i}"), "hi")),
    );

    let done = batchctl(&[
        "--endpoint",
        &endpoint,
        "--tls-ca",
        path_str(&ca),
        "--tls-cert",
        path_str(&cert),
        "--tls-key",
        path_str(&key),
        "run",
        "-q",
        path_str(&jobs),
    ])
    .await;
    assert_eq!(done.code, Some(EXIT_OK), "{}", done.stderr);
    assert_eq!(records(&done.stdout).len(), 20);

    // The same from the environment, for `health` and `handlers`.
    let env = [
        ("BATCHD_ENDPOINT", endpoint.as_str()),
        ("BATCHD_TLS_CA", path_str(&ca)),
        ("BATCHD_TLS_CLIENT_CERT", path_str(&cert)),
        ("BATCHD_TLS_CLIENT_KEY", path_str(&key)),
    ];
    for sub in ["health", "handlers"] {
        let done = Ctl::start(command(&[sub], &env), None)
            .finish(LIVENESS)
            .await;
        assert_eq!(done.code, Some(EXIT_OK), "{sub}: {}", done.stderr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_problems_say_certificate_and_exit_3() {
    let (server_ca, clients, stranger) = (Ca::new("server CA"), Ca::new("clients"), Ca::new("x"));
    let files = Files::new(&server_ca.server(&[]), Some(&clients.pem()));
    let ca = files.write("ca.crt", &server_ca.pem());
    let wrong_ca = files.write("wrong-ca.crt", &stranger.pem());
    let (cert, key) = files.write_client("client", &clients.client("batchctl"));
    let (bad_cert, bad_key) = files.write_client("mallory", &stranger.client("mallory"));
    // Signed by the right CA, but made for servers, not clients.
    let (server_cert, server_key) = files.write_client("misused", &clients.server(&[]));
    let (_server, endpoint) = tls_server(&files, true);
    let (ca, wrong_ca) = (path_str(&ca), path_str(&wrong_ca));
    let id = ["--tls-cert", path_str(&cert), "--tls-key", path_str(&key)];
    let bad_id = [
        "--tls-cert",
        path_str(&bad_cert),
        "--tls-key",
        path_str(&bad_key),
    ];

    let misused = [
        "--tls-cert",
        path_str(&server_cert),
        "--tls-key",
        path_str(&server_key),
    ];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            [&["--tls-ca", ca][..], &misused].concat(),
            "certificate: the daemon refused the client certificate",
        ),
        (
            [&["--tls-ca", wrong_ca][..], &id].concat(),
            "certificate: the daemon's certificate was refused: UnknownIssuer (it is not signed by \
             a CA batchctl trusts",
        ),
        (
            [&["--tls-ca", ca, "--tls-server-name", "elsewhere.example"][..], &id].concat(),
            "certificate: the daemon's certificate was refused: certificate not valid for name \
             \"elsewhere.example\"",
        ),
        (
            vec!["--tls-ca", ca],
            "certificate: the daemon requires a client certificate",
        ),
        (
            [&["--tls-ca", ca][..], &bad_id].concat(),
            "certificate: the daemon refused the client certificate",
        ),
    ];
    for (flags, expected) in cases {
        for sub in ["health", "handlers"] {
            let mut args = vec!["--endpoint", endpoint.as_str()];
            args.extend(&flags);
            args.push(sub);
            let done = batchctl(&args).await;
            assert_eq!(
                done.code,
                Some(EXIT_UNREACHABLE),
                "{args:?}: {}",
                done.stderr
            );
            assert!(
                done.stderr.contains(expected),
                "{args:?}: expected {expected:?}, got {}",
                done.stderr
            );
            assert_eq!(done.stderr.lines().count(), 1, "one line: {}", done.stderr);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_flags_that_cannot_work_are_usage_errors() {
    let ca = Ca::new("CA");
    let files = Files::new(&ca.server(&[]), None);
    let missing = files.dir.path().join("missing.crt");
    let not_pem = files.write("not.pem", "hello\n");
    let ca_file = files.write("ca.crt", &ca.pem());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--endpoint",
                "https://127.0.0.1:1",
                "--tls-ca",
                path_str(&missing),
            ],
            "cannot read --tls-ca",
        ),
        (
            vec![
                "--endpoint",
                "https://127.0.0.1:1",
                "--tls-ca",
                path_str(&not_pem),
            ],
            "--tls-ca",
        ),
        (
            vec![
                "--endpoint",
                "http://127.0.0.1:1",
                "--tls-ca",
                path_str(&ca_file),
            ],
            "--tls-ca needs an https:// endpoint",
        ),
        (
            vec![
                "--endpoint",
                "https://127.0.0.1:1",
                "--tls-cert",
                path_str(&ca_file),
            ],
            "--tls-cert needs --tls-key",
        ),
    ];
    for (mut args, expected) in cases {
        args.push("health");
        let done = batchctl(&args).await;
        assert_eq!(done.code, Some(EXIT_INPUT), "{args:?}: {}", done.stderr);
        assert!(done.stderr.contains(expected), "{args:?}: {}", done.stderr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_one_side_only_is_named() {
    let ca = Ca::new("CA");
    let files = Files::new(&ca.server(&[]), None);
    let ca_file = files.write("ca.crt", &ca.pem());
    let (tls, endpoint) = tls_server(&files, false);
    let plain = TestServer::start(|_| {});

    // http:// against a TLS daemon, https:// against a plaintext one.
    let to_tls = format!("http://{}", tls.addr);
    let to_plain = format!("https://{}", plain.addr);
    for (args, hint) in [
        (
            vec!["--endpoint", to_tls.as_str(), "health"],
            "the daemon answered with TLS: use https://",
        ),
        (
            vec![
                "--endpoint",
                to_plain.as_str(),
                "--tls-ca",
                path_str(&ca_file),
                "health",
            ],
            "is TLS on at the daemon? if not, use http://",
        ),
    ] {
        let done = batchctl(&args).await;
        assert_eq!(
            done.code,
            Some(EXIT_UNREACHABLE),
            "{args:?}: {}",
            done.stderr
        );
        assert!(done.stderr.contains(hint), "{args:?}: {}", done.stderr);
    }
    let ok = batchctl(&[
        "--endpoint",
        &endpoint,
        "--tls-ca",
        path_str(&ca_file),
        "health",
    ])
    .await;
    assert_eq!(ok.code, Some(EXIT_OK), "{}", ok.stderr);
}

/// A bare `host:port` with a `--tls-*` option means `https://`; a `dns:///` name's addresses are
/// checked against the name (not the address), which a certificate naming only `localhost` shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_addresses_and_dns_names_speak_tls_with_tls_options() {
    let ca = Ca::new("CA");
    let files = Files::new(&ca.server_named(&["localhost"]), None);
    let ca_file = files.write("ca.crt", &ca.pem());
    let server = TestServer::start(|c| {
        c.tls_cert = files.cert();
        c.tls_key = files.key();
    });
    let port = server.addr.port();
    let ca_file = path_str(&ca_file);

    let dns = format!("dns:///localhost:{port}");
    let done = batchctl(&["--endpoint", &dns, "--tls-ca", ca_file, "handlers"]).await;
    assert_eq!(done.code, Some(EXIT_OK), "{dns}: {}", done.stderr);
    assert!(done.stdout.contains("echo"), "{}", done.stdout);

    // The address alone is not a name the certificate holds.
    let bare = format!("127.0.0.1:{port}");
    let done = batchctl(&["--endpoint", &bare, "--tls-ca", ca_file, "handlers"]).await;
    assert_eq!(done.code, Some(EXIT_UNREACHABLE), "{bare}: {}", done.stderr);
    assert!(
        done.stderr
            .contains("certificate: the daemon's certificate was refused")
            && done.stderr.contains("not valid for name"),
        "{bare} is https:// with --tls-ca: {}",
        done.stderr
    );
    // ... unless --tls-server-name says which name to check.
    let done = batchctl(&[
        "--endpoint",
        &bare,
        "--tls-ca",
        ca_file,
        "--tls-server-name",
        "localhost",
        "health",
    ])
    .await;
    assert_eq!(done.code, Some(EXIT_OK), "{bare}: {}", done.stderr);
}

/// `run` spreads its jobs over replicas and retries lost ones; a refused client certificate would
/// be refused by every replica, so the run stops at once with exit 3 and says why, well before
/// `--reconnect-timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_without_a_client_certificate_stops_at_once_and_says_why() {
    let (server_ca, clients) = (Ca::new("server CA"), Ca::new("clients"));
    let files = Files::new(&server_ca.server(&[]), Some(&clients.pem()));
    let ca = files.write("ca.crt", &server_ca.pem());
    let (_server, endpoint) = tls_server(&files, true);
    let jobs = write_lines(
        files.dir.path(),
        "jobs.jsonl",
        (0..5).map(|i| echo_line(&format!("j{i}"), "hi")),
    );
    let started = std::time::Instant::now();
    let done = batchctl(&[
        "--endpoint",
        &endpoint,
        "--tls-ca",
        path_str(&ca),
        "run",
        "-q",
        "--reconnect-timeout",
        "10m",
        path_str(&jobs),
    ])
    .await;
    assert_eq!(done.code, Some(EXIT_UNREACHABLE), "{}", done.stderr);
    assert!(
        done.stderr
            .contains("certificate: the daemon requires a client certificate"),
        "{}",
        done.stderr
    );
    assert!(started.elapsed() < LIVENESS, "stopped at once");
}
