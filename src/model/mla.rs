//! Multi-head latent attention (DeepSeek-V3, Kimi-K2), in mlx-lm's absorbed form; with
//! DeepSeek Sparse Attention's indexer (dsa.rs) for DeepSeek-V3.2 and GLM-5; without RoPE and
//! with an output gate for Kimi-K3 (`KimiK3MLAAttention`, models/kimi_k3.py: the same op
//! sequence, the rotary part left unrotated, `output * sigmoid(g_proj(x))` before `o_proj`).
//!
//! In: hidden states `[B, L, H]` and the layer's cache. Out: `[B, L, H]`; the cache grows by `L`
//! positions of `(latent [B, 1, L, kv_lora_rank], rotary key [B, 1, L, qk_rope_head_dim])`:
//! one latent and one rotary key per token for all heads, which is all MLA keeps.
//! Invariant: the op sequence of mlx-lm 0.32.2's `DeepseekV3Attention.__call__`
//! (models/deepseek_v3.py): `kv_b_proj` split per head into `embed_q` `[heads, kv_lora, nope]`
//! (keys, used transposed) and `unembed_out` `[heads, v, kv_lora]` (values); a single new token
//! attends in latent space (queries absorbed through `embed_q`, the output through
//! `unembed_out`), a prompt chunk expands keys and values per head. The rotary part is scored
//! separately and enters the attention as its additive mask. Under DSA (mlx-lm's
//! `DeepseekV32Attention`), once the context outgrows `index_topk`, a chunk's mask also drops
//! the positions the indexer did not choose, and a lone token attends to the chosen latents
//! and rotary keys only, gathered in the indexer's order.

use super::attention::RopeSpec;
use super::dsa::{sparse_mask, DsaIndexer};
use super::kv_cache::{to_i32, LayerKv};
use super::layers::{load_matrix, Linear, Matrix, RmsNorm};
use super::weights::{Quant, Weights};
use super::ComputeError;
use crate::arch::{Mla, ModelConfig};
use crate::mlx::fast::{self, Mask};
use crate::mlx::{self, Array, Dtype};

type Result<T> = std::result::Result<T, ComputeError>;

/// mlx-lm hard-codes `eps=1e-6` for `q_a_layernorm` and `kv_a_layernorm`.
const LORA_NORM_EPS: f64 = 1e-6;

/// mlx-lm's `MultiLinear`: one `[out, in]` matrix per head, `[heads, out, in]` (quantized along
/// `in`). A pack stores it as `[heads * out, in]` rows, which quantize identically.
#[derive(Debug, Clone)]
pub struct MultiLinear {
    weight: Matrix,
}

/// A [`Weights`] view that gives `<module>.{weight,scales,biases}` a leading `heads` axis when
/// they are stored as 2-D rows.
struct PerHead<'a> {
    inner: &'a dyn Weights,
    heads: usize,
}

impl Weights for PerHead<'_> {
    fn get(&self, name: &str) -> Option<Array> {
        let a = self.inner.get(name)?;
        let s = a.shape();
        if s.len() == 2 && self.heads > 0 && s[0] % self.heads == 0 {
            let shape = [self.heads as i32, (s[0] / self.heads) as i32, s[1] as i32];
            return a.reshape(&shape).ok();
        }
        Some(a)
    }

    fn quantization(&self, module: &str) -> Option<Quant> {
        self.inner.quantization(module)
    }
}

impl MultiLinear {
    pub fn load(
        w: &dyn Weights,
        module: &str,
        heads: usize,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<MultiLinear> {
        let w = PerHead { inner: w, heads };
        Ok(MultiLinear {
            weight: load_matrix(&w, module, &[heads], out_dim, in_dim)?,
        })
    }

    /// `x @ W^T` (`transpose`) or `x @ W`, per head.
    pub fn forward(&self, x: &Array, transpose: bool) -> Result<Array> {
        Ok(match &self.weight {
            Matrix::Quantized(q) => mlx::quantized_matmul(x, q, transpose)?,
            Matrix::Plain(w) => {
                if transpose {
                    x.matmul(&w.transpose(&[0, 2, 1])?)?
                } else {
                    x.matmul(w)?
                }
            }
        })
    }
}

#[derive(Debug, Clone)]
enum QueryProj {
    Plain(Linear),
    LowRank { a: Linear, norm: RmsNorm, b: Linear },
}

/// One layer's MLA.
#[derive(Debug, Clone)]
pub struct MlaAttention {
    q: QueryProj,
    kv_a: Linear,
    kv_a_norm: RmsNorm,
    embed_q: MultiLinear,
    unembed_out: MultiLinear,
    o_proj: Linear,
    /// Kimi-K3's output gate `g_proj` (`mla_use_output_gate`).
    gate: Option<Linear>,
    heads: usize,
    dims: Mla,
    scale: f64,
    rope: RopeSpec,
    /// DeepSeek Sparse Attention's indexer (DeepSeek-V3.2, GLM-5), which picks the positions
    /// each query attends to once the context outgrows its top-k.
    indexer: Option<Box<DsaIndexer>>,
}

impl MlaAttention {
    pub fn load(w: &dyn Weights, module: &str, cfg: &ModelConfig, m: &Mla) -> Result<Self> {
        let (h, heads) = (cfg.hidden_size, cfg.num_attention_heads);
        let q_head = m.qk_nope_head_dim + m.qk_rope_head_dim;
        let q = match m.q_lora_rank {
            None => QueryProj::Plain(Linear::load(
                w,
                &format!("{module}.q_proj"),
                heads * q_head,
                h,
            )?),
            Some(r) => QueryProj::LowRank {
                a: Linear::load(w, &format!("{module}.q_a_proj"), r, h)?,
                norm: RmsNorm::load(w, &format!("{module}.q_a_layernorm"), r, LORA_NORM_EPS)?,
                b: Linear::load(w, &format!("{module}.q_b_proj"), heads * q_head, r)?,
            },
        };
        // self.scale = q_head_dim**-0.5, times mscale**2 under YaRN with mscale_all_dim.
        let mut scale = (q_head as f64).powf(-0.5);
        if cfg.rope.rope_type == "yarn" {
            let num = |k: &str| {
                cfg.rope
                    .scaling
                    .as_ref()
                    .and_then(|s| s.get(k))
                    .and_then(|v| v.as_f64())
                    .unwrap_or(0.0)
            };
            let (all_dim, factor) = (num("mscale_all_dim"), num("factor"));
            if all_dim != 0.0 && factor > 1.0 {
                let s = 0.1 * all_dim * factor.ln() + 1.0;
                scale = scale * s * s;
            }
        }
        Ok(MlaAttention {
            q,
            kv_a: Linear::load(
                w,
                &format!("{module}.kv_a_proj_with_mqa"),
                m.kv_lora_rank + m.qk_rope_head_dim,
                h,
            )?,
            kv_a_norm: RmsNorm::load(
                w,
                &format!("{module}.kv_a_layernorm"),
                m.kv_lora_rank,
                LORA_NORM_EPS,
            )?,
            embed_q: MultiLinear::load(
                w,
                &format!("{module}.embed_q"),
                heads,
                m.kv_lora_rank,
                m.qk_nope_head_dim,
            )?,
            unembed_out: MultiLinear::load(
                w,
                &format!("{module}.unembed_out"),
                heads,
                m.v_head_dim,
                m.kv_lora_rank,
            )?,
            o_proj: Linear::load(w, &format!("{module}.o_proj"), h, heads * m.v_head_dim)?,
            gate: m
                .output_gate
                .then(|| Linear::load(w, &format!("{module}.g_proj"), heads * m.v_head_dim, h))
                .transpose()?,
            heads,
            dims: m.clone(),
            scale,
            rope: RopeSpec::from_config(cfg)?,
            indexer: match (&cfg.indexer, m.q_lora_rank) {
                (Some(ix), Some(r)) => Some(Box::new(DsaIndexer::load(
                    w,
                    &format!("{module}.indexer"),
                    cfg,
                    ix,
                    r,
                )?)),
                (Some(_), None) => {
                    return Err(ComputeError::Unsupported {
                        what: "a sparse-attention indexer without a query bottleneck \
                               (q_lora_rank)"
                            .into(),
                    })
                }
                (None, _) => None,
            },
        })
    }

    /// Whether its cache keeps the indexer's keys too.
    pub fn has_indexer(&self) -> bool {
        self.indexer.is_some()
    }

    /// `x` `[B, L, H]` -> `[B, L, H]`, reading and extending `cache`. `mask` is
    /// [`Mask::Causal`] for a chunk of several tokens, [`Mask::None`] for one.
    pub fn forward(&self, x: &Array, mask: Mask<'_>, cache: &mut LayerKv) -> Result<Array> {
        let s = x.shape();
        let (b, l) = (to_i32(s[0])?, to_i32(s[1])?);
        let m = &self.dims;
        let (nope, rope, lora) = (
            to_i32(m.qk_nope_head_dim)?,
            to_i32(m.qk_rope_head_dim)?,
            to_i32(m.kv_lora_rank)?,
        );
        let heads = to_i32(self.heads)?;
        // qr = q_a_layernorm(q_a_proj(x)); q = q_b_proj(qr)  (qr also feeds the indexer)
        let (q, qr) = match &self.q {
            QueryProj::Plain(p) => (p.forward(x)?, None),
            QueryProj::LowRank { a, norm, b } => {
                let qr = norm.forward(&a.forward(x)?)?;
                (b.forward(&qr)?, Some(qr))
            }
        };
        // q = q.reshape(B, L, heads, q_head_dim).transpose(0, 2, 1, 3)
        let q = q
            .reshape(&[b, l, heads, nope + rope])?
            .transpose(&[0, 2, 1, 3])?;
        // q_nope, q_pe = mx.split(q, [qk_nope_head_dim], axis=-1)
        let q_nope = q.slice(&[0, 0, 0, 0], &[b, heads, l, nope])?;
        let q_pe = q.slice(&[0, 0, 0, nope], &[b, heads, l, nope + rope])?;
        // compressed_kv, k_pe = mx.split(kv_a_proj_with_mqa(x), [kv_lora_rank], axis=-1)
        let ckv = self.kv_a.forward(x)?;
        let latent = ckv.slice(&[0, 0, 0], &[b, l, lora])?;
        let k_pe = ckv
            .slice(&[0, 0, lora], &[b, l, lora + rope])?
            .reshape(&[b, l, 1, rope])?
            .transpose(&[0, 2, 1, 3])?;
        let latent = self.kv_a_norm.forward(&latent)?;

        let offset = cache.offset();
        // Kimi-K3 (mla_use_nope): the rotary part is scored as it is.
        let (q_pe, k_pe) = if m.no_rope {
            (q_pe, k_pe)
        } else {
            (
                self.rope.apply(&q_pe, offset)?,
                self.rope.apply(&k_pe, offset)?,
            )
        };
        // kv_latent = mx.expand_dims(kv_latent, axis=1); then the cache.
        let latent = latent.expand_dims(1)?;
        let (mut latent, mut k_pe) = cache.update_and_fetch(&latent, &k_pe)?;
        // mask = create_causal_mask(L, offset) for a chunk, None for one token
        let mut keep = match mask {
            Mask::Causal => Some(causal_mask(s[1], offset)?),
            _ => None,
        };
        if let (Some(ix), Some(qr)) = (&self.indexer, &qr) {
            let index = cache.index_mut().ok_or_else(|| ComputeError::CacheKind {
                module: "self_attn.indexer".into(),
                wanted: "a KV cache with the indexer's keys",
            })?;
            if let Some(topk) = ix.select(x, qr, keep.as_ref(), index)? {
                if s[1] == 1 {
                    // idx = topk_indices[:, :, 0, :, None]: gather the chosen latents and keys
                    let n = to_i32(topk.shape()[3])?;
                    let idx = topk.reshape(&[b, 1, n, 1])?;
                    latent = latent.take_along_axis(&idx, 2)?;
                    k_pe = k_pe.take_along_axis(&idx, 2)?;
                } else if let Some(k) = &keep {
                    keep = Some(sparse_mask(&topk, k)?);
                }
            }
        }

        // pe_scores = (q_pe * self.scale) @ k_pe.swapaxes(-1, -2)
        let dtype = q_pe.dtype();
        let mut pe_scores = q_pe
            .mul(&Array::scalar(self.scale, dtype)?)?
            .matmul(&k_pe.transpose(&[0, 1, 3, 2])?)?;
        if let Some(keep) = &keep {
            // mx.where(mask, pe_scores, finfo(dtype).min)
            pe_scores = keep.select(&pe_scores, &Array::scalar(lowest(dtype), dtype)?)?;
        }
        let scale = self.scale as f32;
        let out = if s[1] == 1 {
            // Absorbed: queries into latent space, attend over latents, values out of it.
            let q_lat = self.embed_q.forward(&q_nope, true)?;
            let o = fast::scaled_dot_product_attention(
                &q_lat,
                &latent,
                &latent,
                scale,
                Mask::Array(&pe_scores),
            )?;
            self.unembed_out.forward(&o, true)?
        } else {
            let k = self.embed_q.forward(&latent, false)?;
            let v = self.unembed_out.forward(&latent, true)?;
            fast::scaled_dot_product_attention(&q_nope, &k, &v, scale, Mask::Array(&pe_scores))?
        };
        let mut out = out.transpose(&[0, 2, 1, 3])?.reshape(&[b, l, -1])?;
        if let Some(g) = &self.gate {
            // output = output * mx.sigmoid(self.g_proj(x))   (kimi_k3.py)
            out = out.mul(&g.forward(x)?.sigmoid()?)?;
        }
        self.o_proj.forward(&out)
    }
}

/// mlx-lm `create_causal_mask(L, offset)`: `[L, offset + L]` booleans, query `i` (at position
/// `offset + i`) keeps keys `0 ..= offset + i`.
fn causal_mask(len: usize, offset: usize) -> Result<Array> {
    // Every MLA layer of one forward call asks for the same mask: build it once.
    thread_local! {
        static LAST: std::cell::RefCell<Option<(usize, usize, Array)>> =
            const { std::cell::RefCell::new(None) };
    }
    if let Some(m) = LAST.with(|l| {
        l.borrow()
            .as_ref()
            .filter(|(n, o, _)| (*n, *o) == (len, offset))
            .map(|(_, _, m)| m.clone())
    }) {
        return Ok(m);
    }
    let total = offset + len;
    let keep: Vec<u8> = (0..len)
        .flat_map(|i| (0..total).map(move |j| u8::from(offset + i >= j)))
        .collect();
    let m = Array::from_bytes(&keep, &[len, total], Dtype::Bool)?;
    LAST.with(|l| *l.borrow_mut() = Some((len, offset, m.clone())));
    Ok(m)
}

/// `mx.finfo(dtype).min`.
pub(super) fn lowest(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::BF16 => -3.389_531_389_251_535_5e38,
        Dtype::F16 => -65_504.0,
        _ => f32::MIN as f64,
    }
}
