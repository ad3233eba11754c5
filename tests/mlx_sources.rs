//! mlx-lm checkpoints keep their codes through the CLI's default path: `mlx_lm convert -q` at
//! several bit widths and group sizes, then `flashpack convert SRC -o P` with no options. The
//! pack stores the source's bits and group size (as `inspect` and the metadata say), and its
//! logits equal mlx-lm's on the same folder. Needs python3 with mlx-lm (CI installs it);
//! skipped with a note otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

use flashpack::arch::Arch;
use flashpack::convert::fixtures::FixtureSpec;
use flashpack::format::Pack;
use flashpack::mlx;
use flashpack::run::compute::Model;
use flashpack::run::experts::{ExpertCache, StoreOptions};
use flashpack::run::open;
use flashpack::run::stream::resident_store;

const PROMPT: &[u32] = &[
    785, 3840, 315, 279, 1879, 374, 264, 3364, 911, 1246, 11, 323, 13,
];

fn python_has_mlx_lm() -> bool {
    Command::new("python3")
        .args(["-c", "import mlx_lm"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `mlx_lm convert -q` of `src` into `dst` at `bits` and `group`.
fn mlx_lm_folder(src: &Path, dst: &Path, bits: u8, group: usize) {
    let (b, g) = (bits.to_string(), group.to_string());
    mlx_lm_convert(src, dst, &["--q-bits", &b, "--q-group-size", &g]);
}

/// `mlx_lm convert -q ARGS` of `src` into `dst`.
fn mlx_lm_convert(src: &Path, dst: &Path, args: &[&str]) {
    let st = Command::new("python3")
        .args(["-m", "mlx_lm", "convert", "--hf-path"])
        .arg(src)
        .arg("--mlx-path")
        .arg(dst)
        .arg("-q")
        .args(args)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
}

/// mlx-lm's logits for `PROMPT` on the folder `dst`, saved as `dst/logits.safetensors`
/// (f32 `[L, vocab]`).
fn mlx_lm_logits(dst: &Path) {
    let ids: Vec<String> = PROMPT.iter().map(|t| t.to_string()).collect();
    let script = format!(
        "import mlx.core as mx\nfrom mlx_lm import load\nm, _ = load({dst:?})\n\
         l = m(mx.array([[{ids}]]))[0].astype(mx.float32)\n\
         mx.save_safetensors({out:?}, {{'logits': l}})\n",
        dst = dst.display().to_string(),
        ids = ids.join(", "),
        out = dst.join("logits.safetensors").display().to_string(),
    );
    let st = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
}

fn flashpack(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args(args)
        .output()
        .unwrap()
}

fn source(dir: &Path, arch: Arch) -> PathBuf {
    let src = dir.join(format!("src-{}", arch.model_type()));
    FixtureSpec {
        // Not the defaults: 3 heads of 64, one KV head, 12 experts, top-3.
        hidden_size: 192,
        num_layers: 2,
        num_experts: 12,
        top_k: 3,
        moe_intermediate_size: 128,
        intermediate_size: 320,
        shared_expert_intermediate_size: 192,
        num_heads: 3,
        num_kv_heads: 1,
        head_dim: 64,
        vocab_size: 8192,
        tokenizer_from: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny")),
        ..FixtureSpec::tiny(arch)
    }
    .write(&src)
    .unwrap();
    if arch == Arch::Qwen2Moe {
        // mlx-lm 0.32.2's qwen2_moe.py never renormalizes the top-k weights, whatever
        // `norm_topk_prob` says; flashpack follows the config, as transformers does. Real
        // Qwen2-MoE checkpoints have it false, where the two agree.
        let path = src.join("config.json");
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        c["norm_topk_prob"] = false.into();
        std::fs::write(&path, c.to_string()).unwrap();
    }
    src
}

#[test]
fn mlx_lm_sources_keep_their_bits_and_logits_through_the_default_cli() {
    if !python_has_mlx_lm() {
        eprintln!("note: python3 with mlx_lm is not importable; mlx-lm source checks skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for arch in [Arch::Qwen3Moe, Arch::Mixtral, Arch::Olmoe, Arch::Qwen2Moe] {
        let src = source(dir.path(), arch);
        for (bits, group) in [(2u8, 64usize), (3, 64), (6, 64), (8, 64), (2, 32), (5, 32)] {
            let what = format!("{} {bits}-bit group {group}", arch.model_type());
            let mlx_dir = dir
                .path()
                .join(format!("{}-q{bits}-g{group}", arch.model_type()));
            mlx_lm_folder(&src, &mlx_dir, bits, group);
            mlx_lm_logits(&mlx_dir);
            let pack = dir
                .path()
                .join(format!("{}-q{bits}-g{group}.flashpack", arch.model_type()));
            let out = flashpack(&[
                "convert",
                mlx_dir.to_str().unwrap(),
                "-o",
                pack.to_str().unwrap(),
                "--quiet",
            ]);
            assert!(
                out.status.success(),
                "{what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            if bits == 3 {
                // Reproducible: a second conversion of the same folder gives the same bytes.
                let again = dir.path().join("again.flashpack");
                let out = flashpack(&[
                    "convert",
                    mlx_dir.to_str().unwrap(),
                    "-o",
                    again.to_str().unwrap(),
                    "--quiet",
                ]);
                assert!(out.status.success());
                assert!(
                    std::fs::read(&again).unwrap() == std::fs::read(&pack).unwrap(),
                    "{what}: two conversions differ"
                );
            }

            // What the pack says it holds is what the source holds.
            let p = Pack::open(&pack).unwrap();
            assert!(
                p.experts()
                    .iter()
                    .all(|e| e.bits == bits && e.group_size as usize == group),
                "{what}: experts requantized"
            );
            let q = &p.metadata()["quantization"];
            assert_eq!(q["expert_bits"], bits, "{what}: {q}");
            assert_eq!(q["group_size"], group, "{what}: {q}");
            let inspect = flashpack(&["inspect", pack.to_str().unwrap(), "--json"]);
            let report: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
            let kinds: Vec<&String> = report["expert_bits"].as_object().unwrap().keys().collect();
            assert_eq!(kinds, vec![&format!("{bits}-bit")], "{what}");

            // And it computes what mlx-lm computes on that folder.
            let (pack, cfg, weights) = open::open(&pack, true).unwrap();
            let model = Model::load(&cfg, &weights).unwrap();
            let mut c = ExpertCache::new(&pack, &StoreOptions::default()).unwrap();
            c.warm_all(&pack).unwrap();
            let mut store = resident_store(&c, &cfg.sparse_layers(), cfg.num_experts)
                .unwrap()
                .unwrap();
            let mut kv = model.new_cache();
            let got = model
                .forward_ids(PROMPT, &mut kv, &mut store)
                .unwrap()
                .to_vec_f32()
                .unwrap();
            let want = mlx::load_safetensors(&mlx_dir.join("logits.safetensors")).unwrap()
                ["logits"]
                .to_vec_f32()
                .unwrap();
            assert_eq!(got.len(), want.len(), "{what}");
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                diff <= scale / 256.0,
                "{what}: max |logit diff| {diff} at scale {scale}"
            );
            eprintln!("{what}: max |logit diff| {diff}");
        }
    }
}

#[test]
fn mixed_recipes_convert_and_say_what_they_requantized() {
    if !python_has_mlx_lm() {
        eprintln!("note: python3 with mlx_lm is not importable; mlx-lm source checks skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // mixed_3_4 / mixed_2_6 give the experts' down_proj more bits than gate and up in some
    // layers; a flashpack expert has one precision, so those experts are stored at the larger
    // bits (requantizing the smaller ones), and the report and metadata say so.
    for (arch, recipe, low, high) in [
        (Arch::Qwen3Moe, "mixed_2_6", 2u8, 6u8),
        (Arch::Mixtral, "mixed_3_4", 3, 4),
    ] {
        let src = source(dir.path(), arch);
        let mlx_dir = dir.path().join(format!("{}-{recipe}", arch.model_type()));
        mlx_lm_convert(&src, &mlx_dir, &["--quant-predicate", recipe]);
        let pack = dir
            .path()
            .join(format!("{}-{recipe}.flashpack", arch.model_type()));
        let out = flashpack(&[
            "convert",
            mlx_dir.to_str().unwrap(),
            "-o",
            pack.to_str().unwrap(),
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{recipe}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let p = Pack::open(&pack).unwrap();
        let bits: std::collections::BTreeSet<u8> = p.experts().iter().map(|e| e.bits).collect();
        assert!(
            bits.iter().all(|b| [low, high].contains(b)),
            "{recipe}: {bits:?}"
        );
        let q = &p.metadata()["quantization"];
        assert_eq!(q["mixed"], true, "{recipe}: {q}");
        let requantized = report["requantized_experts"].as_u64().unwrap();
        assert_eq!(
            report["requantized_source"],
            requantized > 0,
            "{recipe}: {report}"
        );
        // The pack runs.
        let run = flashpack(&[
            "run",
            pack.to_str().unwrap(),
            "--prompt",
            "The history of",
            "--raw",
            "--max-tokens",
            "4",
        ]);
        assert!(
            run.status.success(),
            "{recipe}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        eprintln!("{recipe}: expert bits {bits:?}, {requantized} experts requantized");
    }
}

#[test]
fn greedy_tokens_of_mlx_lm_conversions_of_the_trained_model_through_the_default_cli() {
    if !python_has_mlx_lm() {
        eprintln!("note: python3 with mlx_lm is not importable; mlx-lm source checks skipped");
        return;
    }
    // scripts/golden_tokens.py: mlx-lm's greedy ids and smallest top-2 log-prob gap per prompt.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let goldens: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("fixtures/golden/tokens-qwen3moe-tiny.json")).unwrap(),
    )
    .unwrap();
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("fixtures/qwen3moe-tiny/config.json")).unwrap(),
    )
    .unwrap();
    let eos = cfg["eos_token_id"].as_u64();
    let dir = tempfile::tempdir().unwrap();
    let mut compared = 0;
    for (name, cases) in goldens.as_object().unwrap() {
        let bits: u8 = name[1..].parse().unwrap();
        let folder = dir.path().join(name);
        mlx_lm_folder(&root.join("fixtures/qwen3moe-tiny"), &folder, bits, 64);
        let pack = dir.path().join(format!("{name}.flashpack"));
        let out = flashpack(&[
            "convert",
            folder.to_str().unwrap(),
            "-o",
            pack.to_str().unwrap(),
            "--quiet",
        ]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for case in cases.as_array().unwrap() {
            // A smaller gap can be decided by bf16 rounding; EOS would end flashpack's run early.
            let ids: Vec<u64> = serde_json::from_value(case["ids"].clone()).unwrap();
            if case["min_gap"].as_f64().unwrap() < 0.06 || ids.iter().any(|&t| Some(t) == eos) {
                continue;
            }
            let prompt = case["prompt"].as_str().unwrap();
            let run = flashpack(&[
                "run",
                pack.to_str().unwrap(),
                "--prompt",
                prompt,
                "--raw",
                "--temperature",
                "0",
                "--max-tokens",
                "20",
            ]);
            assert!(
                run.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&run.stderr)
            );
            let text = String::from_utf8_lossy(&run.stdout);
            assert_eq!(
                text.strip_suffix('\n').unwrap_or(&text),
                case["text"].as_str().unwrap(),
                "{name} {prompt:?} (min gap {})",
                case["min_gap"]
            );
            compared += 1;
        }
    }
    assert!(compared >= 10, "only {compared} prompts had clear gaps");
}
