//! Built-in handlers: `echo`, `sleep`, `sha256` and `spin`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::Digest;

use super::{quote, Handler, HandlerError, JobContext, JobInput, Params};

/// Longest `sleep`/`spin` a job may ask for, so a typo cannot hold a worker for days.
const MAX_MS: u64 = 24 * 3600 * 1000;
/// Payloads at least this large are hashed on the CPU pool rather than inline.
const SHA256_INLINE_MAX: usize = 64 * 1024;

/// Returns the payload unchanged.
#[derive(Debug, Clone, Copy)]
pub struct Echo;

/// Waits `params.ms` milliseconds (cancellable), then returns the payload.
#[derive(Debug, Clone, Copy)]
pub struct Sleep;

/// Returns the raw 32-byte SHA-256 digest of the payload.
#[derive(Debug, Clone, Copy)]
pub struct Sha256;

/// Burns CPU for `params.ms` milliseconds on the CPU pool, checking for cancellation every 0.2 ms.
#[derive(Debug, Clone, Copy)]
pub struct Spin;

/// Reads `params.ms` (a whole number of milliseconds, default 0).
fn millis(params: &Params) -> Result<u64, String> {
    let Some(raw) = params.get("ms") else {
        return Ok(0);
    };
    match raw.trim().parse::<u64>() {
        Ok(ms) if ms <= MAX_MS => Ok(ms),
        Ok(_) => Err(format!(
            "param ms: {} is over the limit of {MAX_MS}",
            quote(raw)
        )),
        Err(_) => Err(format!(
            "param ms: {} is not a whole number of milliseconds",
            quote(raw)
        )),
    }
}

/// Rejects every param other than `ms`.
fn only_ms(params: &Params) -> Result<u64, String> {
    if let Some(other) = params.keys().find(|k| k.as_str() != "ms") {
        return Err(format!(
            "unknown param {} (this handler takes only ms)",
            quote(other)
        ));
    }
    millis(params)
}

/// Rejects any param.
fn no_params(params: &Params) -> Result<(), String> {
    match params.keys().next() {
        Some(k) => Err(format!(
            "unknown param {} (this handler takes none)",
            quote(k)
        )),
        None => Ok(()),
    }
}

#[async_trait::async_trait]
impl Handler for Echo {
    fn description(&self) -> &str {
        "Returns the payload unchanged. No params."
    }

    fn check(&self, params: &Params) -> Result<(), String> {
        no_params(params)
    }

    fn run_now(&self, input: JobInput) -> Result<Result<Bytes, HandlerError>, JobInput> {
        Ok(Ok(input.payload))
    }

    async fn run(
        self: Arc<Self>,
        input: JobInput,
        _ctx: JobContext,
    ) -> Result<Bytes, HandlerError> {
        Ok(input.payload)
    }
}

#[async_trait::async_trait]
impl Handler for Sleep {
    fn description(&self) -> &str {
        "Waits params.ms milliseconds (default 0), then returns the payload. Stops at once when cancelled."
    }

    fn check(&self, params: &Params) -> Result<(), String> {
        only_ms(params).map(drop)
    }

    async fn run(
        self: Arc<Self>,
        input: JobInput,
        _ctx: JobContext,
    ) -> Result<Bytes, HandlerError> {
        let ms = only_ms(&input.params).map_err(HandlerError)?;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(input.payload)
    }
}

#[async_trait::async_trait]
impl Handler for Sha256 {
    fn description(&self) -> &str {
        "Returns the raw 32-byte SHA-256 digest of the payload. No params."
    }

    fn check(&self, params: &Params) -> Result<(), String> {
        no_params(params)
    }

    fn run_now(&self, input: JobInput) -> Result<Result<Bytes, HandlerError>, JobInput> {
        match input.payload.len() < SHA256_INLINE_MAX {
            true => Ok(Ok(Bytes::copy_from_slice(&sha2::Sha256::digest(
                &input.payload,
            )))),
            false => Err(input),
        }
    }

    async fn run(self: Arc<Self>, input: JobInput, ctx: JobContext) -> Result<Bytes, HandlerError> {
        let payload = input.payload;
        if payload.len() < SHA256_INLINE_MAX {
            return Ok(Bytes::copy_from_slice(&sha2::Sha256::digest(&payload)));
        }
        ctx.run_cpu(move |_| Bytes::copy_from_slice(&sha2::Sha256::digest(&payload)))
            .await
    }
}

#[async_trait::async_trait]
impl Handler for Spin {
    fn description(&self) -> &str {
        "Burns CPU for params.ms milliseconds (default 0) on the CPU pool, then returns the payload. \
         Checks for cancellation every 0.2 ms."
    }

    fn check(&self, params: &Params) -> Result<(), String> {
        only_ms(params).map(drop)
    }

    async fn run(self: Arc<Self>, input: JobInput, ctx: JobContext) -> Result<Bytes, HandlerError> {
        let ms = only_ms(&input.params).map_err(HandlerError)?;
        let finished = ctx
            .run_cpu(move |cancel| {
                let until = Instant::now() + Duration::from_millis(ms);
                let mut x = 0u64;
                loop {
                    let lap = Instant::now() + Duration::from_micros(200);
                    while Instant::now() < lap {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                    if cancel.is_cancelled() {
                        return false;
                    }
                    if Instant::now() >= until {
                        return true;
                    }
                }
            })
            .await?;
        if finished {
            Ok(input.payload)
        } else {
            Err(HandlerError("cancelled".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::CpuPool;
    use tokio_util::sync::CancellationToken;

    fn input(payload: &'static [u8], params: &[(&str, &str)]) -> JobInput {
        JobInput {
            payload: Bytes::from_static(payload),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn ctx() -> (CancellationToken, JobContext) {
        let ctx = JobContext::new(CpuPool::new(1), tracing::Span::none());
        (ctx.cancel_token().clone(), ctx)
    }

    #[tokio::test]
    async fn sha256_is_the_raw_digest() {
        let out = Arc::new(Sha256)
            .run(input(b"abc", &[]), ctx().1)
            .await
            .unwrap();
        assert_eq!(out.len(), 32);
        assert_eq!(
            out[..4],
            [0xba, 0x78, 0x16, 0xbf],
            "SHA-256(\"abc\") starts ba7816bf"
        );
    }

    #[tokio::test]
    async fn run_now_gives_what_run_gives_or_hands_the_input_back() {
        let now = Echo.run_now(input(b"abc", &[])).unwrap().unwrap();
        assert_eq!(now, Bytes::from_static(b"abc"));
        let now = Sha256.run_now(input(b"abc", &[])).unwrap().unwrap();
        let later = Arc::new(Sha256).run(input(b"abc", &[]), ctx().1).await;
        assert_eq!(now, later.unwrap());
        let big = Bytes::from(vec![0u8; SHA256_INLINE_MAX]);
        let back = Sha256.run_now(JobInput {
            payload: big.clone(),
            params: Params::new(),
        });
        assert_eq!(
            back.map(drop).unwrap_err().payload,
            big,
            "large payloads go to the CPU pool"
        );
        assert!(Sleep.run_now(input(b"", &[])).is_err());
    }

    #[test]
    fn rejections_quote_client_strings_briefly() {
        let huge = "\u{1}".repeat(1 << 20);
        let padded = format!("{}99999999999", " ".repeat(1 << 20));
        for params in [
            [(huge.as_str(), "1")],
            [("ms", huge.as_str())],
            [("ms", padded.as_str())],
        ] {
            let err = Sleep.check(&input(b"", &params).params).unwrap_err();
            assert!(err.len() < 1024, "{} bytes", err.len());
        }
    }

    #[test]
    fn params_are_checked() {
        assert!(Sleep.check(&input(b"", &[("ms", "10")]).params).is_ok());
        assert!(Sleep
            .check(&input(b"", &[("ms", "ten")]).params)
            .unwrap_err()
            .contains("ms"));
        assert!(Sleep
            .check(&input(b"", &[("sec", "1")]).params)
            .unwrap_err()
            .contains("sec"));
        assert!(Echo.check(&input(b"", &[("x", "1")]).params).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spin_stops_when_cancelled() {
        let (cancel, ctx) = ctx();
        let job = tokio::spawn(Arc::new(Spin).run(input(b"", &[("ms", "60000")]), ctx));
        cancel.cancel();
        let res = tokio::time::timeout(Duration::from_secs(5), job)
            .await
            .unwrap()
            .unwrap();
        assert!(res.is_err());
    }
}
