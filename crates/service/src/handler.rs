//! The `weightinit.v1.WeightInit` RPCs: validate, then hand the work to the pipeline.
//! Every RPC ends in one log line and in the metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_stream::StreamExt as _;
use tonic::{Code, Request, Response, Status};

use super::convert;
use super::memory;
use super::metrics::{Live, Metrics, Rpc};
use super::pipeline::{Emit, Outcome, Pipeline, Structured};
use super::pool::WorkerPool;
use super::watchdog::{Watch, WatchedStream};
use crate::proto::{
    DescribeResponse, DigestResponse, GenerateRequest, GetInfoRequest, ServerInfo, ServerLimits,
    generate_response::Item, weight_init_server::WeightInit,
};
use weightinit_engine::{self as engine, DType, Limits, RequestPlan, Scheme};

/// Messages buffered between the producer and tonic, per stream.
const STREAM_BUFFER: usize = 2;

/// The largest response Describe and Digest send: what gRPC clients receive by default (C++,
/// Go, Java, grpcio). A larger one would reach them only as an error of their own.
const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// The most bytes one TensorEnd adds to a DigestResponse: its key and length, then
/// tensor_index (a 5-byte varint at most), blake3 (32 bytes) and byte_length (10), each keyed.
const MAX_DIGEST_BYTES: usize = 2 + 6 + 34 + 11;

/// RESOURCE_EXHAUSTED for an `rpc` response of `bytes` bytes, over [`MAX_RESPONSE_BYTES`].
fn response_too_large(rpc: Rpc, bytes: usize) -> Status {
    convert::status(engine::RequestError::over_limit(
        "tensors",
        format!(
            "the {} response would take up to {bytes} bytes, over the {MAX_RESPONSE_BYTES} \
             (4 MiB) that gRPC clients receive by default; split the request",
            rpc.name()
        ),
    ))
}

/// State shared by every RPC of one server.
pub struct Shared {
    pub limits: Limits,
    pub max_concurrent_streams: u32,
    /// A Generate stream whose client reads nothing for this long is closed with
    /// DEADLINE_EXCEEDED; zero = never.
    pub stream_idle_timeout: Duration,
    pub metrics: Arc<Metrics>,
    /// Whole-tensor computations at once, and their memory budget in bytes (for GetInfo).
    pub structured_jobs: usize,
    pub structured_memory_bytes: u64,
    pipeline: Pipeline,
    streams: Arc<Semaphore>,
    /// Set when the shutdown grace period is over: the streams still running end then.
    cut: watch::Sender<bool>,
}

impl Shared {
    /// Starts `workers` generation threads; `structured_jobs` whole-tensor computations
    /// run at once within `structured_memory_bytes`.
    pub fn new(
        limits: Limits,
        workers: usize,
        max_concurrent_streams: u32,
        stream_idle_timeout: Duration,
        (structured_jobs, structured_memory_bytes): (usize, u64),
    ) -> Self {
        let pool = Arc::new(WorkerPool::new(workers));
        let structured = Structured::new(structured_jobs, structured_memory_bytes);
        Self {
            limits,
            max_concurrent_streams,
            structured_jobs,
            structured_memory_bytes,
            pipeline: Pipeline::new(pool, structured),
            stream_idle_timeout,
            metrics: Arc::new(Metrics::default()),
            streams: Arc::new(Semaphore::new(max_concurrent_streams as usize)),
            cut: watch::Sender::new(false),
        }
    }

    /// The shutdown grace period is over: every stream still running ends at once with
    /// UNAVAILABLE, logged and counted, and frees its slot.
    pub fn cut_streams(&self) {
        self.cut.send_replace(true);
    }

    /// Generate and Digest streams running now.
    pub fn active_streams(&self) -> usize {
        self.max_concurrent_streams as usize - self.streams.available_permits()
    }

    /// Workers generating or hashing right now.
    pub fn busy_workers(&self) -> usize {
        self.pipeline.pool.busy()
    }

    /// The metrics in the exposition format, with the gauges read from the live state.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(&Live {
            inflight_streams: self.active_streams(),
            max_concurrent_streams: self.max_concurrent_streams,
            busy_workers: self.busy_workers(),
            workers: self.pipeline.pool.workers(),
        })
    }

    fn plan(&self, request: &GenerateRequest) -> Result<RequestPlan, Status> {
        convert::request(request)
            .and_then(|request| request.plan(&self.limits))
            .map_err(convert::status)
    }

    fn admit(&self) -> Result<OwnedSemaphorePermit, Status> {
        Arc::clone(&self.streams).try_acquire_owned().map_err(|_| {
            self.metrics.stream_rejected();
            Status::resource_exhausted(format!(
                "this server is already running its limit of {} concurrent streams; retry later",
                self.max_concurrent_streams
            ))
        })
    }

    /// Validates, takes a stream slot, and starts producing into a bounded channel. A
    /// Generate stream's client that reads nothing for the idle timeout loses its stream.
    fn start(
        self: &Arc<Self>,
        rpc: Rpc,
        request: &Request<GenerateRequest>,
        emit: Emit,
    ) -> Result<WatchedStream, Status> {
        let call = self.call(rpc, request.remote_addr(), request.get_ref().tensors.len());
        let plan = self
            .plan(request.get_ref())
            .inspect_err(|s| call.failed(s))?;
        let permit = self.admit().inspect_err(|s| call.failed(s))?;
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        let (watch, stream) = Watch::new(receiver, Arc::clone(&self.metrics));
        let idle = match emit {
            Emit::Chunks if !self.stream_idle_timeout.is_zero() => Some(self.stream_idle_timeout),
            // Digest's handler drains its own stream; nothing waits on a client.
            _ => None,
        };
        let shared = Arc::clone(self);
        let mut cut = self.cut.subscribe();
        tokio::spawn(async move {
            let run = shared.pipeline.run(plan, emit, sender.clone());
            let idle = async {
                match idle {
                    Some(idle) => watch.idle(&sender, idle).await,
                    None => std::future::pending().await,
                }
            };
            // Dropping `run` stops the producer: its queued jobs are skipped.
            let end = tokio::select! {
                outcome = run => End::Done(outcome),
                () = idle => End::Idle,
                _ = cut.wait_for(|&cut| cut) => End::Cut,
            };
            drop(permit);
            if shared.active_streams() == 0 {
                let shared = Arc::clone(&shared);
                memory::trim_when_idle(move || shared.active_streams() == 0);
            }
            match end {
                End::Done(Outcome::Complete { bytes }) => call.finish(bytes, Code::Ok, "ok"),
                End::Done(Outcome::Abandoned { bytes }) => {
                    call.finish(bytes, Code::Cancelled, "cancelled by client")
                }
                End::Done(Outcome::Failed { bytes }) => {
                    call.finish(bytes, Code::Internal, "internal");
                    watch.fail_after_queued(Status::internal("a generation worker failed"));
                }
                End::Cut => {
                    call.finish(
                        watch.sent_bytes(),
                        Code::Unavailable,
                        "cut: the shutdown grace period is over",
                    );
                    watch.fail_now(Status::unavailable(
                        "the server is shutting down and its grace period (--shutdown-grace) is \
                         over; retry, on another replica if there is one",
                    ));
                }
                End::Idle => {
                    shared.metrics.stream_idle_timeout();
                    call.finish(
                        watch.sent_bytes(),
                        Code::DeadlineExceeded,
                        "idle timeout: the client read nothing",
                    );
                    watch.fail_now(Status::deadline_exceeded(format!(
                        "the stream was idle for {:?} (--stream-idle-timeout): the client read \
                         nothing, so the server closed it; retry, reading as data arrives",
                        shared.stream_idle_timeout
                    )));
                }
            }
        });
        Ok(stream)
    }

    fn call(self: &Arc<Self>, rpc: Rpc, peer: Option<SocketAddr>, tensors: usize) -> Call {
        Call {
            rpc,
            peer,
            tensors,
            started: Instant::now(),
            metrics: Arc::clone(&self.metrics),
        }
    }
}

/// How a stream's task ended.
enum End {
    Done(Outcome),
    /// Its client read nothing for the idle timeout.
    Idle,
    /// The shutdown grace period ran out.
    Cut,
}

/// One RPC, for its log line and its metrics.
struct Call {
    rpc: Rpc,
    peer: Option<SocketAddr>,
    tensors: usize,
    started: Instant,
    metrics: Arc<Metrics>,
}

impl Call {
    fn finish(&self, bytes: u64, code: Code, status: &str) {
        let duration = self.started.elapsed();
        self.metrics.rpc_finished(self.rpc, code, duration, bytes);
        tracing::info!(
            rpc = self.rpc.name(),
            // The address itself (absent when unknown), not Debug's `Some(...)`.
            peer = self.peer.map(tracing::field::display),
            tensors = self.tensors,
            bytes,
            duration_ms = duration.as_secs_f64() * 1e3,
            status,
            "rpc"
        );
    }

    /// Refused before any data.
    fn failed(&self, status: &Status) {
        self.finish(0, status.code(), status.code().description());
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
    type GenerateStream = WatchedStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let stream = self.shared.start(Rpc::Generate, &request, Emit::Chunks)?;
        Ok(Response::new(stream))
    }

    async fn describe(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        let call = self.shared.call(
            Rpc::Describe,
            request.remote_addr(),
            request.get_ref().tensors.len(),
        );
        let plan = self
            .shared
            .plan(request.get_ref())
            .inspect_err(|s| call.failed(s))?;
        let response = DescribeResponse {
            tensors: plan.tensors.iter().map(convert::header).collect(),
        };
        if response.encoded_len() > MAX_RESPONSE_BYTES {
            let status = response_too_large(Rpc::Describe, response.encoded_len());
            call.failed(&status);
            return Err(status);
        }
        call.finish(0, Code::Ok, "ok");
        Ok(Response::new(response))
    }

    async fn digest(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<DigestResponse>, Status> {
        // Refused before any work: its bound is known from the request alone.
        let bound = request.get_ref().tensors.len() * MAX_DIGEST_BYTES;
        if bound > MAX_RESPONSE_BYTES {
            return Err(response_too_large(Rpc::Digest, bound));
        }
        // Dropping this future (the client cancelled) drops the receiver, which stops the work.
        let mut stream = self
            .shared
            .start(Rpc::Digest, &request, Emit::DigestsOnly)?;
        let mut digests = Vec::new();
        while let Some(message) = stream.next().await {
            if let Some(Item::End(end)) = message?.item {
                digests.push(end);
            }
        }
        Ok(Response::new(DigestResponse { digests }))
    }

    async fn get_info(
        &self,
        request: Request<GetInfoRequest>,
    ) -> Result<Response<ServerInfo>, Status> {
        let call = self.shared.call(Rpc::GetInfo, request.remote_addr(), 0);
        let limits = &self.shared.limits;
        call.finish(0, Code::Ok, "ok");
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
                max_matrix_elements: limits.max_matrix_elements,
                max_request_work: limits.max_request_work,
                structured_jobs: self.shared.structured_jobs as u32,
                structured_memory_bytes: self.shared.structured_memory_bytes,
            }),
        }))
    }
}
