//! The optimized engine (bulk keystream, vectorized values, two-pass normal quantile, batched
//! encoding, per-CPU compiled copies) against a plain scalar implementation of the spec,
//! element by element: every byte must be the same for many seeds, shapes, schemes, dtypes,
//! slices and byte ranges.

// Coefficients and constants written as the spec publishes them.
#![allow(clippy::excessive_precision, clippy::approx_constant)]

use chacha20::ChaCha8Rng;
use half::{bf16, f16};
use rand::RngExt;
use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;
use rand_core::{Rng, SeedableRng};
use serde_json::json;
use sha2::{Digest, Sha256};
use weightinit::engine::{DType, Distribution, Limits, TensorPlan};
use weightinit::proto::GenerateRequest;
use weightinit::service::convert;

/// The spec, one element at a time, with nothing shared with the engine's fast paths.
mod reference {
    use super::*;

    pub fn key(seed: u64, name: &str) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(b"weightinit-v1\0");
        hasher.update(seed.to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.finalize().into()
    }

    pub fn word(key: [u8; 32], i: u64) -> u64 {
        let mut rng = ChaCha8Rng::from_seed(key);
        rng.set_word_pos(u128::from(i) * 2);
        rng.next_u64()
    }

    fn horner(c: [f64; 8], r: f64) -> f64 {
        ((((((c[7] * r + c[6]) * r + c[5]) * r + c[4]) * r + c[3]) * r + c[2]) * r + c[1]) * r
            + c[0]
    }

    const A: [f64; 8] = [
        3.387132872796366608,
        133.14166789178437745,
        1971.5909503065514427,
        13731.693765509461125,
        45921.953931549871457,
        67265.770927008700853,
        33430.575583588128105,
        2509.0809287301226727,
    ];
    const B: [f64; 8] = [
        1.0,
        42.313330701600911252,
        687.1870074920579083,
        5394.1960214247511077,
        21213.794301586595867,
        39307.89580009271061,
        28729.085735721942674,
        5226.495278852854561,
    ];
    const C: [f64; 8] = [
        1.42343711074968357734,
        4.6303378461565452959,
        5.7694972214606914055,
        3.64784832476320460504,
        1.27045825245236838258,
        0.24178072517745061177,
        0.0227238449892691845833,
        7.7454501427834140764e-4,
    ];
    const D: [f64; 8] = [
        1.0,
        2.05319162663775882187,
        1.6763848301838038494,
        0.68976733498510000455,
        0.14810397642748007459,
        0.0151986665636164571966,
        5.475938084995344946e-4,
        1.05075007164441684324e-9,
    ];
    const E: [f64; 8] = [
        6.6579046435011037772,
        5.4637849111641143699,
        1.7848265399172913358,
        0.29656057182850489123,
        0.026532189526576123093,
        0.0012426609473880784386,
        2.71155556874348757815e-5,
        2.01033439929228813265e-7,
    ];
    const F: [f64; 8] = [
        1.0,
        0.59983220655588793769,
        0.13692988092273580531,
        0.0148753612908506148525,
        7.868691311456132591e-4,
        1.8463183175100546818e-5,
        1.4215117583164458887e-7,
        2.04426310338993978564e-15,
    ];

    pub fn quantile(p: f64) -> f64 {
        let q = p - 0.5;
        if q.abs() <= 0.425 {
            let r = 0.180625 - q * q;
            return (q * horner(A, r)) / horner(B, r);
        }
        let r = if q < 0.0 { p } else { 1.0 - p };
        let r = (-libm::log(r)).sqrt();
        let v = if r <= 5.0 {
            horner(C, r - 1.6) / horner(D, r - 1.6)
        } else {
            horner(E, r - 5.0) / horner(F, r - 5.0)
        };
        if q < 0.0 { -v } else { v }
    }

    fn phi(t: f64) -> f64 {
        0.5 * libm::erfc(-t * 0.7071067811865476)
    }

    pub fn value(distribution: Distribution, w: u64) -> f64 {
        let u = f64::from_bits(0x3FF0_0000_0000_0000 | (w >> 12)) - 1.0;
        let p = u + 1.0 / 9_007_199_254_740_992.0;
        match distribution {
            Distribution::Constant { value } => value,
            Distribution::Uniform { low, high } => low + (high - low) * u,
            Distribution::Normal { mean, std } => mean + std * quantile(p),
            Distribution::TruncatedNormal {
                mean,
                std,
                alpha,
                beta,
            } => {
                let (ca, cb) = (phi(alpha), phi(beta));
                let z = quantile(ca + (cb - ca) * p);
                mean + std * z.max(alpha).min(beta)
            }
        }
    }

    pub fn encode(dtype: DType, x: f64, out: &mut Vec<u8>) {
        match dtype {
            DType::Float64 => out.extend(x.to_le_bytes()),
            DType::Float32 => out.extend((x as f32).to_le_bytes()),
            DType::BFloat16 => out.extend(bf16::from_f32(x as f32).to_le_bytes()),
            DType::Float16 => out.extend(f16::from_f32(x as f32).to_le_bytes()),
        }
    }

    /// Output bytes of a tensor given the full-tensor indices its slice selects.
    pub fn bytes(plan: &TensorPlan, seed: u64, indices: &[u64]) -> Vec<u8> {
        let key = key(seed, &plan.name);
        let mut out = Vec::new();
        for &i in indices {
            encode(
                plan.dtype,
                value(plan.resolved.distribution, word(key, i)),
                &mut out,
            );
        }
        out
    }
}

/// rand's seeded SmallRng, with the draws the test cases use.
struct Cases(SmallRng);

impl Cases {
    fn new(seed: u64) -> Self {
        Self(SmallRng::seed_from_u64(seed))
    }
    fn next(&mut self) -> u64 {
        self.0.random()
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0.random_range(..n)
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        items.choose(&mut self.0).expect("something to pick")
    }
}

fn plan(request: serde_json::Value) -> TensorPlan {
    let request: GenerateRequest = serde_json::from_value(request).unwrap();
    convert::request(&request)
        .unwrap()
        .plan(&Limits::default())
        .unwrap()
        .tensors
        .remove(0)
}

/// Full-tensor flat indices of a dims block, row-major, by nested enumeration.
fn block_indices(shape: &[u64], ranges: &[(u64, u64)]) -> Vec<u64> {
    let mut out = vec![0u64];
    for (d, &(start, stop)) in ranges.iter().enumerate() {
        let stride: u64 = shape[d + 1..].iter().product();
        out = out
            .iter()
            .flat_map(|base| (start..stop).map(move |i| base + i * stride))
            .collect();
    }
    out
}

const SCHEMES: [&str; 9] = [
    r#"{"uniform": {"low": -3.0, "high": 0.5}}"#,
    r#"{"xavierUniform": {}}"#,
    r#"{"normal": {"mean": 0.25, "std": 3.0}}"#,
    r#"{"xavierNormal": {"gain": 1.5}}"#,
    r#"{"truncatedNormal": {}}"#,
    r#"{"truncatedNormal": {"mean": 1.0, "std": 0.5, "a": -3.0, "b": 0.9}}"#,
    r#"{"truncatedNormal": {"a": -9.0, "b": 9.0}}"#,
    r#"{"heNormal": {}}"#,
    r#"{"constant": {"value": -0.75}}"#,
];

const DTYPES: [(&str, DType); 4] = [
    ("DTYPE_FLOAT32", DType::Float32),
    ("DTYPE_FLOAT64", DType::Float64),
    ("DTYPE_BFLOAT16", DType::BFloat16),
    ("DTYPE_FLOAT16", DType::Float16),
];

#[test]
fn optimized_fill_equals_the_scalar_reference() {
    let mut cases = Cases::new(0x5EED);
    for case in 0..400 {
        let seed = cases.next();
        let rank = 1 + cases.below(3) as usize;
        let shape: Vec<u64> = (0..rank).map(|_| 1 + cases.below(70)).collect();
        let numel: u64 = shape.iter().product();
        let scheme = SCHEMES[cases.below(SCHEMES.len() as u64) as usize];
        let scheme: serde_json::Value = serde_json::from_str(scheme).unwrap();
        let (dtype_name, dtype) = *cases.pick(&DTYPES);
        let mut tensor = json!({"name": format!("t{case}"), "shape": shape, "init": scheme,
                                "dtype": dtype_name, "fanIn": 8, "fanOut": 8});
        // No slice, a flat range, a dims block or a shard.
        let indices = match cases.below(4) {
            0 => (0..numel).collect(),
            1 => {
                let start = cases.below(numel + 1);
                let stop = start + cases.below(numel - start + 1);
                tensor["slice"] = json!({"flat": {"start": start, "stop": stop}});
                (start..stop).collect()
            }
            2 => {
                let ranges: Vec<(u64, u64)> = shape
                    .iter()
                    .map(|&n| {
                        let start = cases.below(n + 1);
                        (start, start + cases.below(n - start + 1))
                    })
                    .collect();
                let json_ranges: Vec<_> = ranges
                    .iter()
                    .map(|(a, b)| json!({"start": a, "stop": b}))
                    .collect();
                tensor["slice"] = json!({"dims": {"ranges": json_ranges}});
                block_indices(&shape, &ranges)
            }
            _ => {
                let dim = cases.below(rank as u64) as usize;
                let count = 1 + cases.below(5);
                let index = cases.below(count);
                let n = shape[dim];
                let c = n.div_ceil(count);
                let mut ranges: Vec<(u64, u64)> = shape.iter().map(|&n| (0, n)).collect();
                ranges[dim] = ((index * c).min(n), (index * c + c).min(n));
                tensor["slice"] = json!({"shard": {"dim": dim, "index": index, "count": count}});
                block_indices(&shape, &ranges)
            }
        };
        let plan = plan(json!({"seed": seed, "tensors": [tensor]}));
        let want = reference::bytes(&plan, seed, &indices);
        assert_eq!(plan.byte_length(), want.len() as u64, "case {case}");
        // The whole output at once, then a random element-aligned byte range of it.
        let mut got = vec![0u8; want.len()];
        plan.fill(0, &mut got);
        assert_eq!(got, want, "case {case}: {tensor}");
        let size = dtype.size() as u64;
        let elements = want.len() as u64 / size;
        let first = cases.below(elements + 1);
        let count = cases.below(elements - first + 1);
        let (start, end) = ((first * size) as usize, ((first + count) * size) as usize);
        let mut part = vec![0u8; end - start];
        plan.fill(start as u64, &mut part);
        assert_eq!(
            part,
            want[start..end],
            "case {case}: [{first}, +{count}) of {tensor}"
        );
    }
}

#[test]
fn large_tensors_and_far_offsets_equal_the_reference() {
    // Many blocks with every scheme and dtype, and a flat window whose keystream counter
    // crosses 2^32 blocks (state word 12 into 13).
    let mut cases = Cases::new(0xB16);
    for scheme in SCHEMES {
        for (dtype_name, _) in DTYPES {
            let seed = cases.next();
            let scheme: serde_json::Value = serde_json::from_str(scheme).unwrap();
            let plan = plan(json!({"seed": seed, "dtype": dtype_name, "tensors": [
                {"name": "big", "shape": [301, 1001], "init": scheme}]}));
            let want = reference::bytes(&plan, seed, &(0..301 * 1001).collect::<Vec<_>>());
            let mut got = vec![0u8; want.len()];
            plan.fill(0, &mut got);
            assert_eq!(got, want, "{scheme} {dtype_name}");
        }
    }
    let start = (1u64 << 35) - 1000;
    let plan = plan(
        json!({"seed": 7, "tensors": [{"name": "far", "shape": [1u64 << 36],
        "init": {"normal": {}}, "slice": {"flat": {"start": start, "stop": start + 3000}}}]}),
    );
    let want = reference::bytes(&plan, 7, &(start..start + 3000).collect::<Vec<_>>());
    let mut got = vec![0u8; want.len()];
    plan.fill(0, &mut got);
    assert_eq!(got, want);
}
