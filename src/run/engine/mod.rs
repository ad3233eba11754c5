//! The generation engine that `run`, `chat` and `serve` share.
//!
//! In: an opened pack (config, dense weights), memory options, then prompts as token ids or as
//! conversations. Out: generated tokens streamed to a callback (with text pieces, stop strings
//! and log-probabilities in [`Engine::complete`]), and the report `run` prints
//! ([`Engine::report`]).
//! Invariant: the engine owns one KV cache with the ids it holds ([`Prefix`]); every request
//! starts from the longest prefix it shares with them and computes only the rest. One request
//! runs at a time (`&mut self`): callers queue.
//!
//! Sizing under `--mem-budget`: the dense weights stay resident; the KV cache (bf16, or the
//! codes of `--kv-bits` where it quantizes, for the longest sequence the caller plans for,
//! [`EngineOptions::positions`]), the LM head's logits and
//! one prefill chunk's activations are set aside; the experts' slot pools get the rest
//! (`budget::plan`).
//!
//! Files: this one builds the engine and generates token ids; `complete.rs` turns them into text
//! (stop strings, harmony channels, log-probabilities with token texts); `report.rs` a
//! completion and the engine's counters as one typed report, and the batched-step benchmark;
//! `request.rs` holds the options, requests and reports; `stop.rs` the end-of-sequence ids;
//! `slots.rs` the message for a cache too small for one token; `pressure.rs` the resize of the
//! expert cache under memory pressure ([`Engine::watch_pressure`], `run::pressure`).

mod complete;
mod lanes;
mod pressure;
mod report;
mod request;
mod slots;
mod stop;

pub use lanes::EngineLane;
pub use report::{Derived, RunReport};
pub use request::{
    Completion, CpuSeconds, EngineGeneration, EngineOptions, EngineSizes, Finish, PhaseSnapshot,
    Piece, Request, TokenText, MAX_TOP_LOGPROBS,
};
pub use stop::stop_ids;

use std::cell::Cell;
use std::rc::Rc;

use crate::arch::ModelConfig;
use crate::format::Pack;
use crate::memory::{process_cpu_s, total_ram};
use crate::mlx::Array;
use crate::model::{ComputeError, ExpertStore, Model, PoolRoute, ResidentExperts, Routing};
use crate::progress::Progress;
use crate::run::budget::{self, BudgetError, Needs};
use crate::run::experts::{ExpertCache, ExpertError, PolicyKind, StoreOptions};
use crate::run::generate::{GenerateError, GenerateStats, Generation, Prefix, Token};
use crate::run::open::{OpenError, PackWeights};
use crate::run::pressure::{PressureStatus, PressureWatch};
use crate::run::prompt_cache::PromptCache;
use crate::run::read::IoMode;
use crate::run::stream::{StreamStats, StreamingExperts};
use crate::run::template::{ChatTemplate, Message, TemplateError};
use crate::units::{self, Style};
use slots::{too_few_slots, BudgetCause};

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
    /// The prompt has more tokens than the engine takes (counted in pieces for a long text, so
    /// `at_least` may be short of the whole count).
    #[error(
        "the prompt has at least {at_least} tokens, and at most {limit} fit (the model's \
         context, or what the memory budget sized): shorten the prompt"
    )]
    PromptTooLong { at_least: usize, limit: usize },
}

/// Bytes of text tokenized at a time when a long prompt is counted.
pub const COUNT_PIECE: usize = 64 << 10;

/// `text` in pieces of at most about `size` bytes, each cut after a newline or a space near its
/// end where there is one (tokenizers split words there anyway), else at a character boundary.
fn pieces_of(text: &str, size: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = rest.len().min(size);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        if end < rest.len() {
            let window = &rest.as_bytes()[end.saturating_sub(1024)..end];
            let cut = window
                .iter()
                .rposition(|&b| b == b'\n')
                .or_else(|| window.iter().rposition(|&b| b == b' '));
            if let Some(i) = cut {
                end = end.saturating_sub(1024) + i + 1;
            }
        }
        let mut end = end.max(1);
        while !rest.is_char_boundary(end) {
            end += 1;
        }
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

/// One stage of a pipeline: the layers an engine holds and the stages after them
/// ([`Engine::new_stage`]).
#[derive(Clone, Debug)]
pub struct Stage {
    pub layers: std::ops::Range<usize>,
    /// `None` on the last stage.
    pub downstream: Option<std::sync::Arc<dyn crate::model::Downstream>>,
}

/// An open pack ready to generate: model, expert cache, tokenizer, chat template, KV cache.
pub struct Engine<'p> {
    cfg: ModelConfig,
    model: Model,
    tokenizer: std::sync::Arc<tokenizers::Tokenizer>,
    experts: StreamingExperts<'p>,
    /// Every expert resident: the device-routed store (no host round trip per layer).
    resident: Option<ResidentExperts>,
    prefix: Prefix,
    /// The KV caches of other conversations (`EngineOptions::prompt_cache_bytes`).
    prompts: PromptCache,
    prefill_chunk: usize,
    streaming: bool,
    host_sampling: bool,
    sizes: EngineSizes,
    template: ChatTemplate,
    /// Token ids that end generation (`Engine::stop_ids`).
    eos: Vec<u32>,
    /// The longest sequence this engine was sized for (`positions`, within the context).
    max_sequence: usize,
    /// How experts come off the disk and leave the cache, for the report.
    io: IoMode,
    policy: PolicyKind,
    /// The memory-pressure watch, when one is set ([`Engine::watch_pressure`]).
    pressure: Option<PressureWatch>,
    /// What a resize under pressure needs to know of the stores.
    layout: pressure::Layout,
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
        Engine::new_stage(pack, cfg, weights, opts, progress, None)
    }

    /// [`Engine::new`] for one stage of a pipeline (`run::pipeline`): the model's layers
    /// `stage.layers` alone, with the experts of those layers alone in its cache (sized from
    /// this process's budget), and `stage.downstream` for the layers after them. `weights`
    /// need hold only the stage's tensors (`pipeline::stage_tensors`).
    pub fn new_stage(
        pack: &'p Pack,
        cfg: &ModelConfig,
        weights: &PackWeights,
        opts: &EngineOptions,
        progress: &dyn Progress,
        stage: Option<Stage>,
    ) -> Result<Engine<'p>, EngineError> {
        let tokenizer = crate::run::open::tokenizer(pack)?;
        let layers = stage
            .as_ref()
            .map_or(0..cfg.num_hidden_layers, |s| s.layers.clone());
        let expert_layers = stage
            .as_ref()
            .map(|s| s.layers.start as u32..s.layers.end as u32);
        let sparse: Vec<usize> = cfg
            .sparse_layers()
            .into_iter()
            .filter(|l| layers.contains(l))
            .collect();
        let mut model = Model::load_range(cfg, weights, layers).map_err(EngineError::Model)?;
        if let Some(d) = stage.and_then(|s| s.downstream) {
            model.set_downstream(d);
        }
        model.set_kv_bits(opts.kv_bits);
        let kv_quantized_layers = match opts.kv_bits {
            Some(_) => cfg.kv_quantized_layers().len(),
            None => 0,
        };
        if let (Some(bits), 0) = (opts.kv_bits, kv_quantized_layers) {
            let kept: Vec<_> = cfg.kv_kept().iter().map(|k| k.describe()).collect();
            progress.warn(&format!(
                "--kv-bits {bits} quantizes no layer of {}: each keeps its {} as it is",
                cfg.arch,
                kept.join(" and ")
            ));
        }
        let ram = total_ram();
        if let Some(b) = &opts.mem_budget {
            warn_over_ram(progress, "--mem-budget", &b.text, b.size.resolve(ram), ram);
        }
        // The dense weights stay resident; the KV cache (up to the longest context this engine
        // plans for) and activations come out of the budget too (`budget`'s sizes, which
        // `flashpack plan` predicts with).
        let positions = budget::planned_positions(cfg, opts.positions);
        let per_token = budget::activation_bytes_per_token(cfg);
        // Each sequence decoded beside the first has a KV cache of its own (one position a
        // step: no chunk's working space), set aside as the prompt cache is.
        let lanes = (opts.sequences.max(1) as u64 - 1)
            * (cfg.kv_bytes(positions, 1, opts.kv_bits) + cfg.recurrent_state_bytes());
        let kv = |chunk: u64| {
            budget::kv_bytes_for_chunk(
                cfg,
                positions,
                opts.kv_bits,
                opts.prompt_cache_bytes + lanes,
                chunk,
            )
        };
        let all_experts = ExpertCache::resident_bytes_of(pack, expert_layers.clone());
        let plan = budget::plan(
            opts.mem_budget.as_ref(),
            opts.expert_budget.as_ref(),
            &Needs {
                ram,
                dense: weights.bytes,
                all_experts,
                per_token,
                logits: budget::logits_bytes(cfg),
                kv: &kv,
            },
        )?;
        if let (None, Some(eb), Some(bytes)) = (&opts.mem_budget, &opts.expert_budget, plan.experts)
        {
            warn_over_ram(progress, "--expert-budget", &eb.text, bytes, ram);
        }
        let (budget, expert_budget, mut prefill_chunk, margin) =
            (plan.mem, plan.experts, plan.prefill_chunk, plan.margin);
        // FLASHPACK_PREFILL_CHUNK: smaller prefill chunks (tests show several chunks on short
        // prompts); never larger than the plan's, which sized the memory for it.
        if let Some(c) = crate::env::number::<usize>("FLASHPACK_PREFILL_CHUNK") {
            prefill_chunk = c.clamp(1, prefill_chunk);
        }
        let store = StoreOptions {
            budget_bytes: expert_budget,
            io: opts.io,
            queue_depth: opts.queue_depth,
            policy: opts.policy,
            verify: opts.verify,
            naive: opts.no_cache,
            // FLASHPACK_MAX_POOL_ELEMENTS: smaller pools, to show the split on small models.
            max_pool_elements: crate::env::number("FLASHPACK_MAX_POOL_ELEMENTS")
                .unwrap_or(crate::run::experts::MAX_POOL_ELEMENTS),
        };
        let mut cache = ExpertCache::of_layers(pack, &store, expert_layers)?;
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
        .working_set(sparse.len(), cfg.num_experts_per_tok);
        let k = cfg.num_experts_per_tok;
        let pools = experts.cache().pool_sizes();
        // A pool needs room for one token's experts, or for all it holds (a layer cut in pieces).
        let stored: usize = pools.iter().map(|p| p.stored as usize).sum();
        // A pipeline stage of dense layers alone holds no experts, and needs none.
        if (!sparse.is_empty() && stored < k)
            || pools
                .iter()
                .any(|p| (p.slots as usize) < k.min(p.stored as usize))
        {
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
                &pools,
                k,
                (pack.hidden_size(), pack.intermediate_size()),
            )));
        }
        let resident = if streaming || opts.sync_baseline {
            None
        } else {
            crate::run::stream::resident_store(experts.cache(), &sparse, cfg.num_experts)?
        };
        let layout = pressure::Layout {
            all_resident: resident.is_some(),
            prefetch: opts.prefetch && !opts.no_cache,
            sparse_layers: cfg.sparse_layers(),
            num_experts: cfg.num_experts,
        };
        let template = ChatTemplate::of_pack_or_plain(pack);
        let eos = stop_ids(pack, cfg, &tokenizer, template.is_harmony());
        Ok(Engine {
            cfg: cfg.clone(),
            model,
            tokenizer: std::sync::Arc::new(tokenizer),
            experts,
            resident,
            prefix: Prefix::default(),
            prompts: PromptCache::new(opts.prompt_cache_bytes),
            prefill_chunk,
            streaming,
            host_sampling: opts.sync_baseline,
            sizes: EngineSizes {
                dense_bytes: weights.bytes,
                budget_bytes: budget,
                expert_budget_bytes: expert_budget,
                all_experts_bytes: all_experts,
                margin_bytes: margin,
                kv_bits: opts.kv_bits,
                kv_bytes_per_token: cfg.kv_bytes_per_token(opts.kv_bits),
                kv_quantized_layers,
            },
            template,
            eos,
            max_sequence: positions as usize,
            io: opts.io,
            policy: opts.policy,
            pressure: None,
            layout,
        })
    }

    /// Watches the system's memory with `watch` (`None`: no watch, the default): between
    /// forward passes the engine polls it, and resizes the expert cache to its verdict, within
    /// the budget it was built with and one token's experts of one layer (`run::pressure`).
    /// `run`, `chat` and `serve` set [`PressureWatch::from_env`].
    pub fn watch_pressure(&mut self, watch: Option<PressureWatch>) {
        if let Some(w) = &watch {
            w.set_bounds(self.experts.bounds());
        }
        self.pressure = watch;
    }

    /// What the memory-pressure watch has seen and done, when there is one.
    pub fn pressure_status(&self) -> Option<PressureStatus> {
        self.pressure.as_ref().map(PressureWatch::status)
    }

    /// The watch's status as it updates it, for another thread (`serve`'s `/health`).
    pub fn pressure_handle(&self) -> Option<std::sync::Arc<std::sync::Mutex<PressureStatus>>> {
        self.pressure.as_ref().map(PressureWatch::status_handle)
    }

    /// Polls the memory-pressure watch now and resizes the expert cache to its verdict (an idle
    /// server, between requests; during a generation the engine polls once per forward pass).
    pub fn relieve_pressure(&mut self, progress: &dyn Progress) -> Result<(), EngineError> {
        let Some(watch) = self.pressure.as_mut() else {
            return Ok(());
        };
        pressure::relieve(
            watch,
            pressure::Stores {
                experts: &mut self.experts,
                resident: &mut self.resident,
                streaming: &mut self.streaming,
            },
            &self.layout,
            progress,
        )?;
        Ok(())
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The model this engine runs (a pipeline stage's layers alone, `Model::range`).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Runs `f` on the model and its expert store: a pipeline stage after the first computes
    /// its layers this way, on a KV cache of its own (`run::pipeline::serve_stage`).
    pub fn with_parts<T>(&mut self, f: impl FnOnce(&Model, &mut dyn ExpertStore) -> T) -> T {
        let store: &mut dyn ExpertStore = match self.resident.as_mut() {
            Some(r) => r,
            None => &mut self.experts,
        };
        f(&self.model, store)
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

    /// How the memory was divided (the KV cache's bytes per token under `--kv-bits` too).
    pub fn sizes(&self) -> EngineSizes {
        self.sizes
    }

    /// The ids whose keys and values the KV cache holds.
    pub fn cached_ids(&self) -> &[u32] {
        self.prefix.ids()
    }

    /// How many positions of `prompt` the KV cache can give (what [`Engine::generate`] will
    /// not compute): the shared prefix, short of the prompt's last token, or for a cache that
    /// cannot be cut back there, its checkpoint at the end of the last prompt.
    pub fn shared_prefix(&self, prompt: &[u32]) -> usize {
        self.prompts.reusable(&self.prefix, prompt)
    }

    /// Empties the KV cache and the other conversations' (the next request computes its whole
    /// prompt).
    pub fn reset(&mut self) {
        self.prefix.clear();
        self.prompts.clear();
    }

    /// How many other conversations' KV caches are kept, and their bytes.
    pub fn kept_prompts(&self) -> (usize, u64) {
        (self.prompts.len(), self.prompts.bytes())
    }

    /// Token ids of `text`, as the prompt is tokenized (no special tokens added), or
    /// [`EngineError::PromptTooLong`] when it has more than [`Engine::max_sequence`] tokens.
    ///
    /// A tokenizer takes about a hundred bytes of memory per byte of text, so a long text is
    /// first counted in pieces of [`COUNT_PIECE`] bytes, and refused as soon as the count is
    /// past the limit (issue 33, item 8): an 87 MB prompt file costs one piece's memory and a
    /// moment, not gigabytes and minutes. Only a text that may fit is tokenized whole.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.encode_within(text, self.max_sequence())
    }

    /// [`Engine::encode`] with the limit `limit` tokens (a server's own, for example).
    pub fn encode_within(&self, text: &str, limit: usize) -> Result<Vec<u32>, EngineError> {
        let tokens = |t: &str| {
            self.tokenizer
                .encode(t, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| EngineError::Tokenize(e.to_string()))
        };
        if text.len() > COUNT_PIECE && limit < usize::MAX / 2 {
            let (mut counted, mut pieces) = (0usize, 0usize);
            for piece in pieces_of(text, COUNT_PIECE) {
                counted += tokens(piece)?.len();
                pieces += 1;
                // A cut may split what whole text makes one token: allow 2 per cut.
                let at_least = counted.saturating_sub(2 * pieces);
                if at_least > limit {
                    return Err(EngineError::PromptTooLong { at_least, limit });
                }
            }
        }
        let ids = tokens(text)?;
        if ids.len() > limit {
            return Err(EngineError::PromptTooLong {
                at_least: ids.len(),
                limit,
            });
        }
        Ok(ids)
    }

    /// Token ids of a conversation rendered through the chat template.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, EngineError> {
        self.encode_chat_within(messages, self.max_sequence())
    }

    /// [`Engine::encode_chat`] with the limit `limit` tokens ([`Engine::encode_within`]).
    pub fn encode_chat_within(
        &self,
        messages: &[Message],
        limit: usize,
    ) -> Result<Vec<u32>, EngineError> {
        self.encode_within(&self.template.render(messages)?, limit)
    }

    /// [`Engine::encode_chat_within`] with tools and the reasoning switch passed to the template.
    pub fn encode_chat_with(
        &self,
        messages: &[Message],
        opts: &crate::run::template::RenderOptions,
        limit: usize,
    ) -> Result<Vec<u32>, EngineError> {
        self.encode_within(&self.template.render_with(messages, opts)?, limit)
    }

    /// Generates from `prompt`, reusing the KV cache's shared prefix; `on_token` gets each
    /// token and returns `false` to stop. Ignores `req.stop` (text is [`Engine::complete`]'s).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        req: &Request,
        progress: &dyn Progress,
        on_token: impl FnMut(&Token) -> bool,
    ) -> Result<EngineGeneration, EngineError> {
        self.generate_until(prompt, req, progress, &|| false, on_token)
    }

    /// [`Engine::generate`], asking `cancelled` during the prefill, before each sparse layer of
    /// each chunk, whether the caller still wants the answer (a client that went away, Ctrl-C):
    /// once it says yes the prefill stops there, nothing is generated, and the result's
    /// `stop_reason` is `"stopped"`, as when `on_token` stops. A prefill cut short leaves the
    /// KV cache empty (it may hold part of a chunk). After the first token `on_token` decides.
    pub fn generate_until(
        &mut self,
        prompt: &[u32],
        req: &Request,
        progress: &dyn Progress,
        cancelled: &dyn Fn() -> bool,
        mut on_token: impl FnMut(&Token) -> bool,
    ) -> Result<EngineGeneration, EngineError> {
        let opts = self.options(req);
        let logprobs = req.logprobs.map(|n| n.min(MAX_TOP_LOGPROBS));
        let first_token = Rc::new(Cell::new(false));
        let mut gate = Watch {
            streaming: &mut self.experts,
            resident: &mut self.resident,
            engine_streaming: &mut self.streaming,
            pressure: self.pressure.as_mut(),
            layout: &self.layout,
            progress,
            first_token: first_token.clone(),
            cancelled,
            stopped: false,
            at_first_token: None,
        };
        self.prompts.choose(&mut self.prefix, prompt);
        let cached = self.prefix.reusable(prompt);
        let cpu_start = process_cpu_s();
        let mut cpu_first = None;
        let generation = crate::run::generate::generate_with_prefix(
            &self.model,
            &mut gate,
            &mut self.prefix,
            prompt,
            &opts,
            logprobs,
            progress,
            |t| {
                first_token.set(true);
                cpu_first.get_or_insert_with(process_cpu_s);
                on_token(t)
            },
        );
        let cpu_end = process_cpu_s();
        let generation = match generation {
            Err(_) if gate.stopped => Generation {
                tokens: Vec::new(),
                stats: GenerateStats {
                    prompt_tokens: prompt.len(),
                    stop_reason: "stopped".into(),
                    ..GenerateStats::default()
                },
                cached_tokens: cached,
            },
            g => g?,
        };
        Ok(EngineGeneration {
            generation,
            at_first_token: gate.at_first_token.take(),
            cpu_s: CpuSeconds {
                prefill: cpu_first.map(|c| c - cpu_start),
                decode: cpu_first.map(|c| cpu_end - c),
            },
        })
    }
}

/// Says so when a budget is more than the machine's memory: it cannot be honoured, and is most
/// likely a typo (`1TB` for `1GB`).
fn warn_over_ram(progress: &dyn Progress, option: &str, text: &str, bytes: u64, ram: u64) {
    if ram > 0 && bytes > ram {
        progress.warn(&format!(
            "{option} {text} ({}) is more than this machine's memory ({}); the budget cannot hold, and the system may swap",
            units::bytes(bytes, Style::RUN),
            units::bytes(ram, Style::RUN)
        ));
    }
}

/// The store the forward pass uses, watched at each call into it before the first token: it
/// stops a prefill the caller no longer wants, and it snapshots the read counters at the first
/// call after the first token (the end of the prefill), so the decode phase can be reported on
/// its own.
///
/// Cancelling: every call (at each sparse layer of each chunk, so between chunks too) first asks
/// `cancelled`, and once it says yes fails with [`PrefillCancelled`], which
/// [`Engine::generate_until`] turns into a stopped generation. The prefill loop itself
/// (`run::generate`) needs no hook: a store error already ends it and empties the KV cache.
///
/// Memory pressure: at the start of each forward pass (a decode step, a prompt chunk) it polls
/// the engine's watch, which may resize the cache and move an all-resident engine to the
/// streaming store and back (`pressure.rs`); the forward pass then goes on through whichever
/// store serves.
struct Watch<'a, 's, 'p> {
    /// The streaming store (whose counters are snapshotted), serving unless `resident` is set.
    streaming: &'s mut StreamingExperts<'p>,
    resident: &'s mut Option<ResidentExperts>,
    engine_streaming: &'s mut bool,
    pressure: Option<&'s mut PressureWatch>,
    layout: &'s pressure::Layout,
    progress: &'a dyn Progress,
    first_token: Rc<Cell<bool>>,
    cancelled: &'a dyn Fn() -> bool,
    stopped: bool,
    at_first_token: Option<PhaseSnapshot>,
}

/// The error [`Watch`] stops a prefill with.
#[derive(Debug, thiserror::Error)]
#[error("the prefill was cancelled by the caller")]
struct PrefillCancelled;

impl Watch<'_, '_, '_> {
    fn inner(&mut self) -> &mut dyn ExpertStore {
        match self.resident {
            Some(ref mut r) => r,
            None => &mut *self.streaming,
        }
    }

    fn inner_ref(&self) -> &dyn ExpertStore {
        match self.resident {
            Some(ref r) => r,
            None => &*self.streaming,
        }
    }

    /// Before each call into the store: stop a cancelled prefill, else mark the phase.
    fn check(&mut self) -> Result<(), ComputeError> {
        let first = self.first_token.get();
        if !self.stopped && !first && (self.cancelled)() {
            self.stopped = true;
        }
        if self.stopped {
            return Err(ComputeError::Store(Box::new(PrefillCancelled)));
        }
        if let (None, None, true) = (&*self.resident, &self.at_first_token, first) {
            let s = &self.streaming;
            let c = s.cache_stats();
            self.at_first_token = Some(PhaseSnapshot {
                bytes_read: c.bytes_read,
                experts_loaded: c.experts_loaded,
                misses: c.misses_per_layer.values().sum::<u64>(),
                hits: c.hits_per_layer.values().sum::<u64>(),
                read_decode_ms: c.read_decode_ms,
                stall_ms: s.stats.stall_ms,
                eval_wait_ms: s.stats.eval_wait_ms,
            });
        }
        Ok(())
    }
}

impl ExpertStore for Watch<'_, '_, '_> {
    fn route(&mut self, layer: usize, indices: &Array) -> Result<Vec<PoolRoute<'_>>, ComputeError> {
        self.check()?;
        self.inner().route(layer, indices)
    }

    fn route_scored(
        &mut self,
        layer: usize,
        routing: &Routing,
    ) -> Result<(Vec<PoolRoute<'_>>, Option<Array>), ComputeError> {
        self.check()?;
        self.inner().route_scored(layer, routing)
    }

    fn mix(
        &mut self,
        layer: usize,
        x: &Array,
        routing: &Routing,
    ) -> Result<Option<Array>, ComputeError> {
        self.check()?;
        self.inner().mix(layer, x, routing)
    }

    fn wants_prediction(&self) -> bool {
        self.inner_ref().wants_prediction()
    }

    fn begin_pass(&mut self, first: usize, entries: usize) -> Result<(), ComputeError> {
        if let Some(watch) = self.pressure.as_deref_mut() {
            pressure::relieve(
                watch,
                pressure::Stores {
                    experts: &mut *self.streaming,
                    resident: &mut *self.resident,
                    streaming: &mut *self.engine_streaming,
                },
                self.layout,
                self.progress,
            )?;
        }
        self.inner().begin_pass(first, entries)
    }

    fn wants_guess(&mut self, layer: usize, entries: usize) -> bool {
        self.inner().wants_guess(layer, entries)
    }

    fn predict(&mut self, layer: usize, guess: &Routing) -> Result<(), ComputeError> {
        self.inner().predict(layer, guess)
    }

    fn eager(&self) -> bool {
        self.inner_ref().eager()
    }

    fn runs_ahead(&self, tokens: usize) -> bool {
        self.inner_ref().runs_ahead(tokens)
    }

    fn set_ahead(&mut self, on: bool) {
        self.inner().set_ahead(on)
    }

    fn confirm(&mut self, layer: usize) -> Result<bool, ComputeError> {
        self.check()?;
        self.inner().confirm(layer)
    }
}
