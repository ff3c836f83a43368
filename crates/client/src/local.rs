//! Generation in the caller's process, for the Python package's `target="local"`: the same
//! validation, plans and BLAKE3 digests as the server, written straight into the caller's
//! memory on all cores instead of being streamed.

use std::sync::{Arc, Mutex, PoisonError};

use blake3::Hash;
use prost::Message;
use rayon::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuildError, ThreadPoolBuilder};

use weightinit_engine::structured::{StopCheck, Stopped, check};
use weightinit_engine::{Limits, RequestError, RequestPlan, TensorPlan};
use weightinit_service::convert;
use weightinit_service::pipeline::{BLOCK_BYTES, BlockHash, Tree, row_job_bytes};
use weightinit_service::proto::{DescribeResponse, GenerateRequest};

/// Why an in-process call cannot run.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("the request is not an encoded GenerateRequest: {0}")]
    Decode(#[from] prost::DecodeError),
    /// What a server would refuse with INVALID_ARGUMENT or RESOURCE_EXHAUSTED.
    #[error(transparent)]
    Refused(#[from] RequestError),
    #[error("cannot start the generation threads: {0}")]
    Threads(#[from] ThreadPoolBuildError),
    #[error("the request has {count} tensors, not one at index {index}")]
    NoTensor { index: usize, count: usize },
    #[error("tensor {name:?} is {expected} bytes, its destination {actual}")]
    Length {
        name: String,
        expected: u64,
        actual: usize,
    },
    /// The caller's stop check asked to stop (e.g. Ctrl-C).
    #[error(transparent)]
    Stopped(#[from] Stopped),
}

/// A validated request, planned once and then generated tensor by tensor.
#[derive(Debug)]
pub struct LocalPlan {
    plan: RequestPlan,
}

impl LocalPlan {
    /// Decodes and validates an encoded GenerateRequest as a server with the default limits
    /// does (the limits of one process's memory are the caller's own business).
    pub fn decode(request: &[u8]) -> Result<Self, LocalError> {
        let request = GenerateRequest::decode(request)?;
        let plan = convert::request(&request)?.plan(&Limits::default())?;
        Ok(Self { plan })
    }

    /// The tensors' headers as an encoded DescribeResponse, as Describe answers.
    pub fn describe(&self) -> Vec<u8> {
        DescribeResponse {
            tensors: self.plan.tensors.iter().map(convert::header).collect(),
        }
        .encode_to_vec()
    }

    /// Writes tensor `index`'s output bytes into `out`, which must be exactly their length,
    /// in parallel on rayon's pool; `stop` is asked between jobs and between the steps of a
    /// whole-tensor computation.
    pub fn fill(
        &self,
        index: usize,
        out: &mut [u8],
        stop: StopCheck<'_>,
    ) -> Result<(), LocalError> {
        let tensor = self.tensor(index)?;
        if tensor.byte_length() != out.len() as u64 {
            return Err(LocalError::Length {
                name: tensor.name.clone(),
                expected: tensor.byte_length(),
                actual: out.len(),
            });
        }
        let pool = pool()?;
        tensor.prepare(stop)?;
        // A few pieces per thread balance the load; whole jobs (as the server's) keep every
        // piece element-aligned and a transposed matrix's columns long runs.
        let pieces = 4 * pool.current_num_threads();
        let job = job_bytes(tensor);
        let piece = out.len().div_ceil(pieces).next_multiple_of(job).max(job);
        pool.install(|| {
            out.par_chunks_mut(piece)
                .enumerate()
                .try_for_each(|(i, part)| {
                    for (j, part) in part.chunks_mut(job).enumerate() {
                        check(stop)?;
                        tensor.fill((i * piece + j * job) as u64, part);
                    }
                    Ok(())
                })
        })
    }

    /// Tensor `index`'s BLAKE3 digest, as a server's Digest computes it: block by block in
    /// a reused buffer, so memory stays small whatever the tensor's size; `stop` as for
    /// [`Self::fill`].
    pub fn digest(&self, index: usize, stop: StopCheck<'_>) -> Result<Hash, LocalError> {
        let tensor = self.tensor(index)?;
        let total = tensor.byte_length();
        let job = job_bytes(tensor) as u64;
        let pool = pool()?;
        tensor.prepare(stop)?;
        let hashes: Vec<Vec<BlockHash>> = pool.install(|| {
            (0..total.div_ceil(job))
                .into_par_iter()
                .map_init(Vec::new, |buffer, j| {
                    check(stop)?;
                    let offset = j * job;
                    buffer.resize((total - offset).min(job) as usize, 0);
                    tensor.fill(offset, buffer);
                    Ok::<_, Stopped>(BlockHash::of_blocks(total, offset, buffer))
                })
                .collect::<Result<_, _>>()
        })?;
        let mut tree = Tree::new(total.div_ceil(BLOCK_BYTES as u64));
        hashes
            .into_iter()
            .flatten()
            .for_each(|hash| tree.push(hash));
        Ok(tree.root())
    }

    fn tensor(&self, index: usize) -> Result<&TensorPlan, LocalError> {
        self.plan.tensors.get(index).ok_or(LocalError::NoTensor {
            index,
            count: self.plan.tensors.len(),
        })
    }
}

/// Bytes made at once, as the server's jobs: one block, or a transposed matrix's batch of rows.
fn job_bytes(tensor: &TensorPlan) -> usize {
    row_job_bytes(tensor).unwrap_or(BLOCK_BYTES)
}

/// This process's generation threads. Threads do not survive fork(), and Python programs fork
/// (DataLoader workers, multiprocessing): a forked child starts its own pool rather than wait
/// forever on its parent's, whose threads it does not have.
fn pool() -> Result<Arc<ThreadPool>, ThreadPoolBuildError> {
    static POOL: Mutex<Option<(u32, Arc<ThreadPool>)>> = Mutex::new(None);
    let pid = std::process::id();
    let mut current = POOL.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((owner, pool)) = current.as_ref()
        && *owner == pid
    {
        return Ok(Arc::clone(pool));
    }
    let pool = Arc::new(ThreadPoolBuilder::new().build()?);
    // The parent's pool cannot be shut down from here: dropping it would signal threads
    // this process does not have.
    if let Some(inherited) = current.replace((pid, Arc::clone(&pool))) {
        std::mem::forget(inherited);
    }
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weightinit_service::proto::{Init, TensorSpec, init};

    fn request(shape: Vec<u64>, permute: Vec<u32>) -> Vec<u8> {
        GenerateRequest {
            seed: 9,
            tensors: vec![TensorSpec {
                name: "w".to_owned(),
                shape,
                permute,
                init: Some(Init {
                    scheme: Some(init::Scheme::XavierNormal(Default::default())),
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn the_digest_is_blake3_of_the_filled_bytes() {
        // One block, several blocks with a short last one, and a transposing view.
        for (shape, permute) in [
            (vec![64, 32], vec![]),
            (vec![1000, 777], vec![]),
            (vec![777, 1000], vec![1, 0]),
        ] {
            let plan = LocalPlan::decode(&request(shape.clone(), permute)).unwrap();
            let mut out = vec![0u8; shape.iter().product::<u64>() as usize * 4];
            plan.fill(0, &mut out, &|| false).unwrap();
            assert_eq!(
                plan.digest(0, &|| false).unwrap(),
                blake3::hash(&out),
                "{shape:?}"
            );
        }
    }

    #[test]
    fn a_stop_ends_fill_and_digest() {
        let plan = LocalPlan::decode(&request(vec![4096, 4096], vec![])).unwrap();
        let mut out = vec![0u8; 64 << 20];
        assert!(matches!(
            plan.fill(0, &mut out, &|| true),
            Err(LocalError::Stopped(_))
        ));
        assert!(matches!(
            plan.digest(0, &|| true),
            Err(LocalError::Stopped(_))
        ));
    }

    #[test]
    fn bad_calls_are_errors() {
        let plan = LocalPlan::decode(&request(vec![4, 4], vec![])).unwrap();
        assert!(matches!(
            plan.fill(0, &mut [0u8; 63], &|| false),
            Err(LocalError::Length {
                expected: 64,
                actual: 63,
                ..
            })
        ));
        assert!(matches!(
            plan.digest(1, &|| false),
            Err(LocalError::NoTensor { index: 1, count: 1 })
        ));
        assert!(matches!(
            LocalPlan::decode(&[0xff]),
            Err(LocalError::Decode(_))
        ));
        let refused = LocalPlan::decode(&request(vec![4], vec![])).unwrap_err();
        assert!(
            matches!(&refused, LocalError::Refused(e) if e.field() == "tensors[0].fan_in"),
            "{refused}"
        );
    }
}
