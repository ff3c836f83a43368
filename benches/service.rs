//! Service benchmarks against the real release server on 127.0.0.1:0: Digest and Generate
//! throughput, server memory while streaming 4 GiB, small-request latency under 1, 8 and 64
//! concurrent clients, and the chunk size / flow-control window sweep.
//!
//! Run by `scripts/bench` (or `cargo bench --bench service`, after `cargo build --release`);
//! the server binary is `$WEIGHTINIT_BIN` or the release build. Prints one JSON
//! object per line for the report, and a readable line on stderr.

// The tests' child-process harness; the benchmarks need only its server.
#[allow(dead_code)]
#[path = "../tests/integration/util/process.rs"]
mod harness;

use std::time::{Duration, Instant};

use harness::Served;
use serde_json::json;
use tonic::transport::{Channel, Endpoint};
use weightinit::proto::weight_init_client::WeightInitClient;
use weightinit::proto::{GenerateRequest, generate_response::Item};

/// Repetitions of each throughput measurement; the best is kept (other work on the machine
/// only ever slows a run down), the median reported beside it.
const REPEATS: usize = 5;

/// How long each latency level runs.
const LATENCY_RUN: Duration = Duration::from_secs(3);

/// Runs every section, or only those named on the command line (`digest`, `permute`, `generate`,
/// `latency`, `memory`, `sweep`).
#[tokio::main]
async fn main() {
    let named: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |section: &str| named.is_empty() || named.iter().any(|n| n == section);
    let server = Server::start(&[]);
    if run("digest") {
        digests(&server).await;
    }
    if run("permute") {
        permutes(&server).await;
    }
    if run("generate") {
        // Into a client with 8/16 MiB receive windows: tonic's default (64 KiB) throttles
        // downloads; the sweep measures both.
        let client = server.client(Some((8 << 20, 16 << 20))).await;
        let request = request(&[8192, 8192], r#"{"xavierUniform": {}}"#, 0);
        let times = repeat(|| generate(client.clone(), request.clone(), true)).await;
        report(json!({
            "bench": "generate_rust", "scheme": "xavier_uniform", "shape": [8192, 8192],
            "bytes": 1u64 << 28, "best_s": times.0, "median_s": times.1
        }));
    }
    if run("latency") {
        for rpc in ["digest", "describe"] {
            for concurrency in [1, 8, 64] {
                latency(&server, rpc, concurrency).await;
            }
        }
    }
    drop(server);
    if run("memory") {
        memory().await;
    }
    if run("sweep") {
        sweep().await;
    }
}

/// Digest of [8192, 8192] float32 (256 MiB) with each scheme, and the server's CPU time.
async fn digests(server: &Server) {
    let client = server.client(None).await;
    for (scheme, init) in [
        ("xavier_uniform", r#"{"xavierUniform": {}}"#),
        ("xavier_normal", r#"{"xavierNormal": {}}"#),
        ("truncated_normal", r#"{"truncatedNormal": {"std": 0.02}}"#),
    ] {
        let request = request(&[8192, 8192], init, 0);
        let cpu_before = server.cpu_seconds();
        let times = repeat(|| digest(client.clone(), request.clone())).await;
        let cpu = (server.cpu_seconds() - cpu_before) / REPEATS as f64;
        report(json!({
            "bench": "digest", "scheme": scheme, "shape": [8192, 8192], "bytes": 1u64 << 28,
            "best_s": times.0, "median_s": times.1, "server_cpu_s": cpu
        }));
    }
}

/// Digest and Generate of a tensor and of its permuted view (the Keras layouts of a Linear and
/// a Conv2d weight), run alternately so that both see the same machine.
async fn permutes(server: &Server) {
    let client = server.client(Some((8 << 20, 16 << 20))).await;
    let cases: [(&[u64], &[u32]); 2] =
        [(&[8192, 8192], &[1, 0]), (&[512, 512, 3, 3], &[2, 3, 1, 0])];
    for (shape, permute) in cases {
        let plain = request(shape, r#"{"xavierUniform": {}}"#, 0);
        let mut permuted = plain.clone();
        permuted.tensors[0].permute = permute.to_vec();
        // Small tensors take milliseconds: more runs for a stable best.
        let runs = if shape.iter().product::<u64>() < 1 << 24 {
            4 * REPEATS
        } else {
            REPEATS
        };
        for rpc in ["digest", "generate"] {
            let run = |request: &GenerateRequest| {
                let (client, request) = (client.clone(), request.clone());
                async move {
                    if rpc == "digest" {
                        digest(client, request).await
                    } else {
                        generate(client, request, false).await
                    }
                }
            };
            let (mut plain_s, mut permuted_s) = (f64::INFINITY, f64::INFINITY);
            let (mut plain_cpu, mut permuted_cpu) = (0.0, 0.0);
            for _ in 0..runs {
                let cpu = server.cpu_seconds();
                plain_s = plain_s.min(run(&plain).await);
                let between = server.cpu_seconds();
                permuted_s = permuted_s.min(run(&permuted).await);
                plain_cpu += between - cpu;
                permuted_cpu += server.cpu_seconds() - between;
            }
            report(json!({
                "bench": "permute", "rpc": rpc, "scheme": "xavier_uniform", "shape": shape,
                "permute": permute, "bytes": 4 * shape.iter().product::<u64>(),
                "plain_best_s": plain_s, "permuted_best_s": permuted_s,
                "ratio": plain_s / permuted_s, "plain_cpu_s": plain_cpu / runs as f64,
                "permuted_cpu_s": permuted_cpu / runs as f64
            }));
        }
    }
}

/// A release server in a child process (the tests' harness), stopped on drop.
struct Server(Served);

impl Server {
    fn start(flags: &[&str]) -> Self {
        Self(Served::start(flags, false))
    }

    /// A client on its own connection; `window` sets its HTTP/2 receive windows
    /// (stream, connection), else tonic's defaults.
    async fn client(&self, window: Option<(u32, u32)>) -> WeightInitClient<Channel> {
        let mut endpoint = Endpoint::from_shared(self.0.url()).unwrap();
        if let Some((stream, connection)) = window {
            endpoint = endpoint
                .initial_stream_window_size(stream)
                .initial_connection_window_size(connection);
        }
        WeightInitClient::new(endpoint.connect().await.unwrap()).max_decoding_message_size(16 << 20)
    }

    /// CPU time the server process has used (all threads; 10 ms ticks), in seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0.child.id())).unwrap();
        // Fields after the parenthesized name: utime and stime are the 12th and 13th.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        ticks / 100.0
    }

    /// Peak resident memory of the server process, in bytes.
    fn peak_rss(&self) -> u64 {
        self.0.peak_rss()
    }
}

fn request(shape: &[u64], init: &str, chunk_bytes: u32) -> GenerateRequest {
    serde_json::from_value(json!({
        "seed": 1, "chunkBytes": chunk_bytes,
        "tensors": [{"name": "w", "shape": shape, "init": serde_json::from_str::<serde_json::Value>(init).unwrap()}]
    }))
    .unwrap()
}

/// (best, median) seconds of `REPEATS` runs.
async fn repeat<F: Future<Output = f64>>(mut run: impl FnMut() -> F) -> (f64, f64) {
    let mut times = Vec::new();
    for _ in 0..REPEATS {
        times.push(run().await);
    }
    times.sort_by(f64::total_cmp);
    (times[0], times[REPEATS / 2])
}

async fn digest(mut client: WeightInitClient<Channel>, request: GenerateRequest) -> f64 {
    let start = Instant::now();
    let digests = client.digest(request).await.unwrap().into_inner().digests;
    assert_eq!(digests.len(), 1);
    start.elapsed().as_secs_f64()
}

/// Streams the tensor; with `keep`, into a preallocated buffer at each chunk's offset (as a
/// client filling a tensor would), else dropping each chunk.
async fn generate(
    mut client: WeightInitClient<Channel>,
    request: GenerateRequest,
    keep: bool,
) -> f64 {
    let start = Instant::now();
    let mut stream = client.generate(request).await.unwrap().into_inner();
    let mut buffer = Vec::new();
    let mut received = 0u64;
    while let Some(message) = stream.message().await.unwrap() {
        match message.item.unwrap() {
            Item::Header(header) if keep => buffer = vec![0u8; header.byte_length as usize],
            Item::Chunk(chunk) => {
                received += chunk.data.len() as u64;
                if keep {
                    let at = chunk.offset as usize;
                    buffer[at..at + chunk.data.len()].copy_from_slice(&chunk.data);
                }
            }
            Item::End(end) => assert_eq!(end.byte_length, received),
            Item::Header(_) => {}
        }
    }
    std::hint::black_box(&buffer);
    start.elapsed().as_secs_f64()
}

/// `concurrency` clients, each on its own connection, calling `rpc` on a [4, 4] tensor back
/// to back for [`LATENCY_RUN`].
async fn latency(server: &Server, rpc: &'static str, concurrency: usize) {
    let request = request(&[4, 4], r#"{"xavierUniform": {}}"#, 0);
    let mut clients = Vec::new();
    for _ in 0..concurrency {
        clients.push(server.client(None).await);
    }
    let deadline = Instant::now() + LATENCY_RUN;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let request = request.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let start = Instant::now();
                    match rpc {
                        "digest" => drop(client.digest(request.clone()).await.unwrap()),
                        _ => drop(client.describe(request.clone()).await.unwrap()),
                    }
                    latencies.push(start.elapsed().as_secs_f64());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort_by(f64::total_cmp);
    let at = |q: f64| all[((all.len() - 1) as f64 * q) as usize];
    report(
        json!({"bench": "latency", "rpc": rpc, "concurrency": concurrency,
                  "requests_per_s": all.len() as f64 / LATENCY_RUN.as_secs_f64(),
                  "p50_ms": at(0.5) * 1e3, "p99_ms": at(0.99) * 1e3}),
    );
}

/// Peak server memory while one client streams a 4 GiB tensor and drops the data.
async fn memory() {
    let server = Server::start(&[]);
    let client = server.client(Some((8 << 20, 16 << 20))).await;
    let before = server.peak_rss();
    let request = request(&[32768, 32768], r#"{"xavierUniform": {}}"#, 0);
    let secs = generate(client, request, false).await;
    report(
        json!({"bench": "memory", "bytes": 1u64 << 32, "seconds": secs,
                  "idle_peak_rss": before, "peak_rss": server.peak_rss()}),
    );
}

/// Generate throughput into the Rust client by chunk size, server window flags and client
/// receive windows (for a download the client's receive window is the one that counts).
async fn sweep() {
    let windows: [(&str, [&str; 4]); 3] = [
        (
            "2M/4M",
            [
                "--stream-window-bytes",
                "2097152",
                "--connection-window-bytes",
                "4194304",
            ],
        ),
        (
            "8M/16M",
            [
                "--stream-window-bytes",
                "8388608",
                "--connection-window-bytes",
                "16777216",
            ],
        ),
        (
            "32M/64M",
            [
                "--stream-window-bytes",
                "33554432",
                "--connection-window-bytes",
                "67108864",
            ],
        ),
    ];
    for (server_window, flags) in windows {
        let server = Server::start(&flags);
        for client_window in [
            None,
            Some((8u32 << 20, 16u32 << 20)),
            Some((32 << 20, 64 << 20)),
        ] {
            let client = server.client(client_window).await;
            for chunk in [256u32 << 10, 1 << 20, (4 << 20) - (64 << 10)] {
                let request = request(&[8192, 8192], r#"{"xavierUniform": {}}"#, chunk);
                let times = repeat(|| generate(client.clone(), request.clone(), false)).await;
                report(json!({"bench": "sweep", "server_window": server_window,
                              "client_window": client_window.map_or("default".to_owned(),
                                  |(s, c)| format!("{}M/{}M", s >> 20, c >> 20)),
                              "chunk_bytes": chunk, "bytes": 1u64 << 28,
                              "best_s": times.0, "median_s": times.1}));
            }
        }
    }
}

fn report(line: serde_json::Value) {
    println!("{line}");
    eprintln!("  {line}");
}
