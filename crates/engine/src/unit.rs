//! From a random word to a unit number: `u` in [0, 1) and `p` in (0, 1), both exact.

/// 2^-53: half a step of `u`, so `p = u + 2^-53` never reaches 0 or 1.
const HALF_STEP: f64 = 1.0 / 9_007_199_254_740_992.0;

/// u = f64_from_bits(0x3FF0_0000_0000_0000 | (w >> 12)) - 1.0, in [0, 1) with step 2^-52.
#[inline]
pub fn unit(word: u64) -> f64 {
    f64::from_bits(0x3FF0_0000_0000_0000 | (word >> 12)) - 1.0
}

/// p = u + 2^-53, in (0, 1): a valid argument for the normal quantile.
#[inline]
pub fn open_unit(word: u64) -> f64 {
    unit(word) + HALF_STEP
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extremes_are_exact() {
        assert_eq!(unit(0), 0.0);
        assert_eq!(unit(u64::MAX), 1.0 - f64::EPSILON);
        assert_eq!(open_unit(0), HALF_STEP);
        assert_eq!(open_unit(u64::MAX), 1.0 - HALF_STEP);
        // Only the top 52 bits matter.
        assert_eq!(unit(0xFFF), 0.0);
        assert_eq!(unit(1 << 12), f64::EPSILON);
    }
}
