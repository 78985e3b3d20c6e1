//! Embeds batchd with a handler of your own: `cargo run --example embed`, then send jobs with
//! `handler: "upper"` to 127.0.0.1:50052.

use std::sync::Arc;

use batchd::handlers::{HandlerError, JobContext, JobInput, Params};
use batchd::{Config, Handler, Registry, Server};
use bytes::Bytes;

/// Upper-cases UTF-8 payloads; `params.lang` is accepted and ignored, to show param checks.
struct Upper;

#[async_trait::async_trait]
impl Handler for Upper {
    fn description(&self) -> &str {
        "Returns the UTF-8 payload upper-cased. Params: lang (optional, ignored)."
    }

    fn check(&self, params: &Params) -> Result<(), String> {
        match params.keys().find(|k| k.as_str() != "lang") {
            Some(k) => Err(format!("unknown param {k:?}")),
            None => Ok(()),
        }
    }

    async fn run(self: Arc<Self>, input: JobInput, ctx: JobContext) -> Result<Bytes, HandlerError> {
        let text = std::str::from_utf8(&input.payload)
            .map_err(|e| HandlerError(format!("payload is not UTF-8: {e}")))?
            .to_owned();
        // CPU-bound work goes to the bounded CPU pool, never onto the async runtime.
        ctx.run_cpu(move |_cancel| Bytes::from(text.to_uppercase()))
            .await
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut registry = Registry::builtin();
    registry.register("upper", Upper);
    let config = Config {
        listen: "127.0.0.1:50052".parse()?,
        ..Config::default()
    };
    let telemetry = batchd::telemetry::init(&config)?;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server = Server::new(config, registry).with_admin(admin);
    let res = server
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    telemetry.shutdown().await;
    Ok(res?)
}
