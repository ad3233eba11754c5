//! The BLAKE3 checksum of a segment whose parts arrive out of order.
//!
//! BLAKE3 is a tree hash: with parts of a power-of-two size (at least one 1 KiB chunk), each
//! part of a longer input is a whole subtree, so it can be hashed alone, on the thread whose
//! read brought it in, and the subtrees merged at the end. A lone Huffman miss is read in an
//! order that suits its decoder, not the segment's (`run::experts::load_segment_huffman`), and
//! this keeps its checksum off the critical path all the same. The digest is exactly
//! `blake3::hash` of the whole segment (tested below), which is what the pack stores.

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};
use std::sync::Mutex;

/// Chaining values of a segment's parts, filled in as they arrive.
pub struct PartHash {
    part: usize,
    len: usize,
    cvs: Mutex<Vec<Option<ChainingValue>>>,
}

impl PartHash {
    /// For a segment of `len` bytes in parts of `part` bytes; `None` when the parts are not
    /// subtrees (a part size that is not a power of two of at least 1 KiB) or there is only one.
    pub fn new(len: usize, part: usize) -> Option<PartHash> {
        if !part.is_power_of_two() || part < blake3::CHUNK_LEN || len <= part {
            return None;
        }
        Some(PartHash {
            part,
            len,
            cvs: Mutex::new(vec![None; len.div_ceil(part)]),
        })
    }

    /// Hashes the parts inside `from..to`, whose bytes are `bytes`. Returns false, hashing
    /// nothing, unless the range starts on a part boundary and ends on one or at the end.
    pub fn add(&self, from: usize, to: usize, bytes: &[u8]) -> bool {
        let (p, len) = (self.part, self.len);
        if from % p != 0 || (to % p != 0 && to != len) || to > len || bytes.len() != to - from {
            return false;
        }
        let mut out = Vec::new();
        for at in (from..to).step_by(p) {
            let end = (at + p).min(to);
            let cv = blake3::Hasher::new()
                .set_input_offset(at as u64)
                .update(&bytes[at - from..end - from])
                .finalize_non_root();
            out.push((at / p, cv));
        }
        let mut cvs = self.cvs.lock().unwrap_or_else(|e| e.into_inner());
        for (i, cv) in out {
            cvs[i] = Some(cv);
        }
        true
    }

    /// The segment's digest, once every part was added (`None` before).
    pub fn finalize(&self) -> Option<blake3::Hash> {
        let cvs = self.cvs.lock().unwrap_or_else(|e| e.into_inner());
        if cvs.iter().any(Option::is_none) {
            return None;
        }
        // The root has two children: split as BLAKE3 splits (the left subtree is the largest
        // power-of-two number of chunks below the length), then recurse on each side.
        let split = left_subtree_len(self.len as u64) as usize;
        let left = self.node(&cvs, 0, split);
        let right = self.node(&cvs, split, self.len);
        Some(merge_subtrees_root(&left, &right, Mode::Hash))
    }

    /// The chaining value of the subtree over `a..b` (`a` a multiple of the part size, so every
    /// split below lands on a part boundary).
    fn node(&self, cvs: &[Option<ChainingValue>], a: usize, b: usize) -> ChainingValue {
        if b - a <= self.part {
            return cvs[a / self.part].expect("checked by finalize");
        }
        let split = a + left_subtree_len((b - a) as u64) as usize;
        let left = self.node(cvs, a, split);
        let right = self.node(cvs, split, b);
        merge_subtrees_non_root(&left, &right, Mode::Hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 977) as u8).collect()
    }

    #[test]
    fn parts_in_any_order_give_the_whole_hash() {
        for (len, part) in [
            (4096 + 1, 4096),
            (3 * 4096, 4096),
            (2_646_016, 65536),
            (2_646_017, 131072),
            (1 << 20, 1 << 18),
            (5 * 1024 + 3, 1024),
        ] {
            let data = bytes(len);
            let h = PartHash::new(len, part).expect("several parts");
            let parts = len.div_ceil(part);
            // Last part first, then the others from the back, two at a time where they fit.
            let mut order: Vec<usize> = (0..parts).rev().collect();
            order.rotate_left(1);
            assert!(h.finalize().is_none() || parts == 0);
            for &i in &order {
                let (a, b) = (i * part, ((i + 1) * part).min(len));
                assert!(h.add(a, b, &data[a..b]));
            }
            assert_eq!(
                h.finalize(),
                Some(blake3::hash(&data)),
                "len {len} part {part}"
            );
            // The same through ranges of several parts.
            let h = PartHash::new(len, part).unwrap();
            let mid = (parts / 2) * part;
            assert!(h.add(mid, len, &data[mid..]));
            assert!(h.finalize().is_none() || mid == 0);
            assert!(h.add(0, mid, &data[..mid]) || mid == 0);
            assert_eq!(h.finalize(), Some(blake3::hash(&data)));
        }
    }

    #[test]
    fn ranges_off_the_part_grid_and_unusable_sizes_are_refused() {
        assert!(PartHash::new(10_000, 3000).is_none());
        assert!(PartHash::new(10_000, 512).is_none());
        assert!(PartHash::new(4096, 4096).is_none());
        let data = bytes(10_000);
        let h = PartHash::new(10_000, 4096).unwrap();
        assert!(!h.add(100, 4096, &data[100..4096]));
        assert!(!h.add(0, 5000, &data[..5000]));
        assert!(h.add(8192, 10_000, &data[8192..]));
        assert!(h.finalize().is_none());
    }
}
