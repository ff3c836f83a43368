//! Properties of the output: the same bytes for any chunk size, worker count and slice;
//! slices tile the full tensor; permuted views equal numpy.transpose of it; each scheme has the statistics of its distribution.

use crate::util;
use crate::util::{TestServer, generate, request};
use serde_json::json;
use weightinit::engine::TensorPlan;

/// The engine's plans of a request in proto3 JSON.
fn plans(value: serde_json::Value) -> Vec<TensorPlan> {
    util::plan(&request(value))
}

fn bytes(plan: &TensorPlan) -> Vec<u8> {
    let mut data = vec![0u8; plan.byte_length() as usize];
    plan.fill(0, &mut data);
    data
}

fn mixed_model() -> serde_json::Value {
    json!({"seed": 11, "tensors": [
        {"name": "a", "shape": [37, 29], "init": {"xavierNormal": {}}},
        {"name": "b", "shape": [1001], "init": {"uniform": {}}, "dtype": "DTYPE_FLOAT16"},
        {"name": "c", "shape": [13, 7, 3], "init": {"heNormal": {}}, "dtype": "DTYPE_FLOAT64"},
        {"name": "d", "shape": [300, 5], "init": {"truncatedNormal": {"std": 0.02}}, "dtype": "DTYPE_BFLOAT16"},
        {"name": "e", "shape": [0, 5], "init": {"normal": {}}},
        {"name": "f", "shape": [6, 5, 3, 3], "init": {"kaimingNormal": {}}, "permute": [2, 3, 1, 0],
         "dtype": "DTYPE_BFLOAT16"},
        {"name": "g", "shape": [40, 33], "init": {"xavierUniform": {}}, "permute": [1, 0],
         "slice": {"flat": {"start": 7, "stop": 1000}}}
    ]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_bytes_for_every_chunk_size_and_worker_count() {
    let expected: Vec<Vec<u8>> = plans(mixed_model()).iter().map(bytes).collect();
    for workers in [1, 2, 5] {
        let server = TestServer::start_with(|c| c.workers = Some(workers)).await;
        let mut client = server.client().await;
        for chunk_bytes in [8u32, 24, 1000, 4096, 65536, 0] {
            let mut req = request(mixed_model());
            req.chunk_bytes = chunk_bytes;
            let received = generate(&mut client, req).await;
            for (tensor, want) in received.iter().zip(&expected) {
                assert_eq!(
                    &tensor.data, want,
                    "workers {workers}, chunk_bytes {chunk_bytes}"
                );
                assert_eq!(
                    tensor.blake3,
                    blake3::hash(want).as_bytes(),
                    "TensorEnd digest"
                );
                let size = util::engine_dtype(tensor.header.dtype).size();
                let limit = if chunk_bytes == 0 {
                    1 << 20
                } else {
                    chunk_bytes as usize
                };
                for &n in &tensor.chunk_sizes {
                    assert!(n <= limit && n % size == 0 && n > 0, "chunk of {n} bytes");
                }
            }
        }
    }
}

#[test]
fn any_byte_range_equals_the_same_range_of_the_whole() {
    for plan in plans(mixed_model()) {
        let whole = bytes(&plan);
        let size = plan.dtype.size();
        let elements = whole.len() / size;
        for (start, count) in [
            (0, 1),
            (1, 3),
            (511, 2),
            (512, 513),
            (elements / 2, elements / 2),
        ] {
            if start + count > elements {
                continue;
            }
            let mut part = vec![0u8; count * size];
            plan.fill((start * size) as u64, &mut part);
            assert_eq!(
                part,
                whole[start * size..(start + count) * size],
                "{} [{start}, +{count})",
                plan.name
            );
        }
    }
}

/// Values of the full tensor [13, 7, 6] at every element the slice selects, via the shape.
fn expected_block(full: &[u8], shape: [usize; 3], ranges: [(usize, usize); 3]) -> Vec<u8> {
    let mut out = Vec::new();
    for i in ranges[0].0..ranges[0].1 {
        for j in ranges[1].0..ranges[1].1 {
            for k in ranges[2].0..ranges[2].1 {
                let flat = (i * shape[1] + j) * shape[2] + k;
                out.extend_from_slice(&full[flat * 4..flat * 4 + 4]);
            }
        }
    }
    out
}

#[test]
fn shards_and_dims_slices_tile_the_full_tensor() {
    let shape = [13usize, 7, 6];
    let tensor = |slice: serde_json::Value| {
        let mut spec = json!({"name": "w", "shape": shape, "init": {"kaimingUniform": {}}});
        if !slice.is_null() {
            spec["slice"] = slice;
        }
        bytes(&plans(json!({"seed": 3, "tensors": [spec]}))[0])
    };
    let full = tensor(serde_json::Value::Null);
    for dim in 0..3 {
        for count in [1usize, 2, 3, 4, 5, 8, 16] {
            let mut shards = Vec::new();
            for index in 0..count {
                let got = tensor(json!({"shard": {"dim": dim, "index": index, "count": count}}));
                // torch.chunk: chunks of ceil(n / count) rows, the tail ones possibly empty.
                let n = shape[dim];
                let c = n.div_ceil(count);
                let mut ranges = [(0, shape[0]), (0, shape[1]), (0, shape[2])];
                ranges[dim] = ((index * c).min(n), (index * c + c).min(n));
                assert_eq!(
                    got,
                    expected_block(&full, shape, ranges),
                    "dim {dim} shard {index}/{count}"
                );
                shards.push((ranges[dim], got));
            }
            let rows: usize = shards.iter().map(|((a, b), _)| b - a).sum();
            assert_eq!(rows, shape[dim], "shards cover dim {dim} once");
        }
    }
    // A 2-d tiling with dims slices, as tensor + sequential parallelism would cut it.
    let mut covered = 0;
    for (a, b) in [(0, 5), (5, 13)] {
        for (c, d) in [(0, 2), (2, 7)] {
            let got = tensor(json!({"dims": {"ranges": [
                {"start": a, "stop": b}, {"start": c, "stop": d}, {"start": 0, "stop": 6}]}}));
            assert_eq!(got, expected_block(&full, shape, [(a, b), (c, d), (0, 6)]));
            covered += got.len();
        }
    }
    assert_eq!(covered, full.len());
    // Flat ranges cut anywhere concatenate to the whole.
    let cuts = [0usize, 1, 100, 101, 545, 546];
    let joined: Vec<u8> = cuts
        .windows(2)
        .flat_map(|w| tensor(json!({"flat": {"start": w[0], "stop": w[1]}})))
        .collect();
    assert_eq!(joined, full);
}

/// Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs.
fn ks_statistic(a: &mut [f64], b: &mut [f64]) -> f64 {
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (mut i, mut j, mut gap) = (0, 0, 0f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        gap = gap.max((i as f64 / a.len() as f64 - j as f64 / b.len() as f64).abs());
    }
    gap
}

/// `n` draws of `distribution` by rand_distr: a reference independent of the engine's
/// sampling (a truncated normal by rejection from the normal).
fn reference(distribution: &weightinit::engine::Distribution, n: usize) -> Vec<f64> {
    use rand::rngs::SmallRng;
    use rand::{RngExt, SeedableRng};
    use rand_distr::{Normal, Uniform};
    use weightinit::engine::Distribution as D;
    let mut rng = SmallRng::seed_from_u64(0x7e57);
    match *distribution {
        D::Uniform { low, high } => {
            let uniform = Uniform::new(low, high).unwrap();
            (0..n).map(|_| rng.sample(uniform)).collect()
        }
        D::Normal { mean, std } => {
            let normal = Normal::new(mean, std).unwrap();
            (0..n).map(|_| rng.sample(normal)).collect()
        }
        D::TruncatedNormal {
            mean,
            std,
            alpha,
            beta,
        } => {
            let normal = Normal::new(0.0, 1.0).unwrap();
            std::iter::repeat_with(|| rng.sample(normal))
                .filter(|t| (alpha..=beta).contains(t))
                .take(n)
                .map(|t| mean + std * t)
                .collect()
        }
        D::Constant { .. } => unreachable!("no statistics to compare"),
    }
}

fn sample(init: serde_json::Value, shape: [u64; 2]) -> (TensorPlan, Vec<f64>) {
    let plan = plans(json!({"seed": 2024, "dtype": "DTYPE_FLOAT64",
        "tensors": [{"name": "s", "shape": shape, "init": init}]}))
    .remove(0);
    let values = bytes(&plan)
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (plan, values)
}

fn mean_and_variance(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    (
        mean,
        values.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0),
    )
}

#[test]
fn each_scheme_has_the_statistics_of_its_distribution() {
    use weightinit::engine::Distribution as D;
    // Two samples of 1M draws: the KS critical value at alpha = 0.001 is
    // 1.95 * sqrt(2 / n) = 0.00276.
    let ks_limit = 1.95 * 2f64.sqrt() / 1000.0;
    let schemes = [
        json!({"xavierUniform": {}}),
        json!({"xavierNormal": {"gain": 2.0}}),
        json!({"kaimingUniform": {"nonlinearity": "NONLINEARITY_RELU"}}),
        json!({"kaimingNormal": {"mode": "FAN_MODE_FAN_OUT"}}),
        json!({"torchDefault": {}}),
        json!({"glorotNormal": {}}),
        json!({"heUniform": {}}),
        json!({"lecunNormal": {}}),
        json!({"varianceScaling": {"scale": 3.0, "mode": "FAN_MODE_FAN_GEO_AVG", "distribution": "DISTRIBUTION_UNTRUNCATED_NORMAL"}}),
        json!({"truncatedNormal": {"mean": 0.5, "std": 2.0, "a": -1.0, "b": 4.0}}),
        json!({"normal": {"mean": -3.0, "std": 0.5}}),
        json!({"uniform": {"low": -2.0, "high": 5.0}}),
    ];
    for init in schemes {
        let (plan, mut values) = sample(init.clone(), [1000, 1000]);
        let mut want = reference(&plan.resolved.distribution, values.len());
        let (mean, variance) = mean_and_variance(&values);
        let (want_mean, want_variance) = mean_and_variance(&want);
        let (low, high) = (
            values.iter().cloned().fold(f64::INFINITY, f64::min),
            values.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        );
        match plan.resolved.distribution {
            D::Uniform { low: a, high: b } => {
                assert!(low >= a && high < b, "{init}: within [{a}, {b})")
            }
            D::TruncatedNormal {
                mean: m,
                std: s,
                alpha,
                beta,
            } => assert!(
                low >= m + s * alpha && high <= m + s * beta,
                "{init}: within the truncation"
            ),
            D::Normal { .. } | D::Constant { .. } => {}
        }
        let sd = want_variance.sqrt();
        // Two samples of 1M: their means differ by well under 5 standard errors of the
        // difference (sqrt(2) / 1000 standard deviations), their variances by < 1%.
        assert!(
            (mean - want_mean).abs() < 5.0 * sd * 2f64.sqrt() / 1000.0,
            "{init}: mean {mean} vs {want_mean}"
        );
        assert!(
            (variance / want_variance - 1.0).abs() < 0.01,
            "{init}: variance {variance} vs {want_variance}"
        );
        let ks = ks_statistic(&mut values, &mut want);
        assert!(ks < ks_limit, "{init}: KS statistic {ks}");
    }
}

#[test]
fn constants_are_exact() {
    for (init, value) in [
        (json!({"zeros": {}}), 0.0),
        (json!({"ones": {}}), 1.0),
        (json!({"constant": {"value": -0.25}}), -0.25),
    ] {
        let (_, values) = sample(init, [3, 5]);
        assert!(values.iter().all(|&v| v == value));
    }
}

/// numpy.transpose(full, permute) of a row-major tensor of `shape`, element by element: an
/// independent reference for permuted views (index arithmetic only).
fn transpose(full: &[u8], size: usize, shape: &[u64], permute: &[usize]) -> (Vec<u8>, Vec<u64>) {
    let view: Vec<u64> = permute.iter().map(|&d| shape[d]).collect();
    let mut strides = vec![1u64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    let numel: u64 = view.iter().product();
    let mut out = Vec::with_capacity(full.len());
    for position in 0..numel {
        let (mut rest, mut index) = (position, 0u64);
        for k in (0..view.len()).rev() {
            index += (rest % view[k]) * strides[permute[k]];
            rest /= view[k];
        }
        let at = index as usize * size;
        out.extend_from_slice(&full[at..at + size]);
    }
    (out, view)
}

/// The block `ranges` of a row-major tensor of `shape`, element by element.
fn block(data: &[u8], size: usize, shape: &[u64], ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::new();
    let numel: u64 = shape.iter().product();
    for position in 0..numel {
        let (mut rest, mut inside) = (position, true);
        for k in (0..shape.len()).rev() {
            let c = rest % shape[k];
            rest /= shape[k];
            inside &= (ranges[k].0..ranges[k].1).contains(&c);
        }
        if inside {
            let at = position as usize * size;
            out.extend_from_slice(&data[at..at + size]);
        }
    }
    out
}

#[test]
fn permuted_views_and_their_slices_equal_numpy_transpose() {
    use rand::rngs::SmallRng;
    use rand::seq::SliceRandom;
    use rand::{RngExt, SeedableRng};

    let mut rng = SmallRng::seed_from_u64(0x5eed);
    let dtypes = [
        "DTYPE_FLOAT32",
        "DTYPE_FLOAT64",
        "DTYPE_FLOAT16",
        "DTYPE_BFLOAT16",
    ];
    for case in 0..400 {
        let rank = rng.random_range(1..=5);
        let shape: Vec<u64> = (0..rank).map(|_| rng.random_range(1..=7)).collect();
        let mut permute: Vec<usize> = (0..rank).collect();
        permute.shuffle(&mut rng);
        let dtype = dtypes[rng.random_range(0..dtypes.len())];
        let tensor = json!({"name": format!("t{case}"), "shape": shape, "dtype": dtype,
                            "init": {"normal": {}}});
        let full_plan = &plans(json!({"seed": case, "tensors": [tensor]}))[0];
        let size = full_plan.dtype.size();
        let (view, view_shape) = transpose(&bytes(full_plan), size, &shape, &permute);

        // The slice, in the view's coordinates, and what numpy would give for it.
        let d = rng.random_range(0..rank);
        let (slice, expected) = match rng.random_range(0..4) {
            0 => (json!(null), view.clone()),
            1 => {
                let ranges: Vec<(u64, u64)> = view_shape
                    .iter()
                    .map(|&n| {
                        let a = rng.random_range(0..=n);
                        (a, rng.random_range(a..=n))
                    })
                    .collect();
                let json_ranges: Vec<_> = ranges
                    .iter()
                    .map(|&(a, b)| json!({"start": a, "stop": b}))
                    .collect();
                let expected = block(&view, size, &view_shape, &ranges);
                (json!({"dims": {"ranges": json_ranges}}), expected)
            }
            2 => {
                let n = view.len() as u64 / size as u64;
                let a = rng.random_range(0..=n);
                let b = rng.random_range(a..=n);
                let expected = view[a as usize * size..b as usize * size].to_vec();
                (json!({"flat": {"start": a, "stop": b}}), expected)
            }
            _ => {
                // Every shard of one dimension, concatenated back along it, is the view.
                let count = rng.random_range(1..=4u64);
                let n = view_shape[d];
                let chunk = n.div_ceil(count);
                let mut rows = Vec::new();
                for index in 0..count {
                    let mut ranges: Vec<(u64, u64)> = view_shape.iter().map(|&n| (0, n)).collect();
                    ranges[d] = ((index * chunk).min(n), (index * chunk + chunk).min(n));
                    let slice = json!({"shard": {"dim": d, "index": index, "count": count}});
                    let mut spec = tensor.clone();
                    spec["permute"] = json!(permute);
                    spec["slice"] = slice;
                    let shard = &plans(json!({"seed": case, "tensors": [spec]}))[0];
                    assert_eq!(
                        bytes(shard),
                        block(&view, size, &view_shape, &ranges),
                        "case {case}"
                    );
                    rows.push((ranges[d], bytes(shard)));
                }
                let outer: u64 = view_shape[..d].iter().product();
                let inner = view_shape[d + 1..].iter().product::<u64>() as usize * size;
                let mut tiled = Vec::new();
                for o in 0..outer as usize {
                    for ((a, b), data) in &rows {
                        let len = (b - a) as usize * inner;
                        tiled.extend_from_slice(&data[o * len..(o + 1) * len]);
                    }
                }
                assert_eq!(tiled, view, "case {case}: shards tile the view");
                continue;
            }
        };
        let mut spec = tensor.clone();
        spec["permute"] = json!(permute);
        if !slice.is_null() {
            spec["slice"] = slice.clone();
        }
        let plan = &plans(json!({"seed": case, "tensors": [spec]}))[0];
        let whole = bytes(plan);
        assert_eq!(
            whole, expected,
            "case {case}: {shape:?} permute {permute:?} slice {slice}"
        );

        // Any element-aligned byte range equals the same range of the whole.
        let n = whole.len() / size;
        let a = rng.random_range(0..=n);
        let b = rng.random_range(a..=n);
        let mut part = vec![0u8; (b - a) * size];
        plan.fill((a * size) as u64, &mut part);
        assert_eq!(
            part,
            whole[a * size..b * size],
            "case {case}: range [{a}, {b})"
        );

        // Made by column ranges on several threads into one buffer, as the server's panels do.
        let parts = rng.random_range(1..=3u64);
        let (first, count) = (a as u64, (b - a) as u64);
        let (output, writers) = plan.shared_output(first, count, Vec::new(), parts);
        std::thread::scope(|scope| {
            for mut writer in writers {
                scope.spawn(move || plan.fill_columns(&mut writer));
            }
        });
        let shared = output.into_vec().ok().expect("every writer is done");
        assert_eq!(
            shared,
            whole[a * size..b * size],
            "case {case}: made by {parts} column writers"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permuted_views_over_several_panels_match_the_engine() {
    // 34 MiB of float32 as a transposed view: more than one of the server's panels.
    let requests = [
        json!({"seed": 3, "tensors": [{"name": "w", "shape": [2100, 4100],
               "init": {"xavierUniform": {}}, "permute": [1, 0]}]}),
        json!({"seed": 3, "tensors": [{"name": "k", "shape": [300, 70, 3, 5],
               "init": {"kaimingNormal": {}}, "permute": [2, 3, 1, 0], "dtype": "DTYPE_BFLOAT16",
               "slice": {"dims": {"ranges": [{"start": 1, "stop": 3}, {"start": 0, "stop": 5},
                                             {"start": 3, "stop": 70}, {"start": 7, "stop": 300}]}}}]}),
    ];
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for value in requests {
        let want = bytes(&plans(value.clone())[0]);
        let mut req = request(value);
        req.chunk_bytes = 1 << 19;
        let received = generate(&mut client, req.clone()).await;
        assert!(
            received[0].data == want,
            "Generate of {:?}",
            req.tensors[0].shape
        );
        let digests = client.digest(req).await.unwrap().into_inner().digests;
        assert_eq!(digests[0].blake3, blake3::hash(&want).as_bytes());
    }
}

#[test]
fn a_short_range_of_a_huge_permuted_view_costs_only_its_elements() {
    // A fuzzer's find: 3.7e11 elements viewed as [4294967297, 1, 43, 2]; 50 of them asked for.
    // Each is compared with the same element fetched from the unpermuted tensor.
    let shape = [2u64, 4_294_967_297, 43, 1];
    let permute = [1usize, 3, 2, 0];
    let (start, stop) = (123_456_789_000u64, 123_456_789_050);
    let tensor = |extra: serde_json::Value| {
        let mut spec = json!({"name": "w", "shape": shape, "init": {"torchDefault": {}}});
        spec.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        plans(json!({"seed": 1, "tensors": [spec]})).remove(0)
    };
    let view =
        tensor(json!({"permute": permute, "slice": {"flat": {"start": start, "stop": stop}}}));
    let got = bytes(&view);
    let view_shape: Vec<u64> = permute.iter().map(|&d| shape[d]).collect();
    let strides = [
        shape[1] * shape[2] * shape[3],
        shape[2] * shape[3],
        shape[3],
        1,
    ];
    for (j, position) in (start..stop).enumerate() {
        let (mut rest, mut index) = (position, 0u64);
        for k in (0..4).rev() {
            index += (rest % view_shape[k]) * strides[permute[k]];
            rest /= view_shape[k];
        }
        let one = tensor(json!({"slice": {"flat": {"start": index, "stop": index + 1}}}));
        assert_eq!(
            got[j * 4..j * 4 + 4],
            bytes(&one)[..],
            "view element {position}"
        );
    }
}
