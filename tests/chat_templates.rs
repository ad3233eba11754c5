//! Each new model's own prompt format through convert, `chat` and `serve`: Kimi K2.5 with
//! Kimi's `chat_template.jinja`, GLM-5 (glm_moe_dsa) with GLM's template as a list of named
//! templates in tokenizer_config.json (transformers chats with the one named `default`), and
//! DeepSeek-V3.2 with no template at all (its repository ships Python), which gets flashpack's
//! built-in rendering of its documented format. The tiny models borrow the bundled model's
//! tokenizer, so the prompt's token count says which text the model read.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::chat_two_turns;
use crate::common::fixtures::FixtureSpec;
use crate::common::http::{post, Server};
use flashpack::arch::Arch;
use flashpack::format::Pack;
use flashpack::run::template::{ChatTemplate, Message};
use serde_json::{json, Value};

const SYSTEM: &str = "Be brief.";

fn tiny_tokenizer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny")
}

fn template(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/templates")
            .join(name),
    )
    .unwrap()
}

/// The rendered prompts of [system, "Hi"] and of [system, "Hi", "Hello!", "Bye"], as each
/// model's upstream format writes them.
fn expected(arch: Arch) -> (&'static str, &'static str) {
    match arch {
        Arch::KimiK25 => (
            "<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>Hi\
             <|im_end|><|im_assistant|>assistant<|im_middle|>",
            "<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>Hi\
             <|im_end|><|im_assistant|>assistant<|im_middle|>Hello!<|im_end|><|im_user|>user\
             <|im_middle|>Bye<|im_end|><|im_assistant|>assistant<|im_middle|>",
        ),
        Arch::GlmMoeDsa => (
            "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>",
            "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\n<think></think>\n\
             Hello!<|user|>\nBye<|assistant|>",
        ),
        // DeepSeek-V4.1 ships no Jinja template either; its chat mode is V3.2's.
        Arch::DeepseekV32 | Arch::DeepseekV41 => (
            "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜></think>",
            "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜></think>Hello!\
             <｜end▁of▁sentence｜><｜User｜>Bye<｜Assistant｜></think>",
        ),
        _ => unreachable!(),
    }
}

/// The tiny checkpoint of `arch` with its template where its upstream repository puts it, and
/// without the bundled tokenizer's own template.
fn source(arch: Arch, dir: &Path) {
    FixtureSpec {
        tokenizer_from: Some(tiny_tokenizer()),
        // The bundled tokenizer's ids.
        vocab_size: 8192,
        ..FixtureSpec::tiny(arch)
    }
    .write(dir)
    .unwrap();
    let path = dir.join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let obj = config.as_object_mut().unwrap();
    obj.remove("chat_template");
    match arch {
        Arch::KimiK25 => std::fs::write(
            dir.join("chat_template.jinja"),
            template("moonshotai-Kimi-K2-chat_template.jinja"),
        )
        .unwrap(),
        Arch::GlmMoeDsa => {
            obj.insert(
                "chat_template".into(),
                json!([
                    {"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
                    {"name": "default", "template": template("zai-org-GLM-4.6-chat_template.jinja")},
                ]),
            );
        }
        _ => {}
    }
    std::fs::write(&path, config.to_string()).unwrap();
}

fn convert(src: &Path, pack: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args([
            "convert",
            src.to_str().unwrap(),
            "-o",
            pack.to_str().unwrap(),
        ])
        .args(["--quiet"])
        .output()
        .unwrap()
}

fn tokens(text: &str) -> u64 {
    let tok = tokenizers::Tokenizer::from_file(tiny_tokenizer().join("tokenizer.json")).unwrap();
    tok.encode(text, false).unwrap().get_ids().len() as u64
}

#[test]
fn each_model_chats_and_serves_with_its_own_format() {
    for arch in [
        Arch::KimiK25,
        Arch::GlmMoeDsa,
        Arch::DeepseekV32,
        Arch::DeepseekV41,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        source(arch, &src);
        let pack = dir.path().join("p.flashpack");
        let out = convert(&src, &pack);
        assert!(
            out.status.success(),
            "{arch}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (first, second) = expected(arch);

        // The pack's template (or the built-in one) renders upstream's text.
        let p = Pack::open(&pack).unwrap();
        let t = ChatTemplate::of_pack(&p).expect("a template");
        let turns = [
            Message::new("system", SYSTEM),
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello!"),
            Message::new("user", "Bye"),
        ];
        assert_eq!(t.render(&turns[..2]).unwrap(), first, "{arch}");
        assert_eq!(t.render(&turns).unwrap(), second, "{arch}");
        drop(p);

        // chat: two turns; the first prompt is exactly that text, the second reuses it.
        let (turns_stats, stderr) = chat_two_turns(&pack, &["--system", SYSTEM]);
        assert_eq!(turns_stats.len(), 2, "{arch}: {stderr}");
        assert_eq!(turns_stats[0]["prompt_tokens"], tokens(first), "{arch}");
        // At most a token or two at the seam between the prompt and the answer is recomputed.
        let cached = turns_stats[1]["cached_tokens"].as_u64().unwrap();
        assert!(cached + 2 >= tokens(first), "{arch}: {stderr}");

        // serve: the whole conversation in one request.
        let server = Server::start(&pack, &[]);
        let body = json!({
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"},
            ],
            "max_tokens": 2, "temperature": 0,
        });
        let r = post(server.addr, "/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{arch}: {}", r.text());
        assert_eq!(r.json()["usage"]["prompt_tokens"], tokens(second), "{arch}");
    }
}

/// A list of named templates without `default` is refused before any work, naming the fix.
#[test]
fn named_templates_without_a_default_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    source(Arch::KimiK25, &src);
    std::fs::remove_file(src.join("chat_template.jinja")).unwrap();
    let path = src.join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["chat_template"] = json!([{"name": "tool_use", "template": "x"}]);
    std::fs::write(&path, config.to_string()).unwrap();
    let pack = dir.path().join("p.flashpack");
    let out = convert(&src, &pack);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("tool_use") && stderr.contains("chat_template.jinja"),
        "{stderr}"
    );
    assert!(!pack.exists());
}

/// Kimi's tiktoken tokenizer (no tokenizer.json): the conversion warns naming it, and the pack
/// refuses text saying why and what to do (docs/decisions/0022-tiktoken-tokenizers.md).
#[test]
fn a_tiktoken_tokenizer_is_named_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    source(Arch::KimiK25, &src);
    std::fs::remove_file(src.join("tokenizer.json")).unwrap();
    std::fs::write(src.join("tiktoken.model"), "IQ== 0\n").unwrap();
    let path = src.join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["tokenizer_class"] = json!("TikTokenTokenizer");
    std::fs::write(&path, config.to_string()).unwrap();
    let pack = dir.path().join("p.flashpack");
    let out = convert(&src, &pack);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("tiktoken.model") && stderr.contains("0022"),
        "{stderr}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_flashpack"))
        .args([
            "run",
            pack.to_str().unwrap(),
            "--prompt",
            "Hi",
            "--max-tokens",
            "1",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("TikTokenTokenizer") && stderr.contains("tokenizer.json"),
        "{stderr}"
    );
}
