//! TLS for the gRPC port (rustls): the server's certificate and key, and optionally a CA
//! that every client certificate must chain to (mutual TLS).
//!
//! Files are read and parsed once at startup, so that a wrong path, a key that does not
//! match its certificate or a CA file without a certificate stops the server with a message
//! naming the flag, instead of failing every handshake later.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// A TLS handshake must finish within this, or its connection is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What TLS was configured with, for the startup log.
#[derive(Clone, Debug)]
pub struct TlsSummary {
    pub cert: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// The TLS configuration of `--tls-cert`, `--tls-key` and `--tls-client-ca`; `None` when
/// none of them is given (plaintext).
pub fn server_config(
    cert: Option<&Path>,
    key: Option<&Path>,
    client_ca: Option<&Path>,
) -> Result<Option<(ServerTlsConfig, TlsSummary)>, String> {
    let (cert_path, key_path) = match (cert, key) {
        (None, None) => {
            return match client_ca {
                None => Ok(None),
                Some(_) => Err(
                    "--tls-client-ca needs TLS: give --tls-cert and --tls-key as well".to_owned(),
                ),
            };
        }
        (Some(cert), Some(key)) => (cert, key),
        (Some(_), None) => {
            return Err("--tls-cert needs --tls-key (the certificate's private key)".into());
        }
        (None, Some(_)) => {
            return Err("--tls-key needs --tls-cert (the certificate it belongs to)".into());
        }
    };
    let cert = read_pem("--tls-cert", cert_path, &["CERTIFICATE"])?;
    let key = read_pem(
        "--tls-key",
        key_path,
        &["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"],
    )?;
    let mut config = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(ca_path) = client_ca {
        let ca = read_pem("--tls-client-ca", ca_path, &["CERTIFICATE"])?;
        config = config.client_ca_root(Certificate::from_pem(ca));
    }
    // Building the acceptor parses everything and checks that the key fits the certificate.
    if let Err(error) = tonic::transport::Server::builder().tls_config(config.clone()) {
        let mut reason = error_chain(&error);
        if reason.contains("KeyMismatch") {
            reason = "the private key does not belong to the certificate".to_owned();
        }
        return Err(format!(
            "--tls-cert {} / --tls-key {}{}: {}",
            cert_path.display(),
            key_path.display(),
            client_ca.map_or(String::new(), |p| format!(
                " / --tls-client-ca {}",
                p.display()
            )),
            reason
        ));
    }
    Ok(Some((
        config,
        TlsSummary {
            cert: cert_path.to_owned(),
            client_ca: client_ca.map(Path::to_owned),
        },
    )))
}

/// Reads a PEM file that must hold at least one block whose label ends in one of `labels`.
fn read_pem(flag: &str, path: &Path, labels: &[&str]) -> Result<Vec<u8>, String> {
    let content =
        std::fs::read(path).map_err(|e| format!("{flag} {}: cannot read: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&content);
    let found = text.lines().any(|line| {
        line.strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|label| labels.contains(&label))
    });
    if !found {
        return Err(format!(
            "{flag} {}: no PEM block of type {} found",
            path.display(),
            labels.join(" or ")
        ));
    }
    Ok(content)
}

/// An error and its sources, `a: b: c`.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}
