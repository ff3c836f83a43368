//! Property-based fuzzing of request decoding and validation, bounded in time for CI.
//!
//! Inputs: random bytes; random GenerateRequests (every scheme, hostile numbers, huge and
//! overflowing shapes, unknown enum values, odd slices) encoded and then mutated (bit flips,
//! insertions, deletions, splices, huge varints); and hand-made claims (length prefixes of
//! 2^32, packed shapes that claim more than they hold, a megabyte of empty tensors). Each
//! goes through prost decode -> service::convert::request -> engine plan (and, when valid,
//! headers and the first bytes of every tensor). Properties: no panic; the server's count of
//! tensors before decoding equals what prost decodes; each input done in
//! well under a second (a watchdog aborts on a hang); and the memory allocated on the way
//! (measured by a counting allocator) stays within a small multiple of the input's own size,
//! whatever sizes the input claims. A second test sends such inputs as raw gRPC messages to
//! a real server, which must answer each with a status and keep serving.
//!
//! WEIGHTINIT_FUZZ_SECS (default 8) bounds the in-process run; WEIGHTINIT_FUZZ_SEED picks
//! another sequence. A failure prints the input in hex.

use crate::util;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::{Raw, hex};
use prost::Message;
use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;
use rand::{RngExt, SeedableRng};
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;
use weightinit::engine::Limits;
use weightinit::proto::{self, GenerateRequest, init, slice};
use weightinit::service::{codec, convert};

// ---------------------------------------------------------------- allocation counting ---

/// Counts the bytes allocated by the current thread while tracking is on. It is the whole
/// test binary's allocator, but counts only for the fuzz tests that turn tracking on.
struct Counting;

thread_local! {
    static PANIC_SITE: Cell<Option<String>> = const { Cell::new(None) };
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static CURRENT: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    let _ = TRACKING.try_with(|tracking| {
        if tracking.get() {
            CURRENT.with(|c| {
                let now = c.get() + delta;
                c.set(now);
                PEAK.with(|p| p.set(p.get().max(now)));
            });
            if delta > 0 {
                LARGEST.with(|l| l.set(l.get().max(delta as usize)));
            }
        }
    });
}

// SAFETY: every call is passed on unchanged to the system allocator, which upholds the
// contract; the counting beside it allocates nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees, passed on as they came.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees, passed on as they came.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's guarantees, passed on as they came.
        unsafe { System.dealloc(ptr, layout) };
        note(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's guarantees, passed on as they came.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note(-(layout.size() as isize));
            note(new_size as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the peak and the largest single allocation made by
/// this thread meanwhile.
fn measured<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    CURRENT.with(|c| c.set(0));
    PEAK.with(|p| p.set(0));
    LARGEST.with(|l| l.set(0));
    TRACKING.with(|t| t.set(true));
    let result = f();
    TRACKING.with(|t| t.set(false));
    (
        result,
        PEAK.with(Cell::get).max(0) as usize,
        LARGEST.with(Cell::get),
    )
}

// ------------------------------------------------------------------------------ inputs ---

/// rand's seeded SmallRng, with the few draws the generators below use. `sane` makes them
/// keep to plausible values, so that many requests get past validation into planning.
struct Rng {
    rng: SmallRng,
    sane: bool,
}

impl Rng {
    fn new(seed: u64) -> Self {
        Self {
            rng: SmallRng::seed_from_u64(seed),
            sane: false,
        }
    }

    fn next(&mut self) -> u64 {
        self.rng.random()
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.rng.random_range(..n)
        }
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        *items.choose(&mut self.rng).expect("something to pick")
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        self.rng.fill(&mut bytes[..]);
        bytes
    }
}

fn dim(rng: &mut Rng) -> u64 {
    if rng.sane {
        return rng.below(64) + 1;
    }
    match rng.below(12) {
        0 => 0,
        1 => 1,
        2..=5 => rng.below(65) + 1,
        6 => rng.below(5000),
        7 => 1 << rng.below(64),
        8 => u64::MAX - rng.below(3),
        9 => (1 << 32) + rng.below(3),
        10 => rng.next(),
        _ => rng.pick(&[2, 3, 7, 768, 1024, 4096]),
    }
}

fn number(rng: &mut Rng) -> f64 {
    if rng.sane {
        return 0.1 + (rng.below(1000) as f64) / 500.0;
    }
    match rng.below(14) {
        0 => f64::NAN,
        1 => f64::INFINITY,
        2 => f64::NEG_INFINITY,
        3 => 0.0,
        4 => -0.0,
        5 => f64::MAX,
        6 => f64::MIN_POSITIVE,
        7 => 5e-324,
        8 => -1.0,
        9 => 1e300,
        10 => f64::from_bits(rng.next()),
        _ => (rng.next() as f64 / u64::MAX as f64) * 20.0 - 10.0,
    }
}

fn maybe(rng: &mut Rng) -> Option<f64> {
    if rng.chance(2) {
        None
    } else {
        Some(number(rng))
    }
}

fn enum_value(rng: &mut Rng, known: i32) -> i32 {
    if rng.sane {
        return rng.below(known as u64 + 1) as i32;
    }
    match rng.below(8) {
        0 => rng.next() as i32,
        1 => -1,
        2 => known + 1,
        _ => rng.below(known as u64 + 1) as i32,
    }
}

fn scheme(rng: &mut Rng) -> Option<init::Scheme> {
    use init::Scheme as S;
    use proto::{
        Constant, GlorotNormal, GlorotUniform, HeNormal, HeUniform, KaimingNormal, KaimingUniform,
        LecunNormal, LecunUniform, Normal, Ones, TorchDefault, TorchDefaultBias, TruncatedNormal,
        Uniform, VarianceScaling, XavierNormal, XavierUniform, Zeros,
    };
    let kaiming = |rng: &mut Rng| KaimingUniform {
        a: number(rng),
        mode: enum_value(rng, 4),
        nonlinearity: enum_value(rng, 6),
    };
    Some(match rng.below(20) {
        0 if !rng.sane => return None,
        0 => S::Zeros(Zeros {}),
        1 => S::Zeros(Zeros {}),
        2 => S::Ones(Ones {}),
        3 => S::Constant(Constant { value: number(rng) }),
        4 => S::Uniform(Uniform {
            low: maybe(rng),
            high: maybe(rng),
        }),
        5 => S::Normal(Normal {
            mean: maybe(rng),
            std: maybe(rng),
        }),
        6 => S::TruncatedNormal(TruncatedNormal {
            mean: maybe(rng),
            std: maybe(rng),
            a: maybe(rng),
            b: maybe(rng),
        }),
        7 => S::XavierUniform(XavierUniform { gain: maybe(rng) }),
        8 => S::XavierNormal(XavierNormal { gain: maybe(rng) }),
        9 => S::KaimingUniform(kaiming(rng)),
        10 => {
            let k = kaiming(rng);
            S::KaimingNormal(KaimingNormal {
                a: k.a,
                mode: k.mode,
                nonlinearity: k.nonlinearity,
            })
        }
        11 => S::VarianceScaling(VarianceScaling {
            scale: maybe(rng),
            mode: enum_value(rng, 4),
            distribution: enum_value(rng, 3),
        }),
        12 => S::GlorotUniform(GlorotUniform {}),
        13 => S::GlorotNormal(GlorotNormal {}),
        14 => S::HeUniform(HeUniform {}),
        15 => S::HeNormal(HeNormal {}),
        16 => S::LecunUniform(LecunUniform {}),
        17 => S::LecunNormal(LecunNormal {}),
        18 => S::TorchDefault(TorchDefault {}),
        _ => S::TorchDefaultBias(TorchDefaultBias {}),
    })
}

fn range(rng: &mut Rng, extent: u64) -> proto::Range {
    let bound = |rng: &mut Rng| match rng.below(4) {
        0 => dim(rng),
        _ => rng.below(extent.saturating_add(2)),
    };
    let (a, b) = (bound(rng), bound(rng));
    if rng.chance(5) {
        proto::Range { start: b, stop: a }
    } else {
        proto::Range {
            start: a.min(b),
            stop: a.max(b),
        }
    }
}

fn tensor(rng: &mut Rng, index: usize) -> proto::TensorSpec {
    let rank = match rng.below(10) {
        _ if rng.sane => rng.below(4) as usize + 1,
        0 => 0,
        1 => rng.below(40) as usize,
        _ => rng.below(4) as usize + 1,
    };
    let shape: Vec<u64> = (0..rank).map(|_| dim(rng)).collect();
    let numel = shape.iter().fold(1u64, |a, &d| a.saturating_mul(d));
    let name = match rng.below(10) {
        _ if rng.sane => format!("layer{index}.weight"),
        0 => String::new(),
        1 => "dup".to_owned(),
        2 => "ü€𝄞".repeat(rng.below(400) as usize),
        _ => format!("layer{index}.weight"),
    };
    let slice = match rng.below(6) {
        0 => Some(proto::Slice {
            kind: Some(slice::Kind::Dims(proto::DimRanges {
                ranges: shape
                    .iter()
                    .chain(if rng.chance(4) { &[5u64][..] } else { &[] })
                    .map(|&d| range(rng, d))
                    .collect(),
            })),
        }),
        1 => Some(proto::Slice {
            kind: Some(slice::Kind::Flat(range(rng, numel))),
        }),
        2 => Some(proto::Slice {
            kind: Some(slice::Kind::Shard(proto::Shard {
                dim: rng.below(rank as u64 + 2) as u32,
                index: rng.below(9) as u32,
                count: rng.pick(&[0, 1, 2, 3, 8, u32::MAX]),
            })),
        }),
        3 => Some(proto::Slice { kind: None }),
        _ => None,
    };
    proto::TensorSpec {
        name,
        shape,
        init: if !rng.sane && rng.chance(10) {
            None
        } else {
            Some(proto::Init {
                scheme: scheme(rng),
            })
        },
        dtype: enum_value(rng, 4),
        layout: enum_value(rng, 2),
        fan_in: if rng.chance(3) { Some(dim(rng)) } else { None },
        fan_out: if rng.chance(3) { Some(dim(rng)) } else { None },
        slice,
        permute: permute(rng, rank),
    }
}

/// Mostly a permutation of the rank (identity or shuffled), sometimes none, sometimes invalid.
fn permute(rng: &mut Rng, rank: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..rank as u32).collect();
    match rng.below(8) {
        0..=2 => Vec::new(),
        3 => order,
        4 if !rng.sane => {
            order.push(rank as u32 + rng.below(3) as u32);
            order
        }
        5 if !rng.sane && rank > 1 => {
            order[0] = order[1];
            order
        }
        _ => {
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            order
        }
    }
}

fn generate_request(rng: &mut Rng) -> GenerateRequest {
    let count = match rng.below(10) {
        _ if rng.sane => rng.below(6) as usize + 1,
        0 => 0,
        1 => rng.below(40) as usize,
        _ => rng.below(4) as usize + 1,
    };
    GenerateRequest {
        seed: rng.next(),
        tensors: (0..count).map(|i| tensor(rng, i)).collect(),
        dtype: enum_value(rng, 4),
        chunk_bytes: if rng.sane {
            rng.pick(&[0, 8, 4096, 1 << 20])
        } else {
            rng.pick(&[0, 0, 0, 1, 2, 7, 8, 4096, 1 << 20, u32::MAX])
        },
        layout: enum_value(rng, 2),
        algorithm: if rng.sane {
            rng.pick(&[0, 1])
        } else {
            rng.pick(&[0, 0, 1, 1, 2, u32::MAX])
        },
    }
}

/// A varint of `value`.
fn varint(mut value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
    out
}

fn mutate(rng: &mut Rng, mut bytes: Vec<u8>, other: &[u8]) -> Vec<u8> {
    for _ in 0..rng.below(4) + 1 {
        let len = bytes.len() as u64;
        let at = rng.below(len + 1) as usize;
        match rng.below(9) {
            0 if !bytes.is_empty() => {
                let i = rng.below(len) as usize;
                bytes[i] ^= 1 << rng.below(8);
            }
            1 if !bytes.is_empty() => {
                let i = rng.below(len) as usize;
                bytes[i] = rng.next() as u8;
            }
            2 => {
                let n = rng.below(16) as usize;
                let insert = rng.bytes(n);
                bytes.splice(at..at, insert);
            }
            3 => {
                let end = (at + rng.below(16) as usize).min(bytes.len());
                bytes.drain(at..end);
            }
            4 => bytes.truncate(at),
            5 => {
                // A huge varint: a length or a dimension claimed out of all proportion.
                let random = rng.next();
                let claim = varint(rng.pick(&[u64::MAX, 1 << 32, (1 << 31) - 1, 1 << 40, random]));
                bytes.splice(at..at, claim);
            }
            6 if !other.is_empty() => {
                let from = rng.below(other.len() as u64) as usize;
                let to = (from + rng.below(64) as usize).min(other.len());
                bytes.splice(at..at, other[from..to].iter().copied());
            }
            7 if at < bytes.len() => {
                let end = (at + rng.below(32) as usize).min(bytes.len());
                let copy = bytes[at..end].to_vec();
                bytes.splice(end..end, copy);
            }
            _ => {
                let n = rng.below(8) as usize;
                bytes.splice(at..at, std::iter::repeat_n(0xFF, n));
            }
        }
    }
    bytes
}

/// Hand-made inputs whose claims dwarf their size.
fn claims() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    // tensors (field 2, length-delimited) claiming 4 GiB, then almost nothing.
    let mut claim = vec![0x12];
    claim.extend(varint(u32::MAX as u64));
    claim.extend([0x0A, 0x01, b'w']);
    out.push(("tensors length 4 GiB", claim));
    // A packed shape (TensorSpec field 2) claiming 2^40 bytes.
    let mut shape = vec![0x12];
    shape.extend(varint(1 << 40));
    shape.extend([0x01, 0x02]);
    let mut claim = vec![0x12];
    claim.extend(varint(shape.len() as u64));
    claim.extend(shape);
    out.push(("packed shape claiming 2^40 bytes", claim));
    // A name claiming u64::MAX bytes.
    let mut name = vec![0x0A];
    name.extend(varint(u64::MAX));
    let mut claim = vec![0x12];
    claim.extend(varint(name.len() as u64));
    claim.extend(name);
    out.push(("name length u64::MAX", claim));
    // Valid protobuf, absurd numbers: shapes whose products overflow.
    let huge = GenerateRequest {
        seed: 1,
        tensors: vec![proto::TensorSpec {
            name: "w".into(),
            shape: vec![u64::MAX, u64::MAX, 2],
            init: Some(proto::Init {
                scheme: Some(init::Scheme::Zeros(proto::Zeros {})),
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    out.push(("shape [u64::MAX, u64::MAX, 2]", huge.encode_to_vec()));
    let mut big = huge.clone();
    big.tensors[0].shape = vec![1 << 20, 1 << 20, 1 << 20];
    out.push(("shape 2^60 elements", big.encode_to_vec()));
    // Many tiny tensors: 512 Ki empty specs (1 MiB), and 64 Ki one-element ones.
    out.push(("512 Ki empty tensors", [0x12, 0x00].repeat(512 << 10)));
    let tiny = GenerateRequest {
        tensors: (0..65536)
            .map(|i| proto::TensorSpec {
                name: format!("t{i}"),
                shape: vec![1],
                init: Some(proto::Init {
                    scheme: Some(init::Scheme::Zeros(proto::Zeros {})),
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    out.push(("65536 one-element tensors", tiny.encode_to_vec()));
    out
}

// ---------------------------------------------------------------------------- property ---

/// What happened to one input.
#[derive(Debug, Default, Clone, Copy)]
struct Outcome {
    decoded: bool,
    converted: bool,
    planned: bool,
}

/// decode -> convert -> plan, then headers and the first bytes of each tensor.
fn process(bytes: &[u8], limits: &Limits) -> Outcome {
    let mut outcome = Outcome::default();
    let Ok(request) = GenerateRequest::decode(bytes) else {
        return outcome;
    };
    outcome.decoded = true;
    // The server refuses too many tensors by this count, before decoding: it must agree.
    assert_eq!(codec::count_tensors(bytes), request.tensors.len());
    let Ok(request) = convert::request(&request) else {
        return outcome;
    };
    outcome.converted = true;
    let Ok(plan) = request.plan(limits) else {
        return outcome;
    };
    outcome.planned = true;
    assert!(plan.total_bytes <= limits.max_request_bytes);
    assert!(plan.tensors.len() <= limits.max_tensors as usize);
    let mut buf = vec![0u8; 4096];
    for tensor in plan.tensors.iter().take(64) {
        let header = convert::header(tensor);
        assert_eq!(header.byte_length, tensor.byte_length());
        let size = tensor.dtype.size();
        // The first chunk's bytes, or the first 4 KiB of them.
        let chunk = (plan.chunk_bytes / size).max(1) * size;
        let n = (tensor.byte_length().min(chunk as u64) as usize).min(buf.len()) / size * size;
        tensor.fill(0, &mut buf[..n]);
    }
    outcome
}

/// Allocation allowed for an input of `len` bytes: a fixed allowance plus a multiple of the
/// input's size (decoding expands a 2-byte empty tensor into a struct of a few hundred bytes,
/// and conversion copies it once), never anything that follows a claimed size.
fn allowance(len: usize) -> usize {
    (1 << 20) + 256 * len
}

#[test]
fn decoding_and_validation_survive_hostile_input() {
    let seconds: u64 = std::env::var("WEIGHTINIT_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let seed: u64 = std::env::var("WEIGHTINIT_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_1DEA);
    // orthogonal and sparse compute their whole matrix before the first byte: a small bound
    // keeps every input fast (the limit itself is what is under test).
    let limits = Limits {
        max_matrix_elements: 1 << 12,
        ..Limits::default()
    };
    let tight = Limits {
        max_tensors: 8,
        max_rank: 4,
        max_name_bytes: 16,
        max_request_bytes: 1 << 20,
        ..limits
    };

    // A hang is a failure too: a watchdog aborts with the input at hand.
    let current = Arc::new(Mutex::new(Vec::<u8>::new()));
    let progress = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    {
        let (current, progress, done) = (current.clone(), progress.clone(), done.clone());
        std::thread::spawn(move || {
            let mut last = u64::MAX;
            loop {
                std::thread::sleep(Duration::from_secs(10));
                if done.load(Ordering::Relaxed) == 1 {
                    return;
                }
                let now = progress.load(Ordering::Relaxed);
                if now == last {
                    let input = current.lock().unwrap_or_else(|e| e.into_inner());
                    eprintln!("HANG: one input took over 10 s: {}", hex(&input));
                    std::process::abort();
                }
                last = now;
            }
        });
    }

    let mut panics = std::collections::BTreeMap::<String, (String, Vec<u8>, u64)>::new();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let site = info
            .location()
            .map_or("?".to_owned(), |l| format!("{}:{}", l.file(), l.line()));
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        if PANIC_SITE.try_with(|_| ()).is_ok() && TRACKING.with(Cell::get) {
            PANIC_SITE.with(|s| s.set(Some(format!("{site}: {message}"))));
        } else {
            default_hook(info);
        }
    }));
    let mut rng = Rng::new(seed);
    let mut previous = generate_request(&mut rng).encode_to_vec();
    let mut stats = [0u64; 4]; // inputs, decoded, converted, planned
    let mut slowest = Duration::ZERO;
    let mut worst_ratio = 0.0f64;
    let mut worst_peak = 0usize;
    let started = Instant::now();
    let hand_made = claims();
    let mut check = |what: &str, bytes: Vec<u8>, limits: &Limits, stats: &mut [u64; 4]| {
        *current.lock().unwrap() = if bytes.len() <= 4096 {
            bytes.clone()
        } else {
            bytes[..4096].to_vec()
        };
        let began = Instant::now();
        let (result, peak, largest) =
            measured(|| catch_unwind(AssertUnwindSafe(|| process(&bytes, limits))));
        let took = began.elapsed();
        progress.fetch_add(1, Ordering::Relaxed);
        let Ok(outcome) = result else {
            // Collected by panic site, so that one run reports every distinct bug.
            let site = PANIC_SITE.with(|s| s.take()).unwrap_or_default();
            panics
                .entry(site)
                .or_insert_with(|| (what.to_owned(), bytes.clone(), 0))
                .2 += 1;
            return (0, took);
        };
        assert!(
            took < Duration::from_secs(2),
            "{what}: {took:?} on input {}",
            hex(&bytes)
        );
        assert!(
            peak <= allowance(bytes.len()) && largest <= allowance(bytes.len()),
            "{what}: allocated {peak} bytes (largest {largest}) for a {}-byte input {}",
            bytes.len(),
            hex(&bytes[..bytes.len().min(256)])
        );
        slowest = slowest.max(took);
        if bytes.len() >= 64 {
            worst_ratio = worst_ratio.max(peak as f64 / bytes.len() as f64);
        }
        worst_peak = worst_peak.max(peak);
        stats[0] += 1;
        stats[1] += outcome.decoded as u64;
        stats[2] += outcome.converted as u64;
        stats[3] += outcome.planned as u64;
        (peak, took)
    };

    for (what, bytes) in hand_made.iter().cloned() {
        let len = bytes.len();
        let (peak, took) = check(what, bytes, &limits, &mut stats);
        println!("claim {what:34} {len:>8} bytes in, {peak:>10} bytes allocated at peak, {took:?}");
    }
    while started.elapsed() < Duration::from_secs(seconds) {
        for _ in 0..64 {
            let limits = if rng.chance(3) { &tight } else { &limits };
            rng.sane = rng.chance(2);
            let input = match rng.below(10) {
                0 => {
                    let n = rng.below(512) as usize;
                    rng.bytes(n)
                }
                1..=3 => generate_request(&mut rng).encode_to_vec(),
                _ => {
                    let base = if rng.chance(2) {
                        generate_request(&mut rng).encode_to_vec()
                    } else {
                        previous.clone()
                    };
                    mutate(&mut rng, base, &previous)
                }
            };
            if rng.chance(4) {
                previous = input.clone();
            }
            check("random", input, limits, &mut stats);
        }
    }
    done.store(1, Ordering::Relaxed);
    let _ = std::panic::take_hook();
    println!(
        "fuzzed {} inputs in {:.1?} (seed {seed:#x}): {} decoded, {} converted, {} planned; \
         slowest {slowest:?}; peak allocation {} KiB, at most {worst_ratio:.0} bytes per input byte",
        stats[0],
        started.elapsed(),
        stats[1],
        stats[2],
        stats[3],
        worst_peak >> 10
    );
    assert!(
        stats[3] > 0 && stats[1] > stats[3],
        "the mix reaches every stage"
    );
    for (site, (what, input, count)) in &panics {
        eprintln!(
            "PANIC at {site}\n  {count} inputs, e.g. ({what}) {}",
            hex(input)
        );
    }
    assert!(panics.is_empty(), "{} panic sites (above)", panics.len());
}

/// Panics already reported to the owner of the code, with the fix; each is printed on
/// every run until it is gone, and then its entry should be deleted. Anything else fails.

// --------------------------------------------------------------------- the real server ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_answers_hostile_messages_and_keeps_serving() {
    let server = util::TestServer::start_with(|c| {
        c.max_request_bytes = 16 << 20;
        c.max_message_bytes = 2 << 20;
    })
    .await;
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut rng = Rng::new(0xF00D);
    let mut previous = generate_request(&mut rng).encode_to_vec();
    let mut inputs: Vec<Vec<u8>> = claims().into_iter().map(|(_, b)| b).collect();
    inputs.push(vec![0x12; 3 << 20]); // over --max-message-bytes
    for i in 0..240 {
        let input = match i % 3 {
            0 => {
                let n = rng.below(256) as usize;
                rng.bytes(n)
            }
            1 => generate_request(&mut rng).encode_to_vec(),
            _ => mutate(&mut rng, previous.clone(), &[]),
        };
        previous = input.clone();
        inputs.push(input);
    }
    let mut codes = std::collections::BTreeMap::<String, u32>::new();
    let started = Instant::now();
    for (i, input) in inputs.iter().enumerate() {
        let path = ["Describe", "Digest", "Generate"][i % 3];
        let began = Instant::now();
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let mut request = tonic::Request::new(input.clone());
        request.set_timeout(Duration::from_secs(10));
        let path_and_query =
            PathAndQuery::try_from(format!("/weightinit.v1.WeightInit/{path}")).unwrap();
        let code = if path == "Generate" {
            match grpc.server_streaming(request, path_and_query, Raw).await {
                Ok(response) => {
                    // Valid requests may be large: read a little, then hang up.
                    let mut stream = response.into_inner();
                    let mut code = Code::Ok;
                    for _ in 0..4 {
                        match stream.message().await {
                            Ok(Some(_)) => {}
                            Ok(None) => break,
                            Err(status) => {
                                code = status.code();
                                break;
                            }
                        }
                    }
                    code
                }
                Err(status) => status.code(),
            }
        } else {
            match grpc.unary(request, path_and_query, Raw).await {
                Ok(_) => Code::Ok,
                Err(status) => status.code(),
            }
        };
        assert!(
            matches!(
                code,
                Code::Ok
                    | Code::InvalidArgument
                    | Code::ResourceExhausted
                    | Code::OutOfRange
                    | Code::Internal
            ),
            "{path}: {code:?} for {}",
            hex(&input[..input.len().min(256)])
        );
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "{path} took {:?}",
            began.elapsed()
        );
        *codes.entry(format!("{path} {code:?}")).or_default() += 1;
    }
    println!(
        "{} hostile messages through the server in {:.1?}: {codes:?}",
        inputs.len(),
        started.elapsed()
    );
    // Still serving, with nothing left running.
    util::wait_until(|| server.shared.active_streams() == 0).await;
    let mut client = server.client().await;
    let good: GenerateRequest = serde_json::from_value(serde_json::json!({"seed": 3,
        "tensors": [{"name": "w", "shape": [256, 256], "init": {"heNormal": {}}}]}))
    .unwrap();
    let received = util::generate(&mut client, good.clone()).await;
    assert_eq!(
        blake3::hash(&received[0].data).as_bytes(),
        &util::expected_digests(&good)[0]
    );
}

/// A fuzz finding, fixed: a zero-size Keras-layout
/// tensor (fans 0, so they fit) whose other dimensions multiply past u64, with a dims slice.
/// Valid; must plan to 0 bytes.
#[test]
fn a_zero_size_tensor_with_huge_dimensions_and_a_slice_plans_to_nothing() {
    let request: GenerateRequest = serde_json::from_value(serde_json::json!({"tensors": [{
        "name": "w", "shape": [0, "1099511627776", "1099511627776"], "init": {"zeros": {}},
        "layout": "LAYOUT_KERAS",
        "slice": {"dims": {"ranges": [{}, {"stop": 1}, {"stop": 1}]}}}]}))
    .unwrap();
    let plan = convert::request(&request)
        .unwrap()
        .plan(&Limits::default())
        .unwrap();
    assert_eq!(plan.total_bytes, 0);
}
