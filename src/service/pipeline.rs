//! The streaming pipeline: a validated request becomes headers, chunks and ends, with the
//! CPU work on the worker pool and memory bounded by the chunks in flight.
//!
//! Chunks are generated in parallel, a few ahead of the one being sent; the BLAKE3 digest
//! runs on the pool too, chained chunk after chunk in order. When the receiver is gone the
//! producer stops at its next send, and queued jobs for it are skipped.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use super::convert;
use super::pool::WorkerPool;
use crate::engine::{RequestPlan, TensorPlan};
use crate::proto::{Chunk, GenerateResponse, TensorEnd, generate_response::Item};

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
    pub pool: Arc<WorkerPool>,
    /// Chunks generated ahead of the one being sent, per stream.
    pub depth: usize,
}

enum Stop {
    Gone,
    WorkerFailed,
}

impl Pipeline {
    /// Produces every tensor of `plan` into `out`, in order.
    pub async fn run(&self, plan: RequestPlan, emit: Emit, out: Sink) -> Outcome {
        let mut bytes = 0u64;
        let chunk_bytes = plan.chunk_bytes;
        for tensor in plan.tensors {
            match self
                .tensor(Arc::new(tensor), chunk_bytes, emit, &out, &mut bytes)
                .await
            {
                Ok(()) => {}
                Err(Stop::Gone) => return Outcome::Abandoned { bytes },
                Err(Stop::WorkerFailed) => return Outcome::Failed { bytes },
            }
        }
        Outcome::Complete { bytes }
    }

    async fn tensor(
        &self,
        tensor: Arc<TensorPlan>,
        chunk_bytes: usize,
        emit: Emit,
        out: &Sink,
        bytes: &mut u64,
    ) -> Result<(), Stop> {
        send(out, Item::Header(convert::header(&tensor))).await?;
        let index = tensor.index;
        let mut ranges = tensor.chunks(chunk_bytes);
        let mut in_flight: VecDeque<(u64, oneshot::Receiver<Bytes>)> =
            VecDeque::with_capacity(self.depth);
        let mut hashing: Option<oneshot::Receiver<blake3::Hasher>> = None;
        loop {
            while in_flight.len() < self.depth.max(1) {
                let Some((offset, len)) = ranges.next() else {
                    break;
                };
                let tensor = Arc::clone(&tensor);
                in_flight.push_back((
                    offset,
                    self.pool.run(move || {
                        let mut data = vec![0u8; len];
                        tensor.fill(offset, &mut data);
                        Bytes::from(data)
                    }),
                ));
            }
            let Some((offset, pending)) = in_flight.pop_front() else {
                break;
            };
            let data = pending.await.map_err(|_| Stop::WorkerFailed)?;
            // Digest sends nothing until the end: look for a gone receiver on every chunk.
            if out.is_closed() {
                return Err(Stop::Gone);
            }
            *bytes += data.len() as u64;
            if emit == Emit::Chunks {
                let chunk = Chunk {
                    tensor_index: index,
                    offset,
                    data: data.clone(),
                };
                send(out, Item::Chunk(chunk)).await?;
            }
            let hasher = previous(hashing.take()).await?;
            hashing = Some(self.pool.run(move || {
                let mut hasher = hasher;
                hasher.update(&data);
                hasher
            }));
        }
        let digest = previous(hashing).await?.finalize();
        let end = TensorEnd {
            tensor_index: index,
            blake3: digest.as_bytes().to_vec(),
            byte_length: tensor.byte_length(),
        };
        send(out, Item::End(end)).await
    }
}

/// The hasher after the previous chunk, or a fresh one before the first.
async fn previous(
    hashing: Option<oneshot::Receiver<blake3::Hasher>>,
) -> Result<blake3::Hasher, Stop> {
    match hashing {
        Some(pending) => pending.await.map_err(|_| Stop::WorkerFailed),
        None => Ok(blake3::Hasher::new()),
    }
}

async fn send(out: &Sink, item: Item) -> Result<(), Stop> {
    out.send(Ok(GenerateResponse { item: Some(item) }))
        .await
        .map_err(|_| Stop::Gone)
}
