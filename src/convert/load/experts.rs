//! Finding experts in a checkpoint, whatever the layout (the other tensors: `dense.rs`).
//!
//! In: the tensor names of a checkpoint and its architecture's [`crate::arch::TensorNames`].
//! Out: for each (layer, expert), borrowed views of its gate `[I, H]`, up `[I, H]` and down
//! `[H, I]` ([`ExpertProjections`]), and every other tensor grouped by module
//! ([`DenseTensor`]): float, MLX-quantized (weight + scales + biases), or other.
//! Layouts: per-expert (`experts.N.gate_proj.weight`, on disk), fused (transformers 5.x in
//! memory: `experts.gate_up_proj` `[E, 2I, H]`, gate rows first, and `experts.down_proj`
//! `[E, H, I]`), stacked (mlx-lm: `switch_mlp.gate_proj.weight` `[E, I, ...]`, float or U32
//! codes with `scales`/`biases`), and gpt-oss's upstream MXFP4 blocks (`experts.gate_up_proj_blocks`
//! `[E, 2I, H/32, 16]` u8 with gate and up rows interleaved, `experts.down_proj_blocks`, their
//! `_scales`). Experts with projection biases (gpt-oss) get them from `experts.*_proj.bias`
//! (mlx-lm) or `experts.gate_up_proj_bias` / `down_proj_bias` (upstream, interleaved alike).
//! Invariant: shapes are checked against the config before any view is handed out.

use super::{Checkpoint, LoadError, TensorRef};
use crate::arch::{Arch, ExpertLayout, Part, Proj, TensorRole};
use crate::convert::quantize::{
    BiasVector, ExpertBiases, ExpertProjections, ProjSource, QuantParams, QuantizedView,
};
use crate::convert::tensor::{
    BlockCodes, BlockScale, Dtype, FloatDtype, Fp8Blocks, MatrixView, PackedIntGroups,
};
use std::collections::BTreeMap;

/// Names of expert tensors, by layer.
#[derive(Debug, Default)]
pub(super) struct ExpertIndex {
    per_expert: BTreeMap<(usize, usize, Proj, PartKey), String>,
    fused_gate_up: BTreeMap<usize, String>,
    fused_down: BTreeMap<usize, String>,
    stacked: BTreeMap<(usize, Proj, PartKey), String>,
    /// gpt-oss upstream: (layer, None = gate_up / Some(Down), blocks or scales).
    mx_blocks: BTreeMap<(usize, Option<Proj>, PartKey), String>,
    /// Expert biases: (layer, None = interleaved gate_up / Some(proj)).
    bias: BTreeMap<(usize, Option<Proj>), String>,
}

/// [`Part`] with an order, for map keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PartKey {
    Weight,
    Scales,
    Biases,
}

impl From<Part> for PartKey {
    fn from(p: Part) -> Self {
        match p {
            Part::Weight => PartKey::Weight,
            Part::Scales => PartKey::Scales,
            Part::Biases => PartKey::Biases,
        }
    }
}

impl ExpertIndex {
    pub(super) fn build<'a>(arch: Arch, names: impl Iterator<Item = &'a str>) -> ExpertIndex {
        let mut ix = ExpertIndex::default();
        for name in names {
            match arch.classify(name) {
                TensorRole::Expert {
                    layer,
                    expert,
                    proj,
                    part,
                } => {
                    ix.per_expert
                        .insert((layer, expert, proj, part.into()), name.to_string());
                }
                TensorRole::FusedGateUp { layer } => {
                    ix.fused_gate_up.insert(layer, name.to_string());
                }
                TensorRole::FusedDown { layer } => {
                    ix.fused_down.insert(layer, name.to_string());
                }
                TensorRole::Stacked { layer, proj, part } => {
                    ix.stacked
                        .insert((layer, proj, part.into()), name.to_string());
                }
                TensorRole::MxBlocks { layer, proj, part } => {
                    ix.mx_blocks
                        .insert((layer, proj, part.into()), name.to_string());
                }
                TensorRole::ExpertBias { layer, proj } => {
                    ix.bias.insert((layer, proj), name.to_string());
                }
                _ => {}
            }
        }
        ix
    }

    fn layout(&self, layer: usize) -> Option<ExpertLayout> {
        if self
            .stacked
            .contains_key(&(layer, Proj::Gate, PartKey::Weight))
        {
            Some(ExpertLayout::Stacked)
        } else if self.mx_blocks.contains_key(&(layer, None, PartKey::Weight)) {
            Some(ExpertLayout::MxBlocks)
        } else if self.fused_gate_up.contains_key(&layer) {
            Some(ExpertLayout::Fused)
        } else if self
            .per_expert
            .range((layer, 0, Proj::Gate, PartKey::Weight)..)
            .next()
            .is_some_and(|((l, ..), _)| *l == layer)
        {
            Some(ExpertLayout::PerExpert)
        } else {
            None
        }
    }

    /// Layers that hold any expert tensor.
    fn layers_with_experts(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .per_expert
            .keys()
            .map(|k| k.0)
            .chain(self.fused_gate_up.keys().copied())
            .chain(self.fused_down.keys().copied())
            .chain(self.stacked.keys().map(|k| k.0))
            .chain(self.mx_blocks.keys().map(|k| k.0))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

impl Checkpoint {
    /// A float matrix view of `bytes` (all or part of tensor `t`): floats, or for an FP8
    /// checkpoint E4M3 codes with their `weight_scale_inv` block scales (whole tensors only).
    pub(super) fn float_matrix<'a>(
        &'a self,
        t: TensorRef<'a>,
        bytes: &'a [u8],
        rows: usize,
        cols: usize,
    ) -> Result<MatrixView<'a>, LoadError> {
        if t.dtype == Dtype::F8E4M3 {
            return self.fp8_matrix(t, bytes, rows, cols);
        }
        if t.dtype == Dtype::I32 && self.packed_int.is_some() {
            return self.packed_matrix(t, bytes, rows, cols);
        }
        let dtype = t.dtype.float().ok_or(LoadError::Dtype {
            tensor: t.name.to_string(),
            found: t.dtype,
            expected: "BF16, F16 or F32 (or F8_E4M3 with block scales)",
        })?;
        MatrixView::new(dtype, rows, cols, bytes).ok_or_else(|| LoadError::Shape {
            tensor: t.name.to_string(),
            expected: vec![rows, cols],
            found: t.shape.to_vec(),
            why: "slice size".into(),
        })
    }

    /// The unpacked column count of packed weight `name` (compressed-tensors), if it is one.
    pub(super) fn packed_cols(&self, name: &str) -> Option<usize> {
        self.packed_cols.get(name).copied()
    }

    /// A compressed-tensors packed weight (`W.weight`, read from `W.weight_packed`) and its
    /// `W.weight_scale` group scales, whole tensors only: the floats they stand for
    /// ([`PackedIntGroups`]), as `rows x cols`.
    pub(super) fn packed_matrix<'a>(
        &'a self,
        t: TensorRef<'a>,
        bytes: &'a [u8],
        rows: usize,
        cols: usize,
    ) -> Result<MatrixView<'a>, LoadError> {
        let p = self.packed_int.ok_or_else(|| LoadError::MlxQuantization {
            detail: format!(
                "{} is I32 but quantization_config does not say compressed-tensors",
                t.name
            ),
        })?;
        let stem = t.name.strip_suffix(".weight").unwrap_or(t.name);
        let sn = format!("{stem}.weight_scale");
        let st = self.get(&sn).ok_or_else(|| LoadError::MissingTensor {
            tensor: sn.clone(),
            hint: format!(" ({stem}.weight_packed is pack-quantized and needs its scales)"),
        })?;
        let sd = st.dtype.float().ok_or(LoadError::Dtype {
            tensor: sn.clone(),
            found: st.dtype,
            expected: "F32, BF16 or F16 group scales",
        })?;
        let unpacked = self.packed_cols(t.name);
        if unpacked != Some(cols) || t.shape.first() != Some(&rows) || bytes.len() != t.data.len() {
            return Err(LoadError::Shape {
                tensor: format!("{stem}.weight_packed"),
                expected: vec![rows, cols],
                found: vec![t.shape.first().copied().unwrap_or(0), unpacked.unwrap_or(0)],
                why: "the unpacked shape (weight_shape) against config.json, whole tensors only"
                    .into(),
            });
        }
        let groups = PackedIntGroups {
            scales: st.data,
            scale_dtype: sd,
            bits: p.bits,
            group_size: p.group_size,
        };
        MatrixView::packed_int(rows, cols, bytes, groups).ok_or_else(|| LoadError::Shape {
            tensor: sn,
            expected: vec![rows, cols.div_ceil(p.group_size)],
            found: st.shape.to_vec(),
            why: format!("{} bits in int32 words, groups of {}", p.bits, p.group_size),
        })
    }

    /// An FP8 weight and its `<name>_scale_inv` block scales (DeepSeek's `.scale`, renamed at
    /// open: `open.rs`'s `scale_companions`).
    pub(super) fn fp8_matrix<'a>(
        &'a self,
        t: TensorRef<'a>,
        bytes: &'a [u8],
        rows: usize,
        cols: usize,
    ) -> Result<MatrixView<'a>, LoadError> {
        let [br, bc] = self.fp8_block.ok_or_else(|| LoadError::MlxQuantization {
            detail: format!(
                "{} is F8_E4M3 but quantization_config does not say quant_method \"fp8\" with \
                 its weight_block_size",
                t.name
            ),
        })?;
        let sn = format!("{}_scale_inv", t.name);
        let st = self.get(&sn).ok_or_else(|| LoadError::MissingTensor {
            tensor: sn.clone(),
            hint: format!(
                " ({} is FP8 and needs its block scales: {sn}, or {}.scale in DeepSeek's own \
                 layout)",
                t.name,
                t.name.strip_suffix(".weight").unwrap_or(t.name)
            ),
        })?;
        let scale = block_scale(st)?;
        let want = [rows.div_ceil(br), cols.div_ceil(bc)];
        if bytes.len() != t.data.len() || st.shape != want {
            return Err(LoadError::Shape {
                tensor: sn,
                expected: want.to_vec(),
                found: st.shape.to_vec(),
                why: format!(
                    "one scale per {br} x {bc} block of {} {:?}, whole tensors only",
                    t.name, t.shape
                ),
            });
        }
        let blocks = Fp8Blocks {
            scales: st.data,
            scale,
            codes: BlockCodes::E4m3,
            block_rows: br,
            block_cols: bc,
        };
        MatrixView::fp8(rows, cols, bytes, blocks).ok_or_else(|| LoadError::Shape {
            tensor: t.name.to_string(),
            expected: vec![rows, cols],
            found: t.shape.to_vec(),
            why: "FP8 codes".into(),
        })
    }

    /// An expert's FP4 weight (DeepSeek's release: E2M1 codes two to a byte, I8 or U8, `[rows,
    /// cols / 2]`) and its scales (`W.scales`, renamed from `W.scale` at open), one per 32
    /// values of a row. E8M0 scales make it MXFP4, whose codes a pack keeps as they are
    /// (decision 0012, as gpt-oss's); float scales are read as the values they give.
    fn fp4_proj<'a>(
        &'a self,
        t: TensorRef<'a>,
        scales: Option<&String>,
        rows: usize,
        cols: usize,
    ) -> Result<ProjSource<'a>, LoadError> {
        let stem = t.name.strip_suffix(".weight").unwrap_or(t.name);
        let sn = scales.ok_or_else(|| LoadError::MissingTensor {
            tensor: format!("{stem}.scale"),
            hint: format!(
                " ({} is {} and is read as FP4 codes, two to a byte, which need their scales)",
                t.name, t.dtype
            ),
        })?;
        let st = self.tensor(sn)?;
        let groups = cols.div_ceil(32);
        if t.shape != [rows, cols.div_ceil(2)] || cols % 32 != 0 {
            return Err(LoadError::Shape {
                tensor: t.name.to_string(),
                expected: vec![rows, cols / 2],
                found: t.shape.to_vec(),
                why: format!(
                    "FP4 codes two to a byte of a [{rows}, {cols}] projection \
                     (hidden_size / moe_intermediate_size in config.json, whole groups of 32)"
                ),
            });
        }
        if st.shape != [rows, groups] {
            return Err(LoadError::Shape {
                tensor: sn.clone(),
                expected: vec![rows, groups],
                found: st.shape.to_vec(),
                why: format!("one scale per 32 values of a row of {}", t.name),
            });
        }
        match block_scale(st)? {
            BlockScale::E8m0 => {
                let params = QuantParams::with_mode(4, 32, crate::format::QuantMode::Mxfp4)
                    .map_err(|e| LoadError::MlxQuantization {
                        detail: e.to_string(),
                    })?;
                Ok(ProjSource::Quantized(
                    QuantizedView {
                        rows,
                        cols,
                        params,
                        scale_dtype: self.model_float_dtype(),
                        codes: t.data,
                        scales: st.data,
                        biases: &[],
                    }
                    .checked(t.name)?,
                ))
            }
            scale @ BlockScale::Float(_) => {
                let blocks = Fp8Blocks {
                    scales: st.data,
                    scale,
                    codes: BlockCodes::E2m1,
                    block_rows: 1,
                    block_cols: 32,
                };
                let m = MatrixView::fp8(rows, cols, t.data, blocks).ok_or_else(|| {
                    LoadError::Shape {
                        tensor: t.name.to_string(),
                        expected: vec![rows, cols / 2],
                        found: t.shape.to_vec(),
                        why: "FP4 codes".into(),
                    }
                })?;
                Ok(ProjSource::Float(m))
            }
        }
    }

    /// How layer `layer` stores its experts, or an error if it has none or stores them in a
    /// layout its architecture's checkpoints do not come in ([`crate::arch::ArchDef::expert_layouts`]).
    pub fn expert_layout(&self, layer: usize) -> Result<ExpertLayout, LoadError> {
        let arch = self.config.arch;
        let layout = self.index.layout(layer).ok_or_else(|| LoadError::Experts {
            layer,
            detail: format!(
                "no expert tensors found (looked for {}, fused experts.gate_up_proj and \
                 switch_mlp); is the config's sparse-layer setting right?",
                arch.names().expert(layer, 0, Proj::Gate, Part::Weight)
            ),
        })?;
        let def = arch.def();
        let layout = match layout {
            ExpertLayout::Fused => def.fused_layout,
            other => other,
        };
        if def.expert_layouts.contains(&layout) {
            return Ok(layout);
        }
        Err(LoadError::Experts {
            layer,
            detail: def.layout_refusal.map_or_else(
                || {
                    format!(
                        "experts stored {layout:?} are not read for {arch} (it reads {:?})",
                        def.expert_layouts
                    )
                },
                str::to_string,
            ),
        })
    }

    /// Views of expert `expert`'s projections in layer `layer`. Cheap: no data is read.
    pub fn expert(&self, layer: usize, expert: usize) -> Result<ExpertProjections<'_>, LoadError> {
        let c = &self.config;
        let (h, i, e) = (
            c.expert_hidden_size(),
            c.moe_intermediate_size,
            c.num_experts,
        );
        if expert >= e {
            return Err(LoadError::Experts {
                layer,
                detail: format!("expert {expert} requested; the config has {e} experts"),
            });
        }
        let want = |p: Proj| if p == Proj::Down { [h, i] } else { [i, h] };
        let ix = &self.index;
        let one = |p: Proj| -> Result<ProjSource<'_>, LoadError> {
            let [rows, cols] = want(p);
            match self.expert_layout(layer)? {
                ExpertLayout::PerExpert => {
                    let name = ix
                        .per_expert
                        .get(&(layer, expert, p, PartKey::Weight))
                        .ok_or_else(|| LoadError::MissingTensor {
                            tensor: self
                                .config
                                .arch
                                .names()
                                .expert(layer, expert, p, Part::Weight),
                            hint: format!(" (layer {layer} stores experts one by one)"),
                        })?;
                    let scales = ix.per_expert.get(&(layer, expert, p, PartKey::Scales));
                    let biases = ix.per_expert.get(&(layer, expert, p, PartKey::Biases));
                    self.proj_source(name, scales, biases, None, rows, cols)
                }
                ExpertLayout::Stacked => {
                    let name = ix
                        .stacked
                        .get(&(layer, p, PartKey::Weight))
                        .ok_or_else(|| LoadError::MissingTensor {
                            tensor: self.config.arch.names().stacked(layer, p, Part::Weight),
                            hint: format!(" (layer {layer} stores experts stacked)"),
                        })?;
                    let scales = ix.stacked.get(&(layer, p, PartKey::Scales));
                    let biases = ix.stacked.get(&(layer, p, PartKey::Biases));
                    self.proj_source(name, scales, biases, Some((expert, e)), rows, cols)
                }
                ExpertLayout::MxBlocks => self.mx_blocks_proj(layer, expert, p, rows, cols),
                ExpertLayout::FusedColumns => self.fused_columns_proj(layer, expert, p, rows, cols),
                ExpertLayout::Fused => {
                    let (name, per_expert_rows, skip) = match p {
                        Proj::Gate => (ix.fused_gate_up.get(&layer), 2 * i, 0),
                        Proj::Up => (ix.fused_gate_up.get(&layer), 2 * i, i),
                        Proj::Down => (ix.fused_down.get(&layer), h, 0),
                    };
                    let name = name.ok_or_else(|| LoadError::MissingTensor {
                        tensor: format!("model.layers.{layer}.mlp.experts.down_proj"),
                        hint: " (fused layout needs gate_up_proj and down_proj)".into(),
                    })?;
                    let t = self.tensor(name)?;
                    let full = [e, per_expert_rows, cols];
                    if t.shape != full {
                        return Err(LoadError::Shape {
                            tensor: name.clone(),
                            expected: full.to_vec(),
                            found: t.shape.to_vec(),
                            why: "fused experts [E, 2I, H] / [E, H, I] from the config".into(),
                        });
                    }
                    let es = t.dtype.size();
                    let start = (expert * per_expert_rows + skip) * cols * es;
                    let bytes = &t.data[start..start + rows * cols * es];
                    Ok(ProjSource::Float(self.float_matrix(t, bytes, rows, cols)?))
                }
            }
        };
        Ok(ExpertProjections {
            gate: one(Proj::Gate)?,
            up: one(Proj::Up)?,
            down: one(Proj::Down)?,
            bias: if c.expert_bias {
                Some(self.expert_biases(layer, expert)?)
            } else {
                None
            },
        })
    }

    /// transformers' float gpt-oss ([`ExpertLayout::FusedColumns`]): `proj` `[rows, cols]` of
    /// expert `expert` as a strided view, gate `[i, h]` = `gate_up_proj[e, h, 2i]`, up the odd
    /// columns, down `[h, i]` = `down_proj[e, i, h]` (its forward: `x @ gate_up_proj`, then
    /// `gate_up[..., ::2]` and `gate_up[..., 1::2]`; `(..) @ down_proj`).
    fn fused_columns_proj(
        &self,
        layer: usize,
        expert: usize,
        proj: Proj,
        rows: usize,
        cols: usize,
    ) -> Result<ProjSource<'_>, LoadError> {
        let c = &self.config;
        let (h, i, e) = (
            c.expert_hidden_size(),
            c.moe_intermediate_size,
            c.num_experts,
        );
        let ix = &self.index;
        // (tensor, its [E, a, b] shape, first element, row stride, column stride)
        let (name, full, first, rs, cs, tensor) = match proj {
            Proj::Gate => (
                ix.fused_gate_up.get(&layer),
                [e, h, 2 * i],
                0,
                2,
                2 * i,
                "gate_up_proj",
            ),
            Proj::Up => (
                ix.fused_gate_up.get(&layer),
                [e, h, 2 * i],
                1,
                2,
                2 * i,
                "gate_up_proj",
            ),
            Proj::Down => (ix.fused_down.get(&layer), [e, i, h], 0, 1, h, "down_proj"),
        };
        let name = name.ok_or_else(|| LoadError::MissingTensor {
            tensor: format!("model.layers.{layer}.mlp.experts.{tensor}"),
            hint: " (transformers' gpt-oss layout needs gate_up_proj and down_proj)".into(),
        })?;
        let t = self.tensor(name)?;
        if t.shape != full {
            return Err(LoadError::Shape {
                tensor: name.clone(),
                expected: full.to_vec(),
                found: t.shape.to_vec(),
                why: "transformers' gpt-oss experts: gate_up_proj [E, H, 2I], down_proj [E, I, H]"
                    .into(),
            });
        }
        let dtype = t.dtype.float().ok_or(LoadError::Dtype {
            tensor: name.clone(),
            found: t.dtype,
            expected: "BF16, F16 or F32",
        })?;
        let es = dtype.size();
        let per_expert = full[1] * full[2];
        let bytes = &t.data[(expert * per_expert + first) * es..(expert + 1) * per_expert * es];
        let view = MatrixView::strided(dtype, rows, cols, bytes, rs, cs).ok_or_else(|| {
            LoadError::Shape {
                tensor: name.clone(),
                expected: full.to_vec(),
                found: t.shape.to_vec(),
                why: "strided view past the tensor".into(),
            }
        })?;
        Ok(ProjSource::Float(view))
    }

    /// gpt-oss's upstream MXFP4 codes of `proj` of expert `expert`: gate and up are the even
    /// and odd rows of `gate_up_proj_blocks` (mlx-lm gpt_oss.py `sanitize`: `v[..., ::2, :]`,
    /// `v[..., 1::2, :]`, after viewing the `[.., H/32, 16]` bytes as `[.., H/8]` u32 words).
    fn mx_blocks_proj(
        &self,
        layer: usize,
        expert: usize,
        proj: Proj,
        rows: usize,
        cols: usize,
    ) -> Result<ProjSource<'_>, LoadError> {
        let e = self.config.num_experts;
        let key = if proj == Proj::Down {
            Some(Proj::Down)
        } else {
            None
        };
        let fused = if proj == Proj::Down {
            "down_proj"
        } else {
            "gate_up_proj"
        };
        let name = |part: PartKey| -> Result<&String, LoadError> {
            self.index
                .mx_blocks
                .get(&(layer, key, part))
                .ok_or_else(|| LoadError::MissingTensor {
                    tensor: format!(
                        "model.layers.{layer}.mlp.experts.{fused}_{}",
                        if part == PartKey::Weight {
                            "blocks"
                        } else {
                            "scales"
                        }
                    ),
                    hint: " (gpt-oss MXFP4 experts come as _blocks and _scales)".into(),
                })
        };
        let (bn, sn) = (name(PartKey::Weight)?, name(PartKey::Scales)?);
        let (bt, st) = (self.tensor(bn)?, self.tensor(sn)?);
        // The interleaved tensor holds both projections' rows.
        let all_rows = if proj == Proj::Down { rows } else { 2 * rows };
        let groups = cols / 32;
        let (want_b, want_s) = (vec![e, all_rows, groups, 16], vec![e, all_rows, groups]);
        for (n, t, want) in [(bn, bt, &want_b), (sn, st, &want_s)] {
            if t.dtype != Dtype::U8 || t.shape != want.as_slice() || cols % 32 != 0 {
                return Err(LoadError::Shape {
                    tensor: n.clone(),
                    expected: want.clone(),
                    found: t.shape.to_vec(),
                    why: format!(
                        "u8 MXFP4 {} of {e} experts, {all_rows} rows of {cols} values in groups of                          32, from config.json ({:?} here)",
                        if n == bn { "blocks" } else { "scales" },
                        t.dtype
                    ),
                });
            }
        }
        let (cb, sb) = (all_rows * cols / 2, all_rows * groups);
        let params =
            QuantParams::with_mode(4, 32, crate::format::QuantMode::Mxfp4).map_err(|e| {
                LoadError::MlxQuantization {
                    detail: e.to_string(),
                }
            })?;
        let all = QuantizedView {
            rows: all_rows,
            cols,
            params,
            scale_dtype: self.model_float_dtype(),
            codes: &bt.data[expert * cb..(expert + 1) * cb],
            scales: &st.data[expert * sb..(expert + 1) * sb],
            biases: &[],
        }
        .checked(bn)?;
        Ok(match proj {
            Proj::Down => ProjSource::Quantized(all),
            Proj::Gate => ProjSource::Interleaved { all, first: 0 },
            Proj::Up => ProjSource::Interleaved { all, first: 1 },
        })
    }

    /// Expert `expert`'s projection biases: mlx-lm's stacked `experts.{gate,up,down}_proj.bias`
    /// `[E, out]`, or gpt-oss's upstream `gate_up_proj_bias` `[E, 2I]` (gate the even values)
    /// and `down_proj_bias` `[E, H]`.
    fn expert_biases(&self, layer: usize, expert: usize) -> Result<ExpertBiases<'_>, LoadError> {
        let c = &self.config;
        let (e, h, i) = (
            c.num_experts,
            c.expert_hidden_size(),
            c.moe_intermediate_size,
        );
        let vector = |key: Option<Proj>, len: usize, step: usize, first: usize| {
            let name =
                self.index
                    .bias
                    .get(&(layer, key))
                    .ok_or_else(|| LoadError::MissingTensor {
                        tensor: match key {
                            None => format!("model.layers.{layer}.mlp.experts.gate_up_proj_bias"),
                            Some(p) => format!("{}.bias", c.arch.names().stacked_module(layer, p)),
                        },
                        hint: format!(" ({} experts carry a bias on each projection)", c.arch),
                    })?;
            let t = self.tensor(name)?;
            let dtype = t.dtype.float().ok_or(LoadError::Dtype {
                tensor: name.clone(),
                found: t.dtype,
                expected: "BF16, F16 or F32 biases",
            })?;
            let per = len * step;
            if t.shape != [e, per] {
                return Err(LoadError::Shape {
                    tensor: name.clone(),
                    expected: vec![e, per],
                    found: t.shape.to_vec(),
                    why: "one bias per output of each expert, from config.json".into(),
                });
            }
            let s = dtype.size();
            Ok(BiasVector {
                dtype,
                bytes: &t.data[(expert * per + first) * s..(expert + 1) * per * s],
                len,
                step,
            })
        };
        let (gate, up) = if self.index.bias.contains_key(&(layer, None)) {
            (vector(None, i, 2, 0)?, vector(None, i, 2, 1)?)
        } else {
            (
                vector(Some(Proj::Gate), i, 1, 0)?,
                vector(Some(Proj::Up), i, 1, 0)?,
            )
        };
        let down = vector(Some(Proj::Down), h, 1, 0)?;
        if gate.dtype != down.dtype || up.dtype != down.dtype {
            return Err(LoadError::Dtype {
                tensor: format!("model.layers.{layer}.mlp.experts biases"),
                found: down.dtype.dtype(),
                expected: "one float type for the gate, up and down biases",
            });
        }
        Ok(ExpertBiases { gate, up, down })
    }

    /// A projection from a weight tensor (and scales/biases when MLX-quantized), either whole
    /// (`stack == None`) or expert `k` of a stack of `n`.
    fn proj_source<'a>(
        &'a self,
        name: &str,
        scales: Option<&String>,
        biases: Option<&String>,
        stack: Option<(usize, usize)>,
        rows: usize,
        cols: usize,
    ) -> Result<ProjSource<'a>, LoadError> {
        let t = self.tensor(name)?;
        let lead: Vec<usize> = stack.map(|(_, n)| vec![n]).unwrap_or_default();
        let pick = |t: TensorRef<'a>, inner: usize| -> &'a [u8] {
            match stack {
                Some((k, _)) => &t.data[k * inner..(k + 1) * inner],
                None => t.data,
            }
        };
        if t.dtype == Dtype::I32 && self.packed_int.is_some() && stack.is_none() {
            return Ok(ProjSource::Float(
                self.packed_matrix(t, t.data, rows, cols)?,
            ));
        }
        if matches!(t.dtype, Dtype::I8 | Dtype::U8) && stack.is_none() {
            return self.fp4_proj(t, scales, rows, cols);
        }
        if t.dtype != Dtype::U32 {
            let shape = [lead.clone(), vec![rows, cols]].concat();
            if t.shape != shape.as_slice() {
                return Err(LoadError::Shape {
                    tensor: name.to_string(),
                    expected: shape,
                    found: t.shape.to_vec(),
                    why: "hidden_size / moe_intermediate_size / num_experts in config.json".into(),
                });
            }
            let inner = rows * cols * t.dtype.size();
            return Ok(ProjSource::Float(self.float_matrix(
                t,
                pick(t, inner),
                rows,
                cols,
            )?));
        }
        self.quantized_view(name, scales, biases, stack, rows, cols)
            .map(ProjSource::Quantized)
    }

    /// The float type of the model's unquantized tensors (its norms), bf16 when it has none:
    /// what mxfp4/mxfp8 codes dequantize to.
    pub(super) fn model_float_dtype(&self) -> FloatDtype {
        self.tensor_names()
            .filter(|n| n.ends_with("norm.weight"))
            .find_map(|n| self.get(n)?.dtype.float())
            .unwrap_or(FloatDtype::Bf16)
    }

    /// An MLX-quantized weight with its scales and biases, whole or expert `k` of `n`.
    pub(super) fn quantized_view<'a>(
        &'a self,
        name: &str,
        scales: Option<&String>,
        biases: Option<&String>,
        stack: Option<(usize, usize)>,
        rows: usize,
        cols: usize,
    ) -> Result<QuantizedView<'a>, LoadError> {
        let t = self.tensor(name)?;
        let lead: Vec<usize> = stack.map(|(_, n)| vec![n]).unwrap_or_default();
        let pick = |t: TensorRef<'a>, inner: usize| -> &'a [u8] {
            match stack {
                Some((k, _)) => &t.data[k * inner..(k + 1) * inner],
                None => t.data,
            }
        };
        let module = name.strip_suffix(".weight").unwrap_or(name);
        let q = self
            .mlx_quantization
            .as_ref()
            .ok_or_else(|| LoadError::MlxQuantization {
                detail: format!(
                    "{name} holds U32 codes but config.json has no quantization section"
                ),
            })?;
        let p = super::quant_params(q, module)?;
        // Affine codes have scales and biases in a float type; mxfp4/mxfp8 (E8M0) and nvfp4
        // (E4M3) have u8 scales and no biases.
        let sn = scales.ok_or_else(|| LoadError::MissingTensor {
            tensor: format!("{module}.scales"),
            hint: format!(" ({name} is quantized)"),
        })?;
        let st = self.tensor(sn)?;
        let bt = match (p.has_biases(), biases) {
            (true, Some(bn)) => Some((bn, self.tensor(bn)?)),
            (true, None) => {
                return Err(LoadError::MissingTensor {
                    tensor: format!("{module}.biases"),
                    hint: format!(" ({name} is affine-quantized)"),
                })
            }
            (false, _) => None,
        };
        let sd = if p.has_biases() {
            st.dtype.float().ok_or(LoadError::Dtype {
                tensor: sn.clone(),
                found: st.dtype,
                expected: "BF16, F16 or F32 scales",
            })?
        } else {
            if st.dtype != Dtype::U8 {
                return Err(LoadError::Dtype {
                    tensor: sn.clone(),
                    found: st.dtype,
                    expected: "U8 scales of mxfp4/mxfp8/nvfp4 codes",
                });
            }
            // The float type the codes stand for: the model's (mlx-lm keeps norms in it).
            self.model_float_dtype()
        };
        if !p.fits(cols) {
            return Err(LoadError::Shape {
                tensor: name.to_string(),
                expected: vec![rows, cols],
                found: t.shape.to_vec(),
                why: format!("{cols} columns are not whole groups of {}", p.group_size),
            });
        }
        let wshape = [lead.clone(), vec![rows, p.words_per_row(cols)]].concat();
        let sshape = [lead, vec![rows, p.groups_per_row(cols)]].concat();
        let mut parts = vec![(name, t, &wshape), (sn.as_str(), st, &sshape)];
        if let Some((bn, bt)) = bt {
            parts.push((bn.as_str(), bt, &sshape));
        }
        for (tn, tt, want) in parts {
            // A [heads, out, ...] stack of a dense module is compared as its rows.
            let found: Vec<usize> = match (stack, tt.shape) {
                (None, [lead @ .., last]) if lead.len() > 1 => {
                    vec![lead.iter().product(), *last]
                }
                _ => tt.shape.to_vec(),
            };
            if found != *want {
                return Err(LoadError::Shape {
                    tensor: tn.to_string(),
                    expected: want.clone(),
                    found: tt.shape.to_vec(),
                    why: format!(
                        "{} bits, group size {} ({}) from config.json",
                        p.bits,
                        p.group_size,
                        p.mode.name()
                    ),
                });
            }
        }
        if let Some((bn, bt)) = bt {
            if bt.dtype != st.dtype {
                return Err(LoadError::Dtype {
                    tensor: bn.clone(),
                    found: bt.dtype,
                    expected: "the scales' type",
                });
            }
        }
        let wbytes = rows * p.words_per_row(cols) * 4;
        let sbytes = rows * p.groups_per_row(cols) * p.scale_size(sd);
        Ok(QuantizedView {
            rows,
            cols,
            params: p,
            scale_dtype: sd,
            codes: pick(t, wbytes),
            scales: pick(st, sbytes),
            biases: bt.map_or(&[][..], |(_, bt)| pick(bt, sbytes)),
        }
        .checked(name)?)
    }

    /// Checks at open that every sparse layer has all its experts with the config's shapes.
    pub(super) fn check_experts(&self) -> Result<(), LoadError> {
        let sparse = self.config.sparse_layers();
        let with_experts = self.index.layers_with_experts();
        let fields = format!(
            "decoder_sparse_step {}, mlp_only_layers {:?}, first_k_dense_replace {}, \
             moe_layer_freq {}",
            self.config.decoder_sparse_step,
            self.config.mlp_only_layers,
            self.config.first_k_dense_replace,
            self.config.moe_layer_freq
        );
        for &layer in &with_experts {
            if !sparse.contains(&layer) {
                return Err(LoadError::Experts {
                    layer,
                    detail: format!("has expert tensors but the config makes it dense ({fields})"),
                });
            }
        }
        if let Some(&layer) = sparse.iter().find(|l| !with_experts.contains(l)) {
            return Err(LoadError::Experts {
                layer,
                detail: format!("has no expert tensors but the config makes it sparse ({fields})"),
            });
        }
        for &layer in &sparse {
            for e in 0..self.config.num_experts {
                self.expert(layer, e)?;
            }
        }
        Ok(())
    }
}

/// How block scale tensor `st` stores its scales: E8M0 exponents (`F8_E8M0`, or `U8` as
/// mlx-lm reads DeepSeek's `ue8m0`), or floats that are the scales.
fn block_scale(st: TensorRef<'_>) -> Result<BlockScale, LoadError> {
    match (st.dtype, st.dtype.float()) {
        (Dtype::F8E8M0 | Dtype::U8, _) => Ok(BlockScale::E8m0),
        (_, Some(d)) => Ok(BlockScale::Float(d)),
        _ => Err(LoadError::Dtype {
            tensor: st.name.to_string(),
            found: st.dtype,
            expected: "F8_E8M0 or U8 exponents (ue8m0), or F32, BF16 or F16 block scales",
        }),
    }
}
