//! The streaming pipeline: a validated request becomes headers, chunks and ends, with the
//! CPU work on the worker pool and memory bounded by the blocks in flight.
//!
//! Each tensor's output is cut into aligned blocks of [`BLOCK_BYTES`] (the last one shorter,
//! [`weightinit_engine::blocks`]).
//! A job on the pool generates one block (a transposed matrix's job: several, for long
//! keystream runs; a Digest's: several, one after the other) and hashes each as a BLAKE3
//! subtree (a power-of-two run of 1 KiB chunks at a power-of-two offset is a subtree of the
//! tensor's tree), so the hashing runs in parallel like the generation; the producer only
//! merges 32-byte chaining values, in order, with [`Tree`]. A few blocks are in flight ahead
//! of the one being sent; transport chunks are zero-copy slices of a block, so a chunk never
//! spans two blocks.
//! A transposing view whose rows are far apart in the tensor is made in panels, drawn from the
//! server's few ([`panel_bytes_bound`]), so a stream's own memory stays a few jobs
//! ([`stream_bytes_bound`]) whatever its reader does.
//! When the receiver is gone the producer stops at once, whatever it waits for, and queued jobs
//! for it are skipped.
//!
//! A structured scheme's whole-tensor computation (orthogonal's QR, sparse's selection) runs
//! before its blocks, off the worker pool so that plain streams keep their workers, under its
//! own bounds: [`Structured::jobs`] at once, and their memory within a budget. Its result
//! (orthogonal's Q, sparse's zeros) and its share of the budget go with the last job that
//! makes the tensor's bytes, not once they are sent. It stops within milliseconds when its
//! stream goes away.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tonic::Status;

use super::convert;
use super::pool::WorkerPool;
use crate::proto::{Chunk, GenerateResponse, TensorEnd, generate_response::Item};
use weightinit_engine::blocks::{BLOCK_BYTES, BlockHash, PANEL_BYTES, Tree, row_job_bytes};
use weightinit_engine::structured::Unfinished;
use weightinit_engine::{RequestPlan, TensorPlan};

/// How the production of a stream ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every tensor was produced; `bytes` of tensor data in all.
    Complete { bytes: u64 },
    /// The receiver went away after `bytes` of tensor data.
    Abandoned { bytes: u64 },
    /// A worker failed (a bug): the stream cannot be completed.
    Failed { bytes: u64 },
}

/// What to emit besides headers and ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emit {
    /// Everything: for Generate.
    Chunks,
    /// Headers and ends only: for Digest, which needs no data on the wire.
    DigestsOnly,
}

/// Where a stream's messages go; tonic sends them on as they come.
pub type Sink = mpsc::Sender<Result<GenerateResponse, Status>>;

pub struct Pipeline {
    pub(crate) pool: Arc<WorkerPool>,
    /// Jobs made ahead of the one being sent, per stream ([`depth`]).
    depth: usize,
    structured: Structured,
    panels: Panels,
}

/// The server's panel buffers, shared by every stream: at most [`Panels::count`] at once, so
/// that slow readers of views made in panels hold no more than these between them; a stream
/// that finds none free makes its view job by job instead (slower, but it never waits on
/// another client). Kept for reuse: fresh ones would cost page faults and zeroing as large as
/// the generation itself.
struct Panels {
    free: Arc<Semaphore>,
    spare: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Panels {
    /// One per worker (a panel is made on all of them at once), and at least two.
    fn count(workers: usize) -> usize {
        workers.max(2)
    }
}

enum Stop {
    Gone,
    WorkerFailed,
}

/// What a job made: a whole number of blocks (the tensor's last one may be short).
struct Block {
    /// The bytes, when they are to be sent.
    data: Option<Bytes>,
    /// Each block's hash, in order.
    hashes: Vec<BlockHash>,
}

/// The bounds of whole-tensor computations, shared by every stream of a server.
pub struct Structured {
    /// Computations running at once.
    jobs: Arc<Semaphore>,
    /// Their memory, in MiB ([`Structure::whole_bytes`](weightinit_engine::Structure)), taken
    /// before one starts and given back once its tensor's last byte is made.
    memory: Arc<Semaphore>,
}

impl Structured {
    /// `jobs` computations at once within `memory_bytes`, which must hold the largest one
    /// (the server checks this against `--max-matrix-elements` at startup).
    pub fn new(jobs: usize, memory_bytes: u64) -> Self {
        Self {
            jobs: Arc::new(Semaphore::new(jobs)),
            memory: Arc::new(Semaphore::new(mib(memory_bytes) as usize)),
        }
    }

    /// Computes what `tensor` needs of the whole tensor, if anything: waits for a job and for
    /// its memory, then runs on a blocking thread that stops at its next step when this future
    /// is dropped. Returns the memory reservation, to hold while the tensor's bytes are made.
    async fn prepare(
        &self,
        tensor: &Arc<TensorPlan>,
    ) -> Result<Option<OwnedSemaphorePermit>, Stop> {
        let bytes = tensor.resolved.structure.map_or(0, |s| s.whole_bytes());
        if bytes == 0 {
            return Ok(None);
        }
        let units = u32::try_from(mib(bytes)).expect("validated against the budget");
        let closed = |_| Stop::WorkerFailed;
        let memory = Arc::clone(&self.memory)
            .acquire_many_owned(units)
            .await
            .map_err(closed)?;
        let job = Arc::clone(&self.jobs)
            .acquire_owned()
            .await
            .map_err(closed)?;
        let stop = StopOnDrop::default();
        let stopped = Arc::clone(&stop.0);
        let tensor = Arc::clone(tensor);
        // The permits leave with the computation, which outlives this future by a step when
        // the stream goes away.
        let done = tokio::task::spawn_blocking(move || {
            let _job = job;
            let result = tensor.prepare(&|| stopped.load(Ordering::Relaxed));
            result.map(|()| memory)
        });
        match done.await {
            Ok(Ok(memory)) => Ok(Some(memory)),
            // Stopped: only this future's drop asks for that, so nobody sees it.
            Ok(Err(Unfinished::Stopped(_))) => Err(Stop::Gone),
            // The budget is meant to prevent this; the client must not see a clean end.
            Ok(Err(Unfinished::OutOfMemory(_))) => Err(Stop::WorkerFailed),
            Err(_) => Err(Stop::WorkerFailed),
        }
    }
}

/// The most bytes a job of a transposed matrix made by rows makes here: 128 rows of an
/// 8192-wide float32 matrix. A stream keeps a few jobs ahead of its reader, so this bounds what
/// a slow reader holds; wider matrices are made in panels, which the server shares out. (Jobs
/// of 2 MiB would hold less, but Digest of a transposed [8192, 8192] lost 15%; of 1 MiB, 70%.)
const ROW_JOB_BYTES: u64 = 4 << 20;

/// Bytes per Digest job of a tensor made block by block ([`digest`]). A job per block cost the
/// producer a wake-up per 1 MiB; four blocks a job take 3-5% less of a Digest's CPU
/// (BENCHMARKS.md), and a job still ends within milliseconds of a cancellation.
const DIGEST_JOB_BYTES: usize = 4 * BLOCK_BYTES;

/// Jobs a stream keeps in flight with `workers` workers: one for each, and one more so that
/// none waits while the producer sends.
fn depth(workers: usize) -> usize {
    workers + 1
}

/// What the transport holds of a stream whose client stopped reading, at most: the messages
/// queued for tonic, its encoding buffer, HTTP/2's and the connection's (measured: 4 to 6 MiB
/// with 1 MiB chunks, each client on its own connection).
const TRANSPORT_BYTES: u64 = 6 << 20;

/// The most memory one stream holds for a client that stopped reading, with `workers`
/// workers: its jobs in flight (1 MiB each, at most [`ROW_JOB_BYTES`] for a transposed matrix)
/// and what the transport holds. Views made in panels also share
/// [`panel_bytes_bound`] with every other stream.
pub fn stream_bytes_bound(workers: usize) -> u64 {
    depth(workers) as u64 * ROW_JOB_BYTES + TRANSPORT_BYTES
}

/// The panel buffers of a server with `workers` workers, shared by all its streams.
pub fn panel_bytes_bound(workers: usize) -> u64 {
    Panels::count(workers) as u64 * PANEL_BYTES
}

/// Bytes in MiB, rounded up: the unit of the structured memory budget.
pub fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// Tells a whole-tensor computation to stop when its stream's producer is dropped.
#[derive(Default)]
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Pipeline {
    pub(crate) fn new(pool: Arc<WorkerPool>, structured: Structured) -> Self {
        Self {
            panels: Panels {
                free: Arc::new(Semaphore::new(Panels::count(pool.workers()))),
                spare: Arc::default(),
            },
            depth: depth(pool.workers()),
            pool,
            structured,
        }
    }

    /// Produces every tensor of `plan` into `out`, in order; stops as soon as `out`'s receiver
    /// is gone, whatever it is waiting for.
    pub async fn run(&self, plan: RequestPlan, emit: Emit, out: Sink) -> Outcome {
        let bytes = AtomicU64::new(0);
        let produce = async {
            let chunk_bytes = plan.chunk_bytes;
            for tensor in plan.tensors {
                self.tensor(Arc::new(tensor), chunk_bytes, emit, &out, &bytes)
                    .await?;
            }
            Ok(())
        };
        let stop = tokio::select! {
            stop = produce => stop.err(),
            // Dropping `produce` stops a whole-tensor computation and skips queued jobs.
            () = out.closed() => Some(Stop::Gone),
        };
        let bytes = bytes.into_inner();
        match stop {
            None => Outcome::Complete { bytes },
            Some(Stop::Gone) => Outcome::Abandoned { bytes },
            Some(Stop::WorkerFailed) => Outcome::Failed { bytes },
        }
    }

    async fn tensor(
        &self,
        tensor: Arc<TensorPlan>,
        chunk_bytes: usize,
        emit: Emit,
        out: &Sink,
        bytes: &AtomicU64,
    ) -> Result<(), Stop> {
        send(out, Item::Header(convert::header(&tensor))).await?;
        let memory = self.structured.prepare(&tensor).await?;
        let index = tensor.index;
        let name = tensor.name.clone();
        let total = tensor.byte_length();
        let size = tensor.dtype.size();
        let chunk_step = (chunk_bytes / size).max(1) * size;
        let by_rows = row_job_bytes(&tensor).filter(|&bytes| bytes as u64 <= ROW_JOB_BYTES);
        let in_panels = tensor.tile_columns().is_some() && by_rows.is_none();
        // A Digest of a tensor made block by block: several blocks per job.
        let digest_blocks = emit == Emit::DigestsOnly && by_rows.is_none() && !in_panels;
        let job_bytes = match by_rows {
            Some(bytes) => bytes,
            None if digest_blocks => DIGEST_JOB_BYTES,
            None => BLOCK_BYTES,
        };
        let mut offsets = (0..total).step_by(job_bytes).peekable();
        let mut tree = Tree::new(total.div_ceil(BLOCK_BYTES as u64));
        let mut in_flight: VecDeque<(u64, oneshot::Receiver<Block>)> = VecDeque::new();
        let mut panel: Option<Arc<Panel>> = None;
        // Held here and by every job that makes the tensor's bytes: dropped once the last of
        // them is queued, it goes (with the structured result and its budget) when that job
        // is done, however slowly its bytes are then read.
        let mut making = Some(Arc::new(Making {
            plan: tensor,
            _memory: memory,
        }));
        loop {
            while in_flight.len() < self.depth {
                let (Some(offset), Some(making_ref)) = (offsets.next(), making.as_ref()) else {
                    break;
                };
                let len = (total - offset).min(job_bytes as u64) as usize;
                if in_panels && panel.as_ref().is_none_or(|p| !p.holds(offset)) {
                    // The last one goes first, so that a stream holds at most one.
                    drop(panel.take());
                    panel = self.panel(making_ref, offset).await?;
                }
                let pending = match &panel {
                    Some(panel) if panel.holds(offset) => {
                        let panel = Arc::clone(panel);
                        self.pool.run(move || panel.block(offset, len, emit))
                    }
                    // Not made in panels, or every panel is held (by slow readers, perhaps):
                    // made job by job as any view can be, slower but never waiting on others.
                    _ => {
                        let making = Arc::clone(making_ref);
                        if digest_blocks {
                            self.pool.run(move || digest(&making.plan, offset, len))
                        } else {
                            self.pool
                                .run(move || generate(&making.plan, offset, len, emit))
                        }
                    }
                };
                in_flight.push_back((offset, pending));
                if offsets.peek().is_none() {
                    making = None;
                }
            }
            let Some((offset, pending)) = in_flight.pop_front() else {
                break;
            };
            let block = pending.await.map_err(|_| Stop::WorkerFailed)?;
            // Digest sends nothing until the end: look for a gone receiver on every block.
            if out.is_closed() {
                return Err(Stop::Gone);
            }
            if let Some(data) = block.data {
                // Chunks never span two blocks, however many blocks a job made.
                for first in (0..data.len()).step_by(BLOCK_BYTES) {
                    let last = (first + BLOCK_BYTES).min(data.len());
                    for start in (first..last).step_by(chunk_step) {
                        let end = (start + chunk_step).min(last);
                        let chunk = Chunk {
                            tensor_index: index,
                            offset: offset + start as u64,
                            data: data.slice(start..end),
                        };
                        send(out, Item::Chunk(chunk)).await?;
                        bytes.fetch_add((end - start) as u64, Ordering::Relaxed);
                    }
                }
            } else {
                bytes.fetch_add((total - offset).min(job_bytes as u64), Ordering::Relaxed);
            }
            for hash in block.hashes {
                tree.push(hash);
            }
        }
        let end = TensorEnd {
            tensor_index: index,
            blake3: tree.root().as_bytes().to_vec(),
            byte_length: total,
            name,
        };
        send(out, Item::End(end)).await
    }
}

/// A tensor whose bytes are being made, with its share of the structured memory budget.
struct Making {
    plan: Arc<TensorPlan>,
    _memory: Option<OwnedSemaphorePermit>,
}

/// The job: bytes `[offset, offset + len)` of `tensor`, and their blocks' hashes in a
/// `tensor.byte_length()`-byte output. Digest needs no bytes afterwards, so it generates
/// into the worker's reusable buffer instead of a fresh one.
fn generate(tensor: &TensorPlan, offset: u64, len: usize, emit: Emit) -> Block {
    block(tensor, offset, len, emit, |data| tensor.fill(offset, data))
}

/// A Digest job of several blocks: each made and hashed in turn in the worker's buffer, where
/// hashing finds it in cache.
fn digest(tensor: &TensorPlan, offset: u64, len: usize) -> Block {
    let hashes = (0..len)
        .step_by(BLOCK_BYTES)
        .flat_map(|start| {
            let block_len = (len - start).min(BLOCK_BYTES);
            generate(tensor, offset + start as u64, block_len, Emit::DigestsOnly).hashes
        })
        .collect();
    Block { data: None, hashes }
}

/// A block of `len` bytes at `offset` that `make` writes: kept when it is to be sent, always
/// hashed (as the whole tensor's root when it is the only block, else as a subtree).
fn block(
    tensor: &TensorPlan,
    offset: u64,
    len: usize,
    emit: Emit,
    make: impl FnOnce(&mut [u8]),
) -> Block {
    let total = tensor.byte_length();
    let hash = |data: &[u8]| BlockHash::of_blocks(total, offset, data);
    match emit {
        Emit::Chunks => {
            let mut data = vec![0u8; len];
            make(&mut data);
            Block {
                hashes: hash(&data),
                data: Some(Bytes::from(data)),
            }
        }
        Emit::DigestsOnly => {
            thread_local! {
                static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
            }
            BUFFER.with_borrow_mut(|buffer| {
                buffer.resize(len, 0);
                let data = &mut buffer[..len];
                make(data);
                Block {
                    hashes: hash(data),
                    data: None,
                }
            })
        }
    }
}

/// Up to [`PANEL_BYTES`] of a transposing view's output, made by column ranges straight into
/// one buffer.
struct Panel {
    /// The tensor's output bytes.
    total: u64,
    /// Output bytes `[start, start + data.len())`.
    start: u64,
    data: Vec<u8>,
    /// Where the buffer goes when the panel is done, before its place is given back.
    spare: Arc<Mutex<Vec<Vec<u8>>>>,
    _place: OwnedSemaphorePermit,
}

impl Drop for Panel {
    fn drop(&mut self) {
        let mut spare = self.spare.lock().expect("spare buffers poisoned");
        spare.push(std::mem::take(&mut self.data));
    }
}

impl Panel {
    fn holds(&self, offset: u64) -> bool {
        (self.start..self.start + self.data.len() as u64).contains(&offset)
    }

    /// The block at `offset`, hashed where the panel holds it.
    fn block(&self, offset: u64, len: usize, emit: Emit) -> Block {
        let from = (offset - self.start) as usize;
        let data = &self.data[from..from + len];
        Block {
            hashes: BlockHash::of_blocks(self.total, offset, data),
            data: (emit == Emit::Chunks).then(|| Bytes::copy_from_slice(data)),
        }
    }
}

impl Pipeline {
    /// Makes the panel that starts at `offset`, its column ranges on all workers at once;
    /// `None` when every panel of the server is held.
    async fn panel(&self, making: &Arc<Making>, offset: u64) -> Result<Option<Arc<Panel>>, Stop> {
        let tensor = &making.plan;
        let size = tensor.dtype.size() as u64;
        let stop = (offset + PANEL_BYTES).min(tensor.byte_length());
        let Ok(place) = Arc::clone(&self.panels.free).try_acquire_owned() else {
            return Ok(None);
        };
        let reused = self
            .panels
            .spare
            .lock()
            .expect("spare buffers poisoned")
            .pop();
        let (output, writers) = tensor.shared_output(
            offset / size,
            (stop - offset) / size,
            reused.unwrap_or_default(),
            2 * self.pool.workers() as u64,
        );
        let pending: Vec<_> = writers
            .into_iter()
            .map(|mut writer| {
                let making = Arc::clone(making);
                self.pool.run(move || making.plan.fill_columns(&mut writer))
            })
            .collect();
        for part in pending {
            part.await.map_err(|_| Stop::WorkerFailed)?;
        }
        // Every writer has gone with its job.
        let data = output.into_vec().map_err(|_| Stop::WorkerFailed)?;
        Ok(Some(Arc::new(Panel {
            total: tensor.byte_length(),
            start: offset,
            data,
            spare: Arc::clone(&self.panels.spare),
            _place: place,
        })))
    }
}

async fn send(out: &Sink, item: Item) -> Result<(), Stop> {
    out.send(Ok(GenerateResponse { item: Some(item) }))
        .await
        .map_err(|_| Stop::Gone)
}
