//! The weightinit gRPC service: a thin layer between protobuf and the engine.
//!
//! Public, for the command line, the client library and the tests:
//! - [`proto`]: the types of `weightinit.v1` (weightinit-proto's, with proto3 JSON) and the
//!   server trait generated here, whose requests [`codec`] decodes.
//! - [`convert`]: proto <-> engine types, and engine errors -> gRPC statuses
//!   (weightinit-proto's, shared with the clients).
//! - [`codec`]: prost decoding that counts a request's tensors first.
//! - [`pipeline`]: a validated request streamed as headers, chunks and ends.
//! - [`handler`]: the `weightinit.v1.WeightInit` RPCs.
//! - [`metrics`]: counters, and the OpenMetrics endpoint (prometheus-client behind hyper).
//! - [`server`]: [`ServeConfig`] (a plain struct; the flags live in the `weightinit` binary),
//!   health, reflection, reload and graceful shutdown.
//!
//! Inside: `pool` (the worker threads that do the CPU work), `watchdog` (the response
//! stream, and the idle limit for clients that stop reading), `auth` (the optional bearer
//! token), `tls` (TLS and mutual TLS from PEM files, reloadable) and `listener` (accepting
//! connections up to a limit), and `memory` (freed memory given back at idle: the one
//! unsafe call, to glibc's `malloc_trim`).

#![deny(unsafe_code)]

mod auth;
pub mod codec;
pub mod handler;
mod listener;
mod memory;
pub mod metrics;
pub mod pipeline;
mod pool;
pub mod proto;
pub mod server;

pub use weightinit_proto::convert;
mod tls;
mod watchdog;

pub use server::{ServeConfig, Server};
