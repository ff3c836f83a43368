//! Engine benchmarks: the ceiling (raw ChaCha8 keystream and BLAKE3), element throughput
//! of uniform, normal and truncated normal in f32 and bf16, on 1 thread and on all cores, and
//! the time orthogonal takes to compute its whole matrix (QR) before the first element.
//!
//! Run by `scripts/bench` (or `cargo bench --bench engine`); prints one JSON object per line
//! for the report, and a readable line on stderr. Each figure is the best of a few
//! repetitions, since other work on the machine only ever slows a run down. Besides the wall
//! time each run records the CPU time its threads got (Linux schedstat), so the per-core
//! rates hold even when other processes share the cores.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde_json::json;
use weightinit::engine::keystream::Keystream;
use weightinit::engine::{Limits, TensorPlan};
use weightinit::proto::GenerateRequest;
use weightinit::service::convert;

/// Bytes each thread produces or hashes at a time, as a pipeline job does.
const JOB_BYTES: usize = 1 << 20;

/// Repetitions of each measurement; the best is kept.
const REPEATS: usize = 5;

fn main() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if cores > 1 { vec![1, cores] } else { vec![1] };
    for &t in &threads {
        // 512 MiB of keystream: the words of 64 Mi elements.
        let bytes = 512u64 << 20;
        let (wall, cpu) = best(|| keystream(t, bytes));
        report(
            json!({"bench": "keystream", "threads": t, "bytes_per_s": bytes as f64 / wall,
                      "bytes_per_cpu_s": bytes as f64 / cpu}),
        );
        let bytes = 1u64 << 30;
        let (wall, cpu) = best(|| blake3(t, bytes));
        report(
            json!({"bench": "blake3", "threads": t, "bytes_per_s": bytes as f64 / wall,
                      "bytes_per_cpu_s": bytes as f64 / cpu}),
        );
    }
    let schemes = [
        ("uniform", r#"{"xavierUniform": {}}"#),
        ("normal", r#"{"xavierNormal": {}}"#),
        ("truncated_normal", r#"{"truncatedNormal": {}}"#),
    ];
    for (distribution, init) in schemes {
        for dtype in ["DTYPE_FLOAT32", "DTYPE_BFLOAT16"] {
            let plan = plan(init, dtype);
            let elements = 1u64 << 26;
            for &t in &threads {
                let (wall, cpu) = best(|| generate(&plan, t, elements));
                report(json!({
                    "bench": "engine", "distribution": distribution, "dtype": dtype,
                    "threads": t, "elements_per_s": elements as f64 / wall,
                    "elements_per_cpu_s": elements as f64 / cpu
                }));
            }
        }
    }
    // orthogonal computes its whole matrix (draws, QR, Q) on the first element asked for, with
    // all cores; a fresh plan each run, since a plan keeps its matrix.
    for (n, repeats) in [(1024, REPEATS), (2048, 3), (4096, 1)] {
        let seconds = (0..repeats)
            .map(|_| {
                let plan = shaped_plan(r#"{"orthogonal": {}}"#, "DTYPE_FLOAT32", n);
                let start = Instant::now();
                plan.fill(0, &mut [0u8; 4]);
                start.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        report(json!({"bench": "orthogonal", "n": n, "threads": cores, "seconds": seconds}));
    }
}

/// [8192, 8192] (64 Mi elements), the shape of the peers' benchmarks.
fn plan(init: &str, dtype: &str) -> TensorPlan {
    shaped_plan(init, dtype, 8192)
}

/// A square [n, n] tensor of `init`.
fn shaped_plan(init: &str, dtype: &str, n: u64) -> TensorPlan {
    let request: GenerateRequest = serde_json::from_str(&format!(
        r#"{{"seed": 1, "dtype": "{dtype}", "tensors": [
            {{"name": "w", "shape": [{n}, {n}], "init": {init}}}]}}"#
    ))
    .unwrap();
    convert::request(&request)
        .unwrap()
        .plan(&Limits::default())
        .unwrap()
        .tensors
        .remove(0)
}

/// The best wall time and the best CPU time (seconds) of `REPEATS` runs.
fn best(mut run: impl FnMut() -> (f64, f64)) -> (f64, f64) {
    (0..REPEATS)
        .map(|_| run())
        .fold((f64::INFINITY, f64::INFINITY), |(w, c), (wall, cpu)| {
            (w.min(wall), c.min(cpu))
        })
}

/// Runs `job(i)` for i in 0..jobs on `threads` threads, taking jobs in order as the worker
/// pool does; returns the wall time and the CPU time of all threads, in seconds.
fn parallel(threads: usize, jobs: u64, job: impl Fn(u64) + Sync) -> (f64, f64) {
    let next = AtomicU64::new(0);
    let start = Instant::now();
    let cpu: f64 = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let before = thread_cpu_seconds();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= jobs {
                            break;
                        }
                        job(i);
                    }
                    thread_cpu_seconds() - before
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    (start.elapsed().as_secs_f64(), cpu)
}

/// CPU time of the calling thread: the first field of /proc/thread-self/schedstat (ns).
fn thread_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let ns: f64 = stat
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    ns / 1e9
}

fn keystream(threads: usize, bytes: u64) -> (f64, f64) {
    let stream = Keystream::new(1, "w");
    let words_per_job = (JOB_BYTES / 8) as u64;
    parallel(threads, bytes / JOB_BYTES as u64, |i| {
        thread_local!(static WORDS: std::cell::RefCell<Vec<u64>> =
            std::cell::RefCell::new(vec![0; JOB_BYTES / 8]));
        WORDS.with_borrow_mut(|words| {
            stream.fill(i * words_per_job, words);
            std::hint::black_box(&words[0]);
        });
    })
}

fn blake3(threads: usize, bytes: u64) -> (f64, f64) {
    let data: Vec<u8> = (0..JOB_BYTES).map(|i| (i * 7 + i / 4093) as u8).collect();
    parallel(threads, bytes / JOB_BYTES as u64, |_| {
        std::hint::black_box(blake3::hash(&data));
    })
}

fn generate(plan: &TensorPlan, threads: usize, elements: u64) -> (f64, f64) {
    let bytes = elements * plan.dtype.size() as u64;
    parallel(threads, bytes.div_ceil(JOB_BYTES as u64), |i| {
        thread_local!(static OUT: std::cell::RefCell<Vec<u8>> =
            std::cell::RefCell::new(vec![0; JOB_BYTES]));
        OUT.with_borrow_mut(|out| {
            let offset = i * JOB_BYTES as u64;
            let len = (bytes - offset).min(JOB_BYTES as u64) as usize;
            plan.fill(offset, &mut out[..len]);
            std::hint::black_box(&out[0]);
        });
    })
}

fn report(line: serde_json::Value) {
    println!("{line}");
    eprintln!("  {line}");
}
