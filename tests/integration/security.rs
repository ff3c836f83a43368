//! TLS, mutual TLS and the bearer token, with certificates made here (rcgen): the right
//! clients get byte-identical data, the others are refused; health stays open for probes;
//! grpcurl and `weightinit healthcheck` work with -cacert/-cert/-key and a token; bad TLS
//! or token configurations stop the binary with a message naming the flag.

use crate::util;
use base64::prelude::{BASE64_STANDARD, Engine as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::util::{Metrics, Pki, Served, TempDir, TestServer, expected_digests, grpcurl, request};
use serde_json::json;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use weightinit::proto::{
    GenerateRequest, GetInfoRequest, generate_response::Item, weight_init_client::WeightInitClient,
};
use weightinit::service::metrics::Rpc;

const TOKEN: &str = "correct-horse-battery-staple-42";

fn small() -> GenerateRequest {
    request(json!({"seed": 7, "tensors": [
        {"name": "w", "shape": [64, 32], "init": {"kaimingUniform": {}}},
        {"name": "b", "shape": [64], "init": {"zeros": {}}}]}))
}

/// A channel to `addr` over TLS trusting `ca`, presenting `identity` if given.
async fn tls_channel(
    addr: SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// A server that wants both a client certificate signed by `pki`'s CA and the token.
async fn locked_down(pki: &Pki, token_file: &Path) -> TestServer {
    TestServer::start_with(|c| {
        c.tls_cert = Some(pki.server_cert.clone());
        c.tls_key = Some(pki.server_key.clone());
        c.tls_client_ca = Some(pki.ca.clone());
        c.auth_token_file = Some(token_file.to_owned());
    })
    .await
}

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

/// Generate's tensors reassembled; Err on any failure status.
async fn generate(
    channel: Channel,
    message: GenerateRequest,
    token: Option<&str>,
) -> Result<Vec<Vec<u8>>, Status> {
    let mut client = WeightInitClient::new(channel);
    let mut stream = client
        .generate(with_token(message, token))
        .await?
        .into_inner();
    let mut tensors: Vec<Vec<u8>> = Vec::new();
    while let Some(message) = stream.message().await? {
        match message.item.unwrap() {
            Item::Header(_) => tensors.push(Vec::new()),
            Item::Chunk(chunk) => tensors.last_mut().unwrap().extend_from_slice(&chunk.data),
            Item::End(_) => {}
        }
    }
    Ok(tensors)
}

fn assert_identical(tensors: &[Vec<u8>], message: &GenerateRequest) {
    let expected = expected_digests(message);
    assert_eq!(tensors.len(), expected.len());
    for (data, digest) in tensors.iter().zip(&expected) {
        assert_eq!(blake3::hash(data).as_bytes(), digest, "byte-identical");
    }
}

async fn health(channel: Channel) -> Result<i32, Status> {
    Ok(HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner()
        .status)
}

/// A connection that must fail: at connect, or at its first RPC (TLS 1.3 reports a refused
/// client certificate only after the client's side of the handshake is done).
async fn refused(channel: Result<Channel, tonic::transport::Error>, what: &str) {
    let Ok(channel) = channel else { return };
    let result = tokio::time::timeout(Duration::from_secs(10), health(channel))
        .await
        .unwrap_or_else(|_| panic!("{what}: hung instead of failing"));
    let status = result.expect_err(what);
    assert!(
        matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
        ),
        "{what}: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_identical_bytes_and_refuses_plaintext_and_strangers() {
    let pki = Pki::new();
    let server = TestServer::start_with(|c| {
        c.tls_cert = Some(pki.server_cert.clone());
        c.tls_key = Some(pki.server_key.clone());
    })
    .await;
    let channel = tls_channel(server.addr, &pki.ca, None).await.unwrap();
    assert_eq!(health(channel.clone()).await.unwrap(), 1, "SERVING");
    let tensors = generate(channel.clone(), small(), None).await.unwrap();
    assert_identical(&tensors, &small());
    let info = WeightInitClient::new(channel)
        .get_info(GetInfoRequest {})
        .await
        .unwrap();
    assert_eq!(info.into_inner().algorithms, vec![1]);

    // Plaintext to a TLS port, and a client that trusts another CA: refused.
    let plaintext = Endpoint::from_shared(server.url())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await;
    refused(plaintext, "plaintext client").await;
    refused(
        tls_channel(server.addr, &pki.rogue_ca, None).await,
        "client trusting another CA",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_certificate_from_the_ca() {
    let pki = Pki::new();
    let server = TestServer::start_with(|c| {
        c.tls_cert = Some(pki.server_cert.clone());
        c.tls_key = Some(pki.server_key.clone());
        c.tls_client_ca = Some(pki.ca.clone());
    })
    .await;
    refused(
        tls_channel(server.addr, &pki.ca, None).await,
        "client without a certificate",
    )
    .await;
    refused(
        tls_channel(
            server.addr,
            &pki.ca,
            Some((&pki.rogue_cert, &pki.rogue_key)),
        )
        .await,
        "client with a certificate from another CA",
    )
    .await;
    let good = tls_channel(
        server.addr,
        &pki.ca,
        Some((&pki.client_cert, &pki.client_key)),
    )
    .await
    .unwrap();
    assert_eq!(health(good.clone()).await.unwrap(), 1);
    let tensors = generate(good, small(), None).await.unwrap();
    assert_identical(&tensors, &small());
    assert_eq!(server.shared.active_streams(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_token_guards_every_rpc_but_health() {
    let dir = TempDir::new("token");
    let token_file = dir.write("token", format!("{TOKEN}\n"));
    let server = TestServer::start_with(|c| c.auth_token_file = Some(token_file.clone())).await;
    let channel = Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(health(channel.clone()).await.unwrap(), 1, "health is open");

    for token in [None, Some("wrong-token"), Some("")] {
        let mut client = WeightInitClient::new(channel.clone());
        let what = format!("token {token:?}");
        let status = generate(channel.clone(), small(), token)
            .await
            .expect_err(&what);
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
        let status = client
            .describe(with_token(small(), token))
            .await
            .expect_err(&what);
        assert_eq!(status.code(), Code::Unauthenticated, "{what}");
        let status = client
            .digest(with_token(small(), token))
            .await
            .expect_err(&what);
        assert_eq!(status.code(), Code::Unauthenticated, "{what}");
        let status = client
            .get_info(with_token(GetInfoRequest {}, token))
            .await
            .expect_err(&what);
        assert_eq!(status.code(), Code::Unauthenticated, "{what}");
        assert!(!status.message().contains(TOKEN));
    }
    let metrics = &server.shared.metrics;
    assert_eq!(metrics.requests(Rpc::Generate, Code::Unauthenticated), 3);
    assert_eq!(metrics.requests(Rpc::GetInfo, Code::Unauthenticated), 3);

    let tensors = generate(channel.clone(), small(), Some(TOKEN))
        .await
        .unwrap();
    assert_identical(&tensors, &small());
    let mut client = WeightInitClient::new(channel);
    let digests = client
        .digest(with_token(small(), Some(TOKEN)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(digests.digests.len(), 2);
    assert_eq!(metrics.requests(Rpc::Generate, Code::Ok), 1);
}

/// Runs grpcurl; (success, stdout, stderr).
fn run_grpcurl(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(grpcurl())
        .args(["-max-time", "20"])
        .args(args)
        .output()
        .expect("grpcurl runs (scripts/test installs it into .venv)");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_with_cacert_cert_key_and_a_token() {
    let pki = Pki::new();
    let dir = TempDir::new("grpcurl-token");
    let token_file = dir.write("token", TOKEN);
    let server = locked_down(&pki, &token_file).await;
    let addr = server.addr.to_string();
    let (ca, cert, key) = (
        pki.ca.to_str().unwrap(),
        pki.client_cert.to_str().unwrap(),
        pki.client_key.to_str().unwrap(),
    );
    let bearer = format!("authorization: Bearer {TOKEN}");
    let tls = ["-cacert", ca, "-cert", cert, "-key", key];
    let with = |extra: &[&str], rest: &[&str]| -> (bool, String, String) {
        let args: Vec<&str> = tls
            .iter()
            .copied()
            .chain(extra.iter().copied())
            .chain([addr.as_str()])
            .chain(rest.iter().copied())
            .collect();
        run_grpcurl(&args)
    };

    // Everything works with the CA, a client certificate and the token.
    let (ok, out, err) = with(&["-H", &bearer], &["list"]);
    assert!(ok, "{err}");
    assert!(
        out.lines().any(|l| l == "weightinit.v1.WeightInit"),
        "{out}"
    );
    let (ok, out, err) = with(&["-H", &bearer], &["weightinit.v1.WeightInit/GetInfo"]);
    assert!(ok, "{err}");
    assert!(out.contains("\"algorithms\""), "{out}");
    let body = serde_json::to_string(&serde_json::to_value(small()).unwrap()).unwrap();
    let (ok, out, err) = with(
        &["-H", &bearer, "-d", &body],
        &["weightinit.v1.WeightInit/Digest"],
    );
    assert!(ok, "{err}");
    let expected = expected_digests(&small());
    let digests: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        BASE64_STANDARD
            .decode(digests["digests"][0]["blake3"].as_str().unwrap())
            .unwrap(),
        expected[0]
    );

    // Health needs the certificate (it is TLS) but no token. grpcurl finds services through
    // reflection, which needs the token, so a tokenless probe names the schema itself.
    let protoset = dir.write("health.protoset", tonic_health::pb::FILE_DESCRIPTOR_SET);
    let (ok, out, err) = with(
        &["-protoset", protoset.to_str().unwrap()],
        &["grpc.health.v1.Health/Check"],
    );
    assert!(ok, "{err}");
    assert!(out.contains("SERVING"), "{out}");
    let (ok, out, err) = with(&["-H", &bearer], &["grpc.health.v1.Health/Check"]);
    assert!(ok && out.contains("SERVING"), "{err}");

    // Without the token: UNAUTHENTICATED, for RPCs and reflection alike.
    let (ok, _, err) = with(&[], &["weightinit.v1.WeightInit/GetInfo"]);
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    let (ok, _, err) = with(&["-H", "authorization: Bearer nope"], &["list"]);
    assert!(!ok && err.contains("Unauthenticated"), "{err}");

    // Without a client certificate, or in plaintext: no connection at all.
    let (ok, _, err) = run_grpcurl(&["-cacert", ca, "-H", &bearer, &addr, "list"]);
    assert!(!ok, "no client certificate: {err}");
    let (ok, _, err) = run_grpcurl(&["-plaintext", "-H", &bearer, &addr, "list"]);
    assert!(!ok, "plaintext: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_speaks_tls_mutual_tls_and_sends_the_token() {
    let pki = Pki::new();
    let dir = TempDir::new("healthcheck");
    let token_file = dir.write("token", TOKEN);
    let server = locked_down(&pki, &token_file).await;
    let https = format!("https://{}", server.addr);
    let all = vec![
        pki.ca.clone(),
        pki.client_cert.clone(),
        pki.client_key.clone(),
        token_file.clone(),
    ];
    let output = healthcheck(https.clone(), all.clone()).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // http:// with --tls-ca is dialled as https://; the token is optional for health.
    let output = healthcheck(server.url(), all[..3].to_vec()).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Without a client certificate the server refuses: exit 1 with a reason.
    let output = healthcheck(https, vec![pki.ca.clone()]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(!output.stderr.is_empty());
}

/// Runs `weightinit healthcheck --addr ADDR` with --tls-ca, --tls-cert, --tls-key and
/// --auth-token-file set to the first `paths`.
async fn healthcheck(addr: String, paths: Vec<PathBuf>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_weightinit"));
        command.args(["healthcheck", "--addr", &addr]);
        let flags = ["--tls-ca", "--tls-cert", "--tls-key", "--auth-token-file"];
        for (flag, path) in flags.iter().zip(&paths) {
            command.arg(flag).arg(path);
        }
        for name in [
            "WEIGHTINIT_TLS_CA",
            "WEIGHTINIT_CLIENT_TLS_CERT",
            "WEIGHTINIT_CLIENT_TLS_KEY",
            "WEIGHTINIT_AUTH_TOKEN_FILE",
        ] {
            command.env_remove(name);
        }
        command.output().unwrap()
    })
    .await
    .unwrap()
}

/// `weightinit serve` with `args` must exit 2 at once with `expected` on stderr.
fn refuses_to_start(args: &[&str], expected: &str) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weightinit"))
        .args(["serve", "--addr", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("{args:?}: the server started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(
        stderr.contains(expected),
        "{args:?}: expected {expected:?} in {stderr}"
    );
    assert!(output.stdout.is_empty(), "never listened");
}

#[test]
fn bad_tls_and_token_configurations_stop_the_server_with_a_clear_message() {
    let pki = Pki::new();
    let dir = TempDir::new("badconfig");
    let garbage = dir.write("garbage.pem", "not a certificate\n");
    let empty_token = dir.write("empty-token", "\n");
    let p = |path: &Path| path.to_str().unwrap().to_owned();
    let (cert, key, ca) = (p(&pki.server_cert), p(&pki.server_key), p(&pki.ca));
    refuses_to_start(&["--tls-cert", &cert], "--tls-cert needs --tls-key");
    refuses_to_start(&["--tls-key", &key], "--tls-key needs --tls-cert");
    refuses_to_start(&["--tls-client-ca", &ca], "--tls-client-ca needs TLS");
    refuses_to_start(
        &["--tls-cert", &p(&garbage), "--tls-key", &key],
        "no PEM block of type CERTIFICATE",
    );
    refuses_to_start(&["--tls-cert", &cert, "--tls-key", &cert], "--tls-key");
    refuses_to_start(
        &["--tls-cert", "/nonexistent/cert.pem", "--tls-key", &key],
        "--tls-cert /nonexistent/cert.pem: cannot read",
    );
    refuses_to_start(
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &p(&garbage),
        ],
        "--tls-client-ca",
    );
    // A key that is not the certificate's.
    refuses_to_start(
        &["--tls-cert", &cert, "--tls-key", &p(&pki.client_key)],
        "--tls-cert",
    );
    refuses_to_start(
        &["--auth-token-file", &p(&empty_token)],
        "--auth-token-file",
    );
    refuses_to_start(
        &["--auth-token-file", "/nonexistent/token"],
        "--auth-token-file: cannot read /nonexistent/token",
    );
}

/// Files a server is started with, rewritten in place to rotate them.
struct Rotating {
    dir: TempDir,
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
    token: PathBuf,
}

impl Rotating {
    fn new(pki: &Pki, token: &str) -> Self {
        let dir = TempDir::new("rotating");
        let copy = |name: &str, from: &Path| dir.write(name, std::fs::read(from).unwrap());
        Self {
            cert: copy("server.pem", &pki.server_cert),
            key: copy("server.key", &pki.server_key),
            client_ca: copy("clients.pem", &pki.ca),
            token: dir.write("token", token),
            dir,
        }
    }

    /// Replaces every file: `pki`'s certificates, and `token`.
    fn rotate(&self, pki: &Pki, token: &str) {
        for (to, from) in [
            (&self.cert, &pki.server_cert),
            (&self.key, &pki.server_key),
            (&self.client_ca, &pki.ca),
        ] {
            std::fs::write(to, std::fs::read(from).unwrap()).unwrap();
        }
        std::fs::write(&self.token, token).unwrap();
    }
}

/// Whether a new mutual-TLS connection as `pki`'s client, with `token`, gets identical bytes.
async fn served_to(addr: SocketAddr, pki: &Pki, token: &str) -> Result<(), String> {
    let channel = tls_channel(addr, &pki.ca, Some((&pki.client_cert, &pki.client_key)))
        .await
        .map_err(|e| e.to_string())?;
    let tensors = generate(channel, small(), Some(token))
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    assert_identical(&tensors, &small());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_and_token_rotate_without_a_restart() {
    const NEXT_TOKEN: &str = "a-rotated-token-of-thirty-two-ch";
    let (old, new) = (Pki::new(), Pki::new());
    let files = Rotating::new(&old, TOKEN);
    let server = TestServer::start_with(|c| {
        c.tls_cert = Some(files.cert.clone());
        c.tls_key = Some(files.key.clone());
        c.tls_client_ca = Some(files.client_ca.clone());
        c.auth_token_file = Some(files.token.clone());
    })
    .await;
    served_to(server.addr, &old, TOKEN).await.unwrap();
    let before = tls_channel(
        server.addr,
        &old.ca,
        Some((&old.client_cert, &old.client_key)),
    )
    .await
    .unwrap();
    health(before.clone()).await.unwrap();

    files.rotate(&new, NEXT_TOKEN);
    // Rewritten files change nothing until reloaded.
    served_to(server.addr, &old, TOKEN).await.unwrap();
    server.reloader.reload().unwrap();
    served_to(server.addr, &new, NEXT_TOKEN).await.unwrap();
    let status = served_to(server.addr, &new, TOKEN).await.unwrap_err();
    assert!(status.starts_with("Unauthenticated"), "{status}");
    // The old CA no longer vouches for the server, nor for clients.
    refused(
        tls_channel(server.addr, &old.ca, None).await,
        "old server CA",
    )
    .await;
    refused(
        tls_channel(
            server.addr,
            &new.ca,
            Some((&old.client_cert, &old.client_key)),
        )
        .await,
        "old client certificate",
    )
    .await;
    // A connection made before the reload keeps its session; calls need the new token.
    let tensors = generate(before, small(), Some(NEXT_TOKEN)).await.unwrap();
    assert_identical(&tensors, &small());

    // Files that do not load are refused by name, and what was loaded stays in use.
    std::fs::write(&files.cert, "not a certificate\n").unwrap();
    std::fs::write(&files.token, "\n").unwrap();
    let error = server.reloader.reload().unwrap_err().to_string();
    assert!(
        error.contains("--tls-cert") && error.contains("--auth-token-file"),
        "{error}"
    );
    served_to(server.addr, &new, NEXT_TOKEN).await.unwrap();
    std::fs::write(&files.cert, std::fs::read(&old.client_cert).unwrap()).unwrap();
    let error = server.reloader.reload().unwrap_err().to_string();
    assert!(
        error.contains("does not belong to the certificate"),
        "{error}"
    );
    served_to(server.addr, &new, NEXT_TOKEN).await.unwrap();

    let metrics = Metrics::parse(server.shared.render_metrics());
    assert_eq!(metrics.get("weightinit_reloads_total{result=\"ok\"}"), 1.0);
    assert_eq!(
        metrics.get("weightinit_reloads_total{result=\"error\"}"),
        2.0
    );
    // The old CA's and the old client certificate's handshakes, at least.
    assert!(metrics.get("weightinit_tls_handshake_failures_total") >= 2.0);
    drop(files.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_binary_and_keeps_it_serving() {
    const NEXT_TOKEN: &str = "sighup-rotated-token-0123456789";
    let (old, new) = (Pki::new(), Pki::new());
    let files = Rotating::new(&old, TOKEN);
    let p = |path: &Path| path.to_str().unwrap().to_owned();
    let server = Served::start(
        &[
            "--tls-cert",
            &p(&files.cert),
            "--tls-key",
            &p(&files.key),
            "--tls-client-ca",
            &p(&files.client_ca),
            "--auth-token-file",
            &p(&files.token),
        ],
        true,
    );
    served_to(server.addr, &old, TOKEN).await.unwrap();
    files.rotate(&new, NEXT_TOKEN);
    server.signal("HUP");
    // The reload happens in the server's own time: wait for the new files to be in use.
    let started = std::time::Instant::now();
    while served_to(server.addr, &new, NEXT_TOKEN).await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(10), "not reloaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    refused(
        tls_channel(server.addr, &old.ca, None).await,
        "old server CA",
    )
    .await;
    // A reload that fails leaves the server as it was.
    std::fs::write(&files.key, "garbage\n").unwrap();
    server.signal("HUP");
    let failed = "weightinit_reloads_total{result=\"error\"}";
    util::wait_until(|| scrape(&server).get(failed) >= 1.0).await;
    served_to(server.addr, &new, NEXT_TOKEN).await.unwrap();
    assert_eq!(
        scrape(&server).get("weightinit_reloads_total{result=\"ok\"}"),
        1.0
    );
}

/// The binary's metrics, scraped off the async runtime's threads.
fn scrape(server: &Served) -> Metrics {
    tokio::task::block_in_place(|| server.scrape())
}
