//! `flashpack convert SRC -o OUT.flashpack`: a Hugging Face (or mlx-lm) checkpoint to a pack.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use flashpack::codec::CodecChoice;
use flashpack::convert::load::{ExpertLayout, SourceSpec};
use flashpack::convert::profile::PlanOptions;
use flashpack::convert::{convert, ConvertOptions, ConvertReport};
use flashpack::hub::HubResolver;
use flashpack::units::{self, Style};

use crate::bars::Bars;

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// A checkpoint folder (config.json + safetensors), or org/model[@rev] found in the local
    /// Hugging Face cache.
    pub src: String,
    /// The pack to write (written to a temporary file, then renamed).
    #[arg(short, long)]
    pub output: PathBuf,
    /// auto (smallest of Huffman/lz4, raw when coding saves < 1%), huffman, zstd[-N], lz4, raw.
    #[arg(long, default_value = "auto")]
    pub codec: String,
    /// Quantization group size: 32, 64 or 128 [default: 64]. An mlx-lm source keeps its own
    /// unless this, --expert-bits or --dense-bits is given.
    #[arg(long)]
    pub group_size: Option<usize>,
    /// Bits of expert weights: 2, 3, 4, 5, 6 or 8 [default: 4; an mlx-lm source keeps its own codes
    /// unless this, --dense-bits or --group-size is given].
    #[arg(long)]
    pub expert_bits: Option<u8>,
    /// Bits of dense weights (attention, embeddings, shared experts): 2 to 6, 8, or 16 to keep the
    /// source floats [default: 4; an mlx-lm source keeps its own codes unless this,
    /// --expert-bits or --group-size is given]. Routers and norms always stay full precision.
    #[arg(long)]
    pub dense_bits: Option<u8>,
    /// Split each expert into this many vertical segments.
    #[arg(long, default_value_t = 1)]
    pub segments: usize,
    /// Page size of the pack in bytes (power of two, 4096 to 65536).
    #[arg(long, default_value_t = flashpack::format::DEFAULT_PAGE_SIZE)]
    pub page_size: u32,
    /// Bits of cold (least routed) experts: 2 by default when --cold-fraction or --target-size
    /// is given; --expert-bits is the hot experts' bits.
    #[arg(long)]
    pub cold_bits: Option<u8>,
    /// Fraction of all experts stored at --cold-bits: those with the least routing mass in the
    /// calibration profile.
    #[arg(long, conflicts_with = "target_size")]
    pub cold_fraction: Option<f64>,
    /// Make the coldest experts cold until dense + expert weights (before entropy coding) fit
    /// this many GB.
    #[arg(long)]
    pub target_size: Option<f64>,
    /// Profile the experts on calibration text and store the profile in the pack (implied by
    /// --cold-fraction, --target-size and merging).
    #[arg(long)]
    pub profile: bool,
    /// Calibration text for the profile instead of the built-in prose/code/math/chat set.
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// After converting, evaluate the pack against the source on this text (perplexity, KL,
    /// top-1 agreement) and include it in the report.
    #[arg(long)]
    pub eval_text: Option<PathBuf>,
    /// Merge experts of a layer while the most similar pair's cosine similarity is at least
    /// this (count-weighted averages; the merge map goes into the pack).
    #[arg(long, conflicts_with = "merge_ratio")]
    pub merge_threshold: Option<f64>,
    /// Merge this fraction of each layer's experts into their most similar neighbours.
    #[arg(long)]
    pub merge_ratio: Option<f64>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Print the final report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

fn print_report(r: &ConvertReport) {
    let p = &r.pack;
    println!("{} -> {}", r.source, r.output.display());
    println!(
        "  {} ({} experts{}), {:.2} s, {:.3} GB/s of source",
        r.architecture,
        match r.expert_layout {
            Some(ExpertLayout::PerExpert) => "per-expert",
            Some(ExpertLayout::Fused) => "fused",
            Some(ExpertLayout::Stacked) => "stacked",
            Some(ExpertLayout::MxBlocks) => "MXFP4-block",
            Some(ExpertLayout::FusedColumns) => "fused (gpt-oss columns)",
            None => "no",
        },
        if r.source_mlx_quantized {
            ", MLX-quantized source"
        } else {
            ""
        },
        r.seconds,
        r.source_bytes_per_s / 1e9
    );
    let stages: Vec<String> = r
        .stages
        .iter()
        .map(|s| match s.peak_rss_bytes {
            Some(b) => format!(
                "{} {:.2}s (peak RSS {:.0} MB)",
                s.stage,
                s.seconds,
                b as f64 / 1e6
            ),
            None => format!("{} {:.2}s", s.stage, s.seconds),
        })
        .collect();
    println!("  stages: {}", stages.join(", "));
    for f in &r.removed_stale_temp_files {
        println!(
            "  removed {}: a temporary file left by an interrupted conversion",
            f.display()
        );
    }
    if r.requantized_source {
        println!(
            "  note: some of the source's MLX codes were requantized ({} experts): the options ask \
             for other bits, group size, cold experts or merges, or an expert's projections had \
             different bits (stored at the most of them)",
            r.requantized_experts
        );
    } else if r.source_mlx_quantized {
        println!("  the source's MLX codes are kept as they are (its bits and group size)");
    } else if let Some(p) = r.source_packed_int {
        println!(
            "  the source's packed {}-bit codes are kept as they are (groups of {}), in MLX's \
             affine layout",
            p.bits, p.group_size
        );
    }
    println!(
        "  source {}  ->  pack {}  ({:.1}% of the source)",
        units::bytes(r.source_bytes, Style::GB3),
        units::bytes(r.pack_bytes, Style::GB3),
        100.0 * r.pack_bytes as f64 / r.source_bytes.max(1) as f64
    );
    for (name, k) in [
        ("experts", &p.experts),
        ("dense", &p.dense),
        ("overall", &p.overall),
    ] {
        println!(
            "  {name:<8} {:>12}  {:>14} weights  {:.3} bits/weight",
            units::bytes(k.bytes, Style::GB3),
            k.weights,
            k.bits_per_weight
        );
    }
    let codecs: Vec<String> = p
        .codecs
        .iter()
        .map(|(k, (n, b))| format!("{k} {n} parts {}", units::bytes(*b, Style::GB3)))
        .collect();
    println!("  codecs: {}", codecs.join(", "));
    println!(
        "  padding {} ({:.2}%)",
        units::bytes(p.padding_bytes, Style::GB3),
        100.0 * p.padding_fraction
    );
    if let Some(q) = &r.quality {
        print!(
            "  quality on {} tokens: perplexity {:.3}",
            q.tokens, q.perplexity
        );
        if let Some(c) = &q.reference {
            print!(
                " (source {:.3}), KL {:.4} nats/token, top-1 agreement {:.1}%",
                c.perplexity,
                c.kl_mean,
                100.0 * c.top1_agreement
            );
        }
        println!();
    }
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let codec: CodecChoice =
        args.codec
            .parse()
            .map_err(|_| flashpack::convert::ConvertError::BadOption {
                option: "--codec",
                value: args.codec.clone(),
                why: "use auto, huffman, zstd, zstd-N, lz4 or raw".into(),
            })?;
    // An already quantized source is requantized only when asked for explicitly.
    let keep_source_codes =
        args.expert_bits.is_none() && args.dense_bits.is_none() && args.group_size.is_none();
    let defaults = ConvertOptions::default();
    let opts = ConvertOptions {
        codec,
        expert_bits: args.expert_bits.unwrap_or(defaults.expert_bits),
        group_size: args.group_size.unwrap_or(defaults.group_size),
        dense_bits: args.dense_bits.unwrap_or(defaults.dense_bits),
        keep_source_codes,
        segments: args.segments,
        page_size: args.page_size,
        cold_bits: args.cold_bits,
        cold_fraction: args.cold_fraction,
        target_size_gb: args.target_size,
        merge_threshold: args.merge_threshold,
        plan: PlanOptions {
            profile: args.profile,
            calibration: args.calibration.clone(),
            eval_text: args.eval_text.clone(),
            merge_ratio: args.merge_ratio,
            ..PlanOptions::default()
        },
    };
    let hidden = args.quiet || !std::io::stderr().is_terminal();
    let bars = Bars::new(hidden);
    let spec = SourceSpec::parse(&args.src);
    let report = convert(
        &spec,
        &HubResolver { progress: &bars },
        &args.output,
        &opts,
        &bars,
    )
    .with_context(|| format!("converting {}", args.src))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}
