//! What the tests share: a real server in this process on 127.0.0.1:0 and its clients, the
//! v1 vectors, request builders; and in [`process`], the real binary as a child process.

pub mod process;

pub use process::*;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint};
use weightinit::proto::{
    GenerateRequest, TensorEnd, generate_response::Item, weight_init_client::WeightInitClient,
};
use weightinit::service::handler::Shared;
use weightinit::service::server::Reloader;
use weightinit::service::{ServeConfig, Server};

/// A server running in this process on an ephemeral loopback port.
pub struct TestServer {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    /// Reads the server's TLS and token files again, as SIGHUP does for the binary.
    pub reloader: Reloader,
    stop: Option<oneshot::Sender<()>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut ServeConfig)) -> Self {
        let mut config = ServeConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        };
        configure(&mut config);
        let listener = TcpListener::bind(config.addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Server::new(config).unwrap();
        let shared = server.shared();
        let reloader = server.reloader();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server.run(listener, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            shared,
            reloader,
            stop: Some(stop),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> WeightInitClient<Channel> {
        WeightInitClient::connect(self.url())
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One tensor of a Generate stream, reassembled and checked for order and contiguity.
#[derive(Debug)]
pub struct Received {
    pub header: weightinit::proto::TensorHeader,
    pub data: Vec<u8>,
    pub blake3: Vec<u8>,
    pub chunk_sizes: Vec<usize>,
}

/// Runs Generate and reassembles every tensor, asserting the stream's structure.
pub async fn generate(
    client: &mut WeightInitClient<Channel>,
    request: GenerateRequest,
) -> Vec<Received> {
    let mut stream = client.generate(request).await.unwrap().into_inner();
    let mut out: Vec<Received> = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        match message.item.unwrap() {
            Item::Header(header) => {
                assert_eq!(header.index as usize, out.len(), "headers in request order");
                out.push(Received {
                    header,
                    data: Vec::new(),
                    blake3: Vec::new(),
                    chunk_sizes: Vec::new(),
                });
            }
            Item::Chunk(chunk) => {
                let current = out.last_mut().expect("chunk after a header");
                assert_eq!(chunk.tensor_index, current.header.index);
                assert_eq!(
                    chunk.offset,
                    current.data.len() as u64,
                    "contiguous, in order"
                );
                current.chunk_sizes.push(chunk.data.len());
                current.data.extend_from_slice(&chunk.data);
            }
            Item::End(end) => {
                let current = out.last_mut().expect("end after a header");
                assert_eq!(end.tensor_index, current.header.index);
                assert_eq!(end.byte_length, current.data.len() as u64);
                assert_eq!(current.header.byte_length, current.data.len() as u64);
                current.blake3 = end.blake3;
            }
        }
    }
    out
}

#[derive(Deserialize)]
pub struct Vectors {
    pub cases: Vec<Case>,
}

#[derive(Deserialize)]
pub struct Case {
    pub case: String,
    pub request: serde_json::Value,
    pub expect: Vec<Expected>,
}

#[derive(Deserialize)]
pub struct Expected {
    pub name: String,
    pub byte_length: u64,
    pub blake3: String,
    /// In the v1 vectors only (tests/data/structured-v1.json has none).
    #[serde(default)]
    pub first_values: Vec<f64>,
}

impl Case {
    /// The case's request, parsed from proto3 JSON as grpcurl would send it.
    pub fn request(&self) -> GenerateRequest {
        serde_json::from_value(self.request.clone()).unwrap()
    }
}

/// The committed copy of the v1 vectors (tests/data/vectors-v1.json).
pub fn vectors() -> Vectors {
    cases_file("vectors-v1.json")
}

/// A committed file of cases under tests/data, in the format of the v1 vectors.
pub fn cases_file(name: &str) -> Vectors {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Checks what Generate and Digest served for `case` against its expected digests: names,
/// lengths, the BLAKE3 of the bytes received, of TensorEnd and of Digest.
pub fn check_served(case: &Case, received: &[Received], digests: &[TensorEnd]) {
    assert_eq!(received.len(), case.expect.len(), "{}", case.case);
    assert_eq!(digests.len(), case.expect.len(), "{}", case.case);
    for ((tensor, digest), expected) in received.iter().zip(digests).zip(&case.expect) {
        let what = format!("{}/{}", case.case, expected.name);
        assert_eq!(tensor.header.name, expected.name, "{what}");
        assert_eq!(tensor.header.byte_length, expected.byte_length, "{what}");
        assert_eq!(
            hex(blake3::hash(&tensor.data).as_bytes()),
            expected.blake3,
            "{what}: bytes"
        );
        assert_eq!(hex(&tensor.blake3), expected.blake3, "{what}: TensorEnd");
        assert_eq!(hex(&digest.blake3), expected.blake3, "{what}: Digest");
        assert_eq!(
            digest.byte_length, expected.byte_length,
            "{what}: Digest length"
        );
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The engine's dtype for a proto DType number.
pub fn engine_dtype(dtype: i32) -> weightinit::engine::DType {
    use weightinit::engine::DType as E;
    use weightinit::proto::DType as P;
    match P::try_from(dtype).unwrap() {
        P::DtypeFloat64 => E::Float64,
        P::DtypeFloat32 => E::Float32,
        P::DtypeFloat16 => E::Float16,
        P::DtypeBfloat16 => E::BFloat16,
        P::DtypeUnspecified => panic!("a header's dtype is never UNSPECIFIED"),
    }
}

/// Polls `condition` every 10 ms for up to 10 s; panics if it never holds.
pub async fn wait_until(mut condition: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if condition() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("condition not reached within 10 s");
}

/// grpcurl from $GRPCURL, the project's .venv (scripts/test installs it there), or PATH.
pub fn grpcurl() -> PathBuf {
    if let Some(path) = std::env::var_os("GRPCURL") {
        return path.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/grpcurl");
    if venv.exists() {
        venv
    } else {
        "grpcurl".into()
    }
}

/// A client on its own connection whose HTTP/2 windows (stream and connection) are `window`
/// bytes: the server can send only that far ahead of what it reads.
pub async fn windowed_client(
    url: &str,
    window: u32,
) -> Result<WeightInitClient<Channel>, tonic::transport::Error> {
    let channel = Endpoint::from_shared(url.to_owned())
        .unwrap()
        .initial_stream_window_size(window)
        .initial_connection_window_size(window)
        .connect()
        .await?;
    Ok(WeightInitClient::new(channel))
}
