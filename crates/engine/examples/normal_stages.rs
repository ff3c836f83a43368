//! Where a normal's time goes: each stage of the engine's normal path on its own, over 64 Mi
//! elements in 512-element blocks as `TensorPlan::fill` makes them, in CPU time (the best
//! of 3), for each instruction set this CPU has. BENCHMARKS.md explains the figures
//! ("A normal's time, and the normal path made faster").
//!
//!     cargo run --release -p weightinit-engine --example normal_stages [-- avx2 ...]
//!
//! Arguments name the instruction sets to time (all that the CPU has by default).

use std::hint::black_box;

use weightinit_engine::distribution::{Distribution, Scratch};
use weightinit_engine::dtype::DType;
use weightinit_engine::keystream::Keystream;
use weightinit_engine::{Isa, normal, unit};

const N: usize = normal::MAX_BLOCK;
const BLOCKS: usize = 1 << 17;

const STAGES: [&str; 7] = [
    "keystream (ChaCha8 words)",
    "word -> p",
    "quantiles, central only",
    "quantiles (central + tails)",
    "p -> mean + std z (values)",
    "f64 -> f32 bytes",
    "all: words -> f32 bytes",
];

/// Inputs and outputs of one block, reused.
struct Block {
    keystream: Keystream,
    words: [u64; N],
    p: [f64; N],
    central: [f64; N],
    z: [f64; N],
    out: [u8; 4 * N],
    tails: normal::Tails,
    scratch: Scratch,
}

/// Runs stage `which` over every block; `inline(always)` so that each copy below compiles it
/// for its own instruction set, as `TensorPlan` does.
#[inline(always)]
fn stage(which: usize, b: &mut Block) {
    let sampler = Distribution::Normal {
        mean: 0.0,
        std: 0.02,
    }
    .sampler();
    for k in 0..BLOCKS {
        let first = (k * N) as u64;
        match which {
            0 => b.keystream.fill(first, &mut b.words),
            1 => {
                b.p.iter_mut()
                    .zip(&b.words)
                    .for_each(|(p, w)| *p = unit::open_unit(*w))
            }
            2 => normal::quantiles(&b.central, &mut b.z, &mut b.tails),
            3 => normal::quantiles(&b.p, &mut b.z, &mut b.tails),
            4 => sampler.values(&b.words, &mut b.z, &mut b.scratch),
            5 => DType::Float32.encode(&b.z, &mut b.out),
            _ => {
                b.keystream.fill(first, &mut b.words);
                sampler.values(&b.words, &mut b.z, &mut b.scratch);
                DType::Float32.encode(&b.z, &mut b.out);
            }
        }
        black_box((&b.z, &b.out));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl")]
fn stage_avx512(which: usize, b: &mut Block) {
    stage(which, b);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn stage_avx2(which: usize, b: &mut Block) {
    stage(which, b);
}

fn run(isa: Isa, which: usize, b: &mut Block) {
    match isa {
        // SAFETY: only instruction sets `Isa::detected` found are run.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { stage_avx512(which, b) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { stage_avx2(which, b) },
        _ => stage(which, b),
    }
}

/// This thread's CPU time in seconds (Linux schedstat), so that other load on the machine
/// does not count.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").expect("Linux schedstat");
    let ns: f64 = stat
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("schedstat's first field");
    ns * 1e-9
}

fn main() {
    let mut b = Box::new(Block {
        keystream: Keystream::new(1, "w"),
        words: [0; N],
        p: [0.0; N],
        central: [0.0; N],
        z: [0.0; N],
        out: [0; 4 * N],
        tails: normal::Tails::default(),
        scratch: Scratch::default(),
    });
    // One block's real p, and the same with its tails moved to the centre.
    b.keystream.fill(0, &mut b.words);
    for (i, w) in b.words.iter().enumerate() {
        b.p[i] = unit::open_unit(*w);
        b.central[i] = if (b.p[i] - 0.5).abs() > 0.425 {
            0.5
        } else {
            b.p[i]
        };
    }
    let elements = (N * BLOCKS) as f64;
    let asked: Vec<Isa> = match std::env::args().skip(1).map(|name| name.parse()).collect() {
        Ok(asked) => asked,
        Err(unknown) => {
            eprintln!("normal_stages: {unknown}");
            std::process::exit(2);
        }
    };
    let chosen = |isa: &Isa| asked.is_empty() || asked.contains(isa);
    for isa in Isa::ALL
        .into_iter()
        .filter(|isa| *isa <= Isa::detected() && chosen(isa))
    {
        Isa::set_max(isa);
        println!("{isa}: CPU ns per element (M elements per CPU-second)");
        for (which, name) in STAGES.iter().enumerate() {
            let best = (0..3)
                .map(|_| {
                    let start = cpu_seconds();
                    run(isa, which, &mut b);
                    cpu_seconds() - start
                })
                .fold(f64::INFINITY, f64::min);
            let ns = best / elements * 1e9;
            println!("  {name:<30} {ns:6.2} ns  ({:5.0} M/s)", 1e3 / ns);
        }
    }
}
