//! What a conversion would write, sized from the checkpoint's headers alone.
//!
//! In: an opened [`Checkpoint`] (its tensors' names, types and shapes; this stage reads none of
//! their bytes), the [`ConvertOptions`], and the bit plan of a mix (`profile::plan_bits`), if any.
//! Out: [`PackSizes`]: the dense tensors as `plan_dense` would store them, each stored expert's
//! precision and bytes, and the pack's file size from `format::layout::plan`.
//! Invariant: the decisions are convert's own (`quantize::stored_shapes` is `plan_dense`'s rule,
//! `expert_target` and `ExpertProjections::segment_lens` are `write_payload`'s), so with
//! `--codec raw` every tensor and segment has the size `convert` writes; another codec stores a
//! part in fewer bytes only where that saves a quarter (decision 0014), so the sizes are then an
//! upper bound. The metadata section (zstd-compressed JSON holding the tokenizer) is estimated.

use super::load::Checkpoint;
use super::profile::BitPlan;
use super::quantize::{stored_shapes, StoredShape};
use super::{expert_target, ConvertError, ConvertOptions};
use crate::format::{
    dir_len, layout, DType, ProjBits, QuantMode, EXPERT_ENTRY_SIZE, TENSOR_ENTRY_SIZE,
};

/// One stored expert as a conversion would write it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertSize {
    pub layer: usize,
    pub expert: usize,
    pub bits: ProjBits,
    pub group_size: usize,
    pub mode: QuantMode,
    /// The type of its scales (and biases): the source's float type, u8 for mxfp4/mxfp8.
    pub scale_dtype: DType,
    /// Decoded bytes of all its segments: what one resident expert takes in the cache.
    pub decoded: u64,
    /// Bytes a miss reads: its segments' whole pages (segments start on page boundaries).
    pub read: u64,
}

/// The pack a conversion would write.
#[derive(Clone, Debug, PartialEq)]
pub struct PackSizes {
    /// The dense tensors as stored (resident whatever the budget).
    pub dense: Vec<StoredShape>,
    pub experts: Vec<ExpertSize>,
    pub page_size: u32,
    /// The file's size (the metadata estimated).
    pub file_size: u64,
}

impl PackSizes {
    /// Bytes of every dense tensor.
    pub fn dense_bytes(&self) -> u64 {
        self.dense.iter().map(|t| t.bytes).sum()
    }

    /// Bytes of every expert resident.
    pub fn expert_bytes(&self) -> u64 {
        self.experts.iter().map(|e| e.decoded).sum()
    }
}

/// Sizes what `convert` writes for `ck` under `opts`, with `bit_plan` choosing each expert's
/// bits where given (a mix), as `write_payload` does. `metadata_guess` stands for the metadata
/// section's bytes. No weight is read.
pub fn pack_sizes(
    ck: &Checkpoint,
    opts: &ConvertOptions,
    bit_plan: Option<&BitPlan>,
    metadata_guess: u64,
) -> Result<PackSizes, ConvertError> {
    let (expert_params, dense_policy) = opts.check()?;
    let c = &ck.config;
    let mut dense: Vec<StoredShape> = ck
        .dense_tensors()?
        .iter()
        .flat_map(|t| stored_shapes(t, dense_policy))
        .collect();
    dense.sort_by(|a, b| a.name.cmp(&b.name));
    let plan = bit_plan.cloned();
    let page = opts.page_size as u64;
    let mut experts = Vec::new();
    let mut segment_lens = Vec::new();
    for l in c.sparse_layers() {
        for e in 0..c.num_experts {
            let x = ck.expert(l, e)?;
            let q = expert_target(opts, &plan, expert_params, &x, l, e)?;
            let lens = x
                .segment_lens(q, opts.segments)
                .ok_or_else(|| ConvertError::BadOption {
                    option: "--segments",
                    value: opts.segments.to_string(),
                    why: format!(
                        "{} intermediate rows cannot be cut into {} segments of whole groups of {}",
                        c.moe_intermediate_size, opts.segments, q.group_size
                    ),
                })?;
            experts.push(ExpertSize {
                layer: l,
                expert: e,
                bits: q.bits,
                group_size: q.group_size,
                mode: q.mode,
                scale_dtype: if q.mode.has_biases() {
                    super::write::scale_dtype(x.gate.scale_dtype())
                } else {
                    DType::U8
                },
                decoded: lens.iter().sum(),
                read: lens.iter().map(|&n| n.div_ceil(page) * page).sum(),
            });
            segment_lens.extend(lens);
        }
    }
    let names: u64 = dense.iter().map(|t| t.name.len() as u64).sum();
    let tensor_dir = dir_len(dense.len(), TENSOR_ENTRY_SIZE, names);
    let expert_dir = dir_len(segment_lens.len(), EXPERT_ENTRY_SIZE, 0);
    let tensor_lens: Vec<u64> = dense.iter().map(|t| t.bytes).collect();
    let file_size = layout::plan(
        opts.page_size,
        &tensor_lens,
        &segment_lens,
        tensor_dir,
        expert_dir,
        metadata_guess,
    )
    .file_size;
    Ok(PackSizes {
        dense,
        experts,
        page_size: opts.page_size,
        file_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::Arch;
    use crate::codec::{Codec, CodecChoice};
    use crate::convert::fixtures::FixtureSpec;
    use crate::convert::quantize::plan_dense;
    use crate::format::Pack;
    use crate::progress::Silent;

    /// What convert writes with `--codec raw`, every architecture, three dense widths, uniform
    /// and mixed experts: the sizes planned from the headers are the bytes in the pack.
    #[test]
    fn the_sizes_planned_from_headers_are_the_bytes_convert_writes() {
        for arch in Arch::ALL.iter().copied() {
            for dense_bits in [4, 8, 16] {
                let src = tempfile::tempdir().unwrap();
                FixtureSpec::tiny(arch).write(src.path()).unwrap();
                let ck = Checkpoint::open(src.path()).unwrap();
                let opts = ConvertOptions {
                    codec: CodecChoice::Fixed(Codec::Raw),
                    dense_bits,
                    expert_bits: 4,
                    keep_source_codes: false,
                    ..Default::default()
                };
                // The dense decision without the values is the one `plan_dense` executes.
                let (_, policy) = opts.check().unwrap();
                for t in ck.dense_tensors().unwrap() {
                    let planned: Vec<(String, u64)> = plan_dense(&t, policy)
                        .unwrap()
                        .iter()
                        .map(|o| (o.name.clone(), o.bytes.len() as u64))
                        .collect();
                    let sized: Vec<(String, u64)> = stored_shapes(&t, policy)
                        .into_iter()
                        .map(|s| (s.name, s.bytes))
                        .collect();
                    assert_eq!(sized, planned, "{arch} {dense_bits}: {}", t.name);
                }
                let sizes = pack_sizes(&ck, &opts, None, 0).unwrap();
                let out = tempfile::tempdir().unwrap();
                let dest = out.path().join("m.flashpack");
                crate::convert::convert_checkpoint(
                    &ck,
                    &dest,
                    &opts,
                    &Silent,
                    std::time::Instant::now(),
                )
                .unwrap_or_else(|e| panic!("{arch}: {e}"));
                let pack = Pack::open(&dest).unwrap();
                let stored: Vec<(String, u64)> = pack
                    .tensors()
                    .iter()
                    .map(|t| (t.name.clone(), t.stored_len))
                    .collect();
                let planned: Vec<(String, u64)> = sizes
                    .dense
                    .iter()
                    .map(|t| (t.name.clone(), t.bytes))
                    .collect();
                assert_eq!(planned, stored, "{arch} {dense_bits}");
                let page = pack.page_size() as u64;
                for e in &sizes.experts {
                    let segs = pack.expert_segments(e.layer as u32, e.expert as u32);
                    let decoded: u64 = segs.iter().map(|s| s.decoded_len).sum();
                    let read: u64 = segs
                        .iter()
                        .map(|s| s.stored_len.div_ceil(page) * page)
                        .sum();
                    assert_eq!((e.decoded, e.read), (decoded, read), "{arch} {e:?}");
                    assert_eq!(e.bits, segs[0].bits, "{arch}");
                }
                assert_eq!(sizes.experts.len(), {
                    let mut k: Vec<_> =
                        pack.experts().iter().map(|e| (e.layer, e.expert)).collect();
                    k.dedup();
                    k.len()
                });
            }
        }
    }
}
