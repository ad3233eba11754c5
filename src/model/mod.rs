//! The forward pass: token ids -> logits, on MLX, for every architecture the converter supports
//! (Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE, DeepSeek-V3 / Kimi-K2 / Kimi K2.5, GLM-4.5,
//! Qwen3-Next, Qwen3.5 MoE, gpt-oss, DeepSeek-V3.2, GLM-5, MiniMax-M2, DeepSeek-V4.1, Kimi-K3).
//!
//! In: a normalized [`ModelConfig`], dense tensors through [`Weights`] (mlx-lm names, quantized or
//! plain), experts through an [`ExpertStore`] (stacked quantized pools + an expert -> slot table),
//! and a [`KvCache`] (a KV cache or a linear-attention state per layer). Out: lazy logits `[B, L, vocab]`; the caller evaluates them.
//! Under Kimi-K3's attention residuals the layers' residual is a block's partial sum, and each call carries
//! its [`ResidualBlocks`] from layer to layer (`attn_res.rs`).
//! Invariant: the graph is the one mlx-lm 0.32.2 builds for the same weights (each architecture's
//! table entry, `arch/<name>.rs`, cites the lines it mirrors), so logits agree with mlx-lm's; the golden tests in
//! `tests.rs` hold that to the tolerance they state.
//! Both pipelines run it (run on a pack, convert's profile stage on the source checkpoint), so it
//! imports neither; see docs/architecture.md, "Who may import whom".

mod attention;
mod attn_res;
mod deepseek_v41;
mod dsa;
mod gated_delta;
mod kv_cache;
mod layers;
mod mla;
mod moe;
mod quantized_kv;
mod rotating;
mod router;
mod weights;

pub use attention::{mask_for, Attention, RopeSpec};
pub use attn_res::{LayerMix, ResidualBlocks};
pub use deepseek_v41::{CompressedAttentionLayer, CompressedCache, HyperConnection};
pub use gated_delta::GatedDeltaNet;
pub use kv_cache::{KvCache, KvCheckpoint, LayerCache, LayerKv, LinearState};
pub use layers::{geglu, situ, swiglu, Embedding, GateAct, Linear, Matrix, Mlp, RmsNorm};
pub use mla::{MlaAttention, MultiLinear};
pub use moe::{
    switch_glu, ExpertAct, ExpertBias, ExpertPool, ExpertStore, LayerExperts, MoeBlock, PoolRoute,
    ResidentExperts, SharedExpert,
};
pub use quantized_kv::{quantized_attention, QuantizedKv};
pub use rotating::{causal_window, AttnMask, RotatingKv};
pub use router::{route_logits, Router, Routing};
// The router's description is arch's (one for both pipelines); re-exported for the model's users.
pub use crate::arch::{ExpertGroups, RouterSpec, Scoring, TopKOrder};
pub use weights::{MlxLmWeights, Quant, Weights};

use std::path::PathBuf;

use crate::arch::{ArchError, DeltaProjections, KvBits, ModelConfig};
use crate::mlx::{self, Array, Dtype};

/// Errors of the forward pass and of loading its weights.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ComputeError {
    #[error(transparent)]
    Mlx(#[from] mlx::Error),
    #[error(transparent)]
    Config(#[from] ArchError),
    #[error("tensor {name} is missing: the weights do not match the model config")]
    MissingTensor { name: String },
    #[error("tensor {name} has shape {found:?}, the config implies {expected:?}")]
    BadShape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor {name} has dtype {found:?}, expected {expected:?}")]
    BadDtype {
        name: String,
        found: Dtype,
        expected: Dtype,
    },
    #[error("{module} is quantized (has .scales) but its group size and bits are unknown")]
    MissingQuantization { module: String },
    #[error(
        "{module}: group size {group_size} / {bits} bits cannot quantize {in_dim} input features"
    )]
    BadQuantization {
        module: String,
        group_size: i32,
        bits: i32,
        in_dim: usize,
    },
    #[error("expert {expert} is placed at {what}, which does not exist")]
    BadPlacement { expert: usize, what: String },
    #[error("the expert store has no experts for layer {layer}")]
    NoExperts { layer: usize },
    #[error("not supported by the runtime yet: {what}")]
    Unsupported { what: String },
    #[error("the KV cache has {layers} layers but the model {model}: use Model::new_cache")]
    CacheMismatch { layers: usize, model: usize },
    #[error("{module} needs {wanted} but its layer's cache is another kind: use Model::new_cache")]
    CacheKind {
        module: String,
        wanted: &'static str,
    },
    #[error(
        "the cache holds {offset} positions and cannot be cut back to {position}{}",
        match (linear, window) {
            (true, _) => ": a linear-attention state keeps no earlier positions; restart from a \
                          snapshot taken at that position (KvCache::snapshot) or from a fresh \
                          cache".to_string(),
            (false, Some(w)) => format!(
                ": a sliding-window layer keeps only the last {w} positions and has dropped \
                 earlier ones; restart from a snapshot taken at that position \
                 (KvCache::snapshot) or from a fresh cache"
            ),
            (false, None) => String::new(),
        }
    )]
    CannotTruncate {
        offset: usize,
        position: usize,
        /// A linear-attention layer refused.
        linear: bool,
        /// A sliding-window layer of this window refused.
        window: Option<usize>,
    },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("{path}: {what}")]
    BadConfig { path: PathBuf, what: String },
    /// What an [`ExpertStore`] could not do (run's cache reading a pack, say), with its cause.
    #[error(transparent)]
    Store(Box<dyn std::error::Error + Send + Sync + 'static>),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, ComputeError>;

#[derive(Debug, Clone)]
enum Ffn {
    Dense(Mlp),
    Sparse(Box<MoeBlock>),
    /// Gemma 4's feed-forward ([`Sandwich`]).
    Sandwich(Box<Sandwich>),
}

/// Gemma 4's feed-forward (mlx-lm gemma4_text.py `DecoderLayer.__call__`) on the residual `h`.
/// In a sparse layer, `post_feedforward_layernorm(h1 + h2)` with
/// `h1 = post_feedforward_layernorm_1(mlp(pre_feedforward_layernorm(h)))` and
/// `h2 = post_feedforward_layernorm_2(experts(pre_feedforward_layernorm_2(h), router(h)))`; in a
/// dense one, `post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))`. The MLP and the
/// experts are GeGLU.
#[derive(Debug, Clone)]
struct Sandwich {
    pre: RmsNorm,
    mlp: Mlp,
    post: RmsNorm,
    /// `post_feedforward_layernorm_1`, the experts (their input norm
    /// `pre_feedforward_layernorm_2` inside) and `post_feedforward_layernorm_2`.
    experts: Option<(RmsNorm, MoeBlock, RmsNorm)>,
}

impl Sandwich {
    fn load(cfg: &ModelConfig, w: &dyn Weights, l: usize) -> Result<Sandwich> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let p = format!("model.layers.{l}");
        let norm = |name: &str| RmsNorm::load(w, &format!("{p}.{name}"), h, eps);
        let experts = if cfg.is_sparse_layer(l) {
            let moe =
                MoeBlock::load(w, cfg, l)?.with_expert_norm(norm("pre_feedforward_layernorm_2")?);
            Some((
                norm("post_feedforward_layernorm_1")?,
                moe,
                norm("post_feedforward_layernorm_2")?,
            ))
        } else {
            None
        };
        Ok(Sandwich {
            pre: norm("pre_feedforward_layernorm")?,
            mlp: Mlp::load(w, &format!("{p}.mlp"), h, cfg.intermediate_size)?
                .with_act(GateAct::Geglu),
            post: norm("post_feedforward_layernorm")?,
            experts,
        })
    }

    fn forward(&self, h: &Array, store: &mut dyn ExpertStore) -> Result<Array> {
        let dense = self.mlp.forward(&self.pre.forward(h)?)?;
        let y = match &self.experts {
            Some((post_1, moe, post_2)) => {
                // h1 = post_feedforward_layernorm_1(mlp(pre_feedforward_layernorm(h)))
                // h2 = post_feedforward_layernorm_2(experts(pre_feedforward_layernorm_2(h), ..))
                let h1 = post_1.forward(&dense)?;
                let h2 = post_2.forward(&moe.forward(h, store)?)?;
                h1.add(&h2)?
            }
            None => dense,
        };
        // h = self.post_feedforward_layernorm(h)
        self.post.forward(&y)
    }
}

/// A layer's attention: grouped-query (with its options), multi-head latent, or Gated
/// DeltaNet linear attention.
#[derive(Debug, Clone)]
enum SelfAttention {
    Gqa(Attention),
    Mla(MlaAttention),
    Linear(GatedDeltaNet),
    /// DeepSeek-V4.1's window plus compressed latents (run by `Model::hidden_hc`).
    Compressed(Box<CompressedAttentionLayer>),
}

impl SelfAttention {
    /// Layer `l`'s attention (`model.layers.L.self_attn`, or `linear_attn` for a layer of
    /// linear attention).
    fn load(w: &dyn Weights, l: usize, cfg: &ModelConfig) -> Result<SelfAttention> {
        let p = format!("model.layers.{l}");
        if let Some(la) = cfg
            .linear_attention
            .as_ref()
            .filter(|_| cfg.is_linear_layer(l))
        {
            // Kimi's KDA layers keep mlx-lm's `self_attn` name.
            let name = match la.projections {
                DeltaProjections::Kda => "self_attn",
                _ => "linear_attn",
            };
            return Ok(SelfAttention::Linear(GatedDeltaNet::load(
                w,
                &format!("{p}.{name}"),
                cfg,
                la,
            )?));
        }
        let module = format!("{p}.self_attn");
        if cfg.compressed_attention.is_some() {
            return Ok(SelfAttention::Compressed(Box::new(
                CompressedAttentionLayer::load(w, &module, l, cfg)?,
            )));
        }
        Ok(match &cfg.mla {
            Some(m) => SelfAttention::Mla(MlaAttention::load(w, &module, cfg, m)?),
            None => SelfAttention::Gqa(
                Attention::load_layer(w, &module, cfg, l)?.windowed(cfg.window_of(l)),
            ),
        })
    }

    /// A fresh cache of the kind this attention keeps (mlx-lm's `make_cache`: gpt-oss gives a
    /// sliding-window layer `RotatingKVCache(max_size=sliding_window)`).
    fn new_cache(&self) -> LayerCache {
        match self {
            SelfAttention::Linear(_) => LayerCache::Linear(LinearState::default()),
            SelfAttention::Gqa(a) => match a.window() {
                Some(w) => LayerCache::Rotating(RotatingKv::new(w)),
                None => LayerCache::Kv(LayerKv::default()),
            },
            // make_cache: CacheList(KVCache(), KVCache()) under DSA (deepseek_v32.py)
            SelfAttention::Mla(a) if a.has_indexer() => LayerCache::Kv(LayerKv::with_index()),
            SelfAttention::Mla(_) => LayerCache::Kv(LayerKv::default()),
            SelfAttention::Compressed(a) => {
                LayerCache::Compressed(CompressedCache::new(a.window()))
            }
        }
    }

    /// Whether it keeps a plain `KVCache` of keys and values per head (grouped-query attention
    /// without a window), which `--kv-bits` may quantize.
    fn plain_kv(&self) -> bool {
        matches!(self, SelfAttention::Gqa(a) if a.window().is_none())
    }

    fn forward(
        &self,
        x: &Array,
        mask: mlx::fast::Mask<'_>,
        cache: &mut LayerCache,
    ) -> Result<Array> {
        match self {
            SelfAttention::Gqa(a) => a.forward(x, mask, cache),
            SelfAttention::Mla(a) => a.forward(x, mask, cache.kv("self_attn")?),
            // No mask: one sequence without padding (mlx-lm's create_ssm_mask gives None).
            SelfAttention::Linear(a) => a.forward(x, cache.linear(a.module())?),
            SelfAttention::Compressed(_) => Err(ComputeError::Unsupported {
                what: "a compressed-attention layer outside its hyper-connections".into(),
            }),
        }
    }
}

/// One decoder layer: attention and its feed-forward (dense or sparse), with their norms.
#[derive(Debug, Clone)]
pub struct Block {
    input_norm: RmsNorm,
    attn: SelfAttention,
    /// `post_attention_layernorm`: the feed-forward's input norm, or under Gemma 4 the
    /// attention output's norm.
    post_norm: RmsNorm,
    ffn: Ffn,
    /// Gemma 4: the layer's output is `(h + ffn) * layer_scalar` (`[1]`).
    layer_scalar: Option<Array>,
    /// DeepSeek-V4.1's hyper-connections around the attention and the feed-forward.
    hc: Option<Box<(HyperConnection, HyperConnection)>>,
    /// Kimi-K3's attention residuals: the mixes before the attention and the feed-forward.
    attn_res: Option<LayerMix>,
}

impl Block {
    /// Layer `l`'s dense tensors (experts come through an [`ExpertStore`]). Only the tensors of
    /// this layer are read from `w`, so a caller can hold one layer at a time.
    pub fn load(cfg: &ModelConfig, w: &dyn Weights, l: usize) -> Result<Block> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let p = format!("model.layers.{l}");
        let ffn = if cfg.gemma4.is_some() {
            Ffn::Sandwich(Box::new(Sandwich::load(cfg, w, l)?))
        } else if cfg.is_sparse_layer(l) {
            Ffn::Sparse(Box::new(MoeBlock::load(w, cfg, l)?))
        } else {
            let mlp = Mlp::load(w, &format!("{p}.mlp"), h, cfg.intermediate_size)?;
            // self.mlp = KimiK3MLP(args): SiTU
            Ffn::Dense(match cfg.situ {
                Some(s) => mlp.with_act(GateAct::Situ(s)),
                None => mlp,
            })
        };
        let layer_scalar = match cfg.gemma4 {
            Some(_) => {
                let name = format!("{p}.layer_scalar");
                let s = layers::require(w, &name)?;
                layers::check_shape(&name, &s, &[1])?;
                Some(s)
            }
            None => None,
        };
        let hc = if cfg.hyper_connections.is_some() {
            Some(Box::new((
                HyperConnection::load(w, &format!("{p}.attn_hc"), cfg)?,
                HyperConnection::load(w, &format!("{p}.ffn_hc"), cfg)?,
            )))
        } else {
            None
        };
        Ok(Block {
            input_norm: RmsNorm::load(w, &format!("{p}.input_layernorm"), h, eps)?,
            attn: SelfAttention::load(w, l, cfg)?,
            post_norm: RmsNorm::load(w, &format!("{p}.post_attention_layernorm"), h, eps)?,
            ffn,
            layer_scalar,
            hc,
            attn_res: LayerMix::load(w, cfg, l)?,
        })
    }

    /// A fresh cache for this layer: a KV cache, or a linear-attention state.
    pub fn new_cache(&self) -> LayerCache {
        self.attn.new_cache()
    }

    /// `h + self_attn(input_layernorm(h))` (or `linear_attn`): the residual stream after
    /// attention. Under attention residuals (`blocks`, the call's [`ResidualBlocks`], which a
    /// model with them must pass and any other must not), `h` is the block's partial sum: the
    /// attention reads the blocks' mix, a layer that starts a block appends `h` to the blocks
    /// and starts its partial sum again from the attention's output (`KimiK3DecoderLayer`).
    pub fn attend(
        &self,
        h: &Array,
        mask: mlx::fast::Mask<'_>,
        kv: &mut LayerCache,
        blocks: Option<&mut ResidualBlocks>,
    ) -> Result<Array> {
        match (&self.attn_res, blocks) {
            (None, None) => {}
            (Some(mix), Some(blocks)) => {
                // h = _attn_res_mix(blocks, partial_sum, self._attn_res_w_eff, self.eps)
                let x = blocks.mix(h, &mix.attn)?;
                if mix.block_start {
                    // blocks.append(partial_sum); partial_sum = None
                    blocks.append(h)?;
                }
                // y = self.self_attn(self.input_layernorm(h), mask, cache)
                let y = self.attn.forward(&self.input_norm.forward(&x)?, mask, kv)?;
                // partial_sum = y if partial_sum is None else partial_sum + y
                return Ok(if mix.block_start { y } else { h.add(&y)? });
            }
            (mix, _) => return Err(residual_blocks_mismatch(mix.is_some())),
        }
        let mut r = self.attn.forward(&self.input_norm.forward(h)?, mask, kv)?;
        if let Ffn::Sandwich(_) = self.ffn {
            // h = self.post_attention_layernorm(h); h = residual + h   (gemma4_text.py)
            r = self.post_norm.forward(&r)?;
        }
        Ok(h.add(&r)?)
    }

    /// The feed-forward's input, `post_attention_layernorm(h)` (under Gemma 4 `h` itself, which
    /// the router sees and the feed-forward's own norms take; under attention residuals the
    /// norm of the blocks' mix with the partial sum `h`).
    pub fn ffn_input(&self, h: &Array, blocks: Option<&ResidualBlocks>) -> Result<Array> {
        match (&self.attn_res, blocks) {
            (None, None) => {}
            // h = _attn_res_mix(blocks, partial_sum, self._mlp_res_w_eff, self.eps)
            // self.mlp(self.post_attention_layernorm(h))
            (Some(mix), Some(blocks)) => return self.post_norm.forward(&blocks.mix(h, &mix.mlp)?),
            (mix, _) => return Err(residual_blocks_mismatch(mix.is_some())),
        }
        match self.ffn {
            Ffn::Sandwich(_) => Ok(h.clone()),
            _ => self.post_norm.forward(h),
        }
    }

    /// The feed-forward's output on `x` (= [`Block::ffn_input`]); [`Block::residual`] adds it
    /// to `h`.
    pub fn ffn(&self, x: &Array, experts: &mut dyn ExpertStore) -> Result<Array> {
        match &self.ffn {
            Ffn::Dense(mlp) => mlp.forward(x),
            Ffn::Sparse(moe) => moe.forward(x, experts),
            Ffn::Sandwich(s) => s.forward(x, experts),
        }
    }

    /// The layer's output: `h + y` for the feed-forward's output `y`, times `layer_scalar`
    /// under Gemma 4 (`h = h * self.layer_scalar`).
    pub fn residual(&self, h: &Array, y: &Array) -> Result<Array> {
        let out = h.add(y)?;
        Ok(match &self.layer_scalar {
            Some(s) => out.mul(s)?,
            None => out,
        })
    }
    /// DeepSeek-V4.1's attention step on the streams of `st` (`DecoderLayer.__call__`'s first
    /// half): `attn_hc(streams)`, `input_layernorm(_collapse(streams, pre_mix))` through the
    /// attention, expanded back into the streams; layer `l`'s cache grows by the call.
    pub fn hc_attend(&self, st: &mut HcState, cache: &mut LayerCache, l: usize) -> Result<()> {
        let module = format!("model.layers.{l}");
        let (SelfAttention::Compressed(attn), Some(pair)) = (&self.attn, &self.hc) else {
            return Err(ComputeError::Unsupported {
                what: format!("{module} has no hyper-connections or compressed attention"),
            });
        };
        let (pre, post, comb) = pair.0.forward(&st.streams)?;
        let x = self
            .input_norm
            .forward(&deepseek_v41::collapse(&st.streams, &st.pre_mix)?)?;
        let y = attn.forward(
            &x,
            st.start.start_pos,
            &st.start.window_idx,
            cache.compressed(&module)?,
            &mut st.shared,
        )?;
        st.streams = deepseek_v41::expand(&y, &st.streams, &post, &comb)?;
        st.attn_pre = Some(pre);
        Ok(())
    }

    /// The feed-forward's input after [`Block::hc_attend`]:
    /// `post_attention_layernorm(_collapse(streams, attn_pre))`, with `ffn_hc(streams)` kept for
    /// [`Block::hc_ffn_done`].
    pub fn hc_ffn_input(&self, st: &mut HcState) -> Result<Array> {
        let (Some(pair), Some(attn_pre)) = (&self.hc, st.attn_pre.take()) else {
            return Err(ComputeError::Unsupported {
                what: "a feed-forward input before its hyper-connected attention".into(),
            });
        };
        let mix = pair.1.forward(&st.streams)?;
        let x = self
            .post_norm
            .forward(&deepseek_v41::collapse(&st.streams, &attn_pre)?)?;
        st.ffn_mix = Some(mix);
        Ok(x)
    }

    /// The feed-forward's output `y` (on [`Block::hc_ffn_input`]) expanded into the streams;
    /// the layer's `ffn_pre` becomes the next layer's pre-mix.
    pub fn hc_ffn_done(&self, st: &mut HcState, y: &Array) -> Result<()> {
        let Some((pre, post, comb)) = st.ffn_mix.take() else {
            return Err(ComputeError::Unsupported {
                what: "a feed-forward output before its input".into(),
            });
        };
        st.streams = deepseek_v41::expand(y, &st.streams, &post, &comb)?;
        st.pre_mix = pre;
        Ok(())
    }

    /// The sparse block, for a sparse layer.
    pub fn moe(&self) -> Option<&MoeBlock> {
        match &self.ffn {
            Ffn::Sparse(moe) => Some(moe.as_ref()),
            Ffn::Sandwich(s) => s.experts.as_ref().map(|(_, moe, _)| moe),
            Ffn::Dense(_) => None,
        }
    }
}

/// DeepSeek-V4.1's residual state through the layers of one call: the streams, the pre-mix of
/// the next attention, what the layers share (latents, index keys, the indexer's choice), where
/// the call starts, and the mixes a layer keeps between its steps.
pub struct HcState {
    streams: Array,
    pre_mix: Array,
    shared: deepseek_v41::Shared,
    start: deepseek_v41::CallStart,
    attn_pre: Option<Array>,
    ffn_mix: Option<(Array, Array, Array)>,
}

impl HcState {
    /// The state at the embedding `h` `[B, L, H]` of a call that starts after `offset`
    /// positions, the windows holding `window_rows` of them.
    pub fn new(cfg: &ModelConfig, h: &Array, offset: usize, window_rows: usize) -> Result<HcState> {
        let Some(hc) = &cfg.hyper_connections else {
            return Err(no_hc_config());
        };
        let (streams, pre_mix) = deepseek_v41::initial_streams(h, hc.mult)?;
        HcState::at(
            cfg,
            streams,
            pre_mix,
            Default::default(),
            offset,
            window_rows,
        )
    }

    /// The state a previous pipeline stage handed on ([`HcState::into_carry`]), for a call that
    /// starts after `offset` positions, the windows holding `window_rows` of them.
    pub fn resume(
        cfg: &ModelConfig,
        carry: &Carry,
        offset: usize,
        window_rows: usize,
    ) -> Result<HcState> {
        let bad = || ComputeError::Unsupported {
            what: format!(
                "a hyper-connected stage's input of {} parts (want the pre-mix and 4 shared)",
                carry.parts.len()
            ),
        };
        let [pre_mix, rest @ ..] = &carry.parts[..] else {
            return Err(bad());
        };
        let pre_mix = pre_mix.clone().ok_or_else(bad)?;
        let shared = deepseek_v41::Shared::from_parts(rest).ok_or_else(bad)?;
        HcState::at(cfg, carry.h.clone(), pre_mix, shared, offset, window_rows)
    }

    /// The state of `streams` `[B, L, hc, H]` before a layer, in a call that starts after
    /// `offset` positions, the windows holding `window_rows` of them.
    fn at(
        cfg: &ModelConfig,
        streams: Array,
        pre_mix: Array,
        shared: deepseek_v41::Shared,
        offset: usize,
        window_rows: usize,
    ) -> Result<HcState> {
        let Some(c) = &cfg.compressed_attention else {
            return Err(no_hc_config());
        };
        let s = streams.shape();
        let window_idx = deepseek_v41::window_indices(
            window_rows,
            s.get(1).copied().unwrap_or(0),
            c.sliding_window,
            s.first().copied().unwrap_or(1),
        )?;
        Ok(HcState {
            streams,
            pre_mix,
            shared,
            start: deepseek_v41::CallStart {
                start_pos: offset,
                window_idx,
            },
            attn_pre: None,
            ffn_mix: None,
        })
    }

    /// What the next stage's first layer needs: the streams, the pre-mix and the shared parts
    /// ([`HcState::resume`]).
    pub fn into_carry(self) -> Carry {
        let mut parts = vec![Some(self.pre_mix)];
        parts.extend(self.shared.into_parts());
        Carry {
            h: self.streams,
            parts,
        }
    }

    /// The streams `[B, L, hc, H]`.
    pub fn streams(&self) -> &Array {
        &self.streams
    }

    /// `_collapse(streams, pre_mix)`: the hidden state before the final norm.
    pub fn output(&self) -> Result<Array> {
        deepseek_v41::collapse(&self.streams, &self.pre_mix)
    }
}

/// DeepSeek-V4.1's state asked of a config without its hyper-connections or compressed attention.
fn no_hc_config() -> ComputeError {
    ComputeError::Unsupported {
        what: "hyper-connections without their config".into(),
    }
}

/// A sparse layer of [`Model::layers_ahead`] whose routing is not confirmed yet: its attention
/// output and its feed-forward input, to route it again from.
struct Open {
    layer: usize,
    h_attn: Array,
    x: Array,
    /// The attention residuals' blocks after its attention (they change only there).
    blocks: Option<ResidualBlocks>,
}

/// How [`Model::layers_ahead`] puts a layer's cache back to before a call wrote it: a KV cache
/// is cut back to its position (what was written past it is written again), a fixed-size one
/// (sliding window, linear-attention state) is kept as it was.
enum Rewind {
    Cut(usize),
    Keep(LayerCache),
}

impl Rewind {
    fn of(c: &LayerCache) -> Rewind {
        match c {
            LayerCache::Kv(_) | LayerCache::Quantized(_) => Rewind::Cut(c.offset()),
            other => Rewind::Keep(other.clone()),
        }
    }

    fn restore(self, c: &mut LayerCache) -> Result<()> {
        match self {
            Rewind::Cut(position) => c.truncate(position),
            Rewind::Keep(kept) => {
                *c = kept;
                Ok(())
            }
        }
    }
}

/// A layer called with attention residuals' blocks it has none of, or without those it has.
fn residual_blocks_mismatch(layer_has_them: bool) -> ComputeError {
    ComputeError::Unsupported {
        what: if layer_has_them {
            "a layer with attention residuals called without the call's residual blocks".into()
        } else {
            "residual blocks given to a layer without attention residuals".into()
        },
    }
}

/// Gemma 4's final logit soft cap, compiled once per cap where compiling.
static SOFTCAP: mlx::CompileId = mlx::CompileId::new();

/// What a model holding only some of the layers ([`Model::load_range`]) wants back from the
/// layers after its own ([`Downstream::finish`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Only their KV caches filled (a prompt chunk before the last position).
    Cache,
    /// The logits of the last position `[B, 1, vocab]`.
    Last,
    /// The logits of every position `[B, L, vocab]`.
    All,
    /// The greedy pick of the last position, as `[B, 1, 2]` f32: the argmax's id (exact below
    /// 2^24) and the logits' sum (NaN exactly when a logit is): what the last stage of a
    /// pipeline sends back for greedy decoding instead of the logits ([`Model::forward_pick`]).
    Pick,
    /// The last position's token sampled as `run::sample::pick` samples with these options and
    /// draw, in the [`Want::Pick`] form (the id, and a NaN sum exactly when a logit is NaN):
    /// what the last stage sends back for sampling at a temperature ([`Model::forward_sampled`]).
    Sample(SampleSpec),
}

/// A sampling step for a pipeline's last stage: the sampler's options as bits and the step's
/// uniform draw in [0, 1) (`f64` bits), taken from rank 0's seeded sampler so the token is the
/// one rank 0 would draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleSpec {
    pub temperature: u32,
    pub top_p: u32,
    pub top_k: u32,
    pub u: u64,
}

/// The layers after a model's own, on other processes (`run::pipeline`): the first stage of a
/// pipeline hands them its last layer's output and gets the logits back.
pub trait Downstream: std::fmt::Debug + Send + Sync {
    /// Runs the following layers (and the head) on `carry` (the state after this model's last
    /// layer), whose first position is cache position `offset`; `None` exactly when `want` is
    /// [`Want::Cache`].
    fn finish(&self, carry: &Carry, offset: usize, want: Want) -> Result<Option<Array>>;
}

/// The input of a model's first layer: token ids (the model embeds them), or the state a
/// previous stage of a pipeline handed on ([`Carry`]).
#[derive(Clone, Copy)]
pub enum Input<'a> {
    Tokens(&'a Array),
    Carried(&'a Carry),
}

/// What passes from one layer to the next, and so across a pipeline's stage boundary: the hidden
/// state `h` `[B, L, H]` and, for the architectures whose layers pass more than one, the rest
/// (`parts`, each present or not):
/// - DeepSeek-V4.1's hyper-connections: `h` is the streams `[B, L, hc, H]`, and the parts are the
///   next attention's pre-mix and what the call's layers share (the latest KV source's latents
///   and index keys, the latest indexer's choice and candidates: [`HcState`]).
/// - Kimi-K3's attention residuals: the parts are the blocks' starting states and their inverse
///   RMS ([`ResidualBlocks`]), absent before the first block.
///
/// Where a model ends the model, `h` is the final norm's input and there are no parts.
#[derive(Debug, Clone)]
pub struct Carry {
    pub h: Array,
    pub parts: Vec<Option<Array>>,
}

impl Carry {
    /// A hidden state alone.
    pub fn plain(h: Array) -> Carry {
        Carry {
            h,
            parts: Vec::new(),
        }
    }

    /// Positions `B x L` of the call (the first two axes of `h`).
    fn positions(&self) -> usize {
        self.h.shape().iter().take(2).product()
    }
}

/// The dense part of a model (everything but the routed experts) and how to run it.
#[derive(Debug, Clone)]
pub struct Model {
    cfg: ModelConfig,
    /// `None` on a stage of a pipeline that does not embed ([`Model::load_range`]).
    embed: Option<Embedding>,
    /// The layers this model holds: `first..first + layers.len()` of the config's.
    layers: Vec<Block>,
    first: usize,
    /// `None` on a stage of a pipeline that does not end it.
    norm: Option<RmsNorm>,
    /// The stages after this one, where this model does not end the pipeline.
    downstream: Option<std::sync::Arc<dyn Downstream>>,
    /// `None`: tied to the embeddings.
    lm_head: Option<Linear>,
    /// Kimi-K3's attention residuals: the final norm's input is the blocks' mix with this
    /// `w_eff` (`output_attn_res`).
    output_res: Option<Array>,
    /// `--kv-bits`: the plain KV layers' caches hold affine codes ([`Model::new_cache`]).
    kv_bits: Option<KvBits>,
}

impl Model {
    /// Whether the runtime implements every feature `cfg` asks for, decided from the config
    /// alone: the same checks [`Model::load`] makes before it reads a tensor. `convert` runs it
    /// too, so a pack the runtime cannot run is refused before hours of conversion (issue 33).
    pub fn check_supported(cfg: &ModelConfig) -> Result<()> {
        if let Some(clip) = cfg.clip_qkv {
            // transformers' OLMoE clamps q/k/v; mlx-lm does not, so there is no reference to
            // match yet. Refuse instead of silently computing something else.
            return Err(ComputeError::Unsupported {
                what: format!("clip_qkv = {clip}"),
            });
        }
        // The RoPE type, its scaling and its dimensions (built again per layer at load).
        attention::RopeSpec::from_config(cfg)?;
        if let Some(g) = &cfg.gemma4 {
            attention::RopeSpec::gemma4_global(g, g.global_head_dim, cfg.rope.traditional)?;
        }
        if cfg.shared_expert.is_some() && cfg.arch.names().shared.is_none() {
            return Err(ComputeError::Unsupported {
                what: format!("a shared expert in {}, which names none", cfg.arch),
            });
        }
        Ok(())
    }

    /// Build the model from its dense tensors. Experts are not read here: they come through
    /// the [`ExpertStore`] given to [`Model::forward`].
    pub fn load(cfg: &ModelConfig, w: &dyn Weights) -> Result<Model> {
        Model::load_range(cfg, w, 0..cfg.num_hidden_layers)
    }

    /// The layers `range` of the model, as one stage of a pipeline (docs/decisions/
    /// 0034-pipeline-ranks.md): the embedding only where the range starts at layer 0, the final
    /// norm and the LM head only where it ends at the last layer (with tied embeddings the
    /// embedding too, as the head). `w` needs only those tensors. A stage that does not start
    /// at layer 0 takes [`Input::Carried`]; one that does not end the model needs a
    /// [`Downstream`] ([`Model::set_downstream`]) to give logits.
    pub fn load_range(
        cfg: &ModelConfig,
        w: &dyn Weights,
        range: std::ops::Range<usize>,
    ) -> Result<Model> {
        Model::check_supported(cfg)?;
        let n = cfg.num_hidden_layers;
        if range.start >= range.end || range.end > n {
            return Err(ComputeError::Unsupported {
                what: format!("layers {}..{} of a model of {n}", range.start, range.end),
            });
        }
        // Hyper-connections and attention residuals pass more than one hidden state between
        // layers: a stage boundary carries them all ([`Carry`]).
        let h = cfg.hidden_size;
        let layers = range
            .clone()
            .map(|l| Block::load(cfg, w, l))
            .collect::<Result<Vec<_>>>()?;
        let ends = range.end == n;
        let embeds = range.start == 0 || (ends && cfg.tie_word_embeddings);
        Ok(Model {
            cfg: cfg.clone(),
            embed: embeds
                .then(|| Embedding::load(w, "model.embed_tokens", cfg.vocab_size, h))
                .transpose()?,
            layers,
            first: range.start,
            norm: ends
                .then(|| RmsNorm::load(w, "model.norm", h, cfg.rms_norm_eps))
                .transpose()?,
            downstream: None,
            lm_head: if cfg.tie_word_embeddings || !ends {
                None
            } else {
                Some(Linear::load(w, "lm_head", cfg.vocab_size, h)?)
            },
            // The final norm's mix: where the final norm is.
            output_res: cfg
                .attn_res_block_size
                .filter(|_| ends)
                .map(|_| attn_res::w_eff(w, "model.output_attn_res", h))
                .transpose()?,
            kv_bits: None,
        })
    }

    /// The layers this model holds.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.first..self.first + self.layers.len()
    }

    /// Whether this model holds the last layer (and so the final norm and the head).
    pub fn ends(&self) -> bool {
        self.first + self.layers.len() == self.cfg.num_hidden_layers
    }

    /// Sends this model's last layer's output to `d` for the logits (a pipeline's first stage).
    pub fn set_downstream(&mut self, d: std::sync::Arc<dyn Downstream>) {
        self.downstream = Some(d);
    }

    /// The call's residual blocks, for a model with attention residuals (mlx-lm
    /// `ResidualBlocks(self.args.rms_norm_eps) if self.use_attn_res else None`).
    fn residual_blocks(&self) -> Option<ResidualBlocks> {
        self.cfg
            .attn_res_block_size
            .map(|_| ResidualBlocks::new(self.cfg.rms_norm_eps))
    }

    /// The last layer's output `h` as the final norm reads it: under attention residuals the
    /// blocks' mix (`_attn_res_mix(blocks, h, self._output_res_w_eff, eps)`), else `h`.
    fn output_of(&self, h: Array, blocks: Option<&ResidualBlocks>) -> Result<Array> {
        match (&self.output_res, blocks) {
            (Some(w), Some(b)) => b.mix(&h, w),
            _ => Ok(h),
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The first sparse block after layer `l`.
    fn next_sparse(&self, l: usize) -> Option<&MoeBlock> {
        // `l` counts this model's layers (from `first`).
        self.layers[l + 1..].iter().find_map(Block::moe)
    }

    /// Quantize the KV caches [`Model::new_cache`] makes from now on to `bits` (`None`: bf16),
    /// on the layers `ModelConfig::kv_group` names (mlx-lm's `QuantizedKVCache`); the other
    /// layers keep their kind. A cache made before keeps its own kind.
    pub fn set_kv_bits(&mut self, bits: Option<KvBits>) {
        self.kv_bits = bits;
    }

    pub fn kv_bits(&self) -> Option<KvBits> {
        self.kv_bits
    }

    /// A fresh cache for this model: per layer, a KV cache (quantized under
    /// [`Model::set_kv_bits`]) or a linear-attention state (mlx-lm's `make_cache`).
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: self
                .layers
                .iter()
                .enumerate()
                .map(
                    |(i, block)| match (self.kv_bits, self.cfg.kv_group(self.first + i)) {
                        (Some(bits), Ok(group)) if block.attn.plain_kv() => {
                            LayerCache::Quantized(QuantizedKv::new(bits.bits(), group))
                        }
                        _ => block.new_cache(),
                    },
                )
                .collect(),
        }
    }

    /// The state after this model's last layer ([`Model::layers_of`] on token ids): where it
    /// ends the model, the hidden states `[B, L, H]` before the final norm.
    /// With `cache_only`, stops after the last layer's attention has written the cache: its
    /// feed-forward only feeds the logits, which a prompt position before the last never needs
    /// (mlx-lm's prefill evaluates only the cache state and so skips the same work). The
    /// returned state is then not the final hidden state and must not be used.
    fn hidden(
        &self,
        tokens: &Array,
        cache: &mut KvCache,
        experts: &mut dyn ExpertStore,
        cache_only: bool,
    ) -> Result<Carry> {
        self.layers_of(Input::Tokens(tokens), cache, experts, cache_only)
    }

    /// This model's layers on `input` (embedded first where it is token ids): the state after
    /// its last layer. Where this model ends the model, that is the hidden states `[B, L, H]`
    /// before the final norm (no parts); else whatever the next stage's first layer takes
    /// ([`Carry`]). `cache_only` skips work only where this model holds the model's last layer
    /// (see [`Model::hidden`]).
    pub fn layers_of(
        &self,
        input: Input<'_>,
        cache: &mut KvCache,
        experts: &mut dyn ExpertStore,
        cache_only: bool,
    ) -> Result<Carry> {
        let cache_only = cache_only && self.ends();
        if cache.layers.is_empty() {
            *cache = self.new_cache();
        } else if cache.layers.len() != self.layers.len() {
            return Err(ComputeError::CacheMismatch {
                layers: cache.layers.len(),
                model: self.layers.len(),
            });
        }
        // Routed entries per sparse layer: positions x top-k.
        let positions: usize = match input {
            Input::Tokens(t) => t.shape().iter().product(),
            Input::Carried(c) => c.positions(),
        };
        let entries = positions * self.cfg.num_experts_per_tok;
        if let Some(first) = self.layers.iter().find_map(Block::moe) {
            experts.begin_pass(first.layer, entries)?;
        }
        if self.cfg.hyper_connections.is_some() {
            return self.hidden_hc(input, cache, experts, cache_only, entries);
        }
        let (h, len, mut blocks) = match input {
            Input::Tokens(tokens) => (
                self.embed(tokens)?,
                tokens.dim(-1).unwrap_or(0),
                self.residual_blocks(),
            ),
            Input::Carried(c) => (
                c.h.clone(),
                c.h.dim(1).unwrap_or(0),
                self.cfg
                    .attn_res_block_size
                    .map(|_| ResidualBlocks::from_parts(&c.parts, self.cfg.rms_norm_eps))
                    .transpose()?,
            ),
        };
        // One mask per kind of layer, made before any layer updates its cache.
        let masks = cache.masks(len)?;
        // Running ahead confirms layers by their index in `self.layers`: whole models only.
        let whole = self.first == 0 && self.ends();
        if whole && experts.runs_ahead(positions) {
            experts.set_ahead(true);
            let out = self.layers_ahead(h, &masks, cache, experts, cache_only, blocks);
            experts.set_ahead(false);
            return out.map(Carry::plain);
        }
        let h = self.run_layers(
            h,
            &mut |l, layer, h, blocks| {
                layer.attend(h, masks[l].as_mask(), &mut cache.layers[l], blocks)
            },
            experts,
            cache_only,
            entries,
            blocks.as_mut(),
        )?;
        if !self.ends() {
            return Ok(Carry {
                h,
                parts: blocks.map(ResidualBlocks::into_parts).unwrap_or_default(),
            });
        }
        Ok(Carry::plain(self.output_of(h, blocks.as_ref())?))
    }

    /// Each layer of this model on `h`: `attend(l, layer, h, blocks)` runs layer `l`'s
    /// attention step against the caller's cache(s) ([`Block::attend`] on one cache, or one
    /// per row in [`Model::forward_rows`]), then the feed-forward through `experts` (with the
    /// next sparse layer's guess, when the store wants one).
    #[allow(clippy::too_many_arguments)]
    fn run_layers(
        &self,
        mut h: Array,
        attend: &mut AttendStep<'_>,
        experts: &mut dyn ExpertStore,
        cache_only: bool,
        entries: usize,
        mut blocks: Option<&mut ResidualBlocks>,
    ) -> Result<Array> {
        for (l, layer) in self.layers.iter().enumerate() {
            // r = self.self_attn(self.input_layernorm(x), mask, cache); h = x + r
            h = attend(l, layer, &h, blocks.as_deref_mut())?;
            // The model's last layer, which only this model's last can be when it ends it.
            let last = l + 1 == self.layers.len() && self.ends();
            if cache_only && last {
                break;
            }
            // r = self.mlp(self.post_attention_layernorm(h)); out = h + r
            let x = layer.ffn_input(&h, blocks.as_deref())?;
            if layer.moe().is_some() && experts.wants_prediction() {
                if let Some(next) = self.next_sparse(l) {
                    // Nothing to prefetch for a block that will be skipped.
                    let skipped = cache_only && next.layer + 1 == self.cfg.num_hidden_layers;
                    if !skipped && experts.wants_guess(next.layer, entries) {
                        experts.predict(next.layer, &next.route(&x)?)?;
                    }
                }
            }
            h = layer.residual(&h, &layer.ffn(&x, experts)?)?;
            if layer.moe().is_some() && experts.eager() && !last {
                mlx::async_eval(&[&h])?;
            }
        }
        Ok(h)
    }

    /// Whether [`Model::forward_rows`] can run several sequences of this model at once: a
    /// whole model (not a pipeline stage) whose layers pass one hidden state (not
    /// DeepSeek-V4.1's hyper-connections or Kimi-K3's attention residuals, whose per-call
    /// state is not split by row).
    pub fn batches_rows(&self) -> bool {
        self.first == 0
            && self.ends()
            && self.downstream.is_none()
            && self.cfg.hyper_connections.is_none()
            && self.cfg.attn_res_block_size.is_none()
    }

    /// One decode step of several sequences at once: `tokens` `[B, 1]`, row `i` placed after
    /// what `caches[i]` holds (each cache grows by one position). Each row's attention runs on
    /// its own cache, at its own position; the rest of each layer (the feed-forward, the
    /// routed experts, read once for every row routed to them) runs on the `[B, 1, H]` batch.
    /// Logits `[B, 1, vocab]`; row `i` is what [`Model::forward_last`] gives for that sequence
    /// alone (one row is exactly that call). Refused where [`Model::batches_rows`] says no.
    pub fn forward_rows(
        &self,
        tokens: &Array,
        caches: &mut [&mut KvCache],
        experts: &mut dyn ExpertStore,
    ) -> Result<Array> {
        let rows = caches.len();
        if tokens.shape() != [rows, 1] {
            return Err(ComputeError::Unsupported {
                what: format!(
                    "a batched decode step of tokens {:?} for {rows} caches (one token per row)",
                    tokens.shape()
                ),
            });
        }
        if rows == 1 {
            return self.forward_last(tokens, caches[0], experts);
        }
        if !self.batches_rows() {
            return Err(ComputeError::Unsupported {
                what: format!("several sequences at once on {}", self.cfg.arch),
            });
        }
        for cache in caches.iter_mut() {
            if cache.layers.is_empty() {
                **cache = self.new_cache();
            } else if cache.layers.len() != self.layers.len() {
                return Err(ComputeError::CacheMismatch {
                    layers: cache.layers.len(),
                    model: self.layers.len(),
                });
            }
        }
        let entries = rows * self.cfg.num_experts_per_tok;
        if let Some(first) = self.layers.iter().find_map(Block::moe) {
            experts.begin_pass(first.layer, entries)?;
        }
        let h = self.embed(tokens)?;
        let masks = caches
            .iter()
            .map(|c| c.masks(1))
            .collect::<Result<Vec<_>>>()?;
        let hidden = h.dim(-1).unwrap_or(0) as i32;
        let h = self.run_layers(
            h,
            &mut |l, layer, h, _| {
                let mut out = Vec::with_capacity(rows);
                for (i, cache) in caches.iter_mut().enumerate() {
                    let row = h.slice(&[i as i32, 0, 0], &[i as i32 + 1, 1, hidden])?;
                    out.push(layer.attend(
                        &row,
                        masks[i][l].as_mask(),
                        &mut cache.layers[l],
                        None,
                    )?);
                }
                Ok(mlx::concatenate(&out.iter().collect::<Vec<_>>(), 0)?)
            },
            experts,
            false,
            entries,
            None,
        )?;
        self.logits_of(&h, Want::Last)
    }

    /// The layers of [`Model::hidden`] for a store that runs ahead (`ExpertStore::runs_ahead`):
    /// each layer is built and scheduled with the experts the store last placed, and a sparse
    /// layer's routing is confirmed only after the next layer is scheduled, so the device never
    /// waits for the host to learn a routing it had to compute first. A layer whose experts
    /// were not all in place is routed again the usual way (loading what it misses) from its
    /// kept input, and every layer after it is computed again: their cache positions are cut
    /// back (or, for fixed-size caches, put back as they were) and written anew. Same results
    /// as the loop of `hidden`, bit for bit: a layer's output only stands once its experts are
    /// confirmed to be the ones it read.
    fn layers_ahead(
        &self,
        mut h: Array,
        masks: &[AttnMask],
        cache: &mut KvCache,
        experts: &mut dyn ExpertStore,
        cache_only: bool,
        mut blocks: Option<ResidualBlocks>,
    ) -> Result<Array> {
        let n = self.layers.len();
        let mut open: Option<Open> = None;
        // How to put back each layer scheduled after the open one.
        let mut undo: Vec<(usize, Rewind)> = Vec::new();
        let mut l = 0;
        while l < n || open.is_some() {
            let mut opened = None;
            if l < n {
                let layer = &self.layers[l];
                undo.push((l, Rewind::of(&cache.layers[l])));
                let h_attn = layer.attend(
                    &h,
                    masks[l].as_mask(),
                    &mut cache.layers[l],
                    blocks.as_mut(),
                )?;
                let last = l + 1 == n && self.ends();
                if cache_only && last {
                    h = h_attn;
                } else {
                    let x = layer.ffn_input(&h_attn, blocks.as_ref())?;
                    h = layer.residual(&h_attn, &layer.ffn(&x, experts)?)?;
                    if layer.moe().is_some() {
                        if !last {
                            mlx::async_eval(&[&h])?;
                        }
                        opened = Some(Open {
                            layer: l,
                            h_attn,
                            x,
                            blocks: blocks.clone(),
                        });
                    }
                }
                l += 1;
            }
            // The open layer is confirmed once the next one is scheduled (or at the end).
            if let Some(o) = open.take() {
                if !experts.confirm(o.layer)? {
                    for (i, r) in undo.drain(..) {
                        if i > o.layer {
                            r.restore(&mut cache.layers[i])?;
                        }
                    }
                    experts.set_ahead(false);
                    let y = self.layers[o.layer].ffn(&o.x, experts);
                    experts.set_ahead(true);
                    h = self.layers[o.layer].residual(&o.h_attn, &y?)?;
                    // The blocks as the open layer left them.
                    blocks = o.blocks;
                    l = o.layer + 1;
                    if l < n {
                        mlx::async_eval(&[&h])?;
                    }
                    continue;
                }
            }
            if opened.is_some() {
                open = opened;
                undo.clear();
            }
        }
        self.output_of(h, blocks.as_ref())
    }

    /// [`Model::hidden`] for DeepSeek-V4.1 (mlx-lm deepseek_v41.py `TextModel.__call__`): the
    /// embedding as `hc` equal streams through each layer's [`Block::hc_attend`],
    /// [`Block::hc_ffn_input`] and [`Block::hc_ffn_done`], then the last pre-mix collapses the
    /// streams into the hidden state.
    fn hidden_hc(
        &self,
        input: Input<'_>,
        cache: &mut KvCache,
        experts: &mut dyn ExpertStore,
        cache_only: bool,
        entries: usize,
    ) -> Result<Carry> {
        let first = cache.layers[0].compressed(&format!("model.layers.{}", self.first))?;
        let (offset, window_rows) = (first.offset(), first.window_rows());
        let mut st = match input {
            Input::Tokens(tokens) => {
                HcState::new(&self.cfg, &self.embed(tokens)?, offset, window_rows)?
            }
            Input::Carried(c) => HcState::resume(&self.cfg, c, offset, window_rows)?,
        };
        let n = self.layers.len();
        for (l, (layer, lc)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            layer.hc_attend(&mut st, lc, l)?;
            let last = l + 1 == n;
            if cache_only && last {
                break;
            }
            let x = layer.hc_ffn_input(&mut st)?;
            if layer.moe().is_some() && experts.wants_prediction() {
                if let Some(next) = self.next_sparse(l) {
                    let skipped = cache_only && next.layer + 1 == n;
                    if !skipped && experts.wants_guess(next.layer, entries) {
                        experts.predict(next.layer, &next.route(&x)?)?;
                    }
                }
            }
            let y = layer.ffn(&x, experts)?;
            layer.hc_ffn_done(&mut st, &y)?;
            if layer.moe().is_some() && experts.eager() && !last {
                mlx::async_eval(&[st.streams()])?;
            }
        }
        if !self.ends() {
            return Ok(st.into_carry());
        }
        Ok(Carry::plain(st.output()?))
    }

    /// The embedding of `tokens` (scaled as Gemma 4 scales it).
    fn embed(&self, tokens: &Array) -> Result<Array> {
        let embed = self
            .embed
            .as_ref()
            .ok_or_else(|| ComputeError::Unsupported {
                what: format!(
                    "token ids into a pipeline stage of layers {:?}",
                    self.range()
                ),
            })?;
        let mut h = embed.forward(tokens)?;
        if self.cfg.gemma4.is_some() {
            // h = h * self.embed_scale (hidden_size**0.5, a Python float: h's dtype)
            let scale = Array::scalar((self.cfg.hidden_size as f64).sqrt(), h.dtype())?;
            h = h.mul(&scale)?;
        }
        Ok(h)
    }

    /// The logits of `h` `[B, L, H]`, the output of the model's last layer: of the last
    /// position only ([`Want::Last`]) or of all ([`Want::All`]). A pipeline's last stage
    /// calls this.
    pub fn logits_of(&self, h: &Array, want: Want) -> Result<Array> {
        match want {
            Want::Last | Want::Sample(_) => self.head(&last_position(h)?),
            Want::Pick => {
                let logits = self.head(&last_position(h)?)?;
                let b = logits.dim(0).unwrap_or(1) as i32;
                let ids = logits.argmax(-1)?.astype(mlx::Dtype::F32)?;
                let sum = logits.sum(-1, false)?.astype(mlx::Dtype::F32)?;
                Ok(mlx::concatenate(
                    &[&ids.reshape(&[b, 1, 1])?, &sum.reshape(&[b, 1, 1])?],
                    2,
                )?)
            }
            _ => self.head(h),
        }
    }

    /// The greedy pick after `tokens` `[B, 1]`: the ids `[B, 1]` of the last position's
    /// largest logits and the logits' sums `[B, 1]` (NaN exactly when a logit is), as
    /// `argmax` and `sum` of [`Model::forward_last`]'s logits. A pipeline's first stage gets
    /// them from the last stage ([`Want::Pick`]): two numbers a row cross the ring instead of
    /// the vocabulary's logits.
    pub fn forward_pick(
        &self,
        tokens: &Array,
        cache: &mut KvCache,
        experts: &mut dyn ExpertStore,
    ) -> Result<(Array, Array)> {
        match &self.downstream {
            Some(d) if !self.ends() && self.cfg.vocab_size < 1 << 24 && pick_downstream() => {
                let offset = cache.offset();
                let carry = self.hidden(tokens, cache, experts, false)?;
                let both = d.finish(&carry, offset, Want::Pick)?.ok_or_else(|| {
                    ComputeError::Unsupported {
                        what: "a pipeline stage that gave no pick".into(),
                    }
                })?;
                let b = both.dim(0).unwrap_or(1) as i32;
                let ids = both
                    .slice(&[0, 0, 0], &[b, 1, 1])?
                    .reshape(&[b, 1])?
                    .astype(mlx::Dtype::U32)?;
                let sum = both.slice(&[0, 0, 1], &[b, 1, 2])?.reshape(&[b, 1])?;
                Ok((ids, sum))
            }
            _ => {
                let logits = self.forward_last(tokens, cache, experts)?;
                Ok((logits.argmax(-1)?, logits.sum(-1, false)?))
            }
        }
    }

    /// Whether [`Model::forward_sampled`] applies: this model hands its last layer's output to
    /// a pipeline's later stages, whose last samples and sends back the id (exact in f32 below
    /// 2^24).
    pub fn samples_downstream(&self) -> bool {
        self.downstream.is_some() && !self.ends() && self.cfg.vocab_size < 1 << 24
    }

    /// The last position's token for `ids` (one sequence), sampled by the pipeline's last stage
    /// with `spec` ([`Want::Sample`]): `[1, 1, 2]` f32, the id and the logits' sum (NaN exactly
    /// when a logit is). Only where [`Model::samples_downstream`].
    pub fn forward_sampled(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        experts: &mut dyn ExpertStore,
        spec: SampleSpec,
    ) -> Result<Array> {
        let Some(d) = self
            .downstream
            .as_ref()
            .filter(|_| self.samples_downstream())
        else {
            return Err(ComputeError::Unsupported {
                what: "sampling on a later pipeline stage without one".into(),
            });
        };
        let tokens = self.ids_array(ids)?;
        let offset = cache.offset();
        let carry = self.hidden(&tokens, cache, experts, false)?;
        d.finish(&carry, offset, Want::Sample(spec))?
            .ok_or_else(|| ComputeError::Unsupported {
                what: "a pipeline stage that gave no sample".into(),
            })
    }

    /// The final norm and the LM head on hidden states `[B, L, H]`.
    fn head(&self, h: &Array) -> Result<Array> {
        let (Some(norm), true) = (&self.norm, self.ends()) else {
            return Err(ComputeError::Unsupported {
                what: format!(
                    "the LM head on a pipeline stage of layers {:?}",
                    self.range()
                ),
            });
        };
        let h = norm.forward(h)?;
        let logits = match (&self.lm_head, &self.embed) {
            (Some(head), _) => head.forward(&h)?,
            (None, Some(embed)) => embed.as_linear(&h)?,
            (None, None) => {
                return Err(ComputeError::Unsupported {
                    what: "tied embeddings without the embedding".into(),
                })
            }
        };
        match self
            .cfg
            .gemma4
            .as_ref()
            .and_then(|g| g.final_logit_softcapping)
        {
            // logit_softcap(c, x) = mx.tanh(x / c) * c   (gemma4_text.py, compiled)
            Some(c) => Ok(layers::elementwise2(
                &SOFTCAP,
                &[c.to_bits()],
                &logits,
                &Array::scalar(c, logits.dtype())?,
                &|x, c| x.div(c)?.tanh()?.mul(c),
            )?),
            None => Ok(logits),
        }
    }

    /// Logits `[B, L, vocab]` for `tokens` `[B, L]` (integer ids) placed after what `cache`
    /// holds; `cache` grows by `L` positions. An empty `KvCache::default()` is sized on first use.
    pub fn forward(
        &self,
        tokens: &Array,
        cache: &mut KvCache,
        experts: &mut dyn ExpertStore,
    ) -> Result<Array> {
        let offset = cache.offset();
        let carry = self.hidden(tokens, cache, experts, false)?;
        self.finish(&carry, offset, Want::All)
    }

    /// What `want` asks of `carry`, this model's last layer's output: the head here, or the
    /// stages after this one.
    fn finish(&self, carry: &Carry, offset: usize, want: Want) -> Result<Array> {
        match &self.downstream {
            Some(d) if !self.ends() => {
                d.finish(carry, offset, want)?
                    .ok_or_else(|| ComputeError::Unsupported {
                        what: "a pipeline stage that gave no logits".into(),
                    })
            }
            _ => self.logits_of(&carry.h, want),
        }
    }

    /// Logits `[B, 1, vocab]` of the last position only. Generation needs no more, and on a
    /// long prompt the LM head over every position costs as much as the rest of the prefill
    /// (mlx-lm likewise never evaluates the prompt's logits). The norm and the head act on each
    /// position alone, so this row is the last row of [`Model::forward`].
    pub fn forward_last(
        &self,
        tokens: &Array,
        cache: &mut KvCache,
        experts: &mut dyn ExpertStore,
    ) -> Result<Array> {
        let offset = cache.offset();
        let carry = self.hidden(tokens, cache, experts, false)?;
        self.finish(&carry, offset, Want::Last)
    }

    /// [`Model::forward`] for one sequence given as ids; checks them against the vocabulary.
    pub fn forward_ids(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        experts: &mut dyn ExpertStore,
    ) -> Result<Array> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(ComputeError::TokenOutOfRange {
                id,
                vocab: self.cfg.vocab_size,
            });
        }
        let tokens = Array::from_slice(ids, &[1, ids.len()])?;
        self.forward(&tokens, cache, experts)
    }

    /// Runs prompt `tokens` `[B, L]` (positions before the prompt's last) through the model
    /// only as far as the KV cache needs, and evaluates the cache. Follow with
    /// [`Model::forward_last`] on the last prompt token for its logits.
    pub fn prefill(
        &self,
        tokens: &Array,
        cache: &mut KvCache,
        experts: &mut dyn ExpertStore,
    ) -> Result<()> {
        let offset = cache.offset();
        let carry = self.hidden(tokens, cache, experts, true)?;
        if let (Some(d), false) = (&self.downstream, self.ends()) {
            d.finish(&carry, offset, Want::Cache)?;
        }
        Ok(mlx::eval(&cache.state())?)
    }

    /// [`Model::prefill`] for one sequence given as ids.
    pub fn prefill_ids(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        experts: &mut dyn ExpertStore,
    ) -> Result<()> {
        self.prefill(&self.ids_array(ids)?, cache, experts)
    }

    /// `[1, L]` ids, checked against the vocabulary.
    fn ids_array(&self, ids: &[u32]) -> Result<Array> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(ComputeError::TokenOutOfRange {
                id,
                vocab: self.cfg.vocab_size,
            });
        }
        Ok(Array::from_slice(ids, &[1, ids.len()])?)
    }

    /// [`Model::forward_last`] for one sequence given as ids.
    pub fn forward_last_ids(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        experts: &mut dyn ExpertStore,
    ) -> Result<Array> {
        self.forward_last(&self.ids_array(ids)?, cache, experts)
    }
}

/// Layer `l`'s attention step on `h` against the caller's cache(s) ([`Model::run_layers`]).
type AttendStep<'a> =
    dyn FnMut(usize, &Block, &Array, Option<&mut ResidualBlocks>) -> Result<Array> + 'a;

/// Whether a pipeline's last stage picks greedy tokens ([`Want::Pick`]); `FLASHPACK_PIPELINE_PICK=0`
/// brings the logits back instead, for A/B runs (decision 0034).
fn pick_downstream() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FLASHPACK_PIPELINE_PICK").map_or(true, |v| v != "0"))
}

/// `h[..., -1:, :]`: the last position of hidden states `[B, L, H]`.
fn last_position(h: &Array) -> Result<Array> {
    let stop: Vec<i32> = h.shape().iter().map(|&d| d as i32).collect();
    let mut start = vec![0i32; stop.len()];
    if stop.len() >= 2 {
        let at = stop.len() - 2;
        start[at] = (stop[at] - 1).max(0);
    }
    Ok(h.slice(&start, &stop)?)
}

#[cfg(test)]
mod tests;
