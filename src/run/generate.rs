//! Sample stage and the generation loop: prompt ids in, generated ids out, one at a time.
//!
//! In: a [`Model`], an [`ExpertStore`], prompt token ids. Out: generated ids (streamed to a
//! callback as they are produced) and timings. The prompt is prefilled in chunks so that one
//! chunk never routes to more distinct experts than the cache has slots.
//! Invariant: never runs past the model's context length; stops at EOS.
//!
//! Prefix reuse: a [`Prefix`] is a KV cache together with the token ids whose keys and values it
//! holds. [`generate_with_prefix`] keeps the longest prefix those ids share with the new prompt
//! (truncating the cache there, `KvCache::truncate`) and computes only the rest, as mlx-lm's
//! prompt cache does; the prefix then holds the prompt and every generated token that was fed
//! back. After an error the prefix is emptied, since a failed forward pass may have written
//! part of a chunk.

use std::time::Instant;

use crate::mlx::Array;
use crate::model::{ComputeError, ExpertStore, KvCache, KvCheckpoint, Model};
use crate::progress::{Progress, Silent};
use crate::run::sample::{SampleError, SampleSpec, Sampler, SamplerOptions};

/// Why generation stopped early or could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenerateError {
    #[error("the prompt is empty: give some text (or disable the chat template with --raw only if the text itself is non-empty)")]
    EmptyPrompt,
    #[error(
        "the prompt has {tokens} tokens, but the model's context is {context}: shorten the prompt"
    )]
    PromptTooLong { tokens: usize, context: usize },
    #[error(transparent)]
    Compute(#[from] ComputeError),
    #[error(transparent)]
    Sample(#[from] SampleError),
    /// The device-side greedy pick found NaN among the logits (the host sampler reports the
    /// same as [`SampleError::NotANumber`]).
    #[error(
        "the logits of generated token {position} are NaN: the forward pass produced invalid \
         values (check the model's config for extreme numbers, and run `flashpack verify`)"
    )]
    NanLogits { position: usize },
    #[error(transparent)]
    Mlx(#[from] crate::mlx::Error),
}

/// How to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampler: SamplerOptions,
    /// Most prompt tokens per forward call.
    pub prefill_chunk: usize,
    /// Token ids that end generation.
    pub eos: Vec<u32>,
    /// Greedy decoding normally picks tokens on the device and builds the next step's graph
    /// before the current token reaches the host (mlx-lm's `async_eval` pipeline). This forces
    /// the host sampler instead: one synchronous round trip per token (a benchmark baseline).
    pub host_sampling: bool,
}

/// Timings of one generation.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub time_to_first_token_s: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub total_s: f64,
    /// "eos", "max_tokens", "context" or "stopped".
    pub stop_reason: String,
    /// Pipelined greedy decode: host time spent building and scheduling each next step, and
    /// waiting for each token to reach the host, summed over the decode (ms). Build time above
    /// the device's step time means the host is the bottleneck.
    pub host_build_ms: f64,
    pub host_wait_ms: f64,
    /// Arrays the host made while building those steps (`mlx::arrays_made`): graph nodes and
    /// constants, a count that does not depend on the machine.
    pub host_arrays: u64,
}

/// Logits of the last position of `[1, L, V]`, on the host.
pub fn last_logits(logits: &Array) -> Result<Vec<f32>, crate::mlx::Error> {
    let shape = logits.shape();
    let (l, v) = (shape[1] as i32, shape[2] as i32);
    logits.slice(&[0, l - 1, 0], &[1, l, v])?.to_vec_f32()
}

/// A KV cache and the token ids, in order, whose keys and values it holds: what the next
/// prompt can start from. For a model whose cache cannot be cut back everywhere (sliding
/// windows, linear attention) it also keeps a checkpoint at the end of the last prompt, so a
/// next prompt that extends the last one (a chat's next turn, whose template renders the
/// answer differently from how it was generated, as harmony drops the reasoning) starts there.
#[derive(Debug, Default)]
pub struct Prefix {
    kv: KvCache,
    ids: Vec<u32>,
    /// The cache at the end of the last prompt: it holds `ids[..checkpoint.offset()]`.
    checkpoint: Option<KvCheckpoint>,
    /// How many of `ids` the last prompt gave (the rest were generated after it).
    prompt_end: usize,
}

impl Prefix {
    /// The ids whose keys and values the cache holds.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The KV cache, for a decode step that feeds it one token ([`Prefix::push_fed`] records
    /// the token).
    pub(crate) fn kv_mut(&mut self) -> &mut KvCache {
        &mut self.kv
    }

    /// Records that token `id` was fed to the cache after what it held.
    pub(crate) fn push_fed(&mut self, id: u32) {
        self.ids.push(id);
    }

    /// Whether the cache holds exactly the recorded ids (a step that failed may have left it
    /// otherwise, and then nothing in it can be reused).
    pub(crate) fn consistent(&self) -> bool {
        self.kv.offset() == self.ids.len()
    }

    /// Forget everything (the buffers go too).
    pub fn clear(&mut self) {
        *self = Prefix::default();
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Whether `prompt` starts with the whole of the last prompt: it goes on from this
    /// conversation (a chat's next turn), so nothing here is worth keeping apart from it.
    pub fn extended_by(&self, prompt: &[u32]) -> bool {
        let end = self.prompt_end.min(self.ids.len());
        prompt.len() >= end && prompt[..end] == self.ids[..end]
    }

    /// The bytes of the cache's buffers (its capacity, as allocated), the checkpoint's included.
    pub fn bytes(&self) -> u64 {
        let arrays = self.kv.state().into_iter().chain(
            self.checkpoint
                .as_ref()
                .map(KvCheckpoint::arrays)
                .unwrap_or_default(),
        );
        arrays.map(|a| (a.size() * a.dtype().size()) as u64).sum()
    }

    /// A second prefix holding the same positions, sharing the buffers until one is written
    /// ([`KvCache::snapshot`]).
    pub fn snapshot(&self) -> Prefix {
        Prefix {
            kv: self.kv.snapshot(),
            ids: self.ids.clone(),
            checkpoint: self.checkpoint.clone(),
            prompt_end: self.prompt_end,
        }
    }

    /// How many positions of `prompt` [`Prefix::keep_shared`] would keep, without changing
    /// anything.
    pub fn reusable(&self, prompt: &[u32]) -> usize {
        let shared = self
            .ids
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len().saturating_sub(1));
        if self.kv.offset() != self.ids.len() {
            0
        } else if self.kv.can_truncate(shared) {
            shared
        } else {
            self.checkpoint
                .as_ref()
                .map(KvCheckpoint::offset)
                .filter(|&at| at <= shared)
                .unwrap_or(0)
        }
    }

    /// Keeps the longest prefix shared with `prompt`, but never the whole prompt (its last
    /// token must run to give the first logits); returns how many positions were kept.
    fn keep_shared(&mut self, prompt: &[u32]) -> usize {
        let keep = self.reusable(prompt);
        // A linear-attention state cannot go back, nor a sliding-window cache that has dropped
        // positions (model/kv_cache.rs, "Reusing a prefix"): such a model reuses a cache whose
        // every position the prompt keeps, or else its checkpoint at the end of the last prompt
        // when the new prompt keeps that much (`reusable` then says the checkpoint's position).
        // An offset that disagrees with the ids cannot happen while every path below records
        // what it feeds (`reusable` gives 0); the cache is cleared to stay correct anyway.
        let kept = self.kv.offset() == self.ids.len()
            && (self.kv.truncate(keep).is_ok()
                || self
                    .checkpoint
                    .as_ref()
                    .is_some_and(|cp| cp.offset() == keep && self.kv.restore(cp).is_ok()));
        if !kept {
            self.clear();
            return 0;
        }
        if self
            .checkpoint
            .as_ref()
            .is_some_and(|cp| cp.offset() > keep)
        {
            self.checkpoint = None;
        }
        self.ids.truncate(keep);
        keep
    }
}

/// One generated token; with logprobs asked for, its log-probability and the most likely
/// alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    pub id: u32,
    pub logprobs: Option<TokenLogprobs>,
}

/// Log-probabilities (natural log, of the model's distribution before temperature and
/// filtering, as OpenAI and mlx-lm report them) of a sampled token and of the `top` most
/// likely tokens, most likely first.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    /// From one row of logits: log-softmax in f64, the `top` best ids (lowest id first on ties).
    pub fn of(logits: &[f32], id: u32, top: usize) -> TokenLogprobs {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let log_z = max
            + logits
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let lp = |i: u32| {
            (logits.get(i as usize).copied().unwrap_or(f32::NEG_INFINITY) as f64 - log_z) as f32
        };
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let top = top.min(order.len());
        if top > 0 {
            order.select_nth_unstable_by(top - 1, |&a, &b| {
                logits[b as usize]
                    .total_cmp(&logits[a as usize])
                    .then(a.cmp(&b))
            });
            order.truncate(top);
            order.sort_by(|&a, &b| {
                logits[b as usize]
                    .total_cmp(&logits[a as usize])
                    .then(a.cmp(&b))
            });
        } else {
            order.clear();
        }
        TokenLogprobs {
            logprob: lp(id),
            top: order.into_iter().map(|i| (i, lp(i))).collect(),
        }
    }
}

/// What [`generate_with_prefix`] produced.
#[derive(Clone, Debug)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub stats: GenerateStats,
    /// Prompt positions taken from the prefix instead of computed.
    pub cached_tokens: usize,
}

/// Prefills `prompt`, then samples up to `max_tokens`; `on_token` gets each id as it is
/// produced and returns `false` to stop.
pub fn generate(
    model: &Model,
    experts: &mut dyn ExpertStore,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: impl FnMut(u32) -> bool,
) -> Result<(Vec<u32>, GenerateStats), GenerateError> {
    generate_reporting(model, experts, prompt, opts, &Silent, on_token)
}

/// [`generate`], reporting the prompt's progress to `progress`: one stage `"prompt"` of
/// `prompt.len()` tokens, advanced by each prefill chunk once it is evaluated (and by the last
/// prompt token, which runs with the first token's logits).
pub fn generate_reporting(
    model: &Model,
    experts: &mut dyn ExpertStore,
    prompt: &[u32],
    opts: &GenerateOptions,
    progress: &dyn Progress,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<(Vec<u32>, GenerateStats), GenerateError> {
    let mut prefix = Prefix::default();
    let g = generate_with_prefix(
        model,
        experts,
        &mut prefix,
        prompt,
        opts,
        None,
        progress,
        |t| on_token(t.id),
    )?;
    Ok((g.tokens, g.stats))
}

/// [`generate_reporting`] starting from what `prefix` holds: only the prompt positions after
/// the shared prefix are computed (the progress stage counts those). With `logprobs`
/// (`Some(n)`: the `n` most likely alternatives too) each token carries its log-probabilities,
/// which takes the logits to the host at every step. Afterwards `prefix` holds the prompt and
/// the generated tokens that were fed back.
#[allow(clippy::too_many_arguments)]
pub fn generate_with_prefix(
    model: &Model,
    experts: &mut dyn ExpertStore,
    prefix: &mut Prefix,
    prompt: &[u32],
    opts: &GenerateOptions,
    logprobs: Option<usize>,
    progress: &dyn Progress,
    on_token: impl FnMut(&Token) -> bool,
) -> Result<Generation, GenerateError> {
    let result = generate_inner(
        model, experts, prefix, prompt, opts, logprobs, progress, on_token,
    );
    if result.is_err() || prefix.kv.offset() != prefix.ids.len() {
        prefix.clear();
    }
    result
}

/// The model's context, once `prompt` is known to fit in it with room for a token.
pub(crate) fn check_prompt(model: &Model, prompt: &[u32]) -> Result<usize, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let context = model.config().max_position_embeddings.unwrap_or(usize::MAX);
    if prompt.len() >= context {
        return Err(GenerateError::PromptTooLong {
            tokens: prompt.len(),
            context,
        });
    }
    Ok(context)
}

/// Runs `prompt` after the longest prefix it shares with `prefix` (which then holds the whole
/// prompt, its checkpoint at the prompt's end): every position but the last only fills the KV
/// cache, in chunks of `opts.prefill_chunk`, and the last gives the logits `[1, 1, vocab]` of
/// the first token. Also how many positions the prefix gave. The prompt is not checked here.
pub(crate) fn prefill_prompt(
    model: &Model,
    experts: &mut dyn ExpertStore,
    prefix: &mut Prefix,
    prompt: &[u32],
    opts: &GenerateOptions,
    progress: &dyn Progress,
    sample: Option<SampleSpec>,
) -> Result<(Array, usize), GenerateError> {
    let cached = prefix.keep_shared(prompt);
    // As mlx-lm: every prompt position but the last only fills the KV cache; the last one
    // runs alone and gives the first token's logits.
    let (body, last) = prompt[cached..].split_at(prompt.len() - cached - 1);
    progress.stage("prompt", Some((prompt.len() - cached) as u64), "tokens");
    for chunk in body.chunks(opts.prefill_chunk.max(1)) {
        model.prefill_ids(chunk, &mut prefix.kv, experts)?;
        prefix.ids.extend_from_slice(chunk);
        progress.advance(chunk.len() as u64);
    }
    // With `sample`, a pipeline's last stage samples the first token: `[1, 1, 2]` comes back
    // (`Model::forward_sampled`) instead of the logits.
    let logits = match sample {
        Some(spec) => model.forward_sampled(last, &mut prefix.kv, experts, spec)?,
        None => model.forward_last_ids(last, &mut prefix.kv, experts)?,
    };
    prefix.ids.extend_from_slice(last);
    prefix.prompt_end = prefix.ids.len();
    // The cache now holds exactly the prompt: the next turn may start here.
    prefix.checkpoint = prefix.kv.checkpoint();
    progress.advance(1);
    progress.finish_stage();
    Ok((logits, cached))
}

#[allow(clippy::too_many_arguments)]
fn generate_inner(
    model: &Model,
    experts: &mut dyn ExpertStore,
    prefix: &mut Prefix,
    prompt: &[u32],
    opts: &GenerateOptions,
    logprobs: Option<usize>,
    progress: &dyn Progress,
    mut on_token: impl FnMut(&Token) -> bool,
) -> Result<Generation, GenerateError> {
    let context = check_prompt(model, prompt)?;
    let mut sampler = Sampler::new(opts.sampler)?;
    let started = Instant::now();
    let greedy = opts.sampler.temperature == 0.0 && !opts.host_sampling && logprobs.is_none();
    // On a pipeline, the last stage samples at a temperature too (rank 0's sampler gives each
    // step's draw), so one id a step comes back instead of the logits; log-probabilities still
    // need the logits here.
    let remote = !greedy
        && opts.sampler.temperature != 0.0
        && logprobs.is_none()
        && model.samples_downstream();
    let first = remote.then(|| sampler.next_spec());
    let (logits, cached) = prefill_prompt(model, experts, prefix, prompt, opts, progress, first)?;
    if greedy {
        return greedy_pipelined(
            model, experts, prefix, prompt, cached, opts, logits, started, on_token,
        );
    }
    let computed = prompt.len() - cached;
    let (mut next, mut next_lp) = if remote {
        (remote_token(&logits, 0)?, None)
    } else {
        let host_logits = last_logits(&logits)?;
        let next = sampler.sample(&host_logits)?;
        (
            next,
            logprobs.map(|n| TokenLogprobs::of(&host_logits, next, n)),
        )
    };
    let prefill_s = started.elapsed().as_secs_f64();
    let mut stats = GenerateStats {
        prompt_tokens: prompt.len(),
        time_to_first_token_s: prefill_s,
        prefill_tokens_per_s: computed as f64 / prefill_s.max(1e-9),
        ..GenerateStats::default()
    };
    let mut out = Vec::new();
    let decode_started = Instant::now();
    stats.stop_reason = "max_tokens".into();
    while out.len() < opts.max_tokens {
        if opts.eos.contains(&next) {
            stats.stop_reason = "eos".into();
            break;
        }
        out.push(next);
        let token = Token {
            id: next,
            logprobs: next_lp.take(),
        };
        if !on_token(&token) {
            stats.stop_reason = "stopped".into();
            break;
        }
        if out.len() == opts.max_tokens {
            break;
        }
        if prompt.len() + out.len() >= context {
            stats.stop_reason = "context".into();
            break;
        }
        if remote {
            let spec = sampler.next_spec();
            let picked = model.forward_sampled(&[next], &mut prefix.kv, experts, spec)?;
            prefix.ids.push(next);
            next = remote_token(&picked, out.len())?;
            continue;
        }
        let logits = model.forward_last_ids(&[next], &mut prefix.kv, experts)?;
        prefix.ids.push(next);
        let host_logits = last_logits(&logits)?;
        next = sampler.sample(&host_logits)?;
        next_lp = logprobs.map(|n| TokenLogprobs::of(&host_logits, next, n));
    }
    let decode_s = decode_started.elapsed().as_secs_f64();
    stats.generated_tokens = out.len();
    // The first token came from the prefill; the decode rate counts the forward passes after it.
    stats.decode_tokens_per_s = out.len().saturating_sub(1) as f64 / decode_s.max(1e-9);
    stats.total_s = started.elapsed().as_secs_f64();
    Ok(Generation {
        tokens: out,
        stats,
        cached_tokens: cached,
    })
}

/// The token a pipeline's last stage sampled (`[1, 1, 2]`: the id and the logits' sum, NaN
/// exactly when a logit was), at generated position `position`.
fn remote_token(picked: &Array, position: usize) -> Result<u32, GenerateError> {
    let v = picked.to_vec_f32()?;
    match v[..] {
        [id, sum, ..] if !sum.is_nan() => Ok(id as u32),
        _ => Err(GenerateError::NanLogits { position }),
    }
}

/// Greedy decoding, pipelined as mlx-lm's `generate_step`: the argmax stays on the device, and
/// step `t + 1`'s graph is built and scheduled (`async_eval`) on step `t`'s lazy token before the
/// host waits for token `t`. The host's work (streaming the token, building the graph, routing
/// under a budget) overlaps the device's. Same tokens as the host sampler's greedy pick (the
/// first maximum) on the same logits. A token whose next step was scheduled has been fed to the
/// cache, so it joins the prefix even when generation stops on it.
#[allow(clippy::too_many_arguments)]
fn greedy_pipelined(
    model: &Model,
    experts: &mut dyn ExpertStore,
    prefix: &mut Prefix,
    prompt: &[u32],
    cached: usize,
    opts: &GenerateOptions,
    logits: Array,
    started: Instant,
    mut on_token: impl FnMut(&Token) -> bool,
) -> Result<Generation, GenerateError> {
    let context = model.config().max_position_embeddings.unwrap_or(usize::MAX);
    // logits [1, 1, V] -> ([1, 1] ids, [1, 1] sum). The sum is NaN exactly when a logit is NaN
    // (or +inf meets -inf), where argmax would silently pick some id: it is read with the id, so
    // the check costs one reduction on the device and no extra round trip.
    let pick = |logits: &Array| -> Result<(Array, Array), GenerateError> {
        Ok((logits.argmax(-1)?, logits.sum(-1, false)?))
    };
    let mut y = pick(&logits)?;
    crate::mlx::async_eval(&[&y.0, &y.1])?;
    let mut stats = GenerateStats {
        prompt_tokens: prompt.len(),
        stop_reason: "max_tokens".into(),
        ..GenerateStats::default()
    };
    let mut out: Vec<u32> = Vec::new();
    let mut decode_started = started;
    while out.len() < opts.max_tokens {
        // Would a token after this one be wanted (before knowing this one)?
        let n = out.len() + 1;
        let more = n < opts.max_tokens && prompt.len() + n < context;
        let built = Instant::now();
        let made = crate::mlx::arrays_made();
        let next = if more {
            let ny = model.forward_pick(&y.0, &mut prefix.kv, experts)?;
            crate::mlx::async_eval(&[&ny.0, &ny.1])?;
            Some(ny)
        } else {
            None
        };
        let waited = Instant::now();
        let made = crate::mlx::arrays_made() - made;
        let token = y.0.to_vec::<u32>()?[0];
        if y.1.to_vec_f32()?[0].is_nan() {
            // Finish the step already scheduled: it reads expert slots a later load may rewrite.
            if let Some(n) = &next {
                crate::mlx::eval(&[&n.0])?;
            }
            return Err(GenerateError::NanLogits {
                position: out.len(),
            });
        }
        if next.is_some() {
            prefix.ids.push(token);
        }
        if !out.is_empty() {
            stats.host_build_ms += (waited - built).as_secs_f64() * 1e3;
            stats.host_wait_ms += waited.elapsed().as_secs_f64() * 1e3;
            stats.host_arrays += made;
        }
        if out.is_empty() {
            let prefill_s = started.elapsed().as_secs_f64();
            stats.time_to_first_token_s = prefill_s;
            stats.prefill_tokens_per_s = (prompt.len() - cached) as f64 / prefill_s.max(1e-9);
            decode_started = Instant::now();
        }
        if opts.eos.contains(&token) {
            stats.stop_reason = "eos".into();
            break;
        }
        out.push(token);
        if !on_token(&Token {
            id: token,
            logprobs: None,
        }) {
            stats.stop_reason = "stopped".into();
            break;
        }
        match next {
            Some(ny) => y = ny,
            None => {
                if out.len() < opts.max_tokens && prompt.len() + out.len() >= context {
                    stats.stop_reason = "context".into();
                }
                break;
            }
        }
    }
    let decode_s = decode_started.elapsed().as_secs_f64();
    stats.generated_tokens = out.len();
    stats.decode_tokens_per_s = out.len().saturating_sub(1) as f64 / decode_s.max(1e-9);
    stats.total_s = started.elapsed().as_secs_f64();
    // A step scheduled for a token that was not wanted still wrote the cache: finish it, so the
    // cache holds values, not a pending graph over expert slots that may be rewritten.
    crate::mlx::eval(&prefix.kv.state())?;
    Ok(Generation {
        tokens: out,
        stats,
        cached_tokens: cached,
    })
}
