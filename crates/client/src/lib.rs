//! The client side: commands that talk to a weightinit server (or run one in-process).
//!
//! - [`source`]: the request file and the server, remote or in this process (`--local`).
//! - [`fetch`]: streams a request's tensors to disk, verifying and resuming.
//! - [`output`]: the safetensors, npy and raw writers.
//! - [`local`]: in-process generation into the caller's memory (the Python package's).
//! - [`remote`]: calls to a server with a receive into the caller's memory (the Python
//!   package's).
//! - [`describe`]: a request's resolved tensors as a table.
//! - [`retry`]: which failures to retry, and the backoff.
//! - [`progress`]: the progress line and notes on stderr.
//! - [`health`]: `weightinit healthcheck`.
//! - [`target`]: server addresses, how to reach them (TLS, token), and what to say when one
//!   cannot be reached.

#![forbid(unsafe_code)]

pub mod describe;
pub mod fetch;
pub mod health;
pub mod local;
pub mod output;
pub mod progress;
pub mod remote;
pub mod retry;
pub mod source;
pub mod target;
