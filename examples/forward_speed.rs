//! Prefill and decode speed of the Rust forward pass on an mlx-lm folder (all experts resident).
//!
//!     cargo run --release --example forward_speed -- <mlx-lm folder> [prompt_len] [decode_steps]
//!
//! Prints one table row per phase. Compare with mlx-lm on the same folder and machine (the
//! numbers depend on MLX's backend: on Linux CPU it is reference BLAS).

use std::path::PathBuf;
use std::time::Instant;

use flashpack::model::{MlxLmWeights, Model, ResidentExperts};
use flashpack::run::sample::argmax;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or_else(|| {
        anyhow::anyhow!("usage: forward_speed <mlx-lm folder> [prompt_len] [decode_steps]")
    })?);
    let prompt_len: usize = args.next().map_or(Ok(64), |s| s.parse())?;
    let steps: usize = args.next().map_or(Ok(32), |s| s.parse())?;

    let (cfg, w) = MlxLmWeights::open(&dir)?;
    let model = Model::load(&cfg, &w)?;
    let mut experts = ResidentExperts::load(&cfg, &w)?;
    let vocab = cfg.vocab_size;
    let prompt: Vec<u32> = (0..prompt_len).map(|i| (i * 7919 % vocab) as u32).collect();

    // Warm-up: MLX reads the weights lazily on first use.
    let mut cache = model.new_cache();
    model
        .forward_ids(&prompt[..1], &mut cache, &mut experts)?
        .eval()?;

    let mut cache = model.new_cache();
    let t = Instant::now();
    let logits = model.forward_ids(&prompt, &mut cache, &mut experts)?;
    let last = logits.reshape(&[-1, vocab as i32])?.to_vec_f32()?;
    let prefill = t.elapsed().as_secs_f64();
    let mut next = argmax(&last[last.len() - vocab..]);

    let t = Instant::now();
    for _ in 0..steps {
        let logits = model.forward_ids(&[next], &mut cache, &mut experts)?;
        next = argmax(&logits.to_vec_f32()?);
    }
    let decode = t.elapsed().as_secs_f64();

    println!(
        "model: {} ({} layers, {} experts top-{})",
        dir.display(),
        cfg.num_hidden_layers,
        cfg.num_experts,
        cfg.num_experts_per_tok
    );
    println!("| phase   | tokens | seconds | tokens/s |");
    println!("|---------|-------:|--------:|---------:|");
    println!(
        "| prefill | {prompt_len:>6} | {prefill:>7.3} | {:>8.1} |",
        prompt_len as f64 / prefill
    );
    println!(
        "| decode  | {steps:>6} | {decode:>7.3} | {:>8.1} |",
        steps as f64 / decode
    );
    Ok(())
}
