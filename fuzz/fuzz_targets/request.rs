//! The request path of a `Process` call, without a server: the bytes of a request body → gRPC
//! framing with the daemon's codec and `max_message_size` (tonic's `Streaming`, as the generated
//! server builds it) → the daemon's hand-written `codec::wire::ProcessRequest` → `service::command`
//! → the admission checks of the call's session (`Engine::check_job`) for its principal.
//!
//! Input: a byte choosing the principal, a byte choosing how the body is cut into HTTP/2 DATA
//! frames, then the body.
//!
//! Properties:
//! - The stream yields exactly the messages an independent walk of the gRPC frames finds, in order
//!   (so cutting the body anywhere changes nothing), and then ends, or fails with the status that
//!   walk predicts: RESOURCE_EXHAUSTED for a message over `max_message_size` (as the daemon maps
//!   it), INTERNAL for a compressed flag, a bad message or a truncated frame (except a body that
//!   ends just after a header: tonic 0.14.9 ends that stream cleanly, see `walk`).
//! - The daemon's hand-written decoding agrees with prost's generated code: a frame decodes with
//!   both or with neither, and the daemon's message re-encoded is what prost decoded.
//! - Each message survives an encode/decode round trip.
//! - A message with neither a batch nor a cancel is INVALID_ARGUMENT; anything else a command.
//! - Each job of a batch is admitted or rejected, never panics: admitted only with a non-empty id,
//!   a handler the principal may use and the daemon has, a payload within `max_payload`, a
//!   positive timeout within the handler's and the daemon's cap; for an exec handler, its argv has
//!   exactly the spec's arguments, each placeholder replaced by its param's whole value. Rejected
//!   with a message that is not empty and stays short whatever the job holds.
#![no_main]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use batchd::codec::{wire, SmallBufferCodec};
use batchd::engine::{Command, Principal};
use batchd::proto;
use batchd::Engine;
use batchd_fuzz::{daemon, principal_of, ALICE_TOKEN, BOB_TOKENS, MAX_REASON};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use http_body_util::StreamBody;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tonic::codec::Codec;
use tonic::{Code, Status, Streaming};

fuzz_target!(|data: &[u8]| run(data));

/// What the frames of a body hold, walked independently of tonic.
#[derive(Debug)]
enum Frame {
    /// A frame whose payload decodes (with prost's generated code).
    Message(proto::ProcessRequest),
    /// The stream must fail with this code here.
    Fails(Code),
}

fn run(data: &[u8]) {
    let [who, cut, body @ ..] = data else {
        return;
    };
    let d = daemon();
    let (engine, principal): (&Engine, Arc<Principal>) = match who % 4 {
        0 => (&d.anonymous, anonymous(&d.anonymous)),
        1 => (
            &d.engine,
            principal_of(&d.engine, ALICE_TOKEN).expect("alice"),
        ),
        2 => (
            &d.engine,
            principal_of(&d.engine, BOB_TOKENS[0]).expect("bob"),
        ),
        _ => (
            &d.engine,
            principal_of(&d.engine, BOB_TOKENS[1]).expect("bob"),
        ),
    };
    let max_message = d.config.max_message_size.as_usize();
    let expected = walk(body, max_message);

    let chunk = match *cut {
        0 => body.len().max(1),
        n => usize::from(n % 64) + 1,
    };
    let frames: Vec<Result<http_body::Frame<Bytes>, Infallible>> = body
        .chunks(chunk)
        .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let decoder =
        SmallBufferCodec::<wire::ProcessResponse, wire::ProcessRequest>::default().decoder();
    let body = StreamBody::new(futures_util::stream::iter(frames));
    let mut stream = Streaming::new_request(decoder, body, None, Some(max_message));

    let mut expected = expected.into_iter();
    loop {
        let next = stream
            .next()
            .now_or_never()
            .expect("a body that is always ready never leaves the stream pending");
        match (next, expected.next()) {
            (None, None) => break,
            (Some(Ok(msg)), Some(Frame::Message(want))) => {
                let seen = proto::ProcessRequest::decode(msg.encode_to_vec().as_slice())
                    .expect("the daemon's message re-encodes to one prost decodes");
                assert_eq!(seen, want, "the stream and the frame walk disagree");
                check_message(engine, &principal, msg);
            }
            (Some(Err(status)), Some(Frame::Fails(code))) => {
                // As the service maps a failed request stream.
                let status = Status::from(batchd::Error::from(status));
                assert_eq!(status.code(), code, "{status:?}");
                // The session ends the call at the first failure: nothing after it is read.
                break;
            }
            (got, want) => panic!("stream gave {got:?}, the frame walk expects {want:?}"),
        }
    }
}

fn anonymous(engine: &Engine) -> Arc<Principal> {
    engine
        .authenticate(&batchd::auth::Credentials::new(None, None))
        .expect("without principals every call is anonymous")
}

/// The gRPC frames of `body`: a 1-byte compressed flag, a 4-byte big-endian length, the message.
fn walk(mut body: &[u8], max_message: usize) -> Vec<Frame> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let Some((head, rest)) = body.split_first_chunk::<5>() else {
            out.push(Frame::Fails(Code::Internal)); // truncated header at the end of the body
            break;
        };
        if head[0] != 0 {
            out.push(Frame::Fails(Code::Internal)); // compressed, but no grpc-encoding
            break;
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > max_message {
            out.push(Frame::Fails(Code::ResourceExhausted));
            break;
        }
        if rest.is_empty() && len > 0 {
            // tonic 0.14.9 quirk: a body that ends right after a header, before any byte of its
            // message, ends the stream as if it were complete (its "Unexpected EOF" check looks
            // only at buffered bytes, and the header was consumed). The message is lost; the
            // session takes it for a half-close.
            break;
        }
        if rest.len() < len {
            out.push(Frame::Fails(Code::Internal)); // truncated message
            break;
        }
        let (payload, rest) = rest.split_at(len);
        match proto::ProcessRequest::decode(payload) {
            Ok(m) => out.push(Frame::Message(m)),
            Err(_) => {
                out.push(Frame::Fails(Code::Internal));
                break;
            }
        }
        body = rest;
    }
    out
}

fn check_message(engine: &Engine, principal: &Principal, msg: wire::ProcessRequest) {
    let again = wire::ProcessRequest::decode(msg.encode_to_vec().as_slice())
        .expect("a decoded message re-encodes to a decodable one");
    assert_eq!(again, msg, "encode/decode round trip");

    let had_kind = msg.kind.is_some();
    let timeouts: Vec<Option<prost_types::Duration>> = match &msg.kind {
        Some(wire::Kind::Batch(b)) => b.jobs.iter().map(|j| j.timeout).collect(),
        _ => Vec::new(),
    };
    let command = batchd::service::command(msg);
    let command = match (had_kind, command) {
        (true, Ok(c)) => c,
        (false, Err(e)) => {
            assert_eq!(Status::from(e).code(), Code::InvalidArgument);
            return;
        }
        (had_kind, other) => panic!("kind present: {had_kind}, command: {other:?}"),
    };
    let Command::Submit { jobs, .. } = command else {
        return;
    };
    let d = daemon();
    let limits = engine.limits();
    for (job, asked) in jobs.iter().zip(timeouts) {
        match engine.check_job(principal, job) {
            Ok(timeout) => {
                assert!(!job.id.is_empty(), "admitted with an empty id");
                assert!(
                    principal.may_use(job.handler.as_str()),
                    "admitted a forbidden handler"
                );
                let handler = engine
                    .registry()
                    .get(job.handler.as_str())
                    .expect("admitted an unknown handler");
                assert!(job.payload.len() <= limits.max_payload, "payload over max");
                assert!(!timeout.is_zero() && timeout <= limits.max_job_timeout);
                if let Some(cap) = handler.timeout() {
                    assert!(timeout <= cap, "timeout over the handler's cap");
                }
                match asked {
                    None => {}
                    Some(asked) => {
                        let asked = Duration::try_from(asked).expect("admitted a negative timeout");
                        assert!(!asked.is_zero(), "admitted a zero timeout");
                        assert!(timeout <= asked, "runs longer than asked");
                    }
                }
                if let Some((spec, template)) = d.exec.get(job.handler.as_str()) {
                    check_argv(spec, template, &job.params);
                }
            }
            Err(reason) => {
                assert!(!reason.is_empty(), "a rejection says why");
                assert!(
                    reason.len() <= MAX_REASON,
                    "a rejection of {} bytes",
                    reason.len()
                );
            }
        }
    }
}

/// An admitted exec job's command line: the spec's arguments, a placeholder replaced by its param's
/// whole value, nothing split or joined.
fn check_argv(
    spec: &batchd::handlers::exec::ExecSpec,
    template: &batchd::handlers::exec::Template,
    params: &batchd::handlers::Params,
) {
    let argv = template
        .argv(params)
        .expect("an admitted job's argv builds");
    assert_eq!(
        argv.len(),
        spec.command.len(),
        "one argument per command element"
    );
    for (arg, written) in argv.iter().zip(&spec.command) {
        let arg = arg.to_str().expect("params and literals are UTF-8");
        let inner = written.strip_prefix('{').and_then(|w| w.strip_suffix('}'));
        match inner {
            Some(name) if spec.params.contains_key(name) => {
                assert_eq!(Some(arg), params.get(name).map(String::as_str));
            }
            Some(lit) if lit.starts_with('{') && lit.ends_with('}') => assert_eq!(arg, lit),
            _ => assert_eq!(arg, written),
        }
    }
}
