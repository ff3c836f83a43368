//! `weightinit fetch` and `describe`, the real binary against a real server: every vector
//! case into safetensors (checked against the vectors), npy and raw; `--local` equal to a
//! server byte for byte; overrides and stdin; refusals; and a download that survives its
//! server being killed and restarted twice.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::{Case, Served, TestServer, hex, vectors};
use serde_json::{Value, json};
use weightinit::proto::{TensorHeader, weight_init_client::WeightInitClient};

const BIN: &str = env!("CARGO_BIN_EXE_weightinit");

/// A scratch directory for one test, removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fetch-{test}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// The path of `name` in the directory, as a string for command lines.
    fn path(&self, name: &str) -> String {
        self.0.join(name).into_os_string().into_string().unwrap()
    }

    /// Writes `value` as JSON to `name`; returns its path.
    fn json(&self, name: &str, value: &Value) -> String {
        let path = self.path(name);
        std::fs::write(&path, serde_json::to_vec(value).unwrap()).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the binary to completion on a blocking thread, so that an in-process server keeps
/// serving meanwhile.
async fn run(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || Command::new(BIN).args(args).output().unwrap())
        .await
        .unwrap()
}

/// `weightinit fetch` from `source` (`--server URL` or `--local`) into `out`.
async fn fetch(source: &[&str], request: &str, out: &str, flags: &[&str]) -> Output {
    let mut args = vec!["fetch"];
    args.extend_from_slice(source);
    args.extend_from_slice(&["--request", request, "--out", out]);
    args.extend_from_slice(flags);
    run(&args).await
}

fn succeeded(output: &Output) {
    assert!(
        output.status.success(),
        "weightinit failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn failed(output: &Output) -> String {
    assert!(!output.status.success(), "weightinit should have failed");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The resolved headers of a case, as Describe gives them.
async fn headers(server: &TestServer, case: &Case) -> Vec<TensorHeader> {
    let mut client: WeightInitClient<_> = server.client().await;
    client
        .describe(case.request())
        .await
        .unwrap()
        .into_inner()
        .tensors
}

/// The safetensors dtype code and the npy descr of a proto dtype number.
fn codes(dtype: i32) -> (&'static str, &'static str) {
    use weightinit::proto::DType;
    match DType::try_from(dtype).unwrap() {
        DType::DtypeFloat32 => ("F32", "<f4"),
        DType::DtypeFloat64 => ("F64", "<f8"),
        DType::DtypeFloat16 => ("F16", "<f2"),
        DType::DtypeBfloat16 => ("BF16", "<u2"),
        DType::DtypeUnspecified => panic!("a header's dtype is never UNSPECIFIED"),
    }
}

/// A safetensors file, parsed and checked for structure.
struct Safetensors {
    header: Value,
    data: Vec<u8>,
}

impl Safetensors {
    fn read(path: impl AsRef<Path>) -> Self {
        let bytes = std::fs::read(path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + n) % 8, 0, "data 8-byte aligned");
        let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        Self {
            header,
            data: bytes[8 + n..].to_vec(),
        }
    }

    fn metadata(&self, key: &str) -> &str {
        self.header["__metadata__"][key].as_str().unwrap()
    }

    /// The tensor's bytes, after checking its dtype and shape against `expected`.
    fn tensor(&self, expected: &TensorHeader) -> &[u8] {
        let entry = &self.header[&expected.name];
        assert_eq!(entry["dtype"], codes(expected.dtype).0, "{}", expected.name);
        assert_eq!(entry["shape"], json!(expected.output_shape));
        let offsets = entry["data_offsets"].as_array().unwrap();
        let (begin, end) = (offsets[0].as_u64().unwrap(), offsets[1].as_u64().unwrap());
        &self.data[begin as usize..end as usize]
    }
}

/// An npy file's bytes after checking its header against `expected`.
fn npy_data(path: &Path, expected: &TensorHeader) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + len) % 64, 0, "data 64-byte aligned");
    let dict = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
    let shape = match expected.output_shape.as_slice() {
        [n] => format!("({n},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let want = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
        codes(expected.dtype).1
    );
    assert_eq!(dict.trim_end(), want, "{}", path.display());
    assert!(dict.ends_with('\n'));
    bytes[10 + len..].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_every_vector_and_local_equals_remote() {
    let server = TestServer::start().await;
    let dir = Scratch::new("vectors");
    for case in vectors().cases {
        let request = dir.json(&format!("{}.json", case.case), &case.request);
        let remote = dir.path(&format!("{}.safetensors", case.case));
        let local = dir.path(&format!("{}-local.safetensors", case.case));
        let url = server.url();
        succeeded(&fetch(&["--server", &url], &request, &remote, &[]).await);
        succeeded(&fetch(&["--local"], &request, &local, &[]).await);
        assert_eq!(
            std::fs::read(&remote).unwrap(),
            std::fs::read(&local).unwrap(),
            "{}: --local",
            case.case
        );
        let file = Safetensors::read(&remote);
        let seed = case.request.get("seed").map_or(0, |s| s.as_u64().unwrap());
        assert_eq!(file.metadata("seed"), seed.to_string());
        assert_eq!(file.metadata("algorithm"), "1");
        let headers = headers(&server, &case).await;
        assert_eq!(
            file.header.as_object().unwrap().len(),
            case.expect.len() + 1
        );
        let mut end = 0;
        for (header, expected) in headers.iter().zip(&case.expect) {
            let what = format!("{}/{}", case.case, expected.name);
            let data = file.tensor(header);
            assert_eq!(data.len() as u64, expected.byte_length, "{what}");
            assert_eq!(
                hex(blake3::hash(data).as_bytes()),
                expected.blake3,
                "{what}"
            );
            assert_eq!(
                file.metadata(&format!("blake3.{}", expected.name)),
                expected.blake3,
                "{what}"
            );
            end += data.len();
        }
        assert_eq!(
            end,
            file.data.len(),
            "{}: nothing after the tensors",
            case.case
        );
        assert!(
            std::fs::read_dir(&dir.0).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".partial")),
            "no partial file left"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npy_and_raw_outputs_hold_the_same_bytes() {
    let server = TestServer::start().await;
    let url = server.url();
    let dir = Scratch::new("npy-raw");
    let cases = vectors().cases;
    for name in ["keras_presets", "dtype_bfloat16", "dtype_float64", "slices"] {
        let case = cases.iter().find(|c| c.case == name).unwrap();
        let request = dir.json(&format!("{name}.json"), &case.request);
        // A path ending in / means npy; so does --format with any name.
        let npy = format!("{}/", dir.path(name));
        let forced = dir.path(&format!("{name}.forced"));
        let raw = dir.path(&format!("{name}.bin"));
        succeeded(&fetch(&["--server", &url], &request, &npy, &[]).await);
        succeeded(&fetch(&["--local"], &request, &forced, &["--format", "npy"]).await);
        succeeded(&fetch(&["--server", &url], &request, &raw, &[]).await);
        let raw = std::fs::read(raw).unwrap();
        let mut offset = 0;
        let headers = headers(&server, case).await;
        assert_eq!(
            std::fs::read_dir(dir.path(name)).unwrap().count(),
            headers.len()
        );
        for (header, expected) in headers.iter().zip(&case.expect) {
            let file = weightinit::client::output::npy_file_name(&header.name);
            let path = Path::new(&npy).join(&file);
            let data = npy_data(&path, header);
            assert_eq!(
                hex(blake3::hash(&data).as_bytes()),
                expected.blake3,
                "{name}/{file}"
            );
            let forced = std::fs::read(Path::new(&forced).join(&file)).unwrap();
            assert_eq!(
                forced,
                std::fs::read(&path).unwrap(),
                "{name}/{file}: --local --format npy"
            );
            assert_eq!(
                raw[offset..offset + data.len()],
                data,
                "{name}: raw in request order"
            );
            offset += data.len();
        }
        assert_eq!(offset, raw.len());
    }
    assert!(
        Path::new(&dir.path("keras_presets/dense__kernel.npy")).exists(),
        "'/' becomes '__'"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_and_stdin() {
    let dir = Scratch::new("overrides");
    let mut request = vectors().cases.remove(0).request;
    let piped = dir.path("piped.safetensors");
    let mut child = Command::new(BIN)
        .args([
            "fetch",
            "--local",
            "--request",
            "-",
            "--seed",
            "43",
            "--dtype",
            "bfloat16",
        ])
        .args(["--out", &piped])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    succeeded(&output);
    request["seed"] = json!(43);
    request["dtype"] = json!("DTYPE_BFLOAT16");
    let written = dir.json("overridden.json", &request);
    let direct = dir.path("direct.safetensors");
    succeeded(&fetch(&["--local"], &written, &direct, &[]).await);
    assert_eq!(
        std::fs::read(&piped).unwrap(),
        std::fs::read(&direct).unwrap()
    );
    let file = Safetensors::read(&piped);
    assert_eq!(file.metadata("seed"), "43");
    assert_eq!(file.header["fc1.weight"]["dtype"], "BF16");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_fail_at_once_and_leave_nothing() {
    let server = TestServer::start().await;
    let url = server.url();
    let dir = Scratch::new("refusals");
    let out = dir.path("model.safetensors");
    let bad = dir.json(
        "bad.json",
        &json!({"tensors": [{"name": "w", "shape": [0], "init": {"xavierUniform": {}}}]}),
    );
    let started = Instant::now();
    let stderr = failed(&fetch(&["--server", &url], &bad, &out, &[]).await);
    assert!(stderr.contains("InvalidArgument: tensors[0]"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(5), "not retried");
    let not_json = dir.path("not.json");
    std::fs::write(&not_json, "{\"tensors\": 3}").unwrap();
    let stderr = failed(&fetch(&["--local"], &not_json, &out, &[]).await);
    assert!(
        stderr.contains("not a GenerateRequest in proto3 JSON"),
        "{stderr}"
    );
    let good = dir.json("good.json", &vectors().cases[0].request);
    let stderr = failed(&fetch(&["--local"], &good, &dir.path("model.pt"), &[]).await);
    assert!(stderr.contains("--format"), "{stderr}");
    // A port just released: every attempt fails, two retries, then an error.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let stderr = failed(
        &fetch(
            &["--server", &format!("http://{closed}")],
            &good,
            &out,
            &["--retries", "2"],
        )
        .await,
    );
    assert!(
        stderr.contains("gave up after 3 failed attempts"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(&dir.0).unwrap().count(),
        3,
        "only the requests: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_prints_the_table() {
    let server = TestServer::start().await;
    let url = server.url();
    let dir = Scratch::new("describe");
    let case = vectors()
        .cases
        .into_iter()
        .find(|c| c.case == "slices")
        .unwrap();
    let request = dir.json("slices.json", &case.request);
    let remote = run(&["describe", "--server", &url, "--request", &request]).await;
    succeeded(&remote);
    let local = run(&["describe", "--local", "--request", &request]).await;
    succeeded(&local);
    assert_eq!(remote.stdout, local.stdout, "--local");
    let table = String::from_utf8(remote.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 5, "{table}");
    assert!(lines[0].starts_with("NAME "), "{table}");
    for column in [
        "SHAPE",
        "OUTPUT",
        "DTYPE",
        "SCHEME",
        "FAN_IN",
        "FAN_OUT",
        "DISTRIBUTION",
        "GAIN",
        "BYTES",
    ] {
        assert!(lines[0].contains(column), "{column}: {table}");
    }
    assert!(
        lines[1].starts_with("attn.qkv  [96, 64]   [32, 64]  float32  xavier_uniform"),
        "{table}"
    );
    assert!(lines[1].contains("uniform ["), "{table}");
    assert!(lines[3].starts_with("flat "), "{table}");
    let total: u64 = case.expect.iter().map(|e| e.byte_length).sum();
    assert!(
        lines[4].starts_with(&format!("total: 3 tensors, {total} bytes")),
        "{table}"
    );
}

#[test]
fn survives_its_server_killed_and_restarted_mid_download() {
    let dir = Scratch::new("restart");
    // 384 MiB: an unsliced tensor (continued where it stopped) and a dims-sliced one
    // (started again), so that the download takes a while.
    let request = dir.json(
        "big.json",
        &json!({"seed": 5, "tensors": [
            {"name": "embed.weight", "shape": [16384, 4096], "init": {"normal": {"std": 0.02}}},
            {"name": "proj.weight", "shape": [8192, 8192], "init": {"xavierUniform": {}},
             "slice": {"dims": {"ranges": [{"start": 0, "stop": 4096}, {"stop": 8192}]}}},
            {"name": "proj.bias", "shape": [8192], "init": {"zeros": {}}}
        ]}),
    );
    let mut server = Served::start(&[], false);
    let addr = server.addr.to_string();
    let out = dir.path("model.safetensors");
    let partial = dir.path(".model.safetensors.partial");
    let url = server.url();
    let mut fetch = Command::new(BIN)
        .args([
            "fetch",
            "--server",
            &url,
            "--request",
            &request,
            "--out",
            &out,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the server once a quarter of the first tensor is on disk, and again halfway into
    // the second; each time a new one takes over the port at once. The partial file is
    // sparse, so its allocated size is what has been written.
    for written in [64 << 20, 320 << 20] {
        let started = Instant::now();
        while std::fs::metadata(&partial).map_or(0, |m| m.blocks() * 512) < written {
            assert!(
                fetch.try_wait().unwrap().is_none(),
                "fetch ended before the kill"
            );
            assert!(started.elapsed() < Duration::from_secs(60), "no progress");
            std::thread::sleep(Duration::from_millis(2));
        }
        server.kill();
        server = Served::start_at(&addr, &[], false);
    }
    let output = fetch.wait_with_output().unwrap();
    succeeded(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("retrying"), "{stderr}");
    assert!(stderr.contains("BLAKE3 verified, after"), "{stderr}");
    drop(server);
    let local = dir.path("local.safetensors");
    let output = Command::new(BIN)
        .args([
            "fetch",
            "--local",
            "--quiet",
            "--request",
            &request,
            "--out",
            &local,
        ])
        .output()
        .unwrap();
    succeeded(&output);
    assert!(output.stderr.is_empty(), "--quiet");
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&local).unwrap(),
        "the resumed file differs from one made in one go"
    );
}
