//! A tensor's output in aligned blocks of [`BLOCK_BYTES`] (the last one shorter), hashed
//! block by block as BLAKE3 subtrees (a power-of-two run of 1 KiB chunks at a power-of-two
//! offset is a subtree of the tensor's tree) and put together in order with [`Tree`]: how
//! the service, the in-process generation and the clients make and check the same digests
//! in parallel, with memory bounded by the blocks in flight.

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root,
};

use crate::TensorPlan;

/// Output bytes per generation job: a power of two, so blocks are BLAKE3 subtrees, and a
/// multiple of every element size, so no element straddles two blocks. 1 MiB keeps a job's
/// output in the L2 cache between generating and hashing it, and the stream's memory small.
pub const BLOCK_BYTES: usize = 1 << 20;

/// Output made at once for a transposing view (a whole number of blocks): its tiles then span
/// many rows, so its columns are generated as long keystream runs rather than scattered
/// elements (a Keras conv kernel's first 1 MiB block alone would need every 9th element of
/// the torch-layout tensor). Split across the workers by columns, then put together.
pub const PANEL_BYTES: u64 = 32 << 20;

/// One block's hash.
pub enum BlockHash {
    /// The whole tensor fits in one block: its BLAKE3 hash.
    Root(blake3::Hash),
    /// One block of several: its subtree's chaining value.
    Subtree(ChainingValue),
}

impl BlockHash {
    /// The hashes of the blocks of `data`, which starts at `offset` (a block boundary) of a
    /// `total`-byte tensor.
    pub fn of_blocks(total: u64, offset: u64, data: &[u8]) -> Vec<Self> {
        let starts = (offset..).step_by(BLOCK_BYTES);
        data.chunks(BLOCK_BYTES)
            .zip(starts)
            .map(|(part, start)| Self::of(total, start, part))
            .collect()
    }

    /// The hash of `data`, the block at `offset` of a `total`-byte tensor cut into
    /// [`BLOCK_BYTES`] blocks.
    pub fn of(total: u64, offset: u64, data: &[u8]) -> Self {
        if total <= BLOCK_BYTES as u64 {
            Self::Root(blake3::hash(data))
        } else {
            let mut hasher = blake3::Hasher::new();
            hasher.set_input_offset(offset).update(data);
            Self::Subtree(hasher.finalize_non_root())
        }
    }
}

/// Bytes per job for a transposing view made by rows ([`TensorPlan::row_batch`]): whole blocks
/// that hold a batch of rows, so that a job generates its columns as long keystream runs and
/// writes them straight in output order, where hashing finds them still in cache. `None` for
/// other tensors (one block per job), and for views made in panels.
pub fn row_job_bytes(tensor: &TensorPlan) -> Option<usize> {
    let rows = tensor.row_batch()?;
    let bytes = rows * tensor.tile_columns()? * tensor.dtype.size() as u64;
    let bytes = bytes.next_multiple_of(BLOCK_BYTES as u64);
    (bytes <= PANEL_BYTES).then_some(bytes as usize)
}

/// A tensor's BLAKE3 hash put together from its blocks' hashes, pushed in order.
pub struct Tree {
    blocks: u64,
    stack: Vec<(ChainingValue, u64)>,
    root: Option<blake3::Hash>,
}

impl Tree {
    pub fn new(blocks: u64) -> Self {
        Self {
            blocks,
            stack: Vec::new(),
            root: None,
        }
    }

    pub fn push(&mut self, hash: BlockHash) {
        let mut cv = match hash {
            BlockHash::Root(root) => {
                debug_assert_eq!(self.blocks, 1);
                self.root = Some(root);
                return;
            }
            BlockHash::Subtree(cv) => cv,
        };
        let mut size = 1;
        while let Some(&(left, left_size)) = self.stack.last() {
            if left_size != size || 2 * size == self.blocks {
                break;
            }
            self.stack.pop();
            cv = merge_subtrees_non_root(&left, &cv, Mode::Hash);
            size *= 2;
        }
        self.stack.push((cv, size));
    }

    /// The tensor's BLAKE3 hash, once every block is in.
    pub fn root(mut self) -> blake3::Hash {
        if let Some(root) = self.root {
            return root;
        }
        let Some((mut right, _)) = self.stack.pop() else {
            return blake3::hash(&[]);
        };
        while let Some((left, _)) = self.stack.pop() {
            if self.stack.is_empty() {
                return merge_subtrees_root(&left, &right, Mode::Hash);
            }
            right = merge_subtrees_non_root(&left, &right, Mode::Hash);
        }
        unreachable!("a tensor of several blocks has a root with two children")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tree's root over `data` cut into blocks exactly as the pipeline cuts it.
    fn tree_hash(data: &[u8], block: usize) -> blake3::Hash {
        let blocks = data.len().div_ceil(block) as u64;
        let mut tree = Tree::new(blocks);
        for (i, part) in data.chunks(block).enumerate() {
            let hash = if blocks == 1 {
                BlockHash::Root(blake3::hash(part))
            } else {
                let mut hasher = blake3::Hasher::new();
                hasher.set_input_offset((i * block) as u64).update(part);
                BlockHash::Subtree(hasher.finalize_non_root())
            };
            tree.push(hash);
        }
        tree.root()
    }

    #[test]
    fn the_tree_of_blocks_is_blake3() {
        let data: Vec<u8> = (0..48u32 << 10).map(|i| (i * 31 + i / 251) as u8).collect();
        // Blocks of 1 and 4 KiB: lengths 0, one element, around block boundaries, many
        // blocks (every count up to 10 blocks), odd sizes.
        for block in [1024usize, 4096] {
            let mut lengths = vec![0usize, 1, 2, 4, 8, 1023, 1024, 1025, 4095, 4096, 4097];
            for blocks in 2..=10 {
                lengths.extend([blocks * block - 2, blocks * block, blocks * block + 3]);
            }
            lengths.extend([40 << 10, (40 << 10) - 7, 12345, 33333]);
            for len in lengths {
                let data = &data[..len];
                assert_eq!(tree_hash(data, block), blake3::hash(data), "{len} bytes");
            }
        }
    }
}
