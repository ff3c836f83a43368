//! The `weightinit.v1` protobuf contract, shared by the service and the clients:
//! - the generated messages (with proto3 JSON) and the gRPC client;
//! - [`convert`]: proto <-> engine types, and engine errors -> gRPC statuses.
//!
//! The server trait is generated in the service, which decodes requests with its own codec.

#![forbid(unsafe_code)]

pub mod convert;

#[allow(clippy::all, missing_docs)]
mod generated {
    tonic::include_proto!("weightinit.v1");
    include!(concat!(env!("OUT_DIR"), "/weightinit.v1.serde.rs"));
}

pub use generated::*;

/// The encoded file descriptor set, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/weightinit_descriptor.bin"));

/// google/rpc/error_details.proto and its import, encoded: reflection serves them so that
/// grpcurl can show the BadRequest detail a refusal carries.
pub const ERROR_DETAILS_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/error_details_descriptor.bin"));
