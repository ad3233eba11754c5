//! Profile stage: how the source model's routers use each expert on calibration text, and the
//! per-expert bit plan chosen from it.
//!
//! In: an opened [`Checkpoint`] with its tokenizer, calibration texts by task (the built-in set
//! of prose, code, math and chat in `fixtures/calibration/`, or `--calibration FILE`).
//! Out: a [`Profile`]: per sparse layer, how often each expert is selected (`counts`), the
//! routing weight it receives (`mass`), which experts are selected together for one token
//! (`coactivation`) and which expert of the next sparse layer follows (`transitions`), overall
//! and per task, and every token's top-k in text order (`trace`); stored in the pack as
//! metadata `profile` (formats/flashpack-v1.md §4.3).
//! [`plan_bits`] turns it into bits per (layer, expert): the experts with the least routing
//! mass go cold.
//!
//! How it runs: the source itself, layer by layer ([`profile`]). Every calibration window's
//! residual stream goes through layer 0, then layer 1, and so on; a layer's dense tensors are
//! widened to f32 when it starts and dropped when it ends, and its experts are applied one at a
//! time in f32 straight from the mapped source ([`crate::convert::source::StreamedExperts`]), to
//! the tokens routed to them, in chunks of windows sized so that activations stay within a few
//! experts' bytes. Memory is one layer's dense tensors, one expert, the residual stream of the
//! calibration tokens and one chunk's activations: it does not grow with the number of layers
//! or experts, and stays below what convert itself holds (docs/benchmarks.md, "Quality").
//! Invariant: counts are exact integers from the router's top-k; the profile depends only on
//! the source, the texts and the window, never on thread count or timing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Value};

use super::load::Checkpoint;
use super::ConvertError;
use crate::convert::source::{embed_windows, SourceWeights, StreamedExperts};
use crate::mlx::{self, Array};
use crate::model::{Block, ComputeError, ExpertStore, HcState, PoolRoute, ResidualBlocks, Routing};

/// One task's calibration text.
#[derive(Clone, Debug)]
pub struct CalibrationText {
    pub task: String,
    pub text: String,
}

/// The built-in calibration set: prose, code, math, chat (see fixtures/calibration/README.md).
pub fn builtin_calibration() -> Vec<CalibrationText> {
    [
        (
            "prose",
            include_str!("../../fixtures/calibration/prose.txt"),
        ),
        ("code", include_str!("../../fixtures/calibration/code.txt")),
        ("math", include_str!("../../fixtures/calibration/math.txt")),
        ("chat", include_str!("../../fixtures/calibration/chat.txt")),
    ]
    .into_iter()
    .map(|(task, text)| CalibrationText {
        task: task.into(),
        text: text.into(),
    })
    .collect()
}

/// A calibration file: one task, named after the file's stem.
pub fn read_calibration(path: &Path) -> Result<Vec<CalibrationText>, ConvertError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConvertError::Io {
        path: path.display().to_string(),
        source,
    })?;
    if text.trim().is_empty() {
        return Err(ConvertError::Calibration {
            what: format!("{} is empty; give a file with text", path.display()),
        });
    }
    let task = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "calibration".into());
    Ok(vec![CalibrationText { task, text }])
}

/// What the profile stage does and what the plan asks for.
#[derive(Clone, Debug, Default)]
pub struct PlanOptions {
    /// Profile even when no option needs it (to store the profile in the pack).
    pub profile: bool,
    /// Calibration text instead of the built-in set.
    pub calibration: Option<PathBuf>,
    /// Tokens per calibration window (0: 256, capped by the context length).
    pub window: usize,
    /// Merge this fraction of each layer's experts into others (needs the profile).
    pub merge_ratio: Option<f64>,
    /// After writing, evaluate the pack against the source on this text (convert report).
    pub eval_text: Option<PathBuf>,
}

/// Usage statistics of one sparse layer (empty for dense layers).
#[derive(Clone, Debug, Default, Serialize)]
pub struct LayerProfile {
    pub counts: Vec<u64>,
    pub mass: Vec<f64>,
    /// `coactivation[a][b]`: tokens for which a and b (a != b) were both selected.
    pub coactivation: Vec<Vec<u64>>,
    /// `transitions[a][b]`: tokens that selected a here and b in the next sparse layer.
    pub transitions: Vec<Vec<u64>>,
}

/// Counts and mass of one task.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TaskProfile {
    pub tokens: u64,
    pub layers: Vec<TaskLayer>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TaskLayer {
    pub counts: Vec<u64>,
    pub mass: Vec<f64>,
}

/// The whole profile; `layers[l]` is model layer `l`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Profile {
    pub tokens: u64,
    pub window: usize,
    pub top_k: usize,
    /// How the source ran: "f32 dense, 8-bit group-32 experts" or the source's own codes.
    pub method: String,
    pub layers: Vec<LayerProfile>,
    pub tasks: BTreeMap<String, TaskProfile>,
    /// Per sparse layer, the router's top-k ids of every calibration token in text order (`k`
    /// per token): the routing trace `flashpack plan` replays through the runtime's expert
    /// cache (metadata `profile.trace`, formats/flashpack-v1.md §4.3).
    #[serde(skip)]
    pub trace: BTreeMap<usize, Vec<u32>>,
    /// The calibration tokens the trace keeps ([`trace_spans`]).
    #[serde(skip)]
    pub trace_spans: Vec<std::ops::Range<usize>>,
}

/// Most calibration tokens a routing trace keeps: a replay of more learns little more, and a
/// long `--calibration` file would otherwise make the metadata and the profile's memory grow
/// with it (4,096 tokens of a 61-layer top-8 model: 4 MB of ids, 5.3 MB in the metadata).
pub const MAX_TRACE_TOKENS: usize = 4096;

/// Which of `total` calibration tokens the trace keeps: all of them up to `max`, else runs of
/// `block` consecutive tokens (a window: consecutive tokens are what a cache's hits depend
/// on) spread evenly over the text, `max` tokens in all.
pub fn trace_spans(total: usize, block: usize, max: usize) -> Vec<std::ops::Range<usize>> {
    if total <= max {
        return std::iter::once(0..total).collect();
    }
    let block = block.clamp(1, max.max(1));
    let runs = (max / block).max(1);
    let stride = total / runs;
    (0..runs)
        .map(|i| i * stride..(i * stride + block).min(total))
        .collect()
}

impl Profile {
    fn new(layers: usize, sparse: &[usize], experts: usize, top_k: usize) -> Profile {
        let mut p = Profile {
            top_k,
            layers: vec![LayerProfile::default(); layers],
            ..Profile::default()
        };
        for &l in sparse {
            p.layers[l] = LayerProfile {
                counts: vec![0; experts],
                mass: vec![0.0; experts],
                coactivation: vec![vec![0; experts]; experts],
                transitions: vec![vec![0; experts]; experts],
            };
        }
        p
    }

    /// Share of its layer's routing mass for each expert of `layer` (0 when nothing routed).
    pub fn mass_share(&self, layer: usize) -> Vec<f64> {
        let m = &self.layers[layer].mass;
        let total: f64 = m.iter().sum();
        m.iter()
            .map(|x| if total > 0.0 { x / total } else { 0.0 })
            .collect()
    }

    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Some(trace) = self.trace_json() {
            v["trace"] = trace;
        }
        v
    }

    /// `{k, tokens, ids: "u16le", layers: {layer: base64 of the ids}}`; `None` without a
    /// trace, or where an id does not fit 16 bits.
    fn trace_json(&self) -> Option<Value> {
        use base64::Engine;
        let tokens = self.trace.values().next()?.len() / self.top_k.max(1);
        let mut layers = serde_json::Map::new();
        for (l, ids) in &self.trace {
            let mut bytes = Vec::with_capacity(ids.len() * 2);
            for &id in ids {
                bytes.extend_from_slice(&u16::try_from(id).ok()?.to_le_bytes());
            }
            let text = base64::engine::general_purpose::STANDARD.encode(bytes);
            layers.insert(l.to_string(), Value::String(text));
        }
        Some(json!({"k": self.top_k, "tokens": tokens, "ids": "u16le", "layers": layers}))
    }
}

/// An [`ExpertStore`] that records the router's choices and passes them on. One sparse layer
/// at a time, its tokens in one or more calls (chunks), in order.
struct Recorder<'a, 'c> {
    inner: &'a mut StreamedExperts<'c>,
    profile: &'a mut Profile,
    /// Task names, and the task of each calibration token.
    tasks: &'a [String],
    token_task: &'a [usize],
    /// The first token of the next call.
    row0: usize,
    /// The previous sparse layer and its top-k ids for every token (row-major, k per token).
    prev: Option<(usize, Vec<u32>)>,
    /// This layer's top-k ids so far.
    cur: Vec<u32>,
}

impl Recorder<'_, '_> {
    /// Starts a layer: what the last one chose becomes `prev`.
    fn next_layer(&mut self, finished: Option<usize>) {
        if let Some(l) = finished {
            self.prev = Some((l, std::mem::take(&mut self.cur)));
        }
        self.cur.clear();
        self.row0 = 0;
    }

    fn record(&mut self, layer: usize, ids: &[u32], scores: &[f32]) {
        let k = self.profile.top_k.max(1);
        let n = self.profile.layers[layer].counts.len();
        let layers = self.profile.layers.len();
        let last_sparse = self
            .profile
            .layers
            .iter()
            .rposition(|l| !l.counts.is_empty())
            .unwrap_or(0);
        let rows = ids.len() / k;
        for (row, (r_ids, r_scores)) in ids.chunks(k).zip(scores.chunks(k)).enumerate() {
            let at = self.row0 + row;
            let name = &self.tasks[self.token_task.get(at).copied().unwrap_or(0)];
            let task = self.profile.tasks.entry(name.clone()).or_default();
            if task.layers.len() < layers {
                task.layers.resize(layers, TaskLayer::default());
            }
            let tl = &mut task.layers[layer];
            if tl.counts.len() != n {
                tl.counts = vec![0; n];
                tl.mass = vec![0.0; n];
            }
            if layer == last_sparse {
                task.tokens += 1;
            }
            let lp = &mut self.profile.layers[layer];
            for (j, (&e, &s)) in r_ids.iter().zip(r_scores).enumerate() {
                let e = e as usize;
                if e >= n {
                    continue;
                }
                lp.counts[e] += 1;
                lp.mass[e] += s as f64;
                tl.counts[e] += 1;
                tl.mass[e] += s as f64;
                for &other in &r_ids[j + 1..] {
                    let o = other as usize;
                    if o < n && o != e {
                        lp.coactivation[e][o] += 1;
                        lp.coactivation[o][e] += 1;
                    }
                }
            }
            if let Some((prev, prev_ids)) = &self.prev {
                if let Some(a_row) = prev_ids.get(at * k..(at + 1) * k) {
                    let pl = &mut self.profile.layers[*prev];
                    for &a in a_row {
                        for &b in r_ids {
                            if (a as usize) < n && (b as usize) < n {
                                pl.transitions[a as usize][b as usize] += 1;
                            }
                        }
                    }
                }
            }
        }
        if layer == last_sparse {
            self.profile.tokens += rows as u64;
        }
        self.cur.extend_from_slice(ids);
        let trace = self.profile.trace.entry(layer).or_default();
        for (row, r_ids) in ids.chunks(k).enumerate() {
            let at = self.row0 + row;
            if self.profile.trace_spans.iter().any(|s| s.contains(&at)) {
                trace.extend_from_slice(r_ids);
            }
        }
        self.row0 += rows;
    }
}

impl ExpertStore for Recorder<'_, '_> {
    fn route(&mut self, layer: usize, indices: &Array) -> Result<Vec<PoolRoute<'_>>, ComputeError> {
        self.inner.route(layer, indices)
    }

    fn mix(
        &mut self,
        layer: usize,
        x: &Array,
        routing: &Routing,
    ) -> Result<Option<Array>, ComputeError> {
        mlx::eval(&[&routing.indices, &routing.scores])?;
        let ids = routing.indices.to_vec::<u32>()?;
        let scores = routing.scores.to_vec_f32()?;
        self.record(layer, &ids, &scores);
        self.inner.mix(layer, x, routing)
    }
}

fn compute_err(e: ComputeError) -> ConvertError {
    ConvertError::Compute {
        stage: "the profile stage (running the model on the calibration text)".into(),
        source: Box::new(e),
    }
}

/// Keeps the profile's memory from outliving it, so the stages after it run in the resident
/// set a plain conversion has. While alive: MLX's buffer cache is off (the per-expert
/// temporaries come in many sizes, and a cache would keep the largest of each), and on glibc
/// buffers of 128 KiB and more get their own mappings, returned to the system when freed
/// (glibc otherwise raises that threshold to the largest buffer freed so far, and activations
/// would be carved from the heap, fragmenting it for the stages that follow). On drop: MLX's
/// cache limit is restored and free heap pages go back to the system.
struct ProfileMemory {
    mlx_cache_limit: usize,
}

impl ProfileMemory {
    fn new() -> ProfileMemory {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt changes an allocation threshold; it touches no live data.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        }
        ProfileMemory {
            mlx_cache_limit: mlx::set_cache_limit(0),
        }
    }
}

impl Drop for ProfileMemory {
    fn drop(&mut self) {
        mlx::set_cache_limit(self.mlx_cache_limit);
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim returns free heap pages to the kernel; it touches no live data.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Runs `texts` through the source and records the routing of every sparse layer.
///
/// Layer by layer: every calibration window's hidden state goes through layer 0, then layer 1,
/// and so on. Only one layer's dense tensors are held (in f32), and its experts are applied
/// one at a time from the source ([`StreamedExperts`]), so memory is one layer's dense weights,
/// one expert and the activations of the calibration text, whatever the size of the model.
pub fn profile(
    ck: &Checkpoint,
    texts: &[CalibrationText],
    window: usize,
) -> Result<Profile, ConvertError> {
    let _memory = ProfileMemory::new();
    let c = &ck.config;
    let tok_path = ck.root().join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(ConvertError::Tokenizer {
            what: format!(
                "profiling needs the source's tokenizer.json ({} is missing); copy the model's \
                 tokenizer.json into the folder, or convert without quality options",
                tok_path.display()
            ),
            source: None,
        });
    }
    let tok = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| ConvertError::Tokenizer {
        what: format!("{} cannot be loaded", tok_path.display()),
        source: Some(e),
    })?;
    let mut window = if window == 0 { 256 } else { window };
    if let Some(ctx) = c.max_position_embeddings {
        window = window.min(ctx.max(2));
    }
    let mut p = Profile::new(
        c.num_hidden_layers,
        &c.sparse_layers(),
        c.num_experts,
        c.num_experts_per_tok,
    );
    p.window = window;
    p.method = if ck.mlx_quantization.is_some() {
        "dense weights as the source's MLX codes, experts dequantized to f32, one at a time".into()
    } else {
        "dense weights and experts in f32, layer by layer, one expert at a time".into()
    };

    // The calibration windows (task, ids), in order.
    let mut tasks: Vec<String> = Vec::new();
    let mut windows: Vec<(usize, Vec<u32>)> = Vec::new();
    for t in texts {
        let ids = tok
            .encode(t.text.as_str(), false)
            .map_err(|e| ConvertError::Tokenizer {
                what: format!("the tokenizer cannot encode calibration text {}", t.task),
                source: Some(e),
            })?
            .get_ids()
            .to_vec();
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= c.vocab_size) {
            return Err(ConvertError::Tokenizer {
                what: format!(
                    "the tokenizer produced id {bad}, outside the model's vocabulary of {}; the \
                     folder's tokenizer.json is not this model's",
                    c.vocab_size
                ),
                source: None,
            });
        }
        let task = tasks.iter().position(|n| *n == t.task).unwrap_or_else(|| {
            tasks.push(t.task.clone());
            tasks.len() - 1
        });
        windows.extend(ids.chunks(window).map(|w| (task, w.to_vec())));
    }
    // The tokenizer's tables are not needed past this point.
    drop(tok);
    let token_task: Vec<usize> = windows
        .iter()
        .flat_map(|(t, w)| std::iter::repeat_n(*t, w.len()))
        .collect();
    if token_task.is_empty() {
        return Err(ConvertError::Calibration {
            what: "the calibration text has no tokens".into(),
        });
    }
    p.trace_spans = trace_spans(token_task.len(), window, MAX_TRACE_TOKENS);

    let h = c.hidden_size;
    // The residual stream of every window, [1, len, H], evaluated.
    let ws: Vec<&[u32]> = windows.iter().map(|(_, w)| w.as_slice()).collect();
    let mut hs = embed_windows(ck, &ws).map_err(compute_err)?;
    // DeepSeek-V4.1: each window's streams and what its layers share, carried layer to layer.
    let mut hcs: Vec<HcState> = if c.hyper_connections.is_some() {
        hs.iter()
            .map(|x| HcState::new(c, x, 0, 0))
            .collect::<Result<_, _>>()
            .map_err(compute_err)?
    } else {
        Vec::new()
    };
    // Kimi-K3: each window's attention-residual blocks, carried layer to layer.
    let mut blocks: Vec<Option<ResidualBlocks>> = hs
        .iter()
        .map(|_| {
            c.attn_res_block_size
                .map(|_| ResidualBlocks::new(c.rms_norm_eps))
        })
        .collect();
    let mut experts = StreamedExperts::new(ck);
    let mut rec = Recorder {
        inner: &mut experts,
        profile: &mut p,
        tasks: &tasks,
        token_task: &token_task,
        row0: 0,
        prev: None,
        cur: Vec::new(),
    };
    // Windows per feed-forward call: activations of at most `chunk_tokens` tokens at a time.
    let chunks = group_windows(&windows, chunk_tokens(ck));
    for l in 0..c.num_hidden_layers {
        let prefix = format!("model.layers.{l}.");
        let weights =
            SourceWeights::load_where(ck, &|n| n.starts_with(&prefix)).map_err(compute_err)?;
        let block = Block::load(c, &weights, l).map_err(compute_err)?;
        let layer = |hs: &mut [Array],
                     blocks: &mut [Option<ResidualBlocks>],
                     rec: &mut Recorder|
         -> Result<(), ComputeError> {
            for (x, b) in hs.iter_mut().zip(blocks.iter_mut()) {
                let len = x.dim(1).unwrap_or(0);
                let mut kv = block.new_cache();
                // A sliding-window layer's mask depends on its cache (a window past its size).
                let mask = kv.mask(len)?;
                let y = block.attend(x, mask.as_mask(), &mut kv, b.as_mut())?;
                y.eval()?;
                *x = y;
            }
            for range in &chunks {
                let part = &mut hs[range.clone()];
                let part_blocks = &blocks[range.clone()];
                let x = {
                    let xs = part
                        .iter()
                        .zip(part_blocks)
                        .map(|(x, b)| {
                            Ok(block.ffn_input(x, b.as_ref())?.reshape(&[-1, h as i32])?)
                        })
                        .collect::<Result<Vec<Array>, ComputeError>>()?;
                    let refs: Vec<&Array> = xs.iter().collect();
                    let x = mlx::concatenate(&refs, 0)?;
                    x.eval()?;
                    x
                };
                let y = block.ffn(&x, rec)?;
                drop(x);
                y.eval()?;
                let mut at = 0i32;
                for x in part.iter_mut() {
                    let len = x.dim(1).unwrap_or(0) as i32;
                    let r = y
                        .slice(&[at, 0], &[at + len, h as i32])?
                        .reshape(&[1, len, h as i32])?
                        .astype(x.dtype())?;
                    let next = x.add(&r)?;
                    next.eval()?;
                    *x = next;
                    at += len;
                }
            }
            Ok(())
        };
        // The same steps on hyper-connected streams: attention per window (a fresh cache, the
        // shared state kept in its `HcState`), then the feed-forward over chunks of windows.
        let hc_layer = |sts: &mut [HcState], rec: &mut Recorder| -> Result<(), ComputeError> {
            for st in sts.iter_mut() {
                let mut kv = block.new_cache();
                block.hc_attend(st, &mut kv, l)?;
                mlx::eval(&[st.streams()])?;
            }
            for range in &chunks {
                let part = &mut sts[range.clone()];
                let mut lens = Vec::with_capacity(part.len());
                let xs = part
                    .iter_mut()
                    .map(|st| {
                        let x = block.hc_ffn_input(st)?;
                        lens.push(x.dim(1).unwrap_or(0) as i32);
                        Ok(x.reshape(&[-1, h as i32])?)
                    })
                    .collect::<Result<Vec<Array>, ComputeError>>()?;
                let refs: Vec<&Array> = xs.iter().collect();
                let x = mlx::concatenate(&refs, 0)?;
                x.eval()?;
                let y = block.ffn(&x, rec)?;
                drop(x);
                y.eval()?;
                let mut at = 0i32;
                for (st, len) in part.iter_mut().zip(lens) {
                    let r = y
                        .slice(&[at, 0], &[at + len, h as i32])?
                        .reshape(&[1, len, h as i32])?
                        .astype(xs[0].dtype())?;
                    block.hc_ffn_done(st, &r)?;
                    mlx::eval(&[st.streams()])?;
                    at += len;
                }
            }
            Ok(())
        };
        if hcs.is_empty() {
            layer(&mut hs, &mut blocks, &mut rec).map_err(compute_err)?;
        } else {
            hc_layer(&mut hcs, &mut rec).map_err(compute_err)?;
        }
        rec.next_layer(c.is_sparse_layer(l).then_some(l));
    }
    drop(rec);
    Ok(p)
}

/// Calibration tokens per feed-forward call of the profile: as many as keep the call's
/// activations (input, output and the per-expert temporaries, about four f32 copies of
/// `[tokens, hidden]`) within the bytes of 8 source experts (the least convert itself holds at
/// once: a window of `4 x threads`, at least 8), and at least 256. Each call reads the experts
/// its tokens route to, so fewer, larger calls read less. It depends on the model's shape
/// alone, never on the machine, so the profile (and the pack) does not either.
fn chunk_tokens(ck: &Checkpoint) -> usize {
    let c = &ck.config;
    let expert_bytes = 3 * c.expert_hidden_size() * c.moe_intermediate_size * 2;
    let per_token = 4 * c.hidden_size * 4;
    (8 * expert_bytes / per_token.max(1)).max(256)
}

/// Consecutive windows grouped so that each group holds at most `max_tokens` tokens (a longer
/// window stands alone).
fn group_windows(windows: &[(usize, Vec<u32>)], max_tokens: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut tokens) = (0, 0);
    for (i, (_, w)) in windows.iter().enumerate() {
        if i > start && tokens + w.len() > max_tokens {
            out.push(start..i);
            (start, tokens) = (i, 0);
        }
        tokens += w.len();
    }
    if start < windows.len() {
        out.push(start..windows.len());
    }
    out
}

/// Bits per (layer, expert): `layers[l][e]`; dense layers have an empty list.
pub type BitPlan = Vec<Vec<u8>>;

/// Stored bytes of one expert at `bits` before entropy coding: codes, scales and biases of
/// gate, up and down.
pub fn expert_bytes(hidden: usize, inter: usize, bits: u8, group: usize, scale_size: usize) -> u64 {
    let w = (hidden * inter) as u64;
    3 * (w * bits as u64 / 8 + 2 * (w / group as u64) * scale_size as u64)
}

/// What the plan should achieve.
#[derive(Clone, Copy, Debug)]
pub enum ColdTarget {
    /// This fraction of all experts (rounded) goes cold.
    Fraction(f64),
    /// Cold experts until dense + experts fit this many bytes.
    Bytes { target: u64, dense: u64 },
}

/// Experts ordered coldest first: least share of their layer's routing mass, then fewest
/// selections, then (layer, expert) so the order is total and deterministic.
pub fn coldest_first(p: &Profile, sparse: &[usize]) -> Vec<(usize, usize)> {
    let mut all: Vec<(f64, u64, usize, usize)> = Vec::new();
    for &l in sparse {
        let share = p.mass_share(l);
        for (e, s) in share.iter().enumerate() {
            all.push((*s, p.layers[l].counts[e], l, e));
        }
    }
    all.sort_by(|a, b| {
        a.0.total_cmp(&b.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    all.into_iter().map(|(_, _, l, e)| (l, e)).collect()
}

/// Chooses hot or cold bits per expert from the profile. `excluded` experts (merged away) are
/// not stored, so they neither count toward the size nor take a cold slot.
#[allow(clippy::too_many_arguments)]
pub fn plan_bits(
    p: &Profile,
    sparse: &[usize],
    layers: usize,
    experts: usize,
    hot: u8,
    cold: u8,
    target: ColdTarget,
    one_expert: impl Fn(u8) -> u64,
    excluded: &dyn Fn(usize, usize) -> bool,
) -> Result<BitPlan, ConvertError> {
    let mut plan: BitPlan = vec![Vec::new(); layers];
    for &l in sparse {
        plan[l] = vec![hot; experts];
    }
    let order: Vec<(usize, usize)> = coldest_first(p, sparse)
        .into_iter()
        .filter(|&(l, e)| !excluded(l, e))
        .collect();
    match target {
        ColdTarget::Fraction(f) => {
            if !(0.0..=1.0).contains(&f) {
                return Err(ConvertError::BadOption {
                    option: "--cold-fraction",
                    value: f.to_string(),
                    why: "give a fraction between 0 and 1".into(),
                });
            }
            let n = (f * order.len() as f64).round() as usize;
            for &(l, e) in &order[..n] {
                plan[l][e] = cold;
            }
        }
        ColdTarget::Bytes { target, dense } => {
            let (hb, cb) = (one_expert(hot), one_expert(cold));
            let mut size = dense + hb * order.len() as u64;
            let mut cold_n = 0;
            while size > target && cold_n < order.len() {
                let (l, e) = order[cold_n];
                plan[l][e] = cold;
                size = size - hb + cb;
                cold_n += 1;
            }
            if size > target {
                return Err(ConvertError::BadOption {
                    option: "--target-size",
                    value: format!("{:.4} GB", target as f64 / 1e9),
                    why: format!(
                        "cannot be reached: with every expert at {cold} bits the weights take \
                         {:.4} GB; lower --dense-bits or raise the target",
                        size as f64 / 1e9
                    ),
                });
            }
        }
    }
    Ok(plan)
}

/// The plan as metadata `quantization.expert_plan` (one array per layer).
pub fn plan_json(plan: &BitPlan) -> Value {
    json!(plan)
}

/// Whether the options need the profile stage.
pub fn needed(opts: &super::ConvertOptions) -> bool {
    opts.plan.profile
        || opts.plan.calibration.is_some()
        || opts.cold_fraction.is_some()
        || opts.target_size_gb.is_some()
        || opts.merge_threshold.is_some()
        || opts.plan.merge_ratio.is_some()
}

/// The profile stage of convert: `None` when no option needs it.
pub fn stage(
    ck: &Checkpoint,
    opts: &super::ConvertOptions,
) -> Result<Option<Profile>, ConvertError> {
    if !needed(opts) {
        return Ok(None);
    }
    let texts = match &opts.plan.calibration {
        Some(path) => read_calibration(path)?,
        None => builtin_calibration(),
    };
    profile(ck, &texts, opts.plan.window).map(Some)
}

/// The bit plan the options ask for, or `None` for uniform `expert_bits`. `dense` is the bytes
/// of the dense tensors as stored before entropy coding; `excluded` experts are not stored.
pub fn bit_plan(
    ck: &Checkpoint,
    opts: &super::ConvertOptions,
    profile: Option<&Profile>,
    dense: u64,
    excluded: &dyn Fn(usize, usize) -> bool,
) -> Result<Option<BitPlan>, ConvertError> {
    let target = match (opts.cold_fraction, opts.target_size_gb) {
        (Some(f), _) => ColdTarget::Fraction(f),
        (None, Some(gb)) => ColdTarget::Bytes {
            target: (gb * 1e9) as u64,
            dense,
        },
        (None, None) => return Ok(None),
    };
    let p = profile.ok_or_else(|| ConvertError::Internal {
        what: "mixed precision was planned without a profile".into(),
    })?;
    let c = &ck.config;
    let scale_size = c
        .sparse_layers()
        .first()
        .and_then(|&l| ck.expert(l, 0).ok())
        .map(|x| match x.gate {
            super::quantize::ProjSource::Float(m) => m.dtype.size(),
            super::quantize::ProjSource::Quantized(q)
            | super::quantize::ProjSource::Interleaved { all: q, .. } => q.scale_dtype.size(),
        })
        .unwrap_or(2);
    let (h, i, g) = (
        c.expert_hidden_size(),
        c.moe_intermediate_size,
        opts.group_size,
    );
    plan_bits(
        p,
        &c.sparse_layers(),
        c.num_hidden_layers,
        c.num_experts,
        opts.expert_bits,
        opts.cold_bits.unwrap_or(2),
        target,
        |b| expert_bytes(h, i, b, g, scale_size),
        excluded,
    )
    .map(Some)
}

/// What `flashpack inspect` shows of a pack's profile.
#[derive(Clone, Debug, Serialize)]
pub struct ProfileView {
    pub tokens: u64,
    /// Tokens per calibration task.
    pub tasks: BTreeMap<String, u64>,
    pub layers: Vec<LayerView>,
}

/// One sparse layer of [`ProfileView`].
#[derive(Clone, Debug, Serialize)]
pub struct LayerView {
    pub layer: usize,
    /// Share of the routing mass that goes to the hottest quarter of the experts.
    pub top_quarter_share: f64,
    /// exp(entropy) of the mass shares: how many experts the layer effectively uses.
    pub effective_experts: f64,
    /// The four hottest experts and their mass shares.
    pub hottest: Vec<(usize, f64)>,
    /// Experts stored at fewer bits than the layer's most, and experts merged away.
    pub cold: usize,
    pub merged: usize,
}

/// Summarizes metadata `profile` (with `quantization.expert_plan` and `merge_map` if present).
pub fn view(meta: &crate::format::Metadata) -> Option<ProfileView> {
    let p = meta.profile()?;
    let plan = meta.quantization.expert_plan.as_ref();
    let merge = meta.merge_map.as_ref();
    let mut out = Vec::new();
    for (l, mass) in meta.profile_mass().into_iter().enumerate() {
        let mass: Vec<f64> = match mass {
            Some(m) if !m.is_empty() => m,
            _ => continue,
        };
        let total: f64 = mass.iter().sum();
        let share: Vec<f64> = mass
            .iter()
            .map(|m| if total > 0.0 { m / total } else { 0.0 })
            .collect();
        let mut order: Vec<usize> = (0..share.len()).collect();
        order.sort_by(|&a, &b| share[b].total_cmp(&share[a]).then(a.cmp(&b)));
        let quarter = share.len().div_ceil(4);
        let entropy: f64 = share
            .iter()
            .filter(|&&s| s > 0.0)
            .map(|&s| -s * s.ln())
            .sum();
        let cold = plan.and_then(|p| p.get(l)).map_or(0, |bits| {
            let max = bits.iter().copied().max().unwrap_or(0);
            bits.iter().filter(|&&b| b < max).count()
        });
        let merged = merge.and_then(|m| m.get(l)).map_or(0, |m| {
            m.iter()
                .enumerate()
                .filter(|&(e, &s)| s as usize != e)
                .count()
        });
        out.push(LayerView {
            layer: l,
            top_quarter_share: order[..quarter].iter().map(|&e| share[e]).sum(),
            effective_experts: entropy.exp(),
            hottest: order.iter().take(4).map(|&e| (e, share[e])).collect(),
            cold,
            merged,
        });
    }
    let tasks = p
        .get("tasks")
        .and_then(Value::as_object)
        .map(|t| {
            t.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.get("tokens").and_then(Value::as_u64).unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Some(ProfileView {
        tokens: p.get("tokens").and_then(Value::as_u64).unwrap_or(0),
        tasks,
        layers: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;

    #[test]
    fn a_long_calibration_text_keeps_whole_windows_spread_over_it() {
        let whole: Vec<std::ops::Range<usize>> = std::iter::once(0..1150).collect();
        assert_eq!(trace_spans(1150, 256, 4096), whole);
        // 10,000 tokens, windows of 256, at most 1,024: four windows, a quarter apart.
        assert_eq!(
            trace_spans(10_000, 256, 1024),
            vec![0..256, 2500..2756, 5000..5256, 7500..7756]
        );
        // A window longer than the cap: one run of the cap.
        let one: Vec<std::ops::Range<usize>> = std::iter::once(0..1024).collect();
        assert_eq!(trace_spans(10_000, 5000, 1024), one);
        let kept: usize = trace_spans(1_000_000, 256, MAX_TRACE_TOKENS)
            .iter()
            .map(|r| r.len())
            .sum();
        assert_eq!(kept, MAX_TRACE_TOKENS);
    }

    fn trained() -> Checkpoint {
        Checkpoint::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny"))
            .unwrap()
    }

    fn texts() -> Vec<CalibrationText> {
        let cal = builtin_calibration();
        // Two tasks, a few hundred tokens each: windows of 64 make several chunks per layer.
        cal.into_iter()
            .filter(|t| t.task == "prose" || t.task == "code")
            .map(|t| CalibrationText {
                task: t.task,
                text: t.text.chars().take(900).collect(),
            })
            .collect()
    }

    /// Top-k ids of every sparse layer, token by token, from a plain model-major forward pass
    /// (whole model, one window at a time) over the same streamed f32 experts.
    struct Ids<'c> {
        inner: StreamedExperts<'c>,
        ids: BTreeMap<usize, Vec<u32>>,
    }

    impl ExpertStore for Ids<'_> {
        fn route(&mut self, layer: usize, i: &Array) -> Result<Vec<PoolRoute<'_>>, ComputeError> {
            self.inner.route(layer, i)
        }
        fn mix(
            &mut self,
            layer: usize,
            x: &Array,
            r: &Routing,
        ) -> Result<Option<Array>, ComputeError> {
            mlx::eval(&[&r.indices])?;
            self.ids
                .entry(layer)
                .or_default()
                .extend(r.indices.to_vec::<u32>()?);
            self.inner.mix(layer, x, r)
        }
    }

    #[test]
    fn layer_by_layer_profile_matches_a_whole_model_pass_and_adds_up() {
        let ck = trained();
        let c = ck.config.clone();
        let (window, k, n) = (64, c.num_experts_per_tok, c.num_experts);
        let texts = texts();
        let p = profile(&ck, &texts, window).unwrap();

        // The reference: every window through the whole model, layer after layer.
        let tok = tokenizers::Tokenizer::from_file(ck.root().join("tokenizer.json")).unwrap();
        let weights = SourceWeights::load(&ck).unwrap();
        let model = Model::load(&c, &weights).unwrap();
        let mut store = Ids {
            inner: StreamedExperts::new(&ck),
            ids: BTreeMap::new(),
        };
        let mut tokens = 0u64;
        let mut per_task = BTreeMap::new();
        for t in &texts {
            let ids = tok
                .encode(t.text.as_str(), false)
                .unwrap()
                .get_ids()
                .to_vec();
            for w in ids.chunks(window) {
                let mut kv = model.new_cache();
                let a = Array::from_slice(w, &[1, w.len()]).unwrap();
                drop(model.forward(&a, &mut kv, &mut store).unwrap());
            }
            tokens += ids.len() as u64;
            *per_task.entry(t.task.clone()).or_insert(0u64) += ids.len() as u64;
        }
        assert_eq!(p.tokens, tokens);
        assert_eq!(
            p.tasks
                .iter()
                .map(|(t, tp)| (t.clone(), tp.tokens))
                .collect::<BTreeMap<_, _>>(),
            per_task
        );
        // Same experts chosen for (almost) every token: the two passes group the same f32
        // products differently, so a near-tie may rarely flip.
        let (mut same, mut all) = (0usize, 0usize);
        for l in c.sparse_layers() {
            let want = &store.ids[&l];
            let mut counts = vec![0u64; n];
            want.iter().for_each(|&e| counts[e as usize] += 1);
            let got = &p.layers[l].counts;
            all += want.len();
            same += got.iter().zip(&counts).map(|(a, b)| a.min(b)).sum::<u64>() as usize;
        }
        assert!(
            same as f64 >= 0.995 * all as f64,
            "{same} of {all} selections agree"
        );

        // Internal consistency of what was recorded.
        let sparse = c.sparse_layers();
        for (i, &l) in sparse.iter().enumerate() {
            let lp = &p.layers[l];
            assert_eq!(lp.counts.iter().sum::<u64>(), tokens * k as u64);
            let mass: f64 = lp.mass.iter().sum();
            assert!(
                (mass - tokens as f64).abs() < 1e-3 * tokens as f64,
                "{mass}"
            );
            for a in 0..n {
                assert_eq!(lp.coactivation[a][a], 0);
                let row: u64 = lp.coactivation[a].iter().sum();
                assert_eq!(row, lp.counts[a] * (k as u64 - 1), "layer {l} expert {a}");
                for b in 0..n {
                    assert_eq!(lp.coactivation[a][b], lp.coactivation[b][a]);
                }
                let out: u64 = lp.transitions[a].iter().sum();
                let next = if i + 1 < sparse.len() {
                    lp.counts[a] * k as u64
                } else {
                    0
                };
                assert_eq!(out, next, "layer {l} expert {a} transitions");
            }
            let by_task: u64 = p
                .tasks
                .values()
                .map(|t| t.layers[l].counts.iter().sum::<u64>())
                .sum();
            assert_eq!(by_task, tokens * k as u64);
        }
    }

    #[test]
    fn windows_group_into_chunks_without_splitting_a_window() {
        let w = |n: usize| (0usize, vec![0u32; n]);
        let ws = vec![w(256), w(256), w(100), w(600), w(10)];
        assert_eq!(group_windows(&ws, 512), vec![0..2, 2..3, 3..4, 4..5]);
        assert_eq!(group_windows(&ws, 10_000), vec![0..5]);
        assert_eq!(group_windows(&ws, 1), vec![0..1, 1..2, 2..3, 3..4, 4..5]);
        assert!(group_windows(&[], 512).is_empty());
    }
}
