//! Length-limited Huffman code lengths (package-merge) and canonical code assignment.
//!
//! In: 256 symbol frequencies and a length limit. Out: one code length per symbol (0 = unused).
//! Invariant: the lengths form a complete prefix code (Kraft sum exactly 1) over at least two
//! symbols, none longer than the limit, and they minimise the coded size among all such codes
//! (package-merge is optimal, not a heuristic). Ties are broken by symbol value, so the same
//! frequencies always give the same lengths (deterministic output).

use super::{MAX_CODE_LEN, SYMBOLS};

/// An item of the package-merge lists: a leaf (one symbol) or a package of two earlier items.
#[derive(Clone, Copy)]
enum Node {
    Leaf(u8),
    Package(u32, u32),
}

/// Optimal code lengths, each at most `limit` (1..=MAX_CODE_LEN), for `freq`.
///
/// Symbols with zero frequency get length 0, except that when fewer than two symbols occur a
/// zero-frequency partner (the lowest unused symbol) is given length 1 so the code stays complete;
/// a complete code lets the decoder fill every table slot, so no bit pattern is invalid.
pub fn code_lengths(freq: &[u64; SYMBOLS], limit: u8) -> [u8; SYMBOLS] {
    debug_assert!((1..=MAX_CODE_LEN).contains(&limit));
    let mut lens = [0u8; SYMBOLS];
    let mut leaves: Vec<(u64, u8)> = (0..SYMBOLS)
        .filter(|&s| freq[s] > 0)
        .map(|s| (freq[s], s as u8))
        .collect();
    if leaves.len() < 2 {
        // Degenerate alphabet: one (or no) real symbol plus a partner, both one bit long.
        let real = leaves.first().map_or(0, |&(_, s)| s as usize);
        let partner = usize::from(real == 0);
        lens[real] = 1;
        lens[partner] = 1;
        return lens;
    }
    leaves.sort_unstable();
    let n = leaves.len();

    let mut nodes: Vec<Node> = leaves.iter().map(|&(_, s)| Node::Leaf(s)).collect();
    // Each list holds (weight, node index), sorted by weight; leaves first on equal weight.
    let leaf_list: Vec<(u64, u32)> = leaves
        .iter()
        .enumerate()
        .map(|(i, &(w, _))| (w, i as u32))
        .collect();
    let mut list = leaf_list.clone();
    for _ in 1..limit {
        let mut merged = Vec::with_capacity(leaf_list.len() + list.len() / 2);
        let mut packages = list.chunks_exact(2).map(|pair| {
            let idx = nodes.len() as u32;
            nodes.push(Node::Package(pair[0].1, pair[1].1));
            (pair[0].0 + pair[1].0, idx)
        });
        let mut li = leaf_list.iter().copied().peekable();
        let mut next_pkg = packages.next();
        loop {
            match (li.peek().copied(), next_pkg) {
                (Some(l), Some(p)) if l.0 <= p.0 => {
                    merged.push(l);
                    li.next();
                }
                (_, Some(p)) => {
                    merged.push(p);
                    next_pkg = packages.next();
                }
                (Some(l), None) => {
                    merged.push(l);
                    li.next();
                }
                (None, None) => break,
            }
        }
        drop(packages);
        list = merged;
    }
    // The first 2n-2 items of the last list; each leaf occurrence adds one bit to its symbol.
    let mut stack: Vec<u32> = list.iter().take(2 * n - 2).map(|&(_, i)| i).collect();
    while let Some(i) = stack.pop() {
        match nodes[i as usize] {
            Node::Leaf(s) => lens[s as usize] += 1,
            Node::Package(a, b) => {
                stack.push(a);
                stack.push(b);
            }
        }
    }
    lens
}

/// Canonical codes for `lens` (shorter codes first, then by symbol), bit-reversed so that the
/// first bit of each code is the least significant: the order an LSB-first reader sees.
pub fn canonical_codes_reversed(lens: &[u8; SYMBOLS]) -> [u16; SYMBOLS] {
    let mut count = [0u32; MAX_CODE_LEN as usize + 1];
    for &l in lens.iter() {
        count[l as usize] += 1;
    }
    count[0] = 0;
    let mut next = [0u32; MAX_CODE_LEN as usize + 2];
    let mut code = 0u32;
    for l in 1..=MAX_CODE_LEN as usize {
        code = (code + count[l - 1]) << 1;
        next[l] = code;
    }
    let mut codes = [0u16; SYMBOLS];
    for s in 0..SYMBOLS {
        let l = lens[s] as u32;
        if l > 0 {
            let c = next[l as usize];
            next[l as usize] += 1;
            // Left-align to 11 bits, then reverse all 11: the code's first bit lands in bit 0.
            codes[s] = REVERSE_11[(c << (MAX_CODE_LEN as u32 - l)) as usize];
        }
    }
    codes
}

/// `REVERSE_11[x]` is `x` with its low 11 bits in reverse order: one load instead of the dozen
/// instructions a general bit reversal takes on x86-64 (run once per symbol per segment).
static REVERSE_11: [u16; 1 << MAX_CODE_LEN] = {
    let mut t = [0u16; 1 << MAX_CODE_LEN];
    let mut x = 0;
    while x < t.len() {
        t[x] = ((x as u32).reverse_bits() >> (32 - MAX_CODE_LEN as u32)) as u16;
        x += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;

    fn kraft(lens: &[u8; SYMBOLS]) -> u64 {
        lens.iter()
            .filter(|&&l| l > 0)
            .map(|&l| 1u64 << (MAX_CODE_LEN - l))
            .sum()
    }

    #[test]
    fn complete_and_limited_on_skewed_input() {
        // Fibonacci frequencies force unlimited Huffman codes far past 11 bits.
        let mut freq = [0u64; SYMBOLS];
        let (mut a, mut b) = (1u64, 1u64);
        for f in freq.iter_mut().take(40) {
            *f = a;
            (a, b) = (b, a + b);
        }
        let lens = code_lengths(&freq, MAX_CODE_LEN);
        assert_eq!(kraft(&lens), 1 << MAX_CODE_LEN);
        assert!(lens.iter().all(|&l| l <= MAX_CODE_LEN));
        assert_eq!(lens.iter().filter(|&&l| l > 0).count(), 40);
    }

    #[test]
    fn matches_huffman_when_limit_not_binding() {
        // Frequencies 1,1,2,4: the optimal code has lengths 3,3,2,1.
        let mut freq = [0u64; SYMBOLS];
        freq[10] = 1;
        freq[11] = 1;
        freq[12] = 2;
        freq[13] = 4;
        let lens = code_lengths(&freq, MAX_CODE_LEN);
        assert_eq!(&lens[10..14], &[3, 3, 2, 1]);
    }

    /// Textbook Huffman (no length limit) with a binary heap: the reference for optimality.
    fn huffman_cost(freq: &[u64]) -> (u64, u8) {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let mut heap: BinaryHeap<Reverse<(u64, u8)>> = freq
            .iter()
            .filter(|&&f| f > 0)
            .map(|&f| Reverse((f, 0)))
            .collect();
        let (mut cost, mut depth) = (0u64, 0u8);
        while heap.len() > 1 {
            let Reverse((a, da)) = heap.pop().unwrap();
            let Reverse((b, db)) = heap.pop().unwrap();
            cost += a + b; // every merge adds one bit to each symbol below it
            let d = da.max(db) + 1;
            depth = depth.max(d);
            heap.push(Reverse((a + b, d)));
        }
        (cost, depth)
    }

    #[test]
    fn optimal_when_the_limit_does_not_bind() {
        // Pseudo-random bell-shaped frequencies over all 256 symbols, as on quantized weights.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..50 {
            let mut freq = [0u64; SYMBOLS];
            for f in freq.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *f = x % 1000 + 1;
            }
            for (s, f) in freq.iter_mut().enumerate() {
                let d = (s as i64 - 128).unsigned_abs();
                *f = *f * 64 / (1 + d / 16);
            }
            let (best, depth) = huffman_cost(&freq);
            let lens = code_lengths(&freq, MAX_CODE_LEN);
            let cost: u64 = (0..SYMBOLS).map(|s| freq[s] * lens[s] as u64).sum();
            if depth <= MAX_CODE_LEN {
                assert_eq!(cost, best);
            } else {
                assert!(cost >= best);
            }
        }
    }

    #[test]
    fn single_symbol_gets_a_partner() {
        let mut freq = [0u64; SYMBOLS];
        freq[0] = 100;
        let lens = code_lengths(&freq, MAX_CODE_LEN);
        assert_eq!(lens[0], 1);
        assert_eq!(lens[1], 1);
        assert_eq!(kraft(&lens), 1 << MAX_CODE_LEN);
    }

    #[test]
    fn canonical_codes_are_prefix_free() {
        let mut freq = [0u64; SYMBOLS];
        for (s, f) in freq.iter_mut().enumerate() {
            *f = (s as u64 % 17) * (s as u64 % 5) + 1;
        }
        let lens = code_lengths(&freq, MAX_CODE_LEN);
        let codes = canonical_codes_reversed(&lens);
        for a in 0..SYMBOLS {
            for b in 0..SYMBOLS {
                if a == b || lens[a] == 0 || lens[b] == 0 || lens[a] > lens[b] {
                    continue;
                }
                let mask = (1u16 << lens[a]) - 1;
                assert_ne!(codes[b] & mask, codes[a], "{a} is a prefix of {b}");
            }
        }
    }
}
