//! Which instruction set the hot loops (keystream, values, transposes) are compiled for: the
//! widest this CPU has, unless capped.
//!
//! Every copy computes the same bytes, which the tests check byte for byte; the cap exists so
//! that the narrower copies can be tested and measured on a machine that has the wider ones.

use std::sync::atomic::{AtomicU8, Ordering};

/// An instruction set the engine has a copy of its hot loops for, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// The target's baseline: SSE2 on x86_64, NEON on aarch64.
    Baseline,
    /// x86_64 AVX2.
    Avx2,
    /// x86_64 AVX-512 (F, DQ and VL).
    Avx512,
}

/// The widest set in use, as `Isa as u8`.
static CAP: AtomicU8 = AtomicU8::new(Isa::Avx512 as u8);

impl Isa {
    /// Every set, narrowest first.
    pub const ALL: [Isa; 3] = [Isa::Baseline, Isa::Avx2, Isa::Avx512];

    /// The widest set this CPU has (std caches the detection).
    pub fn detected() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl")
            {
                return Self::Avx512;
            }
            if is_x86_feature_detected!("avx2") {
                return Self::Avx2;
            }
        }
        Self::Baseline
    }

    /// The set in use: the detected one, or the cap when that is narrower.
    #[inline]
    pub fn active() -> Self {
        Self::detected().min(Self::from_u8(CAP.load(Ordering::Relaxed)))
    }

    /// Caps the sets used by this process from now on (work already running keeps its copy).
    pub fn set_max(cap: Isa) {
        CAP.store(cap as u8, Ordering::Relaxed);
    }

    /// The name `--isa` and `WEIGHTINIT_ISA` take.
    pub fn name(self) -> &'static str {
        match self {
            Self::Baseline => "baseline",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }

    fn from_u8(value: u8) -> Self {
        Self::ALL
            .into_iter()
            .find(|isa| *isa as u8 == value)
            .unwrap_or(Self::Avx512)
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Isa {
    type Err = UnknownIsa;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|isa| isa.name() == name)
            .ok_or_else(|| UnknownIsa(name.to_owned()))
    }
}

/// A name that is not one of [`Isa::name`]'s.
#[derive(Debug, thiserror::Error)]
#[error("unknown instruction set {0:?}: expected baseline, avx2 or avx512")]
pub struct UnknownIsa(String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_the_cap_only_narrows() {
        for isa in Isa::ALL {
            assert_eq!(isa.name().parse::<Isa>().unwrap(), isa);
        }
        assert!("sse9".parse::<Isa>().is_err());
        assert!(Isa::active() <= Isa::detected());
    }
}
