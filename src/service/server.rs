//! The server: configuration, the gRPC services (WeightInit, health, reflection) and
//! graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::handler::{Handler, Shared};
use super::pool::WorkerPool;
use crate::engine::Limits;
use crate::proto::{self, weight_init_server::WeightInitServer};

/// Everything `weightinit serve` can be told; each flag has a WEIGHTINIT_* twin.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeConfig {
    /// Address to listen on.
    #[arg(long, env = "WEIGHTINIT_ADDR", default_value = "0.0.0.0:50051")]
    pub addr: SocketAddr,
    /// Generation worker threads [default: all cores].
    #[arg(long, env = "WEIGHTINIT_WORKERS")]
    pub workers: Option<usize>,
    /// Chunk payload size when a request leaves chunk_bytes at 0.
    #[arg(long, env = "WEIGHTINIT_DEFAULT_CHUNK_BYTES", default_value_t = Limits::default().default_chunk_bytes)]
    pub default_chunk_bytes: u32,
    /// Largest chunk payload a request may ask for (grpcurl refuses messages over 4 MiB).
    #[arg(long, env = "WEIGHTINIT_MAX_CHUNK_BYTES", default_value_t = Limits::default().max_chunk_bytes)]
    pub max_chunk_bytes: u32,
    /// Largest output of one request, in bytes.
    #[arg(long, env = "WEIGHTINIT_MAX_REQUEST_BYTES", default_value_t = Limits::default().max_request_bytes)]
    pub max_request_bytes: u64,
    /// Most tensors in one request.
    #[arg(long, env = "WEIGHTINIT_MAX_TENSORS", default_value_t = Limits::default().max_tensors)]
    pub max_tensors: u32,
    /// Most Generate and Digest streams at once; beyond it: RESOURCE_EXHAUSTED.
    #[arg(long, env = "WEIGHTINIT_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,
    /// Largest tensor rank.
    #[arg(long, env = "WEIGHTINIT_MAX_RANK", default_value_t = Limits::default().max_rank)]
    pub max_rank: u32,
    /// Longest tensor name, in UTF-8 bytes.
    #[arg(long, env = "WEIGHTINIT_MAX_NAME_BYTES", default_value_t = Limits::default().max_name_bytes)]
    pub max_name_bytes: u32,
    /// How long in-flight streams may run after SIGTERM/SIGINT, e.g. 30s, 500ms, 2m.
    #[arg(long, env = "WEIGHTINIT_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// HTTP/2 flow-control window per stream, in bytes.
    #[arg(long, env = "WEIGHTINIT_STREAM_WINDOW_BYTES", default_value_t = 8 << 20)]
    pub stream_window_bytes: u32,
    /// HTTP/2 flow-control window per connection, in bytes.
    #[arg(long, env = "WEIGHTINIT_CONNECTION_WINDOW_BYTES", default_value_t = 16 << 20)]
    pub connection_window_bytes: u32,
}

impl Default for ServeConfig {
    fn default() -> Self {
        use clap::{Args, Command, FromArgMatches};
        let matches =
            ServeConfig::augment_args(Command::new("weightinit")).get_matches_from(["weightinit"]);
        ServeConfig::from_arg_matches(&matches).expect("defaults parse")
    }
}

/// Parses `30s`, `500ms`, `2m` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((text, "s"), |i| text.split_at(i));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("not a duration: {text:?}"))?;
    let seconds = match unit {
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("unknown unit in {text:?}: use ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| e.to_string())
}

/// A configuration that cannot work.
#[derive(Debug)]
pub struct ConfigError(String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl ServeConfig {
    fn limits(&self) -> Result<Limits, ConfigError> {
        let limits = Limits {
            default_chunk_bytes: self.default_chunk_bytes,
            max_chunk_bytes: self.max_chunk_bytes,
            max_request_bytes: self.max_request_bytes,
            max_tensors: self.max_tensors,
            max_rank: self.max_rank,
            max_name_bytes: self.max_name_bytes,
        };
        if limits.default_chunk_bytes < 8 || limits.default_chunk_bytes > limits.max_chunk_bytes {
            return Err(ConfigError(format!(
                "--default-chunk-bytes must be between 8 and --max-chunk-bytes ({}), got {}",
                limits.max_chunk_bytes, limits.default_chunk_bytes
            )));
        }
        if self.max_concurrent_streams == 0 || self.workers == Some(0) {
            return Err(ConfigError(
                "--max-concurrent-streams and --workers must be at least 1".into(),
            ));
        }
        Ok(limits)
    }

    fn worker_count(&self) -> usize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

/// A configured server, ready to run on a listener.
pub struct Server {
    config: ServeConfig,
    shared: Arc<Shared>,
}

impl Server {
    pub fn new(config: ServeConfig) -> Result<Self, ConfigError> {
        let limits = config.limits()?;
        let pool = Arc::new(WorkerPool::new(config.worker_count()));
        let shared = Arc::new(Shared::new(limits, config.max_concurrent_streams, pool));
        Ok(Self { config, shared })
    }

    /// Live counters of this server (active streams, busy workers).
    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Serves on `listener` until `shutdown` completes, then reports NOT_SERVING, stops
    /// accepting, and lets in-flight streams finish for up to the grace period.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::Serving).await;
        let reflection_v1 = reflection().build_v1().expect("valid descriptors");
        let reflection_v1alpha = reflection().build_v1alpha().expect("valid descriptors");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tonic::transport::Server::builder()
            .initial_stream_window_size(self.config.stream_window_bytes)
            .initial_connection_window_size(self.config.connection_window_bytes)
            .tcp_nodelay(true)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(WeightInitServer::new(Handler::new(self.shared)))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            });
        tokio::pin!(serving);
        tokio::select! {
            result = &mut serving => return result,
            () = shutdown => {}
        }
        tracing::info!(grace = ?self.config.shutdown_grace, "shutting down: NOT_SERVING, draining streams");
        set_health(&health, ServingStatus::NotServing).await;
        let _ = stop.send(());
        match tokio::time::timeout(self.config.shutdown_grace, serving).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!("grace period over: closing the streams still running");
                Ok(())
            }
        }
    }
}

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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = ServeConfig::default();
        assert_eq!(config.addr, "0.0.0.0:50051".parse().unwrap());
        assert_eq!(config.default_chunk_bytes, 1 << 20);
        assert!(config.max_chunk_bytes < 4 << 20);
        assert_eq!(config.max_concurrent_streams, 256);
        assert_eq!(config.shutdown_grace, Duration::from_secs(30));
        assert!(config.limits().is_ok());
    }
}
