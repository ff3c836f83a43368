//! Output element types: the f64 value becomes f64, f32, bf16 or f16 bytes, little-endian.
//!
//! Lower precisions are a chain of round-to-nearest-even steps (f64 -> f32 -> bf16 / f16),
//! so a bf16 copy always equals the rounding of the f32 master copy.

use half::{bf16, f16};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    Float32,
    Float64,
    Float16,
    BFloat16,
}

impl DType {
    pub const ALL: [DType; 4] = [Self::Float32, Self::Float64, Self::Float16, Self::BFloat16];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            Self::Float64 => 8,
            Self::Float32 => 4,
            Self::Float16 | Self::BFloat16 => 2,
        }
    }

    /// The largest finite value, as f64: every value up to it survives the rounding chain.
    pub fn max_finite(self) -> f64 {
        match self {
            Self::Float64 => f64::MAX,
            Self::Float32 => f64::from(f32::MAX),
            Self::Float16 => f64::from(f16::MAX),
            Self::BFloat16 => f64::from(bf16::MAX),
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Float32 => "float32",
            Self::Float64 => "float64",
            Self::Float16 => "float16",
            Self::BFloat16 => "bfloat16",
        }
    }

    /// Writes `values` into `out` (exactly `values.len() * self.size()` bytes).
    pub fn encode(self, values: &[f64], out: &mut [u8]) {
        debug_assert_eq!(out.len(), values.len() * self.size());
        match self {
            Self::Float64 => encode_with(values, out, |x| x.to_le_bytes()),
            Self::Float32 => encode_with(values, out, |x| (x as f32).to_le_bytes()),
            Self::Float16 => encode_with(values, out, |x| f16::from_f32(x as f32).to_le_bytes()),
            Self::BFloat16 => encode_with(values, out, |x| bf16::from_f32(x as f32).to_le_bytes()),
        }
    }
}

#[inline(always)]
fn encode_with<const N: usize>(values: &[f64], out: &mut [u8], convert: impl Fn(f64) -> [u8; N]) {
    for (value, slot) in values.iter().zip(out.chunks_exact_mut(N)) {
        slot.copy_from_slice(&convert(*value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(dtype: DType, x: f64) -> Vec<u8> {
        let mut out = vec![0; dtype.size()];
        dtype.encode(&[x], &mut out);
        out
    }

    #[test]
    fn lower_precisions_round_the_f32_value_not_the_f64() {
        // Exactly halfway between two bf16 / f16 values once f32 has dropped the 2^-30:
        // the chain ties to even (1.0), a direct rounding of the f64 would round up.
        let x = 1.0 + 2f64.powi(-8) + 2f64.powi(-30);
        assert_eq!(encoded(DType::BFloat16, x), bf16::ONE.to_le_bytes());
        let x = 1.0 + 2f64.powi(-11) + 2f64.powi(-30);
        assert_eq!(encoded(DType::Float16, x), f16::ONE.to_le_bytes());
        assert_eq!(encoded(DType::Float32, x), (x as f32).to_le_bytes());
    }

    #[test]
    fn little_endian_bytes() {
        assert_eq!(encoded(DType::Float64, 1.0), 1.0f64.to_le_bytes());
        assert_eq!(encoded(DType::Float32, -2.5), [0, 0, 0x20, 0xC0]);
        assert_eq!(encoded(DType::BFloat16, 1.0), [0x80, 0x3F]);
        assert_eq!(encoded(DType::Float16, 1.0), [0x00, 0x3C]);
    }

    #[test]
    fn max_finite_survives_the_chain() {
        for dtype in DType::ALL {
            let bytes = encoded(dtype, dtype.max_finite());
            let back = match dtype {
                DType::Float64 => f64::from_le_bytes(bytes.try_into().unwrap()),
                DType::Float32 => f64::from(f32::from_le_bytes(bytes.try_into().unwrap())),
                DType::Float16 => f16::from_le_bytes(bytes.try_into().unwrap()).to_f64(),
                DType::BFloat16 => bf16::from_le_bytes(bytes.try_into().unwrap()).to_f64(),
            };
            assert_eq!(back, dtype.max_finite(), "{dtype:?}");
        }
    }
}
