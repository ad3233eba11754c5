//! What a conversion produces ([`ConvertOptions`]), checked before any work.

use super::{profile, ConvertError};
use crate::codec::{AutoPolicy, CodecChoice};
use crate::convert::quantize::{DensePolicy, QuantParams};
use crate::format::DEFAULT_PAGE_SIZE;
use serde_json::{json, Value};

/// What to produce. `Default` is the plain conversion: 4-bit experts, group 64, 4-bit dense
/// weights, automatic codec choice, one segment per expert, 16 KiB pages.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub codec: CodecChoice,
    pub expert_bits: u8,
    pub group_size: usize,
    /// 2 to 6 or 8 quantize dense weights; 16 keeps them in the source float type.
    pub dense_bits: u8,
    /// Vertical segments per expert (formats/flashpack-v1.md §6.3).
    pub segments: usize,
    pub page_size: u32,
    /// Bits of cold experts; needs the profile stage.
    pub cold_bits: Option<u8>,
    /// Fraction of experts stored at `cold_bits`; needs the profile stage.
    pub cold_fraction: Option<f64>,
    /// Pick cold experts until the pack fits this many GB; needs the profile stage.
    pub target_size_gb: Option<f64>,
    /// Merge experts more similar than this; needs the merge stage.
    pub merge_threshold: Option<f64>,
    /// Profiling, calibration text, merge ratio, quality report (profile stage).
    pub plan: profile::PlanOptions,
    /// Tensors that the source already holds as MLX codes (an mlx-lm folder) keep their own
    /// bits and group size, whatever `expert_bits`, `dense_bits` and `group_size` say; only
    /// experts that the bit plan sends to other bits (`cold_bits`) are requantized. `false`
    /// requantizes every such tensor to the options (what `flashpack convert` does when
    /// `--expert-bits`, `--dense-bits` or `--group-size` is given).
    pub keep_source_codes: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            codec: CodecChoice::Auto(AutoPolicy::default()),
            expert_bits: 4,
            group_size: 64,
            dense_bits: 4,
            segments: 1,
            page_size: DEFAULT_PAGE_SIZE,
            cold_bits: None,
            cold_fraction: None,
            target_size_gb: None,
            merge_threshold: None,
            plan: profile::PlanOptions::default(),
            keep_source_codes: true,
        }
    }
}

impl ConvertOptions {
    /// The options as recorded in the pack's provenance.
    pub fn describe(&self) -> Value {
        let codec = match self.codec {
            CodecChoice::Auto(_) => "auto".to_string(),
            CodecChoice::Fixed(c) => c.label(),
        };
        json!({
            "codec": codec,
            "expert_bits": self.expert_bits,
            "group_size": self.group_size,
            "dense_bits": self.dense_bits,
            "segments": self.segments,
            "page_size": self.page_size,
            "keep_source_codes": self.keep_source_codes,
        })
    }

    pub(super) fn check(&self) -> Result<(QuantParams, DensePolicy), ConvertError> {
        if self.cold_bits.is_some() && self.cold_fraction.is_none() && self.target_size_gb.is_none()
        {
            return Err(ConvertError::BadOption {
                option: "--cold-bits",
                value: self.cold_bits.unwrap_or(0).to_string(),
                why: "needs --cold-fraction F or --target-size GB to say how many experts go cold"
                    .into(),
            });
        }
        if let Some(b) = self.cold_bits {
            QuantParams::new(b, self.group_size)?;
        }
        let out_of = |option: &'static str, v: f64, ok: bool, why: &str| {
            if ok {
                Ok(())
            } else {
                Err(ConvertError::BadOption {
                    option,
                    value: v.to_string(),
                    why: why.into(),
                })
            }
        };
        // Checked here, before any work, as well as where they are used.
        if let Some(f) = self.cold_fraction {
            out_of(
                "--cold-fraction",
                f,
                (0.0..=1.0).contains(&f),
                "give a fraction between 0 and 1",
            )?;
        }
        if let Some(t) = self.merge_threshold {
            out_of(
                "--merge-threshold",
                t,
                (-1.0..=1.0).contains(&t),
                "a cosine similarity lies in [-1, 1]",
            )?;
        }
        if let Some(r) = self.plan.merge_ratio {
            out_of(
                "--merge-ratio",
                r,
                (0.0..1.0).contains(&r),
                "give a fraction in [0, 1)",
            )?;
        }
        if self.segments == 0 {
            return Err(ConvertError::BadOption {
                option: "--segments",
                value: "0".into(),
                why: "give at least 1".into(),
            });
        }
        Ok((
            QuantParams::new(self.expert_bits, self.group_size)?,
            DensePolicy::new(self.dense_bits, self.group_size)?
                .keeping_source_codes(self.keep_source_codes),
        ))
    }
}
