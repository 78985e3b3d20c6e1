//! Generated protobuf and gRPC code for `batchd.v1`; proto types stop at the service boundary.
//!
//! The messages and the client are prost's; the server (`batch_service_server`) takes and gives
//! the hand-written messages of [`crate::codec::wire`] for `Process` and `RunBatch` (see
//! `build.rs`).
#![allow(missing_docs, clippy::all)]

tonic::include_proto!("batchd.v1");

include!(concat!(env!("OUT_DIR"), "/server/batchd.v1.rs"));

/// The encoded descriptor set of `batchd.v1`, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("batchd_descriptor");

/// Request metadata of a `Process` call that asks, when the daemon drains, for the jobs it has not
/// started back in `ProcessResponse.given_back` instead of having them run (batchd.proto, Process).
pub const GIVE_BACK_METADATA: (&str, &str) = ("batchd-drain", "give-back");
