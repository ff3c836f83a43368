//! Where the client commands get their tensors: a request file (with command-line overrides)
//! and a server, remote over gRPC or the service itself in this process (`--local`).
//!
//! Both kinds of server are seen through the generated `WeightInit` trait, so `fetch` and
//! `describe` run the very same code against either, and tests can wrap one to misbehave.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::remote::Remote;
use super::target::{Caller, ClientSecurity, Refusal, Unreachable};
use weightinit_engine::Limits;
use weightinit_service::handler::Handler;
use weightinit_service::proto::weight_init_server::WeightInit;
use weightinit_service::proto::{
    self, DescribeResponse, DigestResponse, GenerateRequest, GenerateResponse, GetInfoRequest,
    ServerInfo,
};

/// The request and the server: flags shared by `fetch` and `describe`.
#[derive(clap::Args, Debug)]
pub struct SourceArgs {
    /// Server address: HOST:PORT or http://HOST:PORT (plaintext), https://HOST:PORT (TLS,
    /// with --tls-ca).
    #[arg(
        long,
        env = "WEIGHTINIT_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,
    /// Generate in this process instead of asking a server (offline use, or to check one);
    /// --server is then ignored.
    #[arg(long)]
    pub local: bool,
    /// GenerateRequest in proto3 JSON, as grpcurl -d takes it; "-" reads stdin.
    #[arg(long)]
    pub request: PathBuf,
    /// Replaces the request's seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Replaces the request's default dtype (tensors that set their own keep it).
    #[arg(long)]
    pub dtype: Option<DTypeArg>,
    #[command(flatten)]
    pub security: ClientSecurity,
}

/// The dtypes as `--dtype` spells them.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum DTypeArg {
    Float32,
    Float64,
    Float16,
    Bfloat16,
}

impl From<DTypeArg> for proto::DType {
    fn from(dtype: DTypeArg) -> Self {
        match dtype {
            DTypeArg::Float32 => Self::DtypeFloat32,
            DTypeArg::Float64 => Self::DtypeFloat64,
            DTypeArg::Float16 => Self::DtypeFloat16,
            DTypeArg::Bfloat16 => Self::DtypeBfloat16,
        }
    }
}

/// Why the request or the server address cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a GenerateRequest in proto3 JSON: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// The server address, TLS files or token cannot be used.
    #[error("cannot use the server: {0}")]
    Server(#[from] Refusal),
}

impl SourceArgs {
    /// The request file with the overrides applied.
    pub fn request(&self) -> Result<GenerateRequest, SourceError> {
        let mut request = read_request(&self.request)?;
        if let Some(seed) = self.seed {
            request.seed = seed;
        }
        if let Some(dtype) = self.dtype {
            request.dtype = proto::DType::from(dtype).into();
        }
        Ok(request)
    }

    pub fn source(&self) -> Result<Source, SourceError> {
        if self.local {
            Ok(Source::local())
        } else {
            Ok(Source::remote(&self.server, &self.security)?)
        }
    }
}

fn read_request(path: &Path) -> Result<GenerateRequest, SourceError> {
    let text = if path == Path::new("-") {
        let mut text = Vec::new();
        std::io::stdin().read_to_end(&mut text).map(|_| text)
    } else {
        std::fs::read(path)
    }
    .map_err(|source| SourceError::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| SourceError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// A server: over gRPC, or the service's own handler running in this process.
pub enum Source {
    Remote(Box<Remote>),
    Local(Handler),
}

impl Source {
    /// A server at `url` (given by --server), reached as `security` says; connects on first
    /// use and reconnects after a failure.
    pub fn remote(url: &str, security: &ClientSecurity) -> Result<Self, Refusal> {
        let remote = Remote::new(url, security.read()?, Caller::Cli("--server"))?;
        Ok(Self::Remote(Box::new(remote)))
    }

    /// The service in this process, with the default limits and a worker per core.
    pub fn local() -> Self {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::Local(Handler::in_process(Limits::default(), workers))
    }
}

/// The messages of one Generate stream, whichever server sends them.
pub type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl WeightInit for Source {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        Ok(match self {
            Self::Remote(remote) => remote
                .generate(request)
                .await?
                .map(|s| Box::pin(s) as GenerateStream),
            Self::Local(handler) => handler
                .generate(request)
                .await?
                .map(|s| Box::pin(s) as GenerateStream),
        })
    }

    async fn describe(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        match self {
            Self::Remote(remote) => remote.describe(request).await,
            Self::Local(handler) => handler.describe(request).await,
        }
    }

    async fn digest(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<DigestResponse>, Status> {
        match self {
            Self::Remote(remote) => remote.digest(request).await,
            Self::Local(handler) => handler.digest(request).await,
        }
    }

    async fn get_info(
        &self,
        request: Request<GetInfoRequest>,
    ) -> Result<Response<ServerInfo>, Status> {
        match self {
            Self::Remote(remote) => remote.get_info(request).await,
            Self::Local(handler) => handler.get_info(request).await,
        }
    }
}

/// A status as a person reads it: the code and the server's message, without the metadata;
/// a connection failure's explanation alone.
pub fn status_text(status: &Status) -> String {
    if unreachable(status).is_some() {
        return status.message().to_owned();
    }
    format!("{:?}: {}", status.code(), status.message())
}

/// The connection failure a status stands for, if [`Remote`] found one.
pub fn unreachable(status: &Status) -> Option<&Unreachable> {
    std::error::Error::source(status)?.downcast_ref()
}
