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
