//! weightinit: byte-identical initial weights for distributed trainers, over gRPC.
//!
//! The workspace's crates are its layers, each depending only on those below it:
//! - `weightinit-engine` ([`engine`]): algorithm v1 (seed + name + index -> value -> bytes),
//!   pure: no I/O, no async runtime, no protobuf.
//! - `weightinit-proto`: the `weightinit.v1` messages (with proto3 JSON), the gRPC client, and
//!   their conversion to and from the engine's types; shared by the service and the clients.
//! - `weightinit-service` ([`service`], [`proto`]: weightinit-proto's types and the server
//!   trait): the gRPC service around the engine: the streaming pipeline on a worker pool, TLS,
//!   token, metrics, health, reflection and graceful shutdown.
//! - `weightinit-client` ([`client`]): `fetch`, `describe` and health checks, against a remote
//!   server or the engine in this process, through one trait; and the Python extension's
//!   calls (`weightinit-python`, on the client and the engine, not the service).
//! - this package: the `weightinit` command line (clap and environment variables live only
//!   there), and this facade, which the integration tests and benchmarks import.

#![forbid(unsafe_code)]

pub use weightinit_client as client;
pub use weightinit_engine as engine;
pub use weightinit_service as service;
pub use weightinit_service::proto;
