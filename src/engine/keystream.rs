//! The per-tensor random source: ChaCha8 keyed by SHA-256 of the seed and the tensor's name.
//!
//! Word `i` of a tensor is the little-endian u64 at keystream bytes `[8i, 8i + 8)`, so any
//! range of words can be produced on its own, in any order, on any thread.

use chacha20::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

/// Domain separator of algorithm v1, NUL-terminated so no name can extend it.
const DOMAIN_V1: &[u8] = b"weightinit-v1\0";

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
        let mut rng = ChaCha8Rng::from_seed(self.key);
        // The RNG counts 32-bit words; a u64 word is two of them.
        rng.set_word_pos(u128::from(first) * 2);
        for word in words {
            *word = rng.next_u64();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
