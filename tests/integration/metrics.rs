//! The metrics endpoint, scraped over real HTTP as Prometheus does: requests by method and
//! status code, errors by code, bytes, streams in flight, rejected streams, durations, and
//! connections, each counted exactly; and the text format is well formed.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::util::{TempDir, TestServer, http_get, request, scrape, wait_until};
use serde_json::json;
use tokio::net::TcpListener;
use tonic::{Code, Request};
use weightinit::proto::{GenerateRequest, GetInfoRequest, generate_response::Item};
use weightinit::service::metrics;

const TOKEN: &str = "metrics-test-token-0123456789";

fn authorized<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    request
}

fn tensor(shape: serde_json::Value) -> GenerateRequest {
    request(json!({"seed": 11, "tensors": [
        {"name": "w", "shape": shape, "init": {"xavierNormal": {}}}]}))
}

/// Checks the exposition format: every sample belongs to a family announced by # TYPE,
/// and the text ends with OpenMetrics' # EOF.
fn assert_well_formed(text: &str) {
    let mut families: HashMap<String, String> = HashMap::new();
    let mut seen = HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(
                families.insert(name.to_owned(), kind.to_owned()).is_none(),
                "one TYPE per family: {name}"
            );
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("name value");
        value.parse::<f64>().expect("numeric value");
        assert!(seen.insert(series.to_owned()), "duplicate series {series}");
        let name = series.split('{').next().unwrap();
        // OpenMetrics: a family's samples carry a suffix its kind implies.
        let family = [
            ("_bucket", "histogram"),
            ("_sum", "histogram"),
            ("_count", "histogram"),
            ("_total", "counter"),
            ("_info", "info"),
        ]
        .iter()
        .find_map(|(suffix, kind)| {
            name.strip_suffix(suffix)
                .filter(|base| families.get(*base).is_some_and(|k| k == kind))
        })
        .unwrap_or(name);
        assert!(
            families.contains_key(family),
            "{series}: no # TYPE for {family}"
        );
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{name}"
        );
    }
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_outcome_is_counted_and_scraped_over_http() {
    let dir = TempDir::new("metrics");
    let token_file = dir.write("token", TOKEN);
    let server = TestServer::start_with(|c| {
        c.max_concurrent_streams = 1;
        c.workers = Some(2);
        c.auth_token_file = Some(token_file.clone());
    })
    .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = listener.local_addr().unwrap();
    let shared = server.shared.clone();
    let endpoint = tokio::spawn(metrics::serve(listener, move || shared.render_metrics()));
    let scrape = move || tokio::task::spawn_blocking(move || scrape(metrics_addr));

    let before = scrape().await.unwrap();
    assert_well_formed(&before.text);
    for rpc in ["Generate", "Describe", "Digest", "GetInfo"] {
        let series = format!("weightinit_requests_total{{rpc=\"{rpc}\",code=\"OK\"}}");
        assert_eq!(
            before.samples.get(&series),
            Some(&0.0),
            "{series} listed at 0"
        );
    }
    assert_eq!(before.get("weightinit_inflight_streams"), 0.0);
    assert_eq!(before.get("weightinit_workers"), 2.0);
    assert_eq!(before.get("weightinit_max_concurrent_streams"), 1.0);
    assert_eq!(before.get("weightinit_build_info{version=\"0.1.0\"}"), 1.0);
    assert!(before.get("process_resident_memory_bytes") > 0.0);

    let mut client = server.client().await;
    // Two complete Generates of 256 KiB each.
    let small = tensor(json!([256, 256]));
    for _ in 0..2 {
        let mut stream = client
            .generate(authorized(small.clone()))
            .await
            .unwrap()
            .into_inner();
        while stream.message().await.unwrap().is_some() {}
    }
    // An invalid Describe, a Digest of 64 KiB, a GetInfo, an unauthenticated Generate.
    let status = client
        .describe(authorized(tensor(json!([8]))))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    client
        .digest(authorized(tensor(json!([128, 128]))))
        .await
        .unwrap();
    client
        .get_info(authorized(GetInfoRequest {}))
        .await
        .unwrap();
    let status = client.generate(small.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // One stream in flight holds the only slot: the next is rejected.
    let huge = tensor(json!([65536, 65536]));
    let mut stream = client
        .generate(authorized(huge.clone()))
        .await
        .unwrap()
        .into_inner();
    let mut taken = 0u64;
    for _ in 0..3 {
        if let Some(Item::Chunk(chunk)) = stream.message().await.unwrap().unwrap().item {
            taken += chunk.data.len() as u64;
        }
    }
    let status = client.digest(authorized(huge)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    let during = scrape().await.unwrap();
    assert_eq!(during.get("weightinit_inflight_streams"), 1.0);
    assert_eq!(during.get("weightinit_streams_rejected_total"), 1.0);
    assert_eq!(during.get("weightinit_connections_open"), 1.0);
    assert_eq!(during.get("weightinit_connections_accepted_total"), 1.0);
    assert!(during.get("weightinit_sent_bytes_total") >= (2 * 262144 + taken) as f64);
    drop(stream);
    wait_until(|| server.shared.active_streams() == 0 && server.shared.busy_workers() == 0).await;

    let after = scrape().await.unwrap();
    assert_well_formed(&after.text);
    let requests = |rpc: &str, code: &str| {
        after.get(&format!(
            "weightinit_requests_total{{rpc=\"{rpc}\",code=\"{code}\"}}"
        ))
    };
    assert_eq!(requests("Generate", "OK"), 2.0);
    assert_eq!(requests("Generate", "UNAUTHENTICATED"), 1.0);
    assert_eq!(requests("Generate", "CANCELLED"), 1.0);
    assert_eq!(requests("Describe", "INVALID_ARGUMENT"), 1.0);
    assert_eq!(requests("Digest", "OK"), 1.0);
    assert_eq!(requests("Digest", "RESOURCE_EXHAUSTED"), 1.0);
    assert_eq!(requests("GetInfo", "OK"), 1.0);
    for (code, count) in [
        ("INVALID_ARGUMENT", 1.0),
        ("RESOURCE_EXHAUSTED", 1.0),
        ("UNAUTHENTICATED", 1.0),
        ("CANCELLED", 1.0),
        ("INTERNAL", 0.0),
    ] {
        assert_eq!(
            after.get(&format!("weightinit_errors_total{{code=\"{code}\"}}")),
            count,
            "{code}"
        );
    }
    assert_eq!(after.get("weightinit_inflight_streams"), 0.0);
    assert_eq!(after.get("weightinit_busy_workers"), 0.0);
    assert_eq!(
        after.get("weightinit_generated_bytes_total{rpc=\"Digest\"}"),
        65536.0
    );
    let sent = after.get("weightinit_sent_bytes_total");
    assert!(sent >= (2 * 262144 + taken) as f64);
    assert!(after.get("weightinit_generated_bytes_total{rpc=\"Generate\"}") >= sent);
    // Durations: the Generates that reached the handler (2 OK, 1 cancelled).
    assert_eq!(
        after.get("weightinit_rpc_duration_seconds_count{rpc=\"Generate\"}"),
        3.0
    );
    assert_eq!(
        after.get("weightinit_rpc_duration_seconds_bucket{le=\"+Inf\",rpc=\"Generate\"}"),
        3.0
    );
    assert!(after.get("weightinit_rpc_duration_seconds_sum{rpc=\"Generate\"}") > 0.0);

    // HTTP details: HEAD, unknown paths, other methods.
    let (status, head, body) =
        tokio::task::spawn_blocking(move || http_get(metrics_addr, "HEAD", "/metrics"))
            .await
            .unwrap();
    assert_eq!(status, 200);
    assert!(
        body.is_empty() && head.contains("Content-Length:"),
        "{head}"
    );
    let (status, _, _) = tokio::task::spawn_blocking(move || http_get(metrics_addr, "GET", "/x"))
        .await
        .unwrap();
    assert_eq!(status, 404);
    let (status, _, _) =
        tokio::task::spawn_blocking(move || http_get(metrics_addr, "POST", "/metrics"))
            .await
            .unwrap();
    assert_eq!(status, 405);
    endpoint.abort();
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// Calls tonic refuses before the handler (a message that is not protobuf: INTERNAL; one over
/// --max-message-bytes: OUT_OF_RANGE) and a request over --max-request-work are each counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_before_the_handler_are_counted() {
    let server = TestServer::start_with(|c| c.max_message_bytes = 4096).await;
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    // A field 2 (tensors) claiming 5 bytes and holding 1: invalid protobuf.
    let garbage = vec![0x12, 0x05, 0x00];
    let code = crate::util::raw_unary(channel.clone(), "Describe", garbage).await;
    assert_eq!(code, Code::Internal);
    let code = crate::util::raw_unary(channel, "Digest", vec![0; 8192]).await;
    assert_eq!(code, Code::OutOfRange);
    let costly = request(json!({"seed": 1, "tensors": (0..200)
        .map(|i| json!({"name": format!("q{i}"), "shape": [4096, 4096], "init": {"orthogonal": {}}}))
        .collect::<Vec<_>>()}));
    let mut client = server.client().await;
    let status = client.describe(costly).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    let text = server.shared.render_metrics();
    for series in [
        r#"weightinit_requests_total{rpc="Describe",code="INTERNAL"} 1"#,
        r#"weightinit_requests_total{rpc="Digest",code="OUT_OF_RANGE"} 1"#,
        r#"weightinit_requests_total{rpc="Describe",code="RESOURCE_EXHAUSTED"} 1"#,
    ] {
        assert!(text.contains(series), "{series} missing from\n{text}");
    }
}
