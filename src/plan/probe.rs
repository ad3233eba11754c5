//! Compute probe of `flashpack plan`: the runtime's own forward pass, timed on this machine
//! over synthetic weights of the pack's names, shapes and codes.
//!
//! In: [`Facts`] (config, dense tensors, the main expert pool's precision). Out: [`Compute`]:
//! seconds per decoded token and per prompt chunk, with every expert resident (device-side
//! routing) and through a streaming store (routing read on the host per sparse layer, as
//! `StreamingExperts` does before it looks its slots up).
//! How: `Model::load` runs over [`ProbeWeights`], which hands out zeros of each tensor's shape
//! and type, one array shared by every layer whose tensor has the same suffix and shape (memory
//! is one layer of each kind, not the model); [`ProbeStore`] holds a few expert slots of the
//! pack's precision and sends each routed entry to one of them, so every token computes `k`
//! experts as a real one does. Values do not change what MLX computes or reads, so the timing
//! is the model's; the decode loop is `generate`'s pipelined greedy loop.
//! Invariant: nothing is read from disk; MLX memory is about one layer of each kind, the
//! embeddings, the LM head and the slots.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Instant;

use super::model::{DenseShape, Facts};
use super::speed::Compute;
use crate::mlx::{self, Array, Dtype, QuantizedMatrix};
use crate::model::{
    ComputeError, ExpertAct, ExpertBias, ExpertPool, ExpertStore, Model, PoolRoute, Quant, Weights,
};

/// Most prompt tokens of the timed prompt chunk.
pub const CHUNK: usize = 64;
/// Fewest.
pub const MIN_CHUNK: usize = 8;
/// The timed chunk is sized to take about this long.
const PREFILL_BUDGET_S: f64 = 1.5;
/// Prompt tokens before the decode steps.
const WARM: usize = 4;
/// Decode steps timed (after two that are not), fewer when a step is slow.
const STEPS: usize = 12;
/// Stop adding steps once this much time went by (at least three are timed).
const STEP_BUDGET_S: f64 = 1.0;

/// A tensor's layer suffix, shape and type: tensors of one key share an array.
type ShareKey = (String, Vec<usize>, u8);

/// Zeros of the pack's tensors, shared between layers whose tensors match.
struct ProbeWeights<'f> {
    by_name: HashMap<&'f str, &'f DenseShape>,
    made: RefCell<HashMap<ShareKey, Array>>,
}

/// `model.layers.12.mlp.gate.weight` -> `mlp.gate.weight`: tensors that differ only in their
/// layer share an array when their shapes agree.
fn layer_suffix(name: &str) -> &str {
    name.strip_prefix("model.layers.")
        .and_then(|r| r.split_once('.'))
        .map_or(name, |(_, rest)| rest)
}

impl Weights for ProbeWeights<'_> {
    fn get(&self, name: &str) -> Option<Array> {
        let t = self.by_name.get(name)?;
        let key = (
            layer_suffix(name).to_string(),
            t.shape.clone(),
            t.dtype as u8,
        );
        let mut made = self.made.borrow_mut();
        if let Some(a) = made.get(&key) {
            return Some(a.clone());
        }
        let a = Array::zeros(&t.shape, t.dtype).ok()?;
        a.eval().ok()?;
        made.insert(key, a.clone());
        Some(a)
    }

    fn quantization(&self, module: &str) -> Option<Quant> {
        self.by_name.get(format!("{module}.weight").as_str())?.quant
    }
}

/// A few expert slots of one precision; each routed entry goes to one of them.
struct ProbeStore {
    pool: ExpertPool,
    slots: usize,
    /// Read the routing on the host first, as the streaming store does.
    streamed: bool,
    next: u64,
}

impl ProbeStore {
    fn new(facts: &Facts, streamed: bool) -> Result<ProbeStore, ComputeError> {
        let cfg = &facts.cfg;
        let pool = facts.main_pool().ok_or_else(|| ComputeError::Unsupported {
            what: "a pack without experts".into(),
        })?;
        let k = cfg.num_experts_per_tok.max(1);
        let slots = cfg.num_experts.clamp(1, 2 * k);
        let (h, i) = (cfg.expert_hidden_size(), cfg.moe_intermediate_size);
        let g = pool.group_size as usize;
        let matrix = |bits: u8, out: usize, inp: usize| -> Result<QuantizedMatrix, ComputeError> {
            let words = inp * bits as usize / 32;
            let groups = inp / g.max(1);
            let affine = pool.mode.has_biases();
            let sd = if affine { pool.scale_dtype } else { Dtype::U8 };
            let weight = Array::zeros(&[slots, out, words], Dtype::U32)?;
            let scales = Array::zeros(&[slots, out, groups], sd)?;
            let biases = if affine {
                Some(Array::zeros(&[slots, out, groups], sd)?)
            } else {
                None
            };
            Ok(QuantizedMatrix {
                weight,
                scales,
                biases,
                group_size: pool.group_size as i32,
                bits: bits as i32,
                mode: pool.mode,
            })
        };
        let mut p = ExpertPool::swiglu(
            matrix(pool.bits.get(0), i, h)?,
            matrix(pool.bits.get(1), i, h)?,
            matrix(pool.bits.get(2), h, i)?,
        );
        p.act = ExpertAct::of(cfg);
        if cfg.expert_bias {
            p.bias = Some(ExpertBias {
                gate: Array::zeros(&[slots, i], pool.scale_dtype)?,
                up: Array::zeros(&[slots, i], pool.scale_dtype)?,
                down: Array::zeros(&[slots, h], pool.scale_dtype)?,
            });
        }
        let mut all = vec![&p.gate.weight, &p.gate.scales, &p.up.weight, &p.down.weight];
        all.extend([&p.up.scales, &p.down.scales]);
        mlx::eval(&all)?;
        Ok(ProbeStore {
            pool: p,
            slots,
            streamed,
            next: 0x9e37_79b9_7f4a_7c15,
        })
    }
}

impl ExpertStore for ProbeStore {
    fn route(
        &mut self,
        _layer: usize,
        indices: &Array,
    ) -> Result<Vec<PoolRoute<'_>>, ComputeError> {
        if self.streamed {
            // The streaming store's one sync point per sparse layer: the routing on the host.
            mlx::eval(&[indices])?;
            indices.to_vec::<u32>()?;
        }
        let shape = indices.shape();
        let k = shape.last().copied().unwrap_or(1).max(1);
        let n: usize = shape.iter().product();
        // Distinct slots per token, starting where a counter says (any spread will do: the
        // cost of an expert does not depend on which one it is).
        let mut ids = Vec::with_capacity(n);
        for t in 0..n / k {
            self.next = self
                .next
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407 + t as u64);
            let base = (self.next >> 33) as usize;
            ids.extend((0..k).map(|j| ((base + j) % self.slots) as u32));
        }
        let slots = Array::from_slice(&ids, &shape)?;
        Ok(vec![PoolRoute {
            pool: &self.pool,
            slots,
            serves: None,
        }])
    }

    fn eager(&self) -> bool {
        self.streamed
    }
}

/// Median of `v` (not empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A prompt of `n` token ids.
fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| (i * 7919 % vocab.max(1)) as u32).collect()
}

/// Prefills `ids` on a fresh cache and picks the next token: the cache, the token (lazy) and
/// the seconds it took.
fn prefill(
    model: &Model,
    store: &mut ProbeStore,
    ids: &[u32],
) -> Result<(crate::model::KvCache, Array, f64), ComputeError> {
    let mut kv = model.new_cache();
    let t = Instant::now();
    if ids.len() > 1 {
        model.prefill_ids(&ids[..ids.len() - 1], &mut kv, store)?;
    }
    let logits = model.forward_last_ids(&ids[ids.len() - 1..], &mut kv, store)?;
    let y = logits.argmax(-1)?;
    y.to_vec::<u32>()?;
    Ok((kv, y, t.elapsed().as_secs_f64()))
}

/// Seconds of one decoded token through `store`, `generate`'s pipelined greedy loop: step
/// `t + 1` is scheduled before token `t` is read. The first two steps are not timed.
fn decode_step(model: &Model, store: &mut ProbeStore, vocab: usize) -> Result<f64, ComputeError> {
    let (mut kv, mut y, _) = prefill(model, store, &prompt(WARM, vocab))?;
    let mut steps = Vec::new();
    let started = Instant::now();
    for step in 0..STEPS + 2 {
        let t = Instant::now();
        let logits = model.forward_last(&y, &mut kv, store)?;
        let next = logits.argmax(-1)?;
        mlx::async_eval(&[&next])?;
        y.to_vec::<u32>()?;
        y = next;
        if step >= 2 {
            steps.push(t.elapsed().as_secs_f64());
            if started.elapsed().as_secs_f64() > STEP_BUDGET_S && steps.len() >= 3 {
                break;
            }
        }
    }
    y.to_vec::<u32>()?;
    Ok(median(steps))
}

/// Times the model of `facts` on this machine (see the module doc). The prompt chunk is as
/// long as [`PREFILL_BUDGET_S`] allows at the decode speed (between [`MIN_CHUNK`] and
/// [`CHUNK`] tokens). A streamed prompt chunk is taken to cost what a resident one does plus
/// what streaming adds to a decoded token (one routing read per sparse layer and call).
pub fn measure(facts: &Facts) -> Result<Compute, ComputeError> {
    let weights = ProbeWeights {
        by_name: facts.dense.iter().map(|t| (t.name.as_str(), t)).collect(),
        made: RefCell::new(HashMap::new()),
    };
    let model = Model::load(&facts.cfg, &weights)?;
    let vocab = facts.cfg.vocab_size;
    let mut resident = ProbeStore::new(facts, false)?;
    let decode_s = decode_step(&model, &mut resident, vocab)?;
    let chunk = ((PREFILL_BUDGET_S / decode_s.max(1e-6)) as usize).clamp(MIN_CHUNK, CHUNK);
    let (_, _, prefill_s) = prefill(&model, &mut resident, &prompt(chunk, vocab))?;
    drop(resident);
    let mut streamed = ProbeStore::new(facts, true)?;
    let streamed_decode_s = decode_step(&model, &mut streamed, vocab)?;
    Ok(Compute {
        decode_s,
        streamed_decode_s,
        prefill_s,
        streamed_prefill_s: prefill_s + (streamed_decode_s - decode_s).max(0.0),
        chunk_tokens: chunk,
    })
}
