//! The four distributions of algorithm v1 and how a word becomes a value under each.

use super::{normal, unit};

/// A fully resolved distribution; all parameters are f64 and already validated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Distribution {
    Constant {
        value: f64,
    },
    Uniform {
        low: f64,
        high: f64,
    },
    Normal {
        mean: f64,
        std: f64,
    },
    /// `alpha` and `beta` are in units of `std`, relative to `mean`.
    TruncatedNormal {
        mean: f64,
        std: f64,
        alpha: f64,
        beta: f64,
    },
}

impl Distribution {
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Constant { .. } => "constant",
            Self::Uniform { .. } => "uniform",
            Self::Normal { .. } => "normal",
            Self::TruncatedNormal { .. } => "truncated_normal",
        }
    }

    /// The values that bound the distribution (algorithm v1 section 4): the tensor is valid
    /// only if both are finite after the dtype's rounding. A normal never goes past 8.3 std
    /// from its mean (the extreme quantiles are about +-8.29).
    pub fn extremes(&self) -> [f64; 2] {
        match *self {
            Self::Constant { value } => [value, value],
            Self::Uniform { low, high } => [low, high],
            Self::Normal { mean, std } => [mean - 8.3 * std, mean + 8.3 * std],
            Self::TruncatedNormal {
                mean,
                std,
                alpha,
                beta,
            } => [mean + std * alpha, mean + std * beta],
        }
    }

    /// The per-tensor constants of the distribution, computed once.
    pub fn sampler(&self) -> Sampler {
        match *self {
            Self::Constant { value } => Sampler::Constant { value },
            Self::Uniform { low, high } => Sampler::Uniform {
                low,
                span: high - low,
            },
            Self::Normal { mean, std } => Sampler::Normal { mean, std },
            Self::TruncatedNormal {
                mean,
                std,
                alpha,
                beta,
            } => {
                // An interval above the mean is generated on its mirror image, where the
                // lower tail of Phi keeps its resolution.
                let (lo, hi, sign) = if alpha > 0.0 {
                    (-beta, -alpha, -1.0)
                } else {
                    (alpha, beta, 1.0)
                };
                let ca = normal::cdf(lo);
                let cb = normal::cdf(hi);
                Sampler::TruncatedNormal {
                    mean,
                    std,
                    lo,
                    hi,
                    sign,
                    ca,
                    mass: cb - ca,
                }
            }
        }
    }
}

/// A distribution with its per-tensor constants, ready to turn words into values.
#[derive(Clone, Copy, Debug)]
pub enum Sampler {
    Constant {
        value: f64,
    },
    Uniform {
        low: f64,
        span: f64,
    },
    Normal {
        mean: f64,
        std: f64,
    },
    /// Generated on `[lo, hi]` (the interval or its mirror image) and multiplied by `sign`.
    TruncatedNormal {
        mean: f64,
        std: f64,
        lo: f64,
        hi: f64,
        sign: f64,
        ca: f64,
        mass: f64,
    },
}

impl Sampler {
    /// Whether values depend on the random words at all.
    pub fn uses_words(&self) -> bool {
        !matches!(self, Self::Constant { .. })
    }

    /// Writes the value of each word into `out` (same length as `words`).
    ///
    /// Each step is a separate loop over the block so that it vectorizes; callers compile it
    /// for the CPU's vector width (see [`super::plan`]), hence `inline(always)`.
    #[inline(always)]
    pub fn values(&self, words: &[u64], out: &mut [f64], scratch: &mut Scratch) {
        assert_eq!(words.len(), out.len());
        match *self {
            Self::Constant { value } => out.fill(value),
            Self::Uniform { low, span } => map(words, out, |w| low + span * unit::unit(w)),
            Self::Normal { mean, std } => {
                quantiles(words, out, scratch, unit::open_unit, |z, _| mean + std * z);
            }
            Self::TruncatedNormal {
                mean,
                std,
                lo,
                hi,
                sign,
                ca,
                mass,
            } => {
                quantiles(
                    words,
                    out,
                    scratch,
                    |w| ca + mass * unit::open_unit(w),
                    |z, p| {
                        // p' of exactly 0 or 1 has no finite quantile: it takes the bound it
                        // tends to.
                        let y = if p >= 1.0 {
                            hi
                        } else if p <= 0.0 {
                            lo
                        } else {
                            z.max(lo).min(hi)
                        };
                        mean + std * (sign * y)
                    },
                );
            }
        }
    }
}

#[inline(always)]
fn map(words: &[u64], out: &mut [f64], f: impl Fn(u64) -> f64) {
    for (word, slot) in words.iter().zip(out.iter_mut()) {
        *slot = f(*word);
    }
}

/// Working memory of [`Sampler::values`] for the normal quantile, reused across calls.
pub struct Scratch {
    p: [f64; normal::MAX_BLOCK],
    tails: normal::Tails,
}

impl Default for Scratch {
    fn default() -> Self {
        Self {
            p: [0.0; normal::MAX_BLOCK],
            tails: normal::Tails::default(),
        }
    }
}

/// `out[i] = finish(N(p), p)` with `p = argument(words[i])`, a block of at most
/// [`normal::MAX_BLOCK`] at a time.
#[inline(always)]
fn quantiles(
    words: &[u64],
    out: &mut [f64],
    scratch: &mut Scratch,
    argument: impl Fn(u64) -> f64,
    finish: impl Fn(f64, f64) -> f64,
) {
    for (words, out) in words
        .chunks(normal::MAX_BLOCK)
        .zip(out.chunks_mut(normal::MAX_BLOCK))
    {
        let p = &mut scratch.p[..words.len()];
        map(words, p, &argument);
        normal::quantiles(p, out, &mut scratch.tails);
        for (z, &p) in out.iter_mut().zip(p.iter()) {
            *z = finish(*z, p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(distribution: Distribution, word: u64) -> f64 {
        let mut out = [0.0];
        distribution
            .sampler()
            .values(&[word], &mut out, &mut Scratch::default());
        out[0]
    }

    #[test]
    fn uniform_covers_low_to_just_below_high() {
        let d = Distribution::Uniform {
            low: -0.5,
            high: 2.0,
        };
        assert_eq!(value(d, 0), -0.5);
        assert!(value(d, u64::MAX) < 2.0);
        assert_eq!(value(d, 1 << 63), 0.75);
    }

    #[test]
    fn normal_median_is_the_mean() {
        let d = Distribution::Normal {
            mean: 1.0,
            std: 0.02,
        };
        // p = 0.5 + 2^-53 is just above the median.
        let mid = value(d, 1 << 63);
        assert!((1.0..1.0 + 1e-15).contains(&mid));
    }

    #[test]
    fn truncated_normal_stays_inside_its_bounds() {
        let d = Distribution::TruncatedNormal {
            mean: 0.0,
            std: 1.0,
            alpha: -0.5,
            beta: 0.25,
        };
        for word in [0, 1, u64::MAX, u64::MAX / 3, 1 << 63] {
            let x = value(d, word);
            assert!((-0.5..=0.25).contains(&x), "{x}");
        }
    }
}
