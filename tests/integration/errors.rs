//! Every rejected request gets its status and the path of the field at fault before any
//! data, from Generate, Describe and Digest alike, and the server keeps serving.

use crate::util;
use crate::util::{TestServer, generate, request};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;
use weightinit::proto::GenerateRequest;

/// One tensor named "w" with the given extra fields.
fn one(tensor: serde_json::Value) -> GenerateRequest {
    let mut spec = json!({"name": "w", "shape": [4, 4], "init": {"xavierUniform": {}}});
    spec.as_object_mut()
        .unwrap()
        .extend(tensor.as_object().unwrap().clone());
    request(json!({"seed": 1, "tensors": [spec]}))
}

/// One tensor with an init that proto3 JSON cannot express (unknown enum numbers, NaN).
fn with_init(scheme: weightinit::proto::init::Scheme) -> GenerateRequest {
    let mut request = one(json!({}));
    request.tensors[0].init = Some(weightinit::proto::Init {
        scheme: Some(scheme),
    });
    request
}

fn cases() -> Vec<(&'static str, GenerateRequest, Code, &'static str)> {
    use Code::{InvalidArgument as Bad, ResourceExhausted as Limit};
    let mut unknown_request_dtype = one(json!({}));
    unknown_request_dtype.dtype = 99;
    let mut unknown_layout = one(json!({}));
    unknown_layout.layout = 7;
    let mut unknown_tensor_dtype = one(json!({}));
    unknown_tensor_dtype.tensors[0].dtype = 9;
    use weightinit::proto::{
        KaimingNormal, KaimingUniform, Uniform, VarianceScaling, init::Scheme,
    };
    let unknown_mode = with_init(Scheme::KaimingUniform(KaimingUniform {
        mode: 9,
        ..Default::default()
    }));
    let unknown_nonlinearity = with_init(Scheme::KaimingNormal(KaimingNormal {
        nonlinearity: 42,
        ..Default::default()
    }));
    let unknown_distribution = with_init(Scheme::VarianceScaling(VarianceScaling {
        distribution: 9,
        ..Default::default()
    }));
    let nan_low = with_init(Scheme::Uniform(Uniform {
        low: Some(f64::NAN),
        high: None,
    }));
    let two = |a: serde_json::Value, b: serde_json::Value| request(json!({"tensors": [a, b]}));
    let w = |name: &str| json!({"name": name, "shape": [2], "init": {"zeros": {}}});
    let many: Vec<_> = (0..5).map(|i| w(&format!("t{i}"))).collect();
    vec![
        (
            "algorithm 2",
            request(json!({"algorithm": 2, "tensors": [w("a")]})),
            Bad,
            "algorithm",
        ),
        ("no tensors", request(json!({"seed": 1})), Bad, "tensors"),
        (
            "too many tensors",
            request(json!({"tensors": many})),
            Limit,
            "tensors",
        ),
        (
            "chunk over max",
            request(json!({"chunkBytes": 8 << 20, "tensors": [w("a")]})),
            Limit,
            "chunk_bytes",
        ),
        (
            "chunk under an element",
            request(json!({"chunkBytes": 2, "tensors": [w("a")]})),
            Bad,
            "chunk_bytes",
        ),
        ("unknown request dtype", unknown_request_dtype, Bad, "dtype"),
        ("unknown layout", unknown_layout, Bad, "layout"),
        (
            "unknown tensor dtype",
            unknown_tensor_dtype,
            Bad,
            "tensors[0].dtype",
        ),
        (
            "empty name",
            one(json!({"name": ""})),
            Bad,
            "tensors[0].name",
        ),
        (
            "duplicate name",
            two(w("a"), w("a")),
            Bad,
            "tensors[1].name",
        ),
        (
            "name too long",
            one(json!({"name": "x".repeat(17)})),
            Limit,
            "tensors[0].name",
        ),
        (
            "rank over max",
            one(json!({"shape": [1, 1, 1, 1, 1]})),
            Limit,
            "tensors[0].shape",
        ),
        (
            "element count overflow",
            one(json!({"shape": ["4294967296", "4294967296"]})),
            Bad,
            "tensors[0].shape",
        ),
        (
            "byte length overflow",
            one(json!({"shape": ["4611686018427387904", 2]})),
            Bad,
            "tensors[0].shape",
        ),
        (
            "request bytes over max",
            one(json!({"shape": [1024, 1024, 2]})),
            Limit,
            "tensors",
        ),
        (
            "no init",
            one(json!({"init": null})),
            Bad,
            "tensors[0].init",
        ),
        (
            "empty init",
            one(json!({"init": {}})),
            Bad,
            "tensors[0].init",
        ),
        (
            "unknown fan mode",
            unknown_mode,
            Bad,
            "tensors[0].init.kaiming_uniform.mode",
        ),
        (
            "kaiming fan_avg",
            one(json!({"init": {"kaimingNormal": {"mode": "FAN_MODE_FAN_AVG"}}})),
            Bad,
            "tensors[0].init.kaiming_normal.mode",
        ),
        (
            "unknown nonlinearity",
            unknown_nonlinearity,
            Bad,
            "tensors[0].init.kaiming_normal.nonlinearity",
        ),
        (
            "unknown distribution",
            unknown_distribution,
            Bad,
            "tensors[0].init.variance_scaling.distribution",
        ),
        (
            "low > high",
            one(json!({"init": {"uniform": {"low": 1.0, "high": 0.5}}})),
            Bad,
            "tensors[0].init.uniform.high",
        ),
        ("NaN low", nan_low, Bad, "tensors[0].init.uniform.low"),
        (
            "infinite mean",
            one(json!({"init": {"normal": {"mean": "Infinity"}}})),
            Bad,
            "tensors[0].init.normal.mean",
        ),
        (
            "high - low overflows",
            one(
                json!({"dtype": "DTYPE_FLOAT64", "init": {"uniform": {"low": -1.7e308, "high": 1.7e308}}}),
            ),
            Bad,
            "tensors[0].init.uniform",
        ),
        (
            "std < 0",
            one(json!({"init": {"normal": {"std": -1.0}}})),
            Bad,
            "tensors[0].init.normal.std",
        ),
        (
            "truncated std 0",
            one(json!({"init": {"truncatedNormal": {"std": 0.0}}})),
            Bad,
            "tensors[0].init.truncated_normal.std",
        ),
        (
            "truncation without mass",
            one(json!({"init": {"truncatedNormal": {"a": 40.0, "b": 50.0}}})),
            Bad,
            "tensors[0].init.truncated_normal",
        ),
        (
            "empty truncation",
            one(json!({"init": {"truncatedNormal": {"a": 1.0, "b": 1.0}}})),
            Bad,
            "tensors[0].init.truncated_normal.b",
        ),
        (
            "negative gain",
            one(json!({"init": {"xavierUniform": {"gain": -1.0}}})),
            Bad,
            "tensors[0].init.xavier_uniform.gain",
        ),
        (
            "negative scale",
            one(json!({"init": {"varianceScaling": {"scale": -1.0}}})),
            Bad,
            "tensors[0].init.variance_scaling.scale",
        ),
        (
            "unknown fan",
            one(json!({"shape": [8]})),
            Bad,
            "tensors[0].fan_in",
        ),
        (
            "zero fan",
            one(json!({"shape": [8, 0], "init": {"kaimingUniform": {}}})),
            Bad,
            "tensors[0].fan_in",
        ),
        (
            "zero fan_out",
            one(json!({"init": {"kaimingUniform": {"mode": "FAN_MODE_FAN_OUT"}}, "fanOut": "0"})),
            Bad,
            "tensors[0].fan_out",
        ),
        (
            "float16 overflow",
            one(json!({"dtype": "DTYPE_FLOAT16", "init": {"normal": {"std": 10000.0}}})),
            Bad,
            "tensors[0].dtype",
        ),
        (
            "float32 uniform overflow",
            one(json!({"init": {"uniform": {"low": -1e39, "high": 1e39}}})),
            Bad,
            "tensors[0].dtype",
        ),
        (
            "bfloat16 constant overflow",
            one(json!({"dtype": "DTYPE_BFLOAT16", "init": {"constant": {"value": 3.4e38}}})),
            Bad,
            "tensors[0].dtype",
        ),
        (
            "dims rank mismatch",
            one(json!({"slice": {"dims": {"ranges": [{"stop": 4}]}}})),
            Bad,
            "tensors[0].slice.dims.ranges",
        ),
        (
            "dims out of range",
            one(json!({"slice": {"dims": {"ranges": [{"stop": 4}, {"start": 1, "stop": 5}]}}})),
            Bad,
            "tensors[0].slice.dims.ranges[1]",
        ),
        (
            "dims start > stop",
            one(json!({"slice": {"dims": {"ranges": [{"start": 3, "stop": 2}, {"stop": 4}]}}})),
            Bad,
            "tensors[0].slice.dims.ranges[0]",
        ),
        (
            "flat past the end",
            one(json!({"slice": {"flat": {"start": 3, "stop": 17}}})),
            Bad,
            "tensors[0].slice.flat",
        ),
        (
            "shard count 0",
            one(json!({"slice": {"shard": {"dim": 0, "index": 0, "count": 0}}})),
            Bad,
            "tensors[0].slice.shard.count",
        ),
        (
            "shard dim past rank",
            one(json!({"slice": {"shard": {"dim": 2, "index": 0, "count": 2}}})),
            Bad,
            "tensors[0].slice.shard.dim",
        ),
        (
            "permute with a repeated dimension",
            one(json!({"permute": [1, 1]})),
            Bad,
            "tensors[0].permute",
        ),
        (
            "permute naming a dimension past the rank",
            one(json!({"permute": [0, 2]})),
            Bad,
            "tensors[0].permute",
        ),
        (
            "permute shorter than the rank",
            one(json!({"permute": [0]})),
            Bad,
            "tensors[0].permute",
        ),
        (
            "a slice past the permuted view",
            // The view of [4, 6] under [1, 0] is [6, 4]: dimension 1 has 4 rows.
            one(json!({"shape": [4, 6], "permute": [1, 0],
                       "slice": {"dims": {"ranges": [{"start": 0, "stop": 6}, {"start": 0, "stop": 5}]}}})),
            Bad,
            "tensors[0].slice.dims.ranges[1]",
        ),
        (
            "float16 constant that rounds to infinity",
            one(json!({"dtype": "DTYPE_FLOAT16", "init": {"constant": {"value": 65520.0}}})),
            Bad,
            "tensors[0].dtype",
        ),
    ]
}

#[tokio::test]
async fn extremes_that_round_to_the_largest_finite_value_are_valid() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for (dtype, value) in [
        ("DTYPE_FLOAT16", 65505.0),
        ("DTYPE_FLOAT32", 3.402_823_5e38),
    ] {
        let request = one(json!({"dtype": dtype, "init": {"constant": {"value": value}}}));
        let digests = client.digest(request).await.unwrap().into_inner().digests;
        assert_eq!(digests.len(), 1, "{dtype} constant {value}");
    }
}

fn assert_rejected(what: &str, status: &tonic::Status, code: Code, field: &str) {
    assert_eq!(status.code(), code, "{what}: {}", status.message());
    let bad_request = status
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("{what}: no BadRequest detail in {status:?}"));
    let violation = &bad_request.field_violations[0];
    assert_eq!(violation.field, field, "{what}: {}", violation.description);
    assert!(
        !violation.description.is_empty(),
        "{what}: the reason is said"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_its_status_and_field_before_any_data() {
    let server = TestServer::start_with(|c| {
        c.max_tensors = 4;
        c.max_name_bytes = 16;
        c.max_rank = 4;
        c.max_request_bytes = 4 << 20;
    })
    .await;
    let mut client = server.client().await;
    for (what, request, code, field) in cases() {
        // Generate refuses before the stream starts, so no message can precede the error.
        let status = client.generate(request.clone()).await.expect_err(what);
        assert_rejected(what, &status, code, field);
        let status = client.describe(request.clone()).await.expect_err(what);
        assert_rejected(what, &status, code, field);
        let status = client.digest(request).await.expect_err(what);
        assert_rejected(what, &status, code, field);
    }
    // Still serving, on the same connection.
    let good = one(json!({}));
    let received = generate(&mut client, good).await;
    assert_eq!(received[0].data.len(), 64);
    assert_eq!(server.shared.active_streams(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_limit_are_refused_and_others_are_unhurt() {
    let server = TestServer::start_with(|c| c.max_concurrent_streams = 1).await;
    let mut client = server.client().await;
    let big = one(json!({"shape": [4096, 4096]}));
    let mut first = client.generate(big.clone()).await.unwrap().into_inner();
    first.message().await.unwrap().unwrap();
    let refused = client
        .generate(big.clone())
        .await
        .expect_err("over the limit");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let refused = client
        .digest(big.clone())
        .await
        .expect_err("over the limit");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    // The first stream still completes in full.
    let mut bytes = 0;
    while let Some(message) = first.message().await.unwrap() {
        if let Some(weightinit::proto::generate_response::Item::Chunk(chunk)) = message.item {
            bytes += chunk.data.len();
        }
    }
    assert_eq!(bytes, 4096 * 4096 * 4);
    util::wait_until(|| server.shared.active_streams() == 0).await;
    generate(&mut client, big).await;
}
