//! batchd: a gRPC batch-processing daemon where nothing outlives the call that asked for it.
//!
//! Module map:
//! - [`server`]: runs the daemon (limits, health, reflection, shutdown with a deadline).
//! - [`service`]: the `batchd.v1.BatchService` gRPC service; proto ⇄ domain, nothing else.
//! - [`engine`]: calls, the fair bounded worker pool, the cancellation tree daemon → call → job.
//! - [`handlers`]: the [`Handler`] trait, the registry and the built-in handlers.
//! - [`config`]: typed config from defaults, a TOML file, `BATCHD_*` variables and flags.
//! - [`error`]: the error type and its one mapping to gRPC status codes.
//! - [`client`]: the client side shared by `batchctl`, tests and Rust users.
//! - [`telemetry`]: logs, OpenTelemetry traces, metrics and the admin HTTP listener.
//! - [`proto`]: generated protobuf and gRPC code, and [`codec`], its small-buffer codec.

pub mod client;
pub mod codec;
pub mod config;
pub mod engine;
pub mod error;
pub mod handlers;
pub mod proto;
pub mod server;
pub mod service;
pub mod telemetry;

pub use config::Config;
pub use engine::Engine;
pub use error::Error;
pub use handlers::{Handler, Registry};
pub use server::Server;
