//! A validated tensor that can produce any element-aligned byte range of its output.

use super::distribution::Sampler;
use super::dtype::DType;
use super::keystream::Keystream;
use super::request::TensorSpec;
use super::scheme::Resolved;
use super::slice::Selection;

/// Elements produced per inner step: the words, values and bytes stay in L1 cache.
const BLOCK: usize = 512;

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

    /// Output byte ranges `(offset, len)` of at most `max_bytes` each (rounded down to whole
    /// elements, at least one), contiguous and in order.
    pub fn chunks(&self, max_bytes: usize) -> impl Iterator<Item = (u64, usize)> + use<> {
        let size = self.dtype.size();
        let step = (max_bytes / size).max(1) * size;
        let total = self.byte_length();
        (0..total)
            .step_by(step)
            .map(move |offset| (offset, (total - offset).min(step as u64) as usize))
    }

    /// Writes output bytes `[offset, offset + out.len())`; both must be whole elements.
    pub fn fill(&self, offset: u64, out: &mut [u8]) {
        let size = self.dtype.size();
        assert!(
            offset.is_multiple_of(size as u64) && out.len().is_multiple_of(size),
            "byte range must hold whole elements"
        );
        let mut words = [0u64; BLOCK];
        let mut values = [0f64; BLOCK];
        let mut rest = out;
        let first = offset / size as u64;
        let count = (rest.len() / size) as u64;
        // Runs of consecutive full-tensor indices, cut into blocks of at most BLOCK elements.
        self.selection
            .for_each_run(first, count, |mut index, mut left| {
                while left > 0 {
                    let n = (left as usize).min(BLOCK);
                    if self.sampler.uses_words() {
                        self.keystream.fill(index, &mut words[..n]);
                    }
                    self.sampler.values(&words[..n], &mut values[..n]);
                    let (head, tail) = std::mem::take(&mut rest).split_at_mut(n * size);
                    self.dtype.encode(&values[..n], head);
                    rest = tail;
                    index += n as u64;
                    left -= n as u64;
                }
            });
    }
}
