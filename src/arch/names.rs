//! Tensor naming: an expert's projections and parts, each architecture's [`TensorNames`] (with
//! defaults), and a tensor name's [`TensorRole`].

use serde::{Deserialize, Serialize};

/// One of an expert's three projections (SwiGLU: down(silu(gate(x)) * up(x))).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proj {
    /// [I, H]
    Gate,
    /// [I, H]
    Up,
    /// [H, I]
    Down,
}

impl Proj {
    pub const ALL: [Proj; 3] = [Proj::Gate, Proj::Up, Proj::Down];

    /// The mlx-lm `switch_mlp` name (`gate_proj`, `up_proj`, `down_proj`).
    pub fn mlx_name(self) -> &'static str {
        match self {
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }
}

/// Which tensor of an (optionally MLX-quantized) linear layer a name refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// `.weight`: float weights, or U32 codes in an MLX-quantized checkpoint.
    Weight,
    /// `.scales` of an MLX-quantized layer.
    Scales,
    /// `.biases` of an MLX-quantized layer (the affine offsets, not a linear bias).
    Biases,
}

impl Part {
    fn from_suffix(s: &str) -> Option<Part> {
        match s {
            "weight" => Some(Part::Weight),
            "scales" => Some(Part::Scales),
            "biases" => Some(Part::Biases),
            _ => None,
        }
    }

    pub fn suffix(self) -> &'static str {
        match self {
            Part::Weight => "weight",
            Part::Scales => "scales",
            Part::Biases => "biases",
        }
    }
}

/// How a checkpoint stores a layer's experts (each architecture's table entry lists those its
/// loader reads, [`super::ArchDef::expert_layouts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpertLayout {
    /// Hugging Face on disk: `experts.N.gate_proj.weight`, one tensor per expert.
    PerExpert,
    /// transformers 5.x in memory: `experts.gate_up_proj` `[E, 2I, H]`, `experts.down_proj`.
    Fused,
    /// mlx-lm: `switch_mlp.gate_proj.weight` `[E, I, ..]`, float or quantized.
    Stacked,
    /// gpt-oss's upstream MXFP4 blocks, gate and up interleaved.
    MxBlocks,
    /// transformers' gpt-oss in floats (every bf16 fine-tune it saves): `experts.gate_up_proj`
    /// `[E, H, 2I]` with gate and up interleaved along the last axis and `experts.down_proj`
    /// `[E, I, H]`, both applied as `x @ W` (so each projection is a transposed view).
    FusedColumns,
}

/// What a tensor is, as far as packing is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TensorRole {
    /// One expert's projection, per-expert layout (`...experts.N.gate_proj.weight`).
    Expert {
        layer: usize,
        expert: usize,
        proj: Proj,
        part: Part,
    },
    /// transformers 5.x in-memory fused `experts.gate_up_proj` [E, 2I, H] (gate rows first).
    FusedGateUp { layer: usize },
    /// transformers 5.x in-memory fused `experts.down_proj` [E, H, I].
    FusedDown { layer: usize },
    /// mlx-lm stacked `switch_mlp.{gate,up,down}_proj.{weight,scales,biases}` [E, out, ...].
    Stacked {
        layer: usize,
        proj: Proj,
        part: Part,
    },
    /// Biases of the routed experts' projections, stacked `[E, out]`: mlx-lm's
    /// `experts.{gate,up,down}_proj.bias` (`proj` set), or gpt-oss's upstream
    /// `experts.gate_up_proj_bias` `[E, 2I]` with gate and up interleaved (`proj` `None`) and
    /// `experts.down_proj_bias` (`Some(Down)`).
    ExpertBias { layer: usize, proj: Option<Proj> },
    /// gpt-oss's upstream MXFP4 experts: `experts.gate_up_proj_blocks` / `_scales` (`proj`
    /// `None`: gate and up rows interleaved, `[E, 2I, H/32, 16]` u8 codes and `[E, 2I, H/32]`
    /// E8M0 scales) and `experts.down_proj_blocks` / `_scales` (`Some(Down)`); `part` is
    /// `Weight` for the blocks.
    MxBlocks {
        layer: usize,
        proj: Option<Proj>,
        part: Part,
    },
    /// The router `[E, H]`: kept at full precision (routing decisions are sensitive to it).
    Router { layer: usize },
    /// Norm weights, linear biases, gates of shared experts: small and precision-critical.
    KeepFull,
    /// Everything else (embeddings, attention, dense MLPs, shared experts, lm_head):
    /// quantized or kept by the dense policy.
    Dense,
}

/// How one architecture names its MoE tensors. Names are
/// `model.layers.{L}.{block}.{rest}` with `block` one of `moe_blocks`.
#[derive(Debug)]
pub struct TensorNames {
    /// Module names of the sparse block: on-disk first, then aliases (Mixtral's on-disk
    /// `block_sparse_moe` is `mlp` in transformers 5.x memory).
    pub moe_blocks: &'static [&'static str],
    /// Per-expert projection names for gate, up, down.
    pub expert_projs: [&'static str; 3],
    /// The module under the block holding mlx-lm's stacked experts: `switch_mlp`, or gpt-oss's
    /// `experts`.
    pub stacked_module: &'static str,
    /// Router module under the block (`gate`).
    pub router: &'static str,
    /// Modules under the block that stay full precision besides the router
    /// (Qwen2-MoE's `shared_expert_gate`).
    pub keep_full: &'static [&'static str],
    /// The always-on expert(s) under the block, for an architecture that has them.
    pub shared: Option<SharedNames>,
    /// Modules kept at full precision wherever they are, by their last name (Kimi-K3's
    /// `self_attention_res_proj`, `[1, H]` one-row projections that mlx-lm never quantizes).
    pub keep_full_modules: &'static [&'static str],
}

/// Module names of a block's shared expert(s): Qwen2-MoE `shared_expert` with its gate
/// `shared_expert_gate`; DeepSeek-V3 and GLM-4.5 `shared_experts`, ungated.
#[derive(Debug)]
pub struct SharedNames {
    /// The SwiGLU MLP (`gate_proj`, `up_proj`, `down_proj` under it).
    pub mlp: &'static str,
    /// The `[1, H]` gate whose sigmoid scales the MLP's output, used when the config's
    /// [`SharedExpert::gated`] says so.
    pub gate: &'static str,
}

impl TensorNames {
    /// The names most architectures use (Qwen3-MoE's): `mlp` with per-expert `gate_proj`,
    /// `up_proj`, `down_proj`, mlx-lm's `switch_mlp`, router `gate`, nothing else kept full, no
    /// shared expert. An architecture writes only where it differs
    /// (`TensorNames { router: "router", ..TensorNames::DEFAULT }`), so a new field with a default
    /// here touches no architecture that does not use it.
    pub const DEFAULT: TensorNames = TensorNames {
        moe_blocks: &["mlp"],
        expert_projs: ["gate_proj", "up_proj", "down_proj"],
        stacked_module: "switch_mlp",
        router: "gate",
        keep_full: &[],
        shared: None,
        keep_full_modules: &[],
    };

    /// The on-disk per-expert name of expert `expert`'s `proj` in layer `layer`.
    pub fn expert(&self, layer: usize, expert: usize, proj: Proj, part: Part) -> String {
        format!(
            "model.layers.{layer}.{}.experts.{expert}.{}.{}",
            self.moe_blocks[0],
            self.expert_projs[proj as usize],
            part.suffix()
        )
    }

    /// The on-disk router weight name of layer `layer`.
    pub fn router(&self, layer: usize) -> String {
        format!(
            "model.layers.{layer}.{}.{}.weight",
            self.moe_blocks[0], self.router
        )
    }

    /// The mlx-lm stacked name (`model.layers.L.{block}.switch_mlp.gate_proj.weight`).
    pub fn stacked(&self, layer: usize, proj: Proj, part: Part) -> String {
        format!("{}.{}", self.stacked_module(layer, proj), part.suffix())
    }

    /// The mlx-lm stacked module (`model.layers.L.{block}.switch_mlp.gate_proj`); its linear
    /// bias, when the experts have one, is `<module>.bias`.
    pub fn stacked_module(&self, layer: usize, proj: Proj) -> String {
        format!(
            "model.layers.{layer}.{}.{}.{}",
            self.moe_blocks[0],
            self.stacked_module,
            proj.mlx_name(),
        )
    }

    /// Classifies one tensor name.
    pub fn classify(&self, name: &str) -> TensorRole {
        let module = name.rsplit_once('.').map_or(name, |(m, _)| m);
        let last = module.rsplit('.').next().unwrap_or(module);
        if self.keep_full_modules.contains(&last) {
            return TensorRole::KeepFull;
        }
        let Some((layer, block_rest)) = split_layer(name) else {
            return if is_keep_full_leaf(name) {
                TensorRole::KeepFull
            } else {
                TensorRole::Dense
            };
        };
        let Some(rest) = self
            .moe_blocks
            .iter()
            .find_map(|b| block_rest.strip_prefix(b).and_then(|r| r.strip_prefix('.')))
        else {
            return if is_keep_full_leaf(block_rest) {
                TensorRole::KeepFull
            } else {
                TensorRole::Dense
            };
        };
        if rest == format!("{}.weight", self.router) {
            return TensorRole::Router { layer };
        }
        if self
            .keep_full
            .iter()
            .any(|k| rest.starts_with(k) && rest[k.len()..].starts_with('.'))
        {
            return TensorRole::KeepFull;
        }
        if rest == "experts.gate_up_proj" {
            return TensorRole::FusedGateUp { layer };
        }
        if rest == "experts.down_proj" {
            return TensorRole::FusedDown { layer };
        }
        // gpt-oss upstream: experts.{gate_up,down}_proj_{blocks,scales,bias}
        for (fused, proj) in [("gate_up_proj", None), ("down_proj", Some(Proj::Down))] {
            if let Some(tail) = rest
                .strip_prefix("experts.")
                .and_then(|r| r.strip_prefix(fused))
                .and_then(|r| r.strip_prefix('_'))
            {
                match tail {
                    "blocks" | "scales" => {
                        let part = if tail == "blocks" {
                            Part::Weight
                        } else {
                            Part::Scales
                        };
                        return TensorRole::MxBlocks { layer, proj, part };
                    }
                    "bias" => return TensorRole::ExpertBias { layer, proj },
                    _ => {}
                }
            }
        }
        if let Some(r) = rest.strip_prefix("experts.") {
            if let Some((n, tail)) = r.split_once('.') {
                if let (Ok(expert), Some((pname, suffix))) = (n.parse(), tail.split_once('.')) {
                    let proj = self.expert_projs.iter().position(|p| *p == pname);
                    if let (Some(p), Some(part)) = (proj, Part::from_suffix(suffix)) {
                        return TensorRole::Expert {
                            layer,
                            expert,
                            proj: Proj::ALL[p],
                            part,
                        };
                    }
                }
            }
        }
        if let Some(r) = rest
            .strip_prefix(self.stacked_module)
            .and_then(|r| r.strip_prefix('.'))
        {
            if let Some((pname, suffix)) = r.split_once('.') {
                let proj = Proj::ALL.iter().find(|p| p.mlx_name() == pname);
                if let Some(&proj) = proj {
                    if suffix == "bias" {
                        return TensorRole::ExpertBias {
                            layer,
                            proj: Some(proj),
                        };
                    }
                    if let Some(part) = Part::from_suffix(suffix) {
                        return TensorRole::Stacked { layer, proj, part };
                    }
                }
            }
        }
        if is_keep_full_leaf(rest) {
            TensorRole::KeepFull
        } else {
            TensorRole::Dense
        }
    }
}

/// `model.layers.{L}.{rest}` -> (L, rest).
fn split_layer(name: &str) -> Option<(usize, &str)> {
    let r = name.strip_prefix("model.layers.")?;
    let (l, rest) = r.split_once('.')?;
    Some((l.parse().ok()?, rest))
}

/// Norm weights and linear biases stay full precision whatever the policy.
fn is_keep_full_leaf(name: &str) -> bool {
    name.ends_with(".bias")
        || name
            .rsplit('.')
            .nth(1)
            .is_some_and(|module| module.contains("norm"))
        || name.ends_with("e_score_correction_bias")
}
