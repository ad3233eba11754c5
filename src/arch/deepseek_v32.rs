//! DeepSeek-V3.2 (`deepseek_v32`): its table entry (config fields, tensor names, router,
//! sanitize rules, expert layouts).
//!
//! In: a `config.json` with `model_type: "deepseek_v32"`. Out: DeepSeek-V3's [`ModelConfig`]
//! (`deepseek_v3.rs`: MLA, YaRN on the rotary part, the grouped sigmoid router, shared experts,
//! dense first layers) with DeepSeek Sparse Attention's lightning indexer ([`Indexer`]:
//! `index_n_heads`, `index_head_dim`, `index_topk`, `indexer_rope_interleave`). The query
//! bottleneck is required (the indexer reads its output). Tensor names: DeepSeek-V3's, plus
//! `self_attn.indexer.{wq_b,wk,weights_proj}.weight` and `self_attn.indexer.k_norm.{weight,bias}`.
//!
//! Forward pass (mlx-lm 0.32.2 `mlx_lm/models/deepseek_v32.py`): `DeepseekV32Attention` is
//! DeepSeek-V3's absorbed MLA with the `Indexer` choosing, once the context is longer than
//! `index_topk`, which cached positions each query attends to (model/dsa.rs, chosen by
//! `ModelConfig::indexer`); its cache is `CacheList(KVCache(), KVCache())`, the second holding the
//! indexer's keys. The MoE block, its router and sanitize (`kv_b_proj` split, experts stacked,
//! MTP layers dropped, FP8 dequantized) are DeepSeek-V3's.
//!
//! Prompt format: the repository ships no Jinja template, only a Python module
//! (`encoding/encoding_dsv32.py`, `encode_messages`); [`CHAT_TEMPLATE`] writes its chat mode.

use super::{deepseek_v3, Arch, ArchDef, ArchError, Fields, Indexer, ModelConfig};
use serde_json::Value;

pub(super) const DEF: ArchDef = ArchDef {
    model_type: "deepseek_v32",
    upstream: &[
        "https://huggingface.co/deepseek-ai/DeepSeek-V3.2/blob/main/inference/model.py",
        "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/models/deepseek_v32.py",
    ],
    parse,
    chat_template: Some(CHAT_TEMPLATE),
    ..deepseek_v3::DEF_BODY
};

/// DeepSeek-V3.2's prompt format in chat mode (no reasoning), written from the format its
/// repository documents (https://huggingface.co/deepseek-ai/DeepSeek-V3.2, `encoding/`,
/// `encode_messages(messages, thinking_mode="chat")`, and the release notes' example): the BOS
/// token; a system message's text as it is; a user message as `<｜User｜>{text}<｜Assistant｜>`
/// followed by `</think>` (chat mode closes the reasoning block every turn; thinking mode would
/// open it, `<think>`, after the last user message); an assistant message as
/// `{text}<｜end▁of▁sentence｜>`. So the prompt ends with the assistant's turn and `</think>`,
/// and the model answers and then writes the end-of-sentence token. Tool calls, tool results and
/// the `developer` role (DSML, search agents) are not rendered: such a message is refused.
pub(super) const CHAT_TEMPLATE: &str = "<｜begin▁of▁sentence｜>\
{%- for m in messages -%}\
{%- if m.role == 'system' -%}{{ m.content }}\
{%- elif m.role == 'user' -%}<｜User｜>{{ m.content }}<｜Assistant｜></think>\
{%- elif m.role == 'assistant' -%}{{ m.content }}<｜end▁of▁sentence｜>\
{%- else -%}{{ raise_exception('DeepSeek-V3.2 prompts take system, user and assistant \
messages; flashpack does not render a ' ~ m.role ~ ' message') }}\
{%- endif -%}\
{%- endfor -%}";

fn parse(v: &Value) -> Result<ModelConfig, ArchError> {
    parse_as(v, Arch::DeepseekV32, false)
}

/// DeepSeek-V3's fields and the indexer's, for `arch` (GLM-5 shares them); `interleave` is
/// `indexer_rope_interleave`'s default (False in deepseek_v32.py, True in glm_moe_dsa.py).
pub(super) fn parse_as(v: &Value, arch: Arch, interleave: bool) -> Result<ModelConfig, ArchError> {
    let mut cfg = deepseek_v3::parse_as(v, arch)?;
    let f = Fields::new(v, arch);
    // self.q_a_proj = nn.Linear(hidden_size, q_lora_rank): no plain q_proj in DeepSeek-V3.2.
    if cfg.mla.as_ref().and_then(|m| m.q_lora_rank).is_none() {
        return Err(ArchError::BadField {
            field: "q_lora_rank",
            found: "null".into(),
            expected: "a number: the indexer reads the query bottleneck's output",
        });
    }
    // Defaults of mlx-lm's deepseek_v32 ModelArgs.
    let indexer = Indexer {
        n_heads: f.usize_any(&["index_n_heads"])?.unwrap_or(64),
        head_dim: f.usize_any(&["index_head_dim"])?.unwrap_or(128),
        topk: f.usize_any(&["index_topk"])?.unwrap_or(2048),
        rope_traditional: f.bool_or("indexer_rope_interleave", interleave)?,
    };
    let rope = cfg.rope_dims();
    if indexer.n_heads == 0 || indexer.topk == 0 || indexer.head_dim < rope {
        return Err(ArchError::Inconsistent {
            what: format!(
                "the indexer needs heads and a top-k above 0 and a head at least as wide as the \
                 rotary part ({rope}); index_n_heads {}, index_topk {}, index_head_dim {}",
                indexer.n_heads, indexer.topk, indexer.head_dim
            ),
        });
    }
    cfg.indexer = Some(indexer);
    Ok(cfg)
}
