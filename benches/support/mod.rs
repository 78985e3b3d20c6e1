//! The harness shared by every bench (`daemon`, `exec`, `batchctl`).
//!
//! - [`scenarios`]: which scenarios argv names (`cargo bench --bench daemon -- echo idle`).
//! - [`daemon`]: the release `batchd` binary as a child process on `127.0.0.1:0`, its address read
//!   from its log; SIGTERM when dropped.
//! - [`inproc`]: `batchd::Server` on its own runtime inside the bench process, for figures only the
//!   process itself can read (engine counters, live tasks, children of the bench process); with
//!   exec handlers set up as `batchd` sets them up (subreaper, isolation, the reaper at the end).
//! - [`procfs`]: CPU time, RSS, threads, state and identity (pid + start time) of a process, and
//!   which processes there are, from /proc; the `machine:` line and the load average.
//! - [`client`]: tonic connections, open `Process` calls and request builders.
//! - [`flow`]: a call kept busy with a credit of jobs in flight, its results counted.
//! - [`stats`]: percentiles of sorted samples, milliseconds.
//! - [`report`]: `name: value` figure lines and `target_check:` lines (a target may check one
//!   number of a figure of several, such as `best 1.18, median 1.61`).
//!
//! Why a copy and not `tests/support`: `tests/support/daemon.rs` needs its parent's `wait_until`
//! (it does not compile alone), `tests/support/mod.rs` brings the OTLP receiver and the test
//! handlers with it, and its `TestServer` also serves the admin listener, one more live task in the
//! in-process baseline that `churn_inproc` reports. What is copied is small: the in-process server
//! and the parser of the "serving" log line.
//!
//! This file is `support/mod.rs`, not `support.rs`: Cargo would take `benches/support.rs` for a
//! bench target of its own.

// Each bench uses a different part of the harness.
#![allow(dead_code)]

pub mod client;
pub mod daemon;
pub mod flow;
pub mod inproc;
pub mod procfs;
pub mod report;
pub mod scenarios;
pub mod stats;
