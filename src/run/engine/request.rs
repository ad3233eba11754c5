//! The engine's options, requests and reports: what callers hand [`super::Engine`] and what it
//! hands back (plain data, no MLX).

use crate::arch::KvBits;
use crate::run::budget::Budget;
use crate::run::experts::PolicyKind;
use crate::run::generate::{GenerateStats, Generation};
use crate::run::read::IoMode;
use crate::run::sample::SamplerOptions;

/// How to size and feed the expert cache (the `run` options of the same names).
#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub mem_budget: Option<Budget>,
    pub expert_budget: Option<Budget>,
    pub io: IoMode,
    pub queue_depth: usize,
    pub policy: PolicyKind,
    pub verify: bool,
    /// Benchmark baseline: no expert cache, every use reads and decodes again.
    pub no_cache: bool,
    pub prefetch: bool,
    pub skip_uncached: Option<f32>,
    /// Benchmark baseline: host-synchronised routing and host greedy sampling.
    pub sync_baseline: bool,
    /// The longest sequence (prompt and generated tokens) the KV cache is budgeted for; the
    /// model's context length caps it.
    pub positions: usize,
    /// Bytes of KV caches kept for conversations other than the current one
    /// (`run::prompt_cache`; 0: one conversation). Under `--mem-budget` they come out of it.
    pub prompt_cache_bytes: u64,
    /// `--kv-bits`: the plain KV layers' keys and values as 8- or 4-bit codes (`None`: bf16).
    pub kv_bits: Option<KvBits>,
    /// Sequences decoded at once (`serve --decode-concurrency`): under `--mem-budget` each one
    /// past the first sets aside a KV cache of `positions` too.
    pub sequences: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            mem_budget: None,
            expert_budget: None,
            io: IoMode::Pread,
            queue_depth: 8,
            policy: PolicyKind::Profile,
            verify: true,
            no_cache: false,
            prefetch: true,
            skip_uncached: None,
            sync_baseline: false,
            positions: usize::MAX,
            prompt_cache_bytes: 0,
            kv_bits: None,
            sequences: 1,
        }
    }
}

/// How the memory was divided, for reports.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct EngineSizes {
    pub dense_bytes: u64,
    pub budget_bytes: Option<u64>,
    pub expert_budget_bytes: Option<u64>,
    pub all_experts_bytes: u64,
    /// KV cache, logits and one prefill chunk's activations, set aside under a budget.
    pub margin_bytes: u64,
    /// `--kv-bits`, when given.
    pub kv_bits: Option<KvBits>,
    /// Bytes the KV cache takes per token (the layers whose cache grows with the context), at
    /// `kv_bits` where they quantize it (`ModelConfig::kv_bytes_per_token`).
    pub kv_bytes_per_token: u64,
    /// The layers whose keys and values are quantized (none without `kv_bits`).
    pub kv_quantized_layers: usize,
}

/// The expert cache's counters when the first token came out (the end of the prefill):
/// subtract them for the decode phase alone.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PhaseSnapshot {
    pub bytes_read: u64,
    pub experts_loaded: u64,
    pub misses: u64,
    pub hits: u64,
    pub read_decode_ms: f64,
    pub stall_ms: f64,
    /// Time the forward pass had waited for each layer's routing (see `StreamStats`).
    pub eval_wait_ms: f64,
}

/// One request's sampling and length.
#[derive(Clone, Debug)]
pub struct Request {
    pub max_tokens: usize,
    pub sampler: SamplerOptions,
    /// Log-probabilities of each token and of this many alternatives (at most
    /// [`MAX_TOP_LOGPROBS`]).
    pub logprobs: Option<usize>,
    /// Stop strings (text): the answer ends before the first one that appears.
    pub stop: Vec<String>,
}

/// Most alternatives a token's log-probabilities list.
pub const MAX_TOP_LOGPROBS: usize = 10;

/// What [`super::Engine::generate`] produced.
#[derive(Clone, Debug)]
pub struct EngineGeneration {
    pub generation: Generation,
    pub at_first_token: Option<PhaseSnapshot>,
    pub cpu_s: CpuSeconds,
}

/// Process CPU seconds (all threads) of a generation's prefill (up to the first token) and
/// decode: under load from other processes they measure each phase's work more steadily than
/// wall time. `None` when no token came out.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct CpuSeconds {
    pub prefill: Option<f64>,
    pub decode: Option<f64>,
}

/// Why a completion ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// End of sequence or a stop string.
    Stop,
    /// `max_tokens` or the model's context.
    Length,
    /// The callback asked to stop (a client went away, Ctrl-C).
    Cancelled,
}

/// One token's log-probabilities with token texts.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TokenText {
    pub token: String,
    /// The token's own bytes (`run::text::token_bytes`): for a token that is part of a UTF-8
    /// character, not the bytes of the U+FFFD its text alone shows.
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// The most likely alternatives: text, log-probability, own bytes.
    pub top: Vec<(String, f32, Vec<u8>)>,
}

/// A piece of a completion's text, with the log-probabilities of the tokens it completed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Piece {
    /// The answer's text (for a harmony model, its `final` channel).
    pub text: String,
    /// A harmony model's other channels (its reasoning); empty for other models.
    pub reasoning: String,
    pub logprobs: Vec<TokenText>,
}

/// A finished completion.
#[derive(Clone, Debug)]
pub struct Completion {
    /// The answer (for a harmony model, its `final` channel: what the next turn renders).
    pub text: String,
    /// A harmony model's reasoning (`analysis` and `commentary` channels); empty otherwise.
    pub reasoning: String,
    pub finish: Finish,
    /// The stop string of [`Request::stop`] that ended the text, when one did.
    pub stop_string: Option<String>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
    pub logprobs: Vec<TokenText>,
    pub stats: GenerateStats,
    /// The generated token ids, in order (the text is their decoding).
    pub tokens: Vec<u32>,
    pub at_first_token: Option<PhaseSnapshot>,
    pub cpu_s: CpuSeconds,
}
