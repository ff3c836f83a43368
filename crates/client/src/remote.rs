//! One server over gRPC, for the command line and the Python package alike: [`Remote`], a
//! client built from PEM bytes and a token ([`Security`]) whose failures are explained (the
//! address, the cause and the fix, in the caller's words); calls retried with backoff after
//! failures another attempt can cure ([`retry`]); [`StreamCheck`], which checks a Generate
//! stream (for `fetch` too), and [`Receiver`], which copies each chunk once into the caller's
//! destination of its tensor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_types::StatusExt;

use crate::retry::{self, Backoff, RetryPolicy};
use crate::source::{GenerateStream, Server, unreachable};
use crate::target::{Caller, Refusal, Security, Target, Unreachable, silent};
use weightinit_proto::weight_init_client::WeightInitClient;
use weightinit_proto::{
    DescribeResponse, DigestResponse, GenerateRequest, GenerateResponse, TensorHeader,
    generate_response::Item,
};

/// Largest message accepted from a server: chunks are at most 1 MiB unless a server raises
/// its --max-chunk-bytes; this bounds memory all the same.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// How long a call waits for a first answer before asking whether the peer speaks HTTP/2 at
/// all: one that accepts connections and never answers would hold the call until its deadline.
const SILENT_AFTER: Duration = Duration::from_secs(3);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Options that cannot work, found before anything is dialled.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The server answered with an error status, or the connection failed: then the status
    /// carries the [`Unreachable`] that says where, why and what to do (its source).
    #[error("{}", .0.message())]
    Status(Status),
    /// Failures another attempt could have cured, `attempts` in a row; the last one.
    #[error("{}; gave up after {attempts} failed attempts in a row", .last.message())]
    GaveUp { attempts: u32, last: Status },
    #[error(transparent)]
    Integrity(#[from] IntegrityError),
}

impl RemoteError {
    /// The status the failure ended with (none for refused options and integrity errors).
    pub fn status(&self) -> Option<&Status> {
        match self {
            Self::Status(status) | Self::GaveUp { last: status, .. } => Some(status),
            Self::Refused(_) | Self::Integrity(_) => None,
        }
    }

    /// The server could not be reached: where, and why.
    pub fn unreachable(&self) -> Option<&Unreachable> {
        self.status().and_then(unreachable)
    }

    /// The request field at fault, as the server's BadRequest detail names it, or the option.
    pub fn field(&self) -> Option<String> {
        match self {
            Self::Refused(refusal) => Some(refusal.field.to_owned()),
            _ => {
                let bad_request = self.status()?.get_details_bad_request()?;
                Some(bad_request.field_violations.first()?.field.clone())
            }
        }
    }
}

/// A Generate stream that broke the protocol, or a tensor whose bytes do not match its digest.
#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    /// Messages out of order, sizes that disagree.
    #[error("the server broke the protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Digest(#[from] VerifyError),
}

macro_rules! broken {
    ($($arg:tt)*) => { IntegrityError::Protocol(format!($($arg)*)) };
}

/// One server, over one channel reused by every call; it connects on first use and
/// reconnects after a failure. Its [`Server`] calls explain connection failures.
#[derive(Clone, Debug)]
pub struct Remote {
    client: WeightInitClient<Channel>,
    authorization: Option<AsciiMetadataValue>,
    target: Target,
    /// How it is reached, for the explanations of failures.
    security: Arc<Security>,
}

impl Remote {
    /// A client of the server at `addr` (`HOST:PORT`, `http://` or `https://`), reached as
    /// `security` says, its messages in `caller`'s words. Must be called within a tokio
    /// runtime.
    pub fn new(addr: &str, security: Security, caller: Caller) -> Result<Self, Refusal> {
        let target = security.target(addr, caller)?;
        let endpoint = security.endpoint(&target)?;
        Ok(Self {
            client: client(endpoint),
            authorization: security.authorization(caller)?,
            target,
            security: Arc::new(security),
        })
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// `status`, or when the connection is what failed, UNAVAILABLE (what grpc reports for
    /// it, however the transport happened to end the call) saying the address, the cause and
    /// the fix ([`Unreachable`], kept as its source for the retry decision).
    pub async fn explain(&self, status: Status) -> Status {
        let explained = Unreachable::explain(&status, &self.target, &self.security);
        match explained.await {
            Some(unreachable) => unreachable_status(unreachable),
            // A status with a source is the transport's, not the server's: the connection
            // broke (with TLS 1.3, how a server refusing the client's certificate shows).
            None if std::error::Error::source(&status).is_some()
                && matches!(
                    status.code(),
                    Code::Unknown | Code::Cancelled | Code::Internal | Code::Unavailable
                ) =>
            {
                Status::unavailable(format!(
                    "the connection to {} broke: {}",
                    self.target,
                    status.message()
                ))
            }
            None => status,
        }
    }

    /// The client and `request` with the token if there is one; the call's answer, or its
    /// failure explained. A peer that gives no answer within [`SILENT_AFTER`] is asked
    /// whether it speaks HTTP/2 at all.
    async fn call<T, R>(
        &self,
        mut request: Request<T>,
        call: impl AsyncFnOnce(WeightInitClient<Channel>, Request<T>) -> Result<R, Status>,
    ) -> Result<R, Status> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        let watch = async {
            tokio::time::sleep(SILENT_AFTER).await;
            match silent(&self.target).await {
                Some(unreachable) => unreachable,
                None => std::future::pending().await,
            }
        };
        let result = tokio::select! {
            result = call(self.client.clone(), request) => result,
            unreachable = watch => return Err(unreachable_status(unreachable)),
        };
        match result {
            Ok(response) => Ok(response),
            Err(status) => Err(self.explain(status).await),
        }
    }

    /// A Generate stream as tonic gives it.
    async fn stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Streaming<GenerateResponse>, Status> {
        self.call(request, async |mut c, r| c.generate(r).await)
            .await
            .map(Response::into_inner)
    }

    /// A request for `message` with what is left of the time until `deadline`.
    fn request(message: GenerateRequest, deadline: Option<Instant>) -> Request<GenerateRequest> {
        let mut request = Request::new(message);
        if let Some(deadline) = deadline {
            request.set_timeout(deadline.saturating_duration_since(Instant::now()));
        }
        request
    }

    /// After failure `status`: waits and returns when another attempt is worth it, or else
    /// returns the error.
    async fn recover(
        &self,
        backoff: &mut Backoff,
        status: Status,
        progressed: bool,
    ) -> Result<(), RemoteError> {
        if !retry::is_transient(&status) {
            return Err(RemoteError::Status(status));
        }
        let Some(wait) = backoff.next(progressed) else {
            return Err(RemoteError::GaveUp {
                attempts: backoff.failures(),
                last: status,
            });
        };
        tokio::time::sleep(wait).await;
        Ok(())
    }

    /// The encoded response of unary call `which` for `message`, retried per `policy` after
    /// failures [`retry::is_transient`] calls transient.
    pub async fn unary_retried(
        &self,
        which: Unary,
        message: GenerateRequest,
        deadline: Option<Instant>,
        policy: RetryPolicy,
    ) -> Result<Vec<u8>, RemoteError> {
        let mut backoff = Backoff::new(policy);
        loop {
            let request = Self::request(message.clone(), deadline);
            let answer = match which {
                Unary::Digest => Server::digest(self, request)
                    .await
                    .map(|r| r.into_inner().encode_to_vec()),
                Unary::Describe => Server::describe(self, request)
                    .await
                    .map(|r| r.into_inner().encode_to_vec()),
            };
            match answer {
                Ok(encoded) => return Ok(encoded),
                Err(status) => self.recover(&mut backoff, status, false).await?,
            }
        }
    }

    /// A Generate of `message` received into destinations of type `D`; see [`Generation`].
    pub fn generation<D: AsMut<[u8]>>(
        &self,
        message: GenerateRequest,
        deadline: Option<Instant>,
        policy: RetryPolicy,
    ) -> Generation<D> {
        let names = message.tensors.iter().map(|t| t.name.clone()).collect();
        Generation {
            remote: self.clone(),
            backoff: Backoff::new(policy),
            message,
            deadline,
            receiver: Receiver::new(names),
            stream: None,
        }
    }
}

fn unreachable_status(unreachable: Unreachable) -> Status {
    let mut status = Status::unavailable(unreachable.to_string());
    status.set_source(Arc::new(unreachable));
    status
}

/// A client of the server at `endpoint`, tuned for streaming large tensors; it connects on
/// first use and reconnects after a failure. Must be called within a tokio runtime.
fn client(endpoint: Endpoint) -> WeightInitClient<Channel> {
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        // A peer that vanished without closing the connection is noticed within seconds.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        // Windows as large as the server's keep a loopback or LAN stream from stalling.
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        .tcp_nodelay(true)
        .connect_lazy();
    WeightInitClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

#[tonic::async_trait]
impl Server for Remote {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let stream = self.stream(request).await?;
        Ok(Response::new(Box::pin(stream)))
    }

    async fn describe(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        self.call(request, async |mut c, r| c.describe(r).await)
            .await
    }

    async fn digest(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<DigestResponse>, Status> {
        self.call(request, async |mut c, r| c.digest(r).await).await
    }
}

/// The unary calls that [`Remote::unary_retried`] makes.
#[derive(Clone, Copy, Debug)]
pub enum Unary {
    Digest,
    Describe,
}

/// A Generate call received into the caller's destinations: when the stream breaks for a
/// reason another attempt can cure, a Generate of the tensors not yet finished follows after
/// a backoff, and the tensor that was arriving is received again from its start into the same
/// destination. [`Self::next`] returns each header whose destination is wanted.
pub struct Generation<D> {
    remote: Remote,
    backoff: Backoff,
    message: GenerateRequest,
    deadline: Option<Instant>,
    receiver: Receiver<D>,
    stream: Option<Streaming<GenerateResponse>>,
}

impl<D: AsMut<[u8]>> Generation<D> {
    /// The next header to [`Self::open`] a destination for, or `None` once every tensor has
    /// arrived and checked.
    pub async fn next(&mut self) -> Result<Option<TensorHeader>, RemoteError> {
        loop {
            let before = self.receiver.progress();
            let failure = match self.step().await {
                Ok(next) => return Ok(next),
                Err(Failure::Final(error)) => return Err(error),
                Err(Failure::Status(status)) => status,
            };
            self.stream = None;
            let progressed = self.receiver.progress() != before;
            self.remote
                .recover(&mut self.backoff, failure, progressed)
                .await?;
            self.receiver.restart();
        }
    }

    /// Messages until a header wants a destination (it), the stream ends (none) or fails.
    async fn step(&mut self) -> Result<Option<TensorHeader>, Failure> {
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => {
                let first = self.receiver.finished();
                let message = GenerateRequest {
                    tensors: self.message.tensors[first..].to_vec(),
                    ..self.message.clone()
                };
                let request = Remote::request(message, self.deadline);
                let stream = self.remote.stream(request).await;
                self.stream.insert(stream.map_err(Failure::Status)?)
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(response)) => {
                    if let Some(header) = self.receiver.receive(response)? {
                        return Ok(Some(header));
                    }
                }
                // Ended early: as a broken connection, which another attempt can cure.
                Ok(None) if !self.receiver.complete() => {
                    return Err(Failure::Status(Status::unavailable(format!(
                        "the stream from {} ended after {} of {} tensors",
                        self.remote.target,
                        self.receiver.finished(),
                        self.receiver.names.len()
                    ))));
                }
                Ok(None) => return Ok(None),
                Err(status) => return Err(Failure::Status(self.remote.explain(status).await)),
            }
        }
    }

    /// Gives the destination of the header [`Self::next`] just returned: exactly its byte
    /// length.
    pub fn open(&mut self, destination: D) -> Result<(), IntegrityError> {
        self.receiver.open(destination)
    }
}

/// A failed step: a failed call, retried when [`retry::is_transient`] says so, or an error
/// that is final.
enum Failure {
    Status(Status),
    Final(RemoteError),
}

impl From<IntegrityError> for Failure {
    fn from(error: IntegrityError) -> Self {
        Self::Final(error.into())
    }
}

/// Checks a Generate stream against the protocol, for `fetch` and the Python package alike:
/// tensors in the order asked for, each a header, then chunks contiguous from offset 0 that
/// add up to its byte length, then an end whose length and BLAKE3 digest match the bytes that
/// came in this stream.
#[derive(Debug)]
pub struct StreamCheck {
    names: Vec<String>,
    /// Tensors whose end has come.
    ended: usize,
    current: Option<Checking>,
}

#[derive(Debug)]
struct Checking {
    name: String,
    length: u64,
    received: u64,
    hasher: blake3::Hasher,
}

/// What a checked message brings.
#[derive(Debug)]
pub enum Checked {
    Header(Box<TensorHeader>),
    /// Bytes of the current tensor, at `offset` of what this stream sends of it.
    Data {
        offset: u64,
        data: Bytes,
    },
    /// The current tensor's end: its bytes are all there and hash to its digest.
    End,
}

impl StreamCheck {
    /// A check of a stream of the tensors named `names`, in this order.
    pub fn new(names: Vec<String>) -> Self {
        Self {
            names,
            ended: 0,
            current: None,
        }
    }

    /// Tensors whose end has come.
    pub fn ended(&self) -> usize {
        self.ended
    }

    /// Whether every tensor's end has come.
    pub fn complete(&self) -> bool {
        self.current.is_none() && self.ended == self.names.len()
    }

    /// The next message, checked.
    pub fn check(&mut self, response: GenerateResponse) -> Result<Checked, IntegrityError> {
        let index = self.ended;
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
                *current = Some(Checking {
                    name: name.clone(),
                    length: header.byte_length,
                    received: 0,
                    hasher: blake3::Hasher::new(),
                });
                Ok(Checked::Header(Box::new(header)))
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
                tensor.hasher.update(&chunk.data);
                tensor.received = stop;
                Ok(Checked::Data {
                    offset: chunk.offset,
                    data: chunk.data,
                })
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
                verify(
                    &tensor.name,
                    "TensorEnd",
                    &tensor.hasher.finalize(),
                    &end.blake3,
                )?;
                self.current = None;
                self.ended += 1;
                Ok(Checked::End)
            }
        }
    }

    /// Checks, once the stream has ended, that every tensor arrived.
    pub fn finish(&self) -> Result<(), IntegrityError> {
        if !self.complete() {
            return Err(broken!(
                "stream ended after {} of {} tensors",
                self.ended,
                self.names.len()
            ));
        }
        Ok(())
    }
}

/// Bytes received that do not hash to what the server says they are.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "tensor {tensor:?}: the bytes received hash to BLAKE3 {computed}, the server's {against} \
     says {sent}"
)]
pub struct VerifyError {
    pub tensor: String,
    /// What the server's digest came in: "TensorEnd" or "Digest".
    pub against: &'static str,
    pub computed: String,
    pub sent: String,
}

/// Checks a digest computed here against the one the server sent in `against`.
pub fn verify(
    tensor: &str,
    against: &'static str,
    computed: &blake3::Hash,
    sent: &[u8],
) -> Result<(), VerifyError> {
    if computed.as_bytes().as_slice() == sent {
        return Ok(());
    }
    Err(VerifyError {
        tensor: tensor.to_owned(),
        against,
        computed: computed.to_hex().to_string(),
        sent: hex(sent),
    })
}

/// Puts a Generate stream's tensors, checked by [`StreamCheck`], into destinations of type
/// `D`, each chunk copied once into place. After a broken stream, [`Self::restart`] readies it
/// for a new stream of the tensors not finished yet.
#[derive(Debug)]
pub struct Receiver<D> {
    names: Vec<String>,
    /// Tensors finished before the current stream began.
    first: usize,
    check: StreamCheck,
    /// The current tensor's, once opened.
    destination: Option<D>,
    /// The destination of a tensor that broke off, for when it is received again.
    kept: Option<D>,
}

impl<D: AsMut<[u8]>> Receiver<D> {
    /// A receiver of the tensors named `names`, in this order.
    pub fn new(names: Vec<String>) -> Self {
        Self {
            check: StreamCheck::new(names.clone()),
            names,
            first: 0,
            destination: None,
            kept: None,
        }
    }

    /// Tensors finished.
    fn finished(&self) -> usize {
        self.first + self.check.ended()
    }

    /// Tensors finished, and bytes of the current one received.
    fn progress(&self) -> (usize, u64) {
        let received = self.check.current.as_ref().map_or(0, |t| t.received);
        (self.finished(), received)
    }

    /// For a new stream of the tensors not finished yet, after this one broke: the tensor
    /// that was arriving keeps its destination and is received again from its start.
    fn restart(&mut self) {
        if self.check.current.is_some() {
            self.kept = self.destination.take();
        }
        self.first = self.finished();
        self.check = StreamCheck::new(self.names[self.first..].to_vec());
    }

    /// Whether every tensor arrived.
    fn complete(&self) -> bool {
        self.check.complete()
    }

    /// Takes the next message: a chunk is copied into place, an end checked. A header is
    /// returned, for the caller to [`Self::open`] its destination before the next message,
    /// unless the tensor is one received again (its destination is kept).
    pub fn receive(
        &mut self,
        response: GenerateResponse,
    ) -> Result<Option<TensorHeader>, IntegrityError> {
        match self.check.check(response)? {
            Checked::Header(header) => match self.kept.take() {
                Some(kept) => self.open(kept).map(|()| None),
                None => Ok(Some(*header)),
            },
            Checked::Data { offset, data } => {
                let destination = self
                    .destination
                    .as_mut()
                    .expect("Receiver::open follows every header")
                    .as_mut();
                let start = offset as usize;
                destination[start..start + data.len()].copy_from_slice(&data);
                Ok(None)
            }
            Checked::End => {
                self.destination = None;
                Ok(None)
            }
        }
    }

    /// Gives the destination of the tensor whose header [`Self::receive`] just returned:
    /// exactly its byte length.
    pub fn open(&mut self, mut destination: D) -> Result<(), IntegrityError> {
        let tensor = self.check.current.as_ref().expect("open follows a header");
        let actual = destination.as_mut().len();
        if actual as u64 != tensor.length {
            return Err(broken!(
                "{:?}: destination of {actual} bytes for byte_length {}",
                tensor.name,
                tensor.length
            ));
        }
        self.destination = Some(destination);
        Ok(())
    }

    /// Checks, once the stream has ended, that every tensor arrived.
    pub fn finish(&self) -> Result<(), IntegrityError> {
        self.check.finish()
    }
}

/// Lowercase hex, the form every digest is shown in (`weightinit digest`, errors).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use weightinit_proto::{Chunk, TensorEnd};

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
    fn a_restarted_stream_refills_the_tensor_that_broke_off_in_place() {
        let mut first = [0u8; 2];
        let mut second = [0u8; 6];
        let mut receiver = Receiver::new(vec!["v".to_owned(), "w".to_owned()]);
        let feed = |receiver: &mut Receiver<&mut [u8]>, response| receiver.receive(response);
        assert!(feed(&mut receiver, header(0, "v", 2)).unwrap().is_some());
        receiver.open(&mut first[..]).unwrap();
        feed(&mut receiver, chunk(0, 0, b"ab")).unwrap();
        feed(&mut receiver, end(0, b"ab")).unwrap();
        assert!(feed(&mut receiver, header(1, "w", 6)).unwrap().is_some());
        receiver.open(&mut second[..]).unwrap();
        feed(&mut receiver, chunk(1, 0, b"XYZ")).unwrap();
        let before = receiver.progress();
        receiver.restart();
        // The new stream's request starts at "w": its index 0, no second destination.
        assert!(feed(&mut receiver, header(0, "w", 6)).unwrap().is_none());
        feed(&mut receiver, chunk(0, 0, b"cdef")).unwrap();
        feed(&mut receiver, chunk(0, 4, b"gh")).unwrap();
        feed(&mut receiver, end(0, b"cdefgh")).unwrap();
        assert!(receiver.progress() > before && receiver.complete());
        drop(receiver);
        assert_eq!((&first[..], &second[..]), (&b"ab"[..], &b"cdefgh"[..]));
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
