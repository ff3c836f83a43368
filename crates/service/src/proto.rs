//! Generated types of the `weightinit.v1` protobuf package, with proto3-JSON (serde) support.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("weightinit.v1");
include!(concat!(env!("OUT_DIR"), "/weightinit.v1.serde.rs"));

/// The encoded file descriptor set, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/weightinit_descriptor.bin"));

/// google/rpc/error_details.proto and its import, encoded: reflection serves them so that
/// grpcurl can show the BadRequest detail a refusal carries.
pub const ERROR_DETAILS_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/error_details_descriptor.bin"));
