//! The per-tensor random source: ChaCha8 keyed by SHA-256 of the seed and the tensor's name.
//!
//! Word `i` of a tensor is the little-endian u64 at keystream bytes `[8i, 8i + 8)`, so any
//! range of words can be produced on its own, in any order, on any thread.
//!
//! The keystream is the cost floor of the whole service (8 bytes per element), so it is made
//! in bulk: on x86_64 by the block kernels in [`simd`], which run 16 (AVX-512) or 8 (AVX2)
//! blocks side by side, one state word per vector lane, chosen at run time; anywhere else by
//! `chacha20::ChaCha8Rng::fill_bytes`. Both are the same function (spec section 1), which the
//! tests check against `ChaCha8Rng::next_u64` word by word.

use chacha20::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

/// Domain separator of algorithm v1, NUL-terminated so no name can extend it.
const DOMAIN_V1: &[u8] = b"weightinit-v1\0";

/// u64 words per 64-byte ChaCha block.
const BLOCK_WORDS: usize = 8;

/// The keystream of one tensor.
#[derive(Clone, Debug)]
pub struct Keystream {
    key: [u8; 32],
}

impl Keystream {
    /// K = SHA-256("weightinit-v1" || 0x00 || LE64(seed) || UTF8(name)).
    pub fn new(seed: u64, name: &str) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(DOMAIN_V1);
        hasher.update(seed.to_le_bytes());
        hasher.update(name.as_bytes());
        Self {
            key: hasher.finalize().into(),
        }
    }

    /// Fills `words` with words `first, first + 1, ...` of the keystream.
    pub fn fill(&self, first: u64, words: &mut [u64]) {
        #[cfg(target_arch = "x86_64")]
        if let Some(kernel) = simd::Kernel::detect() {
            return self.fill_with(kernel, first, words);
        }
        self.fill_portable(first, words);
    }

    /// The chacha20 crate's RNG (its own SIMD backends) filling the words' bytes directly.
    fn fill_portable(&self, first: u64, words: &mut [u64]) {
        let mut rng = ChaCha8Rng::from_seed(self.key);
        // The RNG counts 32-bit words; a u64 word is two of them.
        rng.set_word_pos(u128::from(first) * 2);
        rng.fill_bytes(as_bytes(words));
        words.iter_mut().for_each(|w| *w = u64::from_le(*w));
    }

    /// The bulk path: whole groups of blocks straight into `words`, the unaligned head and
    /// the short tail through a small buffer.
    #[cfg(target_arch = "x86_64")]
    fn fill_with(&self, kernel: simd::Kernel, first: u64, words: &mut [u64]) {
        let input = self.input_state();
        let group = kernel.group_words();
        let mut block = first / BLOCK_WORDS as u64;
        let mut skip = (first % BLOCK_WORDS as u64) as usize;
        let mut rest = words;
        let mut scratch = [0u64; simd::MAX_GROUP_WORDS];
        while !rest.is_empty() {
            if skip == 0 && rest.len() >= group {
                let whole = rest.len() / group * group;
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(whole);
                kernel.blocks(&input, block, head);
                block += (whole / BLOCK_WORDS) as u64;
                rest = tail;
            } else {
                let scratch = &mut scratch[..group];
                kernel.blocks(&input, block, scratch);
                let take = (group - skip).min(rest.len());
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(take);
                head.copy_from_slice(&scratch[skip..skip + take]);
                block += (group / BLOCK_WORDS) as u64;
                skip = 0;
                rest = tail;
            }
        }
    }

    /// ChaCha state words 0-11: the constants "expand 32-byte k" and the key, little-endian.
    #[cfg(target_arch = "x86_64")]
    fn input_state(&self) -> [u32; 12] {
        let mut state = [0u32; 12];
        state[..4].copy_from_slice(&[0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574]);
        for (word, bytes) in state[4..].iter_mut().zip(self.key.chunks_exact(4)) {
            *word = u32::from_le_bytes(bytes.try_into().expect("4 bytes"));
        }
        state
    }
}

/// The bytes of `words` in memory order (little-endian words on the targets we run on; the
/// caller converts from little-endian afterwards, a no-op there).
fn as_bytes(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: u8 has no alignment or validity requirements; the length is the same memory.
    unsafe {
        std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), std::mem::size_of_val(words))
    }
}

/// ChaCha8 block kernels for x86_64, `n` blocks side by side with state word `j` of block
/// `b` in lane `b` of vector `j`: the quarter rounds run on all blocks at once with no
/// shuffles, and one transpose at the end puts each block's 64 bytes in order.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// Words of the largest group (16 blocks of 8 words).
    pub const MAX_GROUP_WORDS: usize = 128;

    #[derive(Clone, Copy, Debug)]
    pub enum Kernel {
        Avx512,
        Avx2,
    }

    impl Kernel {
        /// The kernel for the instruction set in use; `None` for the baseline.
        #[inline]
        pub fn detect() -> Option<Self> {
            match crate::Isa::active() {
                crate::Isa::Avx512 => Some(Self::Avx512),
                crate::Isa::Avx2 => Some(Self::Avx2),
                crate::Isa::Baseline => None,
            }
        }

        /// Words per group of blocks made at once.
        pub fn group_words(self) -> usize {
            match self {
                Self::Avx512 => 128,
                Self::Avx2 => 64,
            }
        }

        /// Writes blocks `block, block + 1, ...` into `out`, a whole number of groups.
        pub fn blocks(self, input: &[u32; 12], block: u64, out: &mut [u64]) {
            assert!(out.len().is_multiple_of(self.group_words()));
            // SAFETY: `detect` follows `Isa::active`, never wider than the CPU; the kernels write
            // exactly `out`.
            unsafe {
                match self {
                    Self::Avx512 => avx512(input, block, out),
                    Self::Avx2 => avx2(input, block, out),
                }
            }
        }
    }

    /// 32-bit lane operations shared by both vector widths.
    trait Lanes: Copy {
        unsafe fn add(a: Self, b: Self) -> Self;
        unsafe fn xor(a: Self, b: Self) -> Self;
        unsafe fn rol<const L: i32, const R: i32>(a: Self) -> Self;
    }

    impl Lanes for __m512i {
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            // SAFETY: the caller runs only where `Isa::active` found AVX-512.
            unsafe { _mm512_add_epi32(a, b) }
        }
        #[inline(always)]
        unsafe fn xor(a: Self, b: Self) -> Self {
            // SAFETY: the caller runs only where `Isa::active` found AVX-512.
            unsafe { _mm512_xor_si512(a, b) }
        }
        #[inline(always)]
        unsafe fn rol<const L: i32, const R: i32>(a: Self) -> Self {
            // SAFETY: the caller runs only where `Isa::active` found AVX-512.
            unsafe { _mm512_rol_epi32::<L>(a) }
        }
    }

    impl Lanes for __m256i {
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            // SAFETY: the caller runs only where `Isa::active` found AVX2.
            unsafe { _mm256_add_epi32(a, b) }
        }
        #[inline(always)]
        unsafe fn xor(a: Self, b: Self) -> Self {
            // SAFETY: the caller runs only where `Isa::active` found AVX2.
            unsafe { _mm256_xor_si256(a, b) }
        }
        /// Byte-aligned rotations are one byte shuffle; the others two shifts and an or.
        #[inline(always)]
        unsafe fn rol<const L: i32, const R: i32>(a: Self) -> Self {
            // SAFETY: the caller runs only where `Isa::active` found AVX2.
            unsafe {
                match L {
                    16 => _mm256_shuffle_epi8(
                        a,
                        _mm256_set_epi8(
                            13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2, 13, 12, 15, 14,
                            9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2,
                        ),
                    ),
                    8 => _mm256_shuffle_epi8(
                        a,
                        _mm256_set_epi8(
                            14, 13, 12, 15, 10, 9, 8, 11, 6, 5, 4, 7, 2, 1, 0, 3, 14, 13, 12, 15,
                            10, 9, 8, 11, 6, 5, 4, 7, 2, 1, 0, 3,
                        ),
                    ),
                    _ => _mm256_or_si256(_mm256_slli_epi32::<L>(a), _mm256_srli_epi32::<R>(a)),
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn quarter<V: Lanes>(x: &mut [V; 16], a: usize, b: usize, c: usize, d: usize) {
        // SAFETY: the callers are the kernels, compiled for and run on CPUs with their vector
        // width (`Isa::active`).
        unsafe {
            x[a] = V::add(x[a], x[b]);
            x[d] = V::rol::<16, 16>(V::xor(x[d], x[a]));
            x[c] = V::add(x[c], x[d]);
            x[b] = V::rol::<12, 20>(V::xor(x[b], x[c]));
            x[a] = V::add(x[a], x[b]);
            x[d] = V::rol::<8, 24>(V::xor(x[d], x[a]));
            x[c] = V::add(x[c], x[d]);
            x[b] = V::rol::<7, 25>(V::xor(x[b], x[c]));
        }
    }

    /// ChaCha8: 4 double rounds, then the input state added back.
    #[inline(always)]
    unsafe fn chacha8<V: Lanes>(input: &[V; 16]) -> [V; 16] {
        let mut x = *input;
        // SAFETY: the callers are the kernels, compiled for and run on CPUs with their vector
        // width (`Isa::active`).
        unsafe {
            for _ in 0..4 {
                quarter(&mut x, 0, 4, 8, 12);
                quarter(&mut x, 1, 5, 9, 13);
                quarter(&mut x, 2, 6, 10, 14);
                quarter(&mut x, 3, 7, 11, 15);
                quarter(&mut x, 0, 5, 10, 15);
                quarter(&mut x, 1, 6, 11, 12);
                quarter(&mut x, 2, 7, 8, 13);
                quarter(&mut x, 3, 4, 9, 14);
            }
            for (word, start) in x.iter_mut().zip(input) {
                *word = V::add(*word, *start);
            }
        }
        x
    }

    /// The 64-bit block counters of `N` consecutive blocks, split into low and high words
    /// (state words 12 and 13).
    #[inline(always)]
    fn counters<const N: usize>(block: u64) -> ([u32; N], [u32; N]) {
        let mut low = [0u32; N];
        let mut high = [0u32; N];
        for lane in 0..N {
            let counter = block.wrapping_add(lane as u64);
            low[lane] = counter as u32;
            high[lane] = (counter >> 32) as u32;
        }
        (low, high)
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(input: &[u32; 12], mut block: u64, out: &mut [u64]) {
        let mut state = [_mm512_setzero_si512(); 16];
        for (lane, &word) in state.iter_mut().zip(input) {
            *lane = _mm512_set1_epi32(word as i32);
        }
        for group in out.chunks_exact_mut(128) {
            let (low, high) = counters::<16>(block);
            // SAFETY: reads 16 u32 from each array, writes 1024 bytes into `group`.
            unsafe {
                state[12] = _mm512_loadu_si512(low.as_ptr().cast());
                state[13] = _mm512_loadu_si512(high.as_ptr().cast());
                let x = chacha8(&state);
                // 16x16 transpose: 32-bit pairs, then 64-bit pairs within 128-bit lanes ...
                let mut t = [_mm512_setzero_si512(); 16];
                for k in 0..8 {
                    t[2 * k] = _mm512_unpacklo_epi32(x[2 * k], x[2 * k + 1]);
                    t[2 * k + 1] = _mm512_unpackhi_epi32(x[2 * k], x[2 * k + 1]);
                }
                let mut u = [_mm512_setzero_si512(); 16];
                for m in 0..4 {
                    u[4 * m] = _mm512_unpacklo_epi64(t[4 * m], t[4 * m + 2]);
                    u[4 * m + 1] = _mm512_unpackhi_epi64(t[4 * m], t[4 * m + 2]);
                    u[4 * m + 2] = _mm512_unpacklo_epi64(t[4 * m + 1], t[4 * m + 3]);
                    u[4 * m + 3] = _mm512_unpackhi_epi64(t[4 * m + 1], t[4 * m + 3]);
                }
                // ... now lane l of u[4m + r] is words 4m..4m+4 of block 4l + r; then the
                // 128-bit lanes of u[r], u[4 + r], u[8 + r], u[12 + r] are transposed.
                let ptr = group.as_mut_ptr().cast::<__m512i>();
                for r in 0..4 {
                    let p0 = _mm512_shuffle_i32x4::<0b01_00_01_00>(u[r], u[4 + r]);
                    let p1 = _mm512_shuffle_i32x4::<0b11_10_11_10>(u[r], u[4 + r]);
                    let p2 = _mm512_shuffle_i32x4::<0b01_00_01_00>(u[8 + r], u[12 + r]);
                    let p3 = _mm512_shuffle_i32x4::<0b11_10_11_10>(u[8 + r], u[12 + r]);
                    let blocks = [
                        _mm512_shuffle_i32x4::<0b10_00_10_00>(p0, p2),
                        _mm512_shuffle_i32x4::<0b11_01_11_01>(p0, p2),
                        _mm512_shuffle_i32x4::<0b10_00_10_00>(p1, p3),
                        _mm512_shuffle_i32x4::<0b11_01_11_01>(p1, p3),
                    ];
                    for (l, value) in blocks.into_iter().enumerate() {
                        _mm512_storeu_si512(ptr.add(4 * l + r).cast(), value);
                    }
                }
            }
            block = block.wrapping_add(16);
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn avx2(input: &[u32; 12], mut block: u64, out: &mut [u64]) {
        let mut state = [_mm256_setzero_si256(); 16];
        for (lane, &word) in state.iter_mut().zip(input) {
            *lane = _mm256_set1_epi32(word as i32);
        }
        for group in out.chunks_exact_mut(64) {
            let (low, high) = counters::<8>(block);
            // SAFETY: reads 8 u32 from each array, writes 512 bytes into `group`.
            unsafe {
                state[12] = _mm256_loadu_si256(low.as_ptr().cast());
                state[13] = _mm256_loadu_si256(high.as_ptr().cast());
                let x = chacha8(&state);
                let ptr = group.as_mut_ptr().cast::<__m256i>();
                // Two 8x8 transposes: words 0-7 and words 8-15 of the 8 blocks.
                for half in 0..2 {
                    let x = &x[8 * half..8 * half + 8];
                    let mut t = [_mm256_setzero_si256(); 8];
                    for k in 0..4 {
                        t[2 * k] = _mm256_unpacklo_epi32(x[2 * k], x[2 * k + 1]);
                        t[2 * k + 1] = _mm256_unpackhi_epi32(x[2 * k], x[2 * k + 1]);
                    }
                    // Lane l (128-bit) of u[4m + r] is words 4m..4m+4 of block 4l + r.
                    let mut u = [_mm256_setzero_si256(); 8];
                    for m in 0..2 {
                        u[4 * m] = _mm256_unpacklo_epi64(t[4 * m], t[4 * m + 2]);
                        u[4 * m + 1] = _mm256_unpackhi_epi64(t[4 * m], t[4 * m + 2]);
                        u[4 * m + 2] = _mm256_unpacklo_epi64(t[4 * m + 1], t[4 * m + 3]);
                        u[4 * m + 3] = _mm256_unpackhi_epi64(t[4 * m + 1], t[4 * m + 3]);
                    }
                    for r in 0..4 {
                        let low = _mm256_permute2x128_si256::<0x20>(u[r], u[4 + r]);
                        let high = _mm256_permute2x128_si256::<0x31>(u[r], u[4 + r]);
                        _mm256_storeu_si256(ptr.add(2 * r + half), low);
                        _mm256_storeu_si256(ptr.add(2 * (4 + r) + half), high);
                    }
                }
            }
            block = block.wrapping_add(8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Words straight from the spec's reference: `set_word_pos(2i)` then `next_u64()`.
    fn reference(stream: &Keystream, first: u64, n: usize) -> Vec<u64> {
        let mut rng = ChaCha8Rng::from_seed(stream.key);
        rng.set_word_pos(u128::from(first) * 2);
        (0..n).map(|_| rng.next_u64()).collect()
    }

    type Fill = Box<dyn Fn(&Keystream, u64, &mut [u64])>;

    /// Every way of filling this CPU can run.
    fn fills() -> Vec<(&'static str, Fill)> {
        let mut fills: Vec<(&'static str, Fill)> = vec![
            ("dispatch", Box::new(|s, first, w| s.fill(first, w))),
            (
                "portable",
                Box::new(|s, first, w| s.fill_portable(first, w)),
            ),
        ];
        #[cfg(target_arch = "x86_64")]
        {
            use simd::Kernel;
            if is_x86_feature_detected!("avx2") {
                fills.push(("avx2", Box::new(|s, f, w| s.fill_with(Kernel::Avx2, f, w))));
            }
            if is_x86_feature_detected!("avx512f") {
                fills.push((
                    "avx512",
                    Box::new(|s, f, w| s.fill_with(Kernel::Avx512, f, w)),
                ));
            }
        }
        fills
    }

    #[test]
    fn every_fill_matches_the_reference_rng() {
        let stream = Keystream::new(42, "fc1.weight");
        // Offsets around group boundaries, lengths from 0 to several groups, and counters
        // that cross the 32-bit boundary between state words 12 and 13.
        let starts = [
            0u64,
            1,
            7,
            8,
            9,
            63,
            64,
            127,
            128,
            129,
            1000,
            (1 << 35) - 13,
        ];
        for (name, fill) in fills() {
            for first in starts {
                for n in [
                    0usize, 1, 2, 7, 8, 9, 64, 65, 127, 128, 129, 255, 256, 300, 1031,
                ] {
                    let mut words = vec![0u64; n];
                    fill(&stream, first, &mut words);
                    let want = reference(&stream, first, n);
                    assert_eq!(words, want, "{name}: first {first}, n {n}");
                }
            }
        }
    }

    #[test]
    fn any_range_matches_the_sequential_stream() {
        let stream = Keystream::new(42, "fc1.weight");
        let mut all = vec![0u64; 100];
        stream.fill(0, &mut all);
        for start in [0usize, 1, 7, 8, 31, 64] {
            let mut part = vec![0u64; 100 - start];
            stream.fill(start as u64, &mut part);
            assert_eq!(part, all[start..]);
        }
    }

    #[test]
    fn seed_and_name_both_key_the_stream() {
        let word = |seed, name| {
            let mut w = [0u64; 1];
            Keystream::new(seed, name).fill(0, &mut w);
            w[0]
        };
        assert_ne!(word(1, "a"), word(2, "a"));
        assert_ne!(word(1, "a"), word(1, "b"));
        assert_eq!(word(1, "a"), word(1, "a"));
    }
}
