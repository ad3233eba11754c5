//! Gemma 4 with experts (`gemma4`, mlx-lm's `gemma4_text` inside its multimodal wrapper: sliding
//! and full attention layers with their own head widths, KV heads and RoPE, values that are the
//! keys on the full layers, norms without a weight on the values, a dense GeGLU MLP beside GeGLU
//! experts, a router with its own norm and per-expert scale, sandwich norms, a layer scalar, a
//! logit soft cap) through the default CLI: `flashpack convert SRC -o P` of a Hugging Face folder
//! in transformers' multimodal layout (`model.language_model.*`, fused `experts.gate_up_proj`,
//! vision tensors), and of mlx-lm's 4-bit conversion (its router at 8 bits, kept), give mlx-lm's
//! logits for a 24-token prompt, in one call and in chunks of 5, plus 8 cached decode steps,
//! every expert resident and streaming through 4 slots for 12 experts top-3. For the Hugging
//! Face folder the reference is mlx-lm's conversion with the router kept in bf16, as flashpack's
//! dense policy keeps routers. Then greedy tokens through `flashpack run` on 3 prompts, and every
//! stage. Odd widths: hidden 192, 4 heads of 32 over 2 KV heads on the sliding layers (2 groups),
//! 4 heads of 64 over 1 KV head on the full one, a window of 8 (shorter than the prompt, so the
//! sliding layers drop positions and their rotating caches wrap in prefill and decode). Needs
//! python3 with mlx-lm (CI installs it); skipped with a note otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::fixtures::FixtureSpec;
use crate::common::http::{post, Server};
use crate::common::{chat_two_turns, texts_of};
use flashpack::arch::Arch;
use flashpack::format::Pack;
use serde_json::{json, Value};

use crate::common::mlx_lm;
use mlx_lm::{
    check_resident_and_streaming, convert_every_stage, eval_against, flashpack, flashpack_out,
    greedy_tokens_equal_mlx_lms, mlx_lm_convert_q4, mlx_lm_convert_q4_keeping,
    mlx_lm_logits_chunked, python_has_mlx_lm, streaming_keeps_the_tokens,
};

const PROMPT: &[u32] = &[
    785, 3840, 315, 279, 1879, 374, 264, 3364, 911, 1246, 11, 323, 13, 5112, 42, 977, 8000, 12, 1,
    2048, 333, 4444, 5, 6001,
];
const DECODE: &[u32] = &[17, 4093, 220, 7, 8191, 300, 1500, 64];
const CHUNK: usize = 5;

/// 3 layers (sliding, sliding, full), 12 experts top-3 of width 128 beside a dense MLP of 128,
/// the multimodal layout, the bundled model's tokenizer.
fn spec() -> FixtureSpec {
    FixtureSpec {
        hidden_size: 192,
        num_layers: 3,
        num_experts: 12,
        top_k: 3,
        moe_intermediate_size: 128,
        intermediate_size: 128,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 32,
        global_head_dim: 64,
        global_kv_heads: 1,
        sliding_window: 8,
        vocab_size: 8192,
        multimodal: true,
        tokenizer_from: Some(tiny_tokenizer()),
        ..FixtureSpec::tiny(Arch::Gemma4Text)
    }
}

fn tiny_tokenizer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny")
}

fn write(spec: &FixtureSpec, dir: &Path) -> PathBuf {
    spec.write(dir).unwrap();
    dir.to_path_buf()
}

#[test]
fn gemma4_gives_mlx_lms_logits_and_greedy_tokens_from_bf16_and_mlx_lm_sources() {
    if !python_has_mlx_lm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bf16 = write(&spec(), &d.join("hf-bf16"));
    let mlx_dir = d.join("mlx");
    mlx_lm_convert_q4(&bf16, &mlx_dir);
    mlx_lm_logits_chunked(&mlx_dir, PROMPT, DECODE, CHUNK);
    let bf16_ref = d.join("ref-bf16");
    mlx_lm_convert_q4_keeping(&bf16, &bf16_ref, &["router.proj"]);
    mlx_lm_logits_chunked(&bf16_ref, PROMPT, DECODE, CHUNK);
    let mut worst = Vec::new();
    for (src, reference, label) in [
        (&bf16, &bf16_ref, "hf bf16"),
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
        let p = Pack::open(&pack).unwrap();
        let meta = p.meta().model.clone();
        assert_eq!(meta.arch, Arch::Gemma4Text, "{label}");
        let g = meta.gemma4.clone().expect("the Gemma 4 record");
        assert_eq!(
            (g.global_head_dim, g.global_kv_heads, g.k_eq_v),
            (64, 1, true)
        );
        assert_eq!(meta.window_of(0), Some(8), "{label}");
        assert_eq!(meta.window_of(2), None, "{label}");
        // The text model's names, its router under the layer's moe block, no vision tensor.
        assert!(
            p.tensor("model.layers.2.moe.router.weight").is_some(),
            "{label}"
        );
        assert!(p
            .tensor("model.layers.2.moe.router.per_expert_scale")
            .is_some());
        assert!(p.tensor("model.layers.2.self_attn.v_proj.weight").is_none());
        assert!(p.tensors().iter().all(|t| !t.name.contains("vision")));
        if src == &bf16 {
            greedy_tokens_equal_mlx_lms(&pack, reference, label);
        }
        let w = check_resident_and_streaming(
            &pack,
            reference,
            4,
            (PROMPT, DECODE, Some(CHUNK)),
            &format!("gemma4 {label}"),
        );
        worst.push(format!("{label}: {w}"));
    }
    eprintln!("max |logit diff| against mlx-lm: {worst:?}");
}

/// The checkpoint's config.json is what transformers' own `Gemma4Config` reads (no torch
/// needed), with the text model's fields as flashpack reads them; and the config transformers
/// writes back (`save_pretrained`: the full-attention layers' widths as `per_layer_config`, with
/// `global_head_dim` and `num_global_key_value_heads` null) is read as the same model.
#[test]
fn gemma4_fixture_config_is_transformers_own() {
    let dir = tempfile::tempdir().unwrap();
    let src = write(&spec(), &dir.path().join("src"));
    let script = format!(
        "import json\nfrom transformers import AutoConfig\nc = AutoConfig.from_pretrained({src:?})\n\
         c.save_pretrained({resaved:?})\nt = c.text_config\nprint(json.dumps([type(c).__name__, t.layer_types, t.sliding_window, \
         t.num_experts, t.top_k_experts, t.moe_intermediate_size, t.enable_moe_block, \
         t.attention_k_eq_v, t.hidden_size_per_layer_input, t.num_kv_shared_layers]))\n",
        src = src.display().to_string(),
        resaved = dir.path().join("resaved").display().to_string(),
    );
    if !crate::common::python::python_imports("transformers", "the config's round trip") {
        return;
    }
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    assert_eq!(
        v,
        json!([
            "Gemma4Config",
            ["sliding_attention", "sliding_attention", "full_attention"],
            8,
            12,
            3,
            128,
            true,
            true,
            0,
            0
        ])
    );
    let c = flashpack::arch::ModelConfig::from_file(&src.join("config.json")).unwrap();
    assert_eq!(c.sliding_window.as_ref().unwrap().layers, vec![0, 1]);
    let path = dir.path().join("resaved/config.json");
    let resaved: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let t = &resaved["text_config"];
    assert!(t["global_head_dim"].is_null(), "{t}");
    assert_eq!(
        t["per_layer_config"],
        json!({"2": {"head_dim": 64, "num_key_value_heads": 1}})
    );
    let again = flashpack::arch::ModelConfig::from_file(&path).unwrap();
    assert_eq!(again, c);
}

/// Every stage through the CLI: convert with profiling, cold 2-bit experts and merging,
/// `verify`, `inspect` (the full layer's one KV head of 64 per token, the sliding layers' two
/// of 32 over their window), `eval` against the bf16 source, and `run` under a budget that
/// streams the experts, giving the resident tokens.
#[test]
fn every_stage_runs_on_gemma4() {
    let dir = tempfile::tempdir().unwrap();
    let (calib, text) = texts_of(dir.path(), 400);
    let s = FixtureSpec {
        routing_skew: 0.2,
        ..spec()
    };
    let src = write(&s, &dir.path().join("src"));
    let pack = dir.path().join("gemma4.flashpack");
    let (src_s, pack_s) = (src.to_str().unwrap(), pack.to_str().unwrap());
    let (_, p) = convert_every_stage(&src, &pack, &calib, "gemma4");
    assert_eq!(p.meta().model.arch, Arch::Gemma4Text);
    let inspect = flashpack_out(&["inspect", pack_s, "--json"]);
    let r: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    // The full layer: keys and values of one KV head of 64, x 2 bytes.
    assert_eq!(
        r["kv_cache_bytes_per_token"].as_u64(),
        Some(2 * 64 * 2),
        "{r}"
    );
    // The 2 sliding layers: keys and values of 2 KV heads of 32 over 8 positions, x 2 bytes.
    assert_eq!(
        r["kv_cache_window_bytes"].as_u64(),
        Some(2 * 2 * 2 * 32 * 8 * 2),
        "{r}"
    );
    let text_report =
        String::from_utf8_lossy(&flashpack_out(&["inspect", pack_s]).stdout).into_owned();
    assert!(
        text_report.contains(
            "2 of 3 layers a sliding window of 8; the others 1 KV heads of 64, values = keys, \
             16 rotated"
        ),
        "{text_report}"
    );
    let (kl, top1, e) = eval_against(pack_s, &text, src_s);
    assert!(kl > 0.0 && kl < 2.0, "{e}");
    assert!((0.0..=1.0).contains(&top1), "{e}");
    streaming_keeps_the_tokens(
        pack_s,
        "The history of the lighthouse, told in full",
        "25%",
        p.experts().len() as u64,
        "gemma4",
    );
}

/// The same model from transformers' text-only layout (`gemma4_text`, `model.layers.*`)
/// converts to the pack of the multimodal one, tensor for tensor.
#[test]
fn gemma4_text_only_and_multimodal_layouts_give_one_pack() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let multi = write(&spec(), &d.join("multi"));
    let text = write(
        &FixtureSpec {
            multimodal: false,
            ..spec()
        },
        &d.join("text"),
    );
    let mut packs = Vec::new();
    for (src, name) in [(&multi, "multi"), (&text, "text")] {
        let pack = d.join(format!("{name}.flashpack"));
        flashpack(&[
            "convert",
            src.to_str().unwrap(),
            "-o",
            pack.to_str().unwrap(),
            "--quiet",
        ]);
        packs.push(Pack::open(&pack).unwrap());
    }
    let names = |p: &Pack| {
        p.tensors()
            .iter()
            .map(|t| (t.name.clone(), t.blake3))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&packs[0]), names(&packs[1]));
    let experts = |p: &Pack| {
        p.experts()
            .iter()
            .map(|e| (e.layer, e.expert, e.blake3))
            .collect::<Vec<_>>()
    };
    assert_eq!(experts(&packs[0]), experts(&packs[1]));
}

/// A prompt format in Gemma 4's turns (`<|turn>user\n...<turn|>\n`, the model's turn opened by
/// `<|turn>model\n`, the anchors transformers' serving code reads Gemma 4's answers by), carried
/// in the checkpoint's `chat_template.jinja`: `chat` and `serve` render it, and the prompt's
/// token count says the model read that text.
const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}<|turn>\
{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}<turn|>\n\
{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}";

#[test]
fn gemma4_chats_and_serves_with_its_turn_format() {
    let dir = tempfile::tempdir().unwrap();
    let src = write(&spec(), &dir.path().join("src"));
    std::fs::write(src.join("chat_template.jinja"), TEMPLATE).unwrap();
    let path = src.join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&path, config.to_string()).unwrap();
    let pack = dir.path().join("p.flashpack");
    flashpack(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        pack.to_str().unwrap(),
        "--quiet",
    ]);
    let tokens = |text: &str| -> u64 {
        let tok =
            tokenizers::Tokenizer::from_file(tiny_tokenizer().join("tokenizer.json")).unwrap();
        tok.encode(text, false).unwrap().get_ids().len() as u64
    };
    let bos = {
        let tok: Value = serde_json::from_str(
            &std::fs::read_to_string(tiny_tokenizer().join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        tok["bos_token"].as_str().unwrap_or("").to_string()
    };
    let first = format!("{bos}<|turn>user\nHi<turn|>\n<|turn>model\n");
    let second = format!(
        "{bos}<|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n<|turn>user\nBye<turn|>\n\
         <|turn>model\n"
    );

    // chat: two turns; the first prompt is exactly that text.
    let (turns, stderr) = chat_two_turns(&pack, &[]);
    assert_eq!(turns.len(), 2, "{stderr}");
    assert_eq!(turns[0]["prompt_tokens"], tokens(&first), "{stderr}");

    // serve: the whole conversation in one request.
    let server = Server::start(&pack, &[]);
    let body = json!({
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ],
        "max_tokens": 2, "temperature": 0,
    });
    let r = post(server.addr, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["prompt_tokens"], tokens(&second));
}
