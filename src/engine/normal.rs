//! The standard normal quantile (Wichura's AS 241, PPND16) and CDF of algorithm v1.
//!
//! Every operation is a separately rounded IEEE binary64 operation in the order written;
//! `ln` and `erfc` come from the `libm` crate so results do not depend on the platform.

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
    fn the_smallest_p_stays_below_8_3() {
        let smallest = 1.0 / 9_007_199_254_740_992.0;
        assert!(quantile(smallest) > -8.3);
        assert!(quantile(1.0 - smallest) < 8.3);
    }
}
