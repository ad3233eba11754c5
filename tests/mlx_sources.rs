//! mlx-lm checkpoints keep their codes through the CLI's default path: `mlx_lm convert -q` at
//! several bit widths and group sizes, then `flashpack convert SRC -o P` with no options. The
//! pack stores the source's bits and group size (as `inspect` and the metadata say), and its
//! logits equal mlx-lm's on the same folder. Needs python3 with mlx-lm (CI installs it);
//! skipped with a note otherwise.
//!
//! The architecture x recipe matrix grows by ten recipes with every architecture, so each run
//! checks a sample of it ([`sampled_matrix`]): every recipe on some architecture and every
//! architecture with two recipes, paired anew each run. `FLASHPACK_FULL_MATRIX=1` checks all of
//! it; `FLASHPACK_MATRIX_SEED=N` repeats the sample a run printed.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::fixtures::{FixtureLayout, FixtureSpec};
use flashpack::arch::Arch;
use flashpack::format::{required, DType, Pack, ProjBits, QuantMode};
use flashpack::mlx;
use flashpack::model::Model;
use flashpack::run::experts::{ExpertCache, StoreOptions};
use flashpack::run::open;
use flashpack::run::stream::resident_store;

const PROMPT: &[u32] = &[
    785, 3840, 315, 279, 1879, 374, 264, 3364, 911, 1246, 11, 323, 13,
];

fn python_has_mlx_lm() -> bool {
    crate::common::python::python_imports("mlx_lm", "the mlx-lm source checks")
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
        // mlx-lm's qwen3_5 sanitize reads only fused experts.
        layout: if arch == Arch::Qwen35Moe {
            FixtureLayout::Fused
        } else {
            FixtureLayout::PerExpert
        },
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

/// One `mlx_lm convert -q` recipe.
#[derive(Clone, Copy)]
enum Recipe {
    /// `--q-bits B --q-group-size G`.
    Uniform(u8, usize),
    /// `--quant-predicate NAME`: gate and up at `low` bits, `down_proj` at `high` bits in the
    /// first and last eighth of the layers and every third one between (group 64).
    Mixed(&'static str, u8, u8),
    /// `--q-mode NAME`: microscaling float codes (mxfp4: 4 bits, mxfp8: 8 bits; groups of 32
    /// with power-of-two u8 scales; nvfp4: 4 bits in groups of 16 with E4M3 u8 scales; no
    /// biases).
    Mode(QuantMode),
}

impl Recipe {
    fn label(self) -> String {
        match self {
            Recipe::Uniform(b, g) => format!("q{b}-g{g}"),
            Recipe::Mixed(name, ..) => name.to_string(),
            Recipe::Mode(m) => m.name().to_string(),
        }
    }

    fn convert(self, src: &Path, dst: &Path) {
        match self {
            Recipe::Uniform(b, g) => mlx_lm_folder(src, dst, b, g),
            Recipe::Mixed(name, ..) => mlx_lm_convert(src, dst, &["--quant-predicate", name]),
            Recipe::Mode(m) => mlx_lm_convert(src, dst, &["--q-mode", m.name()]),
        }
    }
}

const RECIPES: [Recipe; 11] = [
    Recipe::Uniform(2, 64),
    Recipe::Uniform(3, 64),
    Recipe::Uniform(6, 64),
    Recipe::Uniform(8, 64),
    Recipe::Uniform(2, 32),
    Recipe::Uniform(5, 32),
    Recipe::Mixed("mixed_2_6", 2, 6),
    Recipe::Mixed("mixed_3_4", 3, 4),
    Recipe::Mode(QuantMode::Mxfp4),
    Recipe::Mode(QuantMode::Mxfp8),
    Recipe::Mode(QuantMode::Nvfp4),
];

/// Recipes per architecture in a sampled run: with nine or more architectures, every recipe
/// is checked on some architecture in each run.
const SAMPLED_PER_ARCH: usize = 2;
const _: () = assert!(SAMPLED_PER_ARCH <= RECIPES.len());

/// Which recipes to check on each architecture: all of them under `FLASHPACK_FULL_MATRIX=1`,
/// else [`sample`] with a seed from `FLASHPACK_MATRIX_SEED` or the clock. The seed is printed,
/// so a failing sample can be run again.
fn sampled_matrix() -> Vec<(Arch, Vec<Recipe>)> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let full = Arch::ALL.len() * RECIPES.len();
    if env("FLASHPACK_FULL_MATRIX").is_some_and(|v| v != "0") {
        eprintln!("recipe matrix: all {full} (FLASHPACK_FULL_MATRIX)");
        return Arch::ALL.iter().map(|&a| (a, RECIPES.to_vec())).collect();
    }
    let seed = match env("FLASHPACK_MATRIX_SEED") {
        Some(v) => v
            .parse::<usize>()
            .expect("FLASHPACK_MATRIX_SEED is a number"),
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as usize,
    } % RECIPES.len();
    eprintln!(
        "recipe matrix: a sample, FLASHPACK_MATRIX_SEED={seed} repeats it \
         (FLASHPACK_FULL_MATRIX=1 checks all {full})"
    );
    sample(seed)
}

/// [`SAMPLED_PER_ARCH`] consecutive recipes (wrapping) per architecture, the n-th architecture
/// starting `SAMPLED_PER_ARCH * n` after `seed`: consecutive architectures take consecutive
/// recipes, and the pairing moves with the seed.
fn sample(seed: usize) -> Vec<(Arch, Vec<Recipe>)> {
    Arch::ALL
        .iter()
        .enumerate()
        .map(|(n, &arch)| {
            let first = seed + SAMPLED_PER_ARCH * n;
            let recipes = (first..first + SAMPLED_PER_ARCH)
                .map(|i| RECIPES[i % RECIPES.len()])
                .collect();
            (arch, recipes)
        })
        .collect()
}

/// Whatever the seed, a sample checks every recipe on some architecture and every
/// architecture with [`SAMPLED_PER_ARCH`] recipes. Needs no mlx-lm.
#[test]
fn every_recipe_sample_covers_every_recipe_and_architecture() {
    for seed in 0..RECIPES.len() {
        let s = sample(seed);
        assert_eq!(s.len(), Arch::ALL.len(), "seed {seed}");
        assert!(s.iter().all(|(_, r)| r.len() == SAMPLED_PER_ARCH));
        let labels: std::collections::BTreeSet<String> = s
            .iter()
            .flat_map(|(_, r)| r.iter().map(|r| r.label()))
            .collect();
        assert_eq!(labels.len(), RECIPES.len(), "seed {seed}: {labels:?}");
    }
}

#[test]
fn mlx_lm_sources_keep_their_bits_and_logits_through_the_default_cli() {
    if !python_has_mlx_lm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (arch, recipes) in sampled_matrix() {
        let src = source(dir.path(), arch);
        for recipe in recipes {
            let what = format!("{} {}", arch.model_type(), recipe.label());
            if arch == Arch::KimiK3 && matches!(recipe, Recipe::Mixed(..)) {
                // mlx-lm's mixed recipes replace the model's own quant_predicate, so they
                // quantize Kimi-K3's one-row `*_res_proj` too, whose weight kimi_k3.py then
                // reads as floats: mlx-lm 0.32.2 cannot run the folder it writes
                // ("[broadcast_shapes] Shapes (192) and (12)"). Nothing to compare with.
                eprintln!("{what}: skipped, mlx-lm cannot run its own conversion");
                continue;
            }
            let mlx_dir = dir
                .path()
                .join(format!("{}-{}", arch.model_type(), recipe.label()));
            recipe.convert(&src, &mlx_dir);
            mlx_lm_logits(&mlx_dir);
            let pack = dir.path().join(format!(
                "{}-{}.flashpack",
                arch.model_type(),
                recipe.label()
            ));
            let out = flashpack(&[
                "convert",
                mlx_dir.to_str().unwrap(),
                "-o",
                pack.to_str().unwrap(),
                "--json",
            ]);
            assert!(
                out.status.success(),
                "{what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(report["requantized_source"], false, "{what}: {report}");
            assert_eq!(report["requantized_experts"], 0, "{what}: {report}");
            if matches!(
                recipe,
                Recipe::Uniform(3, _) | Recipe::Mixed(..) | Recipe::Mode(_)
            ) {
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
            let q = &p.metadata()["quantization"];
            let inspect = flashpack(&["inspect", pack.to_str().unwrap(), "--json"]);
            let inspected: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
            let kinds: Vec<&String> = inspected["expert_bits"]
                .as_object()
                .unwrap()
                .keys()
                .collect();
            if arch == Arch::GptOss {
                // mlx-lm keeps gpt-oss's MXFP4 experts whatever the recipe (they are quantized
                // already); the recipe quantizes the rest.
                assert!(
                    p.experts().iter().all(|e| e.mode == QuantMode::Mxfp4
                        && e.bits == 4
                        && e.group_size == 32
                        && e.scale_dtype == DType::U8
                        && e.bias_dtype.is_some()),
                    "{what}: experts requantized"
                );
                assert_eq!(kinds, vec!["mxfp4"], "{what}");
                assert_eq!(q["mode"], "mxfp4", "{what}: {q}");
                assert_logits_match(&pack, &mlx_dir, &what);
                continue;
            }
            match recipe {
                Recipe::Uniform(bits, group) => {
                    assert!(
                        p.experts()
                            .iter()
                            .all(|e| e.bits == bits && e.group_size as usize == group),
                        "{what}: experts requantized"
                    );
                    assert_eq!(q["expert_bits"], bits, "{what}: {q}");
                    assert_eq!(q["group_size"], group, "{what}: {q}");
                    assert_eq!(kinds, vec![&format!("{bits}-bit")], "{what}");
                }
                Recipe::Mixed(_, low, high) => {
                    // Gate and up keep the low bits; down has the high bits in some layers
                    // (both of these 2-layer models' layers fall in the first or last eighth).
                    let split = ProjBits([low, low, high]);
                    assert!(
                        p.experts().iter().all(|e| e.bits == split || e.bits == low),
                        "{what}: {:?}",
                        p.experts().iter().map(|e| e.bits).collect::<Vec<_>>()
                    );
                    assert!(p.experts().iter().any(|e| e.bits == split), "{what}");
                    assert_ne!(p.header().required_features & required::PROJECTION_BITS, 0);
                    assert_eq!(q["mixed"], true, "{what}: {q}");
                    assert!(q["expert_projection_bits"].is_array(), "{what}: {q}");
                    assert!(
                        kinds.contains(&&format!("{split}-bit")),
                        "{what}: {kinds:?}"
                    );
                }
                Recipe::Mode(m) => {
                    let (bits, group) = m.fixed().unwrap();
                    assert!(
                        p.experts().iter().all(|e| e.mode == m
                            && e.bits == bits
                            && e.group_size == group
                            && e.scale_dtype == DType::U8),
                        "{what}: experts requantized"
                    );
                    assert_ne!(p.header().required_features & required::MX_MODES, 0);
                    assert_eq!(
                        p.header().required_features & required::NVFP4 != 0,
                        m == QuantMode::Nvfp4,
                        "{what}: the NVFP4 flag"
                    );
                    assert_eq!(q["mode"], m.name(), "{what}: {q}");
                    assert_eq!(kinds, vec![m.name()], "{what}");
                    // Dense layers keep their codes too (scales but no biases): the o_proj of
                    // the first layer of full attention (Qwen3-Next's first layers are linear).
                    let cfg = &p.meta().model;
                    let l = (0..cfg.num_hidden_layers)
                        .find(|&l| !cfg.is_linear_layer(l))
                        .unwrap();
                    // (DeepSeek-V4.1's low-rank output ends in `o_b_proj`.)
                    let o = if arch == Arch::DeepseekV41 {
                        "o_b_proj"
                    } else {
                        "o_proj"
                    };
                    let q = format!("model.layers.{l}.self_attn.{o}");
                    let t = p
                        .tensors()
                        .iter()
                        .find(|t| t.name == format!("{q}.weight"))
                        .unwrap();
                    assert_eq!((t.mode, t.bits), (m, bits), "{what}");
                    assert!(!p.tensors().iter().any(|t| t.name == format!("{q}.biases")));
                }
            }

            // And it computes what mlx-lm computes on that folder.
            assert_logits_match(&pack, &mlx_dir, &what);
        }
    }
}

/// flashpack's logits for `PROMPT` from `pack` (every expert resident) equal mlx-lm's, saved in
/// `mlx_dir/logits.safetensors`, within 1/256 of the largest.
fn assert_logits_match(pack: &Path, mlx_dir: &Path, what: &str) {
    let (pack, cfg, weights) = open::open(pack, true).unwrap();
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
    let want = mlx::load_safetensors(&mlx_dir.join("logits.safetensors")).unwrap()["logits"]
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

/// YaRN RoPE (`rope_type` "yarn", as DeepSeek-V3 and long-context configs use it): a factor-4
/// scaling whose correction range falls inside the head's frequencies, with mscale, gives
/// mlx-lm's logits through the default CLI. OLMoE is the architecture here whose mlx-lm model
/// builds its RoPE with `initialize_rope` (mlx-lm's qwen3_moe ignores `rope_scaling`).
#[test]
fn yarn_rope_gives_mlx_lms_logits() {
    if !python_has_mlx_lm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path(), Arch::Olmoe);
    let path = src.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let theta = c["rope_theta"].clone();
    let yarn = serde_json::json!({"factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32, "beta_slow": 1});
    let mut legacy = yarn.clone();
    legacy["type"] = "yarn".into();
    legacy["rope_type"] = "yarn".into();
    c["rope_scaling"] = legacy;
    let mut params = yarn;
    params["rope_type"] = "yarn".into();
    params["rope_theta"] = theta;
    c["rope_parameters"] = params;
    std::fs::write(&path, c.to_string()).unwrap();
    let mlx_dir = dir.path().join("yarn-q4");
    mlx_lm_folder(&src, &mlx_dir, 4, 64);
    mlx_lm_logits(&mlx_dir);
    let pack = dir.path().join("yarn.flashpack");
    let out = flashpack(&[
        "convert",
        mlx_dir.to_str().unwrap(),
        "-o",
        pack.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        Pack::open(&pack).unwrap().meta().model.rope.rope_type,
        "yarn"
    );
    assert_logits_match(&pack, &mlx_dir, "olmoe yarn");
    // The same model without the scaling gives other logits: the test sees YaRN.
    let plain = dir.path().join("plain-q4");
    let mut c2 = c.clone();
    c2["rope_scaling"] = serde_json::Value::Null;
    c2["rope_parameters"] =
        serde_json::json!({"rope_type": "default", "rope_theta": c["rope_theta"]});
    std::fs::write(&path, c2.to_string()).unwrap();
    mlx_lm_folder(&src, &plain, 4, 64);
    mlx_lm_logits(&plain);
    let a = mlx::load_safetensors(&plain.join("logits.safetensors")).unwrap()["logits"]
        .to_vec_f32()
        .unwrap();
    let b = mlx::load_safetensors(&mlx_dir.join("logits.safetensors")).unwrap()["logits"]
        .to_vec_f32()
        .unwrap();
    assert!(
        a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 0.01),
        "yarn changed nothing"
    );
}

#[test]
fn cold_bits_on_an_mlx_lm_source_requantize_and_say_so() {
    if !python_has_mlx_lm() {
        return;
    }
    // Requantizing happens only when asked for: --cold-bits 2 sends the coldest experts to 2
    // bits (every projection, affine), keeps the others as the source has them (mixed 3/4 bits,
    // or mxfp4), and the report says how many were requantized.
    let dir = tempfile::tempdir().unwrap();
    for (arch, recipe) in [
        (Arch::Mixtral, Recipe::Mixed("mixed_3_4", 3, 4)),
        (Arch::Qwen3Moe, Recipe::Mode(QuantMode::Mxfp4)),
        // nvfp4's E4M3 scales decoded for the requantization.
        (Arch::Olmoe, Recipe::Mode(QuantMode::Nvfp4)),
    ] {
        let what = format!("{} {}", arch.model_type(), recipe.label());
        let src = source(dir.path(), arch);
        let mlx_dir = dir.path().join(format!("cold-{}", recipe.label()));
        recipe.convert(&src, &mlx_dir);
        let pack = dir
            .path()
            .join(format!("cold-{}.flashpack", recipe.label()));
        let out = flashpack(&[
            "convert",
            mlx_dir.to_str().unwrap(),
            "-o",
            pack.to_str().unwrap(),
            "--cold-bits",
            "2",
            "--cold-fraction",
            "0.25",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let p = Pack::open(&pack).unwrap();
        let cold = p
            .experts()
            .iter()
            .filter(|e| e.bits == 2 && e.mode == QuantMode::Affine)
            .count() as u64;
        assert!(cold > 0, "{what}: no expert went to 2 bits");
        assert_eq!(report["requantized_source"], true, "{what}: {report}");
        assert_eq!(report["requantized_experts"], cold, "{what}: {report}");
        let kept = |e: &flashpack::format::ExpertEntry| match recipe {
            Recipe::Mode(m) => e.mode == m,
            _ => e.bits == 3 || e.bits == ProjBits([3, 3, 4]),
        };
        assert!(
            p.experts().iter().all(|e| e.bits == 2 || kept(e)),
            "{what}: the others keep their source codes"
        );
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
            "{what}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
}

#[test]
fn greedy_tokens_of_mlx_lm_conversions_of_the_trained_model_through_the_default_cli() {
    if !python_has_mlx_lm() {
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
        let folder = dir.path().join(name);
        // "q{bits}" (group 64), "q{bits}-g{group}", or a recipe's label.
        let recipe = match name.strip_prefix('q') {
            Some(rest) => match rest.split_once("-g") {
                Some((b, g)) => Recipe::Uniform(b.parse().unwrap(), g.parse().unwrap()),
                None => Recipe::Uniform(rest.parse().unwrap(), 64),
            },
            None => *RECIPES
                .iter()
                .find(|r| r.label() == *name)
                .unwrap_or_else(|| panic!("no recipe {name}")),
        };
        recipe.convert(&root.join("fixtures/qwen3moe-tiny"), &folder);
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
                "--json",
            ]);
            assert!(
                run.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&run.stderr)
            );
            let stderr = String::from_utf8_lossy(&run.stderr);
            let report: serde_json::Value =
                serde_json::from_str(stderr.lines().last().unwrap_or("")).unwrap();
            assert_eq!(
                report["token_ids"], case["ids"],
                "{name} {prompt:?} (min gap {})",
                case["min_gap"]
            );
            let text = String::from_utf8_lossy(&run.stdout);
            assert_eq!(
                text.strip_suffix('\n').unwrap_or(&text),
                case["text"].as_str().unwrap(),
                "{name} {prompt:?}"
            );
            compared += 1;
        }
    }
    assert!(compared >= 25, "only {compared} prompts had clear gaps");
    eprintln!("{compared} (recipe, prompt) pairs gave mlx-lm's 20 greedy token ids");
}

/// mlx-lm's nvfp4 conversions with `global_scale=True` carry a per-tensor f32 scale
/// (`<module>.global_scale`) that no pack field holds: convert refuses such a folder by the
/// tensor's name, exits 1 and leaves nothing at the destination, instead of dropping the scale
/// and computing another model.
#[test]
fn nvfp4_global_scales_are_refused_by_name() {
    if !python_has_mlx_lm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path(), Arch::Qwen3Moe);
    let mlx_dir = dir.path().join("nvfp4");
    Recipe::Mode(QuantMode::Nvfp4).convert(&src, &mlx_dir);
    let st = mlx_dir.join("model.safetensors");
    let script = format!(
        "import mlx.core as mx\nw = mx.load({st:?})\n\
         w['model.layers.1.mlp.switch_mlp.up_proj.global_scale'] = mx.ones((12,))\n\
         mx.save_safetensors({st:?}, w, metadata={{'format': 'mlx'}})\n",
        st = st.display().to_string()
    );
    let ok = Command::new("python3")
        .args(["-c", &script])
        .status()
        .unwrap();
    assert!(ok.success());
    let pack = dir.path().join("refused.flashpack");
    let out = flashpack(&[
        "convert",
        mlx_dir.to_str().unwrap(),
        "-o",
        pack.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("model.layers.1.mlp.switch_mlp.up_proj.global_scale")
            && err.contains("global scale"),
        "{err}"
    );
    assert!(!pack.exists());
}
