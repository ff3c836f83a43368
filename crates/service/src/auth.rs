//! Bearer-token authentication: with `--auth-token-file`, WeightInit and reflection calls
//! must carry `authorization: Bearer <token>`; others get UNAUTHENTICATED before their
//! request is read. Health is never wrapped, so probes need no token.
//!
//! The presented token is hashed and the digests compared in constant time, so neither the
//! token's content nor its length can be learnt from response times. [`TokenFile::reload`]
//! reads the file again while serving (on SIGHUP), so that a token can be rotated.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::{Code, Status};

use super::metrics::{Metrics, Rpc};

/// The token clients must present.
pub struct Token {
    digest: [u8; 32],
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} holds no token", path.display())]
    Empty { path: PathBuf },
    #[error(
        "the token in {} must be 1 to 4096 visible ASCII characters without spaces \
         (it travels in an HTTP header)",
        path.display()
    )]
    Invalid { path: PathBuf },
}

impl Token {
    /// The token in `path`: its content without surrounding whitespace (a trailing newline
    /// is usual), at least 1 and at most 4096 visible ASCII characters.
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let path_buf = || path.to_owned();
        let content = std::fs::read(path).map_err(|source| TokenError::Read {
            path: path_buf(),
            source,
        })?;
        let token = content.trim_ascii();
        if token.is_empty() {
            return Err(TokenError::Empty { path: path_buf() });
        }
        if token.len() > 4096 || !token.iter().all(u8::is_ascii_graphic) {
            return Err(TokenError::Invalid { path: path_buf() });
        }
        if token.len() < 16 {
            tracing::warn!(
                path = %path.display(),
                "the bearer token is shorter than 16 characters: easy to guess"
            );
        }
        Ok(Self::new(token))
    }

    pub fn new(token: &[u8]) -> Self {
        Self {
            digest: Sha256::digest(token).into(),
        }
    }

    /// Checks an `authorization` header value; `Err` says what is wrong, for the client.
    pub fn check(&self, header: Option<&http::HeaderValue>) -> Result<(), &'static str> {
        let Some(value) = header else {
            return Err("this server needs `authorization: Bearer <token>`");
        };
        let value = value.as_bytes();
        let scheme = b"bearer ";
        if value.len() < scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return Err("the authorization header must be `Bearer <token>`");
        }
        let presented: [u8; 32] = Sha256::digest(value[scheme.len()..].trim_ascii()).into();
        if bool::from(presented.ct_eq(&self.digest)) {
            Ok(())
        } else {
            Err("the bearer token is not valid")
        }
    }
}

/// The token file of `--auth-token-file` and the token last read from it.
pub struct TokenFile {
    path: PathBuf,
    token: RwLock<Token>,
}

impl TokenFile {
    pub fn open(path: &Path) -> Result<Self, TokenError> {
        Ok(Self {
            path: path.to_owned(),
            token: RwLock::new(Token::from_file(path)?),
        })
    }

    /// Reads the file again; on failure the current token stays.
    pub fn reload(&self) -> Result<(), TokenError> {
        let token = Token::from_file(&self.path)?;
        *self.token.write().unwrap_or_else(|e| e.into_inner()) = token;
        Ok(())
    }

    /// [`Token::check`] against the current token.
    pub fn check(&self, header: Option<&http::HeaderValue>) -> Result<(), &'static str> {
        self.token
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .check(header)
    }
}

/// A gRPC service that answers UNAUTHENTICATED unless the request carries the token (when
/// one is configured; without, it only passes requests on).
#[derive(Clone)]
pub struct RequireToken<S> {
    inner: S,
    token: Option<Arc<TokenFile>>,
    metrics: Arc<Metrics>,
}

impl<S> RequireToken<S> {
    pub fn new(inner: S, token: Option<Arc<TokenFile>>, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            token,
            metrics,
        }
    }
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>;

impl<S, B> Service<http::Request<B>> for RequireToken<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(token) = &self.token
            && let Err(reason) = token.check(request.headers().get(http::header::AUTHORIZATION))
        {
            let rpc = Rpc::from_path(request.uri().path());
            self.metrics.rpc_refused(rpc, Code::Unauthenticated);
            tracing::info!(
                rpc = rpc.name(),
                path = request.uri().path(),
                reason,
                "rpc refused: unauthenticated"
            );
            let response = Status::unauthenticated(reason).into_http();
            return Box::pin(async move { Ok(response) });
        }
        Box::pin(self.inner.call(request))
    }
}

impl<S: NamedService> NamedService for RequireToken<S> {
    const NAME: &'static str = S::NAME;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(text: &str) -> http::HeaderValue {
        http::HeaderValue::from_str(text).unwrap()
    }

    #[test]
    fn checks_the_bearer_token() {
        let token = Token::new(b"s3cret-token-value");
        assert!(token.check(None).is_err());
        assert!(
            token
                .check(Some(&header("Bearer s3cret-token-value")))
                .is_ok()
        );
        assert!(
            token
                .check(Some(&header("bearer s3cret-token-value")))
                .is_ok()
        );
        assert!(
            token
                .check(Some(&header("Bearer s3cret-token-valuE")))
                .is_err()
        );
        assert!(
            token
                .check(Some(&header("Bearer s3cret-token-value2")))
                .is_err()
        );
        assert!(token.check(Some(&header("Bearer "))).is_err());
        assert!(
            token
                .check(Some(&header("Basic s3cret-token-value")))
                .is_err()
        );
        assert!(token.check(Some(&header("s3cret-token-value"))).is_err());
    }

    #[test]
    fn token_files() {
        let dir = std::env::temp_dir().join(format!("weightinit-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, content: &str| {
            let path = dir.join(name);
            std::fs::write(&path, content).unwrap();
            path
        };
        let good = Token::from_file(&write("good", "abcdefghijklmnopqrstuvwxyz\n")).unwrap();
        assert!(
            good.check(Some(&header("Bearer abcdefghijklmnopqrstuvwxyz")))
                .is_ok()
        );
        assert!(Token::from_file(&write("empty", " \n")).is_err());
        assert!(Token::from_file(&write("spaces", "two words")).is_err());
        assert!(Token::from_file(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
