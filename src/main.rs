//! The `weightinit` command: serve (the default) or check a server's health.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use weightinit::client::health;
use weightinit::service::{ServeConfig, Server};

#[derive(Parser)]
#[command(
    version,
    about = "Byte-identical initial weights for distributed trainers, over gRPC"
)]
struct Cli {
    /// Log line format (logs go to stderr; RUST_LOG filters, default info).
    #[arg(
        long,
        global = true,
        env = "WEIGHTINIT_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match cli
        .command
        .unwrap_or_else(|| Command::Serve(ServeConfig::default()))
    {
        Command::Serve(config) => runtime.block_on(serve(config)),
        Command::Healthcheck {
            addr,
            service,
            timeout,
        } => match runtime.block_on(health::is_serving(&addr, &service, timeout)) {
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

async fn serve(config: ServeConfig) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(config.addr).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(addr = %config.addr, %error, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::new(config) {
        Ok(server) => server,
        Err(error) => {
            tracing::error!(%error, "invalid configuration");
            return ExitCode::from(2);
        }
    };
    let addr = listener.local_addr().expect("bound address");
    // Scripts and tests read the port from this first stdout line.
    println!("weightinit listening on {addr}");
    tracing::info!(%addr, "serving");
    match server.run(listener, shutdown_signal()).await {
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

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
