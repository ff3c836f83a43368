//! A validated tensor that can produce any element-aligned byte range of its output.

use super::distribution::{Sampler, Scratch};
use super::dtype::DType;
use super::isa::Isa;
use super::keystream::Keystream;
use super::scheme::Resolved;
use super::slice::{Placement, Selection, TILE_ELEMENTS, TileSink};
use super::structured::Structured;

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
    /// Set for the structured schemes, whose values are not one word's each.
    structured: Option<Structured>,
}

impl TensorPlan {
    pub(super) fn new(
        index: u32,
        seed: u64,
        name: &str,
        shape: &[u64],
        dtype: DType,
        resolved: Resolved,
        selection: Selection,
    ) -> Self {
        Self {
            index,
            name: name.to_owned(),
            shape: shape.to_vec(),
            dtype,
            keystream: Keystream::new(seed, name),
            sampler: resolved.distribution.sampler(),
            structured: resolved
                .structure
                .map(|structure| Structured::new(structure, shape)),
            resolved,
            selection,
        }
    }

    /// Shape of the output: the (permuted) view's or its slice's, or `[n]` for a flat range.
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
        let (first, count) = (offset / size as u64, (out.len() / size) as u64);
        if let Some(columns) = self.selection.tile_columns() {
            let lead = self.selection.row_offset(first);
            return self.fill_tiles(first, count, 0..columns, lead, out);
        }
        let isa = Isa::active();
        let mut buffers = Box::new(Buffers::default());
        let mut rest = out;
        // Runs of consecutive full-tensor indices, each filled by the CPU's widest copy.
        self.selection.for_each_run(first, count, |index, n| {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(n as usize * size);
            self.run_dispatch(isa, index, head, &mut buffers);
            rest = tail;
        });
    }

    /// The output's columns when it is a transposing view, best made in panels of many rows
    /// split by columns ([`Self::fill_columns`], then [`Self::assemble`]) so that its columns
    /// are generated as long keystream runs; `None` when [`Self::fill`] of any range is as fast.
    pub fn tile_columns(&self) -> Option<u64> {
        self.selection.tile_columns()
    }

    /// Output rows of a transposing view worth making at once as a contiguous range; see
    /// [`Selection::row_batch`]. `None` when the view is best made by [`Self::fill_columns`].
    pub fn row_batch(&self) -> Option<u64> {
        self.selection.row_batch()
    }

    /// For a tiled view: the part of output elements `[first, first + count)` that lies in
    /// output columns `columns`, as whole rows of `columns` (from the row of `first` to the row
    /// of the last element) written row-major into `out`; places of elements outside the range
    /// are left as they are. [`Self::assemble`] puts such parts together.
    pub fn fill_columns(
        &self,
        first: u64,
        count: u64,
        columns: std::ops::Range<u64>,
        out: &mut [u8],
    ) {
        self.fill_tiles(first, count, columns, 0, out);
    }

    /// Bytes of the rows [`Self::fill_columns`] writes for `columns`.
    pub fn columns_bytes(&self, first: u64, count: u64, columns: &std::ops::Range<u64>) -> usize {
        let n = self.selection.tile_columns().unwrap_or(1);
        let lead = self.selection.row_offset(first);
        let rows = if count == 0 {
            0
        } else {
            (lead + count).div_ceil(n)
        };
        (rows * (columns.end - columns.start)) as usize * self.dtype.size()
    }

    /// Writes output elements `[first, first + out.len() / size)` from `parts`: what
    /// [`Self::fill_columns`] wrote, from element `origin` on, for each part's columns (a
    /// range that covers this one).
    pub fn assemble(
        &self,
        origin: u64,
        first: u64,
        parts: &[(std::ops::Range<u64>, &[u8])],
        out: &mut [u8],
    ) {
        let size = self.dtype.size();
        let n = self.selection.tile_columns().unwrap_or(1);
        // Positions counted from the start of the parts' first row.
        let lo = first - origin + self.selection.row_offset(origin);
        let hi = lo + (out.len() / size) as u64;
        if lo == hi {
            return;
        }
        for (columns, data) in parts {
            let width = columns.end - columns.start;
            for row in lo / n..=(hi - 1) / n {
                let start = (row * n + columns.start).max(lo);
                let stop = (row * n + columns.end).min(hi);
                if start >= stop {
                    continue;
                }
                let from = (row * width + start - row * n - columns.start) as usize * size;
                let to = (start - lo) as usize * size;
                let len = (stop - start) as usize * size;
                out[to..to + len].copy_from_slice(&data[from..from + len]);
            }
        }
    }

    /// Tiles of a transposing view: columns generated as runs, rows copied out of cache.
    /// `lead`: elements of the first row before `first` that `out` does not hold.
    fn fill_tiles(
        &self,
        first: u64,
        count: u64,
        columns: std::ops::Range<u64>,
        lead: u64,
        out: &mut [u8],
    ) {
        let size = self.dtype.size();
        let mut writer = TileWriter {
            plan: self,
            isa: Isa::active(),
            buffers: Box::default(),
            tile: vec![0; TILE_ELEMENTS as usize * size],
            out,
            width: columns.end - columns.start,
            column0: columns.start,
            lead,
            size,
        };
        self.selection
            .for_each_tile(first, count, columns, &mut writer);
    }

    fn run_dispatch(&self, isa: Isa, index: u64, out: &mut [u8], buffers: &mut Buffers) {
        match isa {
            // SAFETY: `Isa::active` is never wider than the CPU: it has these copies' features.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { self.run_avx512(index, out, buffers) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { self.run_avx2(index, out, buffers) },
            _ => self.run(index, out, buffers),
        }
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
            // Structured schemes other than sparse make their values without the words.
            let draws = self.structured.as_ref().is_none_or(|s| s.uses_words());
            if draws && self.sampler.uses_words() {
                self.keystream.fill(index, &mut words[..n]);
            }
            if draws {
                self.sampler.values(&words[..n], &mut values[..n], scratch);
            }
            if let Some(s) = &self.structured {
                s.values(&self.keystream, index, &mut values[..n]);
            }
            self.dtype.encode(&values[..n], out);
            index += n as u64;
        }
    }
}

/// Generates a tile's columns into its buffer and copies its rows to the output.
struct TileWriter<'a> {
    plan: &'a TensorPlan,
    isa: Isa,
    buffers: Box<Buffers>,
    tile: Vec<u8>,
    out: &'a mut [u8],
    /// Elements per output row in `out`, and the output column of its first.
    width: u64,
    column0: u64,
    /// Elements of `out`'s first row that precede it.
    lead: u64,
    size: usize,
}

impl TileSink for TileWriter<'_> {
    fn generate(&mut self, full_index: u64, run: u64, at: usize) {
        let bytes = &mut self.tile[at * self.size..(at + run as usize) * self.size];
        self.plan
            .run_dispatch(self.isa, full_index, bytes, &mut self.buffers);
    }

    fn place(&mut self, rows: &[Placement], step: usize) {
        match self.isa {
            // SAFETY: `Isa::active` is never wider than the CPU: it has these copies' features.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { self.place_avx512(rows, step) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { self.place_avx2(rows, step) },
            _ => self.place_sized(rows, step, false),
        }
    }
}

impl TileWriter<'_> {
    /// [`Self::place_sized`] compiled for AVX-512.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    unsafe fn place_avx512(&mut self, rows: &[Placement], step: usize) {
        self.place_sized(rows, step, true);
    }

    /// [`Self::place_sized`] compiled for AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn place_avx2(&mut self, rows: &[Placement], step: usize) {
        self.place_sized(rows, step, true);
    }

    #[inline(always)]
    fn place_sized(&mut self, rows: &[Placement], step: usize, avx2: bool) {
        match self.size {
            2 => self.place_as::<2>(rows, step, false),
            4 => self.place_as::<4>(rows, step, avx2),
            _ => self.place_as::<8>(rows, step, false),
        }
    }

    /// [`TileSink::place`] for N-byte elements: eight rows at a time where eight neighbouring
    /// rows take the same columns from neighbouring elements of each column, so that each
    /// column is read as one short contiguous run.
    #[inline(always)]
    fn place_as<const N: usize>(&mut self, rows: &[Placement], step: usize, avx2: bool) {
        let (tile, _) = self.tile.as_chunks::<N>();
        let (out, _) = self.out.as_chunks_mut::<N>();
        let (width, column0, lead) = (self.width, self.column0, self.lead);
        let to = |p: &Placement| (p.row * width + p.column - column0 - lead) as usize;
        let mut rest = rows;
        while !rest.is_empty() {
            if let Some(group) = rest.first_chunk::<8>()
                && group.iter().enumerate().all(|(j, p)| {
                    p.at == group[0].at + j && p.n == group[0].n && p.column == group[0].column
                })
                && let Ok(mut targets) =
                    out.get_disjoint_mut(group.map(|p| to(&p)..to(&p) + p.n as usize))
            {
                let (at, n) = (group[0].at, group[0].n as usize);
                let mut k = 0;
                #[cfg(target_arch = "x86_64")]
                if avx2 && N == 4 {
                    while k + 8 <= n {
                        // SAFETY: `avx2` is set only by the copies compiled for AVX2 and AVX-512,
                        // which `Isa::active` chose because the CPU has them.
                        unsafe { transpose_8x8(tile, at + k * step, step, k, &mut targets) };
                        k += 8;
                    }
                }
                for k in k..n {
                    let column: &[[u8; N]; 8] =
                        tile[at + k * step..][..8].try_into().expect("8 elements");
                    for (target, element) in targets.iter_mut().zip(column) {
                        target[k] = *element;
                    }
                }
                rest = &rest[8..];
            } else {
                let p = rest[0];
                let target = &mut out[to(&p)..to(&p) + p.n as usize];
                for (slot, element) in target.iter_mut().zip(tile[p.at..].iter().step_by(step)) {
                    *slot = *element;
                }
                rest = &rest[1..];
            }
        }
    }
}

/// `targets[j][k + kk] = tile[at + kk * step + j]` for j, kk in 0..8: an 8 x 8 block of 4-byte
/// elements transposed in AVX2 registers (eight loads, 24 shuffles, eight stores).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn transpose_8x8<const N: usize>(
    tile: &[[u8; N]],
    at: usize,
    step: usize,
    k: usize,
    targets: &mut [&mut [[u8; N]]; 8],
) {
    use std::arch::x86_64::*;
    assert_eq!(N, 4, "32-bit lanes");
    let load = |kk: usize| {
        let column = &tile[at + kk * step..][..8];
        // SAFETY: `column` is 8 elements of 4 bytes: the 32 bytes an unaligned load reads.
        unsafe { _mm256_loadu_si256(column.as_ptr().cast()) }
    };
    let r = [
        load(0),
        load(1),
        load(2),
        load(3),
        load(4),
        load(5),
        load(6),
        load(7),
    ];
    let t = [
        _mm256_unpacklo_epi32(r[0], r[1]),
        _mm256_unpackhi_epi32(r[0], r[1]),
        _mm256_unpacklo_epi32(r[2], r[3]),
        _mm256_unpackhi_epi32(r[2], r[3]),
        _mm256_unpacklo_epi32(r[4], r[5]),
        _mm256_unpackhi_epi32(r[4], r[5]),
        _mm256_unpacklo_epi32(r[6], r[7]),
        _mm256_unpackhi_epi32(r[6], r[7]),
    ];
    let u = [
        _mm256_unpacklo_epi64(t[0], t[2]),
        _mm256_unpackhi_epi64(t[0], t[2]),
        _mm256_unpacklo_epi64(t[1], t[3]),
        _mm256_unpackhi_epi64(t[1], t[3]),
        _mm256_unpacklo_epi64(t[4], t[6]),
        _mm256_unpackhi_epi64(t[4], t[6]),
        _mm256_unpacklo_epi64(t[5], t[7]),
        _mm256_unpackhi_epi64(t[5], t[7]),
    ];
    let rows = [
        _mm256_permute2x128_si256::<0x20>(u[0], u[4]),
        _mm256_permute2x128_si256::<0x20>(u[1], u[5]),
        _mm256_permute2x128_si256::<0x20>(u[2], u[6]),
        _mm256_permute2x128_si256::<0x20>(u[3], u[7]),
        _mm256_permute2x128_si256::<0x31>(u[0], u[4]),
        _mm256_permute2x128_si256::<0x31>(u[1], u[5]),
        _mm256_permute2x128_si256::<0x31>(u[2], u[6]),
        _mm256_permute2x128_si256::<0x31>(u[3], u[7]),
    ];
    for (target, row) in targets.iter_mut().zip(rows) {
        let out = &mut target[k..k + 8];
        // SAFETY: `out` is 8 elements of 4 bytes: the 32 bytes an unaligned store writes.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), row) };
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
