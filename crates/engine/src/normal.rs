//! The standard normal quantile (Wichura's AS 241, PPND16) and CDF of algorithm v1.
//!
//! Every operation is a separately rounded IEEE binary64 operation in the order written;
//! `ln` and `erfc` come from the `libm` crate so results do not depend on the platform.
//!
//! [`quantile`] is the algorithm as the spec writes it, one value at a time. [`quantiles`]
//! gives the same bits for a whole block in a form the compiler vectorizes: the same
//! operations in the same order give the same bits at any vector width, and Rust never
//! fuses a multiply and an add, so only the branches had to go.

// The coefficients are written exactly as published; the compiler rounds them to f64.
#![allow(clippy::excessive_precision)]

type Poly = [f64; 8];

const A: Poly = [
    3.387132872796366608,
    133.14166789178437745,
    1971.5909503065514427,
    13731.693765509461125,
    45921.953931549871457,
    67265.770927008700853,
    33430.575583588128105,
    2509.0809287301226727,
];
const B: Poly = [
    1.0,
    42.313330701600911252,
    687.1870074920579083,
    5394.1960214247511077,
    21213.794301586595867,
    39307.89580009271061,
    28729.085735721942674,
    5226.495278852854561,
];
const C: Poly = [
    1.42343711074968357734,
    4.6303378461565452959,
    5.7694972214606914055,
    3.64784832476320460504,
    1.27045825245236838258,
    0.24178072517745061177,
    0.0227238449892691845833,
    7.7454501427834140764e-4,
];
const D: Poly = [
    1.0,
    2.05319162663775882187,
    1.6763848301838038494,
    0.68976733498510000455,
    0.14810397642748007459,
    0.0151986665636164571966,
    5.475938084995344946e-4,
    1.05075007164441684324e-9,
];
const E: Poly = [
    6.6579046435011037772,
    5.4637849111641143699,
    1.7848265399172913358,
    0.29656057182850489123,
    0.026532189526576123093,
    0.0012426609473880784386,
    2.71155556874348757815e-5,
    2.01033439929228813265e-7,
];
const F: Poly = [
    1.0,
    0.59983220655588793769,
    0.13692988092273580531,
    0.0148753612908506148525,
    7.868691311456132591e-4,
    1.8463183175100546818e-5,
    1.4215117583164458887e-7,
    2.04426310338993978564e-15,
];

/// Horner's rule from the highest coefficient down; separate multiply and add, never fused.
#[inline(always)]
fn horner(c: &Poly, r: f64) -> f64 {
    ((((((c[7] * r + c[6]) * r + c[5]) * r + c[4]) * r + c[3]) * r + c[2]) * r + c[1]) * r + c[0]
}

/// N(p): the standard normal quantile for p in (0, 1).
#[inline]
pub fn quantile(p: f64) -> f64 {
    let q = p - 0.5;
    if q.abs() <= 0.425 {
        let r = 0.180625 - q * q;
        return (q * horner(&A, r)) / horner(&B, r);
    }
    let tail = if q < 0.0 { p } else { 1.0 - p };
    let r = (-libm::log(tail)).sqrt();
    let v = if r <= 5.0 {
        let r = r - 1.6;
        horner(&C, r) / horner(&D, r)
    } else {
        let r = r - 5.0;
        horner(&E, r) / horner(&F, r)
    };
    if q < 0.0 { -v } else { v }
}

/// Most elements [`quantiles`] takes at once.
pub const MAX_BLOCK: usize = 512;

/// Room for the tail pass of [`quantiles`], reused from block to block.
pub struct Tails {
    at: [u32; MAX_BLOCK],
    p: [f64; MAX_BLOCK],
    r: [f64; MAX_BLOCK],
    z: [f64; MAX_BLOCK],
}

impl Default for Tails {
    fn default() -> Self {
        Self {
            at: [0; MAX_BLOCK],
            p: [0.0; MAX_BLOCK],
            r: [0.0; MAX_BLOCK],
            z: [0.0; MAX_BLOCK],
        }
    }
}

/// `z[i] = quantile(p[i])` for a block of at most [`MAX_BLOCK`], bit for bit, in three
/// branch-free passes: the central branch for every element (85% of them need it), noting the
/// tail elements densely; the tails done together with [`ln`]; then each tail put in place,
/// the far tail (r > 5, only for p below about 1.4e-11) redone one by one with [`quantile`].
/// AVX-512 has its own first pass (the CPU's compress instructions note the tails).
#[inline(always)]
pub fn quantiles(p: &[f64], z: &mut [f64], tails: &mut Tails) {
    let n = p.len();
    assert!(n <= MAX_BLOCK && z.len() == n);
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::active() == crate::Isa::Avx512 {
        // SAFETY: `Isa::active` is never wider than the CPU.
        let count = unsafe { avx512::central(p, z, tails) };
        return finish_tails(p, z, tails, count);
    }
    let count = central(p, z, tails);
    finish_tails(p, z, tails, count)
}

/// The central branch of every element into `z`; the tails' positions and p into `tails`.
/// Returns how many tails.
#[inline(always)]
fn central(p: &[f64], z: &mut [f64], tails: &mut Tails) -> usize {
    for (z, &p) in z.iter_mut().zip(p) {
        let q = p - 0.5;
        let r = 0.180625 - q * q;
        *z = (q * horner(&A, r)) / horner(&B, r);
    }
    // Gather the tails through a bit mask per 64 elements: no unpredictable branch per element.
    let mut count = 0;
    for (group, ps) in p.chunks(64).enumerate() {
        let mut mask = 0u64;
        for (bit, &p) in ps.iter().enumerate() {
            // `>` is the negation of the central test's `<=`: p is never NaN.
            mask |= u64::from((p - 0.5).abs() > 0.425) << bit;
        }
        while mask != 0 {
            let i = group * 64 + mask.trailing_zeros() as usize;
            mask &= mask - 1;
            tails.at[count] = i as u32;
            tails.p[count] = p[i];
            count += 1;
        }
    }
    count
}

/// The tail branch for the `count` tails noted, densely, then each put in place.
#[inline(always)]
fn finish_tails(p: &[f64], z: &mut [f64], tails: &mut Tails, count: usize) {
    // Two loops, not one: each element's chain (log, square root, two polynomials and a
    // division) is too long for the core to overlap many elements' chains; split in two,
    // it overlaps twice as many (a third less time for the tails on Zen 3).
    let (tail_p, tail_r, tail_z) = (&tails.p[..count], &mut tails.r, &mut tails.z);
    for (&p, r) in tail_p.iter().zip(tail_r.iter_mut()) {
        let q = p - 0.5;
        *r = (-ln(if q < 0.0 { p } else { 1.0 - p })).sqrt();
    }
    for ((&p, &r), z) in tail_p.iter().zip(tail_r.iter()).zip(tail_z.iter_mut()) {
        let s = r - 1.6;
        let v = horner(&C, s) / horner(&D, s);
        *z = if p - 0.5 < 0.0 { -v } else { v };
    }
    for k in 0..count {
        let i = tails.at[k] as usize;
        z[i] = if tails.r[k] <= 5.0 {
            tails.z[k]
        } else {
            quantile(p[i])
        };
    }
}

/// The first pass of [`quantiles`] in AVX-512 intrinsics: the same operations in the same
/// order, 8 elements at a time, and the tails noted by compressing each vector's rather than
/// by a loop per element.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{A, B, MAX_BLOCK, Poly, Tails};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn horner(c: &Poly, r: __m512d) -> __m512d {
        // SAFETY: called from `central`, which runs only where AVX-512 is.
        unsafe {
            let mut t = _mm512_mul_pd(_mm512_set1_pd(c[7]), r);
            for k in (1..7).rev() {
                t = _mm512_mul_pd(_mm512_add_pd(t, _mm512_set1_pd(c[k])), r);
            }
            _mm512_add_pd(t, _mm512_set1_pd(c[0]))
        }
    }

    /// [`super::central`] of AVX-512.
    #[target_feature(enable = "avx512f,avx512dq,avx512vl")]
    pub(super) unsafe fn central(p: &[f64], z: &mut [f64], tails: &mut Tails) -> usize {
        let n = p.len();
        assert!(n <= MAX_BLOCK && z.len() == n);
        let mut count = 0;
        let mut at = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for start in (0..n).step_by(8) {
            let lanes: __mmask8 = if n - start >= 8 {
                0xFF
            } else {
                (1u8 << (n - start)) - 1
            };
            // SAFETY: `lanes` covers only elements below `n`; the stores of the tails write 8
            // slots from `count <= start`, and `start + 8 <= MAX_BLOCK` (start is a multiple
            // of 8 below n <= MAX_BLOCK).
            unsafe {
                let p = _mm512_maskz_loadu_pd(lanes, p.as_ptr().add(start));
                let q = _mm512_sub_pd(p, _mm512_set1_pd(0.5));
                let r = _mm512_sub_pd(_mm512_set1_pd(0.180625), _mm512_mul_pd(q, q));
                let v = _mm512_div_pd(_mm512_mul_pd(q, horner(&A, r)), horner(&B, r));
                _mm512_mask_storeu_pd(z.as_mut_ptr().add(start), lanes, v);
                let tail = _mm512_mask_cmp_pd_mask::<_CMP_GT_OQ>(
                    lanes,
                    _mm512_abs_pd(q),
                    _mm512_set1_pd(0.425),
                );
                // Compressed in registers and stored whole (a compress straight to memory is
                // several times slower on Intel); lanes past the tails are overwritten later.
                _mm512_storeu_pd(
                    tails.p.as_mut_ptr().add(count),
                    _mm512_maskz_compress_pd(tail, p),
                );
                _mm256_storeu_si256(
                    tails.at.as_mut_ptr().add(count).cast(),
                    _mm256_maskz_compress_epi32(tail, at),
                );
                count += tail.count_ones() as usize;
                at = _mm256_add_epi32(at, _mm256_set1_epi32(8));
            }
        }
        count
    }
}

/// `libm::log(x)` for a positive normal `x` below 1 (every tail argument is in
/// [2^-53, 0.075]): there libm's log (FreeBSD's e_log.c) runs straight-line code, repeated
/// here operation for operation without its special-case branches, so it vectorizes. The
/// tests compare it with `libm::log` over the whole range.
#[inline(always)]
fn ln(x: f64) -> f64 {
    const LN2_HI: f64 = 6.93147180369123816490e-01;
    const LN2_LO: f64 = 1.90821492927058770002e-10;
    const LG1: f64 = 6.666666666666735130e-01;
    const LG2: f64 = 3.999999999940941908e-01;
    const LG3: f64 = 2.857142874366239149e-01;
    const LG4: f64 = 2.222219843214978396e-01;
    const LG5: f64 = 1.818357216161805012e-01;
    const LG6: f64 = 1.531383769920937332e-01;
    const LG7: f64 = 1.479819860511658591e-01;
    // Reduce x to 2^k * (1 + f) with sqrt(2)/2 < 1 + f < sqrt(2).
    let bits = x.to_bits();
    let high = (bits >> 32) + (0x3ff00000 - 0x3fe6a09e);
    let k = ((high >> 20) as i64 - 0x3ff) as f64;
    let high = (high & 0x000fffff) + 0x3fe6a09e;
    let x = f64::from_bits((high << 32) | (bits & 0xffffffff));
    let f = x - 1.0;
    let hfsq = 0.5 * f * f;
    let s = f / (2.0 + f);
    let z = s * s;
    let w = z * z;
    let t1 = w * (LG2 + w * (LG4 + w * LG6));
    let t2 = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)));
    let r = t2 + t1;
    s * (hfsq + r) + k * LN2_LO - hfsq + f + k * LN2_HI
}

/// Phi(t) = 0.5 * erfc(-t * 0.7071067811865476): the standard normal CDF.
#[allow(clippy::approx_constant)] // the algorithm's literal, equal to FRAC_1_SQRT_2
pub fn cdf(t: f64) -> f64 {
    0.5 * libm::erfc(-t * 0.7071067811865476)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_matches_known_values() {
        assert_eq!(quantile(0.5), 0.0);
        // qnorm(0.975) = 1.959963984540054 (R).
        assert!((quantile(0.975) - 1.959963984540054).abs() < 1e-15);
        assert!((quantile(0.025) + 1.959963984540054).abs() < 1e-15);
        // Far tail (r > 5 branch), Python's statistics.NormalDist agrees.
        assert!((quantile(1e-12) + 7.034483825301132).abs() < 1e-12);
    }

    #[test]
    fn quantile_is_odd_and_cdf_inverts_it() {
        for p in [1e-9, 0.001, 0.1, 0.3, 0.45] {
            let mirrored = -quantile(1.0 - p);
            assert!(
                (quantile(p) - mirrored).abs() <= 1e-9 * mirrored.abs().max(1.0),
                "p = {p}"
            );
            let back = cdf(quantile(p));
            assert!(
                (back - p).abs() <= 1e-13 * p.max(1e-3),
                "p = {p}, back = {back}"
            );
        }
    }

    #[test]
    fn ln_is_libm_log_on_the_tail_range() {
        // Every exponent from 2^-53 to 2^-1 with random mantissas, and the range's ends.
        use rand::rngs::SmallRng;
        use rand::{RngExt, SeedableRng};
        let mut rng = SmallRng::seed_from_u64(0x9E37_79B9_7F4A_7C15);
        let mut inputs = vec![
            1.0 / 9_007_199_254_740_992.0,
            0.075,
            0.5 - f64::EPSILON / 4.0,
        ];
        for exponent in -53..0 {
            for _ in 0..20_000 {
                let bits: u64 = rng.random();
                let mantissa = f64::from_bits(0x3FF0_0000_0000_0000 | (bits >> 12));
                inputs.push(mantissa * 2f64.powi(exponent - 1));
            }
        }
        for x in inputs {
            assert_eq!(ln(x).to_bits(), libm::log(x).to_bits(), "x = {x:e}");
        }
    }

    #[test]
    fn quantiles_are_quantile_bit_for_bit() {
        // Central, both tails, both sides of |q| = 0.425 and of r = 5, and the extremes.
        let half = 1.0 / 9_007_199_254_740_992.0;
        let mut p = vec![
            half,
            1.0 - half,
            0.075,
            0.925,
            0.5,
            1e-11,
            2e-11,
            1.0 - 1e-11,
        ];
        p.extend((0..MAX_BLOCK - 8).map(|i| i as f64 / (MAX_BLOCK - 8) as f64 + half));
        // Every first pass this CPU can run, and the dispatch.
        type Central = fn(&[f64], &mut [f64], &mut Tails) -> usize;
        let mut passes: Vec<(&str, Central)> = vec![("portable", central)];
        #[cfg(target_arch = "x86_64")]
        if crate::Isa::detected() == crate::Isa::Avx512 {
            // SAFETY: only where the CPU has AVX-512.
            passes.push(("avx512", |p, z, t| unsafe { avx512::central(p, z, t) }));
        }
        let mut tails = Tails::default();
        for len in [0, 1, 7, 8, 9, 63, 64, 65, MAX_BLOCK] {
            let mut z = vec![0.0; len];
            quantiles(&p[..len], &mut z, &mut tails);
            for (p, z) in p.iter().zip(&z) {
                assert_eq!(z.to_bits(), quantile(*p).to_bits(), "p = {p:e}");
            }
            for (name, pass) in &passes {
                let mut z = vec![0.0; len];
                let count = pass(&p[..len], &mut z, &mut tails);
                finish_tails(&p[..len], &mut z, &mut tails, count);
                for (p, z) in p.iter().zip(&z) {
                    assert_eq!(z.to_bits(), quantile(*p).to_bits(), "{name}: p = {p:e}");
                }
            }
        }
    }

    #[test]
    fn the_smallest_p_stays_below_8_3() {
        let smallest = 1.0 / 9_007_199_254_740_992.0;
        assert!(quantile(smallest) > -8.3);
        assert!(quantile(1.0 - smallest) < 8.3);
    }
}
