//! `weightinit serve`: its flags and their WEIGHTINIT_* variables, and the process around
//! the server (listeners, banner, signals).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use weightinit::service::server::Reloader;
use weightinit::service::{ServeConfig, Server};

/// Everything `weightinit serve` can be told; each flag has a WEIGHTINIT_* twin.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "WEIGHTINIT_ADDR", default_value_t = defaults().addr)]
    addr: SocketAddr,
    /// Generation worker threads [default: all cores]. A stream holds at most workers + 1 jobs
    /// (1 MiB each, 4 MiB for a transposed matrix) ahead of a client that stops reading, plus
    /// under 6 MiB in the transport; views made in panels share max(workers, 2) of 32 MiB.
    #[arg(long, env = "WEIGHTINIT_WORKERS")]
    workers: Option<usize>,
    /// Chunk payload size when a request leaves chunk_bytes at 0.
    #[arg(long, env = "WEIGHTINIT_DEFAULT_CHUNK_BYTES", default_value_t = defaults().default_chunk_bytes)]
    default_chunk_bytes: u32,
    /// Largest chunk payload a request may ask for (grpcurl refuses messages over 4 MiB).
    #[arg(long, env = "WEIGHTINIT_MAX_CHUNK_BYTES", default_value_t = defaults().max_chunk_bytes)]
    max_chunk_bytes: u32,
    /// Largest output of one request, in bytes.
    #[arg(long, env = "WEIGHTINIT_MAX_REQUEST_BYTES", default_value_t = defaults().max_request_bytes)]
    max_request_bytes: u64,
    /// Most tensors in one request.
    #[arg(long, env = "WEIGHTINIT_MAX_TENSORS", default_value_t = defaults().max_tensors)]
    max_tensors: u32,
    /// Most Generate and Digest streams at once; beyond it: RESOURCE_EXHAUSTED. Each holds at
    /// most (--workers + 1) x 4 MiB + 6 MiB for a client that stops reading.
    #[arg(long, env = "WEIGHTINIT_MAX_CONCURRENT_STREAMS", default_value_t = defaults().max_concurrent_streams)]
    max_concurrent_streams: u32,
    /// Largest tensor rank.
    #[arg(long, env = "WEIGHTINIT_MAX_RANK", default_value_t = defaults().max_rank)]
    max_rank: u32,
    /// Longest tensor name, in UTF-8 bytes.
    #[arg(long, env = "WEIGHTINIT_MAX_NAME_BYTES", default_value_t = defaults().max_name_bytes)]
    max_name_bytes: u32,
    /// Largest rows x cols of orthogonal and sparse, which compute the whole matrix first.
    #[arg(long, env = "WEIGHTINIT_MAX_MATRIX_ELEMENTS", default_value_t = defaults().max_matrix_elements)]
    max_matrix_elements: u64,
    /// Largest CPU cost of one request, in element-equivalents: one element of a plain scheme
    /// costs 1, orthogonal adds its QR (about 11e9 for [4096, 4096], 40 CPU-seconds), sparse its selection.
    #[arg(long, env = "WEIGHTINIT_MAX_REQUEST_WORK", default_value_t = defaults().max_request_work)]
    max_request_work: u64,
    /// Whole-tensor computations (orthogonal's QR, sparse's selection) at once, each on every
    /// core [default: half the workers, at least 1].
    #[arg(long, env = "WEIGHTINIT_STRUCTURED_JOBS")]
    structured_jobs: Option<usize>,
    /// Memory for whole-tensor computations and their results until made, in bytes (16 per
    /// matrix element); requests wait for room. At least 16 x --max-matrix-elements
    /// [default: 32 x --max-matrix-elements, two of the largest].
    #[arg(long, env = "WEIGHTINIT_STRUCTURED_MEMORY_BYTES")]
    structured_memory_bytes: Option<u64>,
    /// How long in-flight streams may run after SIGTERM/SIGINT, e.g. 30s, 500ms, 2m.
    #[arg(long, env = "WEIGHTINIT_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// HTTP/2 flow-control window per stream, in bytes.
    #[arg(long, env = "WEIGHTINIT_STREAM_WINDOW_BYTES", default_value_t = defaults().stream_window_bytes)]
    stream_window_bytes: u32,
    /// HTTP/2 flow-control window per connection, in bytes.
    #[arg(long, env = "WEIGHTINIT_CONNECTION_WINDOW_BYTES", default_value_t = defaults().connection_window_bytes)]
    connection_window_bytes: u32,
    /// PEM certificate (chain) of the server; with --tls-key the port speaks TLS only.
    #[arg(long, env = "WEIGHTINIT_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "WEIGHTINIT_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): clients must present a certificate signed by one (mutual TLS).
    #[arg(long, env = "WEIGHTINIT_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// File holding the bearer token that WeightInit and reflection calls must carry as
    /// `authorization: Bearer <token>` (health stays open for probes).
    #[arg(long, env = "WEIGHTINIT_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP on this address (GET /metrics) [default: off].
    #[arg(long, env = "WEIGHTINIT_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Close a Generate stream whose client has read nothing for this long (DEADLINE_EXCEEDED);
    /// 0 = never.
    #[arg(long, env = "WEIGHTINIT_STREAM_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    stream_idle_timeout: Duration,
    /// Most client connections at once; further ones are closed as soon as accepted.
    #[arg(long, env = "WEIGHTINIT_MAX_CONNECTIONS", default_value_t = defaults().max_connections)]
    max_connections: usize,
    /// Most RPCs at once on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "WEIGHTINIT_MAX_CONNECTION_STREAMS", default_value_t = defaults().max_connection_streams)]
    max_connection_streams: u32,
    /// Largest request message, in bytes; larger ones are refused before they are decoded.
    #[arg(long, env = "WEIGHTINIT_MAX_MESSAGE_BYTES", default_value_t = defaults().max_message_bytes)]
    max_message_bytes: usize,
    /// Ping each connection this often (HTTP/2 keepalive); one that does not answer within
    /// 20 s is closed with its streams. 0 = no pings.
    #[arg(long, env = "WEIGHTINIT_KEEPALIVE", default_value = "60s", value_parser = humantime::parse_duration)]
    keepalive: Duration,
}

impl ServeArgs {
    /// The defaults and WEIGHTINIT_* variables alone: what `weightinit` without a command
    /// serves with.
    pub fn from_env() -> Self {
        use clap::{Args, FromArgMatches};
        let command = Self::augment_args(clap::Command::new("weightinit"));
        let matches = command.get_matches_from(["weightinit"]);
        Self::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
    }
}

/// The library's defaults, which the flags show and start from.
fn defaults() -> ServeConfig {
    ServeConfig::default()
}

impl From<ServeArgs> for ServeConfig {
    fn from(args: ServeArgs) -> Self {
        Self {
            addr: args.addr,
            workers: args.workers,
            default_chunk_bytes: args.default_chunk_bytes,
            max_chunk_bytes: args.max_chunk_bytes,
            max_request_bytes: args.max_request_bytes,
            max_tensors: args.max_tensors,
            max_concurrent_streams: args.max_concurrent_streams,
            max_rank: args.max_rank,
            max_name_bytes: args.max_name_bytes,
            max_matrix_elements: args.max_matrix_elements,
            max_request_work: args.max_request_work,
            structured_jobs: args.structured_jobs,
            structured_memory_bytes: args.structured_memory_bytes,
            shutdown_grace: args.shutdown_grace,
            stream_window_bytes: args.stream_window_bytes,
            connection_window_bytes: args.connection_window_bytes,
            tls_cert: args.tls_cert,
            tls_key: args.tls_key,
            tls_client_ca: args.tls_client_ca,
            auth_token_file: args.auth_token_file,
            metrics_addr: args.metrics_addr,
            stream_idle_timeout: args.stream_idle_timeout,
            max_connections: args.max_connections,
            max_connection_streams: args.max_connection_streams,
            max_message_bytes: args.max_message_bytes,
            keepalive: args.keepalive,
        }
    }
}

/// Serves until SIGTERM or SIGINT; the exit code says how it went (2: bad configuration).
pub async fn run(config: ServeConfig) -> ExitCode {
    let (addr, metrics_addr) = (config.addr, config.metrics_addr);
    let server = match Server::new(config) {
        Ok(server) => server,
        Err(error) => {
            tracing::error!(%error, "invalid configuration");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%addr, %error, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    let metrics_listener = match metrics_addr {
        None => None,
        Some(metrics_addr) => match tokio::net::TcpListener::bind(metrics_addr).await {
            Ok(listener) => Some(listener),
            Err(error) => {
                tracing::error!(%metrics_addr, %error, "cannot listen for metrics");
                return ExitCode::FAILURE;
            }
        },
    };
    let addr = listener.local_addr().expect("bound address");
    // Scripts and tests read the port from this first stdout line (and the metrics port
    // from the second, when there is one): one write, so both are there when one is read.
    let mut banner = format!("weightinit listening on {addr}\n");
    let metrics_task = metrics_listener.map(|metrics_listener| {
        let metrics_addr = metrics_listener.local_addr().expect("bound address");
        banner.push_str(&format!(
            "weightinit metrics on http://{metrics_addr}/metrics\n"
        ));
        tracing::info!(%metrics_addr, "metrics: GET /metrics");
        server.serve_metrics(metrics_listener)
    });
    print!("{banner}");
    tracing::info!(%addr, "serving");
    let reload_task = tokio::spawn(reload_on_sighup(server.reloader()));
    let result = server.run(listener, shutdown_signal()).await;
    reload_task.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(%error, "server failed");
            ExitCode::FAILURE
        }
    }
}

/// Reads the TLS and token files again on every SIGHUP (certificate or token rotation).
async fn reload_on_sighup(reloader: Reloader) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    while hangup.recv().await.is_some() {
        match reloader.reload() {
            Ok(()) => tracing::info!("SIGHUP: TLS and token files reloaded"),
            Err(error) => {
                tracing::error!(%error, "SIGHUP: reload failed; the previous files stay in use")
            }
        }
    }
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use clap::{Args, FromArgMatches};

    use super::*;

    #[test]
    fn flags_default_to_the_library_defaults() {
        // Without their variables, so that a WEIGHTINIT_* set around the test changes nothing.
        let command = ServeArgs::augment_args(clap::Command::new("weightinit"))
            .mut_args(|arg| arg.env(None::<&str>));
        let matches = command.get_matches_from(["weightinit"]);
        let args = ServeArgs::from_arg_matches(&matches).unwrap();
        assert_eq!(ServeConfig::from(args), ServeConfig::default());
    }
}
