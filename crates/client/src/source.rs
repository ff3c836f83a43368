//! Where the client commands get their tensors: a request file (with command-line overrides)
//! and a [`Server`], remote over gRPC or the engine in this process (`--local`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::local::LocalServer;
use super::remote::Remote;
use super::target::{Caller, ClientSecurity, Refusal, Unreachable};
use weightinit_proto::{
    self as proto, DescribeResponse, DigestResponse, GenerateRequest, GenerateResponse,
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
    /// Generate in this process instead of asking a server (offline use, or to check one):
    /// the engine on all cores, as the Python package's target "local"; --server is then
    /// ignored.
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

    /// The server asked: [`LocalServer`] with --local, else the one at --server.
    pub fn source(&self) -> Result<Box<dyn Server>, SourceError> {
        if self.local {
            return Ok(Box::new(LocalServer));
        }
        let security = self.security.read()?;
        Ok(Box::new(Remote::new(
            &self.server,
            security,
            Caller::Cli("--server"),
        )?))
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

/// A server as `fetch` and `describe` see it: remote over gRPC ([`Remote`]), or the engine in
/// this process ([`LocalServer`]), so that both run the very same code against either, and
/// tests can wrap one to misbehave. The calls and answers are those of the gRPC service.
#[tonic::async_trait]
pub trait Server: Send + Sync {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status>;

    async fn describe(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<DescribeResponse>, Status>;

    async fn digest(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<DigestResponse>, Status>;
}

/// The messages of one Generate stream, whichever server sends them.
pub type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

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
