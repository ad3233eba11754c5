//! The metadata section, typed: formats/flashpack-v1.md §4.
//!
//! In: the decoded METADATA bytes (JSON) and the pack's directories. Out: a [`Metadata`] whose
//! keys have the types §4 gives them and whose numbers agree with each other and with the
//! directories (§4.4), so readers use its fields without re-checking them.
//! Invariant: nothing here allocates from a number in the metadata before comparing it with
//! what the directories hold (a `num_experts` of 2^30 is refused, never iterated).
//!
//! `format` may depend on `arch` for [`ModelConfig`]: `arch` is plain data and config parsing,
//! with no MLX and no I/O policy, and §4.1 defines `model` as its field names.

use serde::Deserialize;
use serde_json::{Map as JsonMap, Value};

type Map = JsonMap<String, Value>;

use super::{valid_bits, ExpertEntry, PackError, TensorEntry};
use crate::arch::{ArchError, ModelConfig};

/// A profile's routing trace ([`Metadata::profile_trace`]).
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingTrace {
    /// Experts per token.
    pub k: usize,
    /// Calibration tokens.
    pub tokens: usize,
    /// Sparse layer -> `k` router expert ids per token, token after token.
    pub layers: std::collections::BTreeMap<usize, Vec<u32>>,
}

/// The pack metadata (formats/flashpack-v1.md §4), parsed once at open. The small records are
/// typed fields; the large verbatim ones (source config, tokenizer, profile) are read from the
/// JSON through methods, after their types were checked, so opening copies none of them.
#[derive(Clone, Debug)]
pub struct Metadata {
    /// The Hugging Face `model_type`.
    pub architecture: String,
    /// The normalized configuration the runtime uses.
    pub model: ModelConfig,
    pub quantization: QuantizationRecord,
    pub provenance: Provenance,
    /// `merge_map[l][e]`: the stored expert computing router expert `e` of layer `l` (§4.3).
    pub merge_map: Option<Vec<Vec<u32>>>,
    pub chat_template: Option<String>,
    raw: Value,
}

/// The `quantization` record (formats/flashpack-v1.md §4.1).
#[derive(Clone, Debug, Deserialize)]
pub struct QuantizationRecord {
    pub group_size: u32,
    pub expert_bits: u8,
    pub dense_bits: u8,
    pub mode: String,
    /// Bits per stored expert, `[layer][expert]`, 0 for an expert that is not stored.
    #[serde(default)]
    pub expert_plan: Option<Vec<Vec<u8>>>,
    /// `[layer][expert]` -> bits of gate, up and down.
    #[serde(default)]
    pub expert_projection_bits: Option<Vec<Vec<[u8; 3]>>>,
    #[serde(default)]
    pub mixed: bool,
}

/// The `provenance` record (formats/flashpack-v1.md §4.1).
#[derive(Clone, Debug, Deserialize)]
pub struct Provenance {
    pub source: String,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub files: Vec<SourceFile>,
    #[serde(default)]
    pub tool: Option<String>,
    #[serde(default)]
    pub tool_version: Option<String>,
}

/// One source file in the provenance.
#[derive(Clone, Debug, Deserialize)]
pub struct SourceFile {
    pub name: String,
    pub size: u64,
    pub blake3: String,
}

/// What the directories hold, for the cross-checks of §4.4.
pub(crate) struct Directories<'a> {
    pub tensors: &'a [TensorEntry],
    pub experts: &'a [ExpertEntry],
    pub hidden_size: u32,
    pub intermediate_size: u32,
}

fn bad(
    key: impl Into<String>,
    value: impl std::fmt::Display,
    rule: impl Into<String>,
) -> PackError {
    let mut value = value.to_string();
    if value.len() > 80 {
        let cut = (0..=77)
            .rev()
            .find(|&i| value.is_char_boundary(i))
            .unwrap_or(0);
        value.truncate(cut);
        value.push_str("...");
    }
    PackError::BadMetadata {
        key: key.into(),
        value,
        rule: rule.into(),
    }
}

impl Metadata {
    /// Parses the metadata JSON (step 9 of §8): the required keys, and every known key with
    /// the type §4 gives it.
    pub fn parse(v: Value) -> Result<Metadata, PackError> {
        let obj = v
            .as_object()
            .ok_or_else(|| bad("metadata", kind_of(&v), "must be a JSON object"))?;
        if obj.get("format").and_then(Value::as_str) != Some("flashpack") {
            let found = obj.get("format").map_or("absent".into(), Value::to_string);
            return Err(bad("format", found, "must be the string \"flashpack\""));
        }
        fn typed<'a, T: Deserialize<'a>>(obj: &'a Map, key: &str) -> Result<T, PackError> {
            let x = obj.get(key).unwrap_or(&Value::Null);
            T::deserialize(x).map_err(|e| {
                let found = if x.is_null() {
                    "absent".into()
                } else {
                    short(x)
                };
                bad(key, found, e.to_string())
            })
        }
        for key in [
            "config",
            "tokenizer",
            "tokenizer_config",
            "generation_config",
        ] {
            match obj.get(key) {
                Some(Value::Object(_)) => {}
                None | Some(Value::Null) if key != "config" => {}
                other => {
                    let found = other.map_or("absent".into(), kind_of);
                    let rule = if key == "config" {
                        "is required and must be an object (the source config.json)"
                    } else {
                        "must be an object or null"
                    };
                    return Err(bad(key, found, rule));
                }
            }
        }
        let meta = Metadata {
            architecture: typed(obj, "architecture")?,
            model: typed(obj, "model")?,
            quantization: typed(obj, "quantization")?,
            provenance: typed(obj, "provenance")?,
            merge_map: typed(obj, "merge_map")?,
            chat_template: typed(obj, "chat_template")?,
            raw: Value::Null,
        };
        Ok(Metadata { raw: v, ..meta })
    }

    /// The metadata JSON as stored.
    pub fn raw(&self) -> &Value {
        &self.raw
    }

    /// The source `config.json`, verbatim.
    pub fn source_config(&self) -> &Value {
        &self.raw["config"]
    }

    /// The source `tokenizer.json` (an object), or `None` when the source had none (§4.2).
    pub fn tokenizer(&self) -> Option<&Value> {
        self.raw.get("tokenizer").filter(|t| t.is_object())
    }

    /// The usage profile, when the pack has one (§4.3).
    pub fn profile(&self) -> Option<&Value> {
        self.raw.get("profile").filter(|p| !p.is_null())
    }

    /// The cross-field rules of §4.4, against the directories.
    pub(crate) fn validate(&self, dir: &Directories<'_>) -> Result<(), PackError> {
        let m = &self.model;
        m.validate().map_err(|e| match e {
            ArchError::BadField {
                field,
                found,
                expected,
            } => bad(format!("model.{field}"), found, expected),
            other => bad("model", "", other.to_string()),
        })?;
        if m.arch.model_type() != self.architecture {
            return Err(bad(
                "architecture",
                &self.architecture,
                format!("must equal model.arch ({})", m.arch),
            ));
        }
        // Layers and experts are bounded by what the directories hold before anything is
        // sized from them.
        let tensor_layers = dir
            .tensors
            .iter()
            .filter_map(|t| layer_of(&t.name))
            .max()
            .map_or(0, |l| l as u64 + 1);
        let expert_layers = dir.experts.last().map_or(0, |e| e.layer as u64 + 1);
        let held = tensor_layers.max(expert_layers);
        if m.num_hidden_layers as u64 > held {
            return Err(bad(
                "model.num_hidden_layers",
                m.num_hidden_layers,
                format!("the directories hold tensors for {held} layers"),
            ));
        }
        if tensor_layers > m.num_hidden_layers as u64 || expert_layers > m.num_hidden_layers as u64
        {
            return Err(bad(
                "model.num_hidden_layers",
                m.num_hidden_layers,
                format!("the directories hold tensors for layer {}", held - 1),
            ));
        }
        if let Some(e) = dir
            .experts
            .iter()
            .find(|e| e.expert as usize >= m.num_experts)
        {
            return Err(bad(
                "model.num_experts",
                m.num_experts,
                format!(
                    "the expert directory stores expert {} of layer {}",
                    e.expert, e.layer
                ),
            ));
        }
        if let Some(e) = dir
            .experts
            .iter()
            .find(|e| !m.is_sparse_layer(e.layer as usize))
        {
            return Err(bad(
                "model.decoder_sparse_step",
                m.decoder_sparse_step,
                format!(
                    "layer {} is dense by the model config, yet the expert directory stores experts for it",
                    e.layer
                ),
            ));
        }
        // The experts' width: the model's, or under Kimi-K3's latent MoE its own.
        if dir.hidden_size as usize != m.expert_hidden_size() {
            let (field, value) = match &m.latent_moe {
                Some(l) => ("model.latent_moe.hidden_size", l.hidden_size),
                None => ("model.hidden_size", m.hidden_size),
            };
            return Err(bad(
                field,
                value,
                format!(
                    "must equal the expert directory's hidden_size ({})",
                    dir.hidden_size
                ),
            ));
        }
        if dir.intermediate_size as usize != m.moe_intermediate_size {
            return Err(bad(
                "model.moe_intermediate_size",
                m.moe_intermediate_size,
                format!(
                    "must equal the expert directory's intermediate_size ({})",
                    dir.intermediate_size
                ),
            ));
        }
        if let Some(t) = dir
            .tensors
            .iter()
            .find(|t| t.name == "model.embed_tokens.weight")
        {
            if t.shape.first().copied() != Some(m.vocab_size as u64) {
                return Err(bad(
                    "model.vocab_size",
                    m.vocab_size,
                    format!(
                        "model.embed_tokens.weight has {} rows",
                        t.shape.first().copied().unwrap_or(0)
                    ),
                ));
            }
        }
        // Rule 7: expert biases in the directory exactly when the model says so.
        if let Some(e) = dir
            .experts
            .iter()
            .find(|e| e.bias_dtype.is_some() != m.expert_bias)
        {
            return Err(bad(
                "model.expert_bias",
                m.expert_bias,
                format!(
                    "must be true exactly when the expert entries carry expert biases; layer {} \
                     expert {} {}",
                    e.layer,
                    e.expert,
                    if e.bias_dtype.is_some() {
                        "has them"
                    } else {
                        "has none"
                    }
                ),
            ));
        }
        self.validate_merge_map(dir)?;
        self.quantization.validate()?;
        Ok(())
    }

    /// §4.3: one row per layer, `num_experts` ids each, every id a stored expert of its layer;
    /// and every router expert of a sparse layer computed by a stored expert.
    fn validate_merge_map(&self, dir: &Directories<'_>) -> Result<(), PackError> {
        let m = &self.model;
        let stored = |l: usize, e: u32| {
            let i = dir
                .experts
                .partition_point(|x| (x.layer as usize, x.expert) < (l, e));
            dir.experts
                .get(i)
                .is_some_and(|x| (x.layer as usize, x.expert) == (l, e))
        };
        if let Some(map) = &self.merge_map {
            if map.len() != m.num_hidden_layers {
                return Err(bad(
                    "merge_map",
                    format!("{} rows", map.len()),
                    format!(
                        "must have one row per layer ({}, model.num_hidden_layers)",
                        m.num_hidden_layers
                    ),
                ));
            }
            for (l, row) in map.iter().enumerate() {
                if row.len() != m.num_experts {
                    return Err(bad(
                        format!("merge_map[{l}]"),
                        format!("{} ids", row.len()),
                        format!(
                            "must have one id per expert ({}, model.num_experts)",
                            m.num_experts
                        ),
                    ));
                }
                for (e, &s) in row.iter().enumerate() {
                    if s as usize >= m.num_experts {
                        return Err(bad(
                            format!("merge_map[{l}][{e}]"),
                            s,
                            format!(
                                "must be an expert id below {} (model.num_experts)",
                                m.num_experts
                            ),
                        ));
                    }
                }
            }
        }
        // Bounded: the directory's check above keeps stored ids below num_experts, and the loop
        // stops at the first router expert with nothing to compute it.
        for l in (0..m.num_hidden_layers).filter(|&l| m.is_sparse_layer(l)) {
            for e in 0..m.num_experts as u32 {
                let s = self.merge_map.as_ref().map_or(e, |map| map[l][e as usize]);
                if !stored(l, s) {
                    let key = if self.merge_map.is_some() {
                        format!("merge_map[{l}][{e}]")
                    } else {
                        "model.num_experts".into()
                    };
                    let value = if self.merge_map.is_some() {
                        s.to_string()
                    } else {
                        m.num_experts.to_string()
                    };
                    return Err(bad(
                        key,
                        value,
                        format!(
                            "router expert {e} of layer {l} must be computed by a stored expert; the expert directory has no expert {s} in layer {l}"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether the merge map merges any expert (flag `MERGED_EXPERTS`).
    pub fn merges_experts(&self) -> bool {
        self.merge_map.as_ref().is_some_and(|map| {
            map.iter()
                .any(|row| row.iter().enumerate().any(|(e, &s)| s as usize != e))
        })
    }

    /// The stored expert computing router expert `e` of `layer` (identity without a merge map).
    pub fn stored_expert(&self, layer: u32, e: u32) -> u32 {
        self.merge_map
            .as_ref()
            .and_then(|m| m.get(layer as usize))
            .and_then(|row| row.get(e as usize))
            .copied()
            .unwrap_or(e)
    }

    /// The profile's routing trace (`profile.trace`, §4.3): per sparse layer, the top-k router
    /// expert ids of each calibration token in text order. Read leniently: `None` when absent
    /// or malformed (an id encoding other than `u16le`, bad base64, layers of different
    /// lengths, a length that is not `k` ids per token, an id at or past `num_experts`).
    pub fn profile_trace(&self) -> Option<RoutingTrace> {
        use base64::Engine;
        let t = self.profile()?.get("trace")?;
        let k = usize::try_from(t.get("k")?.as_u64()?).ok()?;
        if k == 0 || t.get("ids")?.as_str()? != "u16le" {
            return None;
        }
        let mut layers = std::collections::BTreeMap::new();
        let mut tokens = None;
        for (l, text) in t.get("layers")?.as_object()? {
            let layer: usize = l.parse().ok()?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text.as_str()?)
                .ok()?;
            if bytes.len() % (2 * k) != 0
                || *tokens.get_or_insert(bytes.len() / (2 * k)) != bytes.len() / (2 * k)
            {
                return None;
            }
            let ids: Vec<u32> = bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
                .collect();
            if layer >= self.model.num_hidden_layers
                || ids.iter().any(|&e| e as usize >= self.model.num_experts)
            {
                return None;
            }
            layers.insert(layer, ids);
        }
        Some(RoutingTrace {
            k,
            tokens: tokens?,
            layers,
        })
    }

    /// The profile's routing mass per layer (`profile.layers[l].mass`), read leniently: a layer
    /// without a usable `mass` gives `None`, negative and non-finite values count as 0.
    pub fn profile_mass(&self) -> Vec<Option<Vec<f64>>> {
        let Some(layers) = self
            .profile()
            .and_then(|p| p.get("layers"))
            .and_then(Value::as_array)
        else {
            return Vec::new();
        };
        layers
            .iter()
            .map(|l| {
                let mass = l.get("mass")?.as_array()?;
                Some(
                    mass.iter()
                        .map(|m| {
                            m.as_f64()
                                .filter(|x| x.is_finite() && *x > 0.0)
                                .unwrap_or(0.0)
                        })
                        .collect(),
                )
            })
            .collect()
    }

    /// A special token (`bos_token`, `eos_token`) from `tokenizer_config`, as a string or as
    /// an `AddedToken` object's `content`.
    pub fn special_token(&self, key: &str) -> Option<&str> {
        let v = self.raw.get("tokenizer_config")?.get(key)?;
        v.as_str()
            .or_else(|| v.get("content").and_then(Value::as_str))
    }

    /// The chat template: `chat_template`, else `tokenizer_config.chat_template`.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref().or_else(|| {
            self.raw
                .get("tokenizer_config")?
                .get("chat_template")?
                .as_str()
        })
    }
}

impl QuantizationRecord {
    /// §4.1: bits and group sizes a v1 reader accepts.
    fn validate(&self) -> Result<(), PackError> {
        const BITS: &str = "must be 2, 3, 4, 5, 6 or 8";
        let mode = super::QuantMode::from_name(&self.mode).unwrap_or_default();
        if !super::valid_group_size_in(mode, self.group_size) {
            return Err(bad(
                "quantization.group_size",
                self.group_size,
                "must be 32, 64 or 128 (16 in nvfp4)",
            ));
        }
        if !valid_bits(self.expert_bits) {
            return Err(bad("quantization.expert_bits", self.expert_bits, BITS));
        }
        if !(valid_bits(self.dense_bits) || self.dense_bits == 16) {
            return Err(bad(
                "quantization.dense_bits",
                self.dense_bits,
                "must be 2, 3, 4, 5, 6, 8, or 16 when no dense tensor is quantized",
            ));
        }
        for (l, row) in self.expert_plan.iter().flatten().enumerate() {
            if let Some(b) = row.iter().find(|&&b| b != 0 && !valid_bits(b)) {
                return Err(bad(
                    format!("quantization.expert_plan[{l}]"),
                    b,
                    "bits must be 0 (not stored), 2, 3, 4, 5, 6 or 8",
                ));
            }
        }
        for (l, row) in self.expert_projection_bits.iter().flatten().enumerate() {
            if let Some(b) = row.iter().flatten().find(|&&b| b != 0 && !valid_bits(b)) {
                return Err(bad(
                    format!("quantization.expert_projection_bits[{l}]"),
                    b,
                    "bits must be 0 (not stored), 2, 3, 4, 5, 6 or 8",
                ));
            }
        }
        Ok(())
    }
}

/// `model.layers.{L}.` -> L.
fn layer_of(name: &str) -> Option<u32> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

fn kind_of(v: &Value) -> String {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
    .into()
}

fn short(v: &Value) -> String {
    match v {
        Value::Object(_) | Value::Array(_) => kind_of(v),
        other => other.to_string(),
    }
}
