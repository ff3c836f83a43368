//! The `weightinit.v1` contract: weightinit-proto's messages, client and descriptor sets, and
//! the server trait generated here, whose requests are decoded by [`crate::codec`].

pub use weightinit_proto::*;

#[allow(clippy::all, missing_docs)]
mod server {
    tonic::include_proto!("weightinit.v1");
}

pub use server::weight_init_server;
