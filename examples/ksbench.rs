use std::time::Instant;
use weightinit::engine::keystream::Keystream;
use weightinit::engine::{Limits, TensorPlan};
use weightinit::service::convert;
fn plan(init: &str, dtype: &str) -> TensorPlan {
    let v: serde_json::Value = serde_json::from_str(&format!(r#"{{"seed": 1, "dtype": "{dtype}", "tensors": [{{"name": "w", "shape": [8192, 8192], "init": {init}}}]}}"#)).unwrap();
    let req: weightinit::proto::GenerateRequest = serde_json::from_value(v).unwrap();
    convert::request(&req)
        .unwrap()
        .plan(&Limits::default())
        .unwrap()
        .tensors
        .remove(0)
}
fn main() {
    let s = Keystream::new(1, "x");
    let mut words = vec![0u64; 1 << 17];
    for _ in 0..3 {
        let t = Instant::now();
        let mut first = 0;
        while first < (16u64 << 20) {
            s.fill(first, &mut words[..512]);
            first += 512;
        }
        println!(
            "keystream: {:.2} GB/s",
            (16u64 << 23) as f64 / t.elapsed().as_secs_f64() / 1e9
        );
    }
    let mut out = vec![0u8; 1 << 20];
    for (init, dtype) in [
        ("{\"xavierUniform\": {}}", "DTYPE_FLOAT32"),
        ("{\"xavierNormal\": {}}", "DTYPE_FLOAT32"),
        ("{\"truncatedNormal\": {}}", "DTYPE_FLOAT32"),
        ("{\"xavierUniform\": {}}", "DTYPE_BFLOAT16"),
        ("{\"xavierNormal\": {}}", "DTYPE_BFLOAT16"),
    ] {
        let p = plan(init, dtype);
        let size = p.dtype.size();
        for _ in 0..3 {
            let t = Instant::now();
            let n = 16u64 << 20; // elements
            let mut off = 0;
            while off < n * size as u64 {
                p.fill(off, &mut out);
                off += out.len() as u64;
            }
            let secs = t.elapsed().as_secs_f64();
            println!(
                "{init} {dtype}: {:.0} M elem/s ({:.0}% of keystream-equivalent at 8B/elem)",
                n as f64 / secs / 1e6,
                0.0
            );
        }
    }
}
