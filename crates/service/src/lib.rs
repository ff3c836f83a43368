//! The weightinit gRPC service: a thin layer between protobuf and the engine.
//!
//! - [`proto`]: the generated types of `weightinit.v1` (with proto3 JSON).
//! - [`convert`]: proto <-> engine types, and engine errors -> gRPC statuses.
//! - [`codec`]: prost decoding that counts a request's tensors first.
//! - [`pool`]: the worker threads that do the CPU work.
//! - [`pipeline`]: a validated request streamed as headers, chunks and ends.
//! - [`watchdog`]: the response stream, and the idle limit for clients that stop reading.
//! - [`handler`]: the `weightinit.v1.WeightInit` RPCs.
//! - [`auth`]: the optional bearer token.
//! - [`tls`]: TLS and mutual TLS from PEM files, reloadable.
//! - [`listener`]: accepting connections up to a limit.
//! - [`metrics`]: counters and the Prometheus text endpoint.
//! - [`server`]: configuration, health, reflection, reload and graceful shutdown.

mod auth;
pub mod codec;
pub mod convert;
pub mod handler;
mod listener;
pub mod metrics;
pub mod pipeline;
mod pool;
pub mod proto;
pub mod server;
mod tls;
mod watchdog;

pub use server::{ServeConfig, Server};
