//! Several sequences decoded together: continuous batching (decision 0009's update).
//!
//! In: sequences ([`Lane`]s), each started from its own prompt and KV cache ([`Lane::start`]),
//! joining and leaving between steps. Out: per step ([`step`]), one token of every lane, in
//! order, to the caller's `on_token`; a lane is [`Lane::done`] once it reaches its end, and
//! [`Lane::finish`] gives its generation and its cache (a [`Prefix`], for the prompt cache).
//! Invariant: every lane's tokens are those it gets decoded alone through
//! `generate::generate_with_prefix` (its attention runs on its own cache at its own position,
//! `Model::forward_rows`; the feed-forward of the batch reads each routed expert once), and a
//! lane's cache holds exactly the ids its prefix records.
//!
//! Greedy lanes are pipelined as `generate`'s greedy decoding is: a step feeds each lane the
//! token the previous step picked on the device, before the host reads it, so the host builds
//! step `t + 1` while the device computes step `t`; a token is reported one step after it was
//! picked. A lane that samples (temperature, log-probabilities) picks on the host from its row of
//! the logits, which costs the batch one round trip that step.

use std::time::Instant;

use crate::mlx::{self, Array};
use crate::model::{ExpertStore, Model};
use crate::progress::Progress;
use crate::run::generate::{
    check_prompt, last_logits, prefill_prompt, GenerateError, GenerateOptions, GenerateStats,
    Generation, Prefix, Token, TokenLogprobs,
};
use crate::run::sample::Sampler;

/// One sequence being decoded.
pub struct Lane {
    prefix: Prefix,
    sampler: Sampler,
    /// Picks on the device (greedy, no log-probabilities).
    device: bool,
    logprobs: Option<usize>,
    /// The next token, not yet reported: `[1, 1]` ids (lazy while the device picks), with, on
    /// the device, the sum of its logits row (NaN exactly when a logit is).
    next: (Array, Option<Array>),
    next_lp: Option<TokenLogprobs>,
    out: Vec<u32>,
    prompt_tokens: usize,
    cached: usize,
    max_tokens: usize,
    context: usize,
    eos: Vec<u32>,
    started: Instant,
    decode_started: Option<Instant>,
    stats: GenerateStats,
    /// Why the lane ended (`eos`, `max_tokens`, `context`, `stopped`), once it has.
    done: Option<&'static str>,
}

impl Lane {
    /// Prefills `prompt` after what `prefix` shares with it and picks the first token (reported
    /// by the first [`step`]). `logprobs`: as `generate_with_prefix`'s.
    pub fn start(
        model: &Model,
        experts: &mut dyn ExpertStore,
        mut prefix: Prefix,
        prompt: &[u32],
        opts: &GenerateOptions,
        logprobs: Option<usize>,
        progress: &dyn Progress,
    ) -> Result<Lane, GenerateError> {
        let context = check_prompt(model, prompt)?;
        let mut sampler = Sampler::new(opts.sampler)?;
        let started = Instant::now();
        // On an error the prefix goes with the lane: what it held may be half written.
        let (logits, cached) =
            prefill_prompt(model, experts, &mut prefix, prompt, opts, progress, None)?;
        let device = opts.sampler.temperature == 0.0 && !opts.host_sampling && logprobs.is_none();
        let (next, next_lp) = if device {
            let (ids, sum) = (logits.argmax(-1)?, logits.sum(-1, false)?);
            mlx::async_eval(&[&ids, &sum])?;
            ((ids, Some(sum)), None)
        } else {
            let host = last_logits(&logits)?;
            let id = sampler.sample(&host)?;
            let lp = logprobs.map(|n| TokenLogprobs::of(&host, id, n));
            ((Array::from_slice(&[id], &[1, 1])?, None), lp)
        };
        Ok(Lane {
            prefix,
            sampler,
            device,
            logprobs,
            next,
            next_lp,
            out: Vec::new(),
            prompt_tokens: prompt.len(),
            cached,
            max_tokens: opts.max_tokens,
            context,
            eos: opts.eos.clone(),
            started,
            decode_started: None,
            stats: GenerateStats {
                prompt_tokens: prompt.len(),
                stop_reason: "max_tokens".into(),
                ..GenerateStats::default()
            },
            done: None,
        })
    }

    /// Whether the lane has ended.
    pub fn done(&self) -> bool {
        self.done.is_some()
    }

    /// How many positions of the prompt its prefix gave.
    pub fn cached(&self) -> usize {
        self.cached
    }

    /// Whether a token after `next` would be wanted: `next` is then fed by the step that
    /// reports it.
    fn wants_more(&self) -> bool {
        let n = self.out.len() + 1;
        n < self.max_tokens && self.prompt_tokens + n < self.context
    }

    /// The generation and the cache (holding the prompt and the tokens fed), once done or
    /// given up. The cache's pending work is finished first: a step may have fed a token
    /// nobody will read, over expert slots a later load may rewrite.
    pub fn finish(mut self) -> Result<(Generation, Prefix), GenerateError> {
        if let Some(reason) = self.done {
            self.stats.stop_reason = reason.into();
        }
        let now = Instant::now();
        let decode_s = self.decode_started.map_or(0.0, |d| (now - d).as_secs_f64());
        self.stats.generated_tokens = self.out.len();
        self.stats.decode_tokens_per_s =
            self.out.len().saturating_sub(1) as f64 / decode_s.max(1e-9);
        self.stats.total_s = (now - self.started).as_secs_f64();
        let evaluated = mlx::eval(&self.prefix.kv_mut().state());
        if evaluated.is_err() || !self.prefix.consistent() {
            self.prefix.clear();
        }
        evaluated?;
        Ok((
            Generation {
                tokens: self.out,
                stats: self.stats,
                cached_tokens: self.cached,
            },
            self.prefix,
        ))
    }
}

/// A fed lane's next pick: `[1, 1]` ids (lazy, on the device) and its logits row's sum, or
/// (sampling on the host) its logits row and then that row on the host.
type Pick = (Array, Option<Array>, Option<Vec<f32>>);

/// One step of every lane in `lanes` not yet done: feeds each its next token where a token
/// after it is wanted (one `Model::forward_rows` for all of them) and picks the token after it,
/// then reports each lane's next token to `on_token(lane index, token)`, which returns `false`
/// to end that lane. A lane ends at an end-of-sequence id (not reported), at its `max_tokens`,
/// at the context's end, or when `on_token` says so. On an error every lane of the step is left
/// as it was before it or done; the caller gives them up.
pub fn step(
    model: &Model,
    experts: &mut dyn ExpertStore,
    lanes: &mut [&mut Lane],
    on_token: &mut dyn FnMut(usize, &Token) -> bool,
) -> Result<(), GenerateError> {
    let fed: Vec<usize> = (0..lanes.len())
        .filter(|&i| !lanes[i].done() && lanes[i].wants_more())
        .collect();
    // The step after: each fed lane's next pick ([1, 1] ids, lazy on the device), its logits
    // row's sum there, and the host's logits row for a lane that samples.
    let mut picks: Vec<Option<Pick>> = (0..lanes.len()).map(|_| None).collect();
    if !fed.is_empty() {
        let tokens: Vec<&Array> = fed.iter().map(|&i| &lanes[i].next.0).collect();
        let tokens = mlx::concatenate(&tokens, 0)?;
        let logits = {
            let mut caches: Vec<&mut crate::model::KvCache> = Vec::with_capacity(fed.len());
            let mut rest: &mut [&mut Lane] = lanes;
            let mut at = 0;
            for &i in &fed {
                let (_, tail) = rest.split_at_mut(i - at);
                let (lane, tail) = tail.split_first_mut().expect("a fed lane is in the slice");
                caches.push(lane.prefix.kv_mut());
                rest = tail;
                at = i + 1;
            }
            model.forward_rows(&tokens, &mut caches, experts)?
        };
        let vocab = logits.dim(-1).unwrap_or(0) as i32;
        let mut scheduled: Vec<Array> = Vec::new();
        for (row, &i) in fed.iter().enumerate() {
            let r = row as i32;
            let logits_row = logits.slice(&[r, 0, 0], &[r + 1, 1, vocab])?;
            if lanes[i].device {
                let ids = logits_row.argmax(-1)?;
                let sum = logits_row.sum(-1, false)?;
                scheduled.push(ids.clone());
                scheduled.push(sum.clone());
                picks[i] = Some((ids, Some(sum), None));
            } else {
                picks[i] = Some((logits_row, None, None));
            }
        }
        mlx::async_eval(&scheduled.iter().collect::<Vec<_>>())?;
        // The lanes that sample read their rows now.
        for &i in &fed {
            if !lanes[i].device {
                if let Some((row, _, host)) = picks[i].as_mut() {
                    *host = Some(last_logits(row)?);
                }
            }
        }
    }
    for (i, lane) in lanes.iter_mut().enumerate() {
        if lane.done() {
            continue;
        }
        if lane.out.len() >= lane.max_tokens {
            lane.done = Some("max_tokens");
            continue;
        }
        let token = lane.next.0.to_vec::<u32>()?[0];
        if let Some(sum) = &lane.next.1 {
            if sum.to_vec_f32()?[0].is_nan() {
                return Err(GenerateError::NanLogits {
                    position: lane.out.len(),
                });
            }
        }
        if picks[i].is_some() {
            lane.prefix.push_fed(token);
        }
        if lane.out.is_empty() {
            let prefill_s = lane.started.elapsed().as_secs_f64();
            lane.stats.time_to_first_token_s = prefill_s;
            lane.stats.prefill_tokens_per_s =
                (lane.prompt_tokens - lane.cached) as f64 / prefill_s.max(1e-9);
            lane.decode_started = Some(Instant::now());
        }
        if lane.eos.contains(&token) {
            lane.done = Some("eos");
            continue;
        }
        lane.out.push(token);
        let reported = Token {
            id: token,
            logprobs: lane.next_lp.take(),
        };
        if !on_token(i, &reported) {
            lane.done = Some("stopped");
            continue;
        }
        match picks[i].take() {
            Some((ids, sum, None)) => lane.next = (ids, sum),
            Some((_, _, Some(host))) => {
                let id = lane.sampler.sample(&host)?;
                lane.next_lp = lane.logprobs.map(|n| TokenLogprobs::of(&host, id, n));
                lane.next = (Array::from_slice(&[id], &[1, 1])?, None);
            }
            None => {
                lane.done = Some(
                    if lane.out.len() < lane.max_tokens
                        && lane.prompt_tokens + lane.out.len() >= lane.context
                    {
                        "context"
                    } else {
                        "max_tokens"
                    },
                );
            }
        }
    }
    Ok(())
}
