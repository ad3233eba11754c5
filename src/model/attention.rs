//! Self-attention with RoPE, grouped-query heads, optional q/k RMSNorm, attention sinks and a
//! sliding window.
//!
//! In: hidden states `[B, L, H]` and the layer's cache (`kv_cache.rs`, `rotating.rs` for a
//! sliding-window layer, or `quantized_kv.rs` under `--kv-bits`). Out: `[B, L, H]` and the cache grown by `L` positions. Invariant: keys
//! are cached after RoPE, so a cached key is always the key rotated for its own position; the
//! queries of a call sit at positions `offset .. offset + L`. Mirrors the `Attention` classes of
//! mlx-lm 0.32.2 (models/qwen3_moe.py, mixtral.py, olmoe.py, qwen2_moe.py, glm4_moe.py,
//! qwen3_next.py's gated attention, whose `q_proj` also gives a sigmoid gate on the output, and
//! gpt_oss.py's `AttentionBlock`: biases on q/k/v/o, a learned sink logit per head, and on the
//! sliding layers a `RotatingKVCache` of the window's size).

use super::kv_cache::{to_i32, LayerCache};
use super::layers::{check_shape, require, Linear, RmsNorm};
use super::quantized_kv::quantized_attention;
use super::weights::Weights;
use super::ComputeError;
use crate::arch::{Gemma4, ModelConfig, QkNorm};
use crate::mlx::fast::{self, Mask};
use crate::mlx::Array;

type Result<T> = std::result::Result<T, ComputeError>;

/// Rotary embedding as `mlx.nn.RoPE(dims, traditional, base, scale)` applies it, or as
/// mlx-lm's `YarnRoPE` does (explicit frequencies, inputs scaled by `mscale`).
#[derive(Debug, Clone)]
pub struct RopeSpec {
    pub dims: i32,
    pub traditional: bool,
    pub base: f32,
    pub scale: f32,
    pub yarn: Option<Yarn>,
}

/// Explicit frequencies (one per rotated pair) and an input scale: YaRN's, or Gemma 4's
/// proportional RoPE (scale 1).
#[derive(Debug, Clone)]
pub struct Yarn {
    pub mscale: f32,
    /// One frequency per rotated pair.
    freqs: Array,
}

/// The largest attention scale YaRN may give: real models give 1 to about 1.5, and a scale in
/// the thousands already overflows bf16 attention scores into NaN.
const MAX_YARN_MSCALE: f32 = 1e3;

impl Yarn {
    /// One frequency per rotated pair.
    pub(super) fn freqs(&self) -> &Array {
        &self.freqs
    }

    /// mlx-lm's `YarnRoPE(dims, base, scaling_factor, original_max_position_embeddings,
    /// beta_fast, beta_slow, mscale, mscale_all_dim)` (models/rope_utils.py): frequencies
    /// interpolated by `factor` below the correction range, kept above it, mixed linearly within.
    pub fn new(dims: usize, base: f64, scaling: &serde_json::Value) -> Result<Yarn> {
        let num =
            |k: &str, default: f64| scaling.get(k).and_then(|v| v.as_f64()).unwrap_or(default);
        let factor = num("factor", 0.0);
        let bad = |v: f64, min: f64| v.is_nan() || v <= min;
        if bad(factor, 0.0) || bad(base, 1.0) || dims < 2 {
            return Err(ComputeError::Unsupported {
                what: format!(
                    "yarn rope scaling with factor {factor} (rope_scaling.factor, above 0), \
                     base {base} (rope_theta, above 1), dims {dims}"
                ),
            });
        }
        let original = num("original_max_position_embeddings", 4096.0);
        let (beta_fast, beta_slow) = (num("beta_fast", 32.0), num("beta_slow", 1.0));
        let (mscale, mscale_all_dim) = (num("mscale", 1.0), num("mscale_all_dim", 0.0));
        let d = dims as f64;
        let correction_dim = |rotations: f64| {
            d * (original / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
        };
        let low = correction_dim(beta_fast).floor().max(0.0);
        let mut high = correction_dim(beta_slow).ceil().min(d - 1.0);
        if low == high {
            high += 0.001;
        }
        let get_mscale = |m: f64| {
            if factor <= 1.0 {
                1.0
            } else {
                0.1 * m * factor.ln() + 1.0
            }
        };
        let half = dims / 2;
        let freqs: Vec<f32> = (0..half)
            .map(|i| {
                // In f32, as MLX computes them.
                let extra = (base as f32).powf((2 * i) as f32 / dims as f32);
                let inter = factor as f32 * extra;
                let ramp = (((i as f64 - low) / (high - low)) as f32).clamp(0.0, 1.0);
                let mask = 1.0 - ramp;
                (inter * extra) / (inter * mask + extra * (1.0 - mask))
            })
            .collect();
        // Extreme `mscale`, `beta_*` or `original_max_position_embeddings` values give an
        // infinite or NaN scale or frequency, hence NaN logits: refused here, which `convert`
        // runs too (`Model::check_supported`).
        let m = (get_mscale(mscale) / get_mscale(mscale_all_dim)) as f32;
        if !(m > 0.0 && m <= MAX_YARN_MSCALE) || freqs.iter().any(|f| !f.is_finite()) {
            return Err(ComputeError::Unsupported {
                what: format!(
                    "yarn rope scaling with mscale {mscale}, mscale_all_dim {mscale_all_dim}, \
                     beta_fast {beta_fast}, beta_slow {beta_slow}, \
                     original_max_position_embeddings {original} (scale {m}: it must be in \
                     (0, {MAX_YARN_MSCALE}], and every frequency finite)"
                ),
            });
        }
        Ok(Yarn {
            mscale: m,
            freqs: Array::from_slice(&freqs, &[half])?,
        })
    }
}

impl RopeSpec {
    /// The RoPE of Gemma 4's full-attention layers (`rope_parameters.full_attention`) over heads
    /// of `dims` values, as mlx-lm's `initialize_rope(dims=head_dim, ...)` builds it:
    /// "proportional" is `ProportionalRoPE` (models/rope_utils.py): frequencies
    /// `factor * base^(i / dims)` for `i = 0, 2, .. < int(dims * partial_rotary_factor)` and
    /// infinite (no rotation) for the rest of the half-head pairs, through `mx.fast.rope(x, dims,
    /// freqs=...)`; "default" is `nn.RoPE(dims, base)` over the whole head.
    pub fn gemma4_global(g: &Gemma4, dims: usize, traditional: bool) -> Result<RopeSpec> {
        let rope = &g.global_rope;
        let num = |k: &str, default: f64| {
            rope.scaling
                .as_ref()
                .and_then(|s| s.get(k))
                .and_then(|v| v.as_f64())
                .unwrap_or(default)
        };
        let d = i32::try_from(dims).map_err(|_| ComputeError::Unsupported {
            what: format!("RoPE over {dims} values"),
        })?;
        let yarn = match rope.rope_type.as_str() {
            "default" => None,
            "proportional" => {
                let factor = num("factor", 1.0) as f32;
                let rotated = (dims as f64 * num("partial_rotary_factor", 1.0)) as usize;
                if rotated > dims || !(factor.is_finite() && factor > 0.0) {
                    return Err(ComputeError::Unsupported {
                        what: format!(
                            "proportional rope with factor {factor} rotating {rotated} of {dims} \
                             values"
                        ),
                    });
                }
                // exponents = mx.arange(0, rotated_dims, 2, dtype=mx.float32) / dims
                // freqs = concat([factor * base**exponents, full((dims - rotated) // 2, inf)])
                let base = rope.theta as f32;
                let mut freqs: Vec<f32> = (0..rotated)
                    .step_by(2)
                    .map(|i| factor * base.powf(i as f32 / dims as f32))
                    .collect();
                freqs.resize(freqs.len() + (dims - rotated) / 2, f32::INFINITY);
                let n = freqs.len();
                Some(Yarn {
                    mscale: 1.0,
                    freqs: Array::from_slice(&freqs, &[n])?,
                })
            }
            other => {
                return Err(ComputeError::Unsupported {
                    what: format!(
                        "rope_type {other:?} in rope_parameters.full_attention (the runtime \
                         implements \"proportional\" and \"default\" there)"
                    ),
                })
            }
        };
        Ok(RopeSpec {
            dims: d,
            traditional,
            base: rope.theta as f32,
            scale: 1.0,
            yarn,
        })
    }

    /// mlx-lm's `initialize_rope` (models/rope_utils.py) for the types the runtime supports:
    /// "default" (scale 1) and "linear" (scale 1 / factor).
    pub fn from_config(cfg: &ModelConfig) -> Result<RopeSpec> {
        let scale = match cfg.rope.rope_type.as_str() {
            "default" => 1.0,
            "linear" => {
                let factor = cfg
                    .rope
                    .scaling
                    .as_ref()
                    .and_then(|s| s.get("factor"))
                    .and_then(|f| f.as_f64())
                    .filter(|f| *f > 0.0 && (1.0 / *f as f32).is_finite())
                    .ok_or_else(|| ComputeError::Unsupported {
                        what:
                            "linear rope scaling without a positive `factor` (rope_scaling.factor)"
                                .into(),
                    })?;
                (1.0 / factor) as f32
            }
            "yarn" => 1.0,
            other => {
                return Err(ComputeError::Unsupported {
                    what: format!(
                        "rope_type {other:?} (the runtime implements \"default\", \"linear\" \
                         and \"yarn\")"
                    ),
                })
            }
        };
        let yarn = match cfg.rope.rope_type.as_str() {
            "yarn" => Some(Yarn::new(
                cfg.rope_dims(),
                cfg.rope.theta,
                cfg.rope
                    .scaling
                    .as_ref()
                    .unwrap_or(&serde_json::Value::Null),
            )?),
            _ => None,
        };
        Ok(RopeSpec {
            // nn.RoPE(int(head_dim * partial_rotary_factor)) (glm4_moe.py), qk_rope_head_dim
            // under MLA, else the whole head.
            dims: i32::try_from(cfg.rope_dims()).map_err(|_| ComputeError::Unsupported {
                what: format!("RoPE over {} values", cfg.rope_dims()),
            })?,
            traditional: cfg.rope.traditional,
            base: cfg.rope.theta as f32,
            scale,
            yarn,
        })
    }

    pub(super) fn apply(&self, x: &Array, offset: usize) -> Result<Array> {
        let offset = i32::try_from(offset).map_err(|_| ComputeError::Unsupported {
            what: format!("position {offset} beyond i32"),
        })?;
        if let Some(y) = &self.yarn {
            // x[..., :dims] = mscale * x[..., :dims]
            let x = if y.mscale == 1.0 {
                x.clone()
            } else {
                let m = Array::scalar(y.mscale as f64, x.dtype())?;
                let s = x.shape();
                let width = s.last().copied().unwrap_or(0);
                if width as i32 == self.dims {
                    x.mul(&m)?
                } else {
                    let stop: Vec<i32> = s.iter().map(|&d| d as i32).collect();
                    let mut mid = stop.clone();
                    *mid.last_mut().unwrap_or(&mut 0) = self.dims;
                    let mut start = vec![0i32; stop.len()];
                    let head = x.slice(&start, &mid)?.mul(&m)?;
                    *start.last_mut().unwrap_or(&mut 0) = self.dims;
                    let tail = x.slice(&start, &stop)?;
                    crate::mlx::concatenate(&[&head, &tail], -1)?
                }
            };
            return Ok(fast::rope_freqs(
                &x,
                self.dims,
                self.traditional,
                self.scale,
                offset,
                &y.freqs,
            )?);
        }
        Ok(fast::rope(
            x,
            self.dims,
            self.traditional,
            self.base,
            self.scale,
            offset,
        )?)
    }
}

/// Multi-head attention with grouped KV heads.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    /// `None`: the values are the keys before their norm (Gemma 4's `attention_k_eq_v`).
    v_proj: Option<Linear>,
    o_proj: Linear,
    /// Gemma 4: values are RMS-normed per head without a weight, with this epsilon.
    value_norm: Option<f32>,
    /// q/k RMSNorm and where it applies (per head for Qwen3-MoE, full width for OLMoE).
    qk_norm: Option<(QkNorm, RmsNorm, RmsNorm)>,
    heads: usize,
    kv_heads: usize,
    scale: f32,
    rope: RopeSpec,
    /// Qwen3-Next: `q_proj` also gives a per-head output gate.
    output_gate: bool,
    /// gpt-oss: one sink logit per query head (`self_attn.sinks` `[heads]`).
    sinks: Option<Array>,
    /// gpt-oss's sliding-window layers: the window, which is also the size of their cache.
    window: Option<usize>,
}

impl Attention {
    /// An attention of the config's head width and KV heads (`module`:
    /// `model.layers.L.self_attn`); [`Attention::load_layer`] for a given layer's.
    pub fn load(w: &dyn Weights, module: &str, cfg: &ModelConfig) -> Result<Attention> {
        Attention::load_as(w, module, cfg, None)
    }

    /// Layer `layer`'s attention: under Gemma 4 a full-attention layer has its own geometry.
    pub fn load_layer(
        w: &dyn Weights,
        module: &str,
        cfg: &ModelConfig,
        layer: usize,
    ) -> Result<Attention> {
        // Gemma 4's full-attention layers: their own head width, KV heads and RoPE, and values
        // that may be the keys.
        let global = cfg
            .gemma4
            .as_ref()
            .filter(|_| cfg.window_of(layer).is_none());
        Attention::load_as(w, module, cfg, global)
    }

    fn load_as(
        w: &dyn Weights,
        module: &str,
        cfg: &ModelConfig,
        global: Option<&Gemma4>,
    ) -> Result<Attention> {
        let (d, kv_heads) = match global {
            Some(g) => (g.global_head_dim, g.global_kv_heads),
            None => (cfg.head_dim, cfg.num_key_value_heads),
        };
        let k_eq_v = global.is_some_and(|g| g.k_eq_v);
        let h = cfg.hidden_size;
        let (q_out, kv_out) = (cfg.num_attention_heads * d, kv_heads * d);
        let qk_norm = match cfg.qk_norm {
            QkNorm::None => None,
            // self.q_norm = nn.RMSNorm(head_dim, eps)                  (qwen3_moe.py)
            QkNorm::PerHead => Some((
                QkNorm::PerHead,
                RmsNorm::load(w, &format!("{module}.q_norm"), d, cfg.rms_norm_eps)?,
                RmsNorm::load(w, &format!("{module}.k_norm"), d, cfg.rms_norm_eps)?,
            )),
            // self.q_norm = nn.RMSNorm(n_heads * head_dim, eps)        (olmoe.py)
            QkNorm::FullWidth => Some((
                QkNorm::FullWidth,
                RmsNorm::load(w, &format!("{module}.q_norm"), q_out, cfg.rms_norm_eps)?,
                RmsNorm::load(w, &format!("{module}.k_norm"), kv_out, cfg.rms_norm_eps)?,
            )),
        };
        // Qwen3NextAttention: q_proj is n_heads * head_dim * 2 wide (queries and the gate).
        let q_rows = if cfg.attn_output_gate {
            2 * q_out
        } else {
            q_out
        };
        // self.sinks = mx.zeros((num_attention_heads,)), loaded from the checkpoint.
        let sinks = if cfg.attention_sinks {
            let name = format!("{module}.sinks");
            let s = require(w, &name)?;
            check_shape(&name, &s, &[cfg.num_attention_heads])?;
            Some(s)
        } else {
            None
        };
        let rope = match global {
            Some(g) => RopeSpec::gemma4_global(g, d, cfg.rope.traditional)?,
            None => RopeSpec::from_config(cfg)?,
        };
        Ok(Attention {
            q_proj: Linear::load(w, &format!("{module}.q_proj"), q_rows, h)?,
            k_proj: Linear::load(w, &format!("{module}.k_proj"), kv_out, h)?,
            v_proj: if k_eq_v {
                None
            } else {
                Some(Linear::load(w, &format!("{module}.v_proj"), kv_out, h)?)
            },
            o_proj: Linear::load(w, &format!("{module}.o_proj"), h, q_out)?,
            // self.v_norm = RMSNormNoScale(self.head_dim, eps=config.rms_norm_eps)
            value_norm: cfg.gemma4.as_ref().map(|_| cfg.rms_norm_eps as f32),
            qk_norm,
            heads: cfg.num_attention_heads,
            kv_heads,
            scale: match cfg.gemma4 {
                // self.scale = 1.0 (gemma4_text.py)
                Some(_) => 1.0,
                // self.scale = head_dim**-0.5 (a Python float, passed to MLX as float)
                None => (d as f64).powf(-0.5) as f32,
            },
            rope,
            output_gate: cfg.attn_output_gate,
            sinks,
            window: None,
        })
    }

    /// The same attention on a sliding window of `window` positions (`None`: every position).
    pub fn windowed(self, window: Option<usize>) -> Attention {
        Attention { window, ..self }
    }

    /// The window of a sliding-window layer.
    pub fn window(&self) -> Option<usize> {
        self.window
    }

    /// `x` `[B, L, H]` -> `[B, L, H]`, reading and extending `cache` (a KV cache, or a rotating
    /// one on a sliding-window layer); `mask` is the one the cache gave before this call
    /// ([`LayerCache::mask`]).
    pub fn forward(&self, x: &Array, mask: Mask<'_>, cache: &mut LayerCache) -> Result<Array> {
        let s = x.shape();
        let (b, l) = (to_i32(s[0])?, to_i32(s[1])?);
        let (hq, hkv) = (to_i32(self.heads)?, to_i32(self.kv_heads)?);
        let (mut q, mut k) = (self.q_proj.forward(x)?, self.k_proj.forward(x)?);
        let mut gate = None;
        if self.output_gate {
            // queries, gate = mx.split(q_proj_output.reshape(B, L, n_heads, -1), 2, axis=-1)
            let both = q.reshape(&[b, l, hq, -1])?;
            let d = both.dim(-1).unwrap_or(0) as i32 / 2;
            q = both.slice(&[0, 0, 0, 0], &[b, l, hq, d])?;
            // gate = gate.reshape(B, L, -1)
            gate = Some(
                both.slice(&[0, 0, 0, d], &[b, l, hq, 2 * d])?
                    .reshape(&[b, l, -1])?,
            );
        }
        // values = keys (gemma4_text.py with attention_k_eq_v: before k_norm)
        let v = match &self.v_proj {
            Some(v_proj) => v_proj.forward(x)?,
            None => k.clone(),
        };
        // OLMoE: queries = self.q_norm(queries); keys = self.k_norm(keys)  (before the reshape)
        if let Some((QkNorm::FullWidth, qn, kn)) = &self.qk_norm {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        q = q.reshape(&[b, l, hq, -1])?;
        k = k.reshape(&[b, l, hkv, -1])?;
        // Qwen3-MoE: self.q_norm(queries.reshape(B, L, n_heads, -1)) (per head, then transpose)
        if let Some((QkNorm::PerHead, qn, kn)) = &self.qk_norm {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let q = q.transpose(&[0, 2, 1, 3])?;
        let k = k.transpose(&[0, 2, 1, 3])?;
        let mut v = v.reshape(&[b, l, hkv, -1])?;
        if let Some(eps) = self.value_norm {
            // values = self.v_norm(values)
            v = fast::rms_norm(&v, None, eps)?;
        }
        let v = v.transpose(&[0, 2, 1, 3])?;

        // queries = self.rope(queries, offset=cache.offset); keys likewise; then the cache.
        let q = self.rope.apply(&q, cache.offset())?;
        let k = self.rope.apply(&k, cache.offset())?;

        // scaled_dot_product_attention(q, k, v, cache, scale, mask=mask, sinks=self.sinks):
        // over quantized keys and values when the cache has `bits` (base.py).
        let out = if let Some(quantized) = cache.quantized() {
            let (k, v) = quantized.update_and_fetch(&k, &v)?;
            quantized_attention(&q, &k, &v, self.scale, mask, self.sinks.as_ref())?
        } else {
            let (k, v) = cache.update_and_fetch("self_attn", &k, &v)?;
            fast::scaled_dot_product_attention_sinks(
                &q,
                &k,
                &v,
                self.scale,
                mask,
                self.sinks.as_ref(),
            )?
        };
        let mut out = out.transpose(&[0, 2, 1, 3])?.reshape(&[b, l, -1])?;
        if let Some(gate) = gate {
            // self.o_proj(output * mx.sigmoid(gate))
            out = out.mul(&gate.sigmoid()?)?;
        }
        self.o_proj.forward(&out)
    }
}

/// mlx-lm `create_attention_mask`: "causal" for a multi-token call, none for a single token
/// (one query at the newest position sees every cached key).
pub fn mask_for(len: usize) -> Mask<'static> {
    if len > 1 {
        Mask::Causal
    } else {
        Mask::None
    }
}
