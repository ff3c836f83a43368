//! Generation in this process: the same validation, plans and BLAKE3 digests as the server,
//! on all cores. [`LocalPlan`] writes straight into the caller's memory (the Python
//! package's `target="local"`); [`LocalServer`] streams as a server does (`--local`).

use std::sync::{Arc, Mutex, PoisonError};

use blake3::Hash;
use bytes::Bytes;
use prost::Message;
use rayon::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuildError, ThreadPoolBuilder};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::source::{GenerateStream, Server};
use weightinit_engine::blocks::{BLOCK_BYTES, BlockHash, Tree, row_job_bytes};
use weightinit_engine::memory::{OutOfMemory, try_resize, try_vec};
use weightinit_engine::structured::{StopCheck, Stopped, Unfinished, check};
use weightinit_engine::{Limits, RequestError, RequestPlan, TensorPlan};
use weightinit_proto::convert;
use weightinit_proto::{
    Chunk, DescribeResponse, DigestResponse, GenerateRequest, GenerateResponse, TensorEnd,
    generate_response::Item,
};

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
    #[error(
        "the destinations of tensors {first:?} and {second:?} overlap: give each its own buffer"
    )]
    Overlap { first: String, second: String },
    /// The caller's stop check asked to stop (e.g. Ctrl-C).
    #[error(transparent)]
    Stopped(#[from] Stopped),
    /// This process cannot allocate what the tensor needs (in Python, a MemoryError).
    #[error("tensor {name:?} does not fit in this process's memory: {error}")]
    OutOfMemory {
        index: u32,
        name: String,
        error: OutOfMemory,
    },
}

impl LocalError {
    /// The request field at fault: a refused request's, or the tensor that does not fit.
    pub fn field(&self) -> Option<String> {
        match self {
            Self::Refused(refused) => Some(refused.field().to_owned()),
            Self::OutOfMemory { index, .. } => Some(format!("tensors[{index}]")),
            _ => None,
        }
    }

    /// The status a server would end the call with; out of memory is final, blamed on the
    /// tensor (as a refused request is), so that no client retries it.
    fn status(self) -> Status {
        match self {
            Self::Refused(refused) => convert::status(refused),
            Self::OutOfMemory { .. } => {
                let field = self.field().expect("names its tensor");
                convert::status(RequestError::over_limit(field, self.to_string()))
            }
            error => Status::internal(error.to_string()),
        }
    }
}

/// `error` while making `tensor`.
fn out_of_memory(tensor: &TensorPlan) -> impl Fn(OutOfMemory) -> LocalError + '_ {
    |error| LocalError::OutOfMemory {
        index: tensor.index,
        name: tensor.name.clone(),
        error,
    }
}

/// Computes what `tensor` needs of the whole tensor ([`TensorPlan::prepare`]).
fn prepare(tensor: &TensorPlan, stop: StopCheck<'_>) -> Result<(), LocalError> {
    tensor.prepare(stop).map_err(|unfinished| match unfinished {
        Unfinished::Stopped(stopped) => stopped.into(),
        Unfinished::OutOfMemory(error) => out_of_memory(tensor)(error),
    })
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
        Self::new(&GenerateRequest::decode(request)?)
    }

    /// Validates `request` as [`Self::decode`] does.
    pub fn new(request: &GenerateRequest) -> Result<Self, LocalError> {
        let plan = convert::request(request)?.plan(&Limits::default())?;
        Ok(Self { plan })
    }

    /// The tensors' headers as an encoded DescribeResponse, as Describe answers.
    pub fn describe(&self) -> Vec<u8> {
        self.headers().encode_to_vec()
    }

    fn headers(&self) -> DescribeResponse {
        DescribeResponse {
            tensors: self.plan.tensors.iter().map(convert::header).collect(),
        }
    }

    /// Writes each target tensor's output bytes into its buffer, which must be exactly their
    /// length, on rayon's pool: the jobs of every tensor in one parallel pass, so that many
    /// small tensors cost no set-up each and all cores share the large ones. Every length is
    /// checked before anything is written; `stop` is asked between jobs and between the steps
    /// of a whole-tensor computation.
    pub fn fill(
        &self,
        targets: Vec<(usize, &mut [u8])>,
        stop: StopCheck<'_>,
    ) -> Result<(), LocalError> {
        let mut checked = Vec::with_capacity(targets.len());
        for (index, out) in targets {
            let tensor = self.tensor(index)?;
            if tensor.byte_length() != out.len() as u64 {
                return Err(LocalError::Length {
                    name: tensor.name.clone(),
                    expected: tensor.byte_length(),
                    actual: out.len(),
                });
            }
            checked.push((tensor, out));
        }
        for (tensor, _) in &checked {
            prepare(tensor, stop)?;
        }
        let jobs: Vec<_> = checked
            .into_iter()
            .flat_map(|(tensor, out)| {
                let job = job_bytes(tensor);
                out.chunks_mut(job)
                    .enumerate()
                    .map(move |(j, part)| (tensor, (j * job) as u64, part))
            })
            .collect();
        pool()?.install(|| {
            jobs.into_par_iter().try_for_each(|(tensor, offset, part)| {
                check(stop)?;
                tensor.fill(offset, part);
                Ok::<_, Stopped>(())
            })
        })?;
        Ok(())
    }

    /// Refuses destinations, given as (tensor index, address, length), that share a byte:
    /// [`Self::fill`] writes its targets at once, so they must be disjoint.
    pub fn check_disjoint(&self, targets: &[(usize, usize, usize)]) -> Result<(), LocalError> {
        let mut spans: Vec<_> = targets.iter().filter(|t| t.2 > 0).collect();
        spans.sort_unstable_by_key(|&&(_, address, _)| address);
        for pair in spans.windows(2) {
            let (&(first, address, length), &(second, next, _)) = (pair[0], pair[1]);
            if address.saturating_add(length) > next {
                return Err(LocalError::Overlap {
                    first: self.tensor(first)?.name.clone(),
                    second: self.tensor(second)?.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// Tensor `index`'s BLAKE3 digest, as a server's Digest computes it: block by block in
    /// a reused buffer, so memory stays small whatever the tensor's size; `stop` as for
    /// [`Self::fill`].
    pub fn digest(&self, index: usize, stop: StopCheck<'_>) -> Result<Hash, LocalError> {
        digest(self.tensor(index)?, stop)
    }

    fn tensor(&self, index: usize) -> Result<&TensorPlan, LocalError> {
        self.plan.tensors.get(index).ok_or(LocalError::NoTensor {
            index,
            count: self.plan.tensors.len(),
        })
    }

    /// Sends every tensor's header, chunks and end to `out`, as a server's Generate does:
    /// chunks of at most the request's chunk size that never span a block. Generates
    /// [`STREAM_JOB_BYTES`] at a time, on all cores; stops when the receiver is gone.
    fn stream(&self, out: &mpsc::Sender<Result<GenerateResponse, Status>>) -> Result<(), Gone> {
        let send = |item| {
            out.blocking_send(Ok(GenerateResponse { item: Some(item) }))
                .map_err(|_| Gone)
        };
        for tensor in &self.plan.tensors {
            send(Item::Header(convert::header(tensor)))?;
            let total = tensor.byte_length();
            let size = tensor.dtype.size();
            let chunk_step = (self.plan.chunk_bytes / size).max(1) * size;
            let job = STREAM_JOB_BYTES.next_multiple_of(job_bytes(tensor)) as u64;
            let mut tree = Tree::new(total.div_ceil(BLOCK_BYTES as u64));
            for offset in (0..total).step_by(job as usize) {
                let gone = || out.is_closed();
                let made = try_vec(0u8, (total - offset).min(job) as usize)
                    .map_err(out_of_memory(tensor))
                    .and_then(|mut data| {
                        fill_at(tensor, offset, &mut data, &gone)?;
                        // The blocks hashed in parallel, as the server's workers do.
                        let hashes = pool()?.install(|| {
                            data.par_chunks(BLOCK_BYTES)
                                .enumerate()
                                .map(|(k, part)| {
                                    BlockHash::of(total, offset + (k * BLOCK_BYTES) as u64, part)
                                })
                                .collect::<Vec<_>>()
                        });
                        hashes.into_iter().for_each(|hash| tree.push(hash));
                        Ok(Bytes::from(data))
                    });
                let data = match made {
                    Ok(data) => data,
                    Err(error) => return out.blocking_send(Err(error.status())).map_err(|_| Gone),
                };
                for first in (0..data.len()).step_by(BLOCK_BYTES) {
                    let last = (first + BLOCK_BYTES).min(data.len());
                    for start in (first..last).step_by(chunk_step) {
                        send(Item::Chunk(Chunk {
                            tensor_index: tensor.index,
                            offset: offset + start as u64,
                            data: data.slice(start..(start + chunk_step).min(last)),
                        }))?;
                    }
                }
            }
            send(Item::End(TensorEnd {
                tensor_index: tensor.index,
                blake3: tree.root().as_bytes().to_vec(),
                byte_length: total,
                name: tensor.name.clone(),
            }))?;
        }
        Ok(())
    }
}

/// The receiver of a stream went away.
struct Gone;

/// Bytes a [`LocalServer`] stream generates at once per tensor: enough for every core.
const STREAM_JOB_BYTES: usize = 16 * BLOCK_BYTES;

/// Writes `tensor`'s output bytes from `offset` (a multiple of its job size) into `out`, in
/// parallel on rayon's pool; `stop` is asked between jobs and between the steps of a
/// whole-tensor computation.
fn fill_at(
    tensor: &TensorPlan,
    offset: u64,
    out: &mut [u8],
    stop: StopCheck<'_>,
) -> Result<(), LocalError> {
    let pool = pool()?;
    prepare(tensor, stop)?;
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
                    tensor.fill(offset + (i * piece + j * job) as u64, part);
                }
                Ok::<_, Stopped>(())
            })
    })?;
    Ok(())
}

/// `tensor`'s BLAKE3 digest, block by block in a reused buffer per thread; `stop` as for
/// [`fill_at`]. The blocks' hashes are put together [`DIGEST_WINDOW`] jobs at a time, so that
/// memory stays bounded whatever the tensor's size.
fn digest(tensor: &TensorPlan, stop: StopCheck<'_>) -> Result<Hash, LocalError> {
    let total = tensor.byte_length();
    let job = job_bytes(tensor) as u64;
    let jobs = total.div_ceil(job);
    let pool = pool()?;
    prepare(tensor, stop)?;
    let mut tree = Tree::new(total.div_ceil(BLOCK_BYTES as u64));
    for first in (0..jobs).step_by(DIGEST_WINDOW) {
        let hashes: Vec<Vec<BlockHash>> = pool.install(|| {
            (first..jobs.min(first + DIGEST_WINDOW as u64))
                .into_par_iter()
                .map_init(Vec::new, |buffer, j| {
                    check(stop)?;
                    let offset = j * job;
                    try_resize(buffer, (total - offset).min(job) as usize, 0)
                        .map_err(out_of_memory(tensor))?;
                    tensor.fill(offset, buffer);
                    Ok(BlockHash::of_blocks(total, offset, buffer))
                })
                .collect::<Result<_, LocalError>>()
        })?;
        hashes
            .into_iter()
            .flatten()
            .for_each(|hash| tree.push(hash));
    }
    Ok(tree.root())
}

/// Jobs a digest makes before putting their hashes together: enough for every core.
const DIGEST_WINDOW: usize = 1024;

/// The engine in this process as a [`Server`], for `weightinit fetch --local` and
/// `describe --local`: the same answers as a server with the default limits.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalServer;

impl LocalServer {
    /// `request` planned, in a blocking task (planning may factor a large matrix).
    async fn plan(request: Request<GenerateRequest>) -> Result<Arc<LocalPlan>, Status> {
        let planned = tokio::task::spawn_blocking(move || LocalPlan::new(request.get_ref()));
        match planned.await {
            Ok(Ok(plan)) => Ok(Arc::new(plan)),
            Ok(Err(error)) => Err(error.status()),
            Err(panicked) => Err(Status::internal(panicked.to_string())),
        }
    }
}

#[tonic::async_trait]
impl Server for LocalServer {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let plan = Self::plan(request).await?;
        // Room for a job's chunks: the next job is made while the last one is written.
        let (sender, receiver) = mpsc::channel(STREAM_JOB_BYTES / BLOCK_BYTES);
        tokio::task::spawn_blocking(move || plan.stream(&sender));
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn describe(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        Ok(Response::new(Self::plan(request).await?.headers()))
    }

    async fn digest(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<DigestResponse>, Status> {
        let plan = Self::plan(request).await?;
        let digests = tokio::task::spawn_blocking(move || {
            plan.plan
                .tensors
                .iter()
                .map(|tensor| {
                    Ok(TensorEnd {
                        tensor_index: tensor.index,
                        blake3: digest(tensor, &|| false)?.as_bytes().to_vec(),
                        byte_length: tensor.byte_length(),
                        name: tensor.name.clone(),
                    })
                })
                .collect::<Result<Vec<_>, LocalError>>()
        });
        match digests.await {
            Ok(Ok(digests)) => Ok(Response::new(DigestResponse { digests })),
            Ok(Err(error)) => Err(error.status()),
            Err(panicked) => Err(Status::internal(panicked.to_string())),
        }
    }
}

/// Bytes made at once, as the server's jobs: one block, or a transposed matrix's batch of rows.
fn job_bytes(tensor: &TensorPlan) -> usize {
    row_job_bytes(tensor).unwrap_or(BLOCK_BYTES)
}

/// Runs `work` on one of the pool's threads while `wait` runs on this one, given the
/// receiver of `work`'s result (`Err` with the payload if it panicked); returns `wait`'s
/// result once both are done. So a caller can watch for signals with no thread started per
/// call: a thread started as memory runs out can abort the process (glibc allocating the
/// extension's thread-local data), while the pool's threads have theirs.
pub fn beside<T: Send, R>(
    work: impl FnOnce() -> T + Send,
    wait: impl FnOnce(std::sync::mpsc::Receiver<std::thread::Result<T>>) -> R,
) -> Result<R, LocalError> {
    let pool = pool()?;
    let (done, result) = std::sync::mpsc::channel();
    Ok(pool.in_place_scope(|scope| {
        scope.spawn(move |_| {
            let _ = done.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)));
        });
        wait(result)
    }))
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
    use weightinit_proto::{Init, TensorSpec, init};

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
            plan.fill(vec![(0, &mut out[..])], &|| false).unwrap();
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
            plan.fill(vec![(0, &mut out[..])], &|| true),
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
            plan.fill(vec![(0, &mut [0u8; 63][..])], &|| false),
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
