//! `flashpack inspect PACK [--json]`: what a pack holds.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use flashpack::format::Pack;
use flashpack::inspect::{KindStats, PackReport};
use flashpack::units::{self, Style};

#[derive(clap::Args)]
pub struct InspectArgs {
    /// The .flashpack file.
    pub pack: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn kind(name: &str, s: &KindStats) {
    println!(
        "  {name:<10} {:>12}  {:>14} weights  {:.3} bits/weight",
        units::bytes(s.bytes, Style::PACK),
        s.weights,
        s.bits_per_weight
    );
}

pub fn run(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let pack = Pack::open(&args.pack)
        .with_context(|| format!("{} failed to open", args.pack.display()))?;
    let r = PackReport::new(&pack);
    let profile = flashpack::convert::profile::view(pack.meta());
    if args.json {
        let mut v = serde_json::to_value(&r)?;
        v["profile"] = serde_json::to_value(&profile)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} (flashpack format {})",
        args.pack.display(),
        r.format_version
    );
    println!("architecture  {}", clean(&r.architecture));
    // Kimi-K3's latent MoE: "(hidden 7168, experts on a latent of 2048, expert rows 1024)".
    let latent = if r.expert_hidden_size != r.hidden_size {
        format!(", experts on a latent of {}", r.expert_hidden_size)
    } else {
        String::new()
    };
    println!(
        "layers        {}  (hidden {}{latent}, expert rows {})",
        r.layers, r.hidden_size, r.intermediate_size
    );
    let kv = r.kv_cache_bytes_per_token;
    // Sliding-window layers: a fixed part, the same at any context past the window.
    let window = if r.kv_cache_window_bytes > 0 {
        format!(
            " + {} for the windows",
            units::bytes(r.kv_cache_window_bytes, Style::PACK)
        )
    } else {
        String::new()
    };
    match r.max_position_embeddings {
        Some(n) => println!(
            "attention     {}; KV cache {}/token{window}, {} at {n} tokens",
            r.attention,
            units::bytes(kv, Style::PACK),
            units::bytes(kv * n as u64 + r.kv_cache_window_bytes, Style::PACK)
        ),
        None => println!(
            "attention     {}; KV cache {}/token{window}",
            r.attention,
            units::bytes(kv, Style::PACK)
        ),
    }
    let q = &r.kv_bits;
    if q.quantized_layers > 0 {
        let kept = if q.kept.is_empty() {
            String::new()
        } else {
            format!("; {} kept as it is", q.kept.join(", "))
        };
        println!(
            "              --kv-bits 8: {}/token, 4: {}/token ({} of {} layers quantized{kept})",
            units::bytes(q.bytes_per_token_8bit, Style::PACK),
            units::bytes(q.bytes_per_token_4bit, Style::PACK),
            q.quantized_layers,
            r.layers
        );
    } else {
        println!(
            "              --kv-bits quantizes no layer ({} kept as it is)",
            q.kept.join(", ")
        );
    }
    if r.recurrent_state_bytes > 0 {
        println!(
            "              linear-attention state {} at any context length",
            units::bytes(r.recurrent_state_bytes, Style::PACK)
        );
    }
    let counts: Vec<u32> = r.experts_per_layer.values().copied().collect();
    let (min, max) = (
        counts.iter().min().unwrap_or(&0),
        counts.iter().max().unwrap_or(&0),
    );
    println!(
        "experts       {min}..{max} stored per layer, {} segments",
        r.segments
    );
    println!(
        "file          {}  page size {} B, padding {} ({:.2}%)",
        units::bytes(r.file_bytes, Style::PACK),
        r.page_size,
        units::bytes(r.padding_bytes, Style::PACK),
        r.padding_fraction * 100.0
    );
    println!("sizes");
    kind("dense", &r.dense);
    kind("experts", &r.experts);
    kind("overall", &r.overall);
    println!("expert bits  (gate/up/down where the projections differ)");
    for (bits, s) in &r.expert_bits {
        kind(bits, s);
    }
    print_layer_bits(&r.expert_bits_by_layer);
    println!("dense bits");
    for (bits, s) in &r.dense_bits {
        kind(bits, s);
    }
    println!("codecs (parts, stored bytes)");
    for (codec, (n, bytes)) in &r.codecs {
        println!(
            "  {codec:<22} {n:>8}  {}",
            units::bytes(*bytes, Style::PACK)
        );
    }
    println!(
        "features      required [{}]  optional [{}]",
        r.required_features.join(", "),
        r.optional_features.join(", ")
    );
    // Per-expert tables are summarised by "expert bits by layer" above; --json has them whole.
    let mut q = r.quantization.clone();
    let mut per_expert = Vec::new();
    for key in ["expert_plan", "expert_projection_bits"] {
        if q.as_object_mut().and_then(|o| o.remove(key)).is_some() {
            per_expert.push(key);
        }
    }
    if per_expert.is_empty() {
        println!("quantization  {q}");
    } else {
        println!("quantization  {q}  ({} in --json)", per_expert.join(", "));
    }
    if let Some(p) = &profile {
        print_profile(p);
    }
    let p = &r.provenance;
    println!(
        "source        {}  revision {}",
        clean(p["source"].as_str().unwrap_or("?")),
        clean(p["revision"].as_str().unwrap_or("-"))
    );
    println!(
        "tool          {} {}",
        clean(p["tool"].as_str().unwrap_or("?")),
        clean(p["tool_version"].as_str().unwrap_or("?"))
    );
    if let Some(files) = p["files"].as_array() {
        println!("source files  {}", files.len());
        for f in files {
            println!(
                "  {}  {}  {}",
                clean(f["blake3"].as_str().unwrap_or("?")),
                f["size"],
                clean(f["name"].as_str().unwrap_or("?"))
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Expert bits per layer, consecutive layers with the same bits on one line
/// ("  layers 0-11   4-bit x128").
fn print_layer_bits(
    by_layer: &std::collections::BTreeMap<u32, std::collections::BTreeMap<String, u32>>,
) {
    let describe = |m: &std::collections::BTreeMap<String, u32>| {
        m.iter()
            .map(|(b, n)| format!("{b} x{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut runs: Vec<(u32, u32, String)> = Vec::new();
    for (&layer, m) in by_layer {
        let d = describe(m);
        match runs.last_mut() {
            Some((_, last, prev)) if *prev == d && *last + 1 == layer => *last = layer,
            _ => runs.push((layer, layer, d)),
        }
    }
    if runs.len() <= 1 {
        return;
    }
    println!("expert bits by layer");
    for (a, b, d) in runs {
        let layers = if a == b {
            format!("layer {a}")
        } else {
            format!("layers {a}-{b}")
        };
        println!("  {layers:<16} {d}");
    }
}

/// A string from the pack's metadata, safe to print on a terminal: control characters (escape
/// sequences, newlines, carriage returns) are shown escaped instead of acting on the terminal.
fn clean(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

fn print_profile(p: &flashpack::convert::profile::ProfileView) {
    let tasks: Vec<String> = p
        .tasks
        .iter()
        .map(|(k, n)| format!("{} {n}", clean(k)))
        .collect();
    println!(
        "profile       {} calibration tokens ({})",
        p.tokens,
        tasks.join(", ")
    );
    println!("  layer  top-25% mass  effective experts  cold  merged  hottest (share)");
    for l in &p.layers {
        let hot: Vec<String> = l
            .hottest
            .iter()
            .map(|(e, s)| format!("{e} ({:.1}%)", 100.0 * s))
            .collect();
        println!(
            "  {:>5}  {:>11.1}%  {:>17.1}  {:>4}  {:>6}  {}",
            l.layer,
            100.0 * l.top_quarter_share,
            l.effective_experts,
            l.cold,
            l.merged,
            hot.join(", ")
        );
    }
}
