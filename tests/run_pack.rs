//! The runtime on packs: mlx-lm-quantized checkpoints converted into packs (same codes) give
//! mlx-lm's logits, with all experts resident and when streaming through a small cache with
//! prefetch; and `flashpack run` on the bundled trained model, with its error cases.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use flashpack::arch::Arch;
use flashpack::convert::{convert_checkpoint, load::Checkpoint, ConvertOptions};
use flashpack::mlx::{self, Array};
use flashpack::model::Model;
use flashpack::progress::Silent;
use flashpack::run::experts::{ExpertCache, PolicyKind, StoreOptions};
use flashpack::run::open;
use flashpack::run::stream::StreamingExperts;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

// Same tolerance as the forward-pass golden tests (src/run/compute/tests.rs): one bf16 step of
// the largest logit, in case CI's CPU kernels differ; on this machine the difference is 0.
const LOGIT_TOL_REL: f32 = 1.0 / 256.0;

fn max_diff(a: &Array, b: &Array) -> (f32, f32) {
    let (a, b) = (a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    (d, b.iter().map(|y| y.abs()).fold(0f32, f32::max))
}

fn ids(a: &Array) -> Vec<u32> {
    a.to_vec::<i32>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect()
}

fn pack_of(golden: &str, dir: &Path, segments: usize) -> PathBuf {
    let out = dir.join(format!("{golden}.flashpack"));
    let ck = Checkpoint::open(&fixture(&format!("golden/{golden}"))).unwrap();
    // Ask for the source's own bits so every code is copied, not requantized.
    let bits = if golden.ends_with("-q2") { 2 } else { 4 };
    let opts = ConvertOptions {
        segments,
        page_size: 4096,
        expert_bits: bits,
        dense_bits: bits,
        ..ConvertOptions::default()
    };
    convert_checkpoint(&ck, &out, &opts, &Silent, Instant::now()).unwrap();
    out
}

/// Prefill + 8 cached decode steps through a pack; returns the worst logit difference.
fn check(golden: &str, budget_experts: Option<u64>, segments: usize) -> f32 {
    let dir = tempfile::tempdir().unwrap();
    let path = pack_of(golden, dir.path(), segments);
    let (pack, cfg, weights) = open::open(&path, true).unwrap();
    let model = Model::load(&cfg, &weights).unwrap();
    let slot_bytes = {
        let e = &pack.experts()[0];
        let per_row = e.decoded_len / e.row_count as u64;
        per_row * pack.intermediate_size() as u64
    };
    let opts = StoreOptions {
        budget_bytes: budget_experts.map(|n| n * slot_bytes),
        policy: PolicyKind::Lru,
        verify: true,
        ..StoreOptions::default()
    };
    let mut cache = ExpertCache::new(&pack, &opts).unwrap();
    if budget_experts.is_none() {
        cache.warm_all(&pack).unwrap();
    }
    let mut experts =
        StreamingExperts::new(&pack, cache, cfg.num_experts, budget_experts.is_some());
    let g: BTreeMap<String, Array> =
        mlx::load_safetensors(&fixture(&format!("golden/{golden}/golden.safetensors"))).unwrap();
    let prompt = ids(&g["prompt"]);
    let mut kv = model.new_cache();
    // One prefill call, as mlx-lm's golden run did: a layer routes to at most its 4 experts,
    // which fit the streaming cache; evictions happen between layers.
    let chunk = prompt.len();
    let mut worst = 0f32;
    let mut at = 0;
    for part in prompt.chunks(chunk) {
        let logits = model.forward_ids(part, &mut kv, &mut experts).unwrap();
        let n = part.len() as i32;
        let logits = logits.reshape(&[n, -1]).unwrap();
        let v = logits.dim(-1).unwrap() as i32;
        let want = g["prefill_logits"].slice(&[at, 0], &[at + n, v]).unwrap();
        let (d, s) = max_diff(&logits, &want);
        assert!(
            d <= LOGIT_TOL_REL * s,
            "{golden} prefill at {at}: {d} at scale {s}"
        );
        worst = worst.max(d);
        at += n;
    }
    for (step, &t) in ids(&g["decode_tokens"]).iter().enumerate() {
        let logits = model
            .forward_ids(&[t], &mut kv, &mut experts)
            .unwrap()
            .reshape(&[1, -1])
            .unwrap();
        let v = logits.dim(-1).unwrap() as i32;
        let want = g["decode_logits"]
            .slice(&[step as i32, 0], &[step as i32 + 1, v])
            .unwrap();
        let (d, s) = max_diff(&logits, &want);
        assert!(
            d <= LOGIT_TOL_REL * s,
            "{golden} decode step {step}: {d} at scale {s}"
        );
        worst = worst.max(d);
    }
    if budget_experts.is_some() {
        let stats = experts.cache_stats();
        assert!(
            stats.experts_loaded > stats.slots as u64,
            "the small cache must have evicted: {stats:?}"
        );
    }
    worst
}

#[test]
fn packs_match_mlx_lm_all_resident() {
    for arch in Arch::ALL {
        for bits in [4, 2] {
            let name = format!("{arch}-q{bits}");
            let worst = check(&name, None, 1);
            eprintln!("{name}: all resident, max |logit diff| {worst}");
        }
    }
}

#[test]
fn packs_match_mlx_lm_streaming_through_a_small_cache() {
    // Goldens have 2 sparse layers x 4 experts, top-2: 4 slots for 8 experts force evictions
    // at every layer, and prefetch guesses run in the background.
    for arch in Arch::ALL {
        let name = format!("{arch}-q4");
        let worst = check(&name, Some(4), 1);
        eprintln!("{name}: streaming, max |logit diff| {worst}");
    }
}

/// Logits of `prompt` (all positions) on a pack converted from the trained bf16 model.
fn trained_logits(
    dir: &Path,
    segments: usize,
    budget_experts: Option<u64>,
    prompt: &[u32],
) -> Vec<f32> {
    let out = dir.join(format!("trained-{segments}.flashpack"));
    if !out.exists() {
        let ck = Checkpoint::open(&fixture("qwen3moe-tiny")).unwrap();
        let opts = ConvertOptions {
            segments,
            ..ConvertOptions::default()
        };
        convert_checkpoint(&ck, &out, &opts, &Silent, Instant::now()).unwrap();
    }
    let (pack, cfg, weights) = open::open(&out, true).unwrap();
    let model = Model::load(&cfg, &weights).unwrap();
    let segment_bytes: u64 = pack
        .expert_segments(0, 0)
        .iter()
        .map(|e| e.decoded_len)
        .sum();
    let opts = StoreOptions {
        budget_bytes: budget_experts.map(|n| n * segment_bytes),
        verify: true,
        ..StoreOptions::default()
    };
    let mut cache = ExpertCache::new(&pack, &opts).unwrap();
    if budget_experts.is_none() {
        cache.warm_all(&pack).unwrap();
    }
    let mut experts =
        StreamingExperts::new(&pack, cache, cfg.num_experts, budget_experts.is_some());
    let mut kv = model.new_cache();
    // One token per call, so that 40 slots always suffice (top-4 of 32 per layer).
    let mut all = Vec::new();
    for &t in prompt {
        all.extend(
            model
                .forward_ids(&[t], &mut kv, &mut experts)
                .unwrap()
                .to_vec_f32()
                .unwrap(),
        );
    }
    all
}

#[test]
fn vertical_segments_and_streaming_change_nothing_on_the_trained_model() {
    let dir = tempfile::tempdir().unwrap();
    let prompt: Vec<u32> = (0..24).map(|i| 100 + 37 * i).collect();
    let resident = trained_logits(dir.path(), 1, None, &prompt);
    let differ = |other: Vec<f32>| {
        let n = other.iter().zip(&resident).filter(|(a, b)| a != b).count();
        let d = other
            .iter()
            .zip(&resident)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        (n, d)
    };
    assert_eq!(
        differ(trained_logits(dir.path(), 1, None, &prompt)),
        (0, 0.0),
        "same pack twice"
    );
    // Same codes reassembled from two row segments per expert; then streamed through 40 of 192 slots.
    assert_eq!(
        differ(trained_logits(dir.path(), 2, None, &prompt)),
        (0, 0.0),
        "two segments"
    );
    assert_eq!(
        differ(trained_logits(dir.path(), 2, Some(40), &prompt)),
        (0, 0.0),
        "two segments, streamed"
    );
    assert_eq!(
        differ(trained_logits(dir.path(), 1, Some(40), &prompt)),
        (0, 0.0),
        "streamed"
    );
}

fn flashpack(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn run_cli_on_the_bundled_model() {
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("tiny.flashpack");
    let p = pack.to_str().unwrap();
    let out = flashpack(&[
        "convert",
        fixture("qwen3moe-tiny").to_str().unwrap(),
        "-o",
        p,
        "--quiet",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = flashpack(&[
        "run",
        p,
        "--prompt",
        "The history of",
        "--max-tokens",
        "12",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    // Greedy, readable English from the trained model (and only the text on stdout).
    assert!(text.starts_with(" the world"), "{text:?}");
    let stats: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stderr).lines().last().unwrap()).unwrap();
    assert_eq!(stats["generation"]["generated_tokens"], 12);
    assert_eq!(stats["generation"]["prompt_tokens"], 3);

    // The same greedy text when streaming experts through a cache smaller than the model.
    let out = flashpack(&[
        "run",
        p,
        "--prompt",
        "The history of",
        "--max-tokens",
        "12",
        "--mem-budget",
        "16MB",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), text);
    let stats: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stderr).lines().last().unwrap()).unwrap();
    assert!(stats["expert_cache"]["slots"].as_u64().unwrap() < 192);
    assert!(stats["expert_cache"]["bytes_read"].as_u64().unwrap() > 0);

    // --skip-uncached: 0 changes nothing; a high threshold skips reads and says how many.
    let out = flashpack(&[
        "run",
        p,
        "--prompt",
        "The history of",
        "--max-tokens",
        "12",
        "--mem-budget",
        "16MB",
        "--skip-uncached",
        "0",
        "--json",
    ]);
    assert_eq!(String::from_utf8(out.stdout).unwrap(), text);
    let out = flashpack(&[
        "run",
        p,
        "--prompt",
        "The history of",
        "--max-tokens",
        "12",
        "--mem-budget",
        "16MB",
        "--skip-uncached",
        "0.3",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let skipped: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stderr).lines().last().unwrap()).unwrap();
    assert!(
        skipped["stream"]["skipped"].as_u64().unwrap() > 0,
        "{skipped}"
    );
    assert!(
        skipped["expert_cache"]["bytes_read"].as_u64()
            < stats["expert_cache"]["bytes_read"].as_u64()
    );

    // Errors: empty prompt, budget too small, damaged pack, bad flag.
    let out = flashpack(&["run", p, "--prompt", ""]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("prompt is empty"));
    let out = flashpack(&["run", p, "--prompt", "x", "--mem-budget", "1MB"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("too small"));
    let out = flashpack(&["run", p, "--prompt", "x", "--mem-budget", "plenty"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad size"));
    let out = flashpack(&["run", p, "--prompt", "x", "--temperature", "hot"]);
    assert_eq!(out.status.code(), Some(2));
    let bytes = std::fs::read(&pack).unwrap();
    let cut = dir.path().join("cut.flashpack");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = flashpack(&["run", cut.to_str().unwrap(), "--prompt", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("truncated"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn prompt_longer_than_the_context_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = pack_of("qwen3_moe-q4", dir.path(), 1);
    let (pack, cfg, weights) = open::open(&path, false).unwrap();
    let model = Model::load(&cfg, &weights).unwrap();
    let mut cache = ExpertCache::new(&pack, &StoreOptions::default()).unwrap();
    cache.warm_all(&pack).unwrap();
    let mut experts = StreamingExperts::new(&pack, cache, cfg.num_experts, false);
    let context = cfg.max_position_embeddings.unwrap();
    let prompt = vec![1u32; context];
    let opts = flashpack::run::generate::GenerateOptions {
        max_tokens: 4,
        sampler: Default::default(),
        prefill_chunk: 512,
        eos: vec![],
        host_sampling: false,
    };
    let err = flashpack::run::generate::generate(&model, &mut experts, &prompt, &opts, |_| true)
        .unwrap_err();
    assert!(
        matches!(
            err,
            flashpack::run::generate::GenerateError::PromptTooLong { .. }
        ),
        "{err}"
    );
}

#[test]
fn run_takes_a_prompt_file_refuses_non_files_and_bounds_the_queue_depth() {
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("tiny.flashpack");
    let p = pack.to_str().unwrap();
    let src = fixture("qwen3moe-tiny");
    assert!(
        flashpack(&["convert", src.to_str().unwrap(), "-o", p, "--quiet"])
            .status
            .success()
    );
    let base = ["run", p, "--max-tokens", "6", "--raw"];
    let want = flashpack(&[&base[..], &["--prompt", "The history of"]].concat());
    assert!(
        want.status.success(),
        "{}",
        String::from_utf8_lossy(&want.stderr)
    );

    // --prompt-file FILE and --prompt-file - (standard input) give the same text.
    let file = dir.path().join("prompt.txt");
    std::fs::write(&file, "The history of").unwrap();
    let got = flashpack(&[&base[..], &["--prompt-file", file.to_str().unwrap()]].concat());
    assert_eq!(got.stdout, want.stdout);
    let mut child = Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args(base)
        .args(["--prompt-file", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"The history of")
        .unwrap();
    assert_eq!(child.wait_with_output().unwrap().stdout, want.stdout);
    // Neither, or both: usage errors.
    assert_eq!(flashpack(&base).status.code(), Some(2));
    let both = flashpack(
        &[
            &base[..],
            &["--prompt", "x", "--prompt-file", file.to_str().unwrap()],
        ]
        .concat(),
    );
    assert_eq!(both.status.code(), Some(2));
    let missing = flashpack(&[&base[..], &["--prompt-file", "/nonexistent/prompt.txt"]].concat());
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/prompt.txt"));

    // A queue depth that would spawn millions of threads is a usage error.
    let deep = flashpack(&[&base[..], &["--prompt", "x", "--queue-depth", "100000000"]].concat());
    assert_eq!(deep.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&deep.stderr).contains("1 to 256"));

    // A folder or a FIFO given as PACK: a clear error at once, not "No such device" or a hang.
    let fifo = dir.path().join("pipe.flashpack");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for (path, says) in [
        (dir.path(), "is a folder"),
        (fifo.as_path(), "not a regular file"),
    ] {
        for cmd in [
            vec!["run", path.to_str().unwrap(), "--prompt", "x"],
            vec!["inspect", path.to_str().unwrap()],
            vec!["verify", path.to_str().unwrap()],
        ] {
            let out = flashpack(&cmd);
            assert_eq!(out.status.code(), Some(1), "{cmd:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(says), "{cmd:?}: {err}");
        }
    }
}

/// A long prompt shows its progress on stderr (the threshold, normally a second, is set to 0 so
/// the test does not depend on the machine's speed); stdout keeps only the text.
#[test]
fn run_shows_the_prompts_progress() {
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("tiny.flashpack");
    let p = pack.to_str().unwrap();
    let src = fixture("qwen3moe-tiny");
    assert!(
        flashpack(&["convert", src.to_str().unwrap(), "-o", p, "--quiet"])
            .status
            .success()
    );
    let prompt = "The history of the world is a story about how, and the first. ".repeat(12);
    // 32MB: chunks of under a hundred tokens, so the prompt takes several.
    let args = [
        "run",
        p,
        "--prompt",
        &prompt,
        "--max-tokens",
        "2",
        "--raw",
        "--mem-budget",
        "32MB",
    ];
    let out = Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args(args)
        .env("FLASHPACK_PROGRESS_AFTER_MS", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("prompt: ")).collect();
    assert!(lines.len() >= 3, "{err}");
    let total: usize = err
        .lines()
        .find_map(|l| l.strip_prefix("prompt ")?.split(' ').next()?.parse().ok())
        .unwrap();
    assert_eq!(
        lines.last().unwrap(),
        &format!("prompt: {total}/{total} tokens")
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("prompt:"));
    // --json keeps stderr to the one JSON report.
    let out = Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args(args)
        .arg("--json")
        .env("FLASHPACK_PROGRESS_AFTER_MS", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("prompt: "), "{err}");
}
