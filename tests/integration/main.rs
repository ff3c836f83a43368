//! The integration tests: one binary, as ripgrep keeps them, with a module per area and the
//! support they share in [`util`]. Tests start the real server (in this process, or the
//! binary as a child) on 127.0.0.1:0 and talk to it with real clients.

mod util;

mod abuse;
mod bounded;
mod cancellation;
mod client_errors;
mod digest;
mod equivalence;
mod errors;
mod fetch;
mod fuzz;
mod grpcurl;
mod load;
mod metrics;
mod properties;
mod security;
mod shutdown;
mod structured;
mod vectors;
