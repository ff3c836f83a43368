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
use super::memory::{OutOfMemory, try_vec};
use super::normal::MAX_BLOCK;
use super::param::{SchemeError, SchemeField, invalid, non_negative, param};

/// The first keystream word of sparse's zero selection: above every element word, since an
/// element count times a dtype size (at least 2 bytes) fits in u64.
pub const SPARSE_WORD_BASE: u64 = 1 << 63;

/// Columns of a QR panel: a panel of `rows x PANEL` f64 stays in the L2 cache. The last
/// panel is only as wide as the columns left, so a tall, narrow matrix costs no padding.
const PANEL: usize = 16;

/// Multiply-adds of the QR that cost as much CPU as generating one element of a plain normal
/// scheme: about 4.5 G multiply-adds against 250 M elements per second and core (BENCHMARKS.md,
/// "orthogonal" and "Engine"); converts QR work into element-equivalents.
const QR_MADDS_PER_ELEMENT: f64 = 16.0;

/// A whole-tensor computation was stopped by its caller before it finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("stopped before the whole tensor was computed")]
pub struct Stopped;

/// Why a whole-tensor computation did not finish.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unfinished {
    #[error(transparent)]
    Stopped(#[from] Stopped),
    /// Its matrices do not fit in this process's memory.
    #[error(transparent)]
    OutOfMemory(#[from] OutOfMemory),
}

/// Asked between the steps of a whole-tensor computation (a few milliseconds apart at most):
/// `true` stops it with [`Stopped`].
pub type StopCheck<'a> = &'a (dyn Fn() -> bool + Sync);

/// Fails with [`Stopped`] when `stop` says so.
pub fn check(stop: StopCheck<'_>) -> Result<(), Stopped> {
    if stop() { Err(Stopped) } else { Ok(()) }
}

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

    /// CPU cost of the whole-tensor computation, in element-equivalents (the cost of
    /// generating one element of a plain scheme): orthogonal's QR, an upper bound of
    /// 4 (m n^2 - n^3 / 3) multiply-adds for the factorization and forming Q (m >= n), plus its
    /// draws; sparse's selection, a word per zero plus its draws. 0 for the others.
    pub fn whole_work(&self) -> u64 {
        match *self {
            Self::Orthogonal { rows, cols, .. } => {
                let (m, n) = (rows.max(cols) as f64, rows.min(cols) as f64);
                let madds = 4.0 * (m * n * n - n * n * n / 3.0);
                // Float to int saturates: an absurd shape costs u64::MAX, never wraps.
                (madds / QR_MADDS_PER_ELEMENT) as u64 + rows * cols
            }
            Self::Sparse {
                rows, cols, zeros, ..
            } => rows * cols + zeros * cols,
            Self::Eye { .. } | Self::Dirac { .. } => 0,
        }
    }

    /// Bytes the whole-tensor computation holds at its peak, while computing:
    /// [`whole_bytes_bound`] for orthogonal, 1/8 per element for sparse's bits plus its row
    /// permutation. What it holds once done is at most half of this.
    pub fn whole_bytes(&self) -> u64 {
        match *self {
            Self::Orthogonal { rows, cols, .. } => whole_bytes_bound(rows * cols),
            Self::Sparse { rows, cols, .. } => (rows * cols).div_ceil(8) + 8 * rows,
            Self::Eye { .. } | Self::Dirac { .. } => 0,
        }
    }
}

/// The most bytes a whole-tensor computation of a `elements`-element matrix holds: two f64
/// matrices at a time (orthogonal's QR), the largest of [`Structure::whole_bytes`].
pub const fn whole_bytes_bound(elements: u64) -> u64 {
    16 * elements
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
    /// orthogonal's factor.
    Factor(Factor),
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

    /// Computes what the scheme needs of the whole tensor (orthogonal's QR, sparse's zeros),
    /// unless done already, asking `stop` between its steps. Callers that may need to stop, or
    /// to survive running out of memory, call this before the first [`Self::values`], which
    /// otherwise computes it unstoppably and panics when memory runs out.
    pub fn prepare(&self, keystream: &Keystream, stop: StopCheck<'_>) -> Result<(), Unfinished> {
        if self.whole.get().is_none()
            && let Some(whole) = self.compute(keystream, stop)?
        {
            // Two callers may compute at once; both results are the same.
            let _ = self.whole.set(whole);
        }
        Ok(())
    }

    fn compute(
        &self,
        keystream: &Keystream,
        stop: StopCheck<'_>,
    ) -> Result<Option<Whole>, Unfinished> {
        Ok(match self.structure {
            Structure::Orthogonal { rows, cols, gain } => Some(Whole::Factor(orthogonal(
                keystream, rows, cols, gain, stop,
            )?)),
            Structure::Sparse {
                rows,
                cols,
                zeros,
                layout,
                ..
            } => Some(Whole::Zeros(sparse_zeros(
                keystream, rows, cols, zeros, layout, stop,
            )?)),
            Structure::Eye { .. } | Structure::Dirac { .. } => None,
        })
    }

    /// The whole-tensor result, computed now if no one prepared it.
    fn whole(&self, keystream: &Keystream) -> &Whole {
        self.whole.get_or_init(|| {
            self.compute(keystream, &|| false)
                .ok()
                .flatten()
                .expect("a scheme with a whole computation, never stopped, that fits in memory")
        })
    }

    /// Values of elements `index, index + 1, ...`; for sparse `values` holds the normal draws
    /// of those elements on entry.
    pub fn values(&self, keystream: &Keystream, index: u64, values: &mut [f64]) {
        match self.structure {
            Structure::Orthogonal { .. } => {
                let Whole::Factor(factor) = self.whole(keystream) else {
                    unreachable!("orthogonal computes its factor")
                };
                for (i, slot) in (index..).zip(values.iter_mut()) {
                    *slot = factor.value(i);
                }
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
            Structure::Sparse { .. } => {
                let Whole::Zeros(bits) = self.whole(keystream) else {
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
    stop: StopCheck<'_>,
) -> Result<Vec<u64>, Unfinished> {
    let mut bits = try_vec(0u64, (rows * cols).div_ceil(64) as usize)?;
    let mut words = SelectionWords::new(keystream);
    let mut perm = try_vec(0u64, rows as usize)?;
    perm.iter_mut().zip(0..).for_each(|(slot, r)| *slot = r);
    let mut swaps = try_vec(0usize, zeros as usize)?;
    for c in 0..cols {
        for (i, swap) in (0..zeros).zip(swaps.iter_mut()) {
            // A tall column alone can take a while.
            if i % CHECK_EVERY == 0 {
                check(stop)?;
            }
            let j = i + words.below(rows - i);
            perm.swap(i as usize, j as usize);
            *swap = j as usize;
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
    Ok(bits)
}

/// Selection draws between two stop checks: well under a millisecond of work.
const CHECK_EVERY: u64 = 1 << 14;

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

/// orthogonal's factor as the QR leaves it: Q (m x n, m >= n) in panels of up to [`PANEL`]
/// columns, each row-major, and what turns its columns into the tensor's values.
#[derive(Debug)]
struct Factor {
    panels: Vec<Vec<f64>>,
    m: usize,
    n: usize,
    /// The tensor is Q's transpose (its matrix was wide).
    wide: bool,
    /// Each column's sign: that of R's diagonal.
    signs: Vec<f64>,
    gain: f64,
}

impl Factor {
    /// Element `index` of the tensor: gain x Q, or its transpose when wide, row-major.
    fn value(&self, index: u64) -> f64 {
        let e = index as usize;
        let (i, j) = if self.wide {
            (e % self.m, e / self.m)
        } else {
            (e / self.n, e % self.n)
        };
        let p = j / PANEL;
        self.panels[p][i * width(self.n, p) + j % PANEL] * self.signs[j] * self.gain
    }
}

/// Columns of panel `p` of an n-column matrix.
fn width(n: usize, p: usize) -> usize {
    PANEL.min(n - p * PANEL)
}

/// gain x Q of the [rows, cols] matrix of the tensor's standard normal draws (transposed
/// first when it is wide), with Q's columns signed by R's diagonal. Two m x n matrices of f64
/// at most are held at once: the draws and their panels, the panels and the reflectors, the
/// reflectors and Q.
fn orthogonal(
    keystream: &Keystream,
    rows: u64,
    cols: u64,
    gain: f64,
    stop: StopCheck<'_>,
) -> Result<Factor, Unfinished> {
    let (rows, cols) = (rows as usize, cols as usize);
    let draws = normal_draws(keystream, rows * cols, stop)?;
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
    let mut panels = (0..n.div_ceil(PANEL))
        .map(|p| {
            let w = width(n, p);
            let mut panel = try_vec(0.0, m * w)?;
            for i in 0..m {
                for t in 0..w {
                    panel[i * w + t] = a(i, p * PANEL + t);
                }
            }
            Ok(panel)
        })
        .collect::<Result<Vec<_>, OutOfMemory>>()?;
    drop(draws);
    let reflectors = householder(m, n, &mut panels, stop)?;
    drop(panels);
    let q = form_q(m, n, &reflectors, stop)?;
    let signs = reflectors
        .beta
        .iter()
        .map(|&beta| if beta < 0.0 { -1.0 } else { 1.0 })
        .collect();
    Ok(Factor {
        panels: q,
        m,
        n,
        wide,
        signs,
        gain,
    })
}

/// Standard normal draws of elements 0..count, as the `normal` scheme with mean 0, std 1.
fn normal_draws(
    keystream: &Keystream,
    count: usize,
    stop: StopCheck<'_>,
) -> Result<Vec<f64>, Unfinished> {
    let sampler = Sampler::Normal {
        mean: 0.0,
        std: 1.0,
    };
    let mut out = try_vec(0.0, count)?;
    let mut words = vec![0u64; MAX_BLOCK];
    let mut scratch = Box::<Scratch>::default();
    for (block, out) in out.chunks_mut(MAX_BLOCK).enumerate() {
        check(stop)?;
        let words = &mut words[..out.len()];
        keystream.fill((block * MAX_BLOCK) as u64, words);
        sampler.values(words, out, &mut scratch);
    }
    Ok(out)
}

/// Householder QR of the m x n matrix (m >= n) in `data`'s panels (left holding R),
/// column by column. Each column receives reflectors 0, 1, ... in order, exactly as the
/// right-looking algorithm applies them, so neither the panels nor the threads that update
/// them change a bit.
fn householder(
    m: usize,
    n: usize,
    data: &mut [Vec<f64>],
    stop: StopCheck<'_>,
) -> Result<Reflectors, Unfinished> {
    let mut r = Reflectors {
        v: Vec::with_capacity(n),
        c: Vec::with_capacity(n),
        beta: Vec::with_capacity(n),
    };
    let mut sums = [0.0; PANEL];
    for p in 0..data.len() {
        let (panel, later) = data[p..].split_first_mut().expect("panel p exists");
        let w = width(n, p);
        for t in 0..w {
            check(stop)?;
            let k = p * PANEL + t;
            // alpha, sigma = sum of squares below it (from row k + 1 down), norm, beta.
            let alpha = panel[k * w + t];
            let mut sigma = 0.0;
            for i in k + 1..m {
                let x = panel[i * w + t];
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
            // Together the reflectors are as large as the matrix.
            let mut v = try_vec(alpha - beta, m - k)?;
            for (slot, i) in v[1..].iter_mut().zip(k + 1..m) {
                *slot = panel[i * w + t];
            }
            // Columns up to t are finished: what H_k does to them is never read.
            reflect(panel, w, k, &v, c, &mut sums);
            r.v.push(v);
            r.c.push(c);
            r.beta.push(beta);
        }
        // This panel's reflectors on every later panel, in order.
        let first = p * PANEL;
        let last = r.v.len();
        parallel(later, stop, |_, panel, sums| {
            for k in first..last {
                reflect(panel, panel.len() / m, k, &r.v[k], r.c[k], sums);
            }
        })?;
    }
    Ok(r)
}

/// Q = H_0 H_1 ... H_{n-1} [I; 0], m x n, in panels of up to [`PANEL`] columns: column j
/// starts as e_j and receives H_{n-1}, ..., H_1, H_0 in that order (those above j leave it as
/// it is, to the bit: their sums are +0).
fn form_q(
    m: usize,
    n: usize,
    r: &Reflectors,
    stop: StopCheck<'_>,
) -> Result<Vec<Vec<f64>>, Unfinished> {
    let mut panels = (0..n.div_ceil(PANEL))
        .map(|p| {
            let w = width(n, p);
            let mut panel = try_vec(0.0, m * w)?;
            for t in 0..w {
                panel[(p * PANEL + t) * w + t] = 1.0;
            }
            Ok(panel)
        })
        .collect::<Result<Vec<_>, OutOfMemory>>()?;
    parallel(&mut panels, stop, |p, panel, sums| {
        for k in (0..(p * PANEL + PANEL).min(n)).rev() {
            // One reflector is at most m x 16 multiply-adds: check between them.
            if stop() {
                return;
            }
            reflect(panel, panel.len() / m, k, &r.v[k], r.c[k], sums);
        }
    })?;
    Ok(panels)
}

/// Runs `work` on every panel, with its position in `panels`, spread over the machine's
/// cores; stopped between panels when `stop` says so (`work` may stop inside one too).
fn parallel(
    panels: &mut [Vec<f64>],
    stop: StopCheck<'_>,
    work: impl Fn(usize, &mut [f64], &mut [f64; PANEL]) + Sync,
) -> Result<(), Stopped> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let run = |share: &mut dyn Iterator<Item = (usize, &mut Vec<f64>)>| {
        let mut sums = [0.0; PANEL];
        for (p, panel) in share {
            if stop() {
                return;
            }
            work(p, panel, &mut sums);
        }
    };
    // Small updates are not worth a thread.
    if threads == 1 || panels.len() < 2 * threads {
        run(&mut panels.iter_mut().enumerate());
        return check(stop);
    }
    // Interleaved so that every thread gets as many long panels as short ones.
    let mut shares: Vec<Vec<(usize, &mut Vec<f64>)>> = (0..threads).map(|_| Vec::new()).collect();
    for (p, panel) in panels.iter_mut().enumerate() {
        shares[p % threads].push((p, panel));
    }
    std::thread::scope(|scope| {
        for share in shares {
            let run = &run;
            scope.spawn(move || run(&mut share.into_iter()));
        }
    });
    check(stop)
}

/// Applies H_k = I - c v v^T to every column x of a panel `width` columns wide (rows k..m):
/// s = the sum over i = k, k + 1, ... of v_i x_i (from +0, in that order), g = s c, then
/// x_i = x_i - g v_i. Columns are independent, so the loops run across them.
#[inline]
fn reflect(panel: &mut [f64], width: usize, k: usize, v: &[f64], c: f64, sums: &mut [f64; PANEL]) {
    // A full panel's width as a constant, so that its loops are unrolled and vectorized.
    if width == PANEL {
        reflect_columns(panel, PANEL, k, v, c, sums);
    } else {
        reflect_columns(panel, width, k, v, c, sums);
    }
}

#[inline(always)]
fn reflect_columns(
    panel: &mut [f64],
    width: usize,
    k: usize,
    v: &[f64],
    c: f64,
    sums: &mut [f64; PANEL],
) {
    let sums = &mut sums[..width];
    sums.fill(0.0);
    for (row, &vi) in panel[k * width..].chunks_exact(width).zip(v) {
        for (s, &x) in sums.iter_mut().zip(row) {
            *s += vi * x;
        }
    }
    for s in sums.iter_mut() {
        *s *= c;
    }
    for (row, &vi) in panel[k * width..].chunks_exact_mut(width).zip(v) {
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
            let factor = orthogonal(&Keystream::new(3, "q"), rows, cols, 1.0, &|| false).unwrap();
            let q: Vec<f64> = (0..rows * cols).map(|e| factor.value(e)).collect();
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

    /// Matrices larger than memory are an error, not an abort: the draws of orthogonal, the
    /// row permutation and zero bits of sparse (sizes no allocator grants, refused at once).
    #[test]
    fn whole_computations_out_of_memory_are_errors() {
        let keystream = Keystream::new(5, "huge");
        let never = &|| false;
        assert_eq!(
            orthogonal(&keystream, 1 << 30, 1 << 30, 1.0, never).err(),
            Some(Unfinished::OutOfMemory(OutOfMemory { bytes: 1 << 63 }))
        );
        assert_eq!(
            sparse_zeros(&keystream, 1 << 61, 1, 1, Layout::Torch, never),
            Err(Unfinished::OutOfMemory(OutOfMemory { bytes: 1 << 58 }))
        );
    }

    /// A stop asked for during any step ends the computation there: the draws, the
    /// factorization, forming Q (on several threads: 64 panels), sparse's selection.
    #[test]
    fn whole_computations_stop_when_asked() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let keystream = Keystream::new(5, "stop");
        // Stops at the `after`-th check; returns how many checks a full run makes.
        let run = |after: u64, f: &dyn Fn(StopCheck<'_>) -> Result<(), Unfinished>| {
            let checks = AtomicU64::new(0);
            let result = f(&|| checks.fetch_add(1, Ordering::Relaxed) + 1 >= after);
            (result, checks.load(Ordering::Relaxed))
        };
        let qr = |stop: StopCheck<'_>| orthogonal(&keystream, 1024, 1024, 1.0, stop).map(|_| ());
        let sparse = |stop: StopCheck<'_>| {
            sparse_zeros(&keystream, 1 << 16, 4, 1 << 15, Layout::Torch, stop).map(|_| ())
        };
        for f in [
            &qr as &dyn Fn(StopCheck<'_>) -> Result<(), Unfinished>,
            &sparse,
        ] {
            let (done, total) = run(u64::MAX, f);
            assert_eq!(done, Ok(()));
            // Each thread finishes the reflector it is applying, then checks once more.
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
            for after in [1, total / 3, total / 2, total - 1] {
                let (result, checks) = run(after, f);
                assert_eq!(
                    result,
                    Err(Unfinished::Stopped(Stopped)),
                    "stop at check {after} of {total}"
                );
                assert!(
                    checks <= after + 2 * threads + 1,
                    "{checks} checks to stop at {after}"
                );
            }
        }
    }
}
