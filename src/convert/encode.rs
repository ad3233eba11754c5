//! Encode stage: quantized bytes -> stored bytes, one codec per part.
//!
//! In: expert segments (WEIGHTS and AUX parts) and dense tensors, as decoded bytes, and the
//! `--codec` choice. Out: the stored bytes and the codec id of each part.
//! Invariants: codecs are pure byte transforms (`crate::codec`), chosen by size only, so the
//! output is deterministic; a part is stored raw whenever coding does not make it smaller.
//! One [`Encoder`] per rayon worker reuses its scratch buffer.

use crate::codec::{encode, encode_auto, Codec, CodecChoice, CodecError, CodecId};
use crate::convert::quantize::QuantizedExpertSegment;
use crate::convert::tensor::FloatDtype;
use crate::format::{ProjBits, QuantMode};

/// Encodes parts with one codec choice, reusing scratch space.
pub struct Encoder {
    choice: CodecChoice,
    scratch: Vec<u8>,
}

impl Encoder {
    pub fn new(choice: CodecChoice) -> Encoder {
        Encoder {
            choice,
            scratch: Vec::new(),
        }
    }

    /// Stored bytes of `src` (codes of `bits` bits, or 16/32 for scale and float bytes).
    /// Raw parts are moved, not copied.
    pub fn encode(&mut self, bits: u8, src: Vec<u8>) -> Result<(Vec<u8>, CodecId), CodecError> {
        self.encode_with(self.choice, bits, src)
    }

    fn encode_with(
        &mut self,
        choice: CodecChoice,
        bits: u8,
        src: Vec<u8>,
    ) -> Result<(Vec<u8>, CodecId), CodecError> {
        if choice == CodecChoice::Fixed(Codec::Raw) {
            return Ok((src, CodecId::Raw));
        }
        let mut out = Vec::with_capacity(src.len() / 2);
        let id = match choice {
            CodecChoice::Fixed(c) => encode(c, bits, &src, &mut out)?,
            CodecChoice::Auto(policy) => {
                encode_auto(bits, &src, &mut out, &policy, &mut self.scratch)?
            }
        };
        Ok(if id == CodecId::Raw {
            (src, id)
        } else {
            (out, id)
        })
    }

    /// Encodes both parts of a segment. Under `auto`, with the bar of expert segments
    /// ([`crate::codec::AutoPolicy::for_experts`]): a miss decodes on the critical path.
    pub fn segment(&mut self, seg: QuantizedExpertSegment) -> Result<EncodedSegment, CodecError> {
        let choice = match self.choice {
            CodecChoice::Auto(policy) => CodecChoice::Auto(policy.for_experts()),
            fixed => fixed,
        };
        let (weights_len, aux_len) = (seg.weights.len(), seg.aux.len());
        let aux_bits = match seg.scale_dtype {
            _ if !seg.mode.has_biases() => 8,
            FloatDtype::F32 => 32,
            FloatDtype::F16 | FloatDtype::Bf16 => 16,
        };
        let QuantizedExpertSegment { weights, aux, .. } = seg;
        let (weights, weight_codec) = self.encode_with(choice, seg.bits.max(), weights)?;
        let (aux, aux_codec) = self.encode_with(choice, aux_bits, aux)?;
        Ok(EncodedSegment {
            layer: seg.layer,
            expert: seg.expert,
            segment: seg.segment,
            segment_count: seg.segment_count,
            row_start: seg.row_start,
            row_count: seg.row_count,
            bits: seg.bits,
            group_size: seg.group_size,
            scale_dtype: seg.scale_dtype,
            mode: seg.mode,
            bias_dtype: seg.bias_dtype,
            weights,
            aux,
            weight_codec,
            aux_codec,
            decoded_len: weights_len + aux_len,
        })
    }
}

/// A segment ready for the writer.
#[derive(Clone, Debug)]
pub struct EncodedSegment {
    pub layer: usize,
    pub expert: usize,
    pub segment: usize,
    pub segment_count: usize,
    pub row_start: usize,
    pub row_count: usize,
    pub bits: ProjBits,
    pub group_size: usize,
    pub scale_dtype: FloatDtype,
    pub mode: QuantMode,
    pub bias_dtype: Option<FloatDtype>,
    pub weights: Vec<u8>,
    pub aux: Vec<u8>,
    pub weight_codec: CodecId,
    pub aux_codec: CodecId,
    /// Decoded bytes of both parts.
    pub decoded_len: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{AutoPolicy, Decoder};

    #[test]
    fn raw_moves_and_auto_round_trips() {
        // Skewed 4-bit codes: Huffman must win over raw and decode back exactly.
        let src: Vec<u8> = (0..65536u32)
            .map(|i| if i % 7 == 0 { 0x12 } else { 0x88 })
            .collect();
        let (raw, id) = Encoder::new(CodecChoice::Fixed(Codec::Raw))
            .encode(4, src.clone())
            .unwrap();
        assert_eq!((raw.as_slice(), id), (src.as_slice(), CodecId::Raw));
        let (stored, id) = Encoder::new(CodecChoice::Auto(AutoPolicy::default()))
            .encode(4, src.clone())
            .unwrap();
        assert_ne!(id, CodecId::Raw);
        assert!(stored.len() < src.len() / 2);
        let mut back = vec![0u8; src.len()];
        Decoder::new().decode_into(id, &stored, &mut back).unwrap();
        assert_eq!(back, src);
    }

    #[test]
    fn auto_keeps_expert_codes_raw_unless_coding_saves_a_quarter() {
        // 4-bit codes of Gaussian-like weights (a bell over 16 levels): Huffman saves a few
        // percent, which a dense tensor keeps and an expert (decoded on each miss) does not.
        let mut x = 1u64;
        let mut nibble = || {
            let mut sum = 0u64;
            for _ in 0..5 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                sum += x >> 62;
            }
            sum as u8 // 0..=15, a binomial bell with sigma 2.5
        };
        let bell: Vec<u8> = (0..65536).map(|_| nibble() | nibble() << 4).collect();
        let policy = AutoPolicy::default();
        let mut e = Encoder::new(CodecChoice::Auto(policy));
        let (dense, dense_id) = e.encode(4, bell.clone()).unwrap();
        assert_eq!(dense_id, CodecId::Huffman);
        let saving = 1.0 - dense.len() as f64 / bell.len() as f64;
        assert!(
            saving > 0.01 && saving < crate::codec::EXPERT_MIN_SAVING,
            "{saving}"
        );
        let mut ex = Encoder::new(CodecChoice::Auto(policy.for_experts()));
        assert_eq!(ex.encode(4, bell).unwrap().1, CodecId::Raw);
        // Codes that Huffman halves are still coded.
        let skewed: Vec<u8> = (0..65536u32)
            .map(|i| if i % 7 == 0 { 0x12 } else { 0x88 })
            .collect();
        assert_ne!(ex.encode(4, skewed).unwrap().1, CodecId::Raw);
    }
}
