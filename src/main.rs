//! The `weightinit` command: serve (the default), check a server's health, or fetch,
//! describe and digest a request's tensors.

#![forbid(unsafe_code)]

mod serve;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serve::ServeArgs;
use weightinit::client::describe::{self, DescribeArgs};
use weightinit::client::fetch::{self, FetchArgs, FetchError};
use weightinit::client::health;
use weightinit::client::target::ClientSecurity;
use weightinit::engine::Isa;

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
    Serve(ServeArgs),
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
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        security: ClientSecurity,
    },
    /// Stream a request's tensors into a safetensors file, .npy files or raw bytes, verified
    /// and resumed after interruptions.
    Fetch(FetchArgs),
    /// Print how every tensor of a request resolves (fans, distribution, sizes) as a table.
    Describe(DescribeArgs),
    /// Print every tensor's BLAKE3 digest as `HEX  NAME`, computed where the tensors are made
    /// (the server, or this process with --local) without transferring them.
    Digest(DescribeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli
        .command
        .unwrap_or_else(|| Command::Serve(ServeArgs::from_env()));
    // The client commands report on their own; --local would log every RPC at info.
    let default_level = match command {
        Command::Fetch(_) | Command::Describe(_) | Command::Digest(_) => "warn",
        Command::Serve(_) | Command::Healthcheck { .. } => "info",
    };
    init_tracing(cli.log_format, default_level);
    if let Some(isa) = cli.isa {
        Isa::set_max(isa);
    }
    tracing::debug!(isa = %Isa::active(), "engine instruction set");
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match command {
        Command::Serve(args) => runtime.block_on(serve::run(args.into())),
        Command::Fetch(args) => match runtime.block_on(fetch::run(args)) {
            Err(error @ FetchError::Stopped(signal)) => {
                eprintln!("weightinit: {error}");
                ExitCode::from(signal.exit_code())
            }
            result => exit(result),
        },
        Command::Describe(args) => exit(runtime.block_on(describe::run(args))),
        Command::Digest(args) => exit(runtime.block_on(describe::digest(args))),
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
