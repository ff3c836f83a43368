//! What the client commands say when they cannot do what was asked, with the real binary
//! against real servers: `fetch`, `describe` and `healthcheck` name the address, the cause
//! and the fix (connection refused, unknown host, no port or an unknown scheme, TLS on one
//! side only, a certificate from another CA, a missing client certificate); HOST:PORT works
//! as plaintext; a fetch that cannot fit is refused before anything is written, and one
//! stopped by SIGINT leaves no partial file behind.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::{Pki, TempDir, TestServer};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_weightinit");

/// Runs the binary on a blocking thread (in-process servers keep serving meanwhile), with
/// none of the client's environment variables set.
async fn run(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut command = Command::new(BIN);
        command.args(args);
        for name in [
            "WEIGHTINIT_SERVER",
            "WEIGHTINIT_TLS_CA",
            "WEIGHTINIT_CLIENT_TLS_CERT",
            "WEIGHTINIT_CLIENT_TLS_KEY",
            "WEIGHTINIT_TLS_SERVER_NAME",
            "WEIGHTINIT_AUTH_TOKEN_FILE",
            "WEIGHTINIT_HEALTHCHECK_ADDR",
        ] {
            command.env_remove(name);
        }
        command.output().unwrap()
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|a| a.to_string()).collect()
}

fn stderr_of_failure(output: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{what} should fail: {stderr}");
    stderr
}

/// `describe`, `fetch` (with `--retries 1`) and `healthcheck` at `addr` with `extra` flags:
/// each one's stderr, after checking that each failed.
async fn all_three(dir: &TempDir, addr: &str, extra: &[&str]) -> [String; 3] {
    let request = dir.write(
        "request.json",
        r#"{"seed": 1, "tensors": [{"name": "w", "shape": [4, 4], "init": {"xavierUniform": {}}}]}"#,
    );
    let request = request.to_str().unwrap();
    let out = dir.0.join("out.bin");
    let out = out.to_str().unwrap();
    let mut describe = args(&["describe", "--request", request, "--server", addr]);
    let mut fetch = args(&[
        "fetch",
        "--request",
        request,
        "--out",
        out,
        "--server",
        addr,
    ]);
    fetch.extend(args(&["--retries", "1"]));
    let mut health = args(&["healthcheck", "--addr", addr]);
    for command in [&mut describe, &mut fetch, &mut health] {
        command.extend(args(extra));
    }
    let said = [
        stderr_of_failure(&run(describe).await, "describe"),
        stderr_of_failure(&run(fetch).await, "fetch"),
        stderr_of_failure(&run(health).await, "healthcheck"),
    ];
    assert!(!dir.0.join("out.bin").exists(), "nothing written");
    said
}

/// Every one of `said` contains every one of `parts`.
fn all_say(said: &[String], parts: &[&str]) {
    for text in said {
        for part in parts {
            assert!(text.contains(part), "{part:?} not in: {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_failures_name_the_address_the_cause_and_the_fix() {
    let dir = TempDir::new("client-errors");
    // A port just released: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let [describe, fetch, health] = all_three(&dir, &closed.to_string(), &[]).await;
    let refused = format!("connection refused at http://{closed}");
    all_say(
        &[describe.clone(), fetch.clone(), health.clone()],
        &[&refused, "weightinit serve --addr"],
    );
    assert!(describe.contains("--server") && health.contains("--addr"));
    // The retry line says what is retried and how many retries are left before giving up.
    assert!(
        fetch.contains("Describe: connection refused")
            && fetch.contains("retry 1 of 1 before giving up")
            && fetch.contains("Describe: gave up after 2 failed attempts"),
        "{fetch}"
    );

    // RFC 2606 reserves .invalid: it never resolves.
    let said = all_three(&dir, "http://no-such-host.invalid:50051", &[]).await;
    all_say(&said, &["unknown host no-such-host.invalid"]);

    let said = all_three(&dir, "localhost", &[]).await;
    all_say(&said, &["no valid port; write --", "localhost:50051"]);
    // As the Python client: a URL's default port (80) is not a weightinit server's.
    let said = all_three(&dir, "http://127.0.0.1", &[]).await;
    all_say(&said, &["no valid port; write --", "127.0.0.1:50051"]);
    let said = all_three(&dir, "grpc://localhost:50051", &[]).await;
    all_say(
        &said,
        &["grpc:// is not a scheme", "HOST:PORT or http://HOST:PORT"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_port_is_plaintext_and_tls_mismatches_are_named() {
    let dir = TempDir::new("client-tls");
    let pki = Pki::new();
    let plain = TestServer::start().await;
    let tls = TestServer::start_with(|c| {
        c.tls_cert = Some(pki.server_cert.clone());
        c.tls_key = Some(pki.server_key.clone());
    })
    .await;
    let request = dir.write(
        "request.json",
        r#"{"seed": 1, "tensors": [{"name": "w", "shape": [4, 4], "init": {"xavierUniform": {}}}]}"#,
    );
    let request = request.to_str().unwrap().to_owned();
    // HOST:PORT, as grpcurl and the Python client take it, is plaintext.
    let addr = plain.addr.to_string();
    let described = run(args(&[
        "describe",
        "--request",
        &request,
        "--server",
        &addr,
    ]))
    .await;
    assert!(described.status.success(), "{described:?}");
    let health = run(args(&["healthcheck", "--addr", &addr])).await;
    assert!(health.status.success(), "{health:?}");

    // A plaintext client at a TLS port: not retried (--retries 1 would say "retry 1 of 1").
    let tls_addr = tls.addr.to_string();
    let said = all_three(&dir, &tls_addr, &[]).await;
    all_say(
        &said,
        &[
            &format!("TLS mismatch at http://{tls_addr}: the server speaks TLS"),
            &format!("https://{tls_addr} with --tls-ca"),
        ],
    );
    assert!(!said[1].contains("retrying"), "{}", said[1]);

    // A TLS client at a plaintext port.
    let ca = pki.ca.to_str().unwrap();
    let said = all_three(&dir, &addr, &["--tls-ca", ca]).await;
    all_say(
        &said,
        &[
            &format!("TLS mismatch at https://{addr}: the server speaks plaintext"),
            &format!("http://{addr} without --tls-ca"),
        ],
    );

    // A certificate from another CA.
    let rogue = pki.rogue_ca.to_str().unwrap();
    let said = all_three(&dir, &tls_addr, &["--tls-ca", rogue]).await;
    all_say(
        &said,
        &["the server's certificate is not signed by the CA in --tls-ca"],
    );

    // https:// without a CA: what to write instead.
    let said = all_three(&dir, &format!("https://{tls_addr}"), &[]).await;
    all_say(&said, &["needs --tls-ca", &format!("http://{tls_addr}")]);

    // The right CA works over HOST:PORT too.
    let health = run(args(&["healthcheck", "--addr", &tls_addr, "--tls-ca", ca])).await;
    assert!(health.status.success(), "{health:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_wants_a_client_certificate_says_so() {
    let dir = TempDir::new("client-mtls");
    let pki = Pki::new();
    let mutual = TestServer::start_with(|c| {
        c.tls_cert = Some(pki.server_cert.clone());
        c.tls_key = Some(pki.server_key.clone());
        c.tls_client_ca = Some(pki.ca.clone());
    })
    .await;
    let said = all_three(
        &dir,
        &mutual.addr.to_string(),
        &["--tls-ca", pki.ca.to_str().unwrap()],
    )
    .await;
    all_say(
        &said,
        &["wants a client certificate", "--tls-cert and --tls-key"],
    );
}

/// Free bytes for an unprivileged user in `dir`'s file system, as df reports them.
fn df_available(dir: &Path) -> u64 {
    let output = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(dir)
        .output()
        .expect("df runs");
    let text = String::from_utf8(output.stdout).unwrap();
    text.lines().nth(1).unwrap().trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_that_cannot_fit_is_refused_and_sigint_removes_the_partial_file() {
    let dir = TempDir::new("client-space");
    // Twice the free space, in float32 rows of 4 KiB.
    let rows = (2 * df_available(&dir.0)).div_ceil(4096);
    let server = TestServer::start_with(|c| c.max_request_bytes = u64::MAX).await;
    let request = dir.write(
        "huge.json",
        serde_json::to_vec(&json!({"seed": 3, "tensors": [
            {"name": "huge", "shape": [rows, 1024], "init": {"normal": {}}}]}))
        .unwrap(),
    );
    let out = dir.0.join("model.safetensors");
    let fetch = |extra: &[&str]| {
        let mut list = args(&["fetch", "--server", &server.url(), "--out"]);
        list.push(out.to_str().unwrap().to_owned());
        list.extend(args(&["--request", request.to_str().unwrap()]));
        list.extend(args(extra));
        list
    };
    let output = run(fetch(&[])).await;
    let stderr = stderr_of_failure(&output, "an oversized fetch");
    assert!(
        stderr.contains("not enough space") && stderr.contains("--no-space-check"),
        "{stderr}"
    );
    assert!(stderr.contains(&dir.0.display().to_string()), "{stderr}");
    let files = std::fs::read_dir(&dir.0).unwrap().count();
    assert_eq!(files, 1, "only the request: nothing written");

    // Forced past the check, it starts writing (a sparse file, filled as data arrives);
    // SIGINT then stops it and removes the partial file.
    let partial = dir.0.join(".model.safetensors.partial");
    let mut child = Command::new(BIN)
        .args(fetch(&["--no-space-check"]))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::fs::metadata(&partial).map_or(true, |m| m.len() == 0) {
        assert!(child.try_wait().unwrap().is_none(), "fetch ended early");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no partial file"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("stopped by SIGINT"), "{stderr}");
    assert!(!partial.exists(), "the partial file is removed");
    assert!(!out.exists());
}
