//! Principals end to end: with `[[principal]]` tables every BatchService call must prove who it is
//! (a bearer token here; client certificates are matched the same way once TLS is on, see the unit
//! tests of `auth`), health stays open, reflection follows the BatchService rule unless opened, and a
//! principal's jobs may use only its handlers. Without principals every call is `_anonymous`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use batchd::auth::PrincipalSpec;
use batchd::proto::Outcome;
use support::daemon::write_config;
use support::otlp::{attr, fresh_trace, named, Collector};
use support::principals::*;
use support::{batch, by_id, job, outcome, wait_until, TestServer};
use tonic::Code;

/// Upper limit of every polled wait; only reached when something is wrong.
const WAIT: Duration = Duration::from_secs(20);

/// Principals `a` (token "token-a", only `echo`) and `b` (token "token-b", every handler).
fn two_principals() -> Vec<PrincipalSpec> {
    vec![
        PrincipalSpec {
            handlers: Some(vec!["echo".into()]),
            ..principal("a", "token-a")
        },
        principal("b", "token-b"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_valid_credentials_batch_service_calls_are_unauthenticated() {
    let server = TestServer::start(|c| c.principal = two_principals());
    let url = server.url();
    let mut client = server.client().await;
    let refusals = [
        (
            None,
            "credentials required: send `authorization: Bearer <token>` metadata",
        ),
        (Some("token-c"), "invalid credentials"),
        (Some("TOKEN-A"), "invalid credentials"),
    ];
    for (token, message) in refusals {
        let status = try_open_as(&url, token)
            .await
            .err()
            .expect("Process is refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(status.message().starts_with(message), "{status:?}");
        let status = run_batch_as(&mut client, token, vec![job("x", "echo", b"", &[])])
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "RunBatch: {status:?}");
        let status = list_handlers(&mut client, token).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "ListHandlers: {status:?}"
        );
        // Nothing hints at which principals or tokens exist.
        for hint in ["token-a", "token-b", "\"a\"", "\"b\"", &digest("token-a")] {
            assert!(!status.message().contains(hint), "{status:?}");
        }
    }
    // A value that is not `Bearer <token>` is refused too.
    let mut request = tonic::Request::new(batchd::proto::ListHandlersRequest {});
    request
        .metadata_mut()
        .insert("authorization", "Basic YTpi".parse().unwrap());
    let status = client.list_handlers(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let admin = server.admin;
    assert_eq!(
        metric(
            admin,
            "batchd_calls_rejected_total",
            "reason=\"unauthenticated\""
        ),
        10.0
    );
    assert!(server.stats().jobs_admitted == 0, "no job of them ran");

    // Health needs no credentials: probes carry none.
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "batchd.v1.BatchService"] {
        let request = HealthCheckRequest {
            service: service.into(),
        };
        let status = health.check(request).await.unwrap().into_inner().status();
        assert_eq!(status as i32, 1, "SERVING for {service:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_may_use_only_its_handlers() {
    let server = TestServer::start(|c| c.principal = two_principals());
    let mut client = server.client().await;
    assert_eq!(
        list_handlers(&mut client, Some("token-a")).await.unwrap(),
        ["echo"]
    );
    assert_eq!(
        list_handlers(&mut client, Some("token-b")).await.unwrap(),
        ["echo", "sha256", "sleep", "spin"]
    );

    let mut call = open_as(&server.url(), "token-a").await;
    call.send(batch(
        "b1",
        vec![
            job("ok", "echo", b"hi", &[]),
            job("forbidden", "sha256", b"hi", &[]),
            job("unknown", "no-such-handler", b"", &[]),
            job("ok2", "echo", b"there", &[]),
        ],
    ))
    .await;
    call.half_close();
    let results = by_id(call.finish_ok(WAIT).await);
    assert_eq!(outcome(&results["ok"]), Outcome::Ok);
    assert_eq!(outcome(&results["ok2"]), Outcome::Ok);
    assert_eq!(outcome(&results["forbidden"]), Outcome::Rejected);
    assert_eq!(
        results["forbidden"].error,
        "handler \"sha256\" is not allowed for principal \"a\" (ListHandlers names the allowed ones)"
    );
    // A handler that does not exist reads the same: the principal learns nothing of the others.
    assert_eq!(
        results["unknown"].error,
        "handler \"no-such-handler\" is not allowed for principal \"a\" (ListHandlers names the \
         allowed ones)"
    );

    // b may use sha256, over RunBatch too.
    let results = run_batch_as(
        &mut client,
        Some("token-b"),
        vec![job("h", "sha256", b"", &[])],
    )
    .await
    .unwrap();
    assert_eq!(outcome(&results[0]), Outcome::Ok);

    // Per-principal figures; each call added its jobs when it handed results over.
    let admin = server.admin;
    wait_until("both calls ended", WAIT, || server.stats().calls_open == 0).await;
    let finished = |p: &str, o: &str| {
        metric(
            admin,
            "batchd_principal_jobs_finished_total",
            &format!("principal=\"{p}\",outcome=\"{o}\""),
        )
    };
    assert_eq!(finished("a", "ok"), 2.0);
    assert_eq!(finished("a", "rejected"), 2.0);
    assert_eq!(finished("b", "ok"), 1.0);
    assert_eq!(
        metric(admin, "batchd_principal_calls_total", "principal=\"a\""),
        1.0
    );
    assert_eq!(
        metric(admin, "batchd_principal_calls_total", "principal=\"b\""),
        1.0
    );
    assert_eq!(
        metric(admin, "batchd_principal_calls_open", "principal=\"a\""),
        0.0
    );
    let (_, body) = support::http_get(admin, "/metrics");
    assert!(
        !body.contains("_anonymous"),
        "no anonymous row with principals"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_principals_every_call_is_anonymous() {
    let server = TestServer::start(|_| {});
    let mut client = server.client().await;
    // A token is not needed, and one that no principal has is ignored.
    let results = run_batch_as(
        &mut client,
        Some("whatever"),
        vec![job("x", "echo", b"", &[])],
    )
    .await
    .unwrap();
    assert_eq!(outcome(&results[0]), Outcome::Ok);
    assert_eq!(list_handlers(&mut client, None).await.unwrap().len(), 4);
    wait_until("the call ended", WAIT, || server.stats().calls_open == 0).await;
    let labels = "principal=\"_anonymous\",outcome=\"ok\"";
    assert_eq!(
        metric(server.admin, "batchd_principal_jobs_finished_total", labels),
        1.0
    );
}

/// Lists the services over reflection with `token`; the names, or the status refusing it.
async fn reflect(server: &TestServer, token: Option<&str>) -> Result<Vec<String>, tonic::Status> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let mut request = tonic::Request::new(tokio_stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    }]));
    if let Some(token) = token {
        authorize(&mut request, token);
    }
    let mut responses = reflection
        .server_reflection_info(request)
        .await?
        .into_inner();
    match responses.message().await?.and_then(|r| r.message_response) {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("expected a service list, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_needs_credentials_unless_the_operator_opens_it() {
    let closed = TestServer::start(|c| c.principal = two_principals());
    let status = reflect(&closed, None).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let services = reflect(&closed, Some("token-a")).await.unwrap();
    assert!(services.contains(&"batchd.v1.BatchService".to_owned()));

    let open = TestServer::start(|c| {
        c.principal = two_principals();
        c.reflection_open = true;
    });
    assert!(reflect(&open, None).await.unwrap().len() >= 2);
    // Opening reflection opens nothing else.
    let status = try_open_as(&open.url(), None).await.err().unwrap();
    assert_eq!(status.code(), Code::Unauthenticated);
}

/// The principal is on the call's session, batch and job spans and on the log lines of its calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_principal_is_on_every_span_and_log_line_of_its_calls() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, &principal_toml("thumbnailer", &["t0k"], ""));
    let config = config.to_str().unwrap();
    let args = ["--config", config, "--set", "log=batchd=debug,info"];
    let daemon = collector
        .traced_daemon(Duration::from_millis(50), &args)
        .await;

    let trace = fresh_trace();
    let traceparent = format!("00-{trace}-b7ad6b7169203331-01");
    let mut client = daemon.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    authorize(&mut request, "t0k");
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    let mut responses = client.process(request).await.unwrap().into_inner();
    tx.send(batch("b1", vec![job("j1", "echo", b"x", &[])]))
        .await
        .unwrap();
    // A request with neither a batch nor a cancel ends the call INVALID_ARGUMENT: the daemon logs
    // the end of the call (at debug), inside the call's log span.
    tx.send(batchd::proto::ProcessRequest { kind: None })
        .await
        .unwrap();
    let mut status = None;
    while status.is_none() {
        match responses.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the call should fail"),
            Err(s) => status = Some(s),
        }
    }
    assert_eq!(status.unwrap().code(), Code::InvalidArgument);
    let spans = collector
        .wait_for("the call's spans arrive", WAIT, |s| {
            !named(s, &trace, "batchd.session").is_empty()
                && !named(s, &trace, "batchd.job").is_empty()
        })
        .await;
    for name in ["batchd.session", "batchd.batch", "batchd.job"] {
        let span = named(&spans, &trace, name)[0];
        assert_eq!(
            attr(span, "principal").as_deref(),
            Some("thumbnailer"),
            "{name}"
        );
    }
    let mut daemon = daemon;
    daemon.wait_for_log("call ended").await;
    let log = daemon.stderr();
    let line = log.lines().find(|l| l.contains("call ended")).unwrap();
    assert!(
        line.contains("call{principal=") && line.contains("thumbnailer"),
        "{line}"
    );
}
