//! The real binary as a child process with its memory figures, certificates made on the
//! spot, metrics scraped over HTTP, and expected digests computed in this process. Kept free
//! of the rest of `util`, so that the benchmarks include this file too.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use weightinit::engine::{Limits, TensorPlan};
use weightinit::proto::GenerateRequest;
use weightinit::service::convert;

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "weightinit-{what}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, content).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test PKI: a CA, a server certificate for `localhost` and 127.0.0.1 signed by it, a
/// client certificate signed by it, and a client certificate from an unrelated CA.
pub struct Pki {
    /// Where the files are, removed with the Pki.
    _dir: TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub rogue_ca: PathBuf,
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
}

impl Pki {
    pub fn new() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let dir = TempDir::new("pki");
        let ca = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.self_signed(&key).unwrap();
            (cert.pem(), Issuer::new(params, key))
        };
        let leaf = |names: &[&str], usage: ExtendedKeyUsagePurpose, issuer: &Issuer<KeyPair>| {
            let key = KeyPair::generate().unwrap();
            let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
            let mut params = CertificateParams::new(names.clone()).unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, &names[0]);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (ca_pem, issuer) = ca("weightinit test CA");
        let (rogue_ca_pem, rogue_issuer) = ca("some other CA");
        let (server_cert, server_key) = leaf(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
            &issuer,
        );
        let (client_cert, client_key) =
            leaf(&["trainer-7"], ExtendedKeyUsagePurpose::ClientAuth, &issuer);
        let (rogue_cert, rogue_key) = leaf(
            &["intruder"],
            ExtendedKeyUsagePurpose::ClientAuth,
            &rogue_issuer,
        );
        Self {
            ca: dir.write("ca.pem", ca_pem),
            server_cert: dir.write("server.pem", server_cert),
            server_key: dir.write("server.key", server_key),
            client_cert: dir.write("client.pem", client_cert),
            client_key: dir.write("client.key", client_key),
            rogue_ca: dir.write("rogue-ca.pem", rogue_ca_pem),
            rogue_cert: dir.write("rogue.pem", rogue_cert),
            rogue_key: dir.write("rogue.key", rogue_key),
            _dir: dir,
        }
    }
}

/// The server binary: `$WEIGHTINIT_BIN`, else the release build when it is newer than every
/// source file (so not stale; scripts/test builds it first), else the test build.
pub fn server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WEIGHTINIT_BIN") {
        return path.into();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let release = root.join("target/release/weightinit");
    let built = std::fs::metadata(&release).and_then(|m| m.modified()).ok();
    let newest_source = ["src", "crates", "proto", "Cargo.toml", "Cargo.lock"]
        .iter()
        .filter_map(|p| newest(&root.join(p)))
        .max();
    match (built, newest_source) {
        (Some(built), Some(source)) if built >= source => release,
        _ => PathBuf::from(env!("CARGO_BIN_EXE_weightinit")),
    }
}

/// The latest modification time of `path` or anything under it.
fn newest(path: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    let mut latest = meta.modified().ok()?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).ok()?.flatten() {
            if let Some(t) = newest(&entry.path()) {
                latest = latest.max(t);
            }
        }
    }
    Some(latest)
}

/// `weightinit serve` running as a child process on loopback ports.
pub struct Served {
    pub child: Child,
    pub addr: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub binary: PathBuf,
}

impl Served {
    /// Starts the server with `args` (after `serve --addr 127.0.0.1:0`); with `metrics`,
    /// also `--metrics-addr 127.0.0.1:0`.
    pub fn start(args: &[&str], metrics: bool) -> Self {
        Self::start_at("127.0.0.1:0", args, metrics)
    }

    /// [`Served::start`] on `addr`, e.g. the port of a server that was just killed.
    pub fn start_at(addr: &str, args: &[&str], metrics: bool) -> Self {
        let binary = server_binary();
        let mut command = Command::new(&binary);
        command.args(["serve", "--addr", addr]);
        if metrics {
            command.args(["--metrics-addr", "127.0.0.1:0"]);
        }
        let mut child = command
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("warn".into()),
            )
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("weightinit listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        let metrics = metrics.then(|| {
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            line.trim()
                .strip_prefix("weightinit metrics on http://")
                .and_then(|rest| rest.strip_suffix("/metrics"))
                .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
                .parse()
                .unwrap()
        });
        Self {
            child,
            addr,
            metrics,
            binary,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kB field of /proc/PID/status (VmRSS, VmHWM), in bytes.
    pub fn status_bytes(&self, field: &str) -> u64 {
        proc_status_bytes(self.child.id(), field)
    }

    pub fn rss(&self) -> u64 {
        self.status_bytes("VmRSS")
    }

    pub fn peak_rss(&self) -> u64 {
        self.status_bytes("VmHWM")
    }

    /// Threads of the server process.
    pub fn threads(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    pub fn scrape(&self) -> Metrics {
        scrape(self.metrics.expect("started with metrics"))
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `limit` for the process to exit; its exit code.
    pub fn wait(&mut self, limit: Duration) -> i32 {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().expect("exited, not killed by a signal");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the server did not exit within {limit:?}");
    }
}

impl Served {
    /// Kills the server as a crash would, without a goodbye to its clients.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

/// One scrape of a metrics endpoint: sample name with labels -> value.
#[derive(Debug)]
pub struct Metrics {
    pub text: String,
    pub samples: HashMap<String, f64>,
}

impl Metrics {
    /// Samples of a text exposition.
    pub fn parse(text: String) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').unwrap();
                (series.to_owned(), value.parse::<f64>().unwrap())
            })
            .collect();
        Self { text, samples }
    }

    /// The value of `series` (e.g. `weightinit_requests_total{rpc="Generate",code="OK"}`);
    /// 0 when the series is absent (counters that never moved are not always listed).
    pub fn get(&self, series: &str) -> f64 {
        self.samples.get(series).copied().unwrap_or(0.0)
    }
}

/// `GET /metrics` over a plain TCP connection, as Prometheus does; checks the response.
pub fn scrape(addr: SocketAddr) -> Metrics {
    let (status, headers, body) = http_get(addr, "GET", "/metrics");
    assert_eq!(status, 200, "{headers}\n{body}");
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{headers}"
    );
    Metrics::parse(body)
}

/// A raw HTTP/1.1 request; (status code, head, body).
pub fn http_get(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

/// The BLAKE3 digests of every tensor of `request`, computed in this process by the engine
/// in pieces of at most 4 MiB.
pub fn expected_digests(request: &GenerateRequest) -> Vec<[u8; 32]> {
    plan(request)
        .iter()
        .map(|tensor| {
            let mut hasher = blake3::Hasher::new();
            let mut buf = Vec::new();
            let step = (4 << 20) / tensor.dtype.size() as u64 * tensor.dtype.size() as u64;
            let total = tensor.byte_length();
            for offset in (0..total).step_by(step as usize) {
                buf.resize((total - offset).min(step) as usize, 0);
                tensor.fill(offset, &mut buf);
                hasher.update(&buf);
            }
            *hasher.finalize().as_bytes()
        })
        .collect()
}

/// The engine's plans of a request's tensors (validated with the default limits).
pub fn plan(request: &GenerateRequest) -> Vec<TensorPlan> {
    convert::request(request)
        .unwrap()
        .plan(&Limits::default())
        .unwrap()
        .tensors
}

/// A request from proto3 JSON.
pub fn request(value: serde_json::Value) -> GenerateRequest {
    serde_json::from_value(value).unwrap()
}

/// Percentile `p` (0..=100) of sorted `values`.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Sends and receives raw message bytes, so that anything can be put on the wire.
#[derive(Clone, Default)]
pub struct Raw;

pub struct RawCoder;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCoder;
    type Decoder = RawCoder;

    fn encoder(&mut self) -> RawCoder {
        RawCoder
    }

    fn decoder(&mut self) -> RawCoder {
        RawCoder
    }
}

impl Encoder for RawCoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Sends `message` as-is to the unary RPC `method` of WeightInit; the status code.
pub async fn raw_unary(
    channel: tonic::transport::Channel,
    method: &str,
    message: Vec<u8>,
) -> tonic::Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(format!(
        "/weightinit.v1.WeightInit/{method}"
    ))
    .unwrap();
    match grpc.unary(tonic::Request::new(message), path, Raw).await {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}
