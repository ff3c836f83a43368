//! A validated tensor that can produce any element-aligned byte range of its output.

use std::marker::PhantomData;
use std::sync::Arc;

use super::distribution::{Sampler, Scratch};
use super::dtype::DType;
use super::isa::Isa;
use super::keystream::Keystream;
use super::scheme::Resolved;
use super::slice::{Placement, Selection, TILE_ELEMENTS, TileSink};
use super::structured::{StopCheck, Structured, Unfinished};

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

    /// Computes what a structured scheme needs of the whole tensor before its first element
    /// (orthogonal's QR, sparse's zeros), asking `stop` between steps; nothing for the other
    /// schemes. Without it, the first [`Self::fill`] computes it, cannot be stopped, and
    /// panics if memory runs out.
    pub fn prepare(&self, stop: StopCheck<'_>) -> Result<(), Unfinished> {
        match &self.structured {
            Some(structured) => structured.prepare(&self.keystream, stop),
            None => Ok(()),
        }
    }

    /// CPU cost in element-equivalents (the cost of generating one element of a plain
    /// scheme): the elements output plus the whole-tensor computation of a structured scheme.
    pub fn work(&self) -> u64 {
        let whole = self.resolved.structure.map_or(0, |s| s.whole_work());
        self.selection.len().saturating_add(whole)
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
            let target = Target::new(out.as_mut_ptr(), out.len(), columns, lead, 0..columns);
            return self.fill_tiles(first, count, target);
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
    /// split by columns ([`Self::shared_output`], [`Self::fill_columns`]) so that its columns
    /// are generated as long keystream runs; `None` when [`Self::fill`] of any range is as fast.
    pub fn tile_columns(&self) -> Option<u64> {
        self.selection.tile_columns()
    }

    /// Output rows of a transposing view worth making at once as a contiguous range; see
    /// [`Selection::row_batch`]. `None` when the view is best made by [`Self::fill_columns`].
    pub fn row_batch(&self) -> Option<u64> {
        self.selection.row_batch()
    }

    /// A buffer for output elements `[first, first + count)` of a transposing view (the bytes
    /// of `buffer`, resized), and `parts` writers that fill it at once from several threads,
    /// each its own range of output columns in every row ([`Self::fill_columns`]). Made so, a
    /// panel of many rows has long keystream runs for its columns and needs no copy to put its
    /// parts together. For a view made of runs, one writer holds everything.
    pub fn shared_output(
        &self,
        first: u64,
        count: u64,
        mut buffer: Vec<u8>,
        parts: u64,
    ) -> (SharedOutput, Vec<ColumnWriter>) {
        assert!(
            first + count <= self.selection.len(),
            "elements out of range"
        );
        buffer.resize(count as usize * self.dtype.size(), 0);
        let width = self.selection.tile_columns().unwrap_or(1);
        let mut buffer = Arc::new(SharedBuffer {
            ptr: std::ptr::null_mut(),
            len: buffer.len(),
            data: buffer,
            first,
            count,
            width,
            lead: self.selection.row_offset(first),
        });
        let unique = Arc::get_mut(&mut buffer).expect("not shared yet");
        // Derived while the buffer is still uniquely borrowed; `data` is not touched again
        // until `SharedOutput::into_vec` has it back.
        unique.ptr = unique.data.as_mut_ptr();
        let parts = parts.clamp(1, width);
        let writers = (0..parts)
            .map(|j| ColumnWriter {
                buffer: Arc::clone(&buffer),
                columns: width * j / parts..width * (j + 1) / parts,
            })
            .collect();
        (SharedOutput { buffer }, writers)
    }

    /// Fills `writer`'s columns of its buffer ([`Self::shared_output`] of this tensor).
    pub fn fill_columns(&self, writer: &mut ColumnWriter) {
        let buffer = &*writer.buffer;
        let target = Target::new(
            buffer.ptr,
            buffer.len,
            buffer.width,
            buffer.lead,
            writer.columns.clone(),
        );
        if self.selection.tile_columns().is_some() {
            self.fill_tiles(buffer.first, buffer.count, target);
        } else {
            // SAFETY: a view made of runs has one column, so this is the buffer's only writer,
            // and `ptr` is valid for `len` bytes while a writer holds the buffer.
            let out = unsafe { std::slice::from_raw_parts_mut(buffer.ptr, buffer.len) };
            self.fill(buffer.first * self.dtype.size() as u64, out);
        }
    }

    /// Tiles of a transposing view: columns generated as runs, rows copied out of cache into
    /// `target`'s columns of output elements `[first, first + count)`.
    fn fill_tiles(&self, first: u64, count: u64, target: Target<'_>) {
        let size = self.dtype.size();
        let columns = target.columns.clone();
        let mut writer = TileWriter {
            plan: self,
            isa: Isa::active(),
            buffers: Box::default(),
            tile: vec![0; TILE_ELEMENTS as usize * size],
            target,
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
    target: Target<'a>,
    size: usize,
}

/// Where a tile's rows go: output elements `[first, first + len / size)` of whole rows of
/// `width` elements, in a buffer that other threads may be writing too, each in its own
/// columns. Every write is checked to fall in `columns` and in the buffer, which is what keeps
/// writers that share a buffer from ever writing the same bytes.
struct Target<'a> {
    ptr: *mut u8,
    /// Bytes at `ptr`.
    len: usize,
    width: u64,
    /// Elements of the first row that precede the buffer's first element.
    lead: u64,
    columns: std::ops::Range<u64>,
    _out: PhantomData<&'a mut [u8]>,
}

impl Target<'_> {
    fn new(ptr: *mut u8, len: usize, width: u64, lead: u64, columns: std::ops::Range<u64>) -> Self {
        Self {
            ptr,
            len,
            width,
            lead,
            columns,
            _out: PhantomData,
        }
    }

    /// The first of the `p.n` elements placement `p` writes.
    fn at<const N: usize>(&self, p: &Placement) -> *mut [u8; N] {
        assert!(
            self.columns.start <= p.column && p.column + p.n <= self.columns.end,
            "a placement outside its writer's columns"
        );
        let to = (p.row * self.width + p.column)
            .checked_sub(self.lead)
            .expect("a placement before the buffer") as usize;
        assert!(
            (to + p.n as usize) * N <= self.len,
            "a placement past the buffer"
        );
        // SAFETY: in bounds, as just checked.
        unsafe { self.ptr.add(to * N).cast() }
    }
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
        let target = &self.target;
        let mut rest = rows;
        while !rest.is_empty() {
            if let Some(group) = rest.first_chunk::<8>()
                && group.iter().enumerate().all(|(j, p)| {
                    p.at == group[0].at + j && p.n == group[0].n && p.column == group[0].column
                })
            {
                let targets = group.map(|p| target.at::<N>(&p));
                let (at, n) = (group[0].at, group[0].n as usize);
                let mut k = 0;
                #[cfg(target_arch = "x86_64")]
                if avx2 && N == 4 {
                    while k + 8 <= n {
                        // SAFETY: `avx2` is set only by the copies compiled for AVX2 and AVX-512,
                        // which `Isa::active` chose because the CPU has them; each target holds
                        // `n` elements (checked by `Target::at`).
                        unsafe { transpose_8x8(tile, at + k * step, step, k, &targets) };
                        k += 8;
                    }
                }
                for k in k..n {
                    let column: &[[u8; N]; 8] =
                        tile[at + k * step..][..8].try_into().expect("8 elements");
                    for (target, element) in targets.iter().zip(column) {
                        // SAFETY: `k < n`, the elements each target holds.
                        unsafe { target.add(k).write(*element) };
                    }
                }
                rest = &rest[8..];
            } else {
                let p = rest[0];
                let row = target.at::<N>(&p);
                for (k, element) in tile[p.at..]
                    .iter()
                    .step_by(step)
                    .take(p.n as usize)
                    .enumerate()
                {
                    // SAFETY: `k < p.n`, the elements the target holds.
                    unsafe { row.add(k).write(*element) };
                }
                rest = &rest[1..];
            }
        }
    }
}

/// `targets[j][k + kk] = tile[at + kk * step + j]` for j, kk in 0..8: an 8 x 8 block of 4-byte
/// elements transposed in AVX2 registers (eight loads, 24 shuffles, eight stores).
///
/// # Safety
/// Each target must be valid for writes of elements `k..k + 8`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn transpose_8x8<const N: usize>(
    tile: &[[u8; N]],
    at: usize,
    step: usize,
    k: usize,
    targets: &[*mut [u8; N]; 8],
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
    for (target, row) in targets.iter().zip(rows) {
        // SAFETY: elements `k..k + 8` of 4 bytes (the caller's promise): the 32 bytes an
        // unaligned store writes.
        unsafe { _mm256_storeu_si256(target.add(k).cast(), row) };
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

/// The buffer [`TensorPlan::shared_output`] fills, got back once every writer is done.
pub struct SharedOutput {
    buffer: Arc<SharedBuffer>,
}

impl SharedOutput {
    /// The filled buffer, or `Err(self)` while a writer (done or not) still exists.
    pub fn into_vec(self) -> Result<Vec<u8>, Self> {
        Arc::try_unwrap(self.buffer)
            .map(|buffer| buffer.data)
            .map_err(|buffer| Self { buffer })
    }
}

/// One thread's share of a [`SharedOutput`]: its output columns of every row.
pub struct ColumnWriter {
    buffer: Arc<SharedBuffer>,
    columns: std::ops::Range<u64>,
}

struct SharedBuffer {
    /// Written only through `ptr` while shared; read only when no writer is left.
    data: Vec<u8>,
    ptr: *mut u8,
    len: usize,
    first: u64,
    count: u64,
    width: u64,
    lead: u64,
}

// SAFETY: while shared, the buffer is only written through `ptr` by `ColumnWriter`s (one thread
// each, through `&mut`), each in its own columns (`Target::at` checks every write), so no two
// threads touch the same bytes; `data` is read only after `Arc::try_unwrap`, when no writer
// is left and their writes happen-before.
unsafe impl Send for SharedBuffer {}
// SAFETY: as above.
unsafe impl Sync for SharedBuffer {}
