//! Structured schemes: values that depend on the tensor's position or on the whole tensor,
//! not on one word each (docs/ALGORITHM.md, "Additions to algorithm v1: structured schemes").
//!
//! eye / identity and dirac are functions of the element's coordinates. sparse is a normal
//! draw per element (the element's own word, as `normal`) with the zeros of each column chosen
//! once per tensor from words far above the element words. orthogonal is the Q factor of a
//! Householder QR of the tensor's normal draws, computed once per tensor, in f64, with every
//! sum in a fixed order so that its bits are the same everywhere.

use std::sync::{Arc, OnceLock};

use super::distribution::{Distribution, Sampler, Scratch};
use super::fans::Layout;
use super::keystream::Keystream;
use super::normal::MAX_BLOCK;
use super::param::{SchemeError, SchemeField, invalid, non_negative, param};

/// The first keystream word of sparse's zero selection: above every element word, since an
/// element count times a dtype size (at least 2 bytes) fits in u64.
pub const SPARSE_WORD_BASE: u64 = 1 << 63;

/// Columns of a QR panel: a panel of `rows x PANEL` f64 stays in the L2 cache.
const PANEL: usize = 16;

/// A structured scheme as requested; `None` means "the default".
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StructuredScheme {
    Orthogonal { gain: Option<f64> },
    Eye,
    Identity { gain: Option<f64> },
    Dirac { groups: Option<u32> },
    Sparse { sparsity: f64, std: Option<f64> },
}

impl StructuredScheme {
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Orthogonal { .. } => "orthogonal",
            Self::Eye => "eye",
            Self::Identity { .. } => "identity",
            Self::Dirac { .. } => "dirac",
            Self::Sparse { .. } => "sparse",
        }
    }

    /// The structure for a tensor of `shape` under `layout`, the distribution of the draws it
    /// starts from, and its gain.
    pub fn resolve(
        &self,
        shape: &[u64],
        layout: Layout,
    ) -> Result<(Structure, Distribution, Option<f64>), SchemeError> {
        let rank = |ok: bool, want: &str| {
            if ok {
                Ok(())
            } else {
                Err(invalid(
                    SchemeField::Shape,
                    format!("{} needs {want}, got rank {}", self.name(), shape.len()),
                ))
            }
        };
        let zero = Distribution::Constant { value: 0.0 };
        Ok(match *self {
            Self::Orthogonal { gain } => {
                let gain = param("gain", gain, 1.0)?;
                rank(shape.len() >= 2, "rank >= 2")?;
                let (rows, cols) = orthogonal_matrix(shape, layout);
                let standard = Distribution::Normal {
                    mean: 0.0,
                    std: 1.0,
                };
                (
                    Structure::Orthogonal { rows, cols, gain },
                    standard,
                    Some(gain),
                )
            }
            Self::Eye => {
                rank(shape.len() == 2, "rank 2")?;
                (Structure::Eye { value: 1.0 }, zero, None)
            }
            Self::Identity { gain } => {
                rank(shape.len() == 2, "rank 2")?;
                let gain = param("gain", gain, 1.0)?;
                (Structure::Eye { value: gain }, zero, Some(gain))
            }
            Self::Dirac { groups } => {
                rank((3..=5).contains(&shape.len()), "rank 3, 4 or 5")?;
                let groups = groups.unwrap_or(1);
                if groups == 0 {
                    return Err(invalid(
                        SchemeField::Parameter("groups"),
                        "must be >= 1, got 0",
                    ));
                }
                let out = match layout {
                    Layout::Torch => shape[0],
                    Layout::Keras => shape[shape.len() - 1],
                };
                if !out.is_multiple_of(u64::from(groups)) {
                    return Err(invalid(
                        SchemeField::Parameter("groups"),
                        format!("the {out} output channels are not divisible into {groups} groups"),
                    ));
                }
                (Structure::Dirac { groups, layout }, zero, None)
            }
            Self::Sparse { sparsity, std } => {
                rank(shape.len() == 2, "rank 2")?;
                if !(0.0..=1.0).contains(&sparsity) {
                    return Err(invalid(
                        SchemeField::Parameter("sparsity"),
                        format!("must be in [0, 1], got {sparsity}"),
                    ));
                }
                let std = non_negative("std", param("std", std, 0.01)?)?;
                // torch's [rows, cols] = [out, in]; a Keras kernel is [in, out].
                let (rows, cols) = match layout {
                    Layout::Torch => (shape[0], shape[1]),
                    Layout::Keras => (shape[1], shape[0]),
                };
                let zeros = ((sparsity * rows as f64).ceil() as u64).min(rows);
                (
                    Structure::Sparse {
                        rows,
                        cols,
                        zeros,
                        std,
                        layout,
                    },
                    Distribution::Normal { mean: 0.0, std },
                    None,
                )
            }
        })
    }
}

/// What a structured scheme became for one tensor; all parameters validated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Structure {
    /// gain x the orthogonal factor of the tensor's [rows, cols] matrix of normal draws.
    Orthogonal { rows: u64, cols: u64, gain: f64 },
    /// `value` where a 2-D tensor's row equals its column, 0 elsewhere.
    Eye { value: f64 },
    /// 1 at [g * out/groups + d, d, centre...] (torch's dims), 0 elsewhere.
    Dirac { groups: u32, layout: Layout },
    /// normal(0, std) with `zeros` zeros in each column of the [rows, cols] torch matrix.
    Sparse {
        rows: u64,
        cols: u64,
        zeros: u64,
        std: f64,
        layout: Layout,
    },
}

/// How far past 1 the range check lets an entry of Q reach: 2^-20, far above the few ulps
/// a factorization may add (a 1 x 1 matrix gives 1 + 2^-51).
const ORTHOGONAL_MARGIN: f64 = 1.0 / (1u64 << 20) as f64;

impl Structure {
    /// The smallest and largest value an element can take.
    pub fn extremes(&self) -> [f64; 2] {
        match *self {
            // A computed entry of Q can exceed 1 by a few ulps (algorithm-v1.md section 9).
            Self::Orthogonal { gain, .. } => {
                let reach = gain * (1.0 + ORTHOGONAL_MARGIN);
                [-reach, reach]
            }
            Self::Eye { value } => [value, value],
            Self::Dirac { .. } => [1.0, 1.0],
            Self::Sparse { std, .. } => [-8.3 * std, 8.3 * std],
        }
    }

    /// Elements computed together before any of them can be sent, if the scheme needs that.
    pub fn whole_matrix(&self) -> Option<u64> {
        match *self {
            Self::Orthogonal { rows, cols, .. } | Self::Sparse { rows, cols, .. } => {
                Some(rows * cols)
            }
            Self::Eye { .. } | Self::Dirac { .. } => None,
        }
    }
}

/// Rows and columns of orthogonal's matrix: torch flattens to [shape[0], rest], Keras to
/// [prod(shape[:-1]), shape[-1]]. `shape` has rank >= 2 and a product that fits u64.
fn orthogonal_matrix(shape: &[u64], layout: Layout) -> (u64, u64) {
    let product = |dims: &[u64]| dims.iter().product::<u64>();
    match layout {
        Layout::Torch => (shape[0], product(&shape[1..])),
        Layout::Keras => (product(&shape[..shape.len() - 1]), shape[shape.len() - 1]),
    }
}

/// A structured scheme bound to one tensor, with what it computes once, shared by every
/// clone (the pipeline's workers).
#[derive(Clone, Debug)]
pub struct Structured {
    structure: Structure,
    shape: Vec<u64>,
    whole: Arc<OnceLock<Whole>>,
}

/// What a scheme computes for the whole tensor before any element.
#[derive(Debug)]
enum Whole {
    /// Every element's value, in the tensor's order.
    Values(Vec<f64>),
    /// A bit per element: set where sparse puts a zero.
    Zeros(Vec<u64>),
}

impl Structured {
    pub fn new(structure: Structure, shape: &[u64]) -> Self {
        Self {
            structure,
            shape: shape.to_vec(),
            whole: Arc::default(),
        }
    }

    /// Whether values need the element words (drawn by the caller before [`Self::values`]).
    pub fn uses_words(&self) -> bool {
        matches!(self.structure, Structure::Sparse { .. })
    }

    /// Values of elements `index, index + 1, ...`; for sparse `values` holds the normal draws
    /// of those elements on entry.
    pub fn values(&self, keystream: &Keystream, index: u64, values: &mut [f64]) {
        match self.structure {
            Structure::Orthogonal { rows, cols, gain } => {
                let Whole::Values(all) = self
                    .whole
                    .get_or_init(|| Whole::Values(orthogonal(keystream, rows, cols, gain)))
                else {
                    unreachable!("orthogonal computes values")
                };
                let start = index as usize;
                values.copy_from_slice(&all[start..start + values.len()]);
            }
            Structure::Eye { value } => {
                let cols = self.shape[1];
                for (i, slot) in (index..).zip(values.iter_mut()) {
                    *slot = if i / cols == i % cols { value } else { 0.0 };
                }
            }
            Structure::Dirac { groups, layout } => {
                for (i, slot) in (index..).zip(values.iter_mut()) {
                    *slot = if dirac_one(&self.shape, layout, groups, i) {
                        1.0
                    } else {
                        0.0
                    };
                }
            }
            Structure::Sparse {
                rows,
                cols,
                zeros,
                layout,
                ..
            } => {
                let Whole::Zeros(bits) = self.whole.get_or_init(|| {
                    Whole::Zeros(sparse_zeros(keystream, rows, cols, zeros, layout))
                }) else {
                    unreachable!("sparse computes zeros")
                };
                for (i, slot) in (index..).zip(values.iter_mut()) {
                    if bits[(i / 64) as usize] >> (i % 64) & 1 == 1 {
                        *slot = 0.0;
                    }
                }
            }
        }
    }
}

/// Whether element `index` of a dirac tensor is 1: its input channel equals its output
/// channel's position within its group, and every kernel coordinate is the centre.
fn dirac_one(shape: &[u64], layout: Layout, groups: u32, mut index: u64) -> bool {
    let rank = shape.len();
    let (out_dim, in_dim, kernel) = match layout {
        Layout::Torch => (0, 1, 2..rank),
        Layout::Keras => (rank - 1, rank - 2, 0..rank - 2),
    };
    let mut coords = [0u64; 5];
    for d in (0..rank).rev() {
        coords[d] = index % shape[d];
        index /= shape[d];
    }
    let per_group = shape[out_dim] / u64::from(groups);
    coords[in_dim] == coords[out_dim] % per_group
        && kernel.into_iter().all(|d| coords[d] == shape[d] / 2)
}

/// The zero bits of sparse, in the tensor's element order: for each column c of the
/// [rows, cols] torch matrix in order, a partial Fisher-Yates shuffle of 0..rows picks
/// `zeros` rows, each swap index drawn by rejection from the next selection word.
fn sparse_zeros(
    keystream: &Keystream,
    rows: u64,
    cols: u64,
    zeros: u64,
    layout: Layout,
) -> Vec<u64> {
    let mut bits = vec![0u64; (rows * cols).div_ceil(64) as usize];
    let mut words = SelectionWords::new(keystream);
    let mut perm: Vec<u64> = (0..rows).collect();
    let mut swaps = Vec::with_capacity(zeros as usize);
    for c in 0..cols {
        swaps.clear();
        for i in 0..zeros {
            let j = i + words.below(rows - i);
            perm.swap(i as usize, j as usize);
            swaps.push(j as usize);
        }
        for &r in &perm[..zeros as usize] {
            // The torch matrix is [out, in]; a Keras [in, out] tensor is its transpose.
            let at = match layout {
                Layout::Torch => r * cols + c,
                Layout::Keras => c * rows + r,
            };
            bits[(at / 64) as usize] |= 1 << (at % 64);
        }
        // Back to the identity for the next column, in O(zeros): the swaps undone in reverse.
        for (i, &j) in swaps.iter().enumerate().rev() {
            perm.swap(i, j);
        }
    }
    bits
}

/// Sparse's selection words, consumed in order from [`SPARSE_WORD_BASE`].
struct SelectionWords<'a> {
    keystream: &'a Keystream,
    next: u64,
    buffer: [u64; 64],
    at: usize,
}

impl<'a> SelectionWords<'a> {
    fn new(keystream: &'a Keystream) -> Self {
        Self {
            keystream,
            next: SPARSE_WORD_BASE,
            buffer: [0; 64],
            at: 64,
        }
    }

    fn word(&mut self) -> u64 {
        if self.at == self.buffer.len() {
            self.keystream.fill(self.next, &mut self.buffer);
            self.next += self.buffer.len() as u64;
            self.at = 0;
        }
        self.at += 1;
        self.buffer[self.at - 1]
    }

    /// A uniform integer in [0, n), n >= 1: w mod n for the first word w below the largest
    /// multiple of n that fits in 2^64.
    fn below(&mut self, n: u64) -> u64 {
        // 2^64 mod n, computed in u64 as (2^64 - n) mod n.
        let reject = n.wrapping_neg() % n;
        loop {
            let w = self.word();
            // w < 2^64 - reject  <=>  w <= u64::MAX - reject
            if w <= u64::MAX - reject {
                return w % n;
            }
        }
    }
}

/// The reflectors of a Householder QR: v_k on rows k..m (v_k[0] is row k) and c_k = 2 / v.v.
struct Reflectors {
    v: Vec<Vec<f64>>,
    c: Vec<f64>,
    beta: Vec<f64>,
}

/// gain x Q of the [rows, cols] matrix of the tensor's standard normal draws (transposed
/// first when it is wide), with Q's columns signed by R's diagonal, in the tensor's order.
pub fn orthogonal(keystream: &Keystream, rows: u64, cols: u64, gain: f64) -> Vec<f64> {
    let (rows, cols) = (rows as usize, cols as usize);
    let draws = normal_draws(keystream, rows * cols);
    let wide = rows < cols;
    let (m, n) = if wide { (cols, rows) } else { (rows, cols) };
    // A is m x n; element (i, j) is draw i * cols + j, or draw j * cols + i when wide.
    let a = |i: usize, j: usize| {
        if wide {
            draws[j * cols + i]
        } else {
            draws[i * cols + j]
        }
    };
    let reflectors = householder(m, n, a);
    drop(draws);
    let q = form_q(m, n, &reflectors);
    let mut out = vec![0.0; rows * cols];
    for j in 0..n {
        let sign = if reflectors.beta[j] < 0.0 { -1.0 } else { 1.0 };
        for i in 0..m {
            let x = q[j / PANEL][i * PANEL + j % PANEL] * sign * gain;
            // Q (m x n) or, when wide, its transpose (n x m), row-major.
            if wide {
                out[j * m + i] = x;
            } else {
                out[i * n + j] = x;
            }
        }
    }
    out
}

/// Standard normal draws of elements 0..count, as the `normal` scheme with mean 0, std 1.
fn normal_draws(keystream: &Keystream, count: usize) -> Vec<f64> {
    let sampler = Sampler::Normal {
        mean: 0.0,
        std: 1.0,
    };
    let mut out = vec![0.0; count];
    let mut words = vec![0u64; MAX_BLOCK];
    let mut scratch = Box::<Scratch>::default();
    for (block, out) in out.chunks_mut(MAX_BLOCK).enumerate() {
        let words = &mut words[..out.len()];
        keystream.fill((block * MAX_BLOCK) as u64, words);
        sampler.values(words, out, &mut scratch);
    }
    out
}

/// Householder QR of the m x n matrix `a` (m >= n), column by column. Columns are kept in
/// panels of [`PANEL`] (row-major within a panel); each column receives reflectors 0, 1, ...
/// in order, exactly as the right-looking algorithm applies them, so neither the panels nor
/// the threads that update them change a bit.
fn householder(m: usize, n: usize, a: impl Fn(usize, usize) -> f64) -> Reflectors {
    let panels = n.div_ceil(PANEL);
    let mut data: Vec<Vec<f64>> = (0..panels)
        .map(|p| {
            let mut panel = vec![0.0; m * PANEL];
            for i in 0..m {
                for t in 0..PANEL.min(n - p * PANEL) {
                    panel[i * PANEL + t] = a(i, p * PANEL + t);
                }
            }
            panel
        })
        .collect();
    let mut r = Reflectors {
        v: Vec::with_capacity(n),
        c: Vec::with_capacity(n),
        beta: Vec::with_capacity(n),
    };
    let mut sums = [0.0; PANEL];
    for p in 0..panels {
        let (panel, later) = data[p..].split_first_mut().expect("panel p exists");
        for t in 0..PANEL.min(n - p * PANEL) {
            let k = p * PANEL + t;
            // alpha, sigma = sum of squares below it (from row k + 1 down), norm, beta.
            let alpha = panel[k * PANEL + t];
            let mut sigma = 0.0;
            for i in k + 1..m {
                let x = panel[i * PANEL + t];
                sigma += x * x;
            }
            let norm = (alpha * alpha + sigma).sqrt();
            let (beta, c) = if norm == 0.0 {
                (0.0, 0.0)
            } else {
                let beta = if alpha >= 0.0 { -norm } else { norm };
                let vk = alpha - beta;
                (beta, 2.0 / (vk * vk + sigma))
            };
            let mut v = Vec::with_capacity(m - k);
            v.push(alpha - beta);
            v.extend((k + 1..m).map(|i| panel[i * PANEL + t]));
            // Columns up to t are finished: what H_k does to them is never read.
            reflect(panel, k, &v, c, &mut sums);
            r.v.push(v);
            r.c.push(c);
            r.beta.push(beta);
        }
        // This panel's reflectors on every later panel, in order.
        let first = p * PANEL;
        let last = r.v.len();
        parallel(later, |panel, sums| {
            for k in first..last {
                reflect(panel, k, &r.v[k], r.c[k], sums);
            }
        });
    }
    r
}

/// Q = H_0 H_1 ... H_{n-1} [I; 0], m x n, in panels of [`PANEL`] columns: column j starts as
/// e_j and receives H_{n-1}, ..., H_1, H_0 in that order (those above j leave it as it is,
/// to the bit: their sums are +0).
fn form_q(m: usize, n: usize, r: &Reflectors) -> Vec<Vec<f64>> {
    let mut panels: Vec<Vec<f64>> = (0..n.div_ceil(PANEL))
        .map(|p| {
            let mut panel = vec![0.0; m * PANEL];
            for t in 0..PANEL.min(n - p * PANEL) {
                panel[(p * PANEL + t) * PANEL + t] = 1.0;
            }
            panel
        })
        .collect();
    parallel_indexed(&mut panels, |p, panel, sums| {
        for k in (0..(p * PANEL + PANEL).min(n)).rev() {
            reflect(panel, k, &r.v[k], r.c[k], sums);
        }
    });
    panels
}

/// Runs `work` on every panel, spread over the machine's cores.
fn parallel(panels: &mut [Vec<f64>], work: impl Fn(&mut [f64], &mut [f64; PANEL]) + Sync) {
    parallel_indexed(panels, |_, panel, sums| work(panel, sums));
}

/// As [`parallel`], with each panel's position in `panels`.
fn parallel_indexed(
    panels: &mut [Vec<f64>],
    work: impl Fn(usize, &mut [f64], &mut [f64; PANEL]) + Sync,
) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Small updates are not worth a thread.
    if threads == 1 || panels.len() < 2 * threads {
        let mut sums = [0.0; PANEL];
        for (p, panel) in panels.iter_mut().enumerate() {
            work(p, panel, &mut sums);
        }
        return;
    }
    // Interleaved so that every thread gets as many long panels as short ones.
    let mut shares: Vec<Vec<(usize, &mut Vec<f64>)>> = (0..threads).map(|_| Vec::new()).collect();
    for (p, panel) in panels.iter_mut().enumerate() {
        shares[p % threads].push((p, panel));
    }
    std::thread::scope(|scope| {
        for share in shares {
            let work = &work;
            scope.spawn(move || {
                let mut sums = [0.0; PANEL];
                for (p, panel) in share {
                    work(p, panel, &mut sums);
                }
            });
        }
    });
}

/// Applies H_k = I - c v v^T to every column x of a panel (rows k..m): s = the sum over
/// i = k, k + 1, ... of v_i x_i (from +0, in that order), g = s c, then x_i = x_i - g v_i.
/// Columns are independent, so the loops run across them.
#[inline]
fn reflect(panel: &mut [f64], k: usize, v: &[f64], c: f64, sums: &mut [f64; PANEL]) {
    *sums = [0.0; PANEL];
    for (row, &vi) in panel[k * PANEL..].chunks_exact(PANEL).zip(v) {
        for (s, &x) in sums.iter_mut().zip(row) {
            *s += vi * x;
        }
    }
    for s in sums.iter_mut() {
        *s *= c;
    }
    for (row, &vi) in panel[k * PANEL..].chunks_exact_mut(PANEL).zip(v) {
        for (x, &g) in row.iter_mut().zip(sums.iter()) {
            *x -= g * vi;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_is_in_range_and_takes_every_value() {
        let keystream = Keystream::new(1, "w");
        let mut words = SelectionWords::new(&keystream);
        let mut seen = [false; 7];
        for _ in 0..200 {
            seen[words.below(7) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(words.below(1), 0);
    }

    #[test]
    fn orthogonal_columns_are_orthonormal() {
        for (rows, cols) in [(7, 5), (5, 7), (33, 33), (40, 3)] {
            let q = orthogonal(&Keystream::new(3, "q"), rows, cols, 1.0);
            let (rows, cols) = (rows as usize, cols as usize);
            // Vector v of the smaller side, element e: a column when tall, a row when wide.
            let at = |v: usize, e: usize| {
                if rows >= cols {
                    q[e * cols + v]
                } else {
                    q[v * cols + e]
                }
            };
            let (count, len) = (rows.min(cols), rows.max(cols));
            for a in 0..count {
                for b in 0..count {
                    let dot: f64 = (0..len).map(|e| at(a, e) * at(b, e)).sum();
                    let want = if a == b { 1.0 } else { 0.0 };
                    assert!((dot - want).abs() < 1e-13, "{rows}x{cols} {a} {b}: {dot}");
                }
            }
        }
    }
}
