//! Server addresses as the client commands take them, how to reach them (TLS, mutual TLS, a
//! bearer token: [`ClientSecurity`]), and what to tell a person whose connection failed: the
//! address, the cause, and what to do about it.
//!
//! Transport errors arrive as a chain (a status, a connect error, an I/O error, a TLS error
//! inside it); [`Unreachable::diagnose`] reads the chain for the few causes a person can act
//! on, so that `fetch`, `describe` and `healthcheck` all say the same thing.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::{self, AlertDescription, CertificateError, InvalidMessage};
use tonic::codegen::http::uri::Authority;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

type Error = Box<dyn StdError + Send + Sync>;

/// A server address, as the URL to dial.
#[derive(Clone, Debug)]
pub struct Target {
    /// `http://HOST:PORT` or `https://HOST:PORT`.
    pub url: String,
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// The option that named the server ("--server", "--addr"), for the fixes.
    pub flag: &'static str,
}

impl Target {
    /// `addr` as `http://HOST:PORT`, `https://HOST:PORT` or `HOST:PORT` (plaintext, as
    /// `grpcurl -plaintext` takes it). With `tls` (TLS options given), `http://` and
    /// `HOST:PORT` are dialled over TLS too. A URL without a port has its scheme's (80, 443).
    pub fn parse(addr: &str, tls: bool, flag: &'static str) -> Result<Self, String> {
        let usage = || {
            format!(
                "write {flag} HOST:PORT or http://HOST:PORT (plaintext), or https://HOST:PORT \
                 with --tls-ca (TLS), e.g. {flag} 127.0.0.1:50051"
            )
        };
        let (scheme, rest) = match addr.split_once("://") {
            Some((scheme, rest)) => (Some(scheme), rest),
            None => (None, addr),
        };
        let tls = match scheme {
            None | Some("http") => tls,
            Some("https") => true,
            Some(other) => {
                return Err(format!(
                    "{other}:// is not a scheme this client dials; {}",
                    usage()
                ));
            }
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let authority: Authority = match rest.parse() {
            Ok(authority) if !rest.contains(['/', '@']) && !rest.is_empty() => authority,
            _ => return Err(format!("not a server address; {}", usage())),
        };
        // Something after the host that is not a port number (the parser accepts "h:port").
        if authority.port_u16().is_none() && rest.len() > authority.host().len() {
            return Err(format!("not a server address; {}", usage()));
        }
        let port = match (authority.port_u16(), scheme) {
            (Some(port), _) => port,
            (None, Some(_)) if tls => 443,
            (None, Some(_)) => 80,
            (None, None) => {
                return Err(format!(
                    "no port; write {flag} {}:50051 (or the port the server listens on)",
                    authority.host()
                ));
            }
        };
        let host = authority.host().to_owned();
        let scheme = if tls { "https" } else { "http" };
        Ok(Self {
            url: format!("{scheme}://{host}:{port}"),
            host,
            port,
            tls,
            flag,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

/// What went wrong with a connection, among the causes a person can act on.
#[derive(Debug)]
pub enum Cause {
    /// Nothing listens on the port.
    Refused,
    /// The host name does not resolve; the resolver's words.
    UnknownHost(String),
    TimedOut,
    /// No route to the host or its network; the system's words.
    NoRoute(String),
    /// A plaintext client at a TLS port.
    ServerSpeaksTls,
    /// A TLS client at a plaintext port.
    ServerSpeaksPlaintext,
    /// The server's certificate does not verify.
    Certificate(CertificateError),
    /// The server wants a client certificate (mutual TLS) and got none, or refused it.
    ClientCertificate(AlertDescription),
    /// Any other TLS failure.
    Tls(rustls::Error),
}

/// A server that could not be reached, and why.
#[derive(Debug)]
pub struct Unreachable {
    pub target: Target,
    pub cause: Cause,
}

impl Unreachable {
    /// The connection problem behind `error`, when it is one this module knows.
    pub fn diagnose(error: &(dyn StdError + 'static), target: &Target) -> Option<Self> {
        let cause = Cause::find(error, target.tls)?;
        Some(Self {
            target: target.clone(),
            cause,
        })
    }

    /// What a failed call to `target`, reached as `security` says, tells about the connection:
    /// [`Self::diagnose`], and for a call that failed the way a broken connection makes calls
    /// fail, a question to the server: over plaintext, whether it speaks TLS; over TLS without
    /// a client certificate, whether it asks for one. Both mismatches break the connection
    /// after it is made, and HTTP/2 reports that in ways that depend on timing.
    pub async fn explain(
        status: &Status,
        target: &Target,
        security: &ClientSecurity,
    ) -> Option<Self> {
        let ca = security
            .tls_ca
            .as_ref()
            .and_then(|path| std::fs::read(path).ok());
        Self::explain_pem(status, target, ca.as_deref(), security.tls_cert.is_some()).await
    }

    /// [`Self::explain`] for a client given its CA as PEM bytes, and whether it has a
    /// certificate of its own.
    pub async fn explain_pem(
        status: &Status,
        target: &Target,
        ca: Option<&[u8]>,
        identity: bool,
    ) -> Option<Self> {
        if let Some(found) = Self::diagnose(status, target) {
            return Some(found);
        }
        if !matches!(
            status.code(),
            Code::Unknown | Code::Cancelled | Code::Internal
        ) {
            return None;
        }
        let cause = match (target.tls, ca) {
            (false, _) if speaks_tls(target).await => Cause::ServerSpeaksTls,
            (true, Some(ca)) if !identity && asks_for_certificate(target, ca).await => {
                Cause::ClientCertificate(AlertDescription::CertificateRequired)
            }
            _ => return None,
        };
        Some(Self {
            target: target.clone(),
            cause,
        })
    }

    /// Whether another attempt may cure it: a starting or restarting server refuses
    /// connections for a moment, and a name may resolve once its service exists; a TLS
    /// mismatch or a bad certificate stays what it is.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.cause,
            Cause::Refused | Cause::UnknownHost(_) | Cause::TimedOut | Cause::NoRoute(_)
        )
    }
}

impl Cause {
    fn find(error: &(dyn StdError + 'static), tls: bool) -> Option<Self> {
        let mut texts = Vec::new();
        let mut io_kind = None;
        let mut tls_error = None;
        let mut next = Some(error);
        while let Some(error) = next {
            texts.push(error.to_string());
            if let Some(io) = error.downcast_ref::<io::Error>() {
                io_kind = io_kind.or(Some(io.kind()));
                // An I/O error's source() skips the error it wraps: look at it here.
                let inner = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
                tls_error = tls_error.or(inner.cloned());
            }
            if let Some(error) = error.downcast_ref::<rustls::Error>() {
                tls_error = tls_error.or(Some(error.clone()));
            }
            next = error.source();
        }
        let said = |what: &str| texts.iter().any(|t| t.contains(what));
        if let Some(error) = tls_error {
            return Some(match error {
                rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType) => {
                    Self::ServerSpeaksPlaintext
                }
                rustls::Error::InvalidCertificate(error) => Self::Certificate(error),
                rustls::Error::AlertReceived(
                    alert @ (AlertDescription::CertificateRequired
                    | AlertDescription::BadCertificate
                    | AlertDescription::UnknownCA),
                ) => Self::ClientCertificate(alert),
                error => Self::Tls(error),
            });
        }
        if said("dns error") {
            return Some(Self::UnknownHost(texts.pop().unwrap_or_default()));
        }
        match io_kind {
            Some(io::ErrorKind::ConnectionRefused) => return Some(Self::Refused),
            Some(io::ErrorKind::TimedOut) => return Some(Self::TimedOut),
            Some(io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable) => {
                return Some(Self::NoRoute(texts.pop().unwrap_or_default()));
            }
            _ => {}
        }
        // A TLS server answers an HTTP/2 preface with a TLS alert, whose record header,
        // read as an HTTP/2 frame header, declares a frame far over the size limit.
        if !tls && said("frame with invalid size") {
            return Some(Self::ServerSpeaksTls);
        }
        None
    }
}

/// Whether the TLS server at `target` asks for a client certificate in its handshake
/// (verified against `ca`, as the call was).
async fn asks_for_certificate(target: &Target, pem: &[u8]) -> bool {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Offers no certificate, and notes whether one was asked for.
    #[derive(Debug, Default)]
    struct Asked(AtomicBool);
    impl rustls::client::ResolvesClientCert for Asked {
        fn resolve(
            &self,
            _: &[&[u8]],
            _: &[rustls::SignatureScheme],
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            self.0.store(true, Ordering::Relaxed);
            None
        }
        fn has_certs(&self) -> bool {
            true
        }
    }

    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(CertificateDer::pem_slice_iter(pem).flatten());
    let asked = Arc::new(Asked::default());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Ok(builder) =
        rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()
    else {
        return false;
    };
    let config = builder
        .with_root_certificates(roots)
        .with_client_cert_resolver(asked.clone());
    let host = target.host.trim_start_matches('[').trim_end_matches(']');
    let Ok(name) = ServerName::try_from(host.to_owned()) else {
        return false;
    };
    let handshake = async {
        let stream = tokio::net::TcpStream::connect((host, target.port)).await?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        connector.connect(name, stream).await
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), handshake).await;
    asked.0.load(Ordering::Relaxed)
}

/// Whether the server at `target` answers the HTTP/2 connection preface with a TLS record
/// (an alert, or a handshake) rather than with HTTP/2 (a SETTINGS frame, whose first byte,
/// the top of its length, is 0).
async fn speaks_tls(target: &Target) -> bool {
    let host = target.host.trim_start_matches('[').trim_end_matches(']');
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect((host, target.port)).await?;
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await?;
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await?;
        Ok::<_, io::Error>(matches!(head, [0x15 | 0x16, 0x03]))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), ask).await,
        Ok(Ok(true))
    )
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Target {
            url,
            host,
            port,
            flag,
            ..
        } = &self.target;
        let plain = format!("http://{host}:{port}");
        let secure = format!("https://{host}:{port}");
        match &self.cause {
            Cause::Refused => write!(
                f,
                "connection refused at {url}: no server listens there; start one (weightinit \
                 serve --addr 0.0.0.0:{port}) or give {flag} the address a server prints when \
                 it starts"
            ),
            Cause::UnknownHost(detail) => write!(
                f,
                "unknown host {host} in {flag} {url} ({detail}); check the name, or give an IP \
                 address"
            ),
            Cause::TimedOut => write!(
                f,
                "no answer from {url}: connecting timed out; check the address in {flag}, and \
                 that no firewall drops port {port}"
            ),
            Cause::NoRoute(detail) => write!(
                f,
                "cannot reach {url} ({detail}); check the address in {flag} and the network"
            ),
            Cause::ServerSpeaksTls => write!(
                f,
                "TLS mismatch at {url}: the server speaks TLS, this client plaintext; write \
                 {flag} {secure} with --tls-ca CA.pem (the CA that signed the server's \
                 certificate)"
            ),
            Cause::ServerSpeaksPlaintext => write!(
                f,
                "TLS mismatch at {url}: the server speaks plaintext, this client TLS; write \
                 {flag} {plain} without --tls-ca, --tls-cert, --tls-key and \
                 --tls-server-name (and their WEIGHTINIT_ variables)"
            ),
            Cause::Certificate(CertificateError::UnknownIssuer) => write!(
                f,
                "TLS at {url}: the server's certificate is not signed by the CA in --tls-ca; \
                 pass the CA that signed it"
            ),
            Cause::Certificate(
                error @ (CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. }),
            ) => write!(
                f,
                "TLS at {url}: the server's certificate does not have the name it was checked \
                 against ({error}); give --tls-server-name a name the certificate has"
            ),
            Cause::Certificate(error) => write!(
                f,
                "TLS at {url}: the server's certificate is refused: {error}; check --tls-ca \
                 and the server's certificate"
            ),
            Cause::ClientCertificate(alert) => write!(
                f,
                "TLS at {url}: the server refused this client ({alert:?}): it wants a client \
                 certificate signed by its --tls-client-ca; pass --tls-cert and --tls-key"
            ),
            Cause::Tls(error) => write!(
                f,
                "TLS at {url} failed: {error}; check --tls-ca, --tls-cert, --tls-key and \
                 --tls-server-name"
            ),
        }
    }
}

impl StdError for Unreachable {}

/// How to reach a server that uses TLS, mutual TLS or a bearer token. The environment
/// twins differ from the server's (`WEIGHTINIT_TLS_CERT` is the server's own certificate),
/// except the token file, which server and client share.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ClientSecurity {
    /// PEM CA certificate the server's certificate must chain to; turns TLS on
    /// (`http://` and `HOST:PORT` addresses are then dialled as `https://`).
    #[arg(long, env = "WEIGHTINIT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a server that requires one (mutual TLS); needs --tls-key.
    #[arg(long, env = "WEIGHTINIT_CLIENT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "WEIGHTINIT_CLIENT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Name the server's certificate must have [default: the host of the address].
    #[arg(long, env = "WEIGHTINIT_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// File holding the bearer token to send as `authorization: Bearer <token>`.
    #[arg(long, env = "WEIGHTINIT_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
}

impl ClientSecurity {
    fn uses_tls(&self) -> bool {
        self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_server_name.is_some()
    }

    /// The server at `addr` (`HOST:PORT`, `http://HOST:PORT` or `https://HOST:PORT`), as
    /// given by `flag`, dialled over TLS when any TLS option is set.
    pub fn target(&self, addr: &str, flag: &'static str) -> Result<Target, Error> {
        let target = Target::parse(addr, self.uses_tls(), flag)?;
        if target.tls && self.tls_ca.is_none() {
            return Err(format!(
                "{} is TLS and needs --tls-ca (the CA that signed the server's certificate); \
                 for plaintext write {flag} http://{}:{}",
                target.url, target.host, target.port
            )
            .into());
        }
        Ok(target)
    }

    /// An endpoint for `target` with TLS configured as asked.
    pub fn endpoint(&self, target: &Target) -> Result<Endpoint, Error> {
        let ca = self
            .tls_ca
            .as_ref()
            .map(|path| read("--tls-ca", path))
            .transpose()?;
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some((read("--tls-cert", cert)?, read("--tls-key", key)?)),
            _ => None,
        };
        tls_endpoint(target, ca, identity, self.tls_server_name.clone())
    }

    /// The `authorization` value to send, if a token file is configured.
    pub fn authorization(&self) -> Result<Option<AsciiMetadataValue>, Error> {
        let Some(path) = &self.auth_token_file else {
            return Ok(None);
        };
        let content = String::from_utf8(read("--auth-token-file", path)?)
            .map_err(|_| format!("--auth-token-file {}: not UTF-8", path.display()))?;
        let value = MetadataValue::try_from(format!("Bearer {}", content.trim()))
            .map_err(|_| format!("--auth-token-file {}: not a valid token", path.display()))?;
        Ok(Some(value))
    }
}

/// An endpoint for `target`, with TLS from PEM bytes when it is a TLS target: the CA,
/// the client's (certificate, key) for mutual TLS, and the name the server's certificate must
/// have if not the target's host.
pub fn tls_endpoint(
    target: &Target,
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    server_name: Option<String>,
) -> Result<Endpoint, Error> {
    let endpoint = Endpoint::from_shared(target.url.clone())?;
    if !target.tls {
        return Ok(endpoint);
    }
    let mut config = ClientTlsConfig::new();
    if let Some(ca) = ca {
        config = config.ca_certificate(Certificate::from_pem(ca));
    }
    if let Some((cert, key)) = identity {
        config = config.identity(Identity::from_pem(cert, key));
    }
    if let Some(name) = server_name {
        config = config.domain_name(name);
    }
    Ok(endpoint.tls_config(config)?)
}

fn read(flag: &str, path: &PathBuf) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(addr: &str, tls: bool) -> Result<String, String> {
        Target::parse(addr, tls, "--server").map(|t| t.url)
    }

    #[test]
    fn addresses_with_and_without_a_scheme() {
        assert_eq!(
            parse("127.0.0.1:50051", false).unwrap(),
            "http://127.0.0.1:50051"
        );
        assert_eq!(parse("localhost:7", true).unwrap(), "https://localhost:7");
        assert_eq!(parse("http://h:1/", false).unwrap(), "http://h:1");
        assert_eq!(parse("http://h:1", true).unwrap(), "https://h:1");
        assert_eq!(parse("https://h", false).unwrap(), "https://h:443");
        assert_eq!(parse("[::1]:9", false).unwrap(), "http://[::1]:9");
        let target = Target::parse("http://example.com", false, "--addr").unwrap();
        assert_eq!((target.host.as_str(), target.port), ("example.com", 80));
    }

    #[test]
    fn what_to_write_instead() {
        for (addr, says) in [
            ("localhost", "no port; write --server localhost:50051"),
            ("grpc://h:1", "grpc:// is not a scheme"),
            ("unix:///tmp/s", "unix:// is not a scheme"),
            ("http://h:1/api", "not a server address"),
            ("", "not a server address"),
            ("h:port", "not a server address"),
        ] {
            let error = parse(addr, false).unwrap_err();
            assert!(error.contains(says), "{addr}: {error}");
            assert!(
                error.contains("127.0.0.1:50051") || error.contains(":50051"),
                "{error}"
            );
        }
    }

    #[test]
    fn causes_in_a_chain() {
        let target = Target::parse("127.0.0.1:9", false, "--server").unwrap();
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        let status = tonic::Status::from_error(Box::new(tonic::ConnectError(Box::new(refused))));
        let found = Unreachable::diagnose(&status, &target).unwrap();
        assert!(matches!(found.cause, Cause::Refused), "{found:?}");
        assert!(found.is_transient());
        assert!(
            found
                .to_string()
                .contains("connection refused at http://127.0.0.1:9")
        );

        let tls = Target::parse("h:9", true, "--server").unwrap();
        let wrapped = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType),
        );
        let found = Unreachable::diagnose(&wrapped, &tls).unwrap();
        assert!(matches!(found.cause, Cause::ServerSpeaksPlaintext));
        assert!(!found.is_transient());
        assert!(
            found
                .to_string()
                .contains("write --server http://h:9 without --tls-ca")
        );

        let other = io::Error::other("connection reset");
        assert!(Unreachable::diagnose(&other, &target).is_none());
    }
}
