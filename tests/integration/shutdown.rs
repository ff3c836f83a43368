//! Graceful shutdown of the real binary: on SIGTERM health turns NOT_SERVING, an in-flight
//! stream still completes with the right bytes, and the process exits 0 well within grace.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::Served;
use serde_json::json;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use weightinit::engine::Limits;
use weightinit::proto::{
    GenerateRequest, generate_response::Item, weight_init_client::WeightInitClient,
};
use weightinit::service::convert;

fn big_request() -> GenerateRequest {
    // 64 MiB: several seconds of streaming through a client that reads slowly.
    serde_json::from_value(json!({"seed": 9, "chunkBytes": 262144, "tensors": [
        {"name": "w", "shape": [4096, 4096], "init": {"xavierUniform": {}}}]}))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_in_flight_stream_and_exits_zero() {
    let grace = Duration::from_secs(20);
    let mut server = Served::start(&["--shutdown-grace", "20s", "--workers", "1"], false);
    let channel = tonic::transport::Endpoint::from_shared(server.url())
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

    server.signal("TERM");
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

    let code = tokio::task::spawn_blocking(move || server.wait(grace))
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
    let mut server = Served::start(&[], false);
    let url = server.url();
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
    server.signal("INT");
    let code = tokio::task::spawn_blocking(move || server.wait(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(code, 0);
    assert!(
        !healthcheck(&url).success(),
        "healthcheck fails once the server is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_at_the_end_of_the_grace_period_is_told_why() {
    let mut server = Served::start(&["--shutdown-grace", "500ms"], false);
    let mut client = WeightInitClient::connect(server.url()).await.unwrap();
    // 16 GiB: far longer than the grace period.
    let huge: GenerateRequest = serde_json::from_value(json!({"seed": 1, "tensors": [
        {"name": "w", "shape": [65536, 65536], "init": {"normal": {}}}]}))
    .unwrap();
    let digest = tokio::spawn(async move { client.digest(huge).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.signal("TERM");
    let status = digest.await.unwrap().expect_err("cut");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("--shutdown-grace"), "{status:?}");
    let code = tokio::task::spawn_blocking(move || server.wait(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(code, 0);
}
