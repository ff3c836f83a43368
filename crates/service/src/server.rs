//! The server: configuration, the gRPC services (WeightInit, health, reflection) behind
//! optional TLS and bearer token, connection and stream limits, metrics, and graceful
//! shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::auth::{RequireToken, TokenError, TokenFile};
use super::codec::DecodeLimits;
use super::handler::{Handler, Shared};
use super::listener::{self, Incoming};
use super::metrics::{self, Metrics};
use super::pipeline::{mib, panel_bytes_bound, stream_bytes_bound};
use super::tls::{Tls, TlsError};
use crate::proto::{self, weight_init_server::WeightInitServer};
use weightinit_engine::{Limits, whole_bytes_bound};

/// Everything a server can be told. The `weightinit serve` flags and their WEIGHTINIT_*
/// variables (src/serve.rs of the root package) fill it in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    /// Generation worker threads; `None` = one per core.
    pub workers: Option<usize>,
    pub default_chunk_bytes: u32,
    pub max_chunk_bytes: u32,
    pub max_request_bytes: u64,
    pub max_tensors: u32,
    /// Most Generate and Digest streams at once; beyond it: RESOURCE_EXHAUSTED.
    pub max_concurrent_streams: u32,
    pub max_rank: u32,
    pub max_name_bytes: u32,
    pub max_matrix_elements: u64,
    /// Largest CPU cost of one request, in element-equivalents.
    pub max_request_work: u64,
    /// Whole-tensor computations (QR, sparse selection) at once; `None` = half the workers.
    pub structured_jobs: Option<usize>,
    /// Memory of whole-tensor computations and of their results until made, in bytes;
    /// `None` = two of the largest that `max_matrix_elements` allows.
    pub structured_memory_bytes: Option<u64>,
    /// How long in-flight streams may run once shutdown begins.
    pub shutdown_grace: Duration,
    pub stream_window_bytes: u32,
    pub connection_window_bytes: u32,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// With it, clients must present a certificate signed by one of its CAs.
    pub tls_client_ca: Option<PathBuf>,
    pub auth_token_file: Option<PathBuf>,
    /// Where `weightinit serve` serves /metrics; `Server` itself only offers
    /// [`Server::serve_metrics`].
    pub metrics_addr: Option<SocketAddr>,
    /// Zero = never.
    pub stream_idle_timeout: Duration,
    pub max_connections: usize,
    pub max_connection_streams: u32,
    pub max_message_bytes: usize,
    /// Zero = no pings.
    pub keepalive: Duration,
}

/// How long a keepalive ping may go unanswered.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

impl Default for ServeConfig {
    fn default() -> Self {
        let limits = Limits::default();
        Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 50051)),
            workers: None,
            default_chunk_bytes: limits.default_chunk_bytes,
            max_chunk_bytes: limits.max_chunk_bytes,
            max_request_bytes: limits.max_request_bytes,
            max_tensors: limits.max_tensors,
            max_concurrent_streams: 256,
            max_rank: limits.max_rank,
            max_name_bytes: limits.max_name_bytes,
            max_matrix_elements: limits.max_matrix_elements,
            max_request_work: limits.max_request_work,
            structured_jobs: None,
            structured_memory_bytes: None,
            shutdown_grace: Duration::from_secs(30),
            stream_window_bytes: 8 << 20,
            connection_window_bytes: 16 << 20,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            auth_token_file: None,
            metrics_addr: None,
            stream_idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_connection_streams: 128,
            max_message_bytes: 4 << 20,
            keepalive: Duration::from_secs(60),
        }
    }
}

/// A configuration that cannot work; the message names the flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Limit(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("--auth-token-file: {0}")]
    Token(#[from] TokenError),
}

impl ServeConfig {
    fn limits(&self) -> Result<Limits, ConfigError> {
        let limits = Limits {
            default_chunk_bytes: self.default_chunk_bytes,
            max_chunk_bytes: self.max_chunk_bytes,
            max_request_bytes: self.max_request_bytes,
            max_tensors: self.max_tensors,
            max_rank: self.max_rank,
            max_name_bytes: self.max_name_bytes,
            max_matrix_elements: self.max_matrix_elements,
            max_request_work: self.max_request_work,
        };
        if limits.default_chunk_bytes < 8 || limits.default_chunk_bytes > limits.max_chunk_bytes {
            return Err(ConfigError::Limit(format!(
                "--default-chunk-bytes must be between 8 and --max-chunk-bytes ({}), got {}",
                limits.max_chunk_bytes, limits.default_chunk_bytes
            )));
        }
        if self.max_concurrent_streams == 0 || self.workers == Some(0) {
            return Err(ConfigError::Limit(
                "--max-concurrent-streams and --workers must be at least 1".into(),
            ));
        }
        let largest = whole_bytes_bound(self.max_matrix_elements);
        let memory = self.structured_memory_bytes();
        if memory < largest || mib(memory) > u32::MAX.into() {
            return Err(ConfigError::Limit(format!(
                "--structured-memory-bytes must hold the largest whole-tensor computation that \
                 --max-matrix-elements allows ({largest} bytes) and be under 4 PiB, got {memory}"
            )));
        }
        if self.structured_jobs == Some(0) {
            return Err(ConfigError::Limit(
                "--structured-jobs must be at least 1".into(),
            ));
        }
        if self.max_connections == 0 || self.max_connection_streams == 0 {
            return Err(ConfigError::Limit(
                "--max-connections and --max-connection-streams must be at least 1".into(),
            ));
        }
        if self.max_message_bytes < 1024 {
            return Err(ConfigError::Limit(format!(
                "--max-message-bytes must be at least 1024, got {}",
                self.max_message_bytes
            )));
        }
        Ok(limits)
    }

    fn tls(&self) -> Result<Option<Arc<Tls>>, ConfigError> {
        Tls::from_flags(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_client_ca.as_deref(),
        )
        .map(|tls| tls.map(Arc::new))
        .map_err(ConfigError::Tls)
    }

    fn token(&self) -> Result<Option<Arc<TokenFile>>, ConfigError> {
        let Some(path) = &self.auth_token_file else {
            return Ok(None);
        };
        Ok(Some(Arc::new(TokenFile::open(path)?)))
    }

    fn worker_count(&self) -> usize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Whole-tensor computations at once: each uses every core, so half the workers leave
    /// the other half's worth of CPU to plain streams.
    fn structured_job_count(&self) -> usize {
        self.structured_jobs
            .unwrap_or_else(|| (self.worker_count() / 2).max(1))
    }

    fn structured_memory_bytes(&self) -> u64 {
        self.structured_memory_bytes
            .unwrap_or_else(|| 2 * whole_bytes_bound(self.max_matrix_elements))
    }
}

/// A configured server, ready to run on a listener.
pub struct Server {
    config: ServeConfig,
    shared: Arc<Shared>,
    tls: Option<Arc<Tls>>,
    token: Option<Arc<TokenFile>>,
}

impl Server {
    /// Checks the whole configuration (limits, TLS files, token file) and starts the
    /// worker pool; every problem is a [`ConfigError`] naming the flag.
    pub fn new(config: ServeConfig) -> Result<Self, ConfigError> {
        let limits = config.limits()?;
        let tls = config.tls()?;
        let token = config.token()?;
        let shared = Shared::new(
            limits,
            config.worker_count(),
            config.max_concurrent_streams,
            config.stream_idle_timeout,
            (
                config.structured_job_count(),
                config.structured_memory_bytes(),
            ),
        );
        Ok(Self {
            config,
            shared: Arc::new(shared),
            tls,
            token,
        })
    }

    /// A handle that reads the TLS and token files again, e.g. on SIGHUP.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            tls: self.tls.clone(),
            token: self.token.clone(),
            metrics: Arc::clone(&self.shared.metrics),
        }
    }

    /// Live counters of this server (active streams, busy workers, metrics).
    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Serves the metrics endpoint on `listener` (see [`metrics::serve`]) until the returned
    /// task is aborted.
    pub fn serve_metrics(&self, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let shared = self.shared();
        tokio::spawn(metrics::serve(listener, move || shared.render_metrics()))
    }

    /// Serves on `listener` until `shutdown` completes, then reports NOT_SERVING, stops
    /// accepting, and lets in-flight streams finish for up to the grace period.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        let config = &self.config;
        let metrics = Arc::clone(&self.shared.metrics);
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::Serving).await;
        let reflection_v1 = self.guard(reflection().build_v1().expect("valid descriptors"));
        let reflection_v1alpha =
            self.guard(reflection().build_v1alpha().expect("valid descriptors"));
        let weightinit = self.guard(DecodeLimits::new(
            WeightInitServer::new(Handler::new(Arc::clone(&self.shared)))
                .max_decoding_message_size(config.max_message_bytes)
                // Clients may compress requests (bounded by the decoding limit once inflated);
                // responses are random floats, which do not compress: sent as they are.
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Zstd),
            self.shared.limits,
            Arc::clone(&metrics),
        ));
        let keepalive = (!config.keepalive.is_zero()).then_some(config.keepalive);
        let mut builder = tonic::transport::Server::builder()
            .initial_stream_window_size(config.stream_window_bytes)
            .initial_connection_window_size(config.connection_window_bytes)
            .max_concurrent_streams(config.max_connection_streams)
            .http2_keepalive_interval(keepalive)
            .http2_keepalive_timeout(keepalive.map(|_| KEEPALIVE_TIMEOUT));
        let connection_limit = listener::connection_limit(config.max_connections);
        self.log_security(connection_limit);
        let incoming = Incoming::new(listener, connection_limit, Arc::clone(&metrics));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = builder
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(weightinit);
        let stopped = async {
            let _ = stopped.await;
        };
        // Boxed: the TLS and plaintext futures differ in type.
        let mut serving: Pin<Box<dyn Future<Output = _> + Send>> = match &self.tls {
            Some(tls) => {
                let handshakes = tls.handshakes(incoming, Arc::clone(&metrics));
                Box::pin(router.serve_with_incoming_shutdown(handshakes, stopped))
            }
            None => Box::pin(router.serve_with_incoming_shutdown(incoming, stopped)),
        };
        tokio::select! {
            result = &mut serving => return result,
            () = shutdown => {}
        }
        tracing::info!(grace = ?self.config.shutdown_grace, "shutting down: NOT_SERVING, draining streams");
        metrics.set_draining();
        set_health(&health, ServingStatus::NotServing).await;
        let _ = stop.send(());
        tokio::select! {
            result = &mut serving => return result,
            () = tokio::time::sleep(self.config.shutdown_grace) => {}
        }
        let streams = self.shared.active_streams();
        tracing::warn!(
            streams,
            "grace period over: cutting the streams still running"
        );
        self.shared.cut_streams();
        // Each stream ends at once: let it log, count and send its status.
        let logged = Instant::now() + Duration::from_secs(1);
        while self.shared.active_streams() > 0 && Instant::now() < logged {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

impl Server {
    /// `service` behind the bearer token, if one is configured.
    fn guard<S>(&self, service: S) -> RequireToken<S> {
        RequireToken::new(
            service,
            self.token.clone(),
            Arc::clone(&self.shared.metrics),
        )
    }

    fn log_security(&self, connection_limit: usize) {
        let tls = match &self.tls {
            None => "off",
            Some(tls) if tls.mutual() => "mutual (client certificates required)",
            Some(_) => "on",
        };
        let auth = if self.token.is_some() {
            "bearer token"
        } else {
            "off"
        };
        let workers = self.config.worker_count();
        tracing::info!(
            tls,
            auth,
            stream_memory_bytes = stream_bytes_bound(workers),
            panel_memory_bytes = panel_bytes_bound(workers),
            max_connections = connection_limit,
            max_connection_streams = self.config.max_connection_streams,
            stream_idle_timeout = ?self.config.stream_idle_timeout,
            "security and limits"
        );
        if self.token.is_some() && self.tls.is_none() {
            tracing::warn!(
                "--auth-token-file without TLS: the token crosses the network in clear text \
                 (fine behind a TLS-terminating proxy on a trusted network, not otherwise)"
            );
        }
    }
}

/// Reads a server's TLS and token files again while it serves.
#[derive(Clone)]
pub struct Reloader {
    tls: Option<Arc<Tls>>,
    token: Option<Arc<TokenFile>>,
    metrics: Arc<Metrics>,
}

impl Reloader {
    /// Reloads every file; each part that fails keeps what it had, and the error names
    /// its flag. New connections and calls see the new files, open connections keep theirs.
    pub fn reload(&self) -> Result<(), ReloadError> {
        let tls = self
            .tls
            .as_ref()
            .map(|tls| tls.reload().map_err(ConfigError::from));
        let token = self
            .token
            .as_ref()
            .map(|token| token.reload().map_err(ConfigError::from));
        let errors: Vec<ConfigError> = [tls, token]
            .into_iter()
            .flatten()
            .filter_map(Result::err)
            .collect();
        self.metrics.reloaded(errors.is_empty());
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ReloadError(errors))
        }
    }
}

/// The parts of a reload that failed (each kept what it had).
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct ReloadError(pub Vec<ConfigError>);

/// Health of the whole server ("") and of the WeightInit service.
async fn set_health(health: &HealthReporter, status: ServingStatus) {
    use tonic::server::NamedService;
    type Service = WeightInitServer<Handler>;
    health.set_service_status("", status).await;
    health
        .set_service_status(<Service as NamedService>::NAME, status)
        .await;
}

fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(proto::ERROR_DETAILS_DESCRIPTOR_SET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = ServeConfig::default();
        assert_eq!(config.addr, "0.0.0.0:50051".parse().unwrap());
        assert_eq!(config.default_chunk_bytes, 1 << 20);
        assert!(config.max_chunk_bytes < 4 << 20);
        assert_eq!(config.max_concurrent_streams, 256);
        assert_eq!(config.shutdown_grace, Duration::from_secs(30));
        assert_eq!(config.stream_idle_timeout, Duration::from_secs(60));
        assert_eq!(config.metrics_addr, None);
        assert!(config.tls_cert.is_none() && config.auth_token_file.is_none());
        assert!(config.limits().is_ok());
    }

    #[test]
    fn configuration_errors_name_the_flag() {
        let error = |configure: fn(&mut ServeConfig)| {
            let mut config = ServeConfig::default();
            configure(&mut config);
            Server::new(config).err().expect("refused").to_string()
        };
        assert!(error(|c| c.tls_cert = Some("/nonexistent/cert.pem".into())).contains("--tls-key"));
        assert!(error(|c| c.tls_key = Some("/nonexistent/key.pem".into())).contains("--tls-cert"));
        assert!(
            error(|c| c.tls_client_ca = Some("/nonexistent/ca.pem".into()))
                .contains("--tls-client-ca")
        );
        let missing = error(|c| {
            c.tls_cert = Some("/nonexistent/cert.pem".into());
            c.tls_key = Some("/nonexistent/key.pem".into());
        });
        assert!(
            missing.contains("--tls-cert /nonexistent/cert.pem: cannot read"),
            "{missing}"
        );
        assert!(
            error(|c| c.auth_token_file = Some("/nonexistent/token".into()))
                .contains("--auth-token-file: cannot read /nonexistent/token")
        );
        assert!(error(|c| c.max_connections = 0).contains("--max-connections"));
        assert!(error(|c| c.max_message_bytes = 10).contains("--max-message-bytes"));
    }
}
