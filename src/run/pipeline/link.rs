//! The messages of a pipelined forward pass, over MLX's `send`/`recv` to ring neighbours.
//!
//! In: rank 0's last layer's output and what it wants back; on the other ranks, the messages
//! from their left neighbour. Out: the logits at rank 0. Invariant: messages go only to the
//! right neighbour (rank r to r + 1, the last rank to rank 0), in the order the forward passes
//! run, each a fixed header of [`HEADER`] words and then its array, evaluated before the
//! next message is built, so no message can overtake another.
//!
//! Header words, forward: `[FORWARD, B, L, want, offset, dtype, parts, ...]` then the hidden state
//! `[B, L, H]`. Where the layers pass more than a hidden state ([`Carry`]: DeepSeek-V4.1's
//! hyper-connections, Kimi-K3's attention residuals), `parts` > 0: one more header of
//! [`HEADER`] words per array (the hidden state's first, then each part's: `[present, dtype,
//! ndim, d0, d1, d2, d3, d4]`) follows as one message, then each present array. Stop:
//! `[STOP, 0, ...]`; the reply to rank 0: `[LOGITS, B, L, vocab, dtype, ...]` then the logits,
//! or for greedy decoding (`Want::Pick`) and for sampling at a temperature (`Want::Sample`, whose
//! options and rank 0's draw for the step are header words 7-11) `[LOGITS, B, 1, 2, f32, ...]`
//! then each row's token and logits' sum: the last rank picks or samples the token, and 8 bytes
//! a row come back. Headers are [`HEADER`] words.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::mlx::{self, Array, Dtype};
use crate::model::{Carry, ComputeError, Downstream, Input, KvCache, SampleSpec, Want};
use crate::run::engine::Engine;
use crate::run::sample;

use super::PipelineError;

const HEADER: usize = 13;
const FORWARD: i32 = 1;
const STOP: i32 = 2;
const LOGITS: i32 = 3;

/// `want`'s code (word 3 of a forward header) and, for a sample, its spec in words 7-11.
fn want_words(w: Want, header: &mut [i32; HEADER]) {
    header[3] = match w {
        Want::Cache => 0,
        Want::Last => 1,
        Want::All => 2,
        Want::Pick => 3,
        Want::Sample(spec) => {
            header[7] = spec.temperature as i32;
            header[8] = spec.top_p as i32;
            header[9] = spec.top_k as i32;
            header[10] = spec.u as u32 as i32;
            header[11] = (spec.u >> 32) as u32 as i32;
            4
        }
    };
}

fn want_of(header: &[i32; HEADER]) -> Result<Want, PipelineError> {
    match header[3] {
        0 => Ok(Want::Cache),
        1 => Ok(Want::Last),
        2 => Ok(Want::All),
        3 => Ok(Want::Pick),
        4 => Ok(Want::Sample(SampleSpec {
            temperature: header[7] as u32,
            top_p: header[8] as u32,
            top_k: header[9] as u32,
            u: header[10] as u32 as u64 | (header[11] as u32 as u64) << 32,
        })),
        code => Err(PipelineError::Protocol(format!("unknown request {code}"))),
    }
}

/// A forward header, `[FORWARD, B, L, want, offset, ..]` (dtype and parts: [`send_carry`]).
fn forward_header(b: usize, l: usize, want: Want, offset: usize) -> [i32; HEADER] {
    let mut h = [0i32; HEADER];
    h[0] = FORWARD;
    h[1] = b as i32;
    h[2] = l as i32;
    h[4] = offset as i32;
    want_words(want, &mut h);
    h
}

/// A reply to rank 0, `[LOGITS, B, L, vocab, dtype, ..]`.
fn reply_header(shape: &[usize], dtype: Dtype) -> [i32; HEADER] {
    let mut h = [0i32; HEADER];
    h[0] = LOGITS;
    for (i, &d) in shape.iter().take(3).enumerate() {
        h[1 + i] = d as i32;
    }
    h[4] = dtype.code();
    h
}

fn send_header(words: [i32; HEADER], dst: usize) -> Result<(), mlx::Error> {
    let h = Array::from_slice(&words, &[HEADER])?;
    mlx::dist::send(&h, dst)?.eval()
}

fn recv_header(src: usize) -> Result<[i32; HEADER], PipelineError> {
    let h = mlx::dist::recv(&[HEADER], Dtype::I32, src)?.to_vec::<i32>()?;
    h.try_into()
        .map_err(|_| PipelineError::Protocol("a short header".into()))
}

/// `x` as one contiguous buffer, then sent: the ring backend sends an array's bytes as they lie.
fn send_array(x: &Array, dst: usize) -> Result<(), mlx::Error> {
    mlx::dist::send(&x.contiguous()?, dst)?.eval()
}

fn dims(words: &[i32]) -> Result<Vec<usize>, PipelineError> {
    words
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| PipelineError::Protocol(format!("size {d}"))))
        .collect()
}

/// At most this many axes in an array of a [`Carry`]'s header.
const MAX_AXES: usize = HEADER - 3;

/// Sends `carry` to `dst` after a forward header `header` (`[FORWARD, B, L, want, offset, ..]`):
/// a plain hidden state as it is, else the shapes of every array first (module header).
fn send_carry(mut header: [i32; HEADER], carry: &Carry, dst: usize) -> Result<(), ComputeError> {
    header[5] = carry.h.dtype().code();
    header[6] = carry.parts.len() as i32;
    send_header(header, dst)?;
    if !carry.parts.is_empty() {
        let mut words = Vec::with_capacity(HEADER * (1 + carry.parts.len()));
        for a in std::iter::once(Some(&carry.h)).chain(carry.parts.iter().map(Option::as_ref)) {
            let mut w = [0i32; HEADER];
            if let Some(a) = a {
                let shape = a.shape();
                if shape.len() > MAX_AXES {
                    return Err(compute(PipelineError::Protocol(format!(
                        "an array of {} axes between stages (at most {MAX_AXES})",
                        shape.len()
                    ))));
                }
                w[0] = 1;
                w[1] = a.dtype().code();
                w[2] = shape.len() as i32;
                for (i, &d) in shape.iter().enumerate() {
                    w[3 + i] = d as i32;
                }
            }
            words.extend_from_slice(&w);
        }
        let n = words.len();
        mlx::dist::send(&Array::from_slice(&words, &[n])?, dst)?.eval()?;
    }
    send_array(&carry.h, dst)?;
    // An empty array (an indexer that chose nothing yet) has no bytes to send: the shapes
    // message is all the receiver needs for it.
    for p in carry.parts.iter().flatten().filter(|p| p.size() > 0) {
        send_array(p, dst)?;
    }
    Ok(())
}

/// The [`Carry`] after forward header `header` from `src`, whose hidden state is `[B, L,
/// hidden]` when it comes alone.
fn recv_carry(header: &[i32; HEADER], hidden: usize, src: usize) -> Result<Carry, PipelineError> {
    let bl = dims(&header[1..3])?;
    let dtype = Dtype::from_code(header[5])?;
    let parts = dims(&header[6..7])?[0];
    if parts == 0 {
        return Ok(Carry::plain(mlx::dist::recv(
            &[bl[0], bl[1], hidden],
            dtype,
            src,
        )?));
    }
    let n = HEADER * (1 + parts);
    let words = mlx::dist::recv(&[n], Dtype::I32, src)?.to_vec::<i32>()?;
    let mut arrays = Vec::with_capacity(1 + parts);
    for w in words.chunks(HEADER) {
        if w[0] == 0 {
            arrays.push(None);
            continue;
        }
        let axes = dims(&w[2..3])?[0];
        if axes > MAX_AXES {
            return Err(PipelineError::Protocol(format!("an array of {axes} axes")));
        }
        let shape = dims(&w[3..3 + axes])?;
        arrays.push(Some((shape, Dtype::from_code(w[1])?)));
    }
    let mut got = arrays
        .into_iter()
        .map(|a| {
            a.map(|(shape, dtype): (Vec<usize>, Dtype)| {
                if shape.iter().product::<usize>() == 0 {
                    Array::zeros(&shape, dtype)
                } else {
                    // Each receive is evaluated now: lazy ones would run in the order the
                    // layers use them, not the order they were sent in.
                    let a = mlx::dist::recv(&shape, dtype, src)?;
                    a.eval()?;
                    Ok(a)
                }
            })
            .transpose()
        })
        .collect::<Result<Vec<_>, _>>()?
        .into_iter();
    let h = got
        .next()
        .flatten()
        .ok_or_else(|| PipelineError::Protocol("a forward pass without its hidden state".into()))?;
    Ok(Carry {
        h,
        parts: got.collect(),
    })
}

/// Tells rank `to` (the next stage) to stop; each stage passes it on before it ends.
pub(super) fn send_stop(to: usize) -> Result<(), PipelineError> {
    let mut h = [0i32; HEADER];
    h[0] = STOP;
    Ok(send_header(h, to)?)
}

/// Rank 0's way to the stages after it: the [`Downstream`] of its model.
#[derive(Debug)]
pub struct Link {
    size: usize,
    report: Arc<Mutex<LinkReport>>,
}

/// Rank 0's passes down the pipeline: how many, and the time from each pass's first message
/// sent to its reply received (a prompt chunk that wants no reply: to its last message sent).
/// Less the other ranks' own busy time ([`StageReport::busy_s`]), what is left is the hops'.
#[derive(Debug, Default, Clone)]
pub struct LinkReport {
    pub passes: usize,
    pub replies: usize,
    /// Replies that were a token the last rank sampled at a temperature ([`Want::Sample`]).
    pub sampled: usize,
    pub round_trip_s: f64,
}

impl Link {
    pub fn new(size: usize, report: Arc<Mutex<LinkReport>>) -> Link {
        Link { size, report }
    }

    fn count(&self, started: Instant, replied: bool, sampled: bool) {
        if let Ok(mut r) = self.report.lock() {
            r.passes += 1;
            r.replies += replied as usize;
            r.sampled += sampled as usize;
            r.round_trip_s += started.elapsed().as_secs_f64();
        }
    }
}

fn compute(e: PipelineError) -> ComputeError {
    ComputeError::Unsupported {
        what: format!("the pipeline failed: {e}"),
    }
}

impl Downstream for Link {
    fn finish(
        &self,
        carry: &Carry,
        offset: usize,
        want: Want,
    ) -> Result<Option<Array>, ComputeError> {
        let shape = carry.h.shape();
        if shape.len() < 3 {
            return Err(compute(PipelineError::Protocol(format!(
                "a hidden state of shape {shape:?}"
            ))));
        }
        let header = forward_header(shape[0], shape[1], want, offset);
        // The round trip starts once this rank's own layers are computed.
        eval_carry(carry).map_err(ComputeError::from)?;
        let started = Instant::now();
        send_carry(header, carry, 1)?;
        if want == Want::Cache {
            self.count(started, false, false);
            return Ok(None);
        }
        // The last rank's reply: rank 0 is its right neighbour.
        let last = self.size - 1;
        let reply = recv_header(last).map_err(compute)?;
        if reply[0] != LOGITS {
            return Err(compute(PipelineError::Protocol(format!(
                "expected logits, got message {}",
                reply[0]
            ))));
        }
        let shape = dims(&reply[1..4]).map_err(compute)?;
        let dtype = Dtype::from_code(reply[4])?;
        let logits = mlx::dist::recv(&shape, dtype, last)?;
        logits.eval()?;
        self.count(started, true, matches!(want, Want::Sample(_)));
        Ok(Some(logits))
    }
}

/// What a stage after the first did, for its stats line.
#[derive(Debug, Default, Clone)]
pub struct StageReport {
    pub forwards: usize,
    pub positions: usize,
    pub busy_s: f64,
}

/// A stage after the first: takes forward passes from the left neighbour until told to stop,
/// runs its layers on each on its own KV cache, and sends the result on (the last stage: the
/// logits back to rank 0). A pass at cache position `offset` first cuts the cache back to
/// `offset` (rank 0 reused a shorter prefix) or starts a fresh one (`offset` 0).
pub fn serve_stage(
    engine: &mut Engine,
    rank: usize,
    size: usize,
) -> Result<StageReport, PipelineError> {
    let (left, right) = ((rank + size - 1) % size, (rank + 1) % size);
    let last = rank + 1 == size;
    let hidden = engine.config().hidden_size;
    let mut kv = KvCache::default();
    let mut report = StageReport::default();
    loop {
        let header = recv_header(left)?;
        match header[0] {
            STOP => {
                if !last {
                    send_stop(right)?;
                }
                return Ok(report);
            }
            FORWARD => {}
            other => {
                return Err(PipelineError::Protocol(format!(
                    "unknown message {other} (header {header:?}, after {} passes)",
                    report.forwards
                )));
            }
        }
        let bl = dims(&header[1..3])?;
        let (b, l) = (bl[0], bl[1]);
        let want = want_of(&header)?;
        let offset = dims(&header[4..5])?[0];
        let carry = recv_carry(&header, hidden, left)?;
        // Busy from the pass's arrival to its result, neither hop counted.
        eval_carry(&carry)?;
        let started = Instant::now();
        if offset == 0 {
            kv = KvCache::default();
        } else if kv.offset() > offset {
            kv.truncate(offset)?;
        } else if kv.offset() < offset {
            return Err(PipelineError::Protocol(format!(
                "rank 0 is at position {offset} and this stage's cache at {}",
                kv.offset()
            )));
        }
        let out = engine.with_parts(|model, store| {
            model.layers_of(Input::Carried(&carry), &mut kv, store, want == Want::Cache)
        })?;
        if !last {
            eval_carry(&out)?;
            report.busy_s += started.elapsed().as_secs_f64();
            send_carry(header, &out, right)?;
        } else if want == Want::Cache {
            mlx::eval(&kv.state())?;
            report.busy_s += started.elapsed().as_secs_f64();
        } else {
            let mut logits = engine.model().logits_of(&out.h, want)?;
            if let Want::Sample(spec) = want {
                logits = sampled(&logits, &spec)?;
            }
            logits.eval()?;
            report.busy_s += started.elapsed().as_secs_f64();
            send_header(reply_header(&logits.shape(), logits.dtype()), right)?;
            send_array(&logits, right)?;
        }
        report.forwards += 1;
        report.positions += b * l;
    }
}

/// The last position's token of `logits` `[B, 1, vocab]` sampled as rank 0's sampler would
/// with `spec` (`sample::pick`, on the host), in the [`Want::Pick`] form `[B, 1, 2]` f32: the
/// id, and the logits' sum (NaN exactly when a logit is NaN: rank 0 then reports it).
fn sampled(logits: &Array, spec: &SampleSpec) -> Result<Array, PipelineError> {
    let s = logits.shape();
    let (b, v) = (s[0], s[s.len() - 1]);
    let host = logits.astype(Dtype::F32)?.to_vec_f32()?;
    let opts = sample::spec_options(spec);
    let u = f64::from_bits(spec.u);
    let mut out = Vec::with_capacity(2 * b);
    for row in host.chunks(v.max(1)) {
        match sample::pick(row, &opts, u) {
            Ok(id) => out.extend([id as f32, 0.0]),
            Err(_) => out.extend([0.0, f32::NAN]),
        }
    }
    Ok(Array::from_slice(&out, &[b, 1, 2])?)
}

/// Evaluates every array of `c` (a pass's input as it arrives, or its output before it goes).
fn eval_carry(c: &Carry) -> Result<(), mlx::Error> {
    let mut all = vec![&c.h];
    all.extend(c.parts.iter().flatten());
    mlx::eval(&all)
}
