//! weightinit: byte-identical initial weights for distributed trainers, over gRPC.
//!
//! Layout:
//! - [`engine`]: the pure core, algorithm v1 (seed + name + index -> value -> bytes), no I/O.
//! - [`proto`]: the generated protobuf/gRPC types of `weightinit.v1` (with proto3 JSON).
//! - [`service`]: the gRPC transport: proto <-> engine conversion, the streaming pipeline on a
//!   worker pool, and the server with health, reflection and graceful shutdown.
//! - [`client`]: client-side helpers (health checks).

pub mod client;
pub mod engine;
pub mod proto;
pub mod service;
