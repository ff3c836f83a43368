//! The structured schemes (orthogonal, eye, identity, dirac, sparse): every committed case of
//! tests/data/structured-v1.json (digests from the NumPy implementation in
//! clients/python/tests/structured_ref.py) in process and over gRPC, their properties, what
//! Describe shows, and the limit and validation errors.

use crate::util::{Case, TestServer, cases_file, check_served, generate};
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;
use weightinit::engine::{Limits, RequestError};
use weightinit::proto::{GenerateRequest, GetInfoRequest};
use weightinit::service::convert;

fn cases() -> Vec<Case> {
    let cases = cases_file("structured-v1.json").cases;
    assert!(cases.len() >= 5);
    cases
}

fn request(value: serde_json::Value) -> GenerateRequest {
    serde_json::from_value(value).unwrap()
}

/// The full tensor of a one-tensor request, through the engine, as f64.
fn values(tensor: serde_json::Value) -> Vec<f64> {
    let mut tensor = tensor;
    tensor["name"] = json!("w");
    tensor["dtype"] = json!("DTYPE_FLOAT64");
    let req = request(json!({"seed": 9, "tensors": [tensor]}));
    let plan = convert::request(&req)
        .unwrap()
        .plan(&Limits::default())
        .unwrap();
    let tensor = &plan.tensors[0];
    let mut data = vec![0u8; tensor.byte_length() as usize];
    tensor.fill(0, &mut data);
    data.chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn engine_matches_every_case_whole_and_in_pieces() {
    for case in cases() {
        let req = convert::request(&request(case.request.clone())).unwrap();
        let plan = req.plan(&Limits::default()).unwrap();
        assert_eq!(plan.tensors.len(), case.expect.len(), "{}", case.case);
        for (tensor, expected) in plan.tensors.iter().zip(&case.expect) {
            let what = format!("{}/{}", case.case, expected.name);
            let mut whole = vec![0u8; tensor.byte_length() as usize];
            tensor.fill(0, &mut whole);
            assert_eq!(whole.len() as u64, expected.byte_length, "{what}");
            assert_eq!(
                blake3::hash(&whole).to_hex().as_str(),
                expected.blake3,
                "{what}"
            );
            // Ranges that start anywhere give the same bytes.
            let size = tensor.dtype.size();
            let mut pieces = vec![0u8; whole.len()];
            for (n, piece) in pieces.chunks_mut(7 * size).enumerate() {
                tensor.fill((n * 7 * size) as u64, piece);
            }
            assert_eq!(pieces, whole, "{what}: in pieces");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_and_digest_match_every_case() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for case in cases() {
        // Small chunks: many workers make pieces of one tensor at once.
        let mut req = request(case.request.clone());
        req.chunk_bytes = 64;
        let received = generate(&mut client, req.clone()).await;
        let digests = client.digest(req).await.unwrap().into_inner().digests;
        check_served(&case, &received, &digests);
    }
}

/// Q^T Q (or Q Q^T when wide) = gain^2 I, within 1e-12.
fn assert_orthogonal(q: &[f64], rows: usize, cols: usize, gain: f64) {
    let (count, len) = (rows.min(cols), rows.max(cols));
    let at = |v: usize, e: usize| {
        if rows >= cols {
            q[e * cols + v]
        } else {
            q[v * cols + e]
        }
    };
    for a in 0..count {
        for b in 0..count {
            let dot: f64 = (0..len).map(|e| at(a, e) * at(b, e)).sum();
            let want = if a == b { gain * gain } else { 0.0 };
            assert!(
                (dot - want).abs() <= 1e-12,
                "{rows}x{cols}: ({a}, {b}) = {dot}, want {want}"
            );
        }
    }
}

#[test]
fn orthogonal_is_orthogonal_in_every_shape() {
    let cases = [
        (json!([64, 48]), "LAYOUT_TORCH", 64, 48, 1.0),
        (json!([48, 64]), "LAYOUT_TORCH", 48, 64, 2.0),
        (json!([100, 100]), "LAYOUT_TORCH", 100, 100, 1.0),
        (json!([16, 8, 3, 3]), "LAYOUT_TORCH", 16, 72, 1.0),
        (json!([3, 3, 8, 16]), "LAYOUT_KERAS", 72, 16, 0.5),
        (json!([200, 1]), "LAYOUT_TORCH", 200, 1, 1.0),
    ];
    for (shape, layout, rows, cols, gain) in cases {
        let q = values(json!({"shape": shape, "layout": layout,
                              "init": {"orthogonal": {"gain": gain}}}));
        assert_orthogonal(&q, rows, cols, gain);
    }
}

#[test]
fn sparse_has_exact_zero_counts_and_normal_non_zeros() {
    let (rows, cols) = (400usize, 60usize);
    let v =
        values(json!({"shape": [rows, cols], "init": {"sparse": {"sparsity": 0.25, "std": 0.5}}}));
    let want = (0.25f64 * rows as f64).ceil() as usize;
    for c in 0..cols {
        let zeros = (0..rows).filter(|&r| v[r * cols + c] == 0.0).count();
        assert_eq!(zeros, want, "column {c}");
    }
    let non_zero: Vec<f64> = v.iter().copied().filter(|&x| x != 0.0).collect();
    let n = non_zero.len() as f64;
    let mean = non_zero.iter().sum::<f64>() / n;
    let std = (non_zero.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(
        mean.abs() < 0.02 && (std - 0.5).abs() < 0.02,
        "{mean} {std}"
    );
}

#[test]
fn eye_and_dirac_put_ones_where_torch_does() {
    let eye = values(json!({"shape": [3, 4], "init": {"eye": {}}}));
    assert_eq!(eye, [1., 0., 0., 0., 0., 1., 0., 0., 0., 0., 1., 0.]);
    // torch: tensor[g * 2 + d, d, 1] = 1 for g < 2, d < min(2, 3).
    let dirac = values(json!({"shape": [4, 3, 3], "init": {"dirac": {"groups": 2}}}));
    let mut want = vec![0.0; 36];
    for (o, i) in [(0, 0), (1, 1), (2, 0), (3, 1)] {
        want[o * 9 + i * 3 + 1] = 1.0;
    }
    assert_eq!(dirac, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_shows_what_each_resolves_to_and_get_info_lists_them() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let req = request(json!({"seed": 1, "tensors": [
        {"name": "o", "shape": [4096, 4096], "init": {"orthogonal": {"gain": 2}}},
        {"name": "k", "shape": [3, 3, 4, 8], "layout": "LAYOUT_KERAS", "init": {"orthogonal": {}}},
        {"name": "e", "shape": [3, 5], "init": {"eye": {}}},
        {"name": "i", "shape": [3, 5], "init": {"identity": {"gain": 0.5}}},
        {"name": "d", "shape": [8, 4, 3, 3], "init": {"dirac": {"groups": 2}}},
        {"name": "s", "shape": [10, 6], "init": {"sparse": {"sparsity": 0.25}}},
    ]}));
    let headers = client.describe(req).await.unwrap().into_inner().tensors;
    let r: Vec<_> = headers
        .iter()
        .map(|h| h.resolved.clone().unwrap())
        .collect();
    assert_eq!(
        (r[0].scheme.as_str(), r[0].distribution.as_str(), r[0].gain),
        ("orthogonal", "orthogonal", Some(2.0))
    );
    assert_eq!((r[0].rows, r[0].cols), (Some(4096), Some(4096)));
    assert_eq!((r[1].rows, r[1].cols), (Some(36), Some(8)));
    assert_eq!((r[2].distribution.as_str(), r[2].value), ("eye", 1.0));
    assert_eq!((r[3].value, r[3].gain), (0.5, Some(0.5)));
    assert_eq!(
        (r[4].distribution.as_str(), r[4].groups),
        ("dirac", Some(2))
    );
    assert_eq!(
        (r[5].distribution.as_str(), r[5].std, r[5].zeros_per_column),
        ("sparse", 0.01, Some(3))
    );
    assert_eq!((r[5].rows, r[5].cols), (Some(10), Some(6)));

    let info = client
        .get_info(GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    for scheme in ["orthogonal", "eye", "identity", "dirac", "sparse"] {
        assert!(info.schemes.iter().any(|s| s == scheme), "{scheme}");
    }
    assert_eq!(info.limits.unwrap().max_matrix_elements, 4096 * 4096);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_shapes_parameters_and_the_matrix_limit_are_refused_with_their_field() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let cases = [
        (
            json!([4097, 4096]),
            json!({"orthogonal": {}}),
            Code::ResourceExhausted,
            "shape",
        ),
        (
            json!([5000, 5000]),
            json!({"sparse": {"sparsity": 0.1}}),
            Code::ResourceExhausted,
            "shape",
        ),
        (
            json!([8]),
            json!({"orthogonal": {}}),
            Code::InvalidArgument,
            "shape",
        ),
        (
            json!([2, 2, 2]),
            json!({"eye": {}}),
            Code::InvalidArgument,
            "shape",
        ),
        (
            json!([2, 3]),
            json!({"identity": {"gain": "NaN"}}),
            Code::InvalidArgument,
            "init.identity.gain",
        ),
        (
            json!([4, 4]),
            json!({"dirac": {}}),
            Code::InvalidArgument,
            "shape",
        ),
        (
            json!([6, 2, 3]),
            json!({"dirac": {"groups": 4}}),
            Code::InvalidArgument,
            "init.dirac.groups",
        ),
        (
            json!([6, 2, 3]),
            json!({"dirac": {"groups": 0}}),
            Code::InvalidArgument,
            "init.dirac.groups",
        ),
        (
            json!([4, 4]),
            json!({"sparse": {"sparsity": 1.5}}),
            Code::InvalidArgument,
            "init.sparse.sparsity",
        ),
        (
            json!([4, 4]),
            json!({"sparse": {"sparsity": 0.5, "std": -1}}),
            Code::InvalidArgument,
            "init.sparse.std",
        ),
    ];
    for (shape, init, code, field) in cases {
        let req =
            request(json!({"seed": 1, "tensors": [{"name": "w", "shape": shape, "init": init}]}));
        let status = client.describe(req.clone()).await.unwrap_err();
        assert_eq!(status.code(), code, "{init}: {}", status.message());
        let violations = status.get_details_bad_request().unwrap().field_violations;
        assert_eq!(violations[0].field, format!("tensors[0].{field}"), "{init}");
        assert_eq!(client.generate(req).await.unwrap_err().code(), code);
    }
}

#[test]
fn the_limit_is_the_servers_and_counts_rows_times_cols() {
    let limits = Limits {
        max_matrix_elements: 36 * 8,
        ..Limits::default()
    };
    let plan = |shape: serde_json::Value| {
        let req = request(json!({"seed": 1, "tensors": [
            {"name": "w", "shape": shape, "layout": "LAYOUT_KERAS", "init": {"orthogonal": {}}}]}));
        convert::request(&req).unwrap().plan(&limits).map(|_| ())
    };
    assert_eq!(plan(json!([3, 3, 4, 8])), Ok(()));
    assert!(matches!(
        plan(json!([3, 3, 4, 9])),
        Err(RequestError::OverLimit { field, .. }) if field == "tensors[0].shape"
    ));
}
