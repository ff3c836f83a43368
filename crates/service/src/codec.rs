//! The protobuf codec of the WeightInit service: prost's, except that a server counts a
//! GenerateRequest's tensors in its wire bytes before decoding it.
//!
//! Decoding turns an empty TensorSpec, 2 bytes on the wire, into a struct of about 180 bytes:
//! a 4 MiB message could cost ~370 MB before validation saw it. Counting first bounds what a
//! decode may allocate by the server's tensor limit instead of by the message size.
//!
//! Generated code builds codecs with `Default`, so the limit reaches the decoder through a
//! task-local that [`DecodeLimits`] sets around each call of the service it wraps. Outside such
//! a call (the client side) messages are decoded as prost does.
//!
//! [`DecodeLimits`] also counts and logs the calls that tonic refuses before the handler sees
//! them: a message that is not valid protobuf (INTERNAL) or is over `--max-message-bytes`
//! (OUT_OF_RANGE). And it answers a call whose deadline (`grpc-timeout`) passes before its
//! response with DEADLINE_EXCEEDED, as gRPC promises, just before tonic's own timer for the
//! same deadline would answer CANCELLED.

use std::any::TypeId;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Buf as _;
use prost::Message;
use prost::encoding::{DecodeContext, WireType, decode_key, skip_field};
use tokio::task::futures::TaskLocalFuture;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::{Code, Status};
use tonic_prost::{ProstDecoder, ProstEncoder};

use super::metrics::{Metrics, Rpc};
use crate::proto::GenerateRequest;
use weightinit_engine::Limits;

/// Field number of `GenerateRequest.tensors`.
const TENSORS_FIELD: u32 = 2;

tokio::task_local! {
    static SCOPE: Scope;
}

/// What the decoders of one call need to know.
pub struct Scope {
    limits: Limits,
    rpc: Rpc,
    metrics: Arc<Metrics>,
}

/// The codec named in build.rs for the generated client and server.
pub struct RequestCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for RequestCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for RequestCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(ProstDecoder::default())
    }
}

/// prost's decoder behind the tensor count.
pub struct RequestDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default + 'static> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // Only GenerateRequest has a repeated message field; tonic hands the decoder the
        // whole message as one contiguous chunk.
        if TypeId::of::<U>() == TypeId::of::<GenerateRequest>() {
            admit(buf.chunk())?;
        }
        self.0.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// Refuses a GenerateRequest with more tensors than the current call's server allows.
fn admit(message: &[u8]) -> Result<(), Status> {
    SCOPE
        .try_with(|scope| {
            scope
                .limits
                .check_tensor_count(count_tensors(message))
                .map_err(|error| {
                    scope
                        .metrics
                        .rpc_refused(scope.rpc, Code::ResourceExhausted);
                    tracing::info!(rpc = scope.rpc.name(), %error, "rpc refused before decoding");
                    crate::convert::status(error)
                })
        })
        // Outside a server's call (the client side): nothing to enforce.
        .unwrap_or(Ok(()))
}

/// Top-level `tensors` fields in a GenerateRequest's wire bytes, up to the first malformed
/// field (prost then refuses the message there, having decoded no more tensors than counted).
/// Uses prost's own key and skip functions, which its generated code calls, so that both walk
/// the bytes alike; allocates nothing.
pub fn count_tensors(mut bytes: &[u8]) -> usize {
    let mut count = 0;
    while !bytes.is_empty() {
        let Ok((field, wire_type)) = decode_key(&mut bytes) else {
            break;
        };
        if field == TENSORS_FIELD && wire_type == WireType::LengthDelimited {
            count += 1;
        }
        if skip_field(wire_type, field, &mut bytes, DecodeContext::default()).is_err() {
            break;
        }
    }
    count
}

/// A gRPC service whose calls decode their requests within `limits`.
#[derive(Clone)]
pub struct DecodeLimits<S> {
    inner: S,
    limits: Limits,
    metrics: Arc<Metrics>,
}

impl<S> DecodeLimits<S> {
    pub fn new(inner: S, limits: Limits, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            limits,
            metrics,
        }
    }
}

impl<S, B, R> Service<http::Request<B>> for DecodeLimits<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TaskLocalFuture<Scope, Refusals<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let rpc = Rpc::from_path(request.uri().path());
        let scope = Scope {
            limits: self.limits,
            rpc,
            metrics: Arc::clone(&self.metrics),
        };
        let metrics = Arc::clone(&self.metrics);
        let deadline = grpc_timeout(request.headers())
            .map(|timeout| Instant::now() + timeout.saturating_sub(DEADLINE_MARGIN));
        let call = self.inner.call(request);
        SCOPE.scope(
            scope,
            Box::pin(async move {
                let response = match deadline {
                    // Dropping the call on time stops its work, as a client's cancel does.
                    Some(at) => match tokio::time::timeout_at(at.into(), call).await {
                        Ok(response) => response?,
                        Err(_) => Status::deadline_exceeded("Deadline Exceeded").into_http(),
                    },
                    None => call.await?,
                };
                count_refusal(&metrics, rpc, &response);
                Ok(response)
            }),
        )
    }
}

/// How much earlier than the deadline a call is answered: enough for this timer to fire no
/// later than tonic's, started a moment before it for the same deadline (tonic polls the call
/// before its own timer, so on the same tick the call's answer wins).
const DEADLINE_MARGIN: Duration = Duration::from_millis(2);

/// The `grpc-timeout` header: at most 8 digits and a unit (gRPC over HTTP/2); `None` when
/// absent or malformed, as tonic reads it.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A call's response, once [`count_refusal`] has seen it.
type Refusals<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

/// Counts and logs a response that tonic made from a request it could not decode: the
/// handler never sees those calls. (The handler itself answers INTERNAL before data only when
/// a worker fails, a bug, which it counts too.)
fn count_refusal<R>(metrics: &Metrics, rpc: Rpc, response: &http::Response<R>) {
    let code = response
        .headers()
        .get("grpc-status")
        .and_then(|value| value.to_str().ok()?.parse::<i32>().ok())
        .map(Code::from_i32);
    if let Some(code @ (Code::Internal | Code::OutOfRange)) = code {
        metrics.rpc_refused(rpc, code);
        let message = response.headers().get("grpc-message");
        tracing::info!(rpc = rpc.name(), code = ?code, ?message, "rpc refused: request not decoded");
    }
}

impl<S: NamedService> NamedService for DecodeLimits<S> {
    const NAME: &'static str = S::NAME;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::TensorSpec;

    fn encoded(tensors: usize) -> Vec<u8> {
        GenerateRequest {
            seed: 3,
            tensors: vec![TensorSpec::default(); tensors],
            chunk_bytes: 64,
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn counts_the_tensors_prost_would_decode() {
        for n in [0, 1, 2, 1000] {
            assert_eq!(count_tensors(&encoded(n)), n);
        }
        // Unknown fields of every wire type, a group among them, are skipped as prost does.
        let mut bytes = vec![
            0x58, 0x96, 0x01, // field 11, varint
            0x61, 1, 2, 3, 4, 5, 6, 7, 8, // field 12, fixed64
            0x6b, 0x08, 0x01, 0x6c, // field 13, group holding a varint
            0x75, 1, 2, 3, 4, // field 14, fixed32
        ];
        bytes.extend(encoded(5));
        let decoded = GenerateRequest::decode(&bytes[..]).unwrap();
        assert_eq!(count_tensors(&bytes), decoded.tensors.len());
        // A tensor field nested in a group or a string is not a tensor of the request.
        assert_eq!(count_tensors(&[0x6b, 0x12, 0x00, 0x6c, 0x12, 0x00]), 1);
    }

    #[test]
    fn reads_grpc_timeout_as_grpc_defines_it() {
        let read = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("grpc-timeout", value.parse().unwrap());
            grpc_timeout(&headers)
        };
        assert_eq!(read("300m"), Some(Duration::from_millis(300)));
        assert_eq!(read("2S"), Some(Duration::from_secs(2)));
        assert_eq!(read("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(read("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "123456789m", "5x", "-1S", "1.5S"] {
            assert_eq!(read(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }

    #[test]
    fn stops_at_the_first_malformed_field() {
        let mut bytes = encoded(3);
        bytes.extend([0x12, 0x05, 0x00]); // a last tensor claiming 5 bytes, holding 1
        assert_eq!(count_tensors(&bytes), 3 + 1);
        assert!(GenerateRequest::decode(&bytes[..]).is_err());
    }
}
