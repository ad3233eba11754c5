//! Sample stage and the generation loop: prompt ids in, generated ids out, one at a time.
//!
//! In: a [`Model`], an [`ExpertStore`], prompt token ids. Out: generated ids (streamed to a
//! callback as they are produced) and timings. The prompt is prefilled in chunks so that one
//! chunk never routes to more distinct experts than the cache has slots.
//! Invariant: never runs past the model's context length; stops at EOS.

use std::time::Instant;

use crate::mlx::Array;
use crate::model::{ComputeError, ExpertStore, KvCache, Model};
use crate::progress::{Progress, Silent};
use crate::run::sample::{SampleError, Sampler, SamplerOptions};

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
}

/// Logits of the last position of `[1, L, V]`, on the host.
pub fn last_logits(logits: &Array) -> Result<Vec<f32>, crate::mlx::Error> {
    let shape = logits.shape();
    let (l, v) = (shape[1] as i32, shape[2] as i32);
    logits.slice(&[0, l - 1, 0], &[1, l, v])?.to_vec_f32()
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
    let mut sampler = Sampler::new(opts.sampler)?;
    let mut cache: KvCache = model.new_cache();
    let started = Instant::now();
    // As mlx-lm: every prompt position but the last only fills the KV cache; the last one
    // runs alone and gives the first token's logits.
    let (body, last) = prompt.split_at(prompt.len() - 1);
    progress.stage("prompt", Some(prompt.len() as u64), "tokens");
    for chunk in body.chunks(opts.prefill_chunk.max(1)) {
        model.prefill_ids(chunk, &mut cache, experts)?;
        progress.advance(chunk.len() as u64);
    }
    let logits = model.forward_last_ids(last, &mut cache, experts)?;
    progress.advance(1);
    progress.finish_stage();
    if opts.sampler.temperature == 0.0 && !opts.host_sampling {
        return greedy_pipelined(
            model, experts, prompt, opts, &mut cache, logits, started, on_token,
        );
    }
    let mut next = sampler.sample(&last_logits(&logits)?)?;
    let prefill_s = started.elapsed().as_secs_f64();
    let mut stats = GenerateStats {
        prompt_tokens: prompt.len(),
        time_to_first_token_s: prefill_s,
        prefill_tokens_per_s: prompt.len() as f64 / prefill_s.max(1e-9),
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
        if !on_token(next) {
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
        let logits = model.forward_last_ids(&[next], &mut cache, experts)?;
        next = sampler.sample(&last_logits(&logits)?)?;
    }
    let decode_s = decode_started.elapsed().as_secs_f64();
    stats.generated_tokens = out.len();
    // The first token came from the prefill; the decode rate counts the forward passes after it.
    stats.decode_tokens_per_s = out.len().saturating_sub(1) as f64 / decode_s.max(1e-9);
    stats.total_s = started.elapsed().as_secs_f64();
    Ok((out, stats))
}

/// Greedy decoding, pipelined as mlx-lm's `generate_step`: the argmax stays on the device, and
/// step `t + 1`'s graph is built and scheduled (`async_eval`) on step `t`'s lazy token before the
/// host waits for token `t`. The host's work (streaming the token, building the graph, routing
/// under a budget) overlaps the device's. Same tokens as the host sampler's greedy pick (the
/// first maximum) on the same logits.
#[allow(clippy::too_many_arguments)]
fn greedy_pipelined(
    model: &Model,
    experts: &mut dyn ExpertStore,
    prompt: &[u32],
    opts: &GenerateOptions,
    cache: &mut KvCache,
    logits: Array,
    started: Instant,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<(Vec<u32>, GenerateStats), GenerateError> {
    let context = model.config().max_position_embeddings.unwrap_or(usize::MAX);
    let pick = |logits: &Array| -> Result<Array, GenerateError> {
        // logits [1, 1, V] -> [1, 1] ids
        Ok(logits.argmax(-1)?)
    };
    let mut y = pick(&logits)?;
    crate::mlx::async_eval(&[&y])?;
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
        let next = if more {
            let l = model.forward_last(&y, cache, experts)?;
            let ny = pick(&l)?;
            crate::mlx::async_eval(&[&ny])?;
            Some(ny)
        } else {
            None
        };
        let waited = Instant::now();
        let token = y.to_vec::<u32>()?[0];
        if !out.is_empty() {
            stats.host_build_ms += (waited - built).as_secs_f64() * 1e3;
            stats.host_wait_ms += waited.elapsed().as_secs_f64() * 1e3;
        }
        if out.is_empty() {
            let prefill_s = started.elapsed().as_secs_f64();
            stats.time_to_first_token_s = prefill_s;
            stats.prefill_tokens_per_s = prompt.len() as f64 / prefill_s.max(1e-9);
            decode_started = Instant::now();
        }
        if opts.eos.contains(&token) {
            stats.stop_reason = "eos".into();
            break;
        }
        out.push(token);
        if !on_token(token) {
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
    Ok((out, stats))
}
