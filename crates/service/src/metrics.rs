//! Metrics: counters the RPCs, the listener and the auth check update, served in the
//! OpenMetrics text format (`GET /metrics`) on a port of their own.
//!
//! Labels come from fixed sets (the RPC names and the 17 gRPC codes), never from what a
//! client sends, so no request can grow the number of series. Gauges of the server's live
//! state (streams in flight, busy workers) are set from a [`Live`] at scrape time.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::Code;

/// The RPCs that metrics are kept for; anything else counts as `Other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rpc {
    Generate,
    Describe,
    Digest,
    GetInfo,
    /// Reflection (v1 or v1alpha), which needs the token when one is configured.
    Reflection,
    Other,
}

impl Rpc {
    pub fn name(self) -> &'static str {
        match self {
            Rpc::Generate => "Generate",
            Rpc::Describe => "Describe",
            Rpc::Digest => "Digest",
            Rpc::GetInfo => "GetInfo",
            Rpc::Reflection => "ServerReflectionInfo",
            Rpc::Other => "other",
        }
    }

    /// The RPC of a gRPC request path such as `/weightinit.v1.WeightInit/Generate`.
    pub fn from_path(path: &str) -> Self {
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", ""));
        match (service, method) {
            ("weightinit.v1.WeightInit", "Generate") => Rpc::Generate,
            ("weightinit.v1.WeightInit", "Describe") => Rpc::Describe,
            ("weightinit.v1.WeightInit", "Digest") => Rpc::Digest,
            ("weightinit.v1.WeightInit", "GetInfo") => Rpc::GetInfo,
            (
                "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection",
                _,
            ) => Rpc::Reflection,
            _ => Rpc::Other,
        }
    }
}

/// The canonical names of the gRPC status codes, indexed by code number.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// `OK`, `INVALID_ARGUMENT`, ...: the name of a gRPC status code as the gRPC docs spell it.
pub fn code_name(code: Code) -> &'static str {
    CODE_NAMES.get(code as usize).copied().unwrap_or("UNKNOWN")
}

impl EncodeLabelValue for Rpc {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        EncodeLabelValue::encode(&self.name(), encoder)
    }
}

/// A gRPC status code as a label value: its canonical name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct CodeLabel(Code);

impl EncodeLabelValue for CodeLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        EncodeLabelValue::encode(&code_name(self.0), encoder)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RpcCode {
    rpc: Rpc,
    code: CodeLabel,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RpcLabel {
    rpc: Rpc,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CodeOnly {
    code: CodeLabel,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReloadResult {
    result: &'static str,
}

/// Upper bounds of the RPC duration buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0,
];

type FloatGauge = Gauge<f64, AtomicU64>;

/// The server's state that gauges report, read when a scrape comes.
pub struct Live {
    pub inflight_streams: usize,
    pub max_concurrent_streams: u32,
    pub busy_workers: usize,
    pub workers: usize,
}

/// Every metric of one server, and the registry that renders them. Cheap to update from
/// any thread.
pub struct Metrics {
    registry: Registry,
    started: Instant,
    uptime: FloatGauge,
    draining: Gauge,
    requests: Family<RpcCode, Counter>,
    errors: Family<CodeOnly, Counter>,
    durations: Family<RpcLabel, Histogram, fn() -> Histogram>,
    generated_bytes: Family<RpcLabel, Counter>,
    sent_bytes: Counter,
    inflight_streams: Gauge,
    max_concurrent_streams: Gauge,
    streams_rejected: Counter,
    stream_idle_timeouts: Counter,
    busy_workers: Gauge,
    workers: Gauge,
    connections_open: Gauge,
    connection_limit: Gauge,
    connections_accepted: Counter,
    connections_rejected: Counter,
    tls_handshake_failures: Counter,
    reloads: Family<ReloadResult, Counter>,
    resident_memory: Gauge,
    open_fds: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut metrics = Self {
            registry: Registry::default(),
            started: Instant::now(),
            uptime: FloatGauge::default(),
            draining: Gauge::default(),
            requests: Family::default(),
            errors: Family::default(),
            durations: Family::new_with_constructor(|| Histogram::new(BUCKETS)),
            generated_bytes: Family::default(),
            sent_bytes: Counter::default(),
            inflight_streams: Gauge::default(),
            max_concurrent_streams: Gauge::default(),
            streams_rejected: Counter::default(),
            stream_idle_timeouts: Counter::default(),
            busy_workers: Gauge::default(),
            workers: Gauge::default(),
            connections_open: Gauge::default(),
            connection_limit: Gauge::default(),
            connections_accepted: Counter::default(),
            connections_rejected: Counter::default(),
            tls_handshake_failures: Counter::default(),
            reloads: Family::default(),
            resident_memory: Gauge::default(),
            open_fds: Gauge::default(),
        };
        metrics.register();
        metrics
    }
}

impl Metrics {
    /// Registers every metric (clones share their values; the encoder ends each help text
    /// with a period), and creates the series that exist from the start, at 0 (the guards
    /// `get_or_create` returns are not needed).
    fn register(&mut self) {
        let served = [Rpc::Generate, Rpc::Describe, Rpc::Digest, Rpc::GetInfo];
        for rpc in served {
            let _ = self.requests.get_or_create(&RpcCode {
                rpc,
                code: CodeLabel(Code::Ok),
            });
            let _ = self.durations.get_or_create(&RpcLabel { rpc });
        }
        let codes = [
            Code::InvalidArgument,
            Code::ResourceExhausted,
            Code::Internal,
            Code::Unauthenticated,
        ];
        for code in codes {
            let _ = self.errors.get_or_create(&CodeOnly {
                code: CodeLabel(code),
            });
        }
        for rpc in [Rpc::Generate, Rpc::Digest] {
            let _ = self.generated_bytes.get_or_create(&RpcLabel { rpc });
        }
        for result in ["ok", "error"] {
            let _ = self.reloads.get_or_create(&ReloadResult { result });
        }

        let registry = &mut self.registry;
        let version = Info::new([("version", env!("CARGO_PKG_VERSION"))]);
        registry.register(
            "weightinit_build",
            "Always 1; the version label says which server this is",
            version,
        );
        registry.register(
            "weightinit_uptime_seconds",
            "Seconds since the server started",
            self.uptime.clone(),
        );
        registry.register(
            "weightinit_draining",
            "1 once shutdown began (no new connections; streams finishing), else 0",
            self.draining.clone(),
        );
        registry.register(
            "weightinit_requests",
            "RPCs finished, by method and gRPC status code",
            self.requests.clone(),
        );
        registry.register(
            "weightinit_errors",
            "RPCs that failed, by gRPC status code (all methods)",
            self.errors.clone(),
        );
        registry.register(
            "weightinit_rpc_duration_seconds",
            "Time from a request's arrival to the end of its response (streams: the last \
             message queued)",
            self.durations.clone(),
        );
        registry.register(
            "weightinit_generated_bytes",
            "Tensor bytes generated (Generate: streamed; Digest: hashed on the server)",
            self.generated_bytes.clone(),
        );
        registry.register(
            "weightinit_sent_bytes",
            "Tensor bytes handed to the transport in Generate chunks",
            self.sent_bytes.clone(),
        );
        registry.register(
            "weightinit_inflight_streams",
            "Generate and Digest streams running now (each holds a stream slot)",
            self.inflight_streams.clone(),
        );
        registry.register(
            "weightinit_max_concurrent_streams",
            "The stream slots (--max-concurrent-streams)",
            self.max_concurrent_streams.clone(),
        );
        registry.register(
            "weightinit_streams_rejected",
            "Generate and Digest refused with RESOURCE_EXHAUSTED because every stream slot \
             was taken",
            self.streams_rejected.clone(),
        );
        registry.register(
            "weightinit_stream_idle_timeouts",
            "Generate streams closed because the client read nothing for \
             --stream-idle-timeout",
            self.stream_idle_timeouts.clone(),
        );
        registry.register(
            "weightinit_busy_workers",
            "Generation workers running a job now",
            self.busy_workers.clone(),
        );
        registry.register(
            "weightinit_workers",
            "Generation worker threads (--workers)",
            self.workers.clone(),
        );
        registry.register(
            "weightinit_connections_open",
            "gRPC connections open now",
            self.connections_open.clone(),
        );
        registry.register(
            "weightinit_connection_limit",
            "Most gRPC connections at once (--max-connections, lowered to fit the open-files \
             limit)",
            self.connection_limit.clone(),
        );
        registry.register(
            "weightinit_connections_accepted",
            "gRPC connections accepted",
            self.connections_accepted.clone(),
        );
        registry.register(
            "weightinit_connections_rejected",
            "Connections closed at once because the connection limit was reached",
            self.connections_rejected.clone(),
        );
        registry.register(
            "weightinit_tls_handshake_failures",
            "TLS handshakes that failed or timed out (untrusted or missing client \
             certificates, plaintext clients)",
            self.tls_handshake_failures.clone(),
        );
        registry.register(
            "weightinit_reloads",
            "Reloads of the TLS and token files (SIGHUP), by result; a failed one changes \
             nothing",
            self.reloads.clone(),
        );
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            self.resident_memory.clone(),
        );
        registry.register(
            "process_open_fds",
            "Number of open file descriptors",
            self.open_fds.clone(),
        );
    }

    /// An RPC finished with `code` after `duration`, having generated `bytes` of tensor data.
    pub fn rpc_finished(&self, rpc: Rpc, code: Code, duration: Duration, bytes: u64) {
        self.rpc_refused(rpc, code);
        self.durations
            .get_or_create(&RpcLabel { rpc })
            .observe(duration.as_secs_f64());
        if bytes > 0 {
            self.generated_bytes
                .get_or_create(&RpcLabel { rpc })
                .inc_by(bytes);
        }
    }

    /// An RPC refused before reaching its handler (e.g. UNAUTHENTICATED).
    pub fn rpc_refused(&self, rpc: Rpc, code: Code) {
        let code = CodeLabel(code);
        self.requests.get_or_create(&RpcCode { rpc, code }).inc();
        if code.0 != Code::Ok {
            let _ = self.errors.get_or_create(&CodeOnly { code }).inc();
        }
    }

    /// Tensor bytes handed to the transport by a Generate stream.
    pub fn bytes_sent(&self, bytes: u64) {
        self.sent_bytes.inc_by(bytes);
    }

    /// A Generate or Digest refused because the server runs its limit of streams.
    pub fn stream_rejected(&self) {
        self.streams_rejected.inc();
    }

    /// A Generate stream closed because its client read nothing for the idle limit.
    pub fn stream_idle_timeout(&self) {
        self.stream_idle_timeouts.inc();
    }

    pub fn connection_opened(&self) {
        self.connections_accepted.inc();
        self.connections_open.inc();
    }

    pub fn connection_closed(&self) {
        self.connections_open.dec();
    }

    /// A connection closed at once because the server holds its limit of connections.
    pub fn connection_rejected(&self) {
        self.connections_rejected.inc();
    }

    /// A TLS handshake failed or timed out (wrong CA, no client certificate, plaintext, ...).
    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.inc();
    }

    /// The TLS and token files were read again (SIGHUP), successfully or not.
    pub fn reloaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reloads.get_or_create(&ReloadResult { result }).inc();
    }

    pub fn set_connection_limit(&self, limit: usize) {
        self.connection_limit.set(gauge_value(limit));
    }

    /// Shutdown began: the server no longer accepts connections.
    pub fn set_draining(&self) {
        self.draining.set(1);
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> u64 {
        self.connections_open.get().unsigned_abs()
    }

    /// RPCs of `rpc` that finished with `code` so far.
    pub fn requests(&self, rpc: Rpc, code: Code) -> u64 {
        let code = CodeLabel(code);
        self.requests.get_or_create(&RpcCode { rpc, code }).get()
    }

    /// Everything, in the OpenMetrics text format, with the gauges of `live` and of this
    /// process.
    pub fn render(&self, live: &Live) -> String {
        self.uptime.set(self.started.elapsed().as_secs_f64());
        self.inflight_streams
            .set(gauge_value(live.inflight_streams));
        self.max_concurrent_streams
            .set(live.max_concurrent_streams.into());
        self.busy_workers.set(gauge_value(live.busy_workers));
        self.workers.set(gauge_value(live.workers));
        if let Some(rss) = resident_bytes() {
            self.resident_memory.set(gauge_value(rss));
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(gauge_value(fds.count()));
        }
        let mut out = String::with_capacity(8 << 10);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

fn gauge_value(value: impl TryInto<i64>) -> i64 {
    value.try_into().unwrap_or(i64::MAX)
}

/// Resident set size of this process (Linux), from /proc/self/statm.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

/// Scrapes answered at once; more connections than this are closed unanswered.
const MAX_SCRAPES: usize = 16;
/// A scrape must send its request and take its answer within this.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
const CONTENT_TYPE_OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `GET /metrics` on `listener`, with the text `render` returns, until the task is
/// dropped or aborted. HTTP/1.1, one request per connection; no TLS or auth: bind it to an
/// address only the monitoring network reaches.
pub async fn serve<R>(listener: TcpListener, render: R)
where
    R: Fn() -> String + Send + Sync + 'static,
{
    let render = Arc::new(render);
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            continue; // too many scrapes at once: dropped
        };
        let render = Arc::clone(&render);
        let service = hyper::service::service_fn(move |request: Request<_>| {
            let response = answer(&request, render.as_ref());
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .title_case_headers(true)
            .timer(TokioTimer::new())
            .header_read_timeout(SCRAPE_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(SCRAPE_TIMEOUT, connection).await;
            drop(slot);
        });
    }
}

fn answer<B>(request: &Request<B>, render: &dyn Fn() -> String) -> Response<Full<Bytes>> {
    let readable = matches!(*request.method(), Method::GET | Method::HEAD);
    let (status, body) = match request.uri().path() {
        "/metrics" if readable => (StatusCode::OK, render()),
        "/" if readable => (StatusCode::OK, "weightinit metrics: GET /metrics\n".into()),
        "/metrics" | "/" => (StatusCode::METHOD_NOT_ALLOWED, String::new()),
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(CONTENT_TYPE_OPENMETRICS),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_from_path() {
        assert_eq!(
            Rpc::from_path("/weightinit.v1.WeightInit/Generate"),
            Rpc::Generate
        );
        assert_eq!(
            Rpc::from_path("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Rpc::Reflection
        );
        assert_eq!(Rpc::from_path("/weightinit.v1.WeightInit/Nope"), Rpc::Other);
        assert_eq!(Rpc::from_path("garbage"), Rpc::Other);
    }

    #[test]
    fn code_names() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(Code::Unauthenticated), "UNAUTHENTICATED");
    }
}
