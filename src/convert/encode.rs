//! Encode stage: quantized bytes -> stored bytes, one codec per part.
//!
//! In: expert segments (WEIGHTS and AUX parts) and dense tensors, as decoded bytes, and the
//! `--codec` choice. Out: the stored bytes and the codec id of each part.
//! Invariants: codecs are pure byte transforms (`crate::codec`), chosen by size only, so the
//! output is deterministic; a part is stored raw whenever coding does not make it smaller.
//! One [`Encoder`] per rayon worker reuses its scratch buffer.

use crate::codec::{encode, AutoPolicy, Codec, CodecChoice, CodecError, CodecId};
use crate::convert::quantize::QuantizedExpertSegment;
use crate::convert::tensor::FloatDtype;

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
        if self.choice == CodecChoice::Fixed(Codec::Raw) {
            return Ok((src, CodecId::Raw));
        }
        let mut out = Vec::with_capacity(src.len() / 2);
        let id = match self.choice {
            CodecChoice::Fixed(c) => encode(c, bits, &src, &mut out)?,
            CodecChoice::Auto(policy) => return self.auto(bits, src, &policy),
        };
        Ok(if id == CodecId::Raw {
            (src, id)
        } else {
            (out, id)
        })
    }

    /// `codec::encode_auto`'s choice without its final re-encode of the winner: every
    /// candidate is encoded once into its own buffer and the winner's buffer is kept. The rule
    /// is the same (smallest of Huffman and lz4, zstd only when `policy` enables it and it beats
    /// them by `zstd_min_advantage`, raw unless the saving reaches `min_saving`), and since
    /// encoding is deterministic the bytes are identical; Huffman encoding is the costliest
    /// step of a conversion after quantization, so doing it once matters.
    fn auto(
        &mut self,
        bits: u8,
        src: Vec<u8>,
        policy: &AutoPolicy,
    ) -> Result<(Vec<u8>, CodecId), CodecError> {
        let mut best: Option<(Vec<u8>, CodecId)> = None;
        let mut consider = |codec: Codec, scratch: &mut Vec<u8>| -> Result<(), CodecError> {
            scratch.clear();
            let id = encode(codec, bits, &src, scratch)?;
            if id != codec.id() {
                return Ok(()); // stored raw: not a candidate
            }
            let bar = match (&best, codec) {
                (None, _) => usize::MAX as f64,
                (Some((b, _)), Codec::Zstd { .. }) => {
                    b.len() as f64 * (1.0 - policy.zstd_min_advantage)
                }
                (Some((b, _)), _) => b.len() as f64,
            };
            if (scratch.len() as f64) < bar {
                let buf = std::mem::take(scratch);
                if let Some((old, _)) = best.replace((buf, id)) {
                    *scratch = old; // reuse the loser's allocation
                }
            }
            Ok(())
        };
        let mut scratch = std::mem::take(&mut self.scratch);
        consider(Codec::Huffman, &mut scratch)?;
        consider(Codec::Lz4, &mut scratch)?;
        if let Some(level) = policy.zstd_level {
            consider(Codec::Zstd { level }, &mut scratch)?;
        }
        self.scratch = scratch;
        let limit = src.len() as f64 * (1.0 - policy.min_saving);
        Ok(match best {
            Some((buf, id)) if (buf.len() as f64) <= limit => (buf, id),
            _ => (src, CodecId::Raw),
        })
    }

    /// Encodes both parts of a segment.
    pub fn segment(&mut self, seg: QuantizedExpertSegment) -> Result<EncodedSegment, CodecError> {
        let (weights_len, aux_len) = (seg.weights.len(), seg.aux.len());
        let aux_bits = match seg.scale_dtype {
            FloatDtype::F32 => 32,
            FloatDtype::F16 | FloatDtype::Bf16 => 16,
        };
        let QuantizedExpertSegment { weights, aux, .. } = seg;
        let (weights, weight_codec) = self.encode(seg.bits, weights)?;
        let (aux, aux_codec) = self.encode(aux_bits, aux)?;
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
    pub bits: u8,
    pub group_size: usize,
    pub scale_dtype: FloatDtype,
    pub weights: Vec<u8>,
    pub aux: Vec<u8>,
    pub weight_codec: CodecId,
    pub aux_codec: CodecId,
    /// Decoded bytes of both parts.
    pub decoded_len: usize,
}

#[cfg(test)]
mod tests {
    #[test]
    fn auto_agrees_with_codec_encode_auto_on_many_inputs() {
        use crate::codec::encode_auto;
        let policies = [
            AutoPolicy::default(),
            AutoPolicy {
                zstd_level: Some(3),
                ..AutoPolicy::default()
            },
            AutoPolicy {
                min_saving: 0.3,
                ..AutoPolicy::default()
            },
        ];
        let mut x = 7u32;
        for len in [0usize, 1, 100, 4096, 70_000] {
            for skew in [1u32, 3, 16, 256] {
                let src: Vec<u8> = (0..len)
                    .map(|i| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        if i % 64 < 32 {
                            (x % skew) as u8
                        } else {
                            (i / 64 % 7) as u8
                        }
                    })
                    .collect();
                for p in policies {
                    let (mut want, mut scratch) = (Vec::new(), Vec::new());
                    let wid = encode_auto(4, &src, &mut want, &p, &mut scratch).unwrap();
                    let (got, gid) = Encoder::new(CodecChoice::Auto(p))
                        .encode(4, src.clone())
                        .unwrap();
                    assert_eq!((got, gid), (want, wid), "len {len} skew {skew} {p:?}");
                }
            }
        }
    }

    use super::*;
    use crate::codec::{encode_auto, Decoder};

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
        // Same bytes and choice as the codec module's own auto encoder.
        let (mut reference, mut scratch) = (Vec::new(), Vec::new());
        let rid = encode_auto(
            4,
            &src,
            &mut reference,
            &AutoPolicy::default(),
            &mut scratch,
        )
        .unwrap();
        assert_eq!((stored.as_slice(), id), (reference.as_slice(), rid));
        let mut back = vec![0u8; src.len()];
        Decoder::new().decode_into(id, &stored, &mut back).unwrap();
        assert_eq!(back, src);
    }
}
