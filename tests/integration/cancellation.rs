//! A client that goes away mid-stream frees its worker and its stream slot promptly: no
//! work continues for a gone client.

use std::time::Duration;

use crate::util::{TestServer, wait_until};
use serde_json::json;
use weightinit::proto::GenerateRequest;

/// 16 GiB of normal f32: far more than any test reads.
fn huge() -> GenerateRequest {
    serde_json::from_value(json!({"seed": 5, "tensors": [
        {"name": "huge", "shape": [65536, 65536], "init": {"normal": {}}}]}))
    .unwrap()
}

/// Asserts that the server stays idle for a while: nothing generates in the background.
async fn stays_idle(server: &TestServer) {
    for _ in 0..30 {
        assert_eq!(
            server.shared.busy_workers(),
            0,
            "a worker is still generating"
        );
        assert_eq!(server.shared.active_streams(), 0);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_huge_stream_frees_its_workers() {
    let server = TestServer::start_with(|c| {
        c.workers = Some(2);
        c.max_concurrent_streams = 1;
    })
    .await;
    let mut client = server.client().await;
    let mut stream = client.generate(huge()).await.unwrap().into_inner();
    // Read until a worker is seen generating: a stream that is not read soon has its
    // producer parked on backpressure, with every worker idle.
    while server.shared.busy_workers() == 0 {
        stream.message().await.unwrap().unwrap();
    }
    assert_eq!(server.shared.active_streams(), 1);
    drop(stream);
    wait_until(|| server.shared.active_streams() == 0 && server.shared.busy_workers() == 0).await;
    stays_idle(&server).await;
    // The only stream slot is free again.
    let info = client.describe(huge()).await.unwrap().into_inner();
    assert_eq!(info.tensors[0].byte_length, 1 << 34);
    let mut again = client.generate(huge()).await.unwrap().into_inner();
    again.message().await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_connection_and_a_cancelled_digest_stop_their_work() {
    let server = TestServer::start_with(|c| c.workers = Some(2)).await;
    // A whole connection that disappears, not just a stream.
    {
        let mut client = server.client().await;
        let mut stream = client.generate(huge()).await.unwrap().into_inner();
        stream.message().await.unwrap().unwrap();
        stream.message().await.unwrap().unwrap();
    }
    wait_until(|| server.shared.active_streams() == 0 && server.shared.busy_workers() == 0).await;
    // Digest of 16 GiB takes far longer than the deadline: the call is cancelled.
    let mut client = server.client().await;
    let mut request = tonic::Request::new(huge());
    request.set_timeout(Duration::from_millis(300));
    let status = client.digest(request).await.expect_err("deadline");
    assert!(
        matches!(
            status.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{status:?}"
    );
    wait_until(|| server.shared.active_streams() == 0 && server.shared.busy_workers() == 0).await;
    stays_idle(&server).await;
}

/// A deadline that passes is DEADLINE_EXCEEDED from the server, never tonic's CANCELLED
/// "Timeout expired". Sent over raw HTTP/2, so that no client-side timer answers first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_deadline_is_deadline_exceeded() {
    use prost::Message as _;
    let server = TestServer::start_with(|c| c.workers = Some(2)).await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let message = huge().encode_to_vec();
    for _ in 0..20 {
        let request = tonic::codegen::http::Request::post(format!(
            "http://{}/weightinit.v1.WeightInit/Digest",
            server.addr
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "50m")
        .body(())
        .unwrap();
        let mut client = client.clone().ready().await.unwrap();
        let (response, mut body) = client.send_request(request, false).unwrap();
        // The gRPC frame: uncompressed, its length, the message.
        let mut frame = vec![0u8];
        frame.extend((message.len() as u32).to_be_bytes());
        frame.extend(&message);
        body.send_data(frame.into(), true).unwrap();
        let response = response.await.unwrap();
        // No response message: the status comes in the headers (trailers-only).
        let status = response.headers().get("grpc-status").unwrap();
        assert_eq!(status, "4", "DEADLINE_EXCEEDED: {response:?}");
    }
    wait_until(|| server.shared.active_streams() == 0 && server.shared.busy_workers() == 0).await;
}
