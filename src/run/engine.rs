//! The generation engine that `run`, `chat` and `serve` share.
//!
//! In: an opened pack (config, dense weights), memory options, then prompts as token ids or as
//! conversations. Out: generated tokens streamed to a callback (with text pieces, stop strings
//! and log-probabilities in [`Engine::complete`]), and the counters `run` reports.
//! Invariant: the engine owns one KV cache with the ids it holds ([`Prefix`]); every request
//! starts from the longest prefix it shares with them and computes only the rest. One request
//! runs at a time (`&mut self`): callers queue.
//!
//! Sizing under `--mem-budget`: the dense weights stay resident; the KV cache (bf16, for the
//! longest sequence the caller plans for, [`EngineOptions::positions`]), the LM head's logits and
//! one prefill chunk's activations are set aside; the experts' slot pools get the rest.

use std::cell::Cell;
use std::rc::Rc;

use crate::arch::ModelConfig;
use crate::format::Pack;
use crate::memory::total_ram;
use crate::mlx::Array;
use crate::model::{ComputeError, ExpertStore, Model, PoolRoute, ResidentExperts, Routing};
use crate::progress::Progress;
use crate::run::budget::{self, Budget, BudgetError, Needs};
use crate::run::experts::{ExpertCache, ExpertError, PolicyKind, PoolSize, StoreOptions};
use crate::run::generate::{
    GenerateError, GenerateOptions, GenerateStats, Generation, Prefix, Token,
};
use crate::run::harmony::{Harmony, Split};
use crate::run::open::{OpenError, PackWeights};
use crate::run::read::IoMode;
use crate::run::sample::SamplerOptions;
use crate::run::stream::{StreamStats, StreamingExperts};
use crate::run::template::{ChatTemplate, Message, TemplateError};
use crate::run::text::{Scan, StopScan, TextStream};

pub use crate::run::budget::PREFILL_STEP;

/// Why an engine could not be built or a request could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("loading the model")]
    Model(#[source] ComputeError),
    #[error(transparent)]
    Budget(#[from] BudgetError),
    /// The expert cache has fewer slots than one token routes to; the message says which
    /// option sized it and the least that would do.
    #[error("{0}")]
    TooFewSlots(String),
    #[error("--skip-uncached {0}: give a routing weight between 0 and 1")]
    BadSkipThreshold(f32),
    #[error(transparent)]
    Experts(#[from] ExpertError),
    #[error(transparent)]
    Compute(#[from] ComputeError),
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("tokenizing the prompt: {0}")]
    Tokenize(String),
}

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

/// What [`Engine::generate`] produced.
#[derive(Clone, Debug)]
pub struct EngineGeneration {
    pub generation: Generation,
    pub at_first_token: Option<PhaseSnapshot>,
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
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
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
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
    pub logprobs: Vec<TokenText>,
    pub stats: GenerateStats,
}

/// An open pack ready to generate: model, expert cache, tokenizer, chat template, KV cache.
pub struct Engine<'p> {
    cfg: ModelConfig,
    model: Model,
    tokenizer: tokenizers::Tokenizer,
    experts: StreamingExperts<'p>,
    /// Every expert resident: the device-routed store (no host round trip per layer).
    resident: Option<ResidentExperts>,
    prefix: Prefix,
    prefill_chunk: usize,
    streaming: bool,
    host_sampling: bool,
    sizes: EngineSizes,
    template: ChatTemplate,
    /// Token ids that end generation (`Engine::stop_ids`).
    eos: Vec<u32>,
    /// The longest sequence this engine was sized for (`positions`, within the context).
    max_sequence: usize,
}

impl<'p> Engine<'p> {
    /// Builds the engine on an opened pack (`open::open`). A budget above the machine's memory
    /// is reported through `progress.warn`.
    pub fn new(
        pack: &'p Pack,
        cfg: &ModelConfig,
        weights: &PackWeights,
        opts: &EngineOptions,
        progress: &dyn Progress,
    ) -> Result<Engine<'p>, EngineError> {
        let tokenizer = crate::run::open::tokenizer(pack)?;
        let model = Model::load(cfg, weights).map_err(EngineError::Model)?;
        let ram = total_ram();
        if let Some(b) = &opts.mem_budget {
            warn_over_ram(progress, "--mem-budget", &b.text, b.size.resolve(ram), ram);
        }
        // The dense weights stay resident; the KV cache (bf16, up to the longest context this
        // engine plans for) and activations come out of the budget too.
        let positions = cfg
            .max_position_embeddings
            .unwrap_or(usize::MAX)
            .min(opts.positions) as u64;
        // A prefill chunk's activations, f32 upper bound: the residual stream, the k routed
        // rows in and out of the experts and their hidden width.
        let per_token = 4
            * (cfg.hidden_size * (2 * cfg.num_experts_per_tok + 8)
                + 3 * cfg.num_experts_per_tok * cfg.moe_intermediate_size.max(1))
                as u64;
        // Keys and values of every KV head, or MLA's latent and rotary key (ModelConfig), for
        // every position; a sliding-window layer's at most a window and one prefill chunk
        // (gpt-oss); plus the fixed-size state of linear-attention layers (Qwen3-Next, Qwen3.5).
        let kv = |chunk: u64| cfg.kv_values(positions, chunk) * 2 + cfg.recurrent_state_bytes();
        let all_experts = ExpertCache::all_resident_bytes(pack);
        let plan = budget::plan(
            opts.mem_budget.as_ref(),
            opts.expert_budget.as_ref(),
            &Needs {
                ram,
                dense: weights.bytes,
                all_experts,
                per_token,
                logits: (cfg.hidden_size * cfg.vocab_size * 4) as u64,
                kv: &kv,
            },
        )?;
        if let (None, Some(eb), Some(bytes)) = (&opts.mem_budget, &opts.expert_budget, plan.experts)
        {
            warn_over_ram(progress, "--expert-budget", &eb.text, bytes, ram);
        }
        let (budget, expert_budget, prefill_chunk, margin) =
            (plan.mem, plan.experts, plan.prefill_chunk, plan.margin);
        let store = StoreOptions {
            budget_bytes: expert_budget,
            io: opts.io,
            queue_depth: opts.queue_depth,
            policy: opts.policy,
            verify: opts.verify,
            naive: opts.no_cache,
        };
        let mut cache = ExpertCache::new(pack, &store)?;
        // Metal (macOS): keep the dense weights, the expert slots and the KV cache wired, as
        // mlx-lm does, so the OS never pages out what each token reads. Metal refuses more than
        // the device's recommended working set; the run then goes on unwired (a warning).
        #[cfg(target_os = "macos")]
        {
            let wired = weights.bytes + cache.stats().resident_bytes + margin;
            if let Err(e) = crate::mlx::set_wired_limit(wired as usize) {
                progress.warn(&format!(
                    "could not wire {:.1} GB for MLX ({e}); raise iogpu.wired_limit_mb or lower \
                     --mem-budget",
                    wired as f64 / 1e9
                ));
            }
        }
        if expert_budget.is_none() && !opts.no_cache {
            cache.warm_all(pack)?;
        }
        let streaming = expert_budget.is_some() || opts.no_cache;
        if let Some(t) = opts.skip_uncached {
            if !(0.0..=1.0).contains(&t) {
                return Err(EngineError::BadSkipThreshold(t));
            }
        }
        let experts = StreamingExperts::new(
            pack,
            cache,
            cfg.num_experts,
            opts.prefetch && !opts.no_cache && streaming,
        )
        .skip_uncached(opts.skip_uncached)
        .working_set(cfg.sparse_layers().len(), cfg.num_experts_per_tok);
        if experts.min_slots() < cfg.num_experts_per_tok {
            let cause = match (&opts.mem_budget, &opts.expert_budget) {
                (Some(b), _) => BudgetCause::Mem {
                    text: b.text.clone(),
                    dense_and_margin: weights.bytes + margin,
                },
                (None, Some(b)) => BudgetCause::Expert {
                    text: b.text.clone(),
                },
                (None, None) => BudgetCause::None,
            };
            return Err(EngineError::TooFewSlots(too_few_slots(
                &cause,
                expert_budget,
                &experts.cache().pool_sizes(),
                cfg.num_experts_per_tok,
                (pack.hidden_size(), pack.intermediate_size()),
            )));
        }
        let resident = if streaming || opts.sync_baseline {
            None
        } else {
            crate::run::stream::resident_store(
                experts.cache(),
                &cfg.sparse_layers(),
                cfg.num_experts,
            )?
        };
        let template = ChatTemplate::of_pack_or_plain(pack);
        let eos = stop_ids(pack, cfg, &tokenizer, template.is_harmony());
        Ok(Engine {
            cfg: cfg.clone(),
            model,
            tokenizer,
            experts,
            resident,
            prefix: Prefix::default(),
            prefill_chunk,
            streaming,
            host_sampling: opts.sync_baseline,
            sizes: EngineSizes {
                dense_bytes: weights.bytes,
                budget_bytes: budget,
                expert_budget_bytes: expert_budget,
                all_experts_bytes: all_experts,
                margin_bytes: margin,
            },
            template,
            eos,
            max_sequence: positions as usize,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// The pack's chat template, or the plain transcript for a pack without one.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Whether the answer to `prompt` comes in harmony channels: the template writes harmony
    /// and the prompt ends with its generation prompt (`<|start|>assistant`), as a rendered
    /// conversation does; a raw text prompt gets the text as generated.
    pub fn answers_in_channels(&self, prompt: &[u32]) -> bool {
        self.harmony()
            && self
                .encode("<|start|>assistant")
                .is_ok_and(|tail| !tail.is_empty() && prompt.ends_with(&tail))
    }

    /// The token ids that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Whether the answer comes in harmony channels (the template writes harmony): then
    /// [`Engine::complete`]'s text is the `final` channel and the rest is its reasoning.
    pub fn harmony(&self) -> bool {
        self.template.is_harmony()
    }

    /// Whether experts stream through a budgeted cache (else all are resident).
    pub fn streaming(&self) -> bool {
        self.streaming
    }

    pub fn sizes(&self) -> EngineSizes {
        self.sizes
    }

    pub fn cache_stats(&self) -> crate::run::experts::StoreStats {
        self.experts.cache_stats()
    }

    pub fn stream_stats(&self) -> &StreamStats {
        &self.experts.stats
    }

    /// The model's context length (`usize::MAX` when the config does not say).
    pub fn context(&self) -> usize {
        self.cfg.max_position_embeddings.unwrap_or(usize::MAX)
    }

    /// The longest sequence (prompt and answer) the engine was sized for: the model's context,
    /// or less where [`EngineOptions::positions`] asked for less. Under a budget a longer one
    /// would take more memory than was set aside for its KV cache; callers keep within it.
    pub fn max_sequence(&self) -> usize {
        self.max_sequence
    }

    /// The ids whose keys and values the KV cache holds.
    pub fn cached_ids(&self) -> &[u32] {
        self.prefix.ids()
    }

    /// How many positions of `prompt` the KV cache can give (what [`Engine::generate`] will
    /// not compute): the shared prefix, short of the prompt's last token, or for a cache that
    /// cannot be cut back there, its checkpoint at the end of the last prompt.
    pub fn shared_prefix(&self, prompt: &[u32]) -> usize {
        self.prefix.reusable(prompt)
    }

    /// Empties the KV cache (the next request computes its whole prompt).
    pub fn reset(&mut self) {
        self.prefix.clear();
    }

    /// Token ids of `text`, as the prompt is tokenized (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| EngineError::Tokenize(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// Token ids of a conversation rendered through the chat template.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, EngineError> {
        self.encode(&self.template.render(messages)?)
    }

    /// Generates from `prompt`, reusing the KV cache's shared prefix; `on_token` gets each
    /// token and returns `false` to stop. Ignores `req.stop` (text is [`Engine::complete`]'s).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        req: &Request,
        progress: &dyn Progress,
        mut on_token: impl FnMut(&Token) -> bool,
    ) -> Result<EngineGeneration, EngineError> {
        let opts = GenerateOptions {
            max_tokens: req.max_tokens,
            sampler: req.sampler,
            // One chunk must not route to more distinct experts than the smallest pool holds.
            // Under a budget a chunk may route to more experts than fit: the store then loads
            // and runs them group by group, each expert read at most once per chunk.
            prefill_chunk: self.prefill_chunk,
            eos: self.eos.clone(),
            host_sampling: self.host_sampling,
        };
        let logprobs = req.logprobs.map(|n| n.min(MAX_TOP_LOGPROBS));
        let first_token = Rc::new(Cell::new(false));
        let mut phases = PhaseMarker {
            inner: &mut self.experts,
            first_token: first_token.clone(),
            at_first_token: None,
        };
        let store: &mut dyn ExpertStore = match self.resident.as_mut() {
            Some(r) => r,
            None => &mut phases,
        };
        let generation = crate::run::generate::generate_with_prefix(
            &self.model,
            store,
            &mut self.prefix,
            prompt,
            &opts,
            logprobs,
            progress,
            |t| {
                first_token.set(true);
                on_token(t)
            },
        )?;
        Ok(EngineGeneration {
            generation,
            at_first_token: phases.at_first_token.take(),
        })
    }

    /// Generates text: pieces go to `on_piece` as they become final (never inside a UTF-8
    /// character or a possible stop string), which returns `false` to stop. The text ends at
    /// the end-of-sequence token, the first stop string (not included), or `max_tokens`.
    pub fn complete(
        &mut self,
        prompt: &[u32],
        req: &Request,
        mut on_piece: impl FnMut(&Piece) -> bool,
    ) -> Result<Completion, EngineError> {
        let tokenizer = self.tokenizer.clone();
        let mut stream = TextStream::new(&tokenizer);
        let mut scan = StopScan::new(&req.stop);
        // Harmony: stop strings apply to the answer; the reasoning passes through.
        let mut harmony = self.answers_in_channels(prompt).then(Harmony::new);
        let mut split = |new: &str| match harmony.as_mut() {
            Some(h) => h.push(new),
            None => Split {
                answer: new.to_string(),
                reasoning: String::new(),
            },
        };
        let mut reasoning = String::new();
        let mut text = String::new();
        let mut all_logprobs = Vec::new();
        let mut pending: Vec<TokenText> = Vec::new();
        let mut hit_stop = false;
        let mut cancelled = false;
        let token_text = |id: u32| tokenizer.decode(&[id], false).unwrap_or_default();
        let g = self.generate(prompt, req, &crate::progress::Silent, |t| {
            if let Some(lp) = &t.logprobs {
                pending.push(TokenText {
                    token: token_text(t.id),
                    logprob: lp.logprob,
                    top: lp.top.iter().map(|&(i, p)| (token_text(i), p)).collect(),
                });
            }
            let Some(new) = stream.push(t.id) else {
                return true;
            };
            let new = split(&new);
            let (out, stop) = match scan.push(&new.answer) {
                Scan::Send(s) => (s, false),
                Scan::Stop(s) => (s, true),
            };
            if out.is_empty() && new.reasoning.is_empty() && !stop {
                return true;
            }
            let piece = Piece {
                text: out,
                reasoning: new.reasoning,
                logprobs: std::mem::take(&mut pending),
            };
            text.push_str(&piece.text);
            reasoning.push_str(&piece.reasoning);
            all_logprobs.extend(piece.logprobs.iter().cloned());
            if stop {
                hit_stop = true;
                if !piece.text.is_empty() || !piece.logprobs.is_empty() {
                    on_piece(&piece);
                }
                return false;
            }
            if !on_piece(&piece) {
                cancelled = true;
                return false;
            }
            true
        })?;
        if !hit_stop && !cancelled {
            let mut tail = String::new();
            let mut rest = split(&stream.finish().unwrap_or_default());
            if let Some(h) = harmony.as_mut() {
                let last = h.finish();
                rest.answer.push_str(&last.answer);
                rest.reasoning.push_str(&last.reasoning);
            }
            match scan.push(&rest.answer) {
                Scan::Send(s) => tail.push_str(&s),
                Scan::Stop(s) => {
                    tail.push_str(&s);
                    hit_stop = true;
                }
            }
            if !hit_stop {
                tail.push_str(&scan.finish());
            }
            if !tail.is_empty() || !rest.reasoning.is_empty() || !pending.is_empty() {
                let piece = Piece {
                    text: tail,
                    reasoning: rest.reasoning,
                    logprobs: std::mem::take(&mut pending),
                };
                text.push_str(&piece.text);
                reasoning.push_str(&piece.reasoning);
                all_logprobs.extend(piece.logprobs.iter().cloned());
                on_piece(&piece);
            }
        }
        let g = g.generation;
        let finish = if hit_stop {
            Finish::Stop
        } else if cancelled {
            Finish::Cancelled
        } else {
            match g.stats.stop_reason.as_str() {
                "eos" => Finish::Stop,
                "stopped" => Finish::Cancelled,
                _ => Finish::Length,
            }
        };
        Ok(Completion {
            text,
            reasoning,
            finish,
            prompt_tokens: prompt.len(),
            completion_tokens: g.tokens.len(),
            cached_tokens: g.cached_tokens,
            logprobs: all_logprobs,
            stats: g.stats,
        })
    }
}

/// The ids that end generation: the config's `eos_token_id`, the pack's generation_config's
/// (gpt-oss adds `<|call|>` and `<|endoftext|>` there to `<|return|>`), and for a harmony
/// template the tokens that end an assistant's turn (`<|return|>`, `<|call|>`), which a pack
/// converted from an older generation_config may lack. Sorted, without repeats.
pub fn stop_ids(
    pack: &Pack,
    cfg: &ModelConfig,
    tokenizer: &tokenizers::Tokenizer,
    harmony: bool,
) -> Vec<u32> {
    let turn_ends: Vec<u32> = if harmony {
        ["<|return|>", "<|call|>"]
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect()
    } else {
        Vec::new()
    };
    gather_stop_ids(
        &cfg.eos_token_ids,
        pack.metadata().get("generation_config"),
        &turn_ends,
    )
}

/// [`stop_ids`] from its sources: the config's ids, a generation_config (its `eos_token_id`, a
/// number or a list), and more ids.
fn gather_stop_ids(
    config: &[u32],
    generation: Option<&serde_json::Value>,
    more: &[u32],
) -> Vec<u32> {
    let mut ids = config.to_vec();
    if let Some(v) = generation.and_then(|g| g.get("eos_token_id")) {
        let one = |v: &serde_json::Value| v.as_u64().and_then(|x| u32::try_from(x).ok());
        match v.as_array() {
            Some(a) => ids.extend(a.iter().filter_map(one)),
            None => ids.extend(one(v)),
        }
    }
    ids.extend_from_slice(more);
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Says so when a budget is more than the machine's memory: it cannot be honoured, and is most
/// likely a typo (`1TB` for `1GB`).
fn warn_over_ram(progress: &dyn Progress, option: &str, text: &str, bytes: u64, ram: u64) {
    if ram > 0 && bytes > ram {
        progress.warn(&format!(
            "{option} {text} ({}) is more than this machine's memory ({}); the budget cannot hold, and the system may swap",
            fmt_bytes(bytes),
            fmt_bytes(ram)
        ));
    }
}

/// Bytes for people: MB below a GB, else GB (decimal, as the other reports print them).
pub fn fmt_bytes(b: u64) -> String {
    if b >= 1_000_000_000 {
        format!("{:.2} GB", b as f64 / 1e9)
    } else {
        format!("{:.1} MB", b as f64 / 1e6)
    }
}

/// Where the expert cache's size came from, for the message when it holds too few experts.
enum BudgetCause {
    /// `--mem-budget TEXT`, of which the dense weights, KV cache and activations took this much.
    Mem { text: String, dense_and_margin: u64 },
    /// `--expert-budget TEXT`.
    Expert { text: String },
    /// No budget: every stored expert has a slot.
    None,
}

/// The message when the smallest slot pool holds fewer experts than one token routes to: it
/// names the option that sized the cache (or, without one, the pack's own numbers), the size of
/// one expert and where it comes from, top-k, and the least budget that would do.
fn too_few_slots(
    cause: &BudgetCause,
    expert_budget: Option<u64>,
    pools: &[PoolSize],
    top_k: usize,
    (hidden, inter): (u32, u32),
) -> String {
    let Some(p) = pools.iter().min_by_key(|p| p.slots) else {
        return format!(
            "the pack stores no experts, but the model config routes each token to {top_k} (num_experts_per_tok); the pack is damaged or was written by a broken tool: re-convert it"
        );
    };
    // A pool gets the budget's share of its bytes (ExpertCache::new), so `top_k` slots in every
    // pool need this many bytes in all.
    let total: u64 = pools.iter().map(|q| q.stored as u64 * q.slot_bytes).sum();
    let need = pools
        .iter()
        .map(|q| (top_k as u64 * total).div_ceil(q.stored.max(1) as u64))
        .max()
        .unwrap_or(0);
    let room = format!(
        "room for {} of its {}-bit experts ({} each: hidden {hidden} x expert width {inter}, from the pack's expert directory), fewer than the {top_k} one token uses (num_experts_per_tok in the model config)",
        p.slots,
        p.bits,
        fmt_bytes(p.slot_bytes)
    );
    let eb = fmt_bytes(expert_budget.unwrap_or(0));
    match cause {
        BudgetCause::Expert { text } => format!(
            "--expert-budget {text} gives the expert cache {eb}: {room}; raise --expert-budget to at least {}",
            fmt_bytes(need)
        ),
        BudgetCause::Mem {
            text,
            dense_and_margin,
        } => format!(
            "--mem-budget {text} leaves {eb} for experts after {} of dense weights, KV cache and activations: {room}; raise --mem-budget to at least {}",
            fmt_bytes(*dense_and_margin),
            fmt_bytes(dense_and_margin + need)
        ),
        BudgetCause::None => format!(
            "the model config routes each token to {top_k} experts (num_experts_per_tok), but the pack stores only {} {}-bit experts; its config and expert directory disagree: re-convert it",
            p.stored, p.bits
        ),
    }
}

/// Passes routing through, and snapshots the read counters at the first forward call after the
/// first token (the end of the prefill), so the decode phase can be reported on its own.
struct PhaseMarker<'a, 'p> {
    inner: &'a mut StreamingExperts<'p>,
    first_token: Rc<Cell<bool>>,
    at_first_token: Option<PhaseSnapshot>,
}

impl ExpertStore for PhaseMarker<'_, '_> {
    fn route(&mut self, layer: usize, indices: &Array) -> Result<Vec<PoolRoute<'_>>, ComputeError> {
        self.mark();
        self.inner.route(layer, indices)
    }

    fn route_scored(
        &mut self,
        layer: usize,
        routing: &Routing,
    ) -> Result<(Vec<PoolRoute<'_>>, Option<Array>), ComputeError> {
        self.mark();
        self.inner.route_scored(layer, routing)
    }

    fn mix(
        &mut self,
        layer: usize,
        x: &Array,
        routing: &Routing,
    ) -> Result<Option<Array>, ComputeError> {
        self.mark();
        self.inner.mix(layer, x, routing)
    }

    fn wants_prediction(&self) -> bool {
        self.inner.wants_prediction()
    }

    fn predict(&mut self, layer: usize, guess: &Routing) -> Result<(), ComputeError> {
        self.inner.predict(layer, guess)
    }

    fn eager(&self) -> bool {
        ExpertStore::eager(&*self.inner)
    }
}

impl PhaseMarker<'_, '_> {
    fn mark(&mut self) {
        if self.at_first_token.is_none() && self.first_token.get() {
            let c = self.inner.cache_stats();
            self.at_first_token = Some(PhaseSnapshot {
                bytes_read: c.bytes_read,
                experts_loaded: c.experts_loaded,
                misses: c.misses_per_layer.values().sum::<u64>(),
                hits: c.hits_per_layer.values().sum::<u64>(),
                read_decode_ms: c.read_decode_ms,
                stall_ms: self.inner.stats.stall_ms,
                eval_wait_ms: self.inner.stats.eval_wait_ms,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    /// gpt-oss: config.json names `<|return|>`, its generation_config adds `<|call|>` and
    /// `<|endoftext|>`; an older generation_config without `<|call|>` still stops there under a
    /// harmony template; a single id is a number.
    #[test]
    fn stop_ids_gather_config_generation_config_and_turn_ends() {
        let g = serde_json::json!({"eos_token_id": [200002, 199999, 200012]});
        assert_eq!(
            super::gather_stop_ids(&[200002], Some(&g), &[]),
            [199999, 200002, 200012]
        );
        let old = serde_json::json!({"eos_token_id": [200002, 199999]});
        assert_eq!(
            super::gather_stop_ids(&[200002], Some(&old), &[200002, 200012]),
            [199999, 200002, 200012]
        );
        let one = serde_json::json!({"eos_token_id": 7});
        assert_eq!(super::gather_stop_ids(&[2], Some(&one), &[]), [2, 7]);
        assert_eq!(super::gather_stop_ids(&[2], None, &[]), [2]);
    }

    use super::*;

    const POOL: PoolSize = PoolSize {
        bits: crate::format::ProjBits::uniform(4),
        slots: 3,
        stored: 192,
        slot_bytes: 50_000,
    };

    #[test]
    fn too_few_slots_names_the_option_that_sized_the_cache() {
        let msg = too_few_slots(
            &BudgetCause::Expert { text: "1MB".into() },
            Some(150_000),
            &[POOL],
            8,
            (256, 128),
        );
        assert!(msg.starts_with("--expert-budget 1MB gives"), "{msg}");
        assert!(!msg.contains("--mem-budget"), "{msg}");
        assert!(
            msg.contains(
                "room for 3 of its 4-bit experts (0.1 MB each: hidden 256 x expert width 128"
            ),
            "{msg}"
        );
        assert!(msg.contains("fewer than the 8 one token uses"), "{msg}");
        // 8 slots of 192 experts' share: 8 * 192 * 50 kB / 192.
        assert!(
            msg.ends_with("raise --expert-budget to at least 0.4 MB"),
            "{msg}"
        );

        let msg = too_few_slots(
            &BudgetCause::Mem {
                text: "40MB".into(),
                dense_and_margin: 39_850_000,
            },
            Some(150_000),
            &[POOL],
            8,
            (256, 128),
        );
        assert!(
            msg.starts_with("--mem-budget 40MB leaves 0.1 MB for experts after 39.9 MB"),
            "{msg}"
        );
        assert!(
            msg.ends_with("raise --mem-budget to at least 40.2 MB"),
            "{msg}"
        );

        // No budget: every stored expert has a slot, so only a config whose top-k exceeds the
        // stored experts gets here, and the message says so instead of blaming a budget.
        let all = PoolSize {
            slots: 4,
            stored: 4,
            ..POOL
        };
        let msg = too_few_slots(&BudgetCause::None, None, &[all], 8, (256, 128));
        assert!(!msg.contains("budget"), "{msg}");
        assert!(
            msg.contains("routes each token to 8 experts") && msg.contains("stores only 4"),
            "{msg}"
        );
    }
}
