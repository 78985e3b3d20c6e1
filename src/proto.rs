//! Generated protobuf and gRPC code for `batchd.v1`; proto types stop at the service boundary.
#![allow(missing_docs, clippy::all)]

tonic::include_proto!("batchd.v1");

/// The encoded descriptor set of `batchd.v1`, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("batchd_descriptor");

/// Request metadata of a `Process` call that asks, when the daemon drains, for the jobs it has not
/// started back in `ProcessResponse.given_back` instead of having them run (batchd.proto, Process).
pub const GIVE_BACK_METADATA: (&str, &str) = ("batchd-drain", "give-back");
