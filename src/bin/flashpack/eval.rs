//! `flashpack eval PACK --text FILE [--reference SOURCE_OR_PACK] [--window N] [--kv-bits 8|4]
//! [--json]`:
//! perplexity of a pack (or an mlx-lm / Hugging Face folder) on a text, and against a
//! reference the mean KL divergence and top-1 agreement.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use flashpack::arch::KvBits;
use flashpack::eval::{evaluate_text, Source};

#[derive(clap::Args)]
pub struct EvalArgs {
    /// The model to score: a .flashpack, an mlx-lm folder, or a Hugging Face folder.
    pub pack: PathBuf,
    /// A UTF-8 text file; it is cut into windows of --window tokens.
    #[arg(long)]
    pub text: PathBuf,
    /// Compare with this model (a Hugging Face folder runs in f32 with 8-bit experts; or an
    /// mlx-lm folder, or another pack).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Tokens per window (capped by the model's context length).
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Score the model with its KV cache quantized to 8 or 4 bits, as `run --kv-bits` runs it
    /// (the reference keeps bf16).
    #[arg(long, value_name = "BITS", value_parser = crate::chat::kv_bits)]
    pub kv_bits: Option<KvBits>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let cand = Source::detect(&args.pack)?;
    let reference = args.reference.as_deref().map(Source::detect).transpose()?;
    let report = evaluate_text(
        &cand,
        reference.as_ref(),
        &args.text,
        args.window,
        args.kv_bits,
    )
    .with_context(|| {
        format!(
            "evaluating {} on {}",
            args.pack.display(),
            args.text.display()
        )
    })?;
    let bytes = cand.weight_bytes()?;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["model"] = serde_json::json!({
            "path": cand.path(),
            "kind": cand.kind(),
            "weight_bytes": bytes,
        });
        if let Some(r) = &reference {
            v["reference"]["path"] = serde_json::json!(r.path());
            v["reference"]["kind"] = serde_json::json!(r.kind());
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} ({}, {:.2} MB of weights) on {}",
        cand.path().display(),
        cand.kind(),
        bytes as f64 / 1e6,
        args.text.display()
    );
    println!(
        "  {} tokens scored in {} windows of up to {}",
        report.tokens, report.windows, report.window
    );
    println!(
        "  perplexity        {:.4}  ({:.4} nats/token)",
        report.perplexity, report.nll
    );
    if let Some(kv) = &report.kv_cache {
        println!(
            "  KV cache          {}-bit on {} of {} layers, {} bytes/token (bf16: {}, {:.3}x)",
            kv.bits,
            kv.quantized_layers,
            kv.layers,
            kv.bytes_per_token,
            kv.bf16_bytes_per_token,
            kv.bytes_per_token as f64 / kv.bf16_bytes_per_token.max(1) as f64
        );
    }
    if let (Some(c), Some(r)) = (&report.reference, &reference) {
        println!(
            "  reference         {:.4}  ({}, {})",
            c.perplexity,
            r.kind(),
            r.path().display()
        );
        println!("  KL(ref || model)  {:.5} nats/token", c.kl_mean);
        println!("  top-1 agreement   {:.2}%", 100.0 * c.top1_agreement);
    }
    Ok(ExitCode::SUCCESS)
}
