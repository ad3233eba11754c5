//! MLX's quantization modes, as plain data: what both the file format (formats/flashpack-v1.md
//! §7.3) and the MLX binding name. A leaf: it imports nothing of the crate, so `mlx` and `format`
//! both use it without importing each other.

/// Quantization modes, formats/flashpack-v1.md §7.3: MLX's `mode` argument.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum QuantMode {
    /// `scale * q + bias` per group; any bits a pack accepts (`format::valid_bits`), scales and biases in a float type.
    #[default]
    Affine = 0,
    /// OCP microscaling: 4-bit E2M1 codes, one E8M0 (power of two) u8 scale per 32 values, no
    /// biases.
    Mxfp4 = 1,
    /// 8-bit E4M3 codes, one E8M0 u8 scale per 32 values, no biases.
    Mxfp8 = 2,
}

impl QuantMode {
    pub fn from_code(code: u8) -> Option<QuantMode> {
        Some(match code {
            0 => QuantMode::Affine,
            1 => QuantMode::Mxfp4,
            2 => QuantMode::Mxfp8,
            _ => return None,
        })
    }

    /// MLX's name for the mode.
    pub fn name(self) -> &'static str {
        match self {
            QuantMode::Affine => "affine",
            QuantMode::Mxfp4 => "mxfp4",
            QuantMode::Mxfp8 => "mxfp8",
        }
    }

    pub fn from_name(name: &str) -> Option<QuantMode> {
        [QuantMode::Affine, QuantMode::Mxfp4, QuantMode::Mxfp8]
            .into_iter()
            .find(|m| m.name() == name)
    }

    /// Whether the mode has a bias per group (only affine).
    pub fn has_biases(self) -> bool {
        self == QuantMode::Affine
    }

    /// The bits and group size a microscaling mode fixes; `None` for affine.
    pub fn fixed(self) -> Option<(u8, u32)> {
        match self {
            QuantMode::Affine => None,
            QuantMode::Mxfp4 => Some((4, 32)),
            QuantMode::Mxfp8 => Some((8, 32)),
        }
    }

    /// Scale-like arrays per quantized matrix: scales and biases (2), or scales alone (1).
    pub fn aux_arrays(self) -> u64 {
        if self.has_biases() {
            2
        } else {
            1
        }
    }
}
