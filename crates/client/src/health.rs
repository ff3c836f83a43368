//! `weightinit healthcheck`: asks a server's grpc.health.v1 whether it is SERVING, over
//! plaintext, TLS or mutual TLS ([`ClientSecurity`], which other client commands can reuse).

use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::target::{Target, Unreachable};

type Error = Box<dyn std::error::Error + Send + Sync>;

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
        let endpoint = Endpoint::from_shared(target.url.clone())?;
        if !target.tls {
            return Ok(endpoint);
        }
        let mut config = ClientTlsConfig::new();
        if let Some(path) = &self.tls_ca {
            config = config.ca_certificate(Certificate::from_pem(read("--tls-ca", path)?));
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            config = config.identity(Identity::from_pem(
                read("--tls-cert", cert)?,
                read("--tls-key", key)?,
            ));
        }
        if let Some(name) = &self.tls_server_name {
            config = config.domain_name(name.clone());
        }
        Ok(endpoint.tls_config(config)?)
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

fn read(flag: &str, path: &PathBuf) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()).into())
}

/// Whether the server at `addr` (e.g. `http://127.0.0.1:50051`) reports SERVING for
/// `service` ("" = the whole server) within `timeout`.
pub async fn is_serving(
    addr: &str,
    service: &str,
    timeout: Duration,
) -> Result<bool, Box<dyn std::error::Error>> {
    is_serving_with(addr, service, timeout, &ClientSecurity::default())
        .await
        .map_err(|e| e as Box<dyn std::error::Error>)
}

/// [`is_serving`] over TLS or with a token, as `security` says. Failures name the address
/// and the cause ([`Unreachable`]) when the connection is what failed.
pub async fn is_serving_with(
    addr: &str,
    service: &str,
    timeout: Duration,
    security: &ClientSecurity,
) -> Result<bool, Error> {
    let target = security.target(addr, "--addr")?;
    let channel = security
        .endpoint(&target)?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| match Unreachable::diagnose(&e, &target) {
            Some(unreachable) => Box::new(unreachable) as Error,
            None => chain(&e).into(),
        })?;
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: service.to_owned(),
    });
    if let Some(value) = security.authorization()? {
        request.metadata_mut().insert("authorization", value);
    }
    let response = match HealthClient::new(channel).check(request).await {
        Ok(response) => response,
        Err(status) => {
            return Err(
                match Unreachable::explain(&status, &target, security).await {
                    Some(unreachable) => Box::new(unreachable),
                    None => format!("{:?}: {}", status.code(), status.message()).into(),
                },
            );
        }
    };
    Ok(response.into_inner().status == ServingStatus::Serving as i32)
}

/// An error and its causes, `a: b: c` (a transport error alone says only "transport error"),
/// without the repetitions of wrappers that print their cause too.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}
