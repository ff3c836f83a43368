//! Compiles the protobuf contract with protox (pure Rust, no system protoc) into prost
//! messages and the tonic client, proto3-JSON (serde) impls, and descriptor sets for
//! reflection. The server side is the service's (crates/service/build.rs): it decodes requests
//! with its own codec.
//!
//! Reflection also serves google/rpc/error_details.proto (vendored from googleapis, with its
//! import from protox's built-in well-known types) so that grpcurl can decode the BadRequest
//! detail of a refusal; no code is generated for it (tonic-types has the Rust types).

use prost::Message;
use std::{env, fs, path::PathBuf};

const PROTO: &str = "../../proto/weightinit/v1/weightinit.proto";
const ERROR_DETAILS: &str = "../../proto/google/rpc/error_details.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptors = protox::compile([PROTO], ["../../proto"])?;
    let descriptor_bytes = descriptors.encode_to_vec();
    fs::write(out_dir.join("weightinit_descriptor.bin"), &descriptor_bytes)?;
    let error_details = protox::compile([ERROR_DETAILS], ["../../proto"])?;
    fs::write(
        out_dir.join("error_details_descriptor.bin"),
        error_details.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        // Chunk payloads are handed to tonic as `Bytes` without copying.
        .bytes(".weightinit.v1.Chunk.data")
        .build_server(false)
        .compile_fds(descriptors)?;

    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .build(&[".weightinit.v1"])?;
    Ok(())
}
