//! Calls to a server for the Python package: a client built from in-memory PEM and token,
//! and [`Receiver`], which checks a Generate stream and copies each chunk once into the
//! caller's destination of its tensor.

use std::time::Duration;

use prost::Message;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::source;
use crate::target::{Cause, Target, Unreachable, tls_endpoint};
use weightinit_service::proto::weight_init_client::WeightInitClient;
use weightinit_service::proto::{
    GenerateRequest, GenerateResponse, TensorHeader, generate_response::Item,
};

/// How to reach a server, as the Python package's `Security` gives it: PEM bytes and a token.
#[derive(Debug, Default)]
pub struct Security {
    pub tls_ca: Option<Vec<u8>>,
    /// The client's certificate and key, for mutual TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    pub tls_server_name: Option<String>,
    pub token: Option<String>,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Options that cannot work, found before anything is dialled.
    #[error("{0}")]
    Options(String),
    /// The server answered with an error status.
    #[error("{}", .0.message())]
    Status(Status),
    /// The connection failed (UNAVAILABLE); the address, the cause and the fix.
    #[error("{0}")]
    Unreachable(Box<Unreachable>),
    #[error(transparent)]
    Integrity(#[from] IntegrityError),
}

impl RemoteError {
    /// For a server that could not be reached: which of the causes the Python package words
    /// itself ("refused", "unknown_host", "speaks_tls", "speaks_plaintext", "certificate",
    /// else "other"), the system's or TLS library's words, and the `HOST:PORT` dialled.
    pub fn unreachable(&self) -> Option<(&'static str, String, String)> {
        let Self::Unreachable(unreachable) = self else {
            return None;
        };
        let (kind, detail) = match &unreachable.cause {
            Cause::Refused => ("refused", String::new()),
            Cause::UnknownHost(detail) => ("unknown_host", detail.clone()),
            Cause::ServerSpeaksTls => ("speaks_tls", String::new()),
            Cause::ServerSpeaksPlaintext => ("speaks_plaintext", String::new()),
            Cause::Certificate(error) => ("certificate", format!("{error:?}")),
            _ => ("other", String::new()),
        };
        let target = &unreachable.target;
        Some((kind, detail, format!("{}:{}", target.host, target.port)))
    }

    /// The gRPC status code the failure stands for (none for integrity errors).
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Options(_) => Some(Code::InvalidArgument),
            Self::Status(status) => Some(status.code()),
            Self::Unreachable(_) => Some(Code::Unavailable),
            Self::Integrity(_) => None,
        }
    }
}

/// A Generate stream that broke the protocol, or a tensor whose bytes do not match its digest.
/// The messages are the Python package's.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct IntegrityError(String);

macro_rules! broken {
    ($($arg:tt)*) => { IntegrityError(format!($($arg)*)) };
}

/// One server, over one channel reused by every call.
#[derive(Clone, Debug)]
pub struct Remote {
    client: WeightInitClient<Channel>,
    authorization: Option<AsciiMetadataValue>,
    target: Target,
    /// The CA's PEM and whether the client has a certificate, to explain failures.
    ca: Option<Vec<u8>>,
    identity: bool,
}

impl Remote {
    /// A client of the server at `addr` (`HOST:PORT`, `http://` or `https://`), reached as
    /// `security` says; connects on first use. Must be called within a tokio runtime.
    pub fn new(addr: &str, security: Security) -> Result<Self, RemoteError> {
        let options = |error: Box<dyn std::error::Error + Send + Sync>| {
            RemoteError::Options(error.to_string())
        };
        let target = Target::parse(addr, security.tls_ca.is_some(), "target")
            .map_err(RemoteError::Options)?;
        let authorization = security
            .token
            .map(|token| {
                AsciiMetadataValue::try_from(format!("Bearer {token}"))
                    .map_err(|_| RemoteError::Options("token: not a valid header value".into()))
            })
            .transpose()?;
        let ca = security.tls_ca;
        let identity = security.identity.is_some();
        let endpoint = tls_endpoint(
            &target,
            ca.clone(),
            security.identity,
            security.tls_server_name,
        )
        .map_err(options)?;
        Ok(Self {
            client: source::client(endpoint),
            authorization,
            target,
            ca,
            identity,
        })
    }

    fn request(
        &self,
        message: GenerateRequest,
        timeout: Option<Duration>,
    ) -> Request<GenerateRequest> {
        let mut request = Request::new(message);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        if let Some(timeout) = timeout {
            request.set_timeout(timeout);
        }
        request
    }

    /// `status` as an error: a connection failure explained when it is one, as UNAVAILABLE
    /// (what grpc reports for it, however the transport happened to end the call).
    pub async fn failed(&self, status: Status) -> RemoteError {
        let explained =
            Unreachable::explain_pem(&status, &self.target, self.ca.as_deref(), self.identity);
        match explained.await {
            Some(unreachable) => RemoteError::Unreachable(Box::new(unreachable)),
            // A status with a source is the transport's, not the server's: the connection
            // broke (with TLS 1.3, how a server refusing the client's certificate shows).
            None if std::error::Error::source(&status).is_some()
                && matches!(
                    status.code(),
                    Code::Unknown | Code::Cancelled | Code::Internal
                ) =>
            {
                RemoteError::Status(Status::unavailable(status.message()))
            }
            None => RemoteError::Status(status),
        }
    }

    /// Starts a Generate call; its messages then arrive from the stream.
    pub async fn generate(
        &self,
        message: GenerateRequest,
        timeout: Option<Duration>,
    ) -> Result<Streaming<GenerateResponse>, RemoteError> {
        let request = self.request(message, timeout);
        self.answer(self.client.clone().generate(request).await)
            .await
    }

    /// The encoded DigestResponse of `message`.
    pub async fn digest(
        &self,
        message: GenerateRequest,
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>, RemoteError> {
        let request = self.request(message, timeout);
        let response = self.answer(self.client.clone().digest(request).await);
        Ok(response.await?.encode_to_vec())
    }

    /// The encoded DescribeResponse of `message`.
    pub async fn describe(
        &self,
        message: GenerateRequest,
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>, RemoteError> {
        let request = self.request(message, timeout);
        let response = self.answer(self.client.clone().describe(request).await);
        Ok(response.await?.encode_to_vec())
    }

    /// The message a call answered with, or its failure explained.
    async fn answer<T>(&self, response: Result<Response<T>, Status>) -> Result<T, RemoteError> {
        match response {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(self.failed(status).await),
        }
    }
}

/// Assembles a Generate stream's tensors into destinations of type `D`, checking that tensors
/// arrive in request order, that each tensor's chunks are contiguous and add up to its byte
/// length, and that the BLAKE3 digest of its bytes equals the one in its TensorEnd.
#[derive(Debug)]
pub struct Receiver<D> {
    names: Vec<String>,
    finished: usize,
    current: Option<Receiving<D>>,
}

#[derive(Debug)]
struct Receiving<D> {
    name: String,
    length: u64,
    /// None until [`Receiver::open`] gives the header's destination.
    destination: Option<D>,
    received: u64,
    hasher: blake3::Hasher,
}

impl<D: AsMut<[u8]>> Receiver<D> {
    /// A receiver of the tensors named `names`, in this order.
    pub fn new(names: Vec<String>) -> Self {
        Self {
            names,
            finished: 0,
            current: None,
        }
    }

    /// Takes the next message: a chunk is copied into place and hashed, an end checked. A
    /// header is returned, for the caller to [`Self::open`] its destination before the next
    /// message.
    pub fn receive(
        &mut self,
        response: GenerateResponse,
    ) -> Result<Option<TensorHeader>, IntegrityError> {
        let index = self.finished;
        match (response.item, &mut self.current) {
            (Some(Item::Header(header)), current) => {
                if let Some(open) = current {
                    return Err(broken!(
                        "tensor {:?} has no end before the next header",
                        open.name
                    ));
                }
                let Some(name) = self.names.get(index) else {
                    return Err(broken!("header of a tensor beyond the request's"));
                };
                if header.index as usize != index || &header.name != name {
                    return Err(broken!(
                        "header for tensor {} {:?}, expected {index} {name:?}",
                        header.index,
                        header.name
                    ));
                }
                *current = Some(Receiving {
                    name: name.clone(),
                    length: header.byte_length,
                    destination: None,
                    received: 0,
                    hasher: blake3::Hasher::new(),
                });
                Ok(Some(header))
            }
            (None, _) => Err(broken!("empty GenerateResponse")),
            (Some(item), None) => {
                let what = if matches!(item, Item::Chunk(_)) {
                    "chunk"
                } else {
                    "end"
                };
                Err(broken!("{what} outside a tensor (no header before it)"))
            }
            (Some(Item::Chunk(chunk)), Some(tensor)) => {
                if chunk.tensor_index as usize != index {
                    return Err(broken!(
                        "chunk of tensor {} inside {:?}",
                        chunk.tensor_index,
                        tensor.name
                    ));
                }
                if chunk.offset != tensor.received {
                    return Err(broken!(
                        "{:?}: chunk at offset {}, expected {}",
                        tensor.name,
                        chunk.offset,
                        tensor.received
                    ));
                }
                let stop = tensor.received + chunk.data.len() as u64;
                if stop > tensor.length {
                    return Err(broken!(
                        "{:?}: chunks run past byte_length {}",
                        tensor.name,
                        tensor.length
                    ));
                }
                let destination = tensor
                    .destination
                    .as_mut()
                    .expect("Receiver::open follows every header")
                    .as_mut();
                destination[tensor.received as usize..stop as usize].copy_from_slice(&chunk.data);
                tensor.hasher.update(&chunk.data);
                tensor.received = stop;
                Ok(None)
            }
            (Some(Item::End(end)), Some(tensor)) => {
                if end.tensor_index as usize != index {
                    return Err(broken!(
                        "end of tensor {} inside {:?}",
                        end.tensor_index,
                        tensor.name
                    ));
                }
                if end.byte_length != tensor.length || tensor.received != tensor.length {
                    return Err(broken!(
                        "{:?}: received {} bytes, end says {}, header said {}",
                        tensor.name,
                        tensor.received,
                        end.byte_length,
                        tensor.length
                    ));
                }
                let digest = tensor.hasher.finalize();
                if digest.as_bytes().as_slice() != end.blake3.as_slice() {
                    return Err(broken!(
                        "{:?}: BLAKE3 of the received bytes is {}, the server's is {}",
                        tensor.name,
                        digest.to_hex(),
                        hex(&end.blake3)
                    ));
                }
                self.current = None;
                self.finished += 1;
                Ok(None)
            }
        }
    }

    /// Gives the destination of the tensor whose header [`Self::receive`] just returned:
    /// exactly its byte length.
    pub fn open(&mut self, mut destination: D) -> Result<(), IntegrityError> {
        let tensor = self.current.as_mut().expect("open follows a header");
        let actual = destination.as_mut().len();
        if actual as u64 != tensor.length {
            return Err(broken!(
                "{:?}: destination of {actual} bytes for byte_length {}",
                tensor.name,
                tensor.length
            ));
        }
        tensor.destination = Some(destination);
        Ok(())
    }

    /// Checks, once the stream has ended, that every tensor arrived.
    pub fn finish(&self) -> Result<(), IntegrityError> {
        if self.current.is_some() || self.finished != self.names.len() {
            return Err(broken!(
                "stream ended after {} of {} tensors",
                self.finished,
                self.names.len()
            ));
        }
        Ok(())
    }
}

/// Lowercase hex, the form every digest is shown in (`weightinit digest`, errors).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use weightinit_service::proto::{Chunk, TensorEnd};

    fn header(index: u32, name: &str, byte_length: u64) -> GenerateResponse {
        let header = TensorHeader {
            index,
            name: name.to_owned(),
            byte_length,
            ..Default::default()
        };
        GenerateResponse {
            item: Some(Item::Header(header)),
        }
    }

    fn chunk(tensor_index: u32, offset: u64, data: &[u8]) -> GenerateResponse {
        let chunk = Chunk {
            tensor_index,
            offset,
            data: data.to_vec().into(),
        };
        GenerateResponse {
            item: Some(Item::Chunk(chunk)),
        }
    }

    fn end(tensor_index: u32, data: &[u8]) -> GenerateResponse {
        let end = TensorEnd {
            tensor_index,
            blake3: blake3::hash(data).as_bytes().to_vec(),
            byte_length: data.len() as u64,
            name: "w".to_owned(),
        };
        GenerateResponse {
            item: Some(Item::End(end)),
        }
    }

    /// Feeds `stream`, which has at most one header and that first, to a receiver of tensor
    /// "w" into a 6-byte destination.
    fn receive(stream: Vec<GenerateResponse>) -> Result<Vec<u8>, IntegrityError> {
        let mut out = vec![0u8; 6];
        let mut receiver = Receiver::new(vec!["w".to_owned()]);
        let mut stream = stream.into_iter();
        if let Some(first) = stream.next()
            && receiver.receive(first)?.is_some()
        {
            receiver.open(&mut out[..])?;
        }
        for response in stream {
            assert!(receiver.receive(response)?.is_none(), "one header only");
        }
        receiver.finish()?;
        drop(receiver);
        Ok(out)
    }

    #[test]
    fn chunks_land_in_place() {
        let stream = vec![
            header(0, "w", 6),
            chunk(0, 0, b"abcd"),
            chunk(0, 4, b"ef"),
            end(0, b"abcdef"),
        ];
        assert_eq!(receive(stream).unwrap(), b"abcdef");
    }

    #[test]
    fn broken_streams_are_integrity_errors() {
        let cases = [
            (
                vec![header(0, "w", 6), chunk(0, 2, b"cd")],
                "chunk at offset 2, expected 0",
            ),
            (
                vec![header(0, "w", 6), chunk(0, 0, b"abcdefg")],
                "run past byte_length 6",
            ),
            (vec![header(1, "w", 6)], "expected 0 \"w\""),
            (vec![chunk(0, 0, b"ab")], "chunk outside a tensor"),
            (
                vec![header(0, "w", 6), chunk(0, 0, b"abcdef"), end(0, b"abcdeg")],
                "BLAKE3",
            ),
            (
                vec![header(0, "w", 6), chunk(0, 0, b"abc")],
                "stream ended after 0 of 1",
            ),
            (
                vec![GenerateResponse { item: None }],
                "empty GenerateResponse",
            ),
        ];
        for (stream, says) in cases {
            let error = receive(stream).unwrap_err().to_string();
            assert!(error.contains(says), "{error:?} does not say {says:?}");
        }
    }
}
