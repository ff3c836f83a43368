//! Interop with the real grpcurl binary (1.8.6, which discovers services through
//! reflection v1alpha): list, describe, every RPC, the health service, and the error
//! details of a refusal.

use base64::prelude::{BASE64_STANDARD, Engine as _};
use std::process::Command;

use crate::util::{TestServer, grpcurl, hex, vectors};
use serde_json::Value;

/// Runs `grpcurl -plaintext FLAGS ADDRESS REST` and returns its stdout; panics with its
/// stderr on failure.
fn run(server: &TestServer, flags: &[&str], rest: &[&str]) -> String {
    let output = Command::new(grpcurl())
        .arg("-plaintext")
        .args(flags)
        .arg(server.addr.to_string())
        .args(rest)
        .output()
        .expect("grpcurl runs (scripts/test installs it into .venv)");
    assert!(
        output.status.success(),
        "grpcurl {rest:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Parses grpcurl's output: one JSON document per message.
fn messages(output: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(output)
        .into_iter::<Value>()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_discovers_and_calls_every_rpc() {
    let server = TestServer::start().await;
    let services = run(&server, &[], &["list"]);
    for service in [
        "weightinit.v1.WeightInit",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            services.lines().any(|l| l == service),
            "{service} in {services}"
        );
    }
    let described = run(&server, &[], &["describe", "weightinit.v1.WeightInit"]);
    for rpc in ["Generate", "Describe", "Digest", "GetInfo"] {
        assert!(
            described.contains(&format!("rpc {rpc}")),
            "{rpc} in {described}"
        );
    }
    let message = run(&server, &[], &["describe", "weightinit.v1.TensorSpec"]);
    assert!(message.contains("optional uint64 fan_in = 6;"), "{message}");

    let info = &messages(&run(&server, &[], &["weightinit.v1.WeightInit/GetInfo"]))[0];
    assert_eq!(info["algorithms"], serde_json::json!([1]));
    assert_eq!(info["schemes"].as_array().unwrap().len(), 24);
    assert_eq!(info["limits"]["maxMatrixElements"], "16777216");
    assert_eq!(info["limits"]["defaultChunkBytes"], 1 << 20);

    let health = &messages(&run(&server, &[], &["grpc.health.v1.Health/Check"]))[0];
    assert_eq!(health["status"], "SERVING");
    let health = &messages(&run(
        &server,
        &["-d", r#"{"service":"weightinit.v1.WeightInit"}"#],
        &["grpc.health.v1.Health/Check"],
    ))[0];
    assert_eq!(health["status"], "SERVING");

    // Every vector, typed the way a grpcurl user types it: proto3 JSON with -d.
    for case in vectors().cases {
        let body = case.request.to_string();
        let generated = messages(&run(
            &server,
            &["-d", &body],
            &["weightinit.v1.WeightInit/Generate"],
        ));
        let ends: Vec<&Value> = generated.iter().filter_map(|m| m.get("end")).collect();
        let described = &messages(&run(
            &server,
            &["-d", &body],
            &["weightinit.v1.WeightInit/Describe"],
        ))[0];
        let digested = &messages(&run(
            &server,
            &["-d", &body],
            &["weightinit.v1.WeightInit/Digest"],
        ))[0];
        for (i, expected) in case.expect.iter().enumerate() {
            let what = format!("{}/{}", case.case, expected.name);
            assert_eq!(
                hex(&BASE64_STANDARD
                    .decode(ends[i]["blake3"].as_str().unwrap())
                    .unwrap()),
                expected.blake3,
                "{what}"
            );
            assert_eq!(
                hex(&BASE64_STANDARD
                    .decode(digested["digests"][i]["blake3"].as_str().unwrap())
                    .unwrap()),
                expected.blake3,
                "{what}"
            );
            let header = &described["tensors"][i];
            assert_eq!(header["name"], expected.name.as_str());
            assert_eq!(
                header["byteLength"],
                expected.byte_length.to_string(),
                "{what}: uint64 is a JSON string"
            );
        }
    }
}

/// A refusal's google.rpc.BadRequest detail, decoded by grpcurl through reflection (it
/// needs google/rpc/error_details.proto from the server to read the field violations).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_shows_the_bad_request_detail() {
    let server = TestServer::start().await;
    let output = Command::new(grpcurl())
        .args([
            "-plaintext",
            "-format-error",
            "-d",
            r#"{"tensors":[{"name":"w","shape":[8],"init":{"xavierUniform":{}}}]}"#,
        ])
        .arg(server.addr.to_string())
        .arg("weightinit.v1.WeightInit/Generate")
        .output()
        .unwrap();
    assert!(!output.status.success());
    // -format-error prints the status as JSON on stderr.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let status = &messages(&stderr)[0];
    assert_eq!(status["code"], 3, "INVALID_ARGUMENT: {stderr}");
    let details = status["details"].as_array().unwrap();
    assert_eq!(details.len(), 1, "{stderr}");
    let detail = &details[0];
    assert!(
        detail.get("@error").is_none(),
        "grpcurl decoded it: {stderr}"
    );
    assert_eq!(detail["@type"], "type.googleapis.com/google.rpc.BadRequest");
    let violations = detail["fieldViolations"].as_array().unwrap();
    assert_eq!(violations.len(), 1, "{stderr}");
    assert_eq!(violations[0]["field"], "tensors[0].fan_in");
    let description = violations[0]["description"].as_str().unwrap();
    assert!(description.contains("fan_in"), "{stderr}");
    assert_eq!(
        status["message"].as_str().unwrap(),
        format!("tensors[0].fan_in: {description}"),
        "the detail says what the message says"
    );

    // The detail's types are there for any reflection client to read.
    let described = run(&server, &[], &["describe", "google.rpc.BadRequest"]);
    assert!(
        described.contains("repeated .google.rpc.BadRequest.FieldViolation field_violations"),
        "{described}"
    );
}
