//! Writes a seeded tiny Hugging Face MoE checkpoint (see tests/common/fixtures.rs), for
//! Python scripts and benchmarks:
//! `cargo run --release --example make_fixture -- --arch qwen3_moe --out DIR [options]`.

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use fixtures::{Dialect, FixtureLayout, FixtureSpec, Fp8Fixture};
use flashpack::arch::Arch;
use flashpack::convert::tensor::FloatDtype;
use std::path::PathBuf;

// The test scaffolding, kept out of the library (tests/common/fixtures.rs); this example uses
// part of it.
#[allow(dead_code)]
#[path = "../tests/common/fixtures.rs"]
mod fixtures;

#[derive(Clone, Copy, ValueEnum)]
enum LayoutArg {
    PerExpert,
    Fused,
}

#[derive(Clone, Copy, ValueEnum)]
enum DialectArg {
    V5,
    Legacy,
    Both,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    Bf16,
    F16,
    F32,
}

#[derive(Parser)]
struct Args {
    /// Any supported `model_type` (qwen3_moe, mixtral, ..., gpt_oss).
    #[arg(long, default_value = "qwen3_moe")]
    arch: String,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value_t = 8)]
    experts: usize,
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Width of one expert.
    #[arg(long, default_value_t = 64)]
    moe_intermediate: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    #[arg(long, default_value_t = 32)]
    head_dim: usize,
    #[arg(long, default_value_t = 512)]
    vocab: usize,
    #[arg(long, value_enum, default_value = "per-expert")]
    layout: LayoutArg,
    #[arg(long, value_enum, default_value = "both")]
    dialect: DialectArg,
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: DtypeArg,
    /// Largest shard in MB (one model.safetensors when absent).
    #[arg(long)]
    shard_mb: Option<u64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Copy tokenizer.json and tokenizer_config.json from this folder (mlx_lm convert needs
    /// one; fixtures/qwen3moe-tiny has a vocabulary of 8192).
    #[arg(long)]
    tokenizer_from: Option<PathBuf>,
    /// Skewed, correlated routing like a trained model's (0: near uniform). See
    /// `FixtureSpec::routing_skew`; 3 gives a few hot experts per layer.
    #[arg(long, default_value_t = 0.0)]
    routing_skew: f32,
    /// gpt-oss: the window of its sliding-window layers (the released models use 128).
    #[arg(long, default_value_t = 8)]
    sliding_window: usize,
    /// Write the linear weights as FP8 E4M3 with one scale per N x N block (what DeepSeek-V3 and
    /// Qwen3 FP8 checkpoints ship): half the bytes of bf16, so a 48-layer model of
    /// Qwen3-30B-A3B's shape fits the GPU machine's disk beside its pack.
    #[arg(long)]
    fp8_block: Option<usize>,
    /// Width of the dense MLPs (the dense first layers of the DeepSeek-V3 family).
    #[arg(long, default_value_t = 256)]
    intermediate: usize,
    /// MLA (DeepSeek-V3 family): the query bottleneck (0: a plain q_proj), the latent and the
    /// rotary widths; `--head-dim` is the per-head width without RoPE and of the values.
    #[arg(long, default_value_t = 128)]
    q_lora_rank: usize,
    #[arg(long, default_value_t = 128)]
    kv_lora_rank: usize,
    #[arg(long, default_value_t = 32)]
    qk_rope_head_dim: usize,
    /// DeepSeek-V3 family, GLM-4.5: the first this-many layers are dense.
    #[arg(long, default_value_t = 1)]
    first_k_dense: usize,
    /// DeepSeek-V3.2 / GLM-5: the sparse-attention indexer's heads, head width and top-k (a
    /// top-k below the prompt's length makes the sparse attention drop positions).
    #[arg(long, default_value_t = 2)]
    index_heads: usize,
    #[arg(long, default_value_t = 64)]
    index_head_dim: usize,
    #[arg(long, default_value_t = 8)]
    index_topk: usize,
    /// Gemma 4: the full-attention layers' head width and KV heads.
    #[arg(long, default_value_t = 64)]
    global_head_dim: usize,
    #[arg(long, default_value_t = 1)]
    global_kv_heads: usize,
    /// Qwen3.5, Gemma 4: the multimodal layout (`text_config`, the text model under
    /// `model.language_model.`, vision tensors).
    #[arg(long)]
    multimodal: bool,
    /// Leave the BOS token out of config.json.
    #[arg(long)]
    no_bos: bool,
    /// Qwen3-Next, Qwen3.5, Kimi-K3: every this-many-th layer has full attention (MLA in
    /// Kimi-K3), the others linear attention.
    #[arg(long, default_value_t = 2)]
    full_attention_interval: usize,
    /// Linear attention's key and value heads (Kimi-K3's KDA heads: the value heads) and their
    /// width.
    #[arg(long, default_value_t = 2)]
    linear_key_heads: usize,
    #[arg(long, default_value_t = 4)]
    linear_value_heads: usize,
    #[arg(long, default_value_t = 32)]
    linear_head_dim: usize,
    /// Kimi-K3: layers per attention-residual block (0: plain residuals).
    #[arg(long, default_value_t = 2)]
    attn_res_block_size: usize,
    /// Kimi-K3: KDA's output gate as one full-rank `g_proj`.
    #[arg(long)]
    full_rank_gate: bool,
    /// Kimi-K3: no `gate_lower_bound` (the decay of `compute_g` instead).
    #[arg(long)]
    no_gate_lower_bound: bool,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let arch = Arch::from_model_type(&a.arch)?;
    let spec = FixtureSpec {
        hidden_size: a.hidden,
        num_layers: a.layers,
        num_experts: a.experts,
        top_k: a.top_k,
        moe_intermediate_size: a.moe_intermediate,
        num_heads: a.heads,
        num_kv_heads: a.kv_heads,
        head_dim: a.head_dim,
        vocab_size: a.vocab,
        layout: match a.layout {
            LayoutArg::PerExpert => FixtureLayout::PerExpert,
            LayoutArg::Fused => FixtureLayout::Fused,
        },
        dialect: match a.dialect {
            DialectArg::V5 => Dialect::Transformers5,
            DialectArg::Legacy => Dialect::Legacy,
            DialectArg::Both => Dialect::Both,
        },
        dtype: match a.dtype {
            DtypeArg::Bf16 => FloatDtype::Bf16,
            DtypeArg::F16 => FloatDtype::F16,
            DtypeArg::F32 => FloatDtype::F32,
        },
        max_shard_bytes: a.shard_mb.map(|m| m << 20),
        seed: a.seed,
        tokenizer_from: a.tokenizer_from,
        routing_skew: a.routing_skew,
        sliding_window: a.sliding_window,
        fp8: a.fp8_block.map_or(Fp8Fixture::Off, Fp8Fixture::Blocks),
        intermediate_size: a.intermediate,
        q_lora_rank: (a.q_lora_rank > 0).then_some(a.q_lora_rank),
        kv_lora_rank: a.kv_lora_rank,
        qk_rope_head_dim: a.qk_rope_head_dim,
        first_k_dense_replace: a.first_k_dense,
        index_heads: a.index_heads,
        index_head_dim: a.index_head_dim,
        index_topk: a.index_topk,
        global_head_dim: a.global_head_dim,
        global_kv_heads: a.global_kv_heads,
        multimodal: a.multimodal,
        full_attention_interval: a.full_attention_interval,
        linear_key_heads: a.linear_key_heads,
        linear_value_heads: a.linear_value_heads,
        linear_key_head_dim: a.linear_head_dim,
        linear_value_head_dim: a.linear_head_dim,
        attn_res_block_size: a.attn_res_block_size,
        full_rank_gate: a.full_rank_gate,
        gate_lower_bound: (!a.no_gate_lower_bound).then_some(-5.0),
        ..FixtureSpec::tiny(arch)
    };
    let t = std::time::Instant::now();
    let bytes = spec
        .write(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    if a.no_bos {
        let path = a.out.join("config.json");
        let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        if let Some(t) = c.get_mut("text_config").and_then(|t| t.as_object_mut()) {
            t.remove("bos_token_id");
        }
        if let Some(o) = c.as_object_mut() {
            o.remove("bos_token_id");
        }
        std::fs::write(&path, serde_json::to_string_pretty(&c)?)?;
    }
    eprintln!(
        "wrote {} ({:.3} GB of weights) in {:.1} s",
        a.out.display(),
        bytes as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
