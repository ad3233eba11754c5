//! What a conversion did ([`ConvertReport`]) and how long each stage took.

use super::load::{self, ExpertLayout};
use crate::format::PackSummary;
use crate::inspect::PackReport;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// Seconds spent in one stage.
#[derive(Clone, Debug, Serialize)]
pub struct StageTime {
    pub stage: &'static str,
    pub seconds: f64,
    /// Peak resident set of the process during the stage, with `FLASHPACK_STAGE_PEAKS=1` on
    /// Linux; `None` otherwise, and for a stage that ran beside others.
    pub peak_rss_bytes: Option<u64>,
}

/// Whether to measure each stage's peak RSS (`FLASHPACK_STAGE_PEAKS=1`). Off by default: the
/// measurement restarts the kernel's high-water mark at every stage, so afterwards the
/// process's own peak (`getrusage`, `/usr/bin/time`) covers only the last stage. With it on,
/// the process's peak is the largest stage peak.
fn stage_peaks() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("FLASHPACK_STAGE_PEAKS").is_ok_and(|v| v == "1"))
}

impl StageTime {
    /// A stage that started at `lap` and ends now; also closes the stage's peak-RSS period.
    pub(super) fn ended(stage: &'static str, lap: Instant) -> StageTime {
        StageTime {
            stage,
            seconds: lap.elapsed().as_secs_f64(),
            peak_rss_bytes: if stage_peaks() {
                crate::memory::take_peak_rss()
            } else {
                None
            },
        }
    }
}

/// What a conversion did.
#[derive(Clone, Debug, Serialize)]
pub struct ConvertReport {
    pub source: String,
    pub output: PathBuf,
    pub architecture: String,
    /// How the source stored its experts (first sparse layer).
    pub expert_layout: Option<ExpertLayout>,
    /// Whether the source was MLX-quantized.
    pub source_mlx_quantized: bool,
    /// The integer groups of a compressed-tensors `pack-quantized` source (Kimi's INT4 experts),
    /// whose codes are kept like MLX codes when they fit MLX's affine layout.
    pub source_packed_int: Option<load::PackedInt>,
    /// Whether some of the source's MLX (or packed integer) codes were requantized to other bits
    /// or group size (only when asked for: explicit bits or group size, or a cold-expert plan).
    pub requantized_source: bool,
    /// Stored experts among them.
    pub requantized_experts: usize,
    /// Temporary files of interrupted conversions found beside the output and removed.
    pub removed_stale_temp_files: Vec<PathBuf>,
    /// The source's multi-token-prediction layers, left out of the pack.
    pub dropped_mtp: load::DroppedMtp,
    pub seconds: f64,
    pub stages: Vec<StageTime>,
    /// Bytes of the source's weight files.
    pub source_bytes: u64,
    pub pack_bytes: u64,
    /// Source bytes per second of the whole conversion.
    pub source_bytes_per_s: f64,
    pub summary: PackSummary,
    /// Sizes and bits per weight by kind, as `flashpack inspect` reports them.
    pub pack: PackReport,
    /// The pack against the source on `--eval-text` (or the calibration file), when given.
    pub quality: Option<crate::eval::EvalReport>,
}
