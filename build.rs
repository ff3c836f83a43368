//! Compiles the protobuf contract with protox (pure Rust, no system protoc) into
//! tonic/prost code, proto3-JSON (serde) impls, and a descriptor set for reflection.

use prost::Message;
use std::{env, fs, path::PathBuf};

const PROTO: &str = "proto/weightinit/v1/weightinit.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptors = protox::compile([PROTO], ["proto"])?;
    let descriptor_bytes = descriptors.encode_to_vec();
    fs::write(out_dir.join("weightinit_descriptor.bin"), &descriptor_bytes)?;

    tonic_prost_build::configure()
        // Chunk payloads are handed to tonic as `Bytes` without copying.
        .bytes(".weightinit.v1.Chunk.data")
        // Counts a request's tensors before decoding them (src/service/codec.rs).
        .codec_path("crate::service::codec::RequestCodec")
        .compile_fds(descriptors)?;

    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .build(&[".weightinit.v1"])?;
    Ok(())
}
