//! Compiles the protos without a system `protoc` and writes the descriptor set for reflection.
//!
//! Two passes over the one proto: the messages and the client as prost generates them, then the
//! server alone, whose `Process` and `RunBatch` messages are the hand-written ones of
//! `src/codec/wire.rs` (ids and names decoded without a copy); the other messages it names are the
//! generated ones of the first pass.

use std::{env, fs, path::PathBuf};

use prost::Message;

/// The messages the server decodes and encodes with `crate::codec::wire`'s types.
const WIRE: [&str; 5] = [
    "ProcessRequest",
    "JobBatch",
    "Job",
    "CancelJobs",
    "ProcessResponse",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/batchd/v1/batchd.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("batchd_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .bytes(".batchd.v1")
        .build_server(false)
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(fds.clone())?;
    let server = out.join("server");
    fs::create_dir_all(&server)?;
    let mut config = tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&server)
        .codec_path("crate::codec::SmallBufferCodec")
        .extern_path(".batchd.v1", "crate::proto");
    for m in WIRE {
        config = config.extern_path(
            format!(".batchd.v1.{m}"),
            format!("crate::codec::wire::{m}"),
        );
    }
    config.compile_fds(fds)?;
    Ok(())
}
