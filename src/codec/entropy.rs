//! Order-0 entropy of packed quantization codes: the bound a per-segment symbol coder is judged by.
//!
//! In: MLX packed bytes and the code width. Out: the Shannon bound in bits for coding each code
//! independently with one ideal model for the whole buffer. Widths 2, 4 and 8 split bytes into
//! codes (first code in the lowest bits); other widths (scales, biases) are measured per byte.

/// Total order-0 entropy, in bits, of the `bits`-wide codes packed in `data`.
pub fn code_entropy_bits(bits: u8, data: &[u8]) -> f64 {
    let mut hist = [0u64; 256];
    let (width, per_byte) = match bits {
        2 => (2u32, 4u32),
        4 => (4, 2),
        _ => (8, 1),
    };
    let mask = ((1u32 << width) - 1) as u8;
    for &b in data {
        for k in 0..per_byte {
            hist[((b >> (k * width)) & mask) as usize] += 1;
        }
    }
    entropy_of(&hist)
}

/// Order-0 entropy of the bytes themselves, in bits (for a byte-symbol coder this is the bound).
pub fn byte_entropy_bits(data: &[u8]) -> f64 {
    let mut hist = [0u64; 256];
    for &b in data {
        hist[b as usize] += 1;
    }
    entropy_of(&hist)
}

fn entropy_of(hist: &[u64]) -> f64 {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let t = total as f64;
    hist.iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let c = c as f64;
            -c * (c / t).log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_nibbles_are_four_bits() {
        // Every byte value once: each nibble value appears 32 times, so 4 bits per code exactly.
        let data: Vec<u8> = (0..=255u8).collect();
        let h = code_entropy_bits(4, &data);
        assert!((h - 512.0 * 4.0).abs() < 1e-9, "{h}");
    }

    #[test]
    fn two_bit_codes_split_lowest_first() {
        // 0b11_10_01_00: codes 0,1,2,3 once each per byte -> 2 bits per code.
        let data = [0b1110_0100u8; 16];
        assert!((code_entropy_bits(2, &data) - 64.0 * 2.0).abs() < 1e-9);
        // The byte view sees one value only.
        assert_eq!(byte_entropy_bits(&data), 0.0);
    }
}
