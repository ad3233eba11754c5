//! What a pack holds, summarised for `flashpack inspect`.
//!
//! In: an opened [`Pack`]. Out: a serialisable [`PackReport`]. No I/O beyond the mapped bytes
//! the pack already holds; payloads are not decoded.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::arch::KvBits;
use crate::format::{codec_id, optional, required, Pack, QuantMode, SectionKind};

/// Sizes and bits of one kind of weight.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KindStats {
    /// Stored bytes (after coding).
    pub bytes: u64,
    /// Number of weights (quantized or not; scales and biases count as overhead of their weights).
    pub weights: u64,
    /// Stored bits per weight, overhead included.
    pub bits_per_weight: f64,
}

impl KindStats {
    fn add(&mut self, bytes: u64, weights: u64) {
        self.bytes += bytes;
        self.weights += weights;
    }

    fn finish(&mut self) {
        self.bits_per_weight = if self.weights == 0 {
            0.0
        } else {
            self.bytes as f64 * 8.0 / self.weights as f64
        };
    }
}

/// Everything `flashpack inspect` shows.
#[derive(Clone, Debug, Serialize)]
pub struct PackReport {
    pub format_version: String,
    pub architecture: String,
    pub layers: u64,
    pub experts_per_layer: BTreeMap<u32, u32>,
    pub segments: usize,
    pub hidden_size: u32,
    /// The routed experts' input width: `hidden_size`, or under Kimi-K3's latent MoE its own.
    pub expert_hidden_size: u32,
    pub intermediate_size: u32,
    /// "GQA, 32 heads / 4 KV heads of 128" or "MLA, 128 heads, latent 512 + rotary 64"; for a
    /// hybrid model (Qwen3-Next, Qwen3.5) the full-attention layers' kind, then the Gated
    /// DeltaNet layers'.
    pub attention: String,
    /// Bytes the KV cache takes per token over the layers whose cache grows with the context, in
    /// bf16: every KV head's key and value, or under MLA one latent and one rotary key, plus the
    /// DSA indexer's key under sparse attention (what the
    /// run's budget reserves per position). Layers of linear attention have none; sliding-window
    /// layers are counted in `kv_cache_window_bytes` instead. DeepSeek-V4.1: its KV source
    /// layers' compressed latents and index keys, one of each per `ratio` tokens (rounded up
    /// per token); its windows are in `kv_cache_window_bytes`.
    pub kv_cache_bytes_per_token: u64,
    /// Bytes the sliding-window layers' caches take once their windows are full (gpt-oss, and
    /// every DeepSeek-V4.1 layer's window), the same at any longer context; 0 without
    /// sliding-window layers. A prefill chunk adds up to
    /// its own length to each while it runs; the run's budget counts that too.
    pub kv_cache_window_bytes: u64,
    /// What `--kv-bits` would make of `kv_cache_bytes_per_token`.
    pub kv_bits: KvBitsReport,
    /// Bytes of the linear-attention layers' state (convolution state in bf16, recurrent state
    /// in f32), the same at any context length; 0 without linear attention.
    pub recurrent_state_bytes: u64,
    pub max_position_embeddings: Option<usize>,
    pub file_bytes: u64,
    pub dense: KindStats,
    pub experts: KindStats,
    pub overall: KindStats,
    /// Expert stored bytes and weights by bits ("4-bit", "2-bit"; "2/2/6-bit" for an expert whose
    /// gate, up and down projections have 2, 2 and 6 bits).
    pub expert_bits: BTreeMap<String, KindStats>,
    /// Per layer: how many stored experts have each bits label.
    pub expert_bits_by_layer: BTreeMap<u32, BTreeMap<String, u32>>,
    /// Dense stored bytes and weights by bits ("8-bit", "4-bit", "float" for unquantized
    /// tensors); scales and biases count with their codes.
    pub dense_bits: BTreeMap<String, KindStats>,
    /// Segment parts by codec: how many parts and stored bytes.
    pub codecs: BTreeMap<String, (u64, u64)>,
    pub page_size: u32,
    pub padding_bytes: u64,
    pub padding_fraction: f64,
    pub required_features: Vec<&'static str>,
    pub optional_features: Vec<&'static str>,
    pub provenance: Value,
    pub quantization: Value,
}

/// The KV cache under `run --kv-bits` (`arch::ModelConfig::kv_group`): the layers it
/// quantizes and the bytes per token at each width.
#[derive(Clone, Debug, Serialize)]
pub struct KvBitsReport {
    /// Layers whose keys and values `--kv-bits` quantizes (groups of 64, or 32 on a 32-wide
    /// head), of `layers`.
    pub quantized_layers: usize,
    /// What the other layers keep as they are: "sliding-window cache", "MLA latent cache", ...
    pub kept: Vec<&'static str>,
    /// `kv_cache_bytes_per_token` at `--kv-bits 8` and `--kv-bits 4`.
    pub bytes_per_token_8bit: u64,
    pub bytes_per_token_4bit: u64,
}

impl KvBitsReport {
    pub fn of(m: &crate::arch::ModelConfig) -> KvBitsReport {
        KvBitsReport {
            quantized_layers: m.kv_quantized_layers().len(),
            kept: m.kv_kept().iter().map(|k| k.describe()).collect(),
            bytes_per_token_8bit: m.kv_bytes_per_token(Some(KvBits::EIGHT)),
            bytes_per_token_4bit: m.kv_bytes_per_token(Some(KvBits::FOUR)),
        }
    }
}

const REQUIRED_NAMES: [(u64, &str); 10] = [
    (required::CODEC_HUFFMAN, "CODEC_HUFFMAN"),
    (required::CODEC_ZSTD, "CODEC_ZSTD"),
    (required::CODEC_LZ4, "CODEC_LZ4"),
    (required::MERGED_EXPERTS, "MERGED_EXPERTS"),
    (required::VERTICAL_SEGMENTS, "VERTICAL_SEGMENTS"),
    (required::MIXED_EXPERT_BITS, "MIXED_EXPERT_BITS"),
    (required::PROJECTION_BITS, "PROJECTION_BITS"),
    (required::MX_MODES, "MX_MODES"),
    (required::NVFP4, "NVFP4"),
    (required::EXPERT_BIASES, "EXPERT_BIASES"),
];
const OPTIONAL_NAMES: [(u64, &str); 2] = [
    (optional::EXPERT_PROFILE, "EXPERT_PROFILE"),
    (optional::CHAT_TEMPLATE, "CHAT_TEMPLATE"),
];

/// The attention kind and its widths, for [`PackReport::attention`].
fn attention_label(m: &crate::arch::ModelConfig) -> String {
    if let Some(c) = &m.compressed_attention {
        let compressed: Vec<String> = c
            .kv_source_layers
            .iter()
            .map(|&l| format!("layer {l} / {}", c.ratio(l)))
            .collect();
        return format!(
            "window {} + compressed latents ({}) of one KV head of {} ({} rotated), {} heads, \
             query rank {}, {} output groups of rank {}; indexer {} heads of {}, top {}{}",
            c.sliding_window,
            compressed.join(", "),
            m.head_dim,
            c.rope_dim,
            m.num_attention_heads,
            c.q_lora_rank,
            c.o_groups,
            c.o_lora_rank,
            c.index_n_heads,
            c.index_head_dim,
            c.index_topk,
            m.hyper_connections
                .as_ref()
                .map_or(String::new(), |h| format!(
                    "; {} hyper-connection streams",
                    h.mult
                )),
        );
    }
    match &m.mla {
        Some(a) => {
            // Kimi-K3: "1 of 3 layers MLA, 3 heads, latent 64 + unrotated 32, query rank 64,
            // output gate; 2 Kimi Delta Attention (2 heads of 64, conv 4)"
            let mla = format!(
                "MLA, {} heads, latent {} + {} {}{}{}{}",
                m.num_attention_heads,
                a.kv_lora_rank,
                if a.no_rope { "unrotated" } else { "rotary" },
                a.qk_rope_head_dim,
                a.q_lora_rank
                    .map_or(String::new(), |r| format!(", query rank {r}")),
                if a.output_gate { ", output gate" } else { "" },
                m.indexer.as_ref().map_or(String::new(), |i| format!(
                    "; sparse (DSA indexer: {} heads of {}, key {} cached, top {})",
                    i.n_heads, i.head_dim, i.head_dim, i.topk
                ))
            );
            match &m.linear_attention {
                None => mla,
                Some(la) => {
                    let full = m.full_attention_layers();
                    format!(
                        "{full} of {} layers {mla}; {} {}",
                        m.num_hidden_layers,
                        m.num_hidden_layers - full,
                        linear_label(la)
                    )
                }
            }
        }
        None => {
            let rope = m.rope_dims();
            let gqa = format!(
                "GQA, {} heads / {} KV heads of {}{}{}",
                m.num_attention_heads,
                m.num_key_value_heads,
                m.head_dim,
                if rope < m.head_dim {
                    format!(" ({rope} rotated)")
                } else {
                    String::new()
                },
                if m.attn_output_gate {
                    ", output gate"
                } else {
                    ""
                }
            );
            // gpt-oss: ", sinks; 12 of 24 layers a sliding window of 128"
            let gqa = format!(
                "{gqa}{}{}",
                if m.attention_sinks { ", sinks" } else { "" },
                m.sliding_window.as_ref().map_or(String::new(), |w| format!(
                    "; {} of {} layers a sliding window of {}",
                    w.layers.len(),
                    m.num_hidden_layers,
                    w.size
                ))
            );
            // Gemma 4: "; the others 2 KV heads of 512, values = keys, 128 rotated"
            let gqa = match &m.gemma4 {
                None => gqa,
                Some(g) => format!(
                    "{gqa}; the others {} KV heads of {}{}, {} rotated",
                    g.global_kv_heads,
                    g.global_head_dim,
                    if g.k_eq_v { ", values = keys" } else { "" },
                    match g.global_rope.rope_type.as_str() {
                        "proportional" => {
                            (g.global_head_dim as f64 * g.global_rotary_factor()) as usize
                        }
                        _ => g.global_head_dim,
                    }
                ),
            };
            match &m.linear_attention {
                None => gqa,
                Some(la) => {
                    let full = m.full_attention_layers();
                    format!(
                        "{full} of {} layers {gqa}; {} {}",
                        m.num_hidden_layers,
                        m.num_hidden_layers - full,
                        linear_label(la)
                    )
                }
            }
        }
    }
}

/// The linear-attention layers' kind and widths: "Gated DeltaNet (2 key heads of 32, 4 value
/// heads of 32, conv 4)" or "Kimi Delta Attention (2 heads of 64, conv 4)".
fn linear_label(la: &crate::arch::LinearAttention) -> String {
    match la.projections {
        crate::arch::DeltaProjections::Kda => format!(
            "Kimi Delta Attention ({} heads of {}, conv {})",
            la.num_value_heads, la.value_head_dim, la.conv_kernel_dim
        ),
        _ => format!(
            "Gated DeltaNet ({} key heads of {}, {} value heads of {}, conv {})",
            la.num_key_heads,
            la.key_head_dim,
            la.num_value_heads,
            la.value_head_dim,
            la.conv_kernel_dim
        ),
    }
}

/// "4-bit", "2/2/6-bit" (gate/up/down), or the mode's name ("mxfp4").
fn expert_label(e: &crate::format::ExpertEntry) -> String {
    match e.mode {
        QuantMode::Affine => format!("{}-bit", e.bits),
        m => m.name().to_string(),
    }
}

impl PackReport {
    pub fn new(pack: &Pack) -> PackReport {
        let meta = pack.metadata();
        let typed = pack.meta();
        let h = pack.hidden_size() as u64;
        let mut dense = KindStats::default();
        let mut dense_bits: BTreeMap<String, KindStats> = BTreeMap::new();
        let code_bits: BTreeMap<&str, (u8, QuantMode)> = pack
            .tensors()
            .iter()
            .filter(|t| t.bits > 0)
            .filter_map(|t| Some((t.name.strip_suffix(".weight")?, (t.bits, t.mode))))
            .collect();
        for t in pack.tensors() {
            let module = t
                .name
                .strip_suffix(".scales")
                .or_else(|| t.name.strip_suffix(".biases"));
            let weights = if module.is_some() {
                0
            } else if t.bits > 0 {
                let numel: u64 = t.shape.iter().product();
                numel * 32 / t.bits as u64
            } else {
                t.shape.iter().product()
            };
            dense.add(t.stored_len, weights);
            let (bits, mode) = match module {
                Some(m) => code_bits.get(m).copied().unwrap_or_default(),
                None => (t.bits, t.mode),
            };
            let label = match (bits, mode) {
                (0, _) => "float".to_string(),
                (b, QuantMode::Affine) => format!("{b}-bit"),
                (_, m) => m.name().to_string(),
            };
            dense_bits
                .entry(label)
                .or_default()
                .add(t.stored_len, weights);
        }
        dense_bits.values_mut().for_each(KindStats::finish);
        let mut experts = KindStats::default();
        let mut by_bits: BTreeMap<String, KindStats> = BTreeMap::new();
        let mut codecs: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let mut per_layer: BTreeMap<u32, u32> = BTreeMap::new();
        let mut bits_by_layer: BTreeMap<u32, BTreeMap<String, u32>> = BTreeMap::new();
        for e in pack.experts() {
            let weights = 3 * e.row_count as u64 * h;
            experts.add(e.stored_len, weights);
            by_bits
                .entry(expert_label(e))
                .or_default()
                .add(e.stored_len, weights);
            let mut count = |codec: u8, part: &str, bytes: u64| {
                let c = codecs
                    .entry(format!("{part}:{}", codec_id::name(codec)))
                    .or_default();
                c.0 += 1;
                c.1 += bytes;
            };
            count(e.weight_codec, "weights", e.weights_stored_len);
            count(
                e.aux_codec,
                "scales+biases",
                e.stored_len - e.weights_stored_len,
            );
            if e.segment == 0 {
                *per_layer.entry(e.layer).or_default() += 1;
                *bits_by_layer
                    .entry(e.layer)
                    .or_default()
                    .entry(expert_label(e))
                    .or_default() += 1;
            }
        }
        let mut overall = KindStats::default();
        overall.add(dense.bytes + experts.bytes, dense.weights + experts.weights);
        for s in [&mut dense, &mut experts, &mut overall] {
            s.finish();
        }
        by_bits.values_mut().for_each(KindStats::finish);
        let header = pack.header();
        let file_bytes = header.file_size;
        let content: u64 = dense.bytes
            + experts.bytes
            + header
                .sections
                .iter()
                .filter(|s| s.known_kind().is_none_or(SectionKind::hashed))
                .map(|s| s.stored_len)
                .sum::<u64>()
            + crate::format::Header::encoded_len(header.sections.len()) as u64;
        let padding = file_bytes.saturating_sub(content);
        let names = |bits: u64, table: &[(u64, &'static str)]| {
            table
                .iter()
                .filter(|(b, _)| bits & b != 0)
                .map(|(_, n)| *n)
                .collect()
        };
        PackReport {
            format_version: format!("{}.{}", header.major, header.minor),
            architecture: typed.architecture.clone(),
            layers: typed.model.num_hidden_layers as u64,
            experts_per_layer: per_layer,
            segments: pack.experts().len(),
            hidden_size: typed.model.hidden_size as u32,
            expert_hidden_size: pack.hidden_size(),
            intermediate_size: pack.intermediate_size(),
            attention: attention_label(&typed.model),
            kv_cache_bytes_per_token: typed.model.kv_values_per_token() * 2,
            kv_cache_window_bytes: {
                let m = &typed.model;
                // Decoding: `size` positions per layer (the prefill's extra chunk is transient).
                let size = m
                    .sliding_window
                    .as_ref()
                    .map(|w| w.size)
                    .or(m.compressed_attention.as_ref().map(|c| c.sliding_window));
                size.map_or(0, |n| m.window_kv_values(n as u64, 1) * 2)
            },
            kv_bits: KvBitsReport::of(&typed.model),
            recurrent_state_bytes: typed.model.recurrent_state_bytes(),
            max_position_embeddings: typed.model.max_position_embeddings,
            file_bytes,
            dense,
            experts,
            overall,
            expert_bits: by_bits,
            expert_bits_by_layer: bits_by_layer,
            dense_bits,
            codecs,
            page_size: header.page_size,
            padding_bytes: padding,
            padding_fraction: padding as f64 / file_bytes.max(1) as f64,
            required_features: names(header.required_features, &REQUIRED_NAMES),
            optional_features: names(header.optional_features, &OPTIONAL_NAMES),
            provenance: meta["provenance"].clone(),
            quantization: meta["quantization"].clone(),
        }
    }
}
