//! Output element types: the f64 value becomes f64, f32, bf16 or f16 bytes, little-endian.
//!
//! Lower precisions are a chain of round-to-nearest-even steps (f64 -> f32 -> bf16 / f16),
//! so a bf16 copy always equals the rounding of the f32 master copy.

use half::slice::HalfFloatSliceExt;
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

    /// `x` as an element of this type holds it, back in f64: the rounding chain of algorithm
    /// v1 section 4, through the same code that writes elements.
    pub fn round(self, x: f64) -> f64 {
        let mut bytes = [0u8; 8];
        let bytes = &mut bytes[..self.size()];
        self.encode(&[x], bytes);
        match self {
            Self::Float64 => f64::from_le_bytes(bytes.try_into().expect("8 bytes")),
            Self::Float32 => f64::from(f32::from_le_bytes(bytes.try_into().expect("4 bytes"))),
            Self::Float16 => f64::from(f16::from_le_bytes(bytes.try_into().expect("2 bytes"))),
            Self::BFloat16 => f64::from(bf16::from_le_bytes(bytes.try_into().expect("2 bytes"))),
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
    ///
    /// Plain loops the compiler vectorizes; callers compile them for the CPU's vector width
    /// (see [`super::plan`]), hence `inline(always)`.
    #[inline(always)]
    pub fn encode(self, values: &[f64], out: &mut [u8]) {
        assert_eq!(out.len(), values.len() * self.size());
        match self {
            Self::Float64 => encode_with(values, out, |x| x.to_le_bytes()),
            Self::Float32 => encode_with(values, out, |x| (x as f32).to_le_bytes()),
            Self::BFloat16 => encode_with(values, out, |x| bf16_bits(x as f32).to_le_bytes()),
            Self::Float16 => {
                // half converts whole slices with F16C where the CPU has it.
                const STEP: usize = 256;
                let mut narrow = [0f32; STEP];
                let mut halves = [f16::ZERO; STEP];
                for (values, out) in values.chunks(STEP).zip(out.chunks_mut(2 * STEP)) {
                    let (narrow, halves) =
                        (&mut narrow[..values.len()], &mut halves[..values.len()]);
                    narrow
                        .iter_mut()
                        .zip(values)
                        .for_each(|(n, x)| *n = *x as f32);
                    halves.convert_from_f32_slice(narrow);
                    encode_with(halves, out, |h| h.to_le_bytes());
                }
            }
        }
    }
}

/// bfloat16 bits of `x`, rounded to nearest even: `half::bf16::from_f32` without its
/// branches (the tests check every f32).
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16;
    let quiet_nan = (bits >> 16) as u16 | 0x0040;
    if bits & 0x7FFF_FFFF > 0x7F80_0000 {
        quiet_nan
    } else {
        rounded
    }
}

#[inline(always)]
fn encode_with<T: Copy, const N: usize>(
    values: &[T],
    out: &mut [u8],
    convert: impl Fn(T) -> [u8; N],
) {
    let (slots, _) = out.as_chunks_mut::<N>();
    for (value, slot) in values.iter().zip(slots) {
        *slot = convert(*value);
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
    fn bf16_bits_is_half_for_every_f32() {
        let threads: Vec<_> = (0..4u32)
            .map(|part| {
                std::thread::spawn(move || {
                    let all = (part << 30)..=((part << 30) | ((1 << 30) - 1));
                    for bits in all {
                        let x = f32::from_bits(bits);
                        if bf16_bits(x) != bf16::from_f32(x).to_bits() {
                            return Some(bits);
                        }
                    }
                    None
                })
            })
            .collect();
        for thread in threads {
            assert_eq!(thread.join().unwrap(), None, "first f32 bits that differ");
        }
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
