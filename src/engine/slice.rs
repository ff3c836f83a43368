//! Slices: which elements of the full tensor are sent, as runs of consecutive flat indices.
//!
//! Any slice (a block of per-dimension ranges, a flat range, or a torch.chunk shard) is a
//! set of equally long runs of consecutive row-major indices, so output element `j` maps
//! to its full-tensor index with a few divisions, and any part of the output can be made
//! on its own.

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

/// One dimension outside the contiguous run: `count` steps of `stride` elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Axis {
    count: u64,
    stride: u64,
}

/// A validated slice of a tensor of known shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    output_shape: Vec<u64>,
    len: u64,
    /// Flat index of the first selected element.
    base: u64,
    /// Elements per run of consecutive flat indices.
    run_len: u64,
    /// Dimensions that step between runs, outermost first.
    outer: Vec<Axis>,
}

impl Selection {
    /// The whole tensor (`numel` elements) or the part `slice` asks for.
    pub fn new(shape: &[u64], numel: u64, slice: Option<&SliceSpec>) -> Result<Self, SliceError> {
        match slice {
            None => Ok(Self::contiguous(numel, 0, shape.to_vec())),
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
                Ok(Self::contiguous(len, range.start, vec![len]))
            }
            Some(SliceSpec::Dims(ranges)) => {
                if ranges.len() != shape.len() {
                    return Err(slice_error(
                        "dims.ranges",
                        format!(
                            "need one range per dimension ({}), got {}",
                            shape.len(),
                            ranges.len()
                        ),
                    ));
                }
                for (d, (range, &n)) in ranges.iter().zip(shape).enumerate() {
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
                Ok(Self::block(shape, ranges))
            }
            Some(&SliceSpec::Shard { dim, index, count }) => {
                if count == 0 {
                    return Err(slice_error("shard.count", "must be >= 1"));
                }
                let d = dim as usize;
                if d >= shape.len() {
                    return Err(slice_error(
                        "shard.dim",
                        format!("must be < the rank ({}), got {dim}", shape.len()),
                    ));
                }
                let n = shape[d];
                let chunk = u128::from(n.div_ceil(u64::from(count)));
                let start = (u128::from(index) * chunk).min(u128::from(n)) as u64;
                let stop = (u128::from(index) * chunk + chunk).min(u128::from(n)) as u64;
                let ranges: Vec<Range> = shape
                    .iter()
                    .enumerate()
                    .map(|(k, &len)| {
                        if k == d {
                            Range { start, stop }
                        } else {
                            Range {
                                start: 0,
                                stop: len,
                            }
                        }
                    })
                    .collect();
                Ok(Self::block(shape, &ranges))
            }
        }
    }

    fn contiguous(len: u64, base: u64, output_shape: Vec<u64>) -> Self {
        Self {
            output_shape,
            len,
            base,
            run_len: len,
            outer: Vec::new(),
        }
    }

    /// A block of valid ranges: runs span the innermost partial dimension and every full one
    /// inside it; the dimensions outside step between runs.
    fn block(shape: &[u64], ranges: &[Range]) -> Self {
        let output_shape: Vec<u64> = ranges.iter().map(|r| r.stop - r.start).collect();
        // Element counts fit u64 (checked by the caller), so these products do too.
        let len = output_shape.iter().product();
        if len == 0 {
            // Before the strides: with a zero dimension the others' product may overflow.
            return Self {
                output_shape,
                len,
                base: 0,
                run_len: 0,
                outer: Vec::new(),
            };
        }
        // Every dimension is non-zero here, so each stride is at most the element count.
        let mut strides = vec![1u64; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * shape[d + 1];
        }
        let base = ranges.iter().zip(&strides).map(|(r, s)| r.start * s).sum();
        // The innermost dimension that is not taken whole ends the run.
        let split = (0..shape.len())
            .rev()
            .find(|&d| ranges[d].start != 0 || ranges[d].stop != shape[d]);
        let Some(split) = split else {
            return Self::contiguous(len, 0, output_shape);
        };
        let run_len = output_shape[split] * strides[split];
        let outer = (0..split)
            .map(|d| Axis {
                count: output_shape[d],
                stride: strides[d],
            })
            .collect();
        Self {
            output_shape,
            len,
            base,
            run_len,
            outer,
        }
    }

    /// Shape of what is sent: the slice's block, or `[n]` for a flat range.
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

    /// Calls `f(full_index, count)` for consecutive full-tensor runs covering output
    /// elements `[first, first + count)`, in order.
    pub fn for_each_run(&self, first: u64, count: u64, mut f: impl FnMut(u64, u64)) {
        debug_assert!(first + count <= self.len);
        if count == 0 {
            return;
        }
        let mut run = first / self.run_len;
        let mut offset = first % self.run_len;
        let mut left = count;
        while left > 0 {
            let take = (self.run_len - offset).min(left);
            f(self.run_start(run) + offset, take);
            left -= take;
            offset = 0;
            run += 1;
        }
    }

    /// Flat index where run `run` starts (runs are numbered in row-major order).
    fn run_start(&self, mut run: u64) -> u64 {
        let mut start = self.base;
        for axis in self.outer.iter().rev() {
            start += (run % axis.count) * axis.stride;
            run /= axis.count;
        }
        start
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
            let s = Selection::new(&shape, 120, Some(&SliceSpec::Dims(ranges.clone()))).unwrap();
            assert_eq!(indices(&s), brute_force(&shape, &ranges), "{ranges:?}");
        }
    }

    #[test]
    fn any_window_of_runs_matches_the_whole() {
        let shape = [4, 5, 6];
        let ranges = vec![r(1, 4), r(1, 4), r(2, 5)];
        let s = Selection::new(&shape, 120, Some(&SliceSpec::Dims(ranges))).unwrap();
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
        let s = Selection::new(&[5, 5, 5], 125, Some(&SliceSpec::Flat(r(17, 99)))).unwrap();
        assert_eq!(s.output_shape(), [82]);
        assert_eq!(indices(&s), (17..99).collect::<Vec<_>>());
        let err = Selection::new(&[5], 5, Some(&SliceSpec::Flat(r(2, 6)))).unwrap_err();
        assert_eq!(err.field, "flat");
        let err = Selection::new(&[5, 5], 25, Some(&SliceSpec::Dims(vec![r(0, 5), r(3, 2)])))
            .unwrap_err();
        assert_eq!(err.field, "dims.ranges[1]");
        let err = Selection::new(&[5], 5, Some(&SliceSpec::Dims(vec![]))).unwrap_err();
        assert_eq!(err.field, "dims.ranges");
        let err = Selection::new(
            &[],
            1,
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
