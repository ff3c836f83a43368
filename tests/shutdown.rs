//! Graceful shutdown of the real binary: on SIGTERM health turns NOT_SERVING, an in-flight
//! stream still completes with the right bytes, and the process exits 0 well within grace.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use weightinit::engine::Limits;
use weightinit::proto::{
    GenerateRequest, generate_response::Item, weight_init_client::WeightInitClient,
};
use weightinit::service::convert;

/// Starts `weightinit serve` on an ephemeral port; returns the child and its URL.
fn spawn_server(args: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weightinit"))
        .args(["serve", "--addr", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("weightinit listening on ")
        .expect("first stdout line names the address");
    (child, format!("http://{addr}"))
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits up to `limit` for the child to exit and returns its exit code.
fn exit_code(child: &mut Child, limit: Duration) -> i32 {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().expect("exited, not killed by a signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    panic!("the server did not exit within {limit:?}");
}

fn big_request() -> GenerateRequest {
    // 64 MiB: several seconds of streaming through a client that reads slowly.
    serde_json::from_value(json!({"seed": 9, "chunkBytes": 262144, "tensors": [
        {"name": "w", "shape": [4096, 4096], "init": {"xavierUniform": {}}}]}))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_in_flight_stream_and_exits_zero() {
    let grace = Duration::from_secs(20);
    let (mut child, url) = spawn_server(&["--shutdown-grace", "20s", "--workers", "1"]);
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );

    let mut client = WeightInitClient::new(channel);
    let mut stream = client.generate(big_request()).await.unwrap().into_inner();
    let mut hasher = blake3::Hasher::new();
    let mut chunks = 0;
    while chunks < 2 {
        if let Some(Item::Chunk(chunk)) = stream.message().await.unwrap().unwrap().item {
            hasher.update(&chunk.data);
            chunks += 1;
        }
    }

    signal(&child, "TERM");
    let signalled = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        status.status,
        ServingStatus::NotServing as i32,
        "health flips as shutdown begins"
    );
    drop(watch);

    // The stream in flight completes, byte for byte.
    let mut end = None;
    while let Some(message) = stream.message().await.unwrap() {
        match message.item.unwrap() {
            Item::Chunk(chunk) => {
                hasher.update(&chunk.data);
            }
            Item::End(e) => end = Some(e),
            Item::Header(_) => unreachable!("one tensor"),
        }
    }
    let plan = convert::request(&big_request())
        .unwrap()
        .plan(&Limits::default())
        .unwrap();
    let mut expected = vec![0u8; plan.total_bytes as usize];
    plan.tensors[0].fill(0, &mut expected);
    let digest = blake3::hash(&expected);
    assert_eq!(hasher.finalize(), digest);
    assert_eq!(end.expect("TensorEnd arrives").blake3, digest.as_bytes());

    let code = tokio::task::spawn_blocking(move || exit_code(&mut child, grace))
        .await
        .unwrap();
    assert_eq!(code, 0);
    assert!(
        signalled.elapsed() < grace,
        "exited when the stream ended, not at the grace deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_on_an_idle_server_exits_zero_at_once_and_healthcheck_follows() {
    let (mut child, url) = spawn_server(&[]);
    let healthcheck = |url: &str| {
        Command::new(env!("CARGO_BIN_EXE_weightinit"))
            .args(["healthcheck", "--addr", url])
            .status()
            .unwrap()
    };
    assert!(
        healthcheck(&url).success(),
        "healthcheck exits 0 while SERVING"
    );
    signal(&child, "INT");
    let code = tokio::task::spawn_blocking(move || exit_code(&mut child, Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(code, 0);
    assert!(
        !healthcheck(&url).success(),
        "healthcheck fails once the server is gone"
    );
}
