//! Quality of a pack: perplexity on a text and, against a reference model, the mean KL
//! divergence and top-1 agreement of the next-token distributions.
//!
//! In: a candidate and an optional reference, each a [`Source`] (a `.flashpack`, an mlx-lm
//! quantized folder, or a Hugging Face / unquantized folder run through
//! [`crate::convert::source`]), and token ids. Out: an [`EvalReport`].
//! The ids are cut into non-overlapping windows of at most `window` tokens (never longer than
//! the model's context); each window is one forward pass from an empty KV cache and scores its
//! tokens 1.. given the tokens before them in the window. Log-softmax, KL(reference || candidate)
//! and the sums run on the host in f64, so they do not depend on the backend's reductions.
//! Invariant: candidate and reference see exactly the same windows.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::arch::{KvBits, ModelConfig};
use crate::convert::load::{Checkpoint, LoadError};
use crate::convert::source::{SourceExperts, SourceWeights};
use crate::format::PackError;
use crate::model::{ComputeError, ExpertStore, MlxLmWeights, Model, ResidentExperts};
use crate::run::experts::{ExpertCache, ExpertError, StoreOptions};
use crate::run::open::{self, OpenError};
use crate::run::stream::StreamingExperts;

/// Why an evaluation could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvalError {
    #[error(
        "{path}: not found (give a .flashpack file, an mlx-lm folder or a Hugging Face folder)"
    )]
    NotFound { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the text has {tokens} tokens; at least 2 are needed to score one")]
    TooShort { tokens: usize },
    #[error("window {window}: use at least 2 tokens")]
    BadWindow { window: usize },
    #[error("{what} has no tokenizer (tokenizer.json); it cannot read text")]
    NoTokenizer { what: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(
        "the reference has a vocabulary of {reference} tokens, the candidate {candidate}: they \
         are not the same model family"
    )]
    VocabMismatch { candidate: usize, reference: usize },
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error(transparent)]
    Experts(#[from] ExpertError),
    #[error(transparent)]
    Compute(#[from] ComputeError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Mlx(#[from] crate::mlx::Error),
}

type Result<T> = std::result::Result<T, EvalError>;

/// Something that can be run: a pack, an mlx-lm quantized folder, or a source checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Pack(PathBuf),
    MlxLm(PathBuf),
    Checkpoint(PathBuf),
}

impl Source {
    /// A file is a pack; a folder whose config.json has a `quantization` block is an mlx-lm
    /// folder (run exactly as mlx-lm runs it); any other folder is a source checkpoint.
    pub fn detect(path: &Path) -> Result<Source> {
        if path.is_file() {
            return Ok(Source::Pack(path.to_path_buf()));
        }
        if !path.is_dir() {
            return Err(EvalError::NotFound {
                path: path.to_path_buf(),
            });
        }
        let cfg = path.join("config.json");
        let text = std::fs::read_to_string(&cfg).map_err(|source| EvalError::Io {
            path: cfg.clone(),
            source,
        })?;
        let quantized = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("quantization").cloned())
            .is_some();
        Ok(if quantized {
            Source::MlxLm(path.to_path_buf())
        } else {
            Source::Checkpoint(path.to_path_buf())
        })
    }

    pub fn path(&self) -> &Path {
        match self {
            Source::Pack(p) | Source::MlxLm(p) | Source::Checkpoint(p) => p,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Source::Pack(_) => "pack",
            Source::MlxLm(_) => "mlx-lm",
            Source::Checkpoint(_) => "checkpoint",
        }
    }

    /// Bytes of the weights: the pack file, or the folder's `*.safetensors`.
    pub fn weight_bytes(&self) -> Result<u64> {
        let p = self.path();
        let io = |source| EvalError::Io {
            path: p.to_path_buf(),
            source,
        };
        if let Source::Pack(_) = self {
            return Ok(std::fs::metadata(p).map_err(io)?.len());
        }
        let mut total = 0;
        for e in std::fs::read_dir(p).map_err(io)? {
            let path = e.map_err(io)?.path();
            if path.extension().is_some_and(|x| x == "safetensors") {
                total += std::fs::metadata(&path).map_err(io)?.len();
            }
        }
        Ok(total)
    }

    /// The tokenizer: a pack's own, or the folder's tokenizer.json.
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        match self {
            Source::Pack(p) => {
                let pack = crate::format::Pack::open(p)?;
                Ok(open::tokenizer(&pack)?)
            }
            Source::MlxLm(p) | Source::Checkpoint(p) => {
                let file = p.join("tokenizer.json");
                if !file.is_file() {
                    return Err(EvalError::NoTokenizer {
                        what: p.display().to_string(),
                    });
                }
                tokenizers::Tokenizer::from_file(&file)
                    .map_err(|e| EvalError::Tokenizer(format!("{}: {e}", file.display())))
            }
        }
    }
}

/// Loads `src` with all experts resident, its KV caches quantized to `kv_bits` where
/// `--kv-bits` quantizes them (`Model::set_kv_bits`), and hands the model and its expert store
/// to `f`.
pub fn with_model<T>(
    src: &Source,
    kv_bits: Option<KvBits>,
    f: impl FnOnce(&Model, &mut dyn ExpertStore) -> Result<T>,
) -> Result<T> {
    let load = |cfg: &ModelConfig, w: &dyn crate::model::Weights| -> Result<Model> {
        let mut model = Model::load(cfg, w)?;
        model.set_kv_bits(kv_bits);
        Ok(model)
    };
    match src {
        Source::Pack(path) => {
            // Checked as `run` checks by default: a damaged byte is an error, not a score.
            let (pack, cfg, weights) = open::open(path, true)?;
            let model = load(&cfg, &weights)?;
            let mut cache = ExpertCache::new(&pack, &StoreOptions::default())?;
            cache.warm_all(&pack)?;
            let mut store = StreamingExperts::new(&pack, cache, cfg.num_experts, false);
            f(&model, &mut store)
        }
        Source::MlxLm(path) => {
            let (cfg, weights) = MlxLmWeights::open(path)?;
            let model = load(&cfg, &weights)?;
            let mut store = ResidentExperts::load(&cfg, &weights)?;
            f(&model, &mut store)
        }
        Source::Checkpoint(path) => {
            let ck = Checkpoint::open(path)?;
            let weights = SourceWeights::load(&ck)?;
            let model = load(&ck.config, &weights)?;
            let mut store = SourceExperts::new(&ck, usize::MAX);
            f(&model, &mut store)
        }
    }
}

/// What the candidate scored, and how it compares with the reference.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EvalReport {
    /// Tokens scored (every token of a window but its first).
    pub tokens: usize,
    pub windows: usize,
    pub window: usize,
    /// Mean negative log-likelihood, nats per token.
    pub nll: f64,
    pub perplexity: f64,
    pub reference: Option<Comparison>,
    /// The candidate's quantized KV cache, when `--kv-bits` asked for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_cache: Option<KvCacheReport>,
}

/// What `--kv-bits` changed in the candidate's KV cache.
#[derive(Clone, Debug, Serialize)]
pub struct KvCacheReport {
    pub bits: KvBits,
    /// Layers whose keys and values are quantized, of `layers`.
    pub quantized_layers: usize,
    pub layers: usize,
    /// Bytes per token of the layers whose cache grows with the context, quantized and in bf16.
    pub bytes_per_token: u64,
    pub bf16_bytes_per_token: u64,
}

impl KvCacheReport {
    /// The cache `model` makes ([`Model::set_kv_bits`]); `None` for a bf16 one.
    pub fn of(model: &Model) -> Option<KvCacheReport> {
        let cfg = model.config();
        model.kv_bits().map(|bits| KvCacheReport {
            bits,
            quantized_layers: cfg.kv_quantized_layers().len(),
            layers: cfg.num_hidden_layers,
            bytes_per_token: cfg.kv_bytes_per_token(Some(bits)),
            bf16_bytes_per_token: cfg.kv_bytes_per_token(None),
        })
    }
}

/// Candidate against reference on the same positions.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Comparison {
    pub nll: f64,
    pub perplexity: f64,
    /// Mean over positions of KL(reference || candidate), nats.
    pub kl_mean: f64,
    /// Fraction of positions where both pick the same most likely next token.
    pub top1_agreement: f64,
}

/// Log-softmax of one row, in f64.
fn log_softmax(row: &[f32], out: &mut Vec<f64>) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    out.clear();
    out.extend(row.iter().map(|&x| x as f64 - lse));
}

fn argmax(row: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// Windows of at most `window` tokens; a last piece of one token is dropped (nothing to score).
pub fn windows(ids: &[u32], window: usize) -> Result<Vec<&[u32]>> {
    if window < 2 {
        return Err(EvalError::BadWindow { window });
    }
    if ids.len() < 2 {
        return Err(EvalError::TooShort { tokens: ids.len() });
    }
    Ok(ids.chunks(window).filter(|w| w.len() >= 2).collect())
}

/// The effective window: `window`, capped by the model's context length.
pub fn effective_window(model: &Model, window: usize) -> usize {
    match model.config().max_position_embeddings {
        Some(ctx) if ctx >= 2 => window.min(ctx),
        _ => window,
    }
}

fn logits_of(model: &Model, store: &mut dyn ExpertStore, w: &[u32]) -> Result<Vec<f32>> {
    let mut kv = model.new_cache();
    let logits = model.forward_ids(w, &mut kv, store)?;
    Ok(logits.to_vec_f32()?)
}

/// Scores `ids` with the candidate and, if given, compares with the reference.
pub fn evaluate(
    ids: &[u32],
    window: usize,
    candidate: (&Model, &mut dyn ExpertStore),
    reference: Option<(&Model, &mut dyn ExpertStore)>,
) -> Result<EvalReport> {
    let (cm, cs) = candidate;
    let mut reference = reference;
    let vocab = cm.config().vocab_size;
    let mut window = effective_window(cm, window);
    if let Some((rm, _)) = &reference {
        if rm.config().vocab_size != vocab {
            return Err(EvalError::VocabMismatch {
                candidate: vocab,
                reference: rm.config().vocab_size,
            });
        }
        window = effective_window(rm, window);
    }
    let wins = windows(ids, window)?;
    let (mut nll, mut ref_nll, mut kl, mut agree, mut n) = (0f64, 0f64, 0f64, 0usize, 0usize);
    let (mut lc, mut lr) = (Vec::new(), Vec::new());
    for w in &wins {
        let c = logits_of(cm, cs, w)?;
        let r = match reference.as_mut() {
            Some((rm, rs)) => Some(logits_of(rm, &mut **rs, w)?),
            None => None,
        };
        for t in 0..w.len() - 1 {
            let target = w[t + 1] as usize;
            log_softmax(&c[t * vocab..(t + 1) * vocab], &mut lc);
            nll -= lc[target];
            if let Some(r) = &r {
                log_softmax(&r[t * vocab..(t + 1) * vocab], &mut lr);
                ref_nll -= lr[target];
                kl += lr
                    .iter()
                    .zip(&lc)
                    .map(|(&a, &b)| a.exp() * (a - b))
                    .sum::<f64>();
                agree += (argmax(&lr) == argmax(&lc)) as usize;
            }
            n += 1;
        }
    }
    let nf = n as f64;
    Ok(EvalReport {
        tokens: n,
        windows: wins.len(),
        window,
        nll: nll / nf,
        perplexity: (nll / nf).exp(),
        reference: reference.map(|_| Comparison {
            nll: ref_nll / nf,
            perplexity: (ref_nll / nf).exp(),
            kl_mean: kl / nf,
            top1_agreement: agree as f64 / nf,
        }),
        kv_cache: KvCacheReport::of(cm),
    })
}

/// Reads `text` (a file), tokenizes it with `candidate`'s tokenizer and evaluates; the
/// candidate's KV cache at `kv_bits` (`None`: bf16), the reference's always in bf16.
pub fn evaluate_text(
    candidate: &Source,
    reference: Option<&Source>,
    text: &Path,
    window: usize,
    kv_bits: Option<KvBits>,
) -> Result<EvalReport> {
    let body = std::fs::read_to_string(text).map_err(|source| EvalError::Io {
        path: text.to_path_buf(),
        source,
    })?;
    let tok = candidate.tokenizer()?;
    let ids = tok
        .encode(body.as_str(), false)
        .map_err(|e| EvalError::Tokenizer(e.to_string()))?
        .get_ids()
        .to_vec();
    if ids.len() < 2 {
        return Err(EvalError::TooShort { tokens: ids.len() });
    }
    with_model(candidate, kv_bits, |cm, cs| match reference {
        None => evaluate(&ids, window, (cm, cs), None),
        Some(r) => with_model(r, None, |rm, rs| {
            evaluate(&ids, window, (cm, cs), Some((rm, rs)))
        }),
    })
}
