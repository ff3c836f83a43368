//! The gRPC transport: a thin layer between protobuf and the engine.
//!
//! - [`convert`]: proto <-> engine types, and engine errors -> gRPC statuses.
//! - [`pool`]: the worker threads that do the CPU work.
//! - [`pipeline`]: a validated request streamed as headers, chunks and ends.
//! - [`handler`]: the `weightinit.v1.WeightInit` RPCs.
//! - [`server`]: configuration, health, reflection and graceful shutdown.

pub mod convert;
pub mod handler;
pub mod pipeline;
pub mod pool;
pub mod server;

pub use server::{ServeConfig, Server};
