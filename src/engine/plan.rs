//! A validated tensor that can produce any element-aligned byte range of its output.

use super::distribution::{Sampler, Scratch};
use super::dtype::DType;
use super::keystream::Keystream;
use super::request::TensorSpec;
use super::scheme::Resolved;
use super::slice::Selection;

/// Elements produced per inner step: the words, values and bytes stay in L1 cache.
const BLOCK: usize = super::normal::MAX_BLOCK;

/// One tensor of a validated request.
#[derive(Clone, Debug)]
pub struct TensorPlan {
    /// Position in the request.
    pub index: u32,
    pub name: String,
    /// The full shape (not the slice's).
    pub shape: Vec<u64>,
    pub dtype: DType,
    pub resolved: Resolved,
    selection: Selection,
    keystream: Keystream,
    sampler: Sampler,
}

impl TensorPlan {
    pub(super) fn new(
        index: u32,
        seed: u64,
        spec: &TensorSpec,
        dtype: DType,
        resolved: Resolved,
        selection: Selection,
    ) -> Self {
        Self {
            index,
            name: spec.name.clone(),
            shape: spec.shape.clone(),
            dtype,
            keystream: Keystream::new(seed, &spec.name),
            sampler: resolved.distribution.sampler(),
            resolved,
            selection,
        }
    }

    /// Shape of the output: the slice's, or `[n]` for a flat range.
    pub fn output_shape(&self) -> &[u64] {
        self.selection.output_shape()
    }

    /// Output bytes (validated to fit u64).
    pub fn byte_length(&self) -> u64 {
        self.selection.len() * self.dtype.size() as u64
    }

    /// Writes output bytes `[offset, offset + out.len())`; both must be whole elements.
    pub fn fill(&self, offset: u64, out: &mut [u8]) {
        let size = self.dtype.size();
        assert!(
            offset.is_multiple_of(size as u64) && out.len().is_multiple_of(size),
            "byte range must hold whole elements"
        );
        let isa = Isa::detect();
        let mut buffers = Box::new(Buffers::default());
        let mut rest = out;
        let count = (rest.len() / size) as u64;
        // Runs of consecutive full-tensor indices, each filled by the CPU's widest copy.
        self.selection
            .for_each_run(offset / size as u64, count, |index, n| {
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(n as usize * size);
                match isa {
                    // SAFETY: `Isa::detect` saw the CPU features these copies are built for.
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => unsafe { self.run_avx512(index, head, &mut buffers) },
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => unsafe { self.run_avx2(index, head, &mut buffers) },
                    Isa::Baseline => self.run(index, head, &mut buffers),
                }
                rest = tail;
            });
    }

    /// [`Self::run`] compiled for AVX-512: the same operations, 8 lanes wide.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn run_avx512(&self, index: u64, out: &mut [u8], buffers: &mut Buffers) {
        self.run(index, out, buffers);
    }

    /// [`Self::run`] compiled for AVX2: 4 lanes wide.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&self, index: u64, out: &mut [u8], buffers: &mut Buffers) {
        self.run(index, out, buffers);
    }

    /// Elements `index, index + 1, ...` of the full tensor into `out`: words -> values ->
    /// bytes, block by block, every step a vectorizable loop inlined here so that each
    /// compiled copy of this function uses its own vector width.
    #[inline(always)]
    fn run(&self, mut index: u64, out: &mut [u8], buffers: &mut Buffers) {
        let size = self.dtype.size();
        let Buffers {
            words,
            values,
            scratch,
        } = buffers;
        for out in out.chunks_mut(BLOCK * size) {
            let n = out.len() / size;
            if self.sampler.uses_words() {
                self.keystream.fill(index, &mut words[..n]);
            }
            self.sampler.values(&words[..n], &mut values[..n], scratch);
            self.dtype.encode(&values[..n], out);
            index += n as u64;
        }
    }
}

/// The instruction sets [`TensorPlan::fill`] has a compiled copy for.
#[derive(Clone, Copy)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// The target's baseline: SSE2 on x86_64, NEON on aarch64.
    Baseline,
}

impl Isa {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl")
            {
                return Self::Avx512;
            }
            if is_x86_feature_detected!("avx2") {
                return Self::Avx2;
            }
        }
        Self::Baseline
    }
}

/// Per-call working memory, in L1 cache while a block goes through.
struct Buffers {
    words: [u64; BLOCK],
    values: [f64; BLOCK],
    scratch: Scratch,
}

impl Default for Buffers {
    fn default() -> Self {
        Self {
            words: [0; BLOCK],
            values: [0.0; BLOCK],
            scratch: Scratch::default(),
        }
    }
}
