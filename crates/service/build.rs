//! Compiles the server side of the protobuf contract with protox (pure Rust, no system
//! protoc): the tonic server trait, over weightinit-proto's messages, decoding requests with
//! this crate's codec.

const PROTO: &str = "../../proto/weightinit/v1/weightinit.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../proto");
    let descriptors = protox::compile([PROTO], ["../../proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        // The messages are weightinit-proto's.
        .extern_path(".weightinit.v1", "::weightinit_proto")
        // Counts a request's tensors before decoding them (src/codec.rs).
        .codec_path("crate::codec::RequestCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
