//! Each family's format on text written as its template writes an earlier call back (the
//! template fixtures in fixtures/templates/ where the repository has them: GLM-4.6's
//! `<tool_call>{name}\n<arg_key>..`, Qwen3's `<tool_call>\n{"name": ..., "arguments": ...}\n
//! </tool_call>`, gpt-oss's `to=functions.` commentary), streamed in pieces of every size.

use super::*;
use serde_json::json;

fn weather_tools() -> Vec<Value> {
    vec![json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "options": {"type": "object"},
        }},
    }})]
}

fn c(name: &str, args: Value) -> Out {
    Out::Call(ToolCall {
        name: name.into(),
        arguments: args,
    })
}

fn t(s: &str) -> Out {
    Out::Text(s.into())
}

/// Scans `text` whole and streamed in pieces of 1, 2, 3, 5 and 7 characters: all give `want`
/// (text pieces joined).
fn check(format: ToolFormat, text: &str, want: &[Out]) {
    let tools = weather_tools();
    assert_eq!(
        parse(format, &tools, text),
        want,
        "{format:?} whole: {text:?}"
    );
    let chars: Vec<char> = text.chars().collect();
    for n in [1, 2, 3, 5, 7] {
        let mut scan = ToolScan::new(format, tools.clone());
        let mut got: Vec<Out> = Vec::new();
        for piece in chars.chunks(n) {
            got.extend(scan.push(&piece.iter().collect::<String>()));
        }
        got.extend(scan.finish());
        let mut joined: Vec<Out> = Vec::new();
        for o in got {
            match (joined.last_mut(), o) {
                (Some(Out::Text(a)), Out::Text(b)) => a.push_str(&b),
                (_, o) => joined.push(o),
            }
        }
        assert_eq!(joined, want, "{format:?} in pieces of {n}: {text:?}");
    }
}

#[test]
fn qwen3_json_calls_nested_unicode_several_and_malformed() {
    let f = ToolFormat::QwenJson;
    check(
        f,
        "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich 東京\", \"options\": {\"units\": [\"c\", {\"deep\": true}]}}}\n</tool_call>",
        &[
            t("Let me check.\n"),
            c("get_weather", json!({"city": "Zürich 東京", "options": {"units": ["c", {"deep": true}]}})),
        ],
    );
    // Two calls, a newline between them as the template writes it (dropped).
    check(
        f,
        "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": \"{\\\"x\\\": 1}\"}\n</tool_call>",
        &[c("a", json!({})), c("b", json!({"x": 1}))],
    );
    // Malformed JSON stays text, and so does a call never closed that does not parse.
    let bad = "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": }\n</tool_call> after";
    check(f, bad, &[t(bad)]);
    check(f, "see <tool_call> tags", &[t("see <tool_call> tags")]);
    // A call that generation ended before its closing tag, but whole: a call.
    check(
        f,
        "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"q\": \"<tool_call>\"}}",
        &[c("a", json!({"q": "<tool_call>"}))],
    );
    // Text that only looks like the start of a marker.
    check(f, "a < b and <tool", &[t("a < b and <tool")]);
}

#[test]
fn qwen3_coder_xml_calls_take_types_from_the_schema() {
    let f = ToolFormat::QwenXml;
    check(
        f,
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nSão Paulo\n</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=options>\n{\"units\": {\"t\": \"c\"}}\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=other>\n<parameter=n>\n3\n</parameter>\n</function>\n</tool_call>",
        &[
            c("get_weather", json!({"city": "São Paulo", "days": 3, "options": {"units": {"t": "c"}}})),
            // Not declared: kept as the text it was.
            c("other", json!({"n": "3"})),
        ],
    );
    let bad =
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>";
    check(f, bad, &[t(bad)]);
}

#[test]
fn glm_calls_as_glm_4_6s_template_writes_them() {
    let f = ToolFormat::Glm;
    // zai-org-GLM-4.6-chat_template.jinja: '\n<tool_call>' + name, then per argument
    // <arg_key>k</arg_key>\n<arg_value>v</arg_value>, strings raw, others tojson.
    check(
        f,
        "\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n<arg_key>options</arg_key>\n<arg_value>{\"a\": [1, {\"b\": null}]}</arg_value>\n</tool_call><tool_call>noargs\n</tool_call>",
        &[
            t("\n"),
            c("get_weather", json!({"city": "北京", "days": 2, "options": {"a": [1, {"b": null}]}})),
            c("noargs", json!({})),
        ],
    );
    let bad = "<tool_call>get_weather\n<arg_key>city</arg_key>\nParis</arg_value>\n</tool_call>";
    check(f, bad, &[t(bad)]);
}

#[test]
fn deepseek_v3_and_v31_calls() {
    let f = ToolFormat::DeepSeek;
    check(
        f,
        "Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Москва\", \"options\": {\"x\": [1, 2]}}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>b\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        &[
            t("Checking."),
            c("get_weather", json!({"city": "Москва", "options": {"x": [1, 2]}})),
            c("b", json!({})),
        ],
    );
    // V3.1: the name before the separator, no fence.
    check(
        f,
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        &[c("get_weather", json!({"city": "Paris"}))],
    );
    let bad = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    check(f, bad, &[t(bad)]);
}

#[test]
fn kimi_k2_calls() {
    let f = ToolFormat::Kimi;
    check(
        f,
        "Sure.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Kraków\", \"options\": {\"n\": {\"m\": 1}}}<|tool_call_end|><|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>{\"city\": \"Oslo\"}<|tool_call_end|><|tool_calls_section_end|>",
        &[
            t("Sure."),
            c("get_weather", json!({"city": "Kraków", "options": {"n": {"m": 1}}})),
            c("get_weather", json!({"city": "Oslo"})),
        ],
    );
    let bad = "<|tool_calls_section_begin|><|tool_call_begin|>get_weather<|tool_call_argument_begin|>{\"city\": \"Oslo\"}<|tool_call_end|><|tool_calls_section_end|>";
    check(f, bad, &[t(bad)]);
}

#[test]
fn gpt_oss_harmony_calls() {
    let f = ToolFormat::Harmony;
    check(
        f,
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Tōkyō\", \"options\": {\"a\": {\"b\": [true]}}}<|call|>",
        &[c("get_weather", json!({"city": "Tōkyō", "options": {"a": {"b": [true]}}}))],
    );
    // The recipient before the channel; the call's end token not in the text (it is an
    // end-of-sequence token).
    check(
        f,
        "<|start|>assistant to=functions.lookup<|channel|>commentary json<|message|>{\"q\": \"x\"}",
        &[c("lookup", json!({"q": "x"}))],
    );
    let bad =
        "<|start|>assistant<|channel|>commentary to=functions.get_weather<|message|>{oops}<|call|>";
    check(f, bad, &[t(bad)]);
}

#[test]
fn no_format_is_plain_text() {
    let s = "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>";
    check(ToolFormat::None, s, &[t(s)]);
}

#[test]
fn the_format_is_found_from_the_template_then_the_model_type() {
    let fixture = |name: &str| {
        std::fs::read_to_string(format!(
            "{}/fixtures/templates/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    };
    let d = ToolFormat::detect;
    assert_eq!(
        d(
            "glm4_moe",
            &fixture("zai-org-GLM-4.6-chat_template.jinja"),
            false
        ),
        ToolFormat::Glm
    );
    assert_eq!(
        d("gpt_oss", &fixture("gpt-oss-chat_template.jinja"), true),
        ToolFormat::Harmony
    );
    assert_eq!(
        d(
            "qwen3_moe",
            &fixture("Qwen-Qwen3-chat_template.jinja"),
            false
        ),
        ToolFormat::QwenJson
    );
    // llama.cpp's copy of Kimi-K2's template writes no calls: Kimi by its turn markers.
    assert_eq!(
        d(
            "deepseek_v3",
            &fixture("moonshotai-Kimi-K2-chat_template.jinja"),
            false
        ),
        ToolFormat::Kimi
    );
    assert_eq!(
        d("deepseek_v3", "{{ '<｜tool▁calls▁begin｜>' }}", false),
        ToolFormat::DeepSeek
    );
    assert_eq!(
        d("qwen3_5_moe", "<tool_call>\\n<function=", false),
        ToolFormat::QwenXml
    );
    assert_eq!(d("qwen3_moe", "", false), ToolFormat::QwenJson);
    assert_eq!(d("mixtral", "", false), ToolFormat::None);
}
