//! TLS for the gRPC port (rustls): the server's certificate and key, and optionally a CA
//! that every client certificate must chain to (mutual TLS).
//!
//! The files are read and checked at startup, so that a wrong path, a key that does not match
//! its certificate or a CA file without a certificate stops the server with a message naming
//! the flag. [`Tls::reload`] reads them again while serving (on SIGHUP): new handshakes use
//! the new files, open connections keep theirs, and files that do not load change nothing.
//!
//! Handshakes run here rather than in tonic so that the configuration can be swapped:
//! [`Handshakes`] turns accepted connections into TLS streams, each handshake in its own task
//! under a time limit, so that a slow client never holds up the others.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;

use super::metrics::Metrics;

/// A TLS handshake must finish within this, or its connection is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The files of `--tls-cert`, `--tls-key` and `--tls-client-ca`.
#[derive(Clone, Debug)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

/// The TLS side of the server: its files and the configuration last loaded from them.
pub struct Tls {
    files: Files,
    config: RwLock<Arc<ServerConfig>>,
}

/// Why the TLS files cannot be used; the message names the flag and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Flags that do not go together.
    #[error("{0}")]
    Flags(&'static str),
    #[error("{flag} {}: cannot read: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{flag} {}: no PEM block of type {labels} found", path.display())]
    NoPem {
        flag: &'static str,
        path: PathBuf,
        labels: String,
    },
    /// A file whose content rustls refuses.
    #[error("{flag} {}: {source}", path.display())]
    File {
        flag: &'static str,
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("--tls-cert {} / --tls-key {}: {}", cert.display(), key.display(), pair_reason(source))]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error(transparent)]
    Protocol(#[from] rustls::Error),
}

impl TlsError {
    fn file(
        flag: &'static str,
        path: &Path,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::File {
            flag,
            path: path.to_owned(),
            source: source.into(),
        }
    }
}

/// What is wrong with a certificate and key, in words for the commonest case.
fn pair_reason(error: &rustls::Error) -> String {
    match error.to_string() {
        text if text.contains("KeyMismatch") || text.contains("key mismatch") => {
            "the private key does not belong to the certificate".to_owned()
        }
        text => text,
    }
}

impl Tls {
    /// TLS as `--tls-cert`, `--tls-key` and `--tls-client-ca` say; `None` when none of them
    /// is given (plaintext).
    pub fn from_flags(
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
    ) -> Result<Option<Self>, TlsError> {
        let (cert, key) = match (cert, key) {
            (None, None) => {
                return match client_ca {
                    None => Ok(None),
                    Some(_) => Err(TlsError::Flags(
                        "--tls-client-ca needs TLS: give --tls-cert and --tls-key as well",
                    )),
                };
            }
            (Some(cert), Some(key)) => (cert, key),
            (Some(_), None) => {
                return Err(TlsError::Flags(
                    "--tls-cert needs --tls-key (the certificate's private key)",
                ));
            }
            (None, Some(_)) => {
                return Err(TlsError::Flags(
                    "--tls-key needs --tls-cert (the certificate it belongs to)",
                ));
            }
        };
        let files = Files {
            cert: cert.to_owned(),
            key: key.to_owned(),
            client_ca: client_ca.map(Path::to_owned),
        };
        let config = load(&files)?;
        Ok(Some(Self {
            files,
            config: RwLock::new(config),
        }))
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Reads the files again; on success new handshakes use them, on failure nothing changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = load(&self.files)?;
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(
            &self.config.read().unwrap_or_else(|e| e.into_inner()),
        ))
    }

    /// The TLS streams of the connections that `incoming` accepts; failed handshakes are
    /// counted in `metrics`.
    pub fn handshakes<S, C>(
        self: &Arc<Self>,
        incoming: S,
        metrics: Arc<Metrics>,
    ) -> Handshakes<S, C> {
        Handshakes {
            incoming: Some(incoming),
            tls: Arc::clone(self),
            pending: JoinSet::new(),
            metrics,
        }
    }
}

/// A rustls configuration from the files, checked whole: readable PEM of the right kinds, a
/// key that belongs to the certificate, a CA that can verify clients.
fn load(files: &Files) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_pem = read_pem("--tls-cert", &files.cert, &["CERTIFICATE"])?;
    let key_pem = read_pem(
        "--tls-key",
        &files.key,
        &["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"],
    )?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::file("--tls-cert", &files.cert, e))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| TlsError::file("--tls-key", &files.key, e))?;
    let provider = Arc::new(ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => builder.with_client_cert_verifier(client_verifier(path, provider)?),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Pair {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        })?;
    // gRPC runs over HTTP/2 only; clients such as grpc-go insist on negotiating it.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Verifies client certificates against the CA certificates in `path`.
fn client_verifier(
    path: &Path,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn tokio_rustls::rustls::server::danger::ClientCertVerifier>, TlsError> {
    let flag = "--tls-client-ca";
    let pem = read_pem(flag, path, &["CERTIFICATE"])?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| TlsError::file(flag, path, e))?;
        roots.add(cert).map_err(|e| TlsError::file(flag, path, e))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| TlsError::file(flag, path, e))
}

/// Reads a PEM file that must hold at least one block whose label is one of `labels`.
fn read_pem(flag: &'static str, path: &Path, labels: &[&str]) -> Result<Vec<u8>, TlsError> {
    let content = std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&content);
    let found = text.lines().any(|line| {
        line.strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|label| labels.contains(&label))
    });
    if !found {
        return Err(TlsError::NoPem {
            flag,
            path: path.to_owned(),
            labels: labels.join(" or "),
        });
    }
    Ok(content)
}

/// The connections of `incoming` once their TLS handshakes are done. A failed or timed-out
/// handshake only closes its connection.
pub struct Handshakes<S, C> {
    /// `None` once the listener has ended.
    incoming: Option<S>,
    tls: Arc<Tls>,
    pending: JoinSet<io::Result<TlsStream<C>>>,
    metrics: Arc<Metrics>,
}

impl<S, C> Stream for Handshakes<S, C>
where
    S: Stream<Item = io::Result<C>> + Unpin,
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Item = io::Result<TlsStream<C>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        // Start a handshake for every connection accepted meanwhile.
        while let Some(incoming) = this.incoming.as_mut() {
            match Pin::new(incoming).poll_next(cx) {
                Poll::Ready(Some(Ok(connection))) => {
                    let acceptor = this.tls.acceptor();
                    this.pending.spawn(async move {
                        let handshake = acceptor.accept(connection);
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                            Ok(stream) => stream,
                            Err(_) => Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "TLS handshake timed out",
                            )),
                        }
                    });
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => this.incoming = None,
                Poll::Pending => break,
            }
        }
        loop {
            match this.pending.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Ok(stream)))) => return Poll::Ready(Some(Ok(stream))),
                Poll::Ready(Some(Ok(Err(error)))) => {
                    this.metrics.tls_handshake_failed();
                    tracing::debug!(%error, "TLS handshake failed");
                }
                Poll::Ready(Some(Err(join_error))) => {
                    tracing::warn!(%join_error, "TLS handshake task failed");
                }
                Poll::Ready(None) if this.incoming.is_none() => return Poll::Ready(None),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}
