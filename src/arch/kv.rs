//! The quantized KV cache as plain data: which layers `--kv-bits` quantizes, at what group size,
//! and the bytes per token that follow, for the run's budget and `inspect` (no MLX here; the
//! cache itself is `model/quantized_kv.rs`).
//!
//! In: a [`ModelConfig`] and the chosen [`KvBits`]. Out: per layer the group size its keys and
//! values are quantized at, or `None` where the layer keeps its cache as it is; bytes per token.
//! Invariant: [`ModelConfig::kv_group`] is the one rule; `Model::new_cache` gives a layer a
//! quantized cache exactly where it says so, so what the budget counts is what the run holds.
//!
//! mlx-lm's `QuantizedKVCache` (models/cache.py) quantizes a plain `KVCache` only: the rotating
//! cache of a sliding window raises `NotImplementedError`, a linear-attention state has no
//! `to_quantized`, and MLA's latent goes through `mx.fast.scaled_dot_product_attention` whose
//! keys are not per-head vectors. flashpack quantizes the same layers and keeps the others as
//! they are (docs/decisions/0031-quantized-kv-cache.md).

use super::ModelConfig;

/// `--kv-bits`: bits per cached key and value (MLX affine codes, groups of [`KV_GROUP_SIZE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(into = "u8")]
pub struct KvBits(u8);

impl KvBits {
    pub const EIGHT: KvBits = KvBits(8);
    pub const FOUR: KvBits = KvBits(4);

    /// 8 or 4; `None` for any other width.
    pub fn new(bits: u8) -> Option<KvBits> {
        matches!(bits, 8 | 4).then_some(KvBits(bits))
    }

    pub fn bits(self) -> u8 {
        self.0
    }
}

impl From<KvBits> for u8 {
    fn from(b: KvBits) -> u8 {
        b.0
    }
}

impl std::fmt::Display for KvBits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// `QuantizedKVCache(group_size=64)`, mlx-lm's default and the issue's.
pub const KV_GROUP_SIZE: usize = 64;

/// The group for a head of `width` values: [`KV_GROUP_SIZE`], or 32 for a head that is a
/// multiple of 32 but not of 64 (MLX's smallest affine group; mlx-lm's `mx.quantize(..,
/// group_size=64)` fails on such a head). No real checkpoint flashpack runs has one (their heads
/// are 64 to 512 wide); the small test models' 32-wide heads do, and so run the quantized path too.
pub fn kv_group_for(width: usize) -> Option<usize> {
    [KV_GROUP_SIZE, 32]
        .into_iter()
        .find(|g| width > 0 && width % g == 0)
}

/// Bytes one cached vector of `width` values takes at `bits`, group `group`: the packed codes,
/// then a scale and a bias per group in bf16 (the keys' dtype, as `mx.quantize` gives them).
pub fn quantized_vector_bytes(width: usize, bits: KvBits, group: usize) -> u64 {
    (width * bits.bits() as usize / 8 + 2 * 2 * width / group) as u64
}

/// Why a layer keeps its cache unquantized under `--kv-bits`, for `inspect` and the run's report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvKept {
    /// Linear attention: a fixed-size state, not keys and values per position.
    LinearState,
    /// A sliding window's rotating cache (mlx-lm: "RotatingKVCache Quantization NYI").
    SlidingWindow,
    /// Multi-head latent attention: one latent and one rotary key per position.
    Latent,
    /// DeepSeek-V4.1's window and compressed latents.
    Compressed,
    /// A head width that no affine group divides.
    HeadWidth,
}

impl KvKept {
    pub fn describe(self) -> &'static str {
        match self {
            KvKept::LinearState => "linear-attention state",
            KvKept::SlidingWindow => "sliding-window cache",
            KvKept::Latent => "MLA latent cache",
            KvKept::Compressed => "compressed-attention cache",
            KvKept::HeadWidth => "head width not a multiple of 32",
        }
    }
}

impl ModelConfig {
    /// The head width and KV heads of softmax-attention layer `layer`: Gemma 4's full-attention
    /// layers have their own.
    fn kv_geometry(&self, layer: usize) -> (usize, usize) {
        match (&self.gemma4, self.window_of(layer)) {
            (Some(g), None) => (g.global_head_dim, g.global_kv_heads),
            _ => (self.head_dim, self.num_key_value_heads),
        }
    }

    /// The group size layer `layer`'s keys and values are quantized at under `--kv-bits`, or why
    /// the layer keeps its cache as it is.
    pub fn kv_group(&self, layer: usize) -> Result<usize, KvKept> {
        if self.compressed_attention.is_some() {
            return Err(KvKept::Compressed);
        }
        if self.is_linear_layer(layer) {
            return Err(KvKept::LinearState);
        }
        if self.window_of(layer).is_some() {
            return Err(KvKept::SlidingWindow);
        }
        if self.mla.is_some() {
            return Err(KvKept::Latent);
        }
        kv_group_for(self.kv_geometry(layer).0).ok_or(KvKept::HeadWidth)
    }

    /// The layers `--kv-bits` quantizes, ascending.
    pub fn kv_quantized_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers)
            .filter(|&l| self.kv_group(l).is_ok())
            .collect()
    }

    /// What the layers `--kv-bits` leaves as they are keep instead, one entry per kind, in
    /// layer order.
    pub fn kv_kept(&self) -> Vec<KvKept> {
        let mut kinds = Vec::new();
        for l in 0..self.num_hidden_layers {
            if let Err(k) = self.kv_group(l) {
                if !kinds.contains(&k) {
                    kinds.push(k);
                }
            }
        }
        kinds
    }

    /// Bytes the KV cache holds per token over the layers whose cache grows with the context
    /// ([`ModelConfig::kv_values_per_token`]'s layers): bf16 without `bits`, else the quantized
    /// layers' codes, scales and biases and the other layers' bf16 values.
    pub fn kv_bytes_per_token(&self, bits: Option<KvBits>) -> u64 {
        let bf16 = self.kv_values_per_token() * 2;
        let Some(bits) = bits else {
            return bf16;
        };
        self.kv_quantized_layers()
            .into_iter()
            .map(|l| {
                let (width, heads) = self.kv_geometry(l);
                let group = self.kv_group(l).unwrap_or(KV_GROUP_SIZE);
                // A quantized layer leaves the bf16 count (keys and values of every KV head)...
                let plain = (2 * heads * width * 2) as u64;
                // ...for its codes, scales and biases.
                let quantized = 2 * heads as u64 * quantized_vector_bytes(width, bits, group);
                (plain, quantized)
            })
            .fold(bf16, |total, (plain, quantized)| total + quantized - plain)
    }

    /// Bytes the whole KV cache holds at most for a sequence of `positions` prefilled in calls
    /// of at most `chunk` tokens ([`ModelConfig::kv_values`] in bytes), with `bits` on the
    /// layers it quantizes: what a run's budget sets aside. Sliding windows stay bf16.
    pub fn kv_bytes(&self, positions: u64, chunk: u64, bits: Option<KvBits>) -> u64 {
        let saved = self.kv_bytes_per_token(None) - self.kv_bytes_per_token(bits);
        (self.kv_values(positions, chunk) * 2).saturating_sub(saved.saturating_mul(positions))
    }
}
