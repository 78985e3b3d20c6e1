//! batchd: a gRPC batch-processing daemon where nothing outlives the call that asked for it.
//!
//! Module map, in layers: a module uses only modules of layers below its own (`tests/architecture.rs`
//! keeps it so), lowest first:
//! units, error, codec, auth < proto < outcome < handlers < config < engine, client < telemetry < service < server
//!
//! - [`units`]: byte sizes and durations as config values; [`error`]: the error type and its one
//!   mapping to gRPC status codes; [`auth`]: `[[principal]]` tables, bearer tokens and
//!   client-certificate names; [`proto`]: generated protobuf and gRPC code, with [`codec`], its
//!   small-buffer codec; [`outcome`]: how a job ended, the one table of outcome names.
//! - [`handlers`]: the [`Handler`] trait, the registry, the built-in handlers and `exec` (commands
//!   configured by the operator, with their table's validation).
//! - [`config`]: typed config from defaults, a TOML file, `BATCHD_*` variables and flags.
//! - [`engine`]: calls, the fair bounded worker pool, the cancellation tree daemon → call → job, and
//!   the engine's own instruments (`engine::metrics`, `engine::trace`).
//! - [`client`]: the client side shared by `batchctl`, tests and Rust users (beside the engine: the
//!   two share only the protocol).
//! - [`telemetry`]: the outer adapter: logs, OpenTelemetry export, W3C parents, `/metrics` and the
//!   admin HTTP listener; the only module that imports `opentelemetry`.
//! - [`service`]: the `batchd.v1.BatchService` gRPC service (proto ⇄ domain) and its edge: who a
//!   call is, from its token or client certificate.
//! - [`server`]: runs the daemon (limits, health, reflection, shutdown with a deadline).
//! - `src/bin/`: `batchd` and `batchctl`, thin binaries above everything.

pub mod auth;
pub mod client;
pub mod codec;
pub mod config;
pub mod engine;
pub mod error;
pub mod handlers;
pub mod outcome;
pub mod proto;
pub mod server;
pub mod service;
pub mod telemetry;
pub mod units;

pub use config::Config;
pub use engine::Engine;
pub use error::Error;
pub use handlers::{Handler, Registry};
pub use server::Server;
