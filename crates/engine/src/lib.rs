//! The pure core: algorithm v1 from a request to bytes, with no I/O.
//!
//! seed + name -> [`keystream`] words -> [`unit`] numbers -> a [`distribution`] (chosen by a
//! [`scheme`] from the [`fans`]) -> values -> [`dtype`] bytes, for the elements a [`slice`]
//! selects. A [`request`] is validated into [`plan`]s, each able to fill any byte range;
//! [`blocks`] cuts an output into blocks, hashed in parallel into its BLAKE3 digest.

pub mod blocks;
pub mod distribution;
pub mod dtype;
pub mod fans;
pub mod isa;
pub mod keystream;
pub mod memory;
pub mod normal;
mod param;
pub mod plan;
pub mod request;
pub mod scheme;
pub mod slice;
pub mod structured;
pub mod unit;

pub use distribution::Distribution;
pub use dtype::DType;
pub use fans::{Fans, Layout};
pub use isa::Isa;
pub use memory::OutOfMemory;
pub use plan::TensorPlan;
pub use request::{ALGORITHMS, Limits, Request, RequestError, RequestPlan, TensorSpec};
pub use scheme::{FanMode, Kaiming, Nonlinearity, Resolved, ScalingDistribution, Scheme};
pub use slice::{Range, SliceSpec};
pub use structured::{Structure, StructuredScheme, whole_bytes_bound};
