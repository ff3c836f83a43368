//! Views and slices: which elements of the full tensor are sent, and in what order.
//!
//! The output is a view of the full tensor: optionally permuted (numpy.transpose), then sliced
//! (a block of per-dimension ranges, a flat range, or a torch.chunk shard, all in the view's
//! coordinates). Any such view is a strided block of the full tensor's flat indices. When the
//! view's innermost dimension is contiguous in the full tensor, the output is a sequence of
//! equally long runs of consecutive indices ([`Access::Runs`]); otherwise, for a transposing
//! permutation, the output is made in tiles that are generated along the full tensor's
//! contiguous dimensions and transposed in cache ([`Tiles`]), so that no element costs a
//! keystream seek of its own.

/// A half-open range `[start, stop)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub stop: u64,
}

/// The part of a tensor a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SliceSpec {
    /// One range per dimension.
    Dims(Vec<Range>),
    /// One range over the flattened tensor.
    Flat(Range),
    /// torch.chunk(count, dim)[index].
    Shard { dim: u32, index: u32, count: u32 },
}

/// Why a slice does not fit its tensor; `field` is relative to the tensor's `slice`.
#[derive(Debug, PartialEq, Eq)]
pub struct SliceError {
    pub field: String,
    pub reason: String,
}

fn slice_error(field: impl Into<String>, reason: impl Into<String>) -> SliceError {
    SliceError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// One dimension of a strided block: `count` steps of `stride` full-tensor elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Axis {
    count: u64,
    stride: u64,
}

/// A validated view (permutation and slice) of a tensor of known shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    output_shape: Vec<u64>,
    len: u64,
    access: Access,
}

/// How output elements map to full-tensor indices.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Access {
    /// Output element `j` is element `skip + j` of a block whose innermost `run_len` elements
    /// are consecutive full indices.
    Runs {
        /// Block position of output element 0 (a flat range's start).
        skip: u64,
        /// Flat index of the block's first element.
        base: u64,
        /// Elements per run of consecutive flat indices.
        run_len: u64,
        /// Dimensions that step between runs, outermost first.
        outer: Vec<Axis>,
    },
    Tiles(Tiles),
}

/// A block whose innermost output dimension is not contiguous in the full tensor.
///
/// Its dimensions split into the innermost output dimension `x`, a group `g` of dimensions
/// that together are contiguous in the full tensor (the full tensor's innermost dimension and
/// the ones that continue it), and the `outer` rest. A tile is a range of `g`'s flat index
/// (consecutive full indices: one keystream run per column) times a range of `x` (contiguous
/// output: one copy per row).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Tiles {
    skip: u64,
    base: u64,
    /// The innermost output dimension: its length and full-tensor stride (output stride 1).
    x: Axis,
    /// The contiguous group, in full-tensor order (first = stride 1): each dimension's length
    /// and output stride.
    g: Vec<Axis>,
    /// Elements of the group: a column's run length.
    g_len: u64,
    /// The other dimensions in output order: length, full stride and output stride.
    outer: Vec<(Axis, u64)>,
}

/// The largest number of elements a tile holds, so that a tile stays in L2 cache.
pub const TILE_ELEMENTS: u64 = 1 << 13;

/// Longest run of a tile's column: whole groups of keystream blocks, short enough to leave
/// room for many columns.
const TILE_RUN: u64 = 128;

/// Rows of a transposed matrix made at once ([`Selection::row_batch`]): runs of one group of
/// the widest keystream kernel (16 blocks), and tiles wide enough for whole cache lines.
const ROW_RUN: u64 = 128;

/// Elements between long columns in a tile: with a power-of-two distance the columns would all
/// fall into the same few L1 cache sets, and copying a row out would miss on every element.
const TILE_PAD: u64 = 16;

impl Selection {
    /// The view `permute` (a permutation of `0..shape.len()`, empty for none) of the tensor of
    /// `shape` (`numel` elements), or the part of it that `slice` asks for.
    pub fn new(
        shape: &[u64],
        numel: u64,
        permute: &[u32],
        slice: Option<&SliceSpec>,
    ) -> Result<Self, SliceError> {
        let rank = shape.len();
        let axis = |k: usize| {
            if permute.is_empty() {
                k
            } else {
                permute[k] as usize
            }
        };
        let view: Vec<u64> = (0..rank).map(|k| shape[axis(k)]).collect();
        let whole = |shape: &[u64]| -> Vec<Range> {
            shape.iter().map(|&stop| Range { start: 0, stop }).collect()
        };
        let (ranges, skip, len, output_shape) = match slice {
            None => (whole(&view), 0, numel, view.clone()),
            Some(SliceSpec::Flat(range)) => {
                if range.start > range.stop || range.stop > numel {
                    return Err(slice_error(
                        "flat",
                        format!(
                            "need start <= stop <= {numel} (the element count), got [{}, {})",
                            range.start, range.stop
                        ),
                    ));
                }
                let len = range.stop - range.start;
                (whole(&view), range.start, len, vec![len])
            }
            Some(SliceSpec::Dims(ranges)) => {
                if ranges.len() != rank {
                    return Err(slice_error(
                        "dims.ranges",
                        format!(
                            "need one range per dimension ({rank}), got {}",
                            ranges.len()
                        ),
                    ));
                }
                for (d, (range, &n)) in ranges.iter().zip(&view).enumerate() {
                    if range.start > range.stop || range.stop > n {
                        return Err(slice_error(
                            format!("dims.ranges[{d}]"),
                            format!(
                                "need start <= stop <= {n} (dimension {d}), got [{}, {})",
                                range.start, range.stop
                            ),
                        ));
                    }
                }
                block_of(ranges.clone())
            }
            Some(&SliceSpec::Shard { dim, index, count }) => {
                if count == 0 {
                    return Err(slice_error("shard.count", "must be >= 1"));
                }
                let d = dim as usize;
                if d >= rank {
                    return Err(slice_error(
                        "shard.dim",
                        format!("must be < the rank ({rank}), got {dim}"),
                    ));
                }
                let n = view[d];
                let chunk = u128::from(n.div_ceil(u64::from(count)));
                let start = (u128::from(index) * chunk).min(u128::from(n)) as u64;
                let stop = (u128::from(index) * chunk + chunk).min(u128::from(n)) as u64;
                let mut ranges = whole(&view);
                ranges[d] = Range { start, stop };
                block_of(ranges)
            }
        };
        if len == 0 {
            // Before the strides: with a zero dimension the others' product may overflow.
            return Ok(Self {
                output_shape,
                len,
                access: Access::Runs {
                    skip: 0,
                    base: 0,
                    run_len: 0,
                    outer: Vec::new(),
                },
            });
        }
        // Every dimension is non-zero here, so each stride is at most the element count.
        let mut strides = vec![1u64; rank];
        for d in (0..rank.saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * shape[d + 1];
        }
        let base = (0..rank).map(|k| ranges[k].start * strides[axis(k)]).sum();
        // The block's dimensions in output order, without those of length 1 (they never
        // step) and with neighbours merged where the outer one continues the inner one in the
        // full tensor too: what is left is the block's true shape as a strided walk.
        let mut dims: Vec<Axis> = Vec::with_capacity(rank);
        for k in 0..rank {
            let count = ranges[k].stop - ranges[k].start;
            if count == 1 {
                continue;
            }
            let stride = strides[axis(k)];
            match dims.last_mut() {
                Some(last) if last.stride == count * stride => {
                    last.count *= count;
                    last.stride = stride;
                }
                _ => dims.push(Axis { count, stride }),
            }
        }
        let innermost_runs = dims.last().is_none_or(|x| x.stride == 1);
        let contiguous = dims[..dims.len().saturating_sub(1)]
            .iter()
            .any(|a| a.stride == 1);
        let access = if innermost_runs || !contiguous {
            // Runs of consecutive indices (of length 1 when nothing in the block is
            // contiguous, as for a single column).
            let run_len = match dims.last() {
                Some(x) if x.stride == 1 => dims.pop().map_or(1, |x| x.count),
                _ => 1,
            };
            Access::Runs {
                skip,
                base,
                run_len,
                outer: dims,
            }
        } else {
            Access::Tiles(Tiles::new(skip, base, dims))
        };
        Ok(Self {
            output_shape,
            len,
            access,
        })
    }

    /// Shape of what is sent: the view's or its slice's block, or `[n]` for a flat range.
    pub fn output_shape(&self) -> &[u64] {
        &self.output_shape
    }

    /// Number of selected elements.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of output columns (the innermost output dimension's length, whose elements
    /// lie apart in the full tensor) when the output is made in tiles, which is best done for
    /// many rows at a time and split across threads by columns ([`Self::for_each_tile`]).
    /// `None` when the output is made of runs ([`Self::for_each_run`]).
    pub fn tile_columns(&self) -> Option<u64> {
        match &self.access {
            Access::Runs { .. } => None,
            Access::Tiles(tiles) => Some(tiles.x.count),
        }
    }

    /// For a tiled selection whose consecutive output rows are consecutive elements of the
    /// full tensor (the Keras layout of a torch Linear weight, say): how many output rows to
    /// make at once for its columns to be generated as runs as long as any tile's. A range of
    /// such rows then needs no other rows, so it can be made on its own, straight in output
    /// order. `None` for a selection made of runs, or whose columns are long only across
    /// output rows far apart (a Keras conv kernel's), which is best made in panels split by
    /// columns.
    pub fn row_batch(&self) -> Option<u64> {
        let Access::Tiles(tiles) = &self.access else {
            return None;
        };
        // The group's leading dimensions whose output strides continue the rows' own.
        let mut rows = 1;
        for axis in &tiles.g {
            if axis.stride != tiles.x.count * rows {
                break;
            }
            rows *= axis.count;
        }
        let run = tiles.g_len.min(ROW_RUN);
        (rows >= run).then_some(run)
    }

    /// Where output element `first` lies within its output row, for a tiled selection.
    pub fn row_offset(&self, first: u64) -> u64 {
        match &self.access {
            Access::Runs { .. } => 0,
            Access::Tiles(tiles) => (tiles.skip + first) % tiles.x.count,
        }
    }

    /// Calls `f(full_index, count)` for consecutive full-tensor runs covering output
    /// elements `[first, first + count)`, in order. Only for a selection made of runs.
    pub fn for_each_run(&self, first: u64, count: u64, mut f: impl FnMut(u64, u64)) {
        debug_assert!(first + count <= self.len);
        let Access::Runs {
            skip,
            base,
            run_len,
            outer,
        } = &self.access
        else {
            panic!("for_each_run on a tiled selection");
        };
        if count == 0 {
            return;
        }
        let position = skip + first;
        let mut run = position / run_len;
        let mut offset = position % run_len;
        let mut left = count;
        while left > 0 {
            let take = (run_len - offset).min(left);
            f(run_start(*base, outer, run) + offset, take);
            left -= take;
            offset = 0;
            run += 1;
        }
    }

    /// Visits the tiles that cover output elements `[first, first + count)` restricted to the
    /// output columns `columns`: for each, the sink generates the tile's columns (runs of
    /// consecutive full-tensor elements, at most [`TILE_ELEMENTS`] in all) and then places
    /// its rows. Elements outside `[first, first + count)` are never placed. Only for a tiled
    /// selection.
    pub fn for_each_tile(
        &self,
        first: u64,
        count: u64,
        columns: std::ops::Range<u64>,
        tile: &mut impl TileSink,
    ) {
        let Access::Tiles(tiles) = &self.access else {
            panic!("for_each_tile on a selection made of runs");
        };
        tiles.visit(first, count, columns, tile);
    }
}

/// What [`Selection::for_each_tile`] drives: generating a tile's columns, then placing them.
pub trait TileSink {
    /// Generates `run` consecutive full-tensor elements from `full_index` into the tile,
    /// from its element `at` on.
    fn generate(&mut self, full_index: u64, run: u64, at: usize);
    /// Copies, for each placement, the tile's elements `at, at + step, ...` (`n` of them) to
    /// output row `row` (counted from the row of the first output element asked for), columns
    /// `column..column + n`. Neighbouring placements usually have neighbouring `at`s.
    fn place(&mut self, rows: &[Placement], step: usize);
}

/// One output row's part of a tile; see [`TileSink::place`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub row: u64,
    pub column: u64,
    pub n: u64,
    pub at: usize,
}

/// Flat index where run `run` starts (runs are numbered in row-major order).
fn run_start(base: u64, outer: &[Axis], mut run: u64) -> u64 {
    let mut start = base;
    for axis in outer.iter().rev() {
        start += (run % axis.count) * axis.stride;
        run /= axis.count;
    }
    start
}

/// A block of valid ranges: its ranges, no skip, its element count and shape.
fn block_of(ranges: Vec<Range>) -> (Vec<Range>, u64, u64, Vec<u64>) {
    let shape: Vec<u64> = ranges.iter().map(|r| r.stop - r.start).collect();
    // Element counts fit u64 (checked by the caller), so any sub-block's does too.
    let len = shape.iter().product();
    (ranges, 0, len, shape)
}

/// The box of block coordinates around output positions `[lo, hi)`: per dimension, the
/// coordinates from the first to the last that positions in the range can have.
struct Bounds {
    x: (u64, u64),
    g: Vec<(u64, u64)>,
    outer: Vec<(u64, u64)>,
}

impl Bounds {
    fn new(lo: u64, hi: u64, x: &Axis, g: &[Axis], outer: &[(Axis, u64)]) -> Self {
        // Every dimension as (length, output stride); x has output stride 1.
        let coordinate = |p: u64, count: u64, stride: u64| (p / stride) % count;
        let dims = std::iter::once((x.count, 1))
            .chain(g.iter().map(|a| (a.count, a.stride)))
            .chain(outer.iter().map(|(a, s)| (a.count, *s)));
        // Dimensions outside the outermost one where lo and hi - 1 differ are fixed in the
        // range; that one spans from one coordinate to the other; those inside it are free.
        let split = dims
            .clone()
            .filter(|&(n, s)| coordinate(lo, n, s) != coordinate(hi - 1, n, s))
            .map(|(_, s)| s)
            .max()
            .unwrap_or(0);
        let range = |(n, s): (u64, u64)| {
            let (a, b) = (coordinate(lo, n, s), coordinate(hi - 1, n, s));
            match s.cmp(&split) {
                std::cmp::Ordering::Greater => (a, a),
                std::cmp::Ordering::Equal => (a, b),
                std::cmp::Ordering::Less => (0, n - 1),
            }
        };
        Self {
            x: range((x.count, 1)),
            g: g.iter().map(|a| range((a.count, a.stride))).collect(),
            outer: outer.iter().map(|(a, s)| range((a.count, *s))).collect(),
        }
    }
}

impl Tiles {
    /// `dims`: the merged block dimensions in output order; the last one is not contiguous in
    /// the full tensor and an earlier one is.
    fn new(skip: u64, base: u64, mut dims: Vec<Axis>) -> Self {
        let x = dims
            .pop()
            .expect("a tiled block has an innermost dimension");
        // Output strides of the remaining dimensions (the innermost has output stride 1).
        let mut output_strides = vec![x.count; dims.len()];
        for k in (0..dims.len().saturating_sub(1)).rev() {
            output_strides[k] = output_strides[k + 1] * dims[k + 1].count;
        }
        let mut in_group = vec![false; dims.len()];
        let mut g = Vec::new();
        let mut g_len = 1u64;
        while let Some(k) = (0..dims.len()).find(|&k| !in_group[k] && dims[k].stride == g_len) {
            in_group[k] = true;
            g.push(Axis {
                count: dims[k].count,
                stride: output_strides[k],
            });
            g_len *= dims[k].count;
        }
        let outer = (0..dims.len())
            .filter(|&k| !in_group[k])
            .map(|k| (dims[k], output_strides[k]))
            .collect();
        Self {
            skip,
            base,
            x,
            g,
            g_len,
            outer,
        }
    }

    fn visit(
        &self,
        first: u64,
        count: u64,
        columns: std::ops::Range<u64>,
        sink: &mut impl TileSink,
    ) {
        let lo = self.skip + first;
        let hi = lo + count;
        if count == 0 || columns.is_empty() {
            return;
        }
        let first_row = lo / self.x.count;
        // Where the group's elements go in the output, relative to their tile's first one.
        let g_span: u64 = self.g.iter().map(|a| (a.count - 1) * a.stride).sum();
        let run = self.g_len.min(TILE_RUN);
        let mut offsets = vec![0u64; run as usize];
        let mut rows = Vec::with_capacity(run as usize);
        // Only the coordinates of the box around [lo, hi) are visited, so that a short range of
        // a huge view costs no more than its own elements.
        let bounds = Bounds::new(lo, hi, &self.x, &self.g, &self.outer);
        let (g_first, g_last) = self
            .g
            .iter()
            .zip(&bounds.g)
            .fold(((0, 0), 1), |((a, b), step), (axis, &(ca, cb))| {
                ((a + ca * step, b + cb * step), step * axis.count)
            })
            .0;
        let columns = columns.start.max(bounds.x.0)..columns.end.min(bounds.x.1 + 1);
        if columns.is_empty() {
            return;
        }
        let outer_count: u64 = bounds.outer.iter().map(|&(a, b)| b - a + 1).product();
        for o in 0..outer_count {
            // Decode the outer coordinates (row-major within the box) into full and output
            // offsets.
            let (mut full, mut out, mut rest) = (self.base, 0u64, o);
            for ((axis, output_stride), &(a, b)) in self.outer.iter().zip(&bounds.outer).rev() {
                let c = a + rest % (b - a + 1);
                rest /= b - a + 1;
                full += c * axis.stride;
                out += c * output_stride;
            }
            if out + g_span + self.x.count <= lo || out >= hi {
                continue;
            }
            // Whole runs from a multiple of `run`, which keeps keystream groups aligned.
            for g0 in (g_first / run * run..=g_last).step_by(run as usize) {
                let g1 = (g0 + run).min(self.g_len);
                let taken = &mut offsets[..(g1 - g0) as usize];
                self.output_offsets(g0, taken);
                // The elements whose output row meets [lo, hi) at columns [c0, c1): a
                // contiguous part of the run, from the first such element to the last.
                let meeting = |taken: &[u64], c0: u64, c1: u64| {
                    let meets = |&p: &u64| out + p + c1 > lo && out + p + c0 < hi;
                    let a = taken.iter().position(meets)?;
                    Some((a, taken.iter().rposition(meets).map_or(a, |b| b) + 1))
                };
                let Some((a0, b0)) = meeting(taken, columns.start, columns.end) else {
                    continue;
                };
                // Columns as long as the rows met, padded so that they do not all share the
                // same few cache sets.
                let pitch = (b0 - a0) as u64;
                let pitch = if pitch >= 4 * TILE_PAD {
                    pitch + TILE_PAD
                } else {
                    pitch
                };
                // A whole number of 8-column blocks where there is room: rows are copied out
                // eight columns at a time.
                let width = match TILE_ELEMENTS / pitch {
                    w if w >= 8 => w / 8 * 8,
                    w => w.max(1),
                };
                for c0 in (columns.start..columns.end).step_by(width as usize) {
                    let c1 = (c0 + width).min(columns.end);
                    let Some((a, b)) = meeting(&taken[a0..b0], c0, c1) else {
                        continue;
                    };
                    let (a, b) = (a0 + a, a0 + b);
                    for c in c0..c1 {
                        let index = full + c * self.x.stride + g0 + a as u64;
                        sink.generate(index, (b - a) as u64, (c - c0) as usize * pitch as usize);
                    }
                    rows.clear();
                    for (e, &p) in taken[a..b].iter().enumerate() {
                        let start = out + p;
                        // Clip the row to [lo, hi).
                        let from = c0.max(lo.saturating_sub(start));
                        let to = c1.min(hi - start.min(hi));
                        if from < to {
                            rows.push(Placement {
                                row: start / self.x.count - first_row,
                                column: from,
                                n: to - from,
                                at: (from - c0) as usize * pitch as usize + e,
                            });
                        }
                    }
                    sink.place(&rows, pitch as usize);
                }
            }
        }
    }

    /// `out[i]` = output offset of group element `g0 + i` relative to group element 0.
    fn output_offsets(&self, g0: u64, out: &mut [u64]) {
        // Mixed-radix counter over the group, first dimension fastest.
        let mut coords: Vec<u64> = Vec::with_capacity(self.g.len());
        let mut rest = g0;
        for a in &self.g {
            coords.push(rest % a.count);
            rest /= a.count;
        }
        let mut offset: u64 = coords.iter().zip(&self.g).map(|(c, a)| c * a.stride).sum();
        for slot in out.iter_mut() {
            *slot = offset;
            for (c, a) in coords.iter_mut().zip(&self.g) {
                *c += 1;
                offset += a.stride;
                if *c < a.count {
                    break;
                }
                offset -= a.count * a.stride;
                *c = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every full index the selection maps to, element by element.
    fn indices(selection: &Selection) -> Vec<u64> {
        let mut out = Vec::new();
        selection.for_each_run(0, selection.len(), |start, n| out.extend(start..start + n));
        out
    }

    /// The reference: enumerate the block row-major with nested loops.
    fn brute_force(shape: &[u64], ranges: &[Range]) -> Vec<u64> {
        let mut out = vec![0u64];
        for (d, r) in ranges.iter().enumerate() {
            let stride: u64 = shape[d + 1..].iter().product();
            out = out
                .iter()
                .flat_map(|base| (r.start..r.stop).map(move |i| base + i * stride))
                .collect();
        }
        out
    }

    fn r(start: u64, stop: u64) -> Range {
        Range { start, stop }
    }

    #[test]
    fn dims_blocks_match_brute_force() {
        let shape = [4, 5, 6];
        let blocks = [
            vec![r(0, 4), r(0, 5), r(0, 6)],
            vec![r(1, 3), r(0, 5), r(0, 6)],
            vec![r(0, 4), r(2, 4), r(0, 6)],
            vec![r(1, 2), r(1, 4), r(2, 5)],
            vec![r(0, 4), r(0, 5), r(5, 6)],
            vec![r(3, 3), r(0, 5), r(0, 6)],
        ];
        for ranges in blocks {
            let s =
                Selection::new(&shape, 120, &[], Some(&SliceSpec::Dims(ranges.clone()))).unwrap();
            assert_eq!(indices(&s), brute_force(&shape, &ranges), "{ranges:?}");
        }
    }

    #[test]
    fn any_window_of_runs_matches_the_whole() {
        let shape = [4, 5, 6];
        let ranges = vec![r(1, 4), r(1, 4), r(2, 5)];
        let s = Selection::new(&shape, 120, &[], Some(&SliceSpec::Dims(ranges))).unwrap();
        let all = indices(&s);
        for first in 0..s.len() {
            for count in 0..=(s.len() - first) {
                let mut part = Vec::new();
                s.for_each_run(first, count, |start, n| part.extend(start..start + n));
                assert_eq!(part, all[first as usize..(first + count) as usize]);
            }
        }
    }

    #[test]
    fn shards_follow_torch_chunk() {
        // torch.arange(10 * 7).reshape(10, 7).chunk(3, dim=1)[2] -> columns 6..7.
        let s = Selection::new(
            &[10, 7],
            70,
            &[],
            Some(&SliceSpec::Shard {
                dim: 1,
                index: 2,
                count: 3,
            }),
        )
        .unwrap();
        assert_eq!(s.output_shape(), [10, 1]);
        assert_eq!(
            indices(&s),
            (0..10).map(|row| row * 7 + 6).collect::<Vec<_>>()
        );
        // 5 rows in 4 chunks of 2: the last chunk is empty.
        let empty = Selection::new(
            &[5],
            5,
            &[],
            Some(&SliceSpec::Shard {
                dim: 0,
                index: 3,
                count: 4,
            }),
        )
        .unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.output_shape(), [0]);
    }

    #[test]
    fn flat_ranges_and_errors() {
        let s = Selection::new(&[5, 5, 5], 125, &[], Some(&SliceSpec::Flat(r(17, 99)))).unwrap();
        assert_eq!(s.output_shape(), [82]);
        assert_eq!(indices(&s), (17..99).collect::<Vec<_>>());
        let err = Selection::new(&[5], 5, &[], Some(&SliceSpec::Flat(r(2, 6)))).unwrap_err();
        assert_eq!(err.field, "flat");
        let err = Selection::new(
            &[5, 5],
            25,
            &[],
            Some(&SliceSpec::Dims(vec![r(0, 5), r(3, 2)])),
        )
        .unwrap_err();
        assert_eq!(err.field, "dims.ranges[1]");
        let err = Selection::new(&[5], 5, &[], Some(&SliceSpec::Dims(vec![]))).unwrap_err();
        assert_eq!(err.field, "dims.ranges");
        let err = Selection::new(
            &[],
            1,
            &[],
            Some(&SliceSpec::Shard {
                dim: 0,
                index: 0,
                count: 1,
            }),
        )
        .unwrap_err();
        assert_eq!(err.field, "shard.dim");
    }
}
