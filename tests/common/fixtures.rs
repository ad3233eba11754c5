//! Seeded tiny Hugging Face checkpoints for tests and benchmarks.
//!
//! In: a [`FixtureSpec`] (architecture, sizes, expert layout, config dialect, sharding, seed).
//! Out: a folder with `config.json`, `model.safetensors` or shards plus
//! `model.safetensors.index.json`, and optionally a copied tokenizer, loadable by transformers
//! and mlx-lm (when the config carries the legacy keys and a tokenizer is present).
//! Invariant: the same spec gives the same bytes, whatever the thread count: every 64 Ki-value
//! chunk of every tensor draws from its own generator seeded by (seed, tensor name, chunk).
//! Values are random (approximately normal, std `1/sqrt(fan_in)`; gpt-oss's MXFP4 expert codes
//! uniform bytes and their E8M0 exponents uniform in [`MXFP4_EXPONENTS`]), good for exactness
//! tests only: use the trained `fixtures/qwen3moe-tiny` for quality questions.

use flashpack::arch::{Arch, Part, Proj};
use flashpack::convert::load::safetensors::serialize_header;
use flashpack::convert::tensor::{
    BlockCodes, BlockScale, Dtype, FloatDtype, Fp8Blocks, MatrixView,
};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Which `config.json` keys to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// transformers 5.x: `rope_parameters`, and `num_local_experts` where 5.x writes it.
    Transformers5,
    /// Legacy: top-level `rope_theta`, `rope_scaling`, `num_experts`.
    Legacy,
    /// Both sets of keys (what mlx-lm 0.32 needs next to a 5.x config).
    Both,
}

/// How expert weights are stored. gpt-oss ignores it: its experts are always written as the
/// released checkpoints ship them, MXFP4 blocks and scales (see [`FixtureSpec::tensors`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FixtureLayout {
    /// `experts.N.{gate,up,down}_proj.weight` (what `save_pretrained` writes).
    PerExpert,
    /// transformers 5.x in-memory `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj`.
    Fused,
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct FixtureSpec {
    pub arch: Arch,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_experts: usize,
    pub top_k: usize,
    /// Width of one expert.
    pub moe_intermediate_size: usize,
    /// Width of dense MLPs (Qwen dense layers); Mixtral/OLMoE use `moe_intermediate_size`.
    pub intermediate_size: usize,
    /// Qwen2-MoE shared expert width.
    pub shared_expert_intermediate_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Qwen2/3-MoE: every `decoder_sparse_step`-th layer is sparse.
    pub decoder_sparse_step: usize,
    pub layout: FixtureLayout,
    pub dialect: Dialect,
    pub dtype: FloatDtype,
    /// Largest shard in bytes; `None` writes one `model.safetensors`.
    pub max_shard_bytes: Option<u64>,
    pub seed: u64,
    /// A folder to copy `tokenizer.json` and `tokenizer_config.json` from.
    pub tokenizer_from: Option<PathBuf>,
    /// 0: routing near uniform (random weights). Above 0: skewed, token-to-token correlated
    /// routing like a trained model's. Every embedding gets a shared direction `u`, of
    /// `routing_skew` times the size of its random part, and router row `e` of each layer gets
    /// `2 z_e u / hidden` with `z_e` standard normal: expert `e`'s logit moves by about `2 z_e`
    /// times the token's alignment with `u`, so some experts per layer take most of the traffic
    /// and neighbouring tokens share them. 0.2 gives hit rates near the bundled trained model's.
    pub routing_skew: f32,
    /// FP8 linear weights, as DeepSeek-V3 and Qwen3 FP8 checkpoints ship them.
    pub fp8: Fp8Fixture,
    /// DeepSeek-V3's MLA: the query bottleneck (`None`: a plain `q_proj`), the latent width
    /// and the rotary width (`qk_nope_head_dim` and `v_head_dim` are `head_dim`).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_rope_head_dim: usize,
    /// DeepSeek-V3 / GLM-4.5: the first this-many layers are dense.
    pub first_k_dense_replace: usize,
    /// A `rope_scaling` record (e.g. YaRN), written in both dialects; `None`: unscaled.
    pub rope_scaling: Option<Value>,
    /// Qwen3-Next / Qwen3.5: every this-many-th layer has full attention, the others Gated
    /// DeltaNet linear attention with these heads, head widths and convolution width.
    pub full_attention_interval: usize,
    pub linear_key_heads: usize,
    pub linear_value_heads: usize,
    pub linear_key_head_dim: usize,
    pub linear_value_head_dim: usize,
    pub conv_kernel: usize,
    /// Qwen3.5: the multimodal layout (`text_config`, `model.language_model.*` names and a
    /// vision tower tensor) instead of the text-only one.
    pub multimodal: bool,
    /// gpt-oss: the window of its sliding-attention layers, which are the even ones (`layer_types`
    /// alternates `sliding_attention` and `full_attention` from layer 0, as upstream), and the
    /// clamp of its experts' SwiGLU (`swiglu_limit`).
    pub sliding_window: usize,
    pub swiglu_limit: f64,
    /// DeepSeek-V3.2 / GLM-5: the sparse-attention indexer's heads, head width and top-k.
    pub index_heads: usize,
    pub index_head_dim: usize,
    pub index_topk: usize,
    /// Gemma 4: the full-attention layers' head width and KV heads (their values are their
    /// keys, `attention_k_eq_v`); its sliding layers use `head_dim`, `num_kv_heads` and
    /// `sliding_window`.
    pub global_head_dim: usize,
    pub global_kv_heads: usize,
    /// Kimi-K3: layers per attention-residual block (0: plain residuals), its Kimi Delta
    /// Attention's full-rank output gate and decay lower bound (its KDA layers are those of
    /// `full_attention_interval`, with `linear_value_heads` heads of `linear_key_head_dim`;
    /// its MLA is DeepSeek-V3's fields').
    pub attn_res_block_size: usize,
    pub full_rank_gate: bool,
    pub gate_lower_bound: Option<f64>,
    /// Kimi-K3's latent MoE: the experts' width (0: none, the experts on the hidden state), and
    /// whether their sum is normed before it goes back up.
    pub latent_size: usize,
    pub latent_norm: bool,
}

/// gpt-oss's MXFP4 experts: the E8M0 exponents drawn for each 32-value block, uniform in these
/// inclusive ranges (127 is a scale of 1). With uniform E2M1 codes the gate/up scales 2^-7 ..
/// 2^-3 push about 1% of the pre-activations past a `swiglu_limit` of 7, so the clamp matters,
/// and the down scales 2^-11 .. 2^-7 keep the experts' output of the order of the residual, so
/// attention still moves the logits (the same ranges as scripts/tiny_moe.py).
pub const MXFP4_EXPONENTS: [(&str, std::ops::RangeInclusive<u8>); 2] =
    [("gate_up_proj", 120..=124), ("down_proj", 116..=120)];

/// FP8 fixtures: the attention, MLP and expert weights (not the embeddings, the head, the
/// routers or the norms) as E4M3 codes with one F32 `weight_scale_inv` per `block x block`
/// (`quantization_config.quant_method = "fp8"`), or the same model written in bf16: the values
/// those codes and scales stand for, `e4m3 * scale` in f32 rounded to bf16. gpt-oss ignores it:
/// its checkpoints are MXFP4 (one `quantization_config`), with attention in bf16.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fp8Fixture {
    #[default]
    Off,
    Blocks(usize),
    Dequantized(usize),
    /// DeepSeek's own release layout (DeepSeek-V4.1): the FP8 weights' scales are `W.scale`,
    /// E8M0 exponents (`F8_E8M0`) per `block x block`, and the routed experts are FP4 (E2M1
    /// codes two to a byte, `I8` `[out, in / 2]`, with an E8M0 `W.scale` per 32 values of a
    /// row); `quantization_config` says `scale_fmt: "ue8m0"` and the config `expert_dtype: "fp4"`.
    Release(usize),
    /// The same model in the fixture's float type: the values the release's codes stand for.
    ReleaseDequantized(usize),
}

impl FixtureSpec {
    /// A tiny model: hidden 128, 2 layers, 8 experts top-2, vocab 512, bf16, per-expert.
    pub fn tiny(arch: Arch) -> FixtureSpec {
        FixtureSpec {
            arch,
            hidden_size: 128,
            num_layers: 2,
            num_experts: 8,
            top_k: 2,
            moe_intermediate_size: 64,
            intermediate_size: 256,
            shared_expert_intermediate_size: 128,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 32,
            vocab_size: 512,
            decoder_sparse_step: 1,
            layout: FixtureLayout::PerExpert,
            dialect: Dialect::Both,
            dtype: FloatDtype::Bf16,
            max_shard_bytes: None,
            seed: 0,
            tokenizer_from: None,
            routing_skew: 0.0,
            fp8: Fp8Fixture::Off,
            q_lora_rank: Some(128),
            kv_lora_rank: 128,
            qk_rope_head_dim: 32,
            first_k_dense_replace: 1,
            rope_scaling: None,
            full_attention_interval: 2,
            linear_key_heads: 2,
            linear_value_heads: 4,
            linear_key_head_dim: 32,
            linear_value_head_dim: 32,
            conv_kernel: 4,
            multimodal: false,
            sliding_window: 8,
            swiglu_limit: 7.0,
            index_heads: 2,
            index_head_dim: 64,
            index_topk: 8,
            global_head_dim: 64,
            global_kv_heads: 1,
            attn_res_block_size: 2,
            full_rank_gate: false,
            gate_lower_bound: Some(-5.0),
            latent_size: 0,
            latent_norm: false,
        }
    }

    /// Gemma 4's `layer_types`: full attention on every third layer and the last (transformers
    /// makes the last layer full), sliding attention on the others.
    pub fn gemma4_layer_types(&self) -> Vec<&'static str> {
        (0..self.num_layers)
            .map(|l| {
                if (l + 1) % 3 == 0 || l + 1 == self.num_layers {
                    "full_attention"
                } else {
                    "sliding_attention"
                }
            })
            .collect()
    }

    /// The on-disk (before [`Self::disk_name`]) name of layer `l`'s router weight.
    pub fn router_name(&self, l: usize) -> String {
        match self.arch {
            Arch::Gemma4Text => format!("model.layers.{l}.router.proj.weight"),
            _ => self.arch.names().router(l),
        }
    }

    /// gpt-oss's `layer_types`: sliding attention on the even layers, full on the odd ones.
    pub fn layer_types(&self) -> Vec<&'static str> {
        (0..self.num_layers)
            .map(|l| {
                if l % 2 == 0 {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
            })
            .collect()
    }

    /// Whether `name` holds gpt-oss's MXFP4 expert codes (`_blocks`) or exponents (`_scales`),
    /// written as U8.
    fn is_mxfp4(&self, name: &str) -> bool {
        self.arch == Arch::GptOss && (name.ends_with("_blocks") || name.ends_with("_scales"))
    }

    /// Qwen3-Next and Qwen3.5: hybrid linear attention, gated shared expert, norms offset by one.
    fn hybrid(&self) -> bool {
        matches!(self.arch, Arch::Qwen3Next | Arch::Qwen35Moe)
    }

    /// Whether layer `l` has linear attention (Kimi-K3's: Kimi Delta Attention).
    fn is_linear(&self, l: usize) -> bool {
        (self.hybrid() || self.arch == Arch::KimiK3)
            && (l + 1) % self.full_attention_interval.max(1) != 0
    }

    /// Norm weights the checkpoint stores offset by one (mlx-lm's `sanitize` adds the one):
    /// they are drawn around 0 instead of 1.
    fn offset_norm(&self, name: &str) -> bool {
        self.hybrid()
            && [
                ".input_layernorm.weight",
                ".post_attention_layernorm.weight",
                "model.norm.weight",
                ".q_norm.weight",
                ".k_norm.weight",
            ]
            .iter()
            .any(|s| name.ends_with(s))
    }

    /// The name a tensor has on disk: Qwen3.5's multimodal layout holds the text model under
    /// `model.language_model.`.
    fn disk_name(&self, name: &str) -> String {
        if self.arch == Arch::DeepseekV41 {
            return dsv41_upstream_name(name);
        }
        if self.arch == Arch::KimiK3 {
            return self.kimi_k3_upstream_name(name);
        }
        if self.arch == Arch::KimiK25 && !self.is_vision(name) {
            // Kimi K2.5: the text model under `language_model.` (model.* and lm_head.*).
            return format!("language_model.{name}");
        }
        match name.strip_prefix("model.") {
            Some(_) if self.arch == Arch::Gemma4Text && self.is_vision(name) => name.to_string(),
            Some(rest) if self.multimodal && !rest.starts_with("visual.") => {
                format!("model.language_model.{rest}")
            }
            _ => name.to_string(),
        }
    }

    /// DeepSeek-V3 and GLM-4.5 (and the models built on DeepSeek-V3's: Kimi K2.5,
    /// DeepSeek-V3.2, GLM-5): sigmoid router with a selection bias, ungated shared experts,
    /// dense first layers.
    fn deepseek_moe(&self) -> bool {
        self.mla() || self.arch == Arch::Glm4Moe
    }

    /// Multi-head latent attention: DeepSeek-V3 and the models built on it.
    fn mla(&self) -> bool {
        matches!(
            self.arch,
            Arch::DeepseekV3 | Arch::KimiK25 | Arch::DeepseekV32 | Arch::GlmMoeDsa
        )
    }

    /// DeepSeek Sparse Attention's indexer on MLA: DeepSeek-V3.2 and GLM-5.
    fn dsa(&self) -> bool {
        matches!(self.arch, Arch::DeepseekV32 | Arch::GlmMoeDsa)
    }

    /// Kimi K2.5's vision modules, which the loader drops.
    fn is_vision(&self, name: &str) -> bool {
        name.starts_with("vision_tower.")
            || name.starts_with("mm_projector.")
            || name.starts_with("model.vision_tower.")
            || name.starts_with("model.embed_vision.")
    }

    /// `n_group` and `topk_group` of a DeepSeek-V3 fixture: 4 groups, the best 2, when the
    /// experts split so and top-k fits; else no groups.
    fn groups(&self) -> (usize, usize) {
        let e = self.num_experts;
        if (self.mla() || self.arch == Arch::KimiK3)
            && e % 4 == 0
            && e / 4 >= 2
            && self.top_k <= e / 2
        {
            (4, 2)
        } else {
            (1, 1)
        }
    }

    /// The float type a tensor is written in: the fixture's, but f32 for DeepSeek's
    /// `e_score_correction_bias` (as the checkpoints ship it).
    fn tensor_dtype(&self, name: &str) -> FloatDtype {
        let v41_f32 = self.arch == Arch::DeepseekV41
            && [".attn_hc.", ".ffn_hc.", ".sinks", ".compressor."]
                .iter()
                .any(|k| name.contains(k));
        // Kimi's linear attention keeps its decay parameters in f32.
        let kda_f32 =
            self.arch == Arch::KimiK3 && (name.ends_with(".A_log") || name.ends_with(".dt_bias"));
        if name.ends_with("e_score_correction_bias") || v41_f32 || kda_f32 {
            FloatDtype::F32
        } else {
            self.dtype
        }
    }

    /// The FP8 block size, when `name` (of `shape`, `fan_in`) is one of the FP8 weights.
    /// MLA's query and key/value projections of attention `a` (DeepSeek-V3's names): the query
    /// whole or through its low-rank pair, then the compressed key/value and its expansion.
    fn mla_projections(&self, a: &str, add: &mut impl FnMut(String, Vec<usize>, usize)) {
        let h = self.hidden_size;
        let (d, rope, lora, heads) = (
            self.head_dim,
            self.qk_rope_head_dim,
            self.kv_lora_rank,
            self.num_heads,
        );
        match self.q_lora_rank {
            None => add(format!("{a}.q_proj.weight"), vec![heads * (d + rope), h], h),
            Some(r) => {
                add(format!("{a}.q_a_proj.weight"), vec![r, h], h);
                add(format!("{a}.q_a_layernorm.weight"), vec![r], 0);
                add(
                    format!("{a}.q_b_proj.weight"),
                    vec![heads * (d + rope), r],
                    r,
                );
            }
        }
        add(
            format!("{a}.kv_a_proj_with_mqa.weight"),
            vec![lora + rope, h],
            h,
        );
        add(format!("{a}.kv_a_layernorm.weight"), vec![lora], 0);
        add(
            format!("{a}.kv_b_proj.weight"),
            vec![heads * 2 * d, lora],
            lora,
        );
    }

    fn fp8_block(&self, name: &str, shape: &[usize], fan_in: usize) -> Option<usize> {
        let block = match self.fp8 {
            _ if self.arch == Arch::GptOss => return None,
            Fp8Fixture::Off => return None,
            Fp8Fixture::Blocks(b)
            | Fp8Fixture::Dequantized(b)
            | Fp8Fixture::Release(b)
            | Fp8Fixture::ReleaseDequantized(b) => b,
        };
        let linear = shape.len() == 2
            && fan_in > 0
            && name.ends_with(".weight")
            && !name.contains("embed_tokens")
            && !name.starts_with("lm_head")
            && !name.ends_with("shared_expert_gate.weight")
            // Kimi-K3's one-row residual projections stay bf16.
            && !name.contains("_res_proj.")
            // DeepSeek-V4.1's f32 compressor stays f32.
            && self.tensor_dtype(name) == self.dtype
            && !(0..self.num_layers).any(|l| self.router_name(l) == name);
        linear.then_some(block)
    }

    /// Every tensor as written: (name, dtype, shape, fan_in), with each FP8 weight followed by
    /// its `_scale_inv` (fan_in 0, unused).
    pub fn file_tensors(&self) -> Vec<(String, Dtype, Vec<usize>, usize)> {
        let mut out = Vec::new();
        for (name, shape, fan_in) in self.tensors() {
            match (self.fp8, self.fp8_block(&name, &shape, fan_in)) {
                (Fp8Fixture::Blocks(_), Some(b)) => {
                    let scales = vec![shape[0].div_ceil(b), shape[1].div_ceil(b)];
                    out.push((name.clone(), Dtype::F8E4M3, shape, fan_in));
                    out.push((format!("{name}_scale_inv"), Dtype::F32, scales, 0));
                }
                (Fp8Fixture::Release(b), Some(_)) => {
                    let stem = name.strip_suffix(".weight").unwrap_or(&name);
                    let scale = format!("{stem}.scale");
                    let (rows, cols) = (shape[0], shape[1]);
                    if self.is_routed_expert(&name) {
                        out.push((name.clone(), Dtype::I8, vec![rows, cols / 2], fan_in));
                        out.push((scale, Dtype::F8E8M0, vec![rows, cols / 32], 0));
                    } else {
                        let scales = vec![rows.div_ceil(b), cols.div_ceil(b)];
                        out.push((name.clone(), Dtype::F8E4M3, shape, fan_in));
                        out.push((scale, Dtype::F8E8M0, scales, 0));
                    }
                }
                _ if self.is_mxfp4(&name) => out.push((name, Dtype::U8, shape, fan_in)),
                _ => {
                    let dtype = self.tensor_dtype(&name).dtype();
                    out.push((name, dtype, shape, fan_in))
                }
            }
        }
        out
    }

    /// A routed expert's projection weight (FP4 in DeepSeek's release layout).
    fn is_routed_expert(&self, name: &str) -> bool {
        matches!(
            self.arch.classify(name),
            flashpack::arch::TensorRole::Expert { .. }
        )
    }

    /// DeepSeek's release layout ([`Fp8Fixture::Release`]): the bytes of an FP8 or FP4 weight,
    /// of its `.scale`, or (`ReleaseDequantized`) of the float values they stand for; `None` for
    /// every other tensor. FP8 weights get [`Self::fp8_draw`]'s codes with its scales rounded down
    /// to powers of two; FP4 experts uniform codes and the exponents of gpt-oss's fixture
    /// ([`MXFP4_EXPONENTS`]: gate and up as `gate_up_proj`, down as `down_proj`).
    fn release_bytes(&self, name: &str) -> Option<Vec<u8>> {
        let (Fp8Fixture::Release(b) | Fp8Fixture::ReleaseDequantized(b)) = self.fp8 else {
            return None;
        };
        let dequantized = matches!(self.fp8, Fp8Fixture::ReleaseDequantized(_));
        let (weight, want_scale) = match name.strip_suffix(".scale") {
            Some(stem) => (format!("{stem}.weight"), true),
            None => (name.to_string(), false),
        };
        let (wshape, wfan) = self
            .tensors()
            .into_iter()
            .find(|t| t.0 == weight)
            .map(|t| (t.1, t.2))?;
        self.fp8_block(&weight, &wshape, wfan)?;
        let (rows, cols) = (wshape[0], wshape[1]);
        // (codes: one E4M3 or two E2M1 to a byte; E8M0 exponents; value of a code, its scale)
        let (codes, exps, per_row, block_rows): (Vec<u8>, Vec<u8>, usize, usize) =
            if self.is_routed_expert(&weight) {
                let codes = self.mxfp4_bytes(&weight, rows * cols / 2);
                let proj = if weight.ends_with(".w2.weight") {
                    "down_proj"
                } else {
                    "gate_up_proj"
                };
                let exps = self.mxfp4_bytes(&format!("{weight}/{proj}_scales"), rows * cols / 32);
                (codes, exps, cols / 32, 1)
            } else {
                let (codes, scales) = self.fp8_draw(&weight, &wshape, wfan, b);
                let exps = scales
                    .iter()
                    .map(|s| (s.log2().floor() as i32 + 127).clamp(1, 254) as u8)
                    .collect();
                (codes, exps, cols.div_ceil(b), b)
            };
        if want_scale {
            return Some(exps);
        }
        if !dequantized {
            return Some(codes);
        }
        // code * 2^(e - 127), computed apart from the loader's views: E2M1 by its table.
        const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        let fp4 = self.is_routed_expert(&weight);
        let es = self.dtype.size();
        let mut out = vec![0u8; rows * cols * es];
        for r in 0..rows {
            for c in 0..cols {
                let (v, k) = if fp4 {
                    let nibble = codes[(r * cols + c) / 2] >> (4 * (c % 2)) & 15;
                    let v = E2M1[(nibble & 7) as usize];
                    (if nibble & 8 != 0 { -v } else { v }, r * per_row + c / 32)
                } else {
                    let v = flashpack::convert::tensor::e4m3_to_f32(codes[r * cols + c]);
                    (v, (r / block_rows) * per_row + c / b)
                };
                let x = v * (exps[k] as f32 - 127.0).exp2();
                self.dtype
                    .write(x, &mut out[(r * cols + c) * es..(r * cols + c + 1) * es]);
            }
        }
        Some(out)
    }

    /// FP8 codes and block scales of a weight: codes of magnitude 2^-6 .. 3.75 with a random
    /// sign, scales `(1 + u) / (2 sqrt(fan_in))`, from the name's seed.
    fn fp8_draw(
        &self,
        name: &str,
        shape: &[usize],
        fan_in: usize,
        block: usize,
    ) -> (Vec<u8>, Vec<f32>) {
        let mut rng = SplitMix64(
            fnv1a(name.as_bytes()) ^ self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xF8,
        );
        let codes = (0..shape[0] * shape[1])
            .map(|_| {
                let r = rng.next();
                let sign = ((r & 1) as u8) << 7;
                let exp = 1 + ((r >> 8) % 8) as u8;
                let man = ((r >> 16) % 8) as u8;
                sign | (exp << 3) | man
            })
            .collect();
        let n = shape[0].div_ceil(block) * shape[1].div_ceil(block);
        let scales = (0..n)
            .map(|_| {
                let u = (rng.next() >> 40) as f32 / (1u64 << 24) as f32;
                (1.0 + u) / (2.0 * (fan_in as f32).sqrt())
            })
            .collect();
        (codes, scales)
    }

    fn is_sparse(&self, layer: usize) -> bool {
        if self.deepseek_moe() || self.arch == Arch::KimiK3 {
            return layer >= self.first_k_dense_replace;
        }
        (layer + 1) % self.decoder_sparse_step.max(1) == 0
    }

    fn expert_width(&self) -> usize {
        self.moe_intermediate_size
    }

    /// DeepSeek-V4.1's layers (`dsv41_config`): output groups of rank `head_dim`, 2
    /// hyper-connection streams; layer 0 attends to its window only, every later one also to
    /// layer 1's compressed latents (groups of 4), chosen by the indexers of layers 1 and 2
    /// (layer 3 on reuses layer 2's choice).
    fn dsv41_layers(&self) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
        let ratios = (0..self.num_layers)
            .map(|l| if l == 0 { 0 } else { 4 })
            .collect();
        let kv = (1..self.num_layers.min(2)).collect();
        let index = (1..self.num_layers.min(3)).collect();
        (ratios, kv, index)
    }

    /// DeepSeek-V4.1's output groups: the fewest (2 or more) whose heads' width per group is a
    /// multiple of 64, so mlx-lm quantizes `o_a_proj` at group 64 (an unquantized one would run
    /// MLX's `gather_mm`, float32 only on the CPU); 2 when none is.
    fn dsv41_groups(&self) -> usize {
        let width = self.num_heads * self.head_dim;
        (2..=self.num_heads)
            .find(|g| self.num_heads % g == 0 && (width / g) % 64 == 0)
            .unwrap_or(2)
    }

    /// DeepSeek-V4.1's tensors under mlx-lm's names (written under upstream's: `disk_name`),
    /// `wo_a` as upstream stores it (`[o_groups * o_lora_rank, in]`), and one MTP tensor.
    fn dsv41_tensors(&self) -> Vec<(String, Vec<usize>, usize)> {
        let (h, e, i, d) = (
            self.hidden_size,
            self.num_experts,
            self.expert_width(),
            self.head_dim,
        );
        let (heads, qr, groups, hc) = (
            self.num_heads,
            self.q_lora_rank.unwrap_or(64),
            self.dsv41_groups(),
            2,
        );
        let (ih, id) = (self.index_heads, self.index_head_dim);
        let (ratios, kv_src, index_src) = self.dsv41_layers();
        let names = self.arch.names();
        let mut t = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
            4,
        )];
        for (l, &ratio) in ratios.iter().enumerate() {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let mut add = |n: String, shape: Vec<usize>, fan_in: usize| t.push((n, shape, fan_in));
            add(format!("{a}.q_a_proj.weight"), vec![qr, h], h);
            add(format!("{a}.q_a_norm.weight"), vec![qr], 0);
            add(format!("{a}.q_b_proj.weight"), vec![heads * d, qr], qr);
            add(format!("{a}.kv_proj.weight"), vec![d, h], h);
            add(format!("{a}.kv_norm.weight"), vec![d], 0);
            let per_group = heads * d / groups;
            add(
                format!("{a}.o_a_proj.weight"),
                vec![groups * d, per_group],
                per_group,
            );
            add(
                format!("{a}.o_b_proj.weight"),
                vec![h, groups * d],
                groups * d,
            );
            add(format!("{a}.sinks"), vec![heads], 0);
            if kv_src.contains(&l) {
                add(format!("{a}.compressor.kv_proj.weight"), vec![d, h], h);
                if ratio > 1 {
                    add(format!("{a}.compressor.gate_proj.weight"), vec![d, h], h);
                }
                add(format!("{a}.compressor.kv_norm.weight"), vec![d], 0);
            }
            if index_src.contains(&l) {
                add(
                    format!("{a}.indexer.q_b_proj.weight"),
                    vec![ih * id, qr],
                    qr,
                );
                add(format!("{a}.indexer.weights_proj.weight"), vec![ih, h], h);
                if kv_src.contains(&l) {
                    add(format!("{a}.indexer.k_proj.weight"), vec![id, d], d);
                    add(format!("{a}.indexer.k_norm.weight"), vec![id], 0);
                }
            }
            add(format!("{p}.input_layernorm.weight"), vec![h], 0);
            add(format!("{p}.post_attention_layernorm.weight"), vec![h], 0);
            let mix = (2 + hc) * hc;
            for kind in ["attn_hc", "ffn_hc"] {
                add(format!("{p}.{kind}.fn"), vec![mix, hc * h], hc * h);
                add(format!("{p}.{kind}.base"), vec![mix], 0);
                add(format!("{p}.{kind}.scale"), vec![3], 0);
            }
            add(names.router(l), vec![e, h], h);
            add(
                format!("{p}.mlp.gate.e_score_correction_bias"),
                vec![e],
                100,
            );
            if self.layout == FixtureLayout::Fused {
                add(
                    format!("{p}.mlp.experts.gate_up_proj"),
                    vec![e, 2 * i, h],
                    h,
                );
                add(format!("{p}.mlp.experts.down_proj"), vec![e, h, i], i);
            } else {
                for x in 0..e {
                    for (proj, shape, fan_in) in [
                        (Proj::Gate, vec![i, h], h),
                        (Proj::Up, vec![i, h], h),
                        (Proj::Down, vec![h, i], i),
                    ] {
                        add(names.expert(l, x, proj, Part::Weight), shape, fan_in);
                    }
                }
            }
            for (proj, shape, fan_in) in [
                ("gate_proj", vec![i, h], h),
                ("up_proj", vec![i, h], h),
                ("down_proj", vec![h, i], i),
            ] {
                add(
                    format!("{p}.mlp.shared_experts.{proj}.weight"),
                    shape,
                    fan_in,
                );
            }
        }
        t.push(("model.norm.weight".into(), vec![h], 0));
        t.push(("lm_head.weight".into(), vec![self.vocab_size, h], h));
        t.push(("mtp.0.e_proj.weight".into(), vec![h, h], h));
        t
    }

    /// DeepSeek-V4.1's `config.json` (the fields of mlx-lm's `ModelArgs`).
    fn dsv41_config(&self) -> Value {
        let (ratios, kv, index) = self.dsv41_layers();
        let mut c = json!({
            "architectures": ["DeepseekV41ForCausalLM"],
            "model_type": "deepseek_v41",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "head_dim": self.head_dim,
            "q_lora_rank": self.q_lora_rank.unwrap_or(64),
            // A rotated tail narrower than the head (the tiny spec's 32 is its whole head).
            "qk_rope_head_dim": self.qk_rope_head_dim.min(self.head_dim / 2),
            "o_groups": self.dsv41_groups(),
            "o_lora_rank": self.head_dim,
            "moe_intermediate_size": self.expert_width(),
            "n_routed_experts": self.num_experts,
            "num_experts_per_tok": self.top_k,
            "scoring_func": "sqrtsoftplus",
            "norm_topk_prob": true,
            "routed_scaling_factor": 1.5,
            "swiglu_limit": self.swiglu_limit,
            "rms_norm_eps": 1e-6,
            "sliding_window": self.sliding_window,
            "compress_ratios": ratios,
            "kv_source_layer_ids": kv,
            "index_source_layer_ids": index,
            "compress_rope_theta": 160000.0,
            "candidate_source_layer_id": -1,
            "index_n_heads": self.index_heads,
            "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk,
            "rope_theta": 10000.0,
            "max_position_embeddings": 4096,
            "hc_mult": 2,
            "hc_sinkhorn_iters": 20,
            "hc_eps": 1e-6,
            "tie_word_embeddings": false,
            "torch_dtype": "bfloat16",
            "bos_token_id": 0,
            "eos_token_id": 1,
        });
        if let Fp8Fixture::Blocks(b) = self.fp8 {
            c["quantization_config"] = json!({
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [b, b],
            });
        }
        if let Fp8Fixture::Release(b) = self.fp8 {
            c["quantization_config"] = json!({
                "quant_method": "fp8",
                "fmt": "e4m3",
                "scale_fmt": "ue8m0",
                "activation_scheme": "dynamic",
                "weight_block_size": [b, b],
            });
            c["expert_dtype"] = json!("fp4");
        }
        c
    }

    /// Kimi-K3's upstream name of a name as the fixture lists it (mlx-lm's block and residual
    /// names, the attention's parts apart): a sparse layer's `mlp` is `block_sparse_moe`, a
    /// residual's `<src>_proj.weight` is `<src>.proj_weight`, and in the multimodal layout the
    /// text model is under `language_model.` (the inverse of the table entry's rename).
    fn kimi_k3_upstream_name(&self, name: &str) -> String {
        if self.is_vision(name) {
            return name.to_string();
        }
        let mut n = name.to_string();
        if let Some(l) = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse::<usize>().ok())
        {
            if self.is_sparse(l) {
                n = n.replace(
                    &format!("layers.{l}.mlp."),
                    &format!("layers.{l}.block_sparse_moe."),
                );
            }
            // Upstream puts the selection bias on the gate or on the block: the multimodal
            // layout on the gate, the text-only one on the block, so that both are read.
            if !self.multimodal {
                n = n.replace(".gate.e_score_correction_bias", ".e_score_correction_bias");
            }
        }
        for src in ["self_attention_res", "mlp_res", "output_attn_res"] {
            for part in ["proj", "norm"] {
                n = n.replace(
                    &format!(".{src}_{part}.weight"),
                    &format!(".{src}.{part}_weight"),
                );
            }
        }
        if self.multimodal {
            n = format!("language_model.{n}");
        }
        n
    }

    /// Kimi-K3's tensors (see [`Self::kimi_k3_upstream_name`] for their names on disk): Kimi
    /// Delta Attention with its parts apart (`q/k/v_proj`, `q/k/v_conv1d` `[P, 1, K]`, `A_log`
    /// `[1, 1, heads, 1]` and `dt_bias` in f32) on the linear layers, MLA with its output gate and
    /// `kv_b_proj` on the others, SiTU MLPs, 4 expert groups when the experts split so, one
    /// shared expert, the attention residuals' projections and norms, an MTP tensor, and in the
    /// multimodal layout a vision tower and projector.
    fn kimi_k3_tensors(&self) -> Vec<(String, Vec<usize>, usize)> {
        let (h, e, i) = (self.hidden_size, self.num_experts, self.expert_width());
        let names = self.arch.names();
        let mut t = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
            4,
        )];
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let mut add = |n: String, s: Vec<usize>, fan: usize| t.push((n, s, fan));
            add(format!("{p}.input_layernorm.weight"), vec![h], 0);
            add(format!("{p}.post_attention_layernorm.weight"), vec![h], 0);
            if self.attn_res_block_size > 0 {
                for src in ["self_attention_res", "mlp_res"] {
                    add(format!("{p}.{src}_proj.weight"), vec![1, h], h);
                    add(format!("{p}.{src}_norm.weight"), vec![h], 0);
                }
            }
            if self.is_linear(l) {
                let (heads, d, k) = (
                    self.linear_value_heads,
                    self.linear_key_head_dim,
                    self.conv_kernel,
                );
                let pd = heads * d;
                for x in ["q", "k", "v"] {
                    add(format!("{a}.{x}_proj.weight"), vec![pd, h], h);
                    add(format!("{a}.{x}_conv1d.weight"), vec![pd, 1, k], k);
                }
                add(format!("{a}.f_a_proj.weight"), vec![d, h], h);
                add(format!("{a}.f_b_proj.weight"), vec![pd, d], d);
                add(format!("{a}.b_proj.weight"), vec![heads, h], h);
                if self.full_rank_gate {
                    add(format!("{a}.g_proj.weight"), vec![pd, h], h);
                } else {
                    add(format!("{a}.g_a_proj.weight"), vec![d, h], h);
                    add(format!("{a}.g_b_proj.weight"), vec![pd, d], d);
                }
                // Small, like log(uniform(1, 16)) shrunk: decays near exp(-softplus(.)).
                add(format!("{a}.A_log"), vec![1, 1, heads, 1], 100);
                add(format!("{a}.dt_bias"), vec![pd], 100);
                add(format!("{a}.o_norm.weight"), vec![d], 0);
                add(format!("{a}.o_proj.weight"), vec![h, pd], pd);
            } else {
                let (d, heads) = (self.head_dim, self.num_heads);
                self.mla_projections(&a, &mut add);
                add(format!("{a}.g_proj.weight"), vec![heads * d, h], h);
                add(format!("{a}.o_proj.weight"), vec![h, heads * d], heads * d);
            }
            if !self.is_sparse(l) {
                let m = self.intermediate_size;
                add(format!("{p}.mlp.gate_proj.weight"), vec![m, h], h);
                add(format!("{p}.mlp.up_proj.weight"), vec![m, h], h);
                add(format!("{p}.mlp.down_proj.weight"), vec![h, m], m);
                continue;
            }
            add(names.router(l), vec![e, h], h);
            // Small, like a trained bias: values near 0.1 (fan_in 100), f32.
            add(
                format!("{p}.mlp.gate.e_score_correction_bias"),
                vec![e],
                100,
            );
            for (proj, shape, fan_in) in [
                ("gate_proj", vec![i, h], h),
                ("up_proj", vec![i, h], h),
                ("down_proj", vec![h, i], i),
            ] {
                add(
                    format!("{p}.mlp.shared_experts.{proj}.weight"),
                    shape,
                    fan_in,
                );
            }
            // The experts' width: the latent MoE's, around which a down and an up projection.
            let x_w = if self.latent_size > 0 {
                let d = self.latent_size;
                add(
                    format!("{p}.mlp.routed_expert_down_proj.weight"),
                    vec![d, h],
                    h,
                );
                add(
                    format!("{p}.mlp.routed_expert_up_proj.weight"),
                    vec![h, d],
                    d,
                );
                if self.latent_norm {
                    add(format!("{p}.mlp.routed_expert_norm.weight"), vec![d], 0);
                }
                d
            } else {
                h
            };
            for x in 0..e {
                add(
                    names.expert(l, x, Proj::Gate, Part::Weight),
                    vec![i, x_w],
                    x_w,
                );
                add(
                    names.expert(l, x, Proj::Up, Part::Weight),
                    vec![i, x_w],
                    x_w,
                );
                add(
                    names.expert(l, x, Proj::Down, Part::Weight),
                    vec![x_w, i],
                    i,
                );
            }
        }
        if self.attn_res_block_size > 0 {
            t.push(("model.output_attn_res_proj.weight".into(), vec![1, h], h));
            t.push(("model.output_attn_res_norm.weight".into(), vec![h], 0));
        }
        t.push(("model.norm.weight".into(), vec![h], 0));
        t.push(("lm_head.weight".into(), vec![self.vocab_size, h], h));
        // The multi-token-prediction module, which the loader drops.
        t.push(("model.mtp.0.e_proj.weight".into(), vec![h, h], h));
        if self.multimodal {
            t.push((
                "vision_tower.patch_embed.proj.weight".into(),
                vec![h, 48],
                48,
            ));
            t.push(("mm_projector.proj.0.weight".into(), vec![h, h], h));
        }
        t
    }

    /// Kimi-K3's `config.json` (the fields of mlx-lm's `TextArgs`), under `text_config` beside
    /// a vision config in the multimodal layout.
    fn kimi_k3_config(&self) -> Value {
        let kda: Vec<usize> = (0..self.num_layers)
            .filter(|&l| self.is_linear(l))
            .map(|l| l + 1)
            .collect();
        let (n_group, topk_group) = self.groups();
        let mut text = json!({
            "architectures": ["KimiK3ForCausalLM"],
            "model_type": "kimi_k3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": false,
            "hidden_act": "situ",
            "activation_situ_beta": 1.5,
            "activation_situ_linear_beta": 3.0,
            "attn_res_block_size": (self.attn_res_block_size > 0).then_some(self.attn_res_block_size),
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.head_dim,
            "mla_use_nope": true,
            "mla_use_output_gate": true,
            "num_experts": self.num_experts,
            "num_experts_per_token": self.top_k,
            "num_shared_experts": 1,
            "moe_router_activation_func": "sigmoid",
            "moe_renormalize": true,
            "routed_scaling_factor": 2.5,
            "first_k_dense_replace": self.first_k_dense_replace,
            "moe_layer_freq": 1,
            "use_grouped_topk": true,
            "num_expert_group": n_group,
            "topk_group": topk_group,
            "linear_attn_config": {
                "kda_layers": kda,
                "num_heads": self.linear_value_heads,
                "head_dim": self.linear_key_head_dim,
                "short_conv_kernel_size": self.conv_kernel,
                "gate_lower_bound": self.gate_lower_bound,
                "use_full_rank_gate": self.full_rank_gate,
            },
            "routed_expert_hidden_size": (self.latent_size > 0).then_some(self.latent_size),
            "latent_moe_use_norm": self.latent_norm,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "torch_dtype": "bfloat16",
        });
        if let Fp8Fixture::Blocks(b) = self.fp8 {
            text["quantization_config"] = json!({
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [b, b],
            });
        }
        if !self.multimodal {
            return text;
        }
        let quant = text
            .as_object_mut()
            .and_then(|t| t.remove("quantization_config"));
        let mut wrapped = json!({
            "architectures": ["KimiK3ForConditionalGeneration"],
            "model_type": "kimi_k3",
            "text_config": text,
            "vision_config": {"model_type": "moonvit", "hidden_size": self.hidden_size},
            "tie_word_embeddings": false,
            "bos_token_id": 0,
            "eos_token_id": 1,
        });
        if let Some(q) = quant {
            wrapped["quantization_config"] = q;
        }
        wrapped
    }

    /// Every tensor as (name, shape, fan_in for the value scale; 0 means a norm weight).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, usize)> {
        if self.arch == Arch::Gemma4Text {
            return self.gemma4_tensors();
        }
        if self.arch == Arch::KimiK3 {
            return self.kimi_k3_tensors();
        }
        if self.arch == Arch::DeepseekV41 {
            return self.dsv41_tensors();
        }
        let (h, e, i) = (self.hidden_size, self.num_experts, self.expert_width());
        let (q, kv) = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        );
        let names = self.arch.names();
        let mut t = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
            4,
        )];
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            let mut add = |n: String, s: Vec<usize>, fan: usize| t.push((n, s, fan));
            add(format!("{p}.input_layernorm.weight"), vec![h], 0);
            add(format!("{p}.post_attention_layernorm.weight"), vec![h], 0);
            let a = format!("{p}.self_attn");
            if self.is_linear(l) {
                let la = format!("{p}.linear_attn");
                let (nk, nv) = (self.linear_key_heads, self.linear_value_heads);
                let (kd, vd) = (
                    nk * self.linear_key_head_dim,
                    nv * self.linear_value_head_dim,
                );
                let conv_dim = 2 * kd + vd;
                if self.arch == Arch::Qwen3Next {
                    add(
                        format!("{la}.in_proj_qkvz.weight"),
                        vec![2 * kd + 2 * vd, h],
                        h,
                    );
                    add(format!("{la}.in_proj_ba.weight"), vec![2 * nv, h], h);
                } else {
                    add(format!("{la}.in_proj_qkv.weight"), vec![conv_dim, h], h);
                    add(format!("{la}.in_proj_z.weight"), vec![vd, h], h);
                    add(format!("{la}.in_proj_b.weight"), vec![nv, h], h);
                    add(format!("{la}.in_proj_a.weight"), vec![nv, h], h);
                }
                // Hugging Face's Conv1d layout [out, in / groups, K].
                let k = self.conv_kernel;
                add(format!("{la}.conv1d.weight"), vec![conv_dim, 1, k], k);
                add(format!("{la}.dt_bias"), vec![nv], 0);
                // Small, like log(uniform(0, 16)) shrunk: decays near exp(-softplus(.)).
                add(format!("{la}.A_log"), vec![nv], 100);
                add(
                    format!("{la}.norm.weight"),
                    vec![self.linear_value_head_dim],
                    0,
                );
                add(format!("{la}.out_proj.weight"), vec![h, vd], vd);
            } else if self.mla() {
                let (d, heads) = (self.head_dim, self.num_heads);
                self.mla_projections(&a, &mut add);
                add(format!("{a}.o_proj.weight"), vec![h, heads * d], heads * d);
                if let (true, Some(r)) = (self.dsa(), self.q_lora_rank) {
                    let (ih, id) = (self.index_heads, self.index_head_dim);
                    let x = format!("{a}.indexer");
                    add(format!("{x}.wq_b.weight"), vec![ih * id, r], r);
                    add(format!("{x}.wk.weight"), vec![id, h], h);
                    add(format!("{x}.k_norm.weight"), vec![id], 0);
                    add(format!("{x}.k_norm.bias"), vec![id], 4);
                    add(format!("{x}.weights_proj.weight"), vec![ih, h], h);
                }
            } else {
                // Qwen3-Next's q_proj also gives the output gate.
                let q_rows = if self.hybrid() { 2 * q } else { q };
                for (n, out) in [("q_proj", q_rows), ("k_proj", kv), ("v_proj", kv)] {
                    add(format!("{a}.{n}.weight"), vec![out, h], h);
                    if matches!(self.arch, Arch::Qwen2Moe | Arch::Glm4Moe | Arch::GptOss) {
                        add(format!("{a}.{n}.bias"), vec![out], h);
                    }
                }
                add(format!("{a}.o_proj.weight"), vec![h, q], q);
                if self.arch == Arch::GptOss {
                    add(format!("{a}.o_proj.bias"), vec![h], q);
                    // One sink logit per head, of the order of the attention logits (std 1).
                    add(format!("{a}.sinks"), vec![self.num_heads], 1);
                }
            }
            match self.arch {
                _ if self.is_linear(l) => {}
                Arch::Qwen3Moe | Arch::Glm4Moe | Arch::Qwen3Next | Arch::Qwen35Moe => {
                    add(
                        format!("{p}.self_attn.q_norm.weight"),
                        vec![self.head_dim],
                        0,
                    );
                    add(
                        format!("{p}.self_attn.k_norm.weight"),
                        vec![self.head_dim],
                        0,
                    );
                }
                Arch::Olmoe | Arch::Minimax => {
                    add(format!("{p}.self_attn.q_norm.weight"), vec![q], 0);
                    add(format!("{p}.self_attn.k_norm.weight"), vec![kv], 0);
                }
                _ => {}
            }
            if !self.is_sparse(l) {
                let d = self.intermediate_size;
                add(format!("{p}.mlp.gate_proj.weight"), vec![d, h], h);
                add(format!("{p}.mlp.up_proj.weight"), vec![d, h], h);
                add(format!("{p}.mlp.down_proj.weight"), vec![h, d], d);
                continue;
            }
            add(names.router(l), vec![e, h], h);
            if self.arch == Arch::Minimax {
                // On the block, not the gate (MiniMaxSparseMoeBlock.e_score_correction_bias).
                add(
                    format!("{p}.block_sparse_moe.e_score_correction_bias"),
                    vec![e],
                    100,
                );
            }
            if self.arch == Arch::GptOss {
                assert!(
                    h % 32 == 0 && i % 32 == 0,
                    "gpt-oss's MXFP4 experts need widths in blocks of 32 (hidden {h}, expert {i})"
                );
                // Router bias near 0.1 (fan_in 100); expert biases of std 0.5 (fan_in 4), so
                // that they matter. Gate and up rows interleave (gate the even rows), in the
                // codes, the exponents and the biases alike.
                let x = format!("{p}.mlp.experts");
                add(format!("{p}.mlp.router.bias"), vec![e], 100);
                add(
                    format!("{x}.gate_up_proj_blocks"),
                    vec![e, 2 * i, h / 32, 16],
                    h,
                );
                add(
                    format!("{x}.gate_up_proj_scales"),
                    vec![e, 2 * i, h / 32],
                    h,
                );
                add(format!("{x}.gate_up_proj_bias"), vec![e, 2 * i], 4);
                add(format!("{x}.down_proj_blocks"), vec![e, h, i / 32, 16], i);
                add(format!("{x}.down_proj_scales"), vec![e, h, i / 32], i);
                add(format!("{x}.down_proj_bias"), vec![e, h], 4);
                continue;
            }
            if self.deepseek_moe() {
                // Small, like a trained bias: values near 0.1 (fan_in 100).
                add(
                    format!("{p}.mlp.gate.e_score_correction_bias"),
                    vec![e],
                    100,
                );
                let s = self.moe_intermediate_size;
                add(
                    format!("{p}.mlp.shared_experts.gate_proj.weight"),
                    vec![s, h],
                    h,
                );
                add(
                    format!("{p}.mlp.shared_experts.up_proj.weight"),
                    vec![s, h],
                    h,
                );
                add(
                    format!("{p}.mlp.shared_experts.down_proj.weight"),
                    vec![h, s],
                    s,
                );
            }
            match self.layout {
                FixtureLayout::PerExpert => {
                    for x in 0..e {
                        add(names.expert(l, x, Proj::Gate, Part::Weight), vec![i, h], h);
                        add(names.expert(l, x, Proj::Up, Part::Weight), vec![i, h], h);
                        add(names.expert(l, x, Proj::Down, Part::Weight), vec![h, i], i);
                    }
                }
                FixtureLayout::Fused => {
                    // transformers 5.x keeps the fused experts under `mlp` for every arch.
                    add(
                        format!("{p}.mlp.experts.gate_up_proj"),
                        vec![e, 2 * i, h],
                        h,
                    );
                    add(format!("{p}.mlp.experts.down_proj"), vec![e, h, i], i);
                }
            }
            if matches!(
                self.arch,
                Arch::Qwen2Moe | Arch::Qwen3Next | Arch::Qwen35Moe
            ) {
                let s = self.shared_expert_intermediate_size;
                add(
                    format!("{p}.mlp.shared_expert.gate_proj.weight"),
                    vec![s, h],
                    h,
                );
                add(
                    format!("{p}.mlp.shared_expert.up_proj.weight"),
                    vec![s, h],
                    h,
                );
                add(
                    format!("{p}.mlp.shared_expert.down_proj.weight"),
                    vec![h, s],
                    s,
                );
                add(format!("{p}.mlp.shared_expert_gate.weight"), vec![1, h], h);
            }
        }
        t.push(("model.norm.weight".into(), vec![h], 0));
        t.push(("lm_head.weight".into(), vec![self.vocab_size, h], h));
        if self.hybrid() {
            // The multi-token-prediction module, which the loader drops.
            t.push(("mtp.fc.weight".into(), vec![h, 2 * h], 2 * h));
        }
        if self.arch == Arch::KimiK25 {
            // The vision tower and projector, which the loader drops.
            t.push((
                "vision_tower.patch_embed.proj.weight".into(),
                vec![h, 48],
                48,
            ));
            t.push(("mm_projector.proj.0.weight".into(), vec![h, h], h));
        }
        if self.multimodal {
            // A vision tower tensor, which the loader drops.
            t.push(("model.visual.merger.mlp.0.weight".into(), vec![h, h], h));
        }
        t
    }

    /// Gemma 4's tensors as transformers' `Gemma4ForCausalLM` names them (the multimodal
    /// layout puts them under `model.language_model.`, [`Self::disk_name`]): every layer has a
    /// dense GeGLU MLP, the fused experts `experts.gate_up_proj` `[E, 2I, H]` (gate rows first)
    /// and `experts.down_proj` `[E, H, I]`, a router `router.proj` with its `scale` and
    /// `per_expert_scale`, seven norms and a `layer_scalar`; the full-attention layers have
    /// `global_head_dim`-wide heads over `global_kv_heads` and no `v_proj`; tied embeddings.
    /// The layout ([`FixtureLayout`]) is ignored: upstream only writes fused experts.
    fn gemma4_tensors(&self) -> Vec<(String, Vec<usize>, usize)> {
        let (h, e, i) = (self.hidden_size, self.num_experts, self.expert_width());
        let types = self.gemma4_layer_types();
        let mut t = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
            4,
        )];
        for (l, ty) in types.iter().enumerate() {
            let p = format!("model.layers.{l}");
            let mut add = |n: String, s: Vec<usize>, fan: usize| t.push((n, s, fan));
            for norm in [
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
                "post_feedforward_layernorm_1",
                "pre_feedforward_layernorm_2",
                "post_feedforward_layernorm_2",
            ] {
                add(format!("{p}.{norm}.weight"), vec![h], 0);
            }
            let full = *ty == "full_attention";
            let (d, kvh) = if full {
                (self.global_head_dim, self.global_kv_heads)
            } else {
                (self.head_dim, self.num_kv_heads)
            };
            let a = format!("{p}.self_attn");
            let q = self.num_heads * d;
            add(format!("{a}.q_proj.weight"), vec![q, h], h);
            add(format!("{a}.k_proj.weight"), vec![kvh * d, h], h);
            if !full {
                add(format!("{a}.v_proj.weight"), vec![kvh * d, h], h);
            }
            add(format!("{a}.o_proj.weight"), vec![h, q], q);
            add(format!("{a}.q_norm.weight"), vec![d], 0);
            add(format!("{a}.k_norm.weight"), vec![d], 0);
            let m = self.intermediate_size;
            add(format!("{p}.mlp.gate_proj.weight"), vec![m, h], h);
            add(format!("{p}.mlp.up_proj.weight"), vec![m, h], h);
            add(format!("{p}.mlp.down_proj.weight"), vec![h, m], m);
            add(format!("{p}.router.proj.weight"), vec![e, h], h);
            add(format!("{p}.router.scale"), vec![h], 0);
            add(format!("{p}.router.per_expert_scale"), vec![e], 0);
            add(format!("{p}.experts.gate_up_proj"), vec![e, 2 * i, h], h);
            add(format!("{p}.experts.down_proj"), vec![e, h, i], i);
            add(format!("{p}.layer_scalar"), vec![1], 0);
        }
        t.push(("model.norm.weight".into(), vec![h], 0));
        if self.multimodal {
            // Vision modules, which the loader drops.
            t.push((
                "model.vision_tower.encoder.layers.0.mlp.gate_proj.linear.weight".into(),
                vec![h, h],
                h,
            ));
            t.push((
                "model.embed_vision.embedding_projection.weight".into(),
                vec![h, h],
                h,
            ));
        }
        t
    }

    /// Gemma 4's `config.json`, every key transformers' `Gemma4TextConfig` writes that the model
    /// reads: text-only (`gemma4_text`) or, with `multimodal`, `Gemma4Config`'s wrapper
    /// (`gemma4`, the text model under `text_config`, a vision config, and the top-level
    /// `vocab_size` mlx-lm's wrapper reads).
    fn gemma4_config(&self) -> Value {
        let dtype = match self.dtype {
            FloatDtype::Bf16 => "bfloat16",
            FloatDtype::F16 => "float16",
            FloatDtype::F32 => "float32",
        };
        let mut text = json!({
            "architectures": ["Gemma4ForCausalLM"],
            "model_type": "gemma4_text",
            "vocab_size": self.vocab_size,
            "vocab_size_per_layer_input": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "global_head_dim": self.global_head_dim,
            "num_global_key_value_heads": self.global_kv_heads,
            "attention_k_eq_v": true,
            "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": true,
            "attention_bias": false,
            "attention_dropout": 0.0,
            "sliding_window": self.sliding_window,
            "layer_types": self.gemma4_layer_types(),
            "final_logit_softcapping": 30.0,
            "hidden_size_per_layer_input": 0,
            "num_kv_shared_layers": 0,
            "use_double_wide_mlp": false,
            "enable_moe_block": true,
            "num_experts": self.num_experts,
            "top_k_experts": self.top_k,
            "moe_intermediate_size": self.moe_intermediate_size,
            "rope_parameters": {
                "full_attention": {
                    "partial_rotary_factor": 0.25,
                    "rope_theta": 1_000_000.0,
                    "rope_type": "proportional",
                },
                "sliding_attention": {"rope_theta": 10_000.0, "rope_type": "default"},
            },
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 1,
            "dtype": dtype,
        });
        if let Fp8Fixture::Blocks(b) = self.fp8 {
            text["quantization_config"] = json!({
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [b, b],
            });
        }
        if !self.multimodal {
            return text;
        }
        let quant = text
            .as_object_mut()
            .and_then(|t| t.remove("quantization_config"));
        let mut wrapped = json!({
            "architectures": ["Gemma4ForConditionalGeneration"],
            "model_type": "gemma4",
            "text_config": text,
            "vision_config": {"model_type": "gemma4_vision", "hidden_size": self.hidden_size},
            "audio_config": null,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": true,
            "dtype": dtype,
        });
        if let Some(q) = quant {
            wrapped["quantization_config"] = q;
        }
        wrapped
    }

    /// The `config.json` this spec describes.
    pub fn config(&self) -> Value {
        if self.arch == Arch::Gemma4Text {
            return self.gemma4_config();
        }
        if self.arch == Arch::KimiK3 {
            return self.kimi_k3_config();
        }
        if self.arch == Arch::DeepseekV41 {
            return self.dsv41_config();
        }
        let class = match self.arch {
            Arch::Qwen3Moe => "Qwen3MoeForCausalLM",
            Arch::Mixtral => "MixtralForCausalLM",
            Arch::Olmoe => "OlmoeForCausalLM",
            Arch::Qwen2Moe => "Qwen2MoeForCausalLM",
            Arch::DeepseekV3 => "DeepseekV3ForCausalLM",
            Arch::Glm4Moe => "Glm4MoeForCausalLM",
            Arch::Qwen3Next => "Qwen3NextForCausalLM",
            Arch::Qwen35Moe if self.multimodal => "Qwen3_5MoeForConditionalGeneration",
            Arch::Qwen35Moe => "Qwen3_5MoeForCausalLM",
            Arch::GptOss => "GptOssForCausalLM",
            Arch::KimiK25 => "KimiK25ForConditionalGeneration",
            Arch::DeepseekV32 => "DeepseekV32ForCausalLM",
            Arch::GlmMoeDsa => "GlmMoeDsaForCausalLM",
            Arch::Minimax => "MiniMaxM2ForCausalLM",
            Arch::Gemma4Text => "Gemma4ForCausalLM",
            Arch::DeepseekV41 => "DeepseekV41ForCausalLM",
            // `Arch` is non-exhaustive outside the library (this file is also test code there).
            #[allow(unreachable_patterns)]
            a => panic!("no fixture class name for {a:?}; add it here"),
        };
        let theta = match self.arch {
            Arch::Mixtral | Arch::Qwen2Moe => 1_000_000.0,
            Arch::GptOss => 150_000.0,
            _ => 10_000.0,
        };
        // Mixtral, OLMoE and gpt-oss have one `intermediate_size`, the experts' width.
        let intermediate = match self.arch {
            Arch::Mixtral | Arch::Olmoe | Arch::GptOss | Arch::Minimax => self.expert_width(),
            _ => self.intermediate_size,
        };
        let dtype = match self.dtype {
            FloatDtype::Bf16 => "bfloat16",
            FloatDtype::F16 => "float16",
            FloatDtype::F32 => "float32",
        };
        let mut c = json!({
            "architectures": [class],
            "model_type": self.arch.model_type(),
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "intermediate_size": intermediate,
            "num_experts_per_tok": self.top_k,
            "norm_topk_prob": self.arch != Arch::Olmoe,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": false,
            "attention_bias": false,
            "hidden_act": "silu",
            "bos_token_id": 0,
            "eos_token_id": 0,
            "dtype": dtype,
            "torch_dtype": dtype,
        });
        if matches!(
            self.arch,
            Arch::Qwen3Moe | Arch::Qwen2Moe | Arch::Qwen3Next | Arch::Qwen35Moe
        ) {
            c["moe_intermediate_size"] = json!(self.moe_intermediate_size);
            c["decoder_sparse_step"] = json!(self.decoder_sparse_step);
            c["mlp_only_layers"] = json!([]);
        }
        if self.arch == Arch::Qwen2Moe {
            c["shared_expert_intermediate_size"] = json!(self.shared_expert_intermediate_size);
            c["qkv_bias"] = json!(true);
        }
        if self.hybrid() {
            for (k, v) in [
                (
                    "shared_expert_intermediate_size",
                    json!(self.shared_expert_intermediate_size),
                ),
                (
                    "full_attention_interval",
                    json!(self.full_attention_interval),
                ),
                ("linear_num_key_heads", json!(self.linear_key_heads)),
                ("linear_num_value_heads", json!(self.linear_value_heads)),
                ("linear_key_head_dim", json!(self.linear_key_head_dim)),
                ("linear_value_head_dim", json!(self.linear_value_head_dim)),
                ("linear_conv_kernel_dim", json!(self.conv_kernel)),
                ("partial_rotary_factor", json!(0.25)),
                ("mtp_num_hidden_layers", json!(1)),
            ] {
                c[k] = v;
            }
        }
        if self.deepseek_moe() {
            let (n_group, topk_group) = self.groups();
            for (k, v) in [
                ("moe_intermediate_size", json!(self.moe_intermediate_size)),
                ("n_shared_experts", json!(1)),
                ("routed_scaling_factor", json!(2.5)),
                ("topk_method", json!("noaux_tc")),
                ("scoring_func", json!("sigmoid")),
                ("n_group", json!(n_group)),
                ("topk_group", json!(topk_group)),
                ("first_k_dense_replace", json!(self.first_k_dense_replace)),
                ("num_nextn_predict_layers", json!(0)),
            ] {
                c[k] = v;
            }
        }
        if self.mla() {
            c["num_key_value_heads"] = json!(self.num_heads);
            c["q_lora_rank"] = json!(self.q_lora_rank);
            c["kv_lora_rank"] = json!(self.kv_lora_rank);
            c["qk_rope_head_dim"] = json!(self.qk_rope_head_dim);
            c["qk_nope_head_dim"] = json!(self.head_dim);
            c["v_head_dim"] = json!(self.head_dim);
            c["moe_layer_freq"] = json!(1);
        }
        if self.dsa() {
            c["index_n_heads"] = json!(self.index_heads);
            c["index_head_dim"] = json!(self.index_head_dim);
            c["index_topk"] = json!(self.index_topk);
        }
        if self.arch == Arch::Glm4Moe {
            c["partial_rotary_factor"] = json!(0.5);
            c["use_qk_norm"] = json!(true);
            c["attention_bias"] = json!(true);
        }
        if self.arch == Arch::GptOss {
            self.gpt_oss_config(&mut c);
        }
        if self.arch == Arch::Minimax {
            // MiniMax-M2's config.json: model_type minimax_m2 (mlx-lm maps it to minimax), half
            // of each head rotated, q/k norms over the full width, a sigmoid router with a bias.
            for (k, v) in [
                ("model_type", json!("minimax_m2")),
                ("rotary_dim", json!(self.head_dim / 2)),
                ("use_qk_norm", json!(true)),
                ("qk_norm_type", json!("per_layer")),
                ("scoring_func", json!("sigmoid")),
                ("use_routing_bias", json!(true)),
                ("shared_intermediate_size", json!(0)),
            ] {
                c[k] = v;
            }
        }
        // transformers 5.x writes num_local_experts for Qwen3-MoE and Mixtral (attribute_map),
        // num_experts for OLMoE and Qwen2-MoE; Mixtral's legacy key is num_local_experts too.
        let five_x_key = match self.arch {
            Arch::Qwen3Moe | Arch::Mixtral | Arch::GptOss | Arch::Minimax => "num_local_experts",
            Arch::DeepseekV3
            | Arch::Glm4Moe
            | Arch::KimiK25
            | Arch::DeepseekV32
            | Arch::GlmMoeDsa => "n_routed_experts",
            _ => "num_experts",
        };
        let legacy_key = match self.arch {
            Arch::Mixtral | Arch::GptOss | Arch::Minimax => "num_local_experts",
            Arch::DeepseekV3
            | Arch::Glm4Moe
            | Arch::KimiK25
            | Arch::DeepseekV32
            | Arch::GlmMoeDsa => "n_routed_experts",
            _ => "num_experts",
        };
        if let Fp8Fixture::Blocks(b) = self.fp8 {
            c["quantization_config"] = json!({
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": [b, b],
            });
        }
        if self.dialect != Dialect::Legacy {
            let mut p = json!({"rope_theta": theta, "rope_type": "default"});
            if let Some(Value::Object(sc)) = &self.rope_scaling {
                for (k, v) in sc {
                    let k = if k == "type" { "rope_type" } else { k.as_str() };
                    p[k] = v.clone();
                }
            }
            if self.hybrid() {
                p["partial_rotary_factor"] = json!(0.25);
            }
            c["rope_parameters"] = p;
            c[five_x_key] = json!(self.num_experts);
        }
        if self.dialect != Dialect::Transformers5 {
            c["rope_theta"] = json!(theta);
            c["rope_scaling"] = self.rope_scaling.clone().unwrap_or(Value::Null);
            c[legacy_key] = json!(self.num_experts);
        }
        if self.arch == Arch::KimiK25 {
            // KimiK25Config: a Kimi-K2 (DeepSeek-V3) text config beside a vision config.
            let mut text = c.clone();
            text["model_type"] = json!("kimi_k2");
            let quant = text
                .as_object_mut()
                .and_then(|t| t.remove("quantization_config"));
            let mut wrapped = json!({
                "architectures": c["architectures"].clone(),
                "model_type": "kimi_k25",
                "text_config": text,
                "vision_config": {"model_type": "moonvit", "hidden_size": self.hidden_size},
                "tie_word_embeddings": false,
                "bos_token_id": c["bos_token_id"].clone(),
                "eos_token_id": c["eos_token_id"].clone(),
            });
            // The loader reads an FP8 checkpoint's quantization_config at the top level.
            if let Some(q) = quant {
                wrapped["quantization_config"] = q;
            }
            return wrapped;
        }
        if self.multimodal {
            // Qwen3_5MoeConfig: the text model's fields under text_config.
            let mut text = c.clone();
            text["model_type"] = json!("qwen3_5_moe_text");
            return json!({
                "architectures": c["architectures"].clone(),
                "model_type": c["model_type"].clone(),
                "text_config": text,
                "vision_config": {"depth": 1, "hidden_size": self.hidden_size},
                "tie_word_embeddings": false,
                "eos_token_id": c["eos_token_id"].clone(),
            });
        }
        c
    }

    /// gpt-oss's keys, as openai/gpt-oss-20b's config.json spells them (no BOS): the experts' count in
    /// `num_local_experts` (set by the caller), top-k also as `experts_per_token`, the window and
    /// `layer_types`, the SwiGLU clamp, biases on attention, `rms_norm_eps` 1e-5, and the MXFP4
    /// `quantization_config` that names the modules left in bf16. `max_position_embeddings` is
    /// YaRN's `factor x original_max_position_embeddings` when the fixture has YaRN, as
    /// upstream (32 x 4096), which keeps transformers from warning that they disagree.
    fn gpt_oss_config(&self, c: &mut Value) {
        // Upstream has neither (no BOS token; the router always softmaxes the chosen k).
        if let Some(o) = c.as_object_mut() {
            o.remove("norm_topk_prob");
            o.remove("bos_token_id");
        }
        c["experts_per_token"] = json!(self.top_k);
        c["sliding_window"] = json!(self.sliding_window);
        c["layer_types"] = json!(self.layer_types());
        c["swiglu_limit"] = json!(self.swiglu_limit);
        c["attention_bias"] = json!(true);
        c["rms_norm_eps"] = json!(1e-5);
        c["quantization_config"] = json!({
            "quant_method": "mxfp4",
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
        });
        let yarn = self.rope_scaling.as_ref().and_then(|r| {
            let f = r.get("factor")?.as_f64()?;
            let n = r.get("original_max_position_embeddings")?.as_f64()?;
            Some((f * n) as u64)
        });
        if let Some(n) = yarn {
            c["max_position_embeddings"] = json!(n);
        }
    }

    /// Writes the checkpoint into `dir` (created if needed). Returns the weight bytes written.
    pub fn write(&self, dir: &Path) -> std::io::Result<u64> {
        std::fs::create_dir_all(dir)?;
        let cfg = serde_json::to_string_pretty(&self.config()).map_err(std::io::Error::other)?;
        std::fs::write(dir.join("config.json"), cfg)?;
        if let Some(src) = &self.tokenizer_from {
            for f in ["tokenizer.json", "tokenizer_config.json"] {
                std::fs::copy(src.join(f), dir.join(f))?;
            }
        }
        let tensors = self.file_tensors();
        let bytes_of =
            |d: Dtype, s: &[usize]| s.iter().map(|&d| d as u64).product::<u64>() * d.size() as u64;
        // Greedy shards in tensor order, like save_pretrained(max_shard_size=...).
        let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
        let mut fill = 0u64;
        for (k, (_, dtype, shape, _)) in tensors.iter().enumerate() {
            let n = bytes_of(*dtype, shape);
            if let Some(max) = self.max_shard_bytes {
                if fill > 0 && fill + n > max {
                    shards.push(Vec::new());
                    fill = 0;
                }
            }
            if let Some(s) = shards.last_mut() {
                s.push(k);
            }
            fill += n;
        }
        let count = shards.len();
        let file_name = |s: usize| {
            if self.max_shard_bytes.is_none() {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", s + 1, count)
            }
        };
        let mut weight_map = serde_json::Map::new();
        let mut total = 0u64;
        for (s, members) in shards.iter().enumerate() {
            let header: Vec<(String, Dtype, Vec<usize>)> = members
                .iter()
                .map(|&k| {
                    (
                        self.disk_name(&tensors[k].0),
                        tensors[k].1,
                        tensors[k].2.clone(),
                    )
                })
                .collect();
            let path = dir.join(file_name(s));
            let mut f = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(&path)?);
            f.write_all(&serialize_header(&header)?)?;
            for &k in members {
                let (name, _, shape, fan_in) = &tensors[k];
                let data = self.tensor_bytes(name, shape, *fan_in);
                f.write_all(&data)?;
                total += data.len() as u64;
                weight_map.insert(self.disk_name(name), json!(file_name(s)));
            }
            f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        if self.max_shard_bytes.is_some() {
            let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            let text = serde_json::to_string_pretty(&index).map_err(std::io::Error::other)?;
            std::fs::write(dir.join("model.safetensors.index.json"), text)?;
        }
        Ok(total)
    }

    /// The bytes of one tensor. Fused expert tensors are the per-expert tensors of the same
    /// spec concatenated (gate rows then up rows per expert), so both layouts hold one model.
    fn tensor_bytes(&self, name: &str, shape: &[usize], fan_in: usize) -> Vec<u8> {
        if self.is_mxfp4(name) {
            return self.mxfp4_bytes(name, shape.iter().product());
        }
        if let Some(bytes) = self.release_bytes(name) {
            return bytes;
        }
        if let Some(weight) = name.strip_suffix("_scale_inv") {
            let (wshape, wfan) = self
                .tensors()
                .into_iter()
                .find(|t| t.0 == weight)
                .map(|t| (t.1, t.2))
                .expect("the scales' weight");
            let b = self
                .fp8_block(weight, &wshape, wfan)
                .expect("an FP8 weight");
            let (_, scales) = self.fp8_draw(weight, &wshape, wfan, b);
            return scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        }
        if let Some(b) = self.fp8_block(name, shape, fan_in) {
            let (codes, scales) = self.fp8_draw(name, shape, fan_in, b);
            if matches!(self.fp8, Fp8Fixture::Blocks(_)) {
                return codes;
            }
            // The same values in the fixture's float type: e4m3 * scale in f32, then rounded.
            let scale_bytes: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
            let blocks = Fp8Blocks {
                scales: &scale_bytes,
                scale: BlockScale::Float(FloatDtype::F32),
                codes: BlockCodes::E4m3,
                block_rows: b,
                block_cols: b,
            };
            let m = MatrixView::fp8(shape[0], shape[1], &codes, blocks).expect("sizes");
            let es = self.dtype.size();
            let mut out = vec![0u8; shape[0] * shape[1] * es];
            let mut row = vec![0f32; shape[1]];
            for r in 0..shape[0] {
                m.row_f32(r, &mut row);
                self.dtype
                    .write_all(&row, &mut out[r * shape[1] * es..(r + 1) * shape[1] * es]);
            }
            return out;
        }
        let fused = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(l, rest)| Some((l.parse::<usize>().ok()?, rest)));
        let names = self.arch.names();
        match fused {
            Some((l, "mlp.experts.gate_up_proj" | "experts.gate_up_proj")) => (0..shape[0])
                .flat_map(|e| {
                    let piece = [shape[1] / 2, shape[2]];
                    let g = self.values(
                        &names.expert(l, e, Proj::Gate, Part::Weight),
                        &piece,
                        fan_in,
                    );
                    let u =
                        self.values(&names.expert(l, e, Proj::Up, Part::Weight), &piece, fan_in);
                    [g, u].concat()
                })
                .collect(),
            Some((l, "mlp.experts.down_proj" | "experts.down_proj")) => (0..shape[0])
                .flat_map(|e| {
                    let piece = [shape[1], shape[2]];
                    self.values(
                        &names.expert(l, e, Proj::Down, Part::Weight),
                        &piece,
                        fan_in,
                    )
                })
                .collect(),
            _ => self.values(name, shape, fan_in),
        }
    }

    /// gpt-oss's MXFP4 codes (`_blocks`: uniform bytes, two E2M1 codes each, the first in the
    /// low nibble) or E8M0 exponents (`_scales`: uniform in the projection's
    /// [`MXFP4_EXPONENTS`] range), drawn per chunk like [`Self::values`].
    pub fn mxfp4_bytes(&self, name: &str, n: usize) -> Vec<u8> {
        const CHUNK: usize = 1 << 16;
        let name_seed = fnv1a(name.as_bytes()) ^ self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let range = match name.strip_suffix("_scales") {
            None => 0..=255u8,
            Some(stem) => MXFP4_EXPONENTS
                .iter()
                .find(|(proj, _)| stem.ends_with(proj))
                .map(|(_, r)| r.clone())
                .expect("gate_up_proj or down_proj"),
        };
        let lo = *range.start() as u64;
        let span = *range.end() as u64 - lo + 1;
        let mut out = vec![0u8; n];
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, buf)| {
            let mut rng = SplitMix64(name_seed ^ (c as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
            for o in buf {
                *o = (lo + (rng.next() >> 32) % span) as u8;
            }
        });
        out
    }

    /// The bytes of one tensor: norms are `1 + 0.1 n`, the rest `n / sqrt(fan_in)`.
    fn values(&self, name: &str, shape: &[usize], fan_in: usize) -> Vec<u8> {
        const CHUNK: usize = 1 << 16;
        let n: usize = shape.iter().product();
        let dtype = self.tensor_dtype(name);
        let es = dtype.size();
        let mut out = vec![0u8; n * es];
        let name_seed = fnv1a(name.as_bytes()) ^ self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let (scale, offset) = if fan_in == 0 && self.offset_norm(name) {
            (0.1f32, 0.0f32)
        } else if fan_in == 0 {
            (0.1f32, 1.0f32)
        } else {
            (1.0 / (fan_in as f32).sqrt(), 0.0)
        };
        let skew = self.skew_terms(name);
        out.par_chunks_mut(CHUNK * es)
            .enumerate()
            .for_each(|(c, buf)| {
                let mut rng =
                    SplitMix64(name_seed ^ (c as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
                for (j, o) in buf.chunks_exact_mut(es).enumerate() {
                    let mut v = offset + scale * rng.normal();
                    if let Some((row_gain, u)) = &skew {
                        let i = c * CHUNK + j;
                        let h = u.len();
                        v += row_gain[i / h] * u[i % h];
                    }
                    dtype.write(v, o);
                }
            });
        out
    }

    /// With `routing_skew`: for the embeddings and the routers, a gain per row and the shared
    /// direction `u` (standard normal, one per model) to add as `gain[row] * u[col]`.
    fn skew_terms(&self, name: &str) -> Option<(Vec<f32>, Vec<f32>)> {
        if self.routing_skew <= 0.0 {
            return None;
        }
        let h = self.hidden_size;
        let normals = |key: &str, n: usize| -> Vec<f32> {
            let mut rng = SplitMix64(fnv1a(key.as_bytes()) ^ self.seed);
            (0..n).map(|_| rng.normal()).collect()
        };
        if name == "model.embed_tokens.weight" {
            // The random part has standard deviation 1/sqrt(4) = 0.5 (fan_in 4).
            return Some((
                vec![0.5 * self.routing_skew; self.vocab_size],
                normals("skew.u", h),
            ));
        }
        let layer =
            (0..self.num_layers).find(|&l| self.is_sparse(l) && self.router_name(l) == name)?;
        let gain = normals(&format!("skew.z.{layer}"), self.num_experts)
            .into_iter()
            .map(|z| 2.0 * z / h as f32)
            .collect();
        Some((gain, normals("skew.u", h)))
    }
}

/// FNV-1a: a stable hash of tensor names for seeding (std's hasher may change between
/// releases, which would change fixture bytes).
fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// SplitMix64: small, fast, and good enough for test weights.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Approximately standard normal: the sum of four 16-bit uniforms (Irwin-Hall), centred
    /// and scaled to unit variance. One generator call per value keeps 4 GB fixtures quick.
    fn normal(&mut self) -> f32 {
        let r = self.next();
        let s = (r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48);
        // mean 2 * 65535, variance 4 * 65536^2 / 12
        (s as f32 - 131_070.0) * (3.0f32.sqrt() / 65_536.0)
    }
}

/// DeepSeek-V4.1's upstream name of an mlx-lm name: the inverse of the renames of mlx-lm's
/// `deepseek_v41.py` `_rename` (and of flashpack's table entry).
pub fn dsv41_upstream_name(name: &str) -> String {
    match name {
        "model.embed_tokens.weight" => return "embed.weight".into(),
        "lm_head.weight" => return "head.weight".into(),
        _ => {}
    }
    let Some(rest) = name.strip_prefix("model.") else {
        return name.to_string();
    };
    let mut key = format!(".{rest}");
    for (from, to) in [
        (".shared_experts.gate_proj.", ".shared_experts.w1."),
        (".shared_experts.down_proj.", ".shared_experts.w2."),
        (".shared_experts.up_proj.", ".shared_experts.w3."),
        (".gate.e_score_correction_bias", ".gate.bias"),
        (".indexer.k_proj.", ".indexer.wk."),
        (".compressor.kv_norm.", ".compressor.norm."),
        (".q_a_norm.", ".q_norm."),
        (".o_b_proj.", ".wo_b."),
        (".o_a_proj.", ".wo_a."),
        (".gate_proj.", ".wgate."),
        (".kv_proj.", ".wkv."),
        (".q_b_proj.", ".wq_b."),
        (".q_a_proj.", ".wq_a."),
        (".sinks", ".attn_sink"),
        (".ffn_hc.", ".hc_ffn_"),
        (".attn_hc.", ".hc_attn_"),
        (".post_attention_layernorm.", ".ffn_norm."),
        (".input_layernorm.", ".attn_norm."),
        (".mlp.", ".ffn."),
        (".self_attn.", ".attn."),
    ] {
        key = key.replace(from, to);
    }
    key[1..].to_string()
}
