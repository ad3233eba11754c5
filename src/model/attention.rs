//! Self-attention with RoPE, grouped-query heads and optional q/k RMSNorm.
//!
//! In: hidden states `[B, L, H]` and the layer's cache (`kv_cache.rs`). Out: `[B, L, H]` and the cache grown by
//! `L` positions. Invariant: keys are cached after RoPE, so position `p` of the cache always
//! holds the key rotated for position `p`; the queries of a call sit at positions
//! `offset .. offset + L`. Mirrors the `Attention` classes of mlx-lm 0.32.2
//! (models/qwen3_moe.py, mixtral.py, olmoe.py, qwen2_moe.py).

use super::kv_cache::{to_i32, LayerKv};
use super::layers::{Linear, RmsNorm};
use super::weights::Weights;
use super::ComputeError;
use crate::arch::{ModelConfig, QkNorm};
use crate::mlx::fast::{self, Mask};
use crate::mlx::Array;

type Result<T> = std::result::Result<T, ComputeError>;

/// Rotary embedding as `mlx.nn.RoPE(dims, traditional, base, scale)` applies it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeSpec {
    pub dims: i32,
    pub traditional: bool,
    pub base: f32,
    pub scale: f32,
}

impl RopeSpec {
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
                    .filter(|f| *f > 0.0)
                    .ok_or_else(|| ComputeError::Unsupported {
                        what: "linear rope scaling without a positive `factor`".into(),
                    })?;
                (1.0 / factor) as f32
            }
            other => {
                return Err(ComputeError::Unsupported {
                    what: format!(
                        "rope_type {other:?} (the runtime implements \"default\" and \"linear\")"
                    ),
                })
            }
        };
        Ok(RopeSpec {
            dims: i32::try_from(cfg.head_dim).map_err(|_| ComputeError::Unsupported {
                what: format!("head_dim {}", cfg.head_dim),
            })?,
            traditional: cfg.rope.traditional,
            base: cfg.rope.theta as f32,
            scale,
        })
    }

    fn apply(&self, x: &Array, offset: usize) -> Result<Array> {
        let offset = i32::try_from(offset).map_err(|_| ComputeError::Unsupported {
            what: format!("position {offset} beyond i32"),
        })?;
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
    v_proj: Linear,
    o_proj: Linear,
    /// q/k RMSNorm and where it applies (per head for Qwen3-MoE, full width for OLMoE).
    qk_norm: Option<(QkNorm, RmsNorm, RmsNorm)>,
    heads: usize,
    kv_heads: usize,
    scale: f32,
    rope: RopeSpec,
}

impl Attention {
    pub fn load(w: &dyn Weights, module: &str, cfg: &ModelConfig) -> Result<Attention> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
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
        Ok(Attention {
            q_proj: Linear::load(w, &format!("{module}.q_proj"), q_out, h)?,
            k_proj: Linear::load(w, &format!("{module}.k_proj"), kv_out, h)?,
            v_proj: Linear::load(w, &format!("{module}.v_proj"), kv_out, h)?,
            o_proj: Linear::load(w, &format!("{module}.o_proj"), h, q_out)?,
            qk_norm,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            // self.scale = head_dim**-0.5 (a Python float, passed to MLX as float)
            scale: (d as f64).powf(-0.5) as f32,
            rope: RopeSpec::from_config(cfg)?,
        })
    }

    /// `x` `[B, L, H]` -> `[B, L, H]`, reading and extending `cache`.
    pub fn forward(&self, x: &Array, mask: Mask<'_>, cache: &mut LayerKv) -> Result<Array> {
        let s = x.shape();
        let (b, l) = (to_i32(s[0])?, to_i32(s[1])?);
        let (mut q, mut k) = (self.q_proj.forward(x)?, self.k_proj.forward(x)?);
        let v = self.v_proj.forward(x)?;
        // OLMoE: queries = self.q_norm(queries); keys = self.k_norm(keys)  (before the reshape)
        if let Some((QkNorm::FullWidth, qn, kn)) = &self.qk_norm {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let (hq, hkv) = (to_i32(self.heads)?, to_i32(self.kv_heads)?);
        q = q.reshape(&[b, l, hq, -1])?;
        k = k.reshape(&[b, l, hkv, -1])?;
        // Qwen3-MoE: self.q_norm(queries.reshape(B, L, n_heads, -1)) (per head, then transpose)
        if let Some((QkNorm::PerHead, qn, kn)) = &self.qk_norm {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let q = q.transpose(&[0, 2, 1, 3])?;
        let k = k.transpose(&[0, 2, 1, 3])?;
        let v = v.reshape(&[b, l, hkv, -1])?.transpose(&[0, 2, 1, 3])?;

        // queries = self.rope(queries, offset=cache.offset); keys likewise; then the cache.
        let q = self.rope.apply(&q, cache.offset())?;
        let k = self.rope.apply(&k, cache.offset())?;
        let (k, v) = cache.update_and_fetch(&k, &v)?;

        let out = fast::scaled_dot_product_attention(&q, &k, &v, self.scale, mask)?;
        let out = out.transpose(&[0, 2, 1, 3])?.reshape(&[b, l, -1])?;
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
