//! The `weightinit.v1.WeightInit` RPCs: validate, then hand the work to the pipeline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::convert;
use super::pipeline::{Emit, Outcome, Pipeline};
use super::pool::WorkerPool;
use crate::engine::{self, DType, Limits, RequestPlan, Scheme};
use crate::proto::{
    DescribeResponse, DigestResponse, GenerateRequest, GenerateResponse, GetInfoRequest,
    ServerInfo, ServerLimits, generate_response::Item, weight_init_server::WeightInit,
};

/// Messages buffered between the producer and tonic, per stream.
const STREAM_BUFFER: usize = 2;

/// State shared by every RPC of one server.
pub struct Shared {
    pub limits: Limits,
    pub max_concurrent_streams: u32,
    pub pipeline: Pipeline,
    streams: Arc<Semaphore>,
}

impl Shared {
    pub fn new(limits: Limits, max_concurrent_streams: u32, pool: Arc<WorkerPool>) -> Self {
        let depth = pool.workers() + 1;
        Self {
            limits,
            max_concurrent_streams,
            pipeline: Pipeline { pool, depth },
            streams: Arc::new(Semaphore::new(max_concurrent_streams as usize)),
        }
    }

    /// Generate and Digest streams running now.
    pub fn active_streams(&self) -> usize {
        self.max_concurrent_streams as usize - self.streams.available_permits()
    }

    /// Workers generating or hashing right now.
    pub fn busy_workers(&self) -> usize {
        self.pipeline.pool.busy()
    }

    fn plan(&self, request: &GenerateRequest) -> Result<RequestPlan, Status> {
        Ok(convert::request(request)?.plan(&self.limits)?)
    }

    fn admit(&self) -> Result<OwnedSemaphorePermit, Status> {
        Arc::clone(&self.streams).try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "this server is already running its limit of {} concurrent streams; retry later",
                self.max_concurrent_streams
            ))
        })
    }

    /// Validates, takes a stream slot, and starts producing into a bounded channel.
    fn start(
        self: &Arc<Self>,
        rpc: &'static str,
        request: &Request<GenerateRequest>,
        emit: Emit,
    ) -> Result<mpsc::Receiver<Result<GenerateResponse, Status>>, Status> {
        let call = Call::new(rpc, request);
        let plan = self
            .plan(request.get_ref())
            .inspect_err(|s| call.finish(0, s.code().description()))?;
        let permit = self
            .admit()
            .inspect_err(|s| call.finish(0, s.code().description()))?;
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            let outcome = shared.pipeline.run(plan, emit, sender.clone()).await;
            drop(permit);
            match outcome {
                Outcome::Complete { bytes } => call.finish(bytes, "ok"),
                Outcome::Abandoned { bytes } => call.finish(bytes, "cancelled by client"),
                Outcome::Failed { bytes } => {
                    call.finish(bytes, "internal");
                    let _ = sender
                        .send(Err(Status::internal("a generation worker failed")))
                        .await;
                }
            }
        });
        Ok(receiver)
    }
}

/// One RPC, for its log line.
struct Call {
    rpc: &'static str,
    peer: Option<SocketAddr>,
    tensors: usize,
    started: Instant,
}

impl Call {
    fn new(rpc: &'static str, request: &Request<GenerateRequest>) -> Self {
        Self {
            rpc,
            peer: request.remote_addr(),
            tensors: request.get_ref().tensors.len(),
            started: Instant::now(),
        }
    }

    fn finish(&self, bytes: u64, status: &str) {
        tracing::info!(
            rpc = self.rpc,
            peer = ?self.peer,
            tensors = self.tensors,
            bytes,
            duration_ms = self.started.elapsed().as_secs_f64() * 1e3,
            status,
            "rpc"
        );
    }
}

/// The gRPC service; cheap to clone.
#[derive(Clone)]
pub struct Handler {
    shared: Arc<Shared>,
}

impl Handler {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[tonic::async_trait]
impl WeightInit for Handler {
    type GenerateStream = ReceiverStream<Result<GenerateResponse, Status>>;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let receiver = self.shared.start("Generate", &request, Emit::Chunks)?;
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn describe(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        let call = Call::new("Describe", &request);
        let plan = self
            .shared
            .plan(request.get_ref())
            .inspect_err(|s| call.finish(0, s.code().description()))?;
        call.finish(0, "ok");
        Ok(Response::new(DescribeResponse {
            tensors: plan.tensors.iter().map(convert::header).collect(),
        }))
    }

    async fn digest(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<DigestResponse>, Status> {
        // Dropping this future (the client cancelled) drops the receiver, which stops the work.
        let mut receiver = self.shared.start("Digest", &request, Emit::DigestsOnly)?;
        let mut digests = Vec::new();
        while let Some(message) = receiver.recv().await {
            if let Some(Item::End(end)) = message?.item {
                digests.push(end);
            }
        }
        Ok(Response::new(DigestResponse { digests }))
    }

    async fn get_info(
        &self,
        _request: Request<GetInfoRequest>,
    ) -> Result<Response<ServerInfo>, Status> {
        let limits = &self.shared.limits;
        Ok(Response::new(ServerInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            algorithms: engine::ALGORITHMS.to_vec(),
            schemes: Scheme::NAMES.iter().map(|s| (*s).to_owned()).collect(),
            dtypes: DType::ALL
                .iter()
                .map(|d| convert::proto_dtype(*d).into())
                .collect(),
            limits: Some(ServerLimits {
                default_chunk_bytes: limits.default_chunk_bytes,
                max_chunk_bytes: limits.max_chunk_bytes,
                max_request_bytes: limits.max_request_bytes,
                max_tensors: limits.max_tensors,
                max_concurrent_streams: self.shared.max_concurrent_streams,
                max_rank: limits.max_rank,
                max_name_bytes: limits.max_name_bytes,
            }),
        }))
    }
}
