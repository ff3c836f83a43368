//! Server addresses as the clients take them, how to reach them (TLS, mutual TLS, a bearer
//! token: [`Security`], from PEM bytes; the command line's [`ClientSecurity`] reads its files
//! into one), and what to tell a person whose connection failed: the address, the cause, and
//! what to do about it, in the words of the caller ([`Caller`]: the command line's flags or
//! the Python package's arguments).
//!
//! Transport errors arrive as a chain (a status, a connect error, an I/O error, a TLS error
//! inside it); [`Unreachable::diagnose`] reads the chain for the few causes a person can act
//! on, so that `fetch`, `describe`, `healthcheck` and the Python package all say the same
//! thing.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, AlertDescription, CertificateError, InvalidMessage};
use tonic::codegen::http::uri::Authority;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

/// Whose words a message uses: the command line's flags or the Python package's arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The command line; the flag that names the server ("--server", "--addr").
    Cli(&'static str),
    /// weightinit's Python package: `target` and `security=Security(...)`.
    Python,
}

/// One of the options of [`Security`], for [`Caller::option`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    TlsCa,
    TlsCert,
    TlsKey,
    TlsServerName,
    /// The token, given as it is (Python's `token`).
    Token,
    /// The token, read from a file.
    TokenFile,
}

impl Caller {
    /// What names the server: "--server" (or "--addr"), or "target".
    pub fn server(self) -> &'static str {
        match self {
            Self::Cli(flag) => flag,
            Self::Python => "target",
        }
    }

    /// How to write server address `addr`: `--server ADDR`, or `'ADDR'`.
    fn write(self, addr: &str) -> String {
        match self {
            Self::Cli(flag) => format!("{flag} {addr}"),
            Self::Python => format!("'{addr}'"),
        }
    }

    /// The name of `option`: `--tls-ca`, or `tls_ca`.
    pub fn option(self, option: Setting) -> &'static str {
        let (flag, argument) = match option {
            Setting::TlsCa => ("--tls-ca", "tls_ca"),
            Setting::TlsCert => ("--tls-cert", "tls_cert"),
            Setting::TlsKey => ("--tls-key", "tls_key"),
            Setting::TlsServerName => ("--tls-server-name", "tls_server_name"),
            Setting::Token => ("--auth-token-file", "token"),
            Setting::TokenFile => ("--auth-token-file", "token_file"),
        };
        match self {
            Self::Cli(_) => flag,
            Self::Python => argument,
        }
    }

    /// How to give the CA: `--tls-ca CA.pem`, or `security=Security(tls_ca=...)`.
    fn give_ca(self) -> &'static str {
        match self {
            Self::Cli(_) => "--tls-ca CA.pem",
            Self::Python => "security=Security(tls_ca=...)",
        }
    }

    /// How to give a client certificate.
    fn give_identity(self) -> &'static str {
        match self {
            Self::Cli(_) => "--tls-cert and --tls-key",
            Self::Python => {
                "Security(tls_cert=..., tls_key=...) with the client's certificate and key"
            }
        }
    }

    /// How to drop every TLS option.
    fn without_tls(self) -> &'static str {
        match self {
            Self::Cli(_) => {
                "without --tls-ca, --tls-cert, --tls-key and --tls-server-name (and their \
                 WEIGHTINIT_ variables)"
            }
            Self::Python => {
                "without tls_ca, tls_cert, tls_key and tls_server_name in Security(...)"
            }
        }
    }

    /// How to start a server on `port`, or where to find the address.
    fn start_one(self, port: u16) -> String {
        let give = match self {
            Self::Cli(flag) => format!("give {flag}"),
            Self::Python => "pass as target".to_owned(),
        };
        format!(
            "start one (weightinit serve --addr 0.0.0.0:{port}) or {give} the address a server \
             prints when it starts"
        )
    }
}

/// Options or an address that cannot work, found before anything is dialled: the option at
/// fault (in the caller's words) and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Refusal {
    pub field: &'static str,
    pub message: String,
}

impl Refusal {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// A server address, as the URL to dial.
#[derive(Clone, Debug)]
pub struct Target {
    /// `http://HOST:PORT` or `https://HOST:PORT`.
    pub url: String,
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// Whose words to use in the fixes.
    pub caller: Caller,
}

impl Target {
    /// `addr` as `http://HOST:PORT`, `https://HOST:PORT` or `HOST:PORT` (plaintext, as
    /// `grpcurl -plaintext` takes it). With `tls` (a CA given), `http://` and `HOST:PORT` are
    /// dialled over TLS too. The port is required: a URL's scheme default (80, 443) is never
    /// where a weightinit server listens unless said so.
    pub fn parse(addr: &str, tls: bool, caller: Caller) -> Result<Self, Refusal> {
        let field = caller.server();
        let usage = || match caller {
            Caller::Cli(flag) => format!(
                "write {flag} HOST:PORT or http://HOST:PORT (plaintext), or https://HOST:PORT \
                 with --tls-ca (TLS), e.g. {flag} 127.0.0.1:50051"
            ),
            Caller::Python => "write 'HOST:PORT' or 'http://HOST:PORT' (plaintext), or \
                 'https://HOST:PORT' with security=Security(tls_ca=...), e.g. '127.0.0.1:50051'"
                .to_owned(),
        };
        let (scheme, rest) = match addr.split_once("://") {
            Some((scheme, rest)) => (Some(scheme), rest),
            None => (None, addr),
        };
        let tls = match scheme {
            None | Some("http") => tls,
            Some("https") => true,
            Some(other) => {
                return Err(Refusal::new(
                    field,
                    format!("{other}:// is not a scheme this client dials; {}", usage()),
                ));
            }
        };
        let not_an_address = || {
            Refusal::new(
                field,
                format!("{addr:?} is not a server address; {}", usage()),
            )
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let authority: Authority = match rest.parse() {
            Ok(authority) if !rest.contains(['/', '@']) && !rest.is_empty() => authority,
            _ => return Err(not_an_address()),
        };
        let host = authority.host().to_owned();
        let Some(port) = authority.port_u16().filter(|&port| port != 0) else {
            // Something after the host that is not a port number (the parser accepts "h:port").
            if rest.len() > host.len() + 1
                && !rest[host.len() + 1..].bytes().all(|b| b.is_ascii_digit())
            {
                return Err(not_an_address());
            }
            return Err(Refusal::new(
                field,
                format!(
                    "{addr:?} has no valid port; write {} (or the port the server listens on)",
                    caller.write(&format!("{host}:50051"))
                ),
            ));
        };
        let scheme = if tls { "https" } else { "http" };
        Ok(Self {
            url: format!("{scheme}://{host}:{port}"),
            host,
            port,
            tls,
            caller,
        })
    }

    /// `HOST:PORT`, as the Python package names a server.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
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
    /// The peer accepts connections but does not answer HTTP/2.
    Silent,
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
    pub async fn explain(status: &Status, target: &Target, security: &Security) -> Option<Self> {
        if let Some(found) = Self::diagnose(status, target) {
            return Some(found);
        }
        if !matches!(
            status.code(),
            Code::Unknown | Code::Cancelled | Code::Internal
        ) {
            return None;
        }
        let ca = security.tls_ca.as_ref().map(|ca| ca.bytes.as_slice());
        let identity = security.tls_cert.is_some();
        let cause = match (target.tls, ca) {
            (false, _) if speaks_tls(target).await => Cause::ServerSpeaksTls,
            (true, Some(ca)) if !identity && asks_for_certificate(target, ca).await => {
                Cause::ClientCertificate(AlertDescription::CertificateRequired)
            }
            // With TLS 1.3 a server refuses a client's certificate after the handshake.
            (true, Some(_)) if identity => {
                Cause::ClientCertificate(refuses_certificate(target, security).await?)
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
    /// The cause's name, for the Python package's exceptions.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::UnknownHost(_) => "unknown_host",
            Self::TimedOut => "timed_out",
            Self::Silent => "silent",
            Self::NoRoute(_) => "no_route",
            Self::ServerSpeaksTls => "speaks_tls",
            Self::ServerSpeaksPlaintext => "speaks_plaintext",
            Self::Certificate(_) => "certificate",
            Self::ClientCertificate(_) => "client_certificate",
            Self::Tls(_) => "tls",
        }
    }

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

/// The alert with which the TLS server at `target` refuses the client certificate of
/// `security`, if it does: after a handshake with it, the server's first answer to the HTTP/2
/// preface is that alert rather than HTTP/2.
async fn refuses_certificate(target: &Target, security: &Security) -> Option<AlertDescription> {
    use rustls::pki_types::ServerName;
    use std::sync::Arc;

    let (ca, cert, key) = (
        security.tls_ca.as_ref()?,
        security.tls_cert.as_ref()?,
        security.tls_key.as_ref()?,
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(CertificateDer::pem_slice_iter(&ca.bytes).flatten());
    let chain = CertificateDer::pem_slice_iter(&cert.bytes)
        .flatten()
        .collect();
    let key = PrivateKeyDer::from_pem_slice(&key.bytes).ok()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .ok()?;
    let host = target.host.trim_start_matches('[').trim_end_matches(']');
    let name = security.tls_server_name.as_deref().unwrap_or(host);
    let name = ServerName::try_from(name.to_owned()).ok()?;
    let ask = async {
        let stream = tokio::net::TcpStream::connect((host, target.port)).await?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let mut stream = connector.connect(name, stream).await?;
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await?;
        stream.read_exact(&mut [0u8; 1]).await
    };
    let Ok(Err(error)) = tokio::time::timeout(QUESTION_WAIT, ask).await else {
        return None;
    };
    match error.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => Some(*alert),
        _ => None,
    }
}

/// What a server answers an HTTP/2 connection preface with.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// A TLS record (an alert, or a handshake).
    Tls,
    /// Anything else, such as HTTP/2's SETTINGS frame.
    Other,
    /// Nothing within the wait: the connection is open, the peer silent.
    Nothing,
    /// The connection failed or closed.
    Failed,
}

/// How long a question to a server waits for its answer.
const QUESTION_WAIT: Duration = Duration::from_secs(2);

/// The first bytes the server at `target` answers the HTTP/2 connection preface with.
async fn answer(target: &Target) -> Answer {
    let host = target.host.trim_start_matches('[').trim_end_matches(']');
    let Ok(Ok(mut stream)) = tokio::time::timeout(
        QUESTION_WAIT,
        tokio::net::TcpStream::connect((host, target.port)),
    )
    .await
    else {
        return Answer::Failed;
    };
    let ask = async {
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await?;
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await?;
        Ok::<_, io::Error>(head)
    };
    match tokio::time::timeout(QUESTION_WAIT, ask).await {
        Ok(Ok([0x15 | 0x16, 0x03])) => Answer::Tls,
        Ok(Ok(_)) => Answer::Other,
        Ok(Err(_)) => Answer::Failed,
        Err(_) => Answer::Nothing,
    }
}

/// Whether the server at `target` answers the HTTP/2 connection preface with a TLS record
/// rather than with HTTP/2 (a SETTINGS frame, whose first byte, the top of its length, is 0).
async fn speaks_tls(target: &Target) -> bool {
    answer(target).await == Answer::Tls
}

/// The peer at `target` as [`Unreachable`] when it accepts connections but answers nothing
/// (an HTTP/2 server sends its SETTINGS at once, a TLS server an alert): a call to it would
/// otherwise wait for its deadline.
pub async fn silent(target: &Target) -> Option<Unreachable> {
    (answer(target).await == Answer::Nothing).then(|| Unreachable {
        target: target.clone(),
        cause: Cause::Silent,
    })
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Target {
            url,
            host,
            port,
            caller,
            ..
        } = &self.target;
        let server = caller.server();
        let ca = caller.option(Setting::TlsCa);
        let server_name = caller.option(Setting::TlsServerName);
        match &self.cause {
            Cause::Refused => write!(
                f,
                "connection refused at {url}: no server listens there; {}",
                caller.start_one(*port)
            ),
            Cause::UnknownHost(detail) => write!(
                f,
                "unknown host {host} in {server} {url} ({detail}); check the name, or give an \
                 IP address"
            ),
            Cause::TimedOut => write!(
                f,
                "no answer from {url}: connecting timed out; check the address in {server}, \
                 and that no firewall drops port {port}"
            ),
            Cause::Silent => write!(
                f,
                "no answer from {url}: it accepts connections but does not answer HTTP/2 \
                 (gRPC); check that {server} is a weightinit server's address"
            ),
            Cause::NoRoute(detail) => write!(
                f,
                "cannot reach {url} ({detail}); check the address in {server} and the network"
            ),
            Cause::ServerSpeaksTls => write!(
                f,
                "TLS mismatch at {url}: the server speaks TLS, this client plaintext; write \
                 {} with {} (the CA that signed the server's certificate)",
                caller.write(&format!("https://{host}:{port}")),
                caller.give_ca()
            ),
            Cause::ServerSpeaksPlaintext => write!(
                f,
                "TLS mismatch at {url}: the server speaks plaintext, this client TLS; write {} \
                 {}",
                caller.write(&format!("http://{host}:{port}")),
                caller.without_tls()
            ),
            Cause::Certificate(CertificateError::UnknownIssuer) => write!(
                f,
                "TLS at {url}: the server's certificate is not signed by the CA in {ca}; pass \
                 the CA that signed it"
            ),
            Cause::Certificate(
                error @ (CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. }),
            ) => write!(
                f,
                "TLS at {url}: the server's certificate does not have the name it was checked \
                 against ({error}); give {server_name} a name the certificate has"
            ),
            Cause::Certificate(error) => write!(
                f,
                "TLS at {url}: the server's certificate is refused: {error}; check {ca} and \
                 the server's certificate"
            ),
            Cause::ClientCertificate(alert) => write!(
                f,
                "TLS at {url}: the server refused this client ({alert:?}): it wants a client \
                 certificate signed by its --tls-client-ca; pass one from that CA: {}",
                caller.give_identity()
            ),
            Cause::Tls(error) => write!(
                f,
                "TLS at {url} failed: {error}; check {ca}, {}, {} and {server_name}",
                caller.option(Setting::TlsCert),
                caller.option(Setting::TlsKey),
            ),
        }
    }
}

impl StdError for Unreachable {}

/// PEM or token bytes, and the file they came from (none: given as they are).
#[derive(Clone, Debug)]
pub struct Given {
    pub bytes: Vec<u8>,
    pub path: Option<PathBuf>,
}

impl Given {
    /// The content of the file at `path`; a refusal naming `field` if it cannot be read.
    pub fn read(path: PathBuf, field: &'static str) -> Result<Self, Refusal> {
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Self {
                bytes,
                path: Some(path),
            }),
            Err(error) => Err(Refusal::new(
                field,
                format!("cannot read {}: {error}", path.display()),
            )),
        }
    }

    /// Where the bytes came from, for messages.
    fn origin(&self) -> String {
        self.path.as_ref().map_or_else(
            || "the bytes given".to_owned(),
            |path| path.display().to_string(),
        )
    }
}

/// How to reach a server that uses TLS, mutual TLS or a bearer token, from the PEM bytes and
/// the token (however the caller got them), checked by [`Self::check`] before anything is
/// dialled.
#[derive(Clone, Debug, Default)]
pub struct Security {
    /// The CA the server's certificate must chain to; turns TLS on.
    pub tls_ca: Option<Given>,
    /// The client's certificate and key, for mutual TLS: both or neither.
    pub tls_cert: Option<Given>,
    pub tls_key: Option<Given>,
    /// The name the server's certificate must have, instead of the target's host.
    pub tls_server_name: Option<String>,
    /// The bearer token (surrounding whitespace is dropped).
    pub token: Option<Given>,
}

/// The server's limits on a token: 1 to 4096 visible ASCII characters (it travels in a header).
const MAX_TOKEN_BYTES: usize = 4096;

impl Security {
    /// The target at `addr`, dialled over TLS when a CA is given, once every option is checked
    /// and found usable: a bad one is refused here, not in a handshake.
    pub fn target(&self, addr: &str, caller: Caller) -> Result<Target, Refusal> {
        let name = |setting| caller.option(setting);
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            let field = name(if self.tls_cert.is_some() {
                Setting::TlsKey
            } else {
                Setting::TlsCert
            });
            return Err(Refusal::new(
                field,
                format!(
                    "{} and {} go together: the client's certificate and its key",
                    name(Setting::TlsCert),
                    name(Setting::TlsKey)
                ),
            ));
        }
        if self.tls_ca.is_none() {
            let needs_ca = [
                (self.tls_cert.is_some(), Setting::TlsCert),
                (self.tls_server_name.is_some(), Setting::TlsServerName),
            ];
            if let Some(&(_, setting)) = needs_ca.iter().find(|(given, _)| *given) {
                return Err(Refusal::new(
                    name(setting),
                    format!(
                        "TLS options need {}, the CA that signed the server's certificate",
                        name(Setting::TlsCa)
                    ),
                ));
            }
        }
        let pem = |given: &Option<Given>, setting, what, found: fn(&[u8]) -> bool| match given {
            Some(given) if !found(&given.bytes) => Err(Refusal::new(
                name(setting),
                format!("no PEM {what} in {}", given.origin()),
            )),
            _ => Ok(()),
        };
        let certificate = |pem: &[u8]| CertificateDer::pem_slice_iter(pem).any(|c| c.is_ok());
        pem(&self.tls_ca, Setting::TlsCa, "certificate", certificate)?;
        pem(&self.tls_cert, Setting::TlsCert, "certificate", certificate)?;
        pem(&self.tls_key, Setting::TlsKey, "private key", |pem| {
            PrivateKeyDer::from_pem_slice(pem).is_ok()
        })?;
        self.authorization(caller)?;
        let target = Target::parse(addr, self.tls_ca.is_some(), caller)?;
        if target.tls && self.tls_ca.is_none() {
            return Err(Refusal::new(
                caller.server(),
                format!(
                    "{} is TLS and needs {} (the CA that signed the server's certificate); for \
                     plaintext write {}",
                    target.url,
                    caller.give_ca(),
                    caller.write(&format!("http://{}:{}", target.host, target.port))
                ),
            ));
        }
        Ok(target)
    }

    /// The `authorization` value to send, if there is a token.
    pub fn authorization(&self, caller: Caller) -> Result<Option<AsciiMetadataValue>, Refusal> {
        let Some(token) = &self.token else {
            return Ok(None);
        };
        let (field, whose) = match &token.path {
            Some(path) => (
                caller.option(Setting::TokenFile),
                format!("the token in {}", path.display()),
            ),
            None => (caller.option(Setting::Token), "the token".to_owned()),
        };
        let text = token.bytes.trim_ascii();
        if text.is_empty() {
            return Err(Refusal::new(field, format!("{whose} is empty")));
        }
        if text.len() > MAX_TOKEN_BYTES || !text.iter().all(|b| b.is_ascii_graphic()) {
            return Err(Refusal::new(
                field,
                format!(
                    "{whose} must be 1 to {MAX_TOKEN_BYTES} visible ASCII characters without \
                     spaces (it travels in a header)"
                ),
            ));
        }
        let value = format!("Bearer {}", String::from_utf8_lossy(text));
        // Visible ASCII is always a valid header value.
        Ok(AsciiMetadataValue::try_from(value).ok())
    }

    /// An endpoint for `target` (from [`Self::target`]), with TLS configured as asked.
    pub fn endpoint(&self, target: &Target) -> Result<Endpoint, Refusal> {
        let invalid =
            |error: &dyn StdError| Refusal::new(target.caller.server(), error.to_string());
        let endpoint = Endpoint::from_shared(target.url.clone()).map_err(|e| invalid(&e))?;
        if !target.tls {
            return Ok(endpoint);
        }
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &self.tls_ca {
            config = config.ca_certificate(Certificate::from_pem(&ca.bytes));
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            config = config.identity(Identity::from_pem(&cert.bytes, &key.bytes));
        }
        if let Some(name) = &self.tls_server_name {
            config = config.domain_name(name);
        }
        endpoint.tls_config(config).map_err(|e| invalid(&e))
    }
}

/// How to reach a server that uses TLS, mutual TLS or a bearer token, as the command line
/// gives it: files. The environment twins differ from the server's (`WEIGHTINIT_TLS_CERT` is
/// the server's own certificate), except the token file, which server and client share.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ClientSecurity {
    /// PEM CA certificate the server's certificate must chain to; turns TLS on
    /// (`http://` and `HOST:PORT` addresses are then dialled as `https://`).
    #[arg(long, env = "WEIGHTINIT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a server that requires one (mutual TLS); needs --tls-key.
    #[arg(long, env = "WEIGHTINIT_CLIENT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "WEIGHTINIT_CLIENT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Name the server's certificate must have [default: the host of the address].
    #[arg(long, env = "WEIGHTINIT_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// File holding the bearer token to send as `authorization: Bearer <token>`.
    #[arg(long, env = "WEIGHTINIT_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
}

impl ClientSecurity {
    /// The files' contents; a file that cannot be read is refused, naming its flag.
    pub fn read(&self) -> Result<Security, Refusal> {
        let read = |path: &Option<PathBuf>, flag| {
            path.clone().map(|path| Given::read(path, flag)).transpose()
        };
        Ok(Security {
            tls_ca: read(&self.tls_ca, "--tls-ca")?,
            tls_cert: read(&self.tls_cert, "--tls-cert")?,
            tls_key: read(&self.tls_key, "--tls-key")?,
            tls_server_name: self.tls_server_name.clone(),
            token: read(&self.auth_token_file, "--auth-token-file")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLI: Caller = Caller::Cli("--server");

    fn parse(addr: &str, tls: bool) -> Result<String, String> {
        Target::parse(addr, tls, CLI)
            .map(|t| t.url)
            .map_err(|e| e.to_string())
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
        assert_eq!(parse("https://h:2", false).unwrap(), "https://h:2");
        assert_eq!(parse("[::1]:9", false).unwrap(), "http://[::1]:9");
    }

    #[test]
    fn what_to_write_instead() {
        for (addr, says) in [
            ("localhost", "no valid port; write --server localhost:50051"),
            (
                "http://localhost",
                "no valid port; write --server localhost:50051",
            ),
            ("https://h", "no valid port; write --server h:50051"),
            ("h:99999", "no valid port"),
            ("grpc://h:1", "grpc:// is not a scheme"),
            ("unix:///tmp/s", "unix:// is not a scheme"),
            ("http://h:1/api", "not a server address"),
            ("", "not a server address"),
            ("h:port", "not a server address"),
        ] {
            let error = parse(addr, false).unwrap_err();
            assert!(error.starts_with("--server: "), "{addr}: {error}");
            assert!(error.contains(says), "{addr}: {error}");
            assert!(error.contains(":50051"), "{error}");
        }
        let python = Target::parse("http://localhost", false, Caller::Python).unwrap_err();
        assert_eq!(python.field, "target");
        assert!(
            python.message.contains("write 'localhost:50051'"),
            "{python}"
        );
    }

    #[test]
    fn options_are_checked_in_the_callers_words() {
        let given = |bytes: &[u8]| {
            Some(Given {
                bytes: bytes.to_vec(),
                path: None,
            })
        };
        let cert_only = Security {
            tls_ca: given(b"-----BEGIN CERTIFICATE-----"),
            tls_cert: given(b""),
            ..Default::default()
        };
        let refused = cert_only.target("h:1", Caller::Python).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "tls_key: tls_cert and tls_key go together: the client's certificate and its key"
        );
        let refused = cert_only.target("h:1", CLI).unwrap_err();
        assert!(
            refused
                .to_string()
                .starts_with("--tls-key: --tls-cert and --tls-key go together"),
            "{refused}"
        );
        let not_pem = Security {
            tls_ca: given(b"not a PEM"),
            ..Default::default()
        };
        let refused = not_pem.target("h:1", Caller::Python).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "tls_ca: no PEM certificate in the bytes given"
        );
        let spaced = Security {
            token: given(b" two words\n"),
            ..Default::default()
        };
        let refused = spaced.target("h:1", Caller::Python).unwrap_err();
        assert!(
            refused
                .to_string()
                .starts_with("token: the token must be 1 to 4096 visible ASCII"),
            "{refused}"
        );
        let https = Security::default()
            .target("https://h:1", Caller::Python)
            .unwrap_err();
        assert!(
            https
                .to_string()
                .contains("needs security=Security(tls_ca=...)"),
            "{https}"
        );
    }

    #[test]
    fn causes_in_a_chain() {
        let target = Target::parse("127.0.0.1:9", false, CLI).unwrap();
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

        let tls = Target::parse("h:9", true, Caller::Python).unwrap();
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
                .contains("write 'http://h:9' without tls_ca"),
            "{found}"
        );
        let mtls = Unreachable {
            target: tls,
            cause: Cause::ClientCertificate(AlertDescription::CertificateRequired),
        };
        assert!(mtls.to_string().ends_with("pass one from that CA: Security(tls_cert=..., tls_key=...) with the client's certificate and key"), "{mtls}");

        let other = io::Error::other("connection reset");
        assert!(Unreachable::diagnose(&other, &target).is_none());
    }
}
