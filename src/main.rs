//! The `weightinit` command: serve (the default), check a server's health, or fetch and
//! describe a request's tensors.

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use weightinit::client::describe::{self, DescribeArgs};
use weightinit::client::fetch::{self, FetchArgs, FetchError};
use weightinit::client::health;
use weightinit::client::target::ClientSecurity;
use weightinit::engine::Isa;
use weightinit::service::server::Reloader;
use weightinit::service::{ServeConfig, Server};

#[derive(Parser)]
#[command(
    version,
    about = "Byte-identical initial weights for distributed trainers, over gRPC"
)]
struct Cli {
    /// Log line format (logs go to stderr; RUST_LOG filters, default info, warn for fetch
    /// and describe).
    #[arg(
        long,
        global = true,
        env = "WEIGHTINIT_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Caps the instruction set of the engine's hot loops: baseline, avx2 or avx512 (default:
    /// the widest this CPU has). Every set makes the same bytes; this is for testing and
    /// measuring the narrower ones.
    #[arg(long, global = true, env = "WEIGHTINIT_ISA")]
    isa: Option<Isa>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API (what `weightinit` alone does, with defaults).
    Serve(ServeConfig),
    /// Exit 0 exactly when the server reports SERVING (for container health checks).
    Healthcheck {
        #[arg(
            long,
            env = "WEIGHTINIT_HEALTHCHECK_ADDR",
            default_value = "http://127.0.0.1:50051"
        )]
        addr: String,
        /// Service to ask about; "" is the whole server.
        #[arg(long, default_value = "")]
        service: String,
        #[arg(long, default_value = "3s", value_parser = weightinit::service::server::parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        security: ClientSecurity,
    },
    /// Stream a request's tensors into a safetensors file, .npy files or raw bytes, verified
    /// and resumed after interruptions.
    Fetch(FetchArgs),
    /// Print how every tensor of a request resolves (fans, distribution, sizes) as a table.
    Describe(DescribeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli
        .command
        .unwrap_or_else(|| Command::Serve(ServeConfig::default()));
    // The client commands report on their own; --local would log every RPC at info.
    let default_level = match command {
        Command::Fetch(_) | Command::Describe(_) => "warn",
        Command::Serve(_) | Command::Healthcheck { .. } => "info",
    };
    init_tracing(cli.log_format, default_level);
    if let Some(isa) = cli.isa {
        Isa::set_max(isa);
    }
    tracing::debug!(isa = %Isa::active(), "engine instruction set");
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match command {
        Command::Serve(config) => runtime.block_on(serve(config)),
        Command::Fetch(args) => match runtime.block_on(fetch::run(args)) {
            Err(error @ FetchError::Stopped(signal)) => {
                eprintln!("weightinit: {error}");
                ExitCode::from(signal.exit_code())
            }
            result => exit(result),
        },
        Command::Describe(args) => exit(runtime.block_on(describe::run(args))),
        Command::Healthcheck {
            addr,
            service,
            timeout,
            security,
        } => match runtime.block_on(health::is_serving_with(&addr, &service, timeout, &security)) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => {
                eprintln!("{addr}: NOT_SERVING");
                ExitCode::FAILURE
            }
            Err(error) => {
                eprintln!("{addr}: {error}");
                ExitCode::FAILURE
            }
        },
    }
}

fn exit<E: std::fmt::Display>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("weightinit: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: ServeConfig) -> ExitCode {
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

fn init_tracing(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
