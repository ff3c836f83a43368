//! Metrics: counters the RPCs, the listener and the auth check update, and a minimal HTTP
//! endpoint that serves them in the Prometheus text format (`GET /metrics`) on its own port.
//!
//! Labels come from fixed sets (the RPC names and the 17 gRPC codes), never from what a
//! client sends, so no request can grow the number of series. Gauges (streams in flight,
//! busy workers) are read from the server's live state at scrape time.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tonic::Code;

use super::handler::Shared;

/// The RPCs that metrics are kept for; anything else counts as `Other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    const ALL: [Rpc; 6] = [
        Rpc::Generate,
        Rpc::Describe,
        Rpc::Digest,
        Rpc::GetInfo,
        Rpc::Reflection,
        Rpc::Other,
    ];

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

    fn index(self) -> usize {
        self as usize
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

/// Upper bounds of the RPC duration buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0,
];

#[derive(Default)]
struct Histogram {
    /// Observations at most `BUCKETS[i]` (not cumulative; summed when rendered).
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&bound| seconds <= bound) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }
}

const RPCS: usize = Rpc::ALL.len();
const CODES: usize = CODE_NAMES.len();

/// Every counter of one server. Cheap to update from any thread.
pub struct Metrics {
    started: Instant,
    requests: [[AtomicU64; CODES]; RPCS],
    durations: [Histogram; RPCS],
    generated_bytes: [AtomicU64; RPCS],
    sent_bytes: AtomicU64,
    streams_rejected: AtomicU64,
    stream_idle_timeouts: AtomicU64,
    connections_accepted: AtomicU64,
    connections_rejected: AtomicU64,
    connections_open: AtomicU64,
    connection_limit: AtomicU64,
    tls_handshake_failures: AtomicU64,
    /// Reloads of the TLS and token files: succeeded, failed.
    reloads: [AtomicU64; 2],
    draining: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            requests: Default::default(),
            durations: Default::default(),
            generated_bytes: Default::default(),
            sent_bytes: AtomicU64::new(0),
            streams_rejected: AtomicU64::new(0),
            stream_idle_timeouts: AtomicU64::new(0),
            connections_accepted: AtomicU64::new(0),
            connections_rejected: AtomicU64::new(0),
            connections_open: AtomicU64::new(0),
            connection_limit: AtomicU64::new(0),
            tls_handshake_failures: AtomicU64::new(0),
            reloads: Default::default(),
            draining: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// An RPC finished with `code` after `duration`, having generated `bytes` of tensor data.
    pub fn rpc_finished(&self, rpc: Rpc, code: Code, duration: Duration, bytes: u64) {
        let code = (code as usize).min(CODES - 1);
        self.requests[rpc.index()][code].fetch_add(1, Relaxed);
        self.durations[rpc.index()].observe(duration);
        self.generated_bytes[rpc.index()].fetch_add(bytes, Relaxed);
    }

    /// An RPC refused before reaching its handler (e.g. UNAUTHENTICATED).
    pub fn rpc_refused(&self, rpc: Rpc, code: Code) {
        let code = (code as usize).min(CODES - 1);
        self.requests[rpc.index()][code].fetch_add(1, Relaxed);
    }

    /// Tensor bytes handed to the transport by a Generate stream.
    pub fn bytes_sent(&self, bytes: u64) {
        self.sent_bytes.fetch_add(bytes, Relaxed);
    }

    /// A Generate or Digest refused because the server runs its limit of streams.
    pub fn stream_rejected(&self) {
        self.streams_rejected.fetch_add(1, Relaxed);
    }

    /// A Generate stream closed because its client read nothing for the idle limit.
    pub fn stream_idle_timeout(&self) {
        self.stream_idle_timeouts.fetch_add(1, Relaxed);
    }

    pub fn connection_opened(&self) {
        self.connections_accepted.fetch_add(1, Relaxed);
        self.connections_open.fetch_add(1, Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connections_open.fetch_sub(1, Relaxed);
    }

    /// A connection closed at once because the server holds its limit of connections.
    pub fn connection_rejected(&self) {
        self.connections_rejected.fetch_add(1, Relaxed);
    }

    /// A TLS handshake failed or timed out (wrong CA, no client certificate, plaintext, ...).
    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.fetch_add(1, Relaxed);
    }

    /// The TLS and token files were read again (SIGHUP), successfully or not.
    pub fn reloaded(&self, ok: bool) {
        self.reloads[usize::from(!ok)].fetch_add(1, Relaxed);
    }

    pub fn set_connection_limit(&self, limit: usize) {
        self.connection_limit.store(limit as u64, Relaxed);
    }

    /// Shutdown began: the server no longer accepts connections.
    pub fn set_draining(&self) {
        self.draining.store(1, Relaxed);
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> u64 {
        self.connections_open.load(Relaxed)
    }

    /// RPCs of `rpc` that finished with `code` so far.
    pub fn requests(&self, rpc: Rpc, code: Code) -> u64 {
        self.requests[rpc.index()][(code as usize).min(CODES - 1)].load(Relaxed)
    }

    /// Everything, in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self, shared: &Shared) -> String {
        let mut out = String::with_capacity(8 << 10);
        // Each family: its HELP and TYPE lines, then its samples.
        header(
            &mut out,
            "weightinit_build_info",
            "gauge",
            "Always 1; the version label says which server this is.",
        );
        let _ = writeln!(
            out,
            "weightinit_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        sample(
            &mut out,
            "weightinit_uptime_seconds",
            "gauge",
            "Seconds since the server started.",
            format!("{:.3}", self.started.elapsed().as_secs_f64()),
        );
        sample(
            &mut out,
            "weightinit_draining",
            "gauge",
            "1 once shutdown began (no new connections; streams finishing), else 0.",
            self.draining.load(Relaxed),
        );

        header(
            &mut out,
            "weightinit_requests_total",
            "counter",
            "RPCs finished, by method and gRPC status code.",
        );
        for rpc in Rpc::ALL {
            for (code, count) in self.requests[rpc.index()].iter().enumerate() {
                let count = count.load(Relaxed);
                // Every method's OK series exists from the start; the others once they occur.
                let always = code == 0 && rpc != Rpc::Other && rpc != Rpc::Reflection;
                if count > 0 || always {
                    let _ = writeln!(
                        out,
                        "weightinit_requests_total{{rpc=\"{}\",code=\"{}\"}} {count}",
                        rpc.name(),
                        CODE_NAMES[code]
                    );
                }
            }
        }
        header(
            &mut out,
            "weightinit_errors_total",
            "counter",
            "RPCs that failed, by gRPC status code (all methods).",
        );
        for (code, name) in CODE_NAMES.iter().enumerate().skip(1) {
            let count: u64 = Rpc::ALL
                .iter()
                .map(|rpc| self.requests[rpc.index()][code].load(Relaxed))
                .sum();
            let always = matches!(
                *name,
                "INVALID_ARGUMENT" | "RESOURCE_EXHAUSTED" | "INTERNAL" | "UNAUTHENTICATED"
            );
            if count > 0 || always {
                let _ = writeln!(out, "weightinit_errors_total{{code=\"{name}\"}} {count}");
            }
        }

        header(
            &mut out,
            "weightinit_rpc_duration_seconds",
            "histogram",
            "Time from a request's arrival to the end of its response (streams: the last message queued).",
        );
        for rpc in [Rpc::Generate, Rpc::Describe, Rpc::Digest, Rpc::GetInfo] {
            let histogram = &self.durations[rpc.index()];
            let mut cumulative = 0;
            for (bound, count) in BUCKETS.iter().zip(&histogram.buckets) {
                cumulative += count.load(Relaxed);
                let _ = writeln!(
                    out,
                    "weightinit_rpc_duration_seconds_bucket{{rpc=\"{}\",le=\"{bound}\"}} {cumulative}",
                    rpc.name()
                );
            }
            let count = histogram.count.load(Relaxed);
            let _ = writeln!(
                out,
                "weightinit_rpc_duration_seconds_bucket{{rpc=\"{}\",le=\"+Inf\"}} {count}",
                rpc.name()
            );
            let _ = writeln!(
                out,
                "weightinit_rpc_duration_seconds_sum{{rpc=\"{}\"}} {:.6}",
                rpc.name(),
                histogram.sum_nanos.load(Relaxed) as f64 / 1e9
            );
            let _ = writeln!(
                out,
                "weightinit_rpc_duration_seconds_count{{rpc=\"{}\"}} {count}",
                rpc.name()
            );
        }

        header(
            &mut out,
            "weightinit_generated_bytes_total",
            "counter",
            "Tensor bytes generated (Generate: streamed; Digest: hashed on the server).",
        );
        for rpc in [Rpc::Generate, Rpc::Digest] {
            let _ = writeln!(
                out,
                "weightinit_generated_bytes_total{{rpc=\"{}\"}} {}",
                rpc.name(),
                self.generated_bytes[rpc.index()].load(Relaxed)
            );
        }
        sample(
            &mut out,
            "weightinit_sent_bytes_total",
            "counter",
            "Tensor bytes handed to the transport in Generate chunks.",
            self.sent_bytes.load(Relaxed),
        );

        sample(
            &mut out,
            "weightinit_inflight_streams",
            "gauge",
            "Generate and Digest streams running now (each holds a stream slot).",
            shared.active_streams(),
        );
        sample(
            &mut out,
            "weightinit_max_concurrent_streams",
            "gauge",
            "The stream slots (--max-concurrent-streams).",
            shared.max_concurrent_streams,
        );
        sample(
            &mut out,
            "weightinit_streams_rejected_total",
            "counter",
            "Generate and Digest refused with RESOURCE_EXHAUSTED because every stream slot was taken.",
            self.streams_rejected.load(Relaxed),
        );
        sample(
            &mut out,
            "weightinit_stream_idle_timeouts_total",
            "counter",
            "Generate streams closed because the client read nothing for --stream-idle-timeout.",
            self.stream_idle_timeouts.load(Relaxed),
        );

        sample(
            &mut out,
            "weightinit_busy_workers",
            "gauge",
            "Generation workers running a job now.",
            shared.busy_workers(),
        );
        sample(
            &mut out,
            "weightinit_workers",
            "gauge",
            "Generation worker threads (--workers).",
            shared.pipeline.pool.workers(),
        );

        sample(
            &mut out,
            "weightinit_connections_open",
            "gauge",
            "gRPC connections open now.",
            self.connections_open.load(Relaxed),
        );
        sample(
            &mut out,
            "weightinit_connection_limit",
            "gauge",
            "Most gRPC connections at once (--max-connections, lowered to fit the open-files limit).",
            self.connection_limit.load(Relaxed),
        );
        sample(
            &mut out,
            "weightinit_connections_accepted_total",
            "counter",
            "gRPC connections accepted.",
            self.connections_accepted.load(Relaxed),
        );
        sample(
            &mut out,
            "weightinit_connections_rejected_total",
            "counter",
            "Connections closed at once because the connection limit was reached.",
            self.connections_rejected.load(Relaxed),
        );

        sample(
            &mut out,
            "weightinit_tls_handshake_failures_total",
            "counter",
            "TLS handshakes that failed or timed out (untrusted or missing client certificates, plaintext clients).",
            self.tls_handshake_failures.load(Relaxed),
        );
        header(
            &mut out,
            "weightinit_reloads_total",
            "counter",
            "Reloads of the TLS and token files (SIGHUP), by result; a failed one changes nothing.",
        );
        for (result, count) in ["ok", "error"].iter().zip(&self.reloads) {
            let count = count.load(Relaxed);
            let _ = writeln!(
                out,
                "weightinit_reloads_total{{result=\"{result}\"}} {count}"
            );
        }

        if let Some(rss) = resident_bytes() {
            sample(
                &mut out,
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                rss,
            );
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            sample(
                &mut out,
                "process_open_fds",
                "gauge",
                "Number of open file descriptors.",
                fds.count(),
            );
        }
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A family of one unlabelled sample.
fn sample(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// Resident set size of this process (Linux), from /proc/self/statm.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Scrapes answered at once; more connections than this are closed unanswered.
const MAX_SCRAPES: usize = 16;
/// A scrape must send its request and take its answer within this.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request head read.
const MAX_HEAD: usize = 8 << 10;

/// Serves `GET /metrics` on `listener` until the task is dropped or aborted. HTTP/1.x, one
/// request per connection; plain text, no TLS or auth: bind it to an address only the
/// monitoring network reaches.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
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
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(SCRAPE_TIMEOUT, answer(stream, &shared)).await;
            drop(slot);
        });
    }
}

async fn answer(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "",
                false,
            )
            .await;
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = shared.metrics.render(shared);
            respond(&mut stream, "200 OK", &body, head_only).await
        }
        ("GET" | "HEAD", "/") => {
            respond(
                &mut stream,
                "200 OK",
                "weightinit metrics: GET /metrics\n",
                head_only,
            )
            .await
        }
        (_, "/metrics" | "/") => {
            respond(&mut stream, "405 Method Not Allowed", "", head_only).await
        }
        _ => respond(&mut stream, "404 Not Found", "not found\n", head_only).await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
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

    #[test]
    fn histogram_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_secs(1000));
        assert_eq!(h.buckets[0].load(Relaxed), 1);
        assert_eq!(h.count.load(Relaxed), 2);
    }
}
