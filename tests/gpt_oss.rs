//! gpt-oss (issue #18) through the default CLI, against mlx-lm: the upstream Hugging Face layout
//! (MXFP4 experts with gate and up interleaved by row, expert and attention biases, a sink logit
//! per head, sliding-window layers, YaRN, clamped SwiGLU) that `FixtureSpec` writes, and
//! `mlx_lm convert -q` of it, each converted by `flashpack convert SRC -o P` with no options,
//! give mlx-lm's logits for a prompt three times the window plus 8 cached decode steps (so the
//! sliding layers' rotating cache wraps in prefill and in decode), with every expert resident and
//! streaming through a cache of fewer slots than one layer's experts. The pack keeps the source's
//! MXFP4 codes bit for bit. Needs python3 with mlx-lm (CI installs it); skipped with a note
//! otherwise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::fixtures::FixtureSpec;
use crate::common::short_texts;
use flashpack::arch::{Arch, ClampedSwiglu};
use flashpack::codec::{CodecId, Decoder};
use flashpack::format::{DType, Pack, QuantMode};

use crate::common::mlx_lm;
use mlx_lm::{
    check, eval_against, flashpack, flashpack_out, mlx_lm_convert_q4, mlx_lm_convert_q4_keeping,
    mlx_lm_logits, python_has_mlx_lm, run_ok, run_report,
};

/// The sliding layers' window: the prompt is more than three windows long.
const WINDOW: usize = 8;
const PROMPT: &[u32] = &[
    785, 3840, 315, 279, 1879, 374, 264, 3364, 911, 1246, 11, 323, 13, 5112, 42, 977, 8000, 12, 1,
    2048, 333, 4444, 5, 6001, 90, 7777, 2,
];
const DECODE: &[u32] = &[17, 4093, 220, 7, 8191, 300, 1500, 64];
const _: () = assert!(PROMPT.len() > 3 * WINDOW && PROMPT.len() % WINDOW != 0);
/// Generation's prefill in chunks of 5: chunks straddle the window's edge.
const CHUNK: usize = 5;
const EXPERTS: usize = 8;
const HIDDEN: usize = 192;
const WIDTH: usize = 128;

/// The test model: odd widths (hidden 192, 3 heads of 64 over 1 KV head), 3 layers (sliding,
/// full, sliding), 8 experts of 128 top-3, YaRN over 16 original positions, the window above.
fn spec(seed: u64) -> FixtureSpec {
    let yarn = serde_json::json!({"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
        "beta_slow": 1.0, "original_max_position_embeddings": 16, "truncate": false});
    FixtureSpec {
        hidden_size: HIDDEN,
        num_layers: 3,
        num_experts: EXPERTS,
        top_k: 3,
        moe_intermediate_size: WIDTH,
        num_heads: 3,
        num_kv_heads: 1,
        head_dim: 64,
        vocab_size: 8192,
        rope_scaling: Some(yarn),
        sliding_window: WINDOW,
        swiglu_limit: 7.0,
        seed,
        tokenizer_from: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny")),
        ..FixtureSpec::tiny(Arch::GptOss)
    }
}

fn write(spec: &FixtureSpec, dir: &Path) -> PathBuf {
    spec.write(dir).unwrap();
    dir.to_path_buf()
}

/// The source's U8 tensors of layer `l`'s experts (`gate_up_proj_blocks`, `_scales`, ...).
fn source_codes(hf: &Path, l: usize) -> BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(hf.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let prefix = format!("model.layers.{l}.mlp.experts.");
    st.tensors()
        .into_iter()
        .filter_map(|(name, view)| {
            let short = name.strip_prefix(&prefix)?.to_string();
            (view.dtype() == safetensors::Dtype::U8)
                .then(|| (short, (view.shape().to_vec(), view.data().to_vec())))
        })
        .collect()
}

/// Rows `rows` of expert `e` of a `[E, R, ...]` U8 tensor, each row's bytes concatenated.
fn rows_of(t: &(Vec<usize>, Vec<u8>), e: usize, rows: impl Iterator<Item = usize>) -> Vec<u8> {
    let (shape, data) = t;
    let row: usize = shape[2..].iter().product();
    let base = e * shape[1] * row;
    rows.flat_map(|r| &data[base + r * row..base + (r + 1) * row])
        .copied()
        .collect()
}

/// The pack's decoded segments of every expert of layer `l` hold the source's codes and
/// exponents bit for bit: in the WEIGHTS part gate (the even rows of `gate_up_proj_blocks`), up
/// (the odd rows), down (`down_proj_blocks`), two E2M1 codes a byte, the first in the low
/// nibble, as MLX packs them; the AUX part starts with the E8M0 exponents in the same order
/// (formats/flashpack-v1.md §6.2; mxfp4 has no affine biases).
fn assert_codes_kept(pack: &Pack, hf: &Path, l: usize, what: &str) {
    let src = source_codes(hf, l);
    let (gu_b, gu_s) = (&src["gate_up_proj_blocks"], &src["gate_up_proj_scales"]);
    let (d_b, d_s) = (&src["down_proj_blocks"], &src["down_proj_scales"]);
    let mut dec = Decoder::new();
    for e in 0..EXPERTS {
        let segs = pack.expert_segments(l as u32, e as u32);
        assert_eq!(segs.len(), 1, "{what}: one segment by default");
        let s = &segs[0];
        assert_eq!((s.row_start, s.row_count), (0, WIDTH as u32), "{what}");
        let stored = pack.segment_stored(s);
        let split = s.weights_stored_len as usize;
        let mut weights = vec![0u8; s.weights_decoded_len as usize];
        let n = dec
            .decode_into(
                CodecId::try_from(s.weight_codec).unwrap(),
                &stored[..split],
                &mut weights,
            )
            .unwrap();
        assert_eq!(n, weights.len(), "{what}");
        let want = [
            rows_of(gu_b, e, (0..WIDTH).map(|r| 2 * r)),
            rows_of(gu_b, e, (0..WIDTH).map(|r| 2 * r + 1)),
            rows_of(d_b, e, 0..HIDDEN),
        ]
        .concat();
        assert_eq!(
            weights.len(),
            want.len(),
            "{what}: 4 bits per weight, nothing else in WEIGHTS"
        );
        assert!(
            weights == want,
            "{what}: layer {l} expert {e}: codes changed"
        );
        let mut aux = vec![0u8; s.aux_decoded_len() as usize];
        dec.decode_into(
            CodecId::try_from(s.aux_codec).unwrap(),
            &stored[split..],
            &mut aux,
        )
        .unwrap();
        let exps = [
            rows_of(gu_s, e, (0..WIDTH).map(|r| 2 * r)),
            rows_of(gu_s, e, (0..WIDTH).map(|r| 2 * r + 1)),
            rows_of(d_s, e, 0..HIDDEN),
        ]
        .concat();
        assert!(
            aux.len() >= exps.len() && aux[..exps.len()] == exps[..],
            "{what}: layer {l} expert {e}: E8M0 exponents changed"
        );
    }
}

/// The model record, the expert directory and `inspect` of a gpt-oss pack converted with no
/// options: MXFP4 experts, the config's attention features.
fn assert_gpt_oss_pack(pack: &Path, what: &str) {
    let p = Pack::open(pack).unwrap();
    let meta = &p.meta().model;
    assert_eq!(meta.arch, Arch::GptOss, "{what}");
    assert_eq!(meta.bos_token_id, None, "{what}: no BOS");
    assert_eq!(meta.rope.rope_type, "yarn", "{what}");
    assert_eq!(
        (meta.window_of(0), meta.window_of(1), meta.window_of(2)),
        (Some(WINDOW), None, Some(WINDOW)),
        "{what}"
    );
    assert!(
        meta.attention_sinks && meta.expert_bias && meta.attention_bias,
        "{what}"
    );
    assert_eq!(
        meta.clamped_swiglu,
        Some(ClampedSwiglu {
            alpha: 1.702,
            limit: 7.0
        }),
        "{what}"
    );
    assert_eq!(p.experts().len(), 3 * EXPERTS, "{what}: every layer sparse");
    for e in p.experts() {
        assert_eq!(
            (e.mode, e.bits.max(), e.group_size, e.scale_dtype),
            (QuantMode::Mxfp4, 4, 32, DType::U8),
            "{what}: layer {} expert {} kept in MXFP4",
            e.layer,
            e.expert
        );
    }
    let names: Vec<&str> = p.tensors().iter().map(|t| t.name.as_str()).collect();
    for n in [
        "model.layers.0.self_attn.sinks",
        "model.layers.0.self_attn.o_proj.bias",
        "model.layers.0.mlp.router.bias",
    ] {
        assert!(names.contains(&n), "{what}: {n} in {names:?}");
    }
    assert!(
        !names
            .iter()
            .any(|n| n.contains("_blocks") || n.contains("experts.")),
        "{what}: the experts are in the expert directory only: {names:?}"
    );
    let out = flashpack_out(&["inspect", pack.to_str().unwrap(), "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<&String> = r["expert_bits"].as_object().unwrap().keys().collect();
    assert_eq!(kinds, vec!["mxfp4"], "{what}: {r}");
    assert_eq!(r["architecture"], "gpt_oss", "{what}");
}

#[test]
fn gpt_oss_gives_mlx_lms_logits_from_hf_mxfp4_and_mlx_lm_sources() {
    if !python_has_mlx_lm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hf = write(&spec(0), &d.join("hf"));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization_config"]["quant_method"], "mxfp4");
    let mlx_dir = d.join("mlx");
    mlx_lm_convert_q4(&hf, &mlx_dir);
    mlx_lm_logits(&mlx_dir, PROMPT, DECODE);
    // The reference for the Hugging Face source: mlx-lm's 4-bit conversion with the router left
    // in bf16, as flashpack's dense policy keeps routers (mlx-lm's gpt_oss quant_predicate stores
    // it at 8 bits; a pack of its folder keeps those codes). The experts keep their MXFP4 codes
    // either way.
    let hf_ref = d.join("ref");
    mlx_lm_convert_q4_keeping(&hf, &hf_ref, &["mlp.router"]);
    mlx_lm_logits(&hf_ref, PROMPT, DECODE);
    for (src, reference, label) in [
        (&hf, &hf_ref, "hf mxfp4"),
        (&mlx_dir, &mlx_dir, "mlx-lm 4-bit"),
    ] {
        let pack = d.join(format!("{}.flashpack", label.replace(' ', "-")));
        flashpack(&[
            "convert",
            src.to_str().unwrap(),
            "-o",
            pack.to_str().unwrap(),
            "--quiet",
        ]);
        assert_gpt_oss_pack(&pack, label);
        let p = Pack::open(&pack).unwrap();
        for l in 0..3 {
            assert_codes_kept(&p, &hf, l, label);
        }
        let router = p.tensor("model.layers.1.mlp.router.weight").unwrap();
        let want = if src == &hf { 0 } else { 8 };
        assert_eq!(router.bits, want, "{label}: the router's precision");
        check(
            &pack,
            reference,
            None,
            (PROMPT, DECODE, Some(CHUNK)),
            &format!("gpt_oss {label} resident"),
        );
        // 3 slots for 8 experts top-3: every token's experts fill the cache, every layer
        // evicts, and prefill chunks route to more experts than fit.
        check(
            &pack,
            reference,
            Some(3),
            (PROMPT, DECODE, Some(CHUNK)),
            &format!("gpt_oss {label} streaming"),
        );
    }
}

/// Splits an MXFP4 gpt-oss folder into two float ones holding the same expert values in bf16:
/// mlx-lm's own layout (`experts.{gate,up,down}_proj.{weight,bias}`, which its `sanitize`
/// keeps as is) and transformers' (`experts.gate_up_proj` `[E, H, 2I]` with gate and up
/// interleaved along the last axis, `gate_up_proj_bias`, `down_proj` `[E, I, H]`,
/// `down_proj_bias`: what transformers saves for every bf16 gpt-oss fine-tune).
const SPLIT_MXFP4: &str = r#"
import json, os, shutil, sys
import mlx.core as mx
src, mlx_dir, tf_dir = sys.argv[1:4]
w = mx.load(os.path.join(src, "model.safetensors"))
cfg = json.load(open(os.path.join(src, "config.json")))
cfg.pop("quantization_config")
ours, tf = {}, {}
for k, v in w.items():
    if ".mlp.experts." not in k:
        ours[k] = tf[k] = v
        continue
    pre, name = k.split(".mlp.experts.")
    pre += ".mlp.experts."
    if name.endswith("_blocks"):
        base = name[: -len("_blocks")]
        full = mx.dequantize(v.view(mx.uint32).flatten(-2), w[pre + base + "_scales"],
                             group_size=32, bits=4, mode="mxfp4").astype(mx.bfloat16)
        if base == "gate_up_proj":
            ours[pre + "gate_proj.weight"] = full[:, ::2, :]
            ours[pre + "up_proj.weight"] = full[:, 1::2, :]
        else:
            ours[pre + "down_proj.weight"] = full
        tf[pre + base] = full.transpose(0, 2, 1)
    elif name == "gate_up_proj_bias":
        ours[pre + "gate_proj.bias"] = v[..., ::2]
        ours[pre + "up_proj.bias"] = v[..., 1::2]
        tf[k] = v
    elif name == "down_proj_bias":
        ours[pre + "down_proj.bias"] = tf[k] = v
for d, t in ((mlx_dir, ours), (tf_dir, tf)):
    os.makedirs(d)
    mx.save_safetensors(os.path.join(d, "model.safetensors"),
                        {k: mx.contiguous(x) for k, x in t.items()})
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    for f in os.listdir(src):
        if f.startswith("tokenizer"):
            shutil.copy(os.path.join(src, f), d)
"#;

/// gpt-oss in transformers' float layout (issue 29: every fine-tune transformers saves), which
/// convert refused before: `flashpack convert SRC -o P` with no options reads it and gives the
/// logits mlx-lm gives for the same bf16 weights in its own layout, resident and streaming, in
/// one call and in chunks.
#[test]
fn gpt_oss_in_transformers_float_layout_gives_mlx_lms_logits() {
    if !python_has_mlx_lm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hf = write(&spec(3), &d.join("mxfp4"));
    let (ours, tf) = (d.join("mlx-layout"), d.join("transformers"));
    run_ok(
        Command::new("python3").args([
            "-c",
            SPLIT_MXFP4,
            hf.to_str().unwrap(),
            ours.to_str().unwrap(),
            tf.to_str().unwrap(),
        ]),
        "split the MXFP4 experts into bf16 layouts",
    );
    // mlx-lm's 4-bit conversion of the same weights, the router kept in bf16 as flashpack's
    // dense policy keeps it.
    let reference = d.join("ref");
    mlx_lm_convert_q4_keeping(&ours, &reference, &["mlp.router"]);
    mlx_lm_logits(&reference, PROMPT, DECODE);
    let pack = d.join("transformers.flashpack");
    flashpack(&[
        "convert",
        tf.to_str().unwrap(),
        "-o",
        pack.to_str().unwrap(),
        "--quiet",
    ]);
    let p = Pack::open(&pack).unwrap();
    assert_eq!(p.meta().model.arch, Arch::GptOss);
    let e = p
        .experts()
        .iter()
        .find(|e| e.layer == 1 && e.expert == 5)
        .expect("expert 5 of layer 1");
    assert_eq!(
        (e.bits.0, e.mode, e.group_size, e.bias_dtype.is_some()),
        ([4; 3], QuantMode::Affine, 64, true),
        "bf16 experts quantized as convert's default, with their biases"
    );
    for (slots, what) in [(None, "resident"), (Some(3), "streaming")] {
        check(
            &pack,
            &reference,
            slots,
            (PROMPT, DECODE, Some(CHUNK)),
            &format!("gpt_oss transformers layout {what}"),
        );
    }
}

/// Every stage through the CLI: convert with profiling (the source run layer by layer with its
/// sinks, windows and clamped experts), cold 2-bit experts (requantized from MXFP4, the hot ones
/// keep their codes) and merging, `inspect`, `verify`, `eval` against the MXFP4 source, and
/// `run` of a text prompt under a budget that streams the experts.
#[test]
fn every_stage_runs_on_gpt_oss() {
    let dir = tempfile::tempdir().unwrap();
    let (calib, text) = short_texts(dir.path());
    let s = FixtureSpec {
        routing_skew: 0.2,
        ..spec(0)
    };
    let src = write(&s, &dir.path().join("src"));
    let pack = dir.path().join("gpt_oss.flashpack");
    let (src_s, pack_s) = (src.to_str().unwrap(), pack.to_str().unwrap());
    let out = flashpack_out(&[
        "convert",
        src_s,
        "-o",
        pack_s,
        "--cold-bits",
        "2",
        "--cold-fraction",
        "0.5",
        "--merge-threshold",
        "0.1",
        "--calibration",
        calib.to_str().unwrap(),
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = Pack::open(&pack).unwrap();
    // Three sparse layers of 8 experts, half of them cold: requantized to 2-bit affine codes;
    // the hot ones keep the source's MXFP4 (an expert merged from others is requantized).
    let cold = p
        .experts()
        .iter()
        .filter(|e| e.mode == QuantMode::Affine && e.bits.max() == 2)
        .count();
    let hot = p
        .experts()
        .iter()
        .filter(|e| e.mode == QuantMode::Mxfp4 && e.bits.max() == 4)
        .count();
    assert!(cold > 0 && hot > 0, "{cold} cold, {hot} hot: {report}");
    assert!(
        p.experts()
            .iter()
            .all(|e| matches!(e.mode, QuantMode::Mxfp4 | QuantMode::Affine)),
        "{report}"
    );
    assert!(p.metadata()["profile"].is_object(), "the profile is stored");

    let inspect = flashpack_out(&["inspect", pack_s, "--json"]);
    let r: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let kv = r["kv_cache_bytes_per_token"].as_u64().unwrap();
    // Keys and values of 1 KV head of 64 in bf16: at least the full-attention layer's per token,
    // at most every layer's (the sliding layers hold a window of 8 whatever the context).
    assert!((2 * 64 * 2..=3 * 2 * 64 * 2).contains(&kv), "{r}");
    assert!(r["attention"]
        .as_str()
        .unwrap()
        .starts_with("GQA, 3 heads / 1 KV heads of 64"));
    // Cold experts at 2 bits, hot ones in MXFP4; a merged expert is requantized (4-bit affine or
    // MXFP4).
    let kinds: Vec<&str> = r["expert_bits"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert!(
        kinds.contains(&"2-bit")
            && kinds.contains(&"mxfp4")
            && kinds
                .iter()
                .all(|k| ["2-bit", "4-bit", "mxfp4"].contains(k)),
        "{r}"
    );
    let human = flashpack_out(&["inspect", pack_s]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("KV cache"));
    flashpack(&["verify", pack_s]);

    // A random model's next-token distribution is nearly flat, so top-1 agreement is noise; the
    // KL of the 2-bit, merged pack against the MXFP4 source is what eval measures. The eval
    // window (64) is 8 sliding windows.
    let (kl, top1, e) = eval_against(pack_s, &text, src_s);
    assert!(kl > 0.0 && kl < 2.0, "{e}");
    assert!((0.0..=1.0).contains(&top1), "{e}");

    // Under an ample budget every expert stays; under an expert budget of 45% of them they
    // stream, and greedy decoding gives the same tokens. The text prompt and 12 new tokens run
    // past the window.
    let run = |budget: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "run",
            pack_s,
            "--prompt",
            "The history of the world is a story about how, and.",
            "--max-tokens",
            "12",
            "--json",
        ];
        args.extend_from_slice(budget);
        run_report(&args)
    };
    let n = |j: &serde_json::Value, k: &str| j[k].as_u64().unwrap();
    let ample = run(&["--mem-budget", "1GiB"]);
    let j = run(&["--expert-budget", "45%"]);
    assert_eq!(j["token_ids"].as_array().map(Vec::len), Some(12), "{j}");
    let prompt_tokens = n(&j["generation"], "prompt_tokens") as usize;
    assert!(
        prompt_tokens > WINDOW,
        "the prompt alone passes the window: {j}"
    );
    assert_eq!(
        j["token_ids"], ample["token_ids"],
        "streaming changes nothing"
    );
    let c = &j["expert_cache"];
    let stored = p.experts().len() as u64;
    assert!(n(c, "slots") < stored, "{stored} experts, {c}");
    assert!(n(c, "experts_loaded") > n(c, "slots"), "{c}");
}

/// A gpt-oss pack carries its harmony chat template (from the source's `chat_template.jinja`),
/// and `run` renders it by default: the prompt the model sees is the template's system, user and
/// assistant-start turns around the text, far longer than the text alone (`--raw`); both run.
#[test]
fn gpt_oss_runs_its_harmony_template_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = write(&spec(2), &dir.path().join("src"));
    // The fixture's context (64 positions) is shorter than the template's system turn.
    let cfg = src.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["max_position_embeddings"] = 4096.into();
    std::fs::write(&cfg, c.to_string()).unwrap();
    std::fs::copy(
        root.join("fixtures/templates/gpt-oss-chat_template.jinja"),
        src.join("chat_template.jinja"),
    )
    .unwrap();
    let pack = dir.path().join("harmony.flashpack");
    let pack_s = pack.to_str().unwrap();
    flashpack(&["convert", src.to_str().unwrap(), "-o", pack_s, "--quiet"]);
    let meta = Pack::open(&pack).unwrap().metadata().clone();
    assert!(
        meta["chat_template"]
            .as_str()
            .is_some_and(|t| t.contains("<|start|>assistant")),
        "the pack keeps the harmony template"
    );
    let prompt_tokens = |extra: &[&str]| -> u64 {
        let mut args = vec![
            "run",
            pack_s,
            "--prompt",
            "Hi",
            "--max-tokens",
            "4",
            "--json",
        ];
        args.extend_from_slice(extra);
        let j = run_report(&args);
        assert_eq!(j["token_ids"].as_array().map(Vec::len), Some(4), "{j}");
        j["generation"]["prompt_tokens"].as_u64().unwrap()
    };
    let (templated, raw) = (prompt_tokens(&[]), prompt_tokens(&["--raw"]));
    // "<|start|>system<|message|>You are ChatGPT, ...<|end|><|start|>user<|message|>Hi<|end|>
    // <|start|>assistant": dozens of tokens (this fixture's tokenizer spells the markers out).
    assert!(templated > raw + 30, "templated {templated}, raw {raw}");
}

/// Prefix reuse on sliding windows: once a window has dropped positions the cache cannot be cut
/// back, so a next prompt that extends the last prompt but not the answer generated after it
/// (a harmony chat's next turn: the template renders the answer without its reasoning) starts
/// from the checkpoint at the end of the last prompt, and gives a cold engine's tokens. A next
/// prompt that extends the answer too reuses everything.
#[test]
fn gpt_oss_reuses_the_last_prompt_past_the_window() {
    use flashpack::progress::Silent;
    use flashpack::run::engine::{Engine, EngineOptions, Request};
    use flashpack::run::open;
    use flashpack::run::sample::SamplerOptions;
    let dir = tempfile::tempdir().unwrap();
    let src = write(&spec(3), &dir.path().join("src"));
    let cfg = src.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["max_position_embeddings"] = 4096.into();
    std::fs::write(&cfg, c.to_string()).unwrap();
    let pack = dir.path().join("reuse.flashpack");
    flashpack(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        pack.to_str().unwrap(),
        "--quiet",
    ]);
    let (pack, cfg, weights) = open::open(&pack, true).unwrap();
    let opts = EngineOptions {
        positions: 256,
        ..EngineOptions::default()
    };
    let req = Request {
        max_tokens: 6,
        sampler: SamplerOptions::default(),
        logprobs: None,
        stop: Vec::new(),
    };
    let mut warm = Engine::new(&pack, &cfg, &weights, &opts, &Silent).unwrap();
    let mut cold = Engine::new(&pack, &cfg, &weights, &opts, &Silent).unwrap();
    let run = |e: &mut Engine<'_>, p: &[u32]| {
        let g = e.generate(p, &req, &Silent, |_| true).unwrap().generation;
        (g.tokens, g.cached_tokens)
    };
    let first = warm
        .encode("The history of the world is a story about how, and why, and when.")
        .unwrap();
    assert!(first.len() > 2 * WINDOW, "the prompt wraps the window");
    let (_, cached) = run(&mut warm, &first);
    assert_eq!(cached, 0);
    // The next turn: the last prompt, then other text than the answer.
    let mut next = first.clone();
    next.extend(
        warm.encode(" Tell me more about the Roman empire.")
            .unwrap(),
    );
    assert_eq!(warm.shared_prefix(&next), first.len());
    let (reused, cached) = run(&mut warm, &next);
    assert_eq!(
        cached,
        first.len(),
        "restarts from the end of the last prompt"
    );
    let (fresh, _) = run(&mut cold, &next);
    assert_eq!(reused, fresh, "the checkpoint changes no token");
    // Everything so far, then more: all of it reused.
    let mut agent = next.clone();
    agent.extend(&reused);
    agent.extend(warm.encode(" And then?").unwrap());
    let (again, cached) = run(&mut warm, &agent);
    assert_eq!(cached, next.len() + reused.len() - 1);
    cold.reset();
    let (fresh, _) = run(&mut cold, &agent);
    assert_eq!(again, fresh);
    // A prompt that leaves the last one early cannot be cut back to: computed whole.
    let other = warm.encode("A different question").unwrap();
    let (_, cached) = run(&mut warm, &other);
    assert_eq!(cached, 0);
}
