use super::*;
use crate::run::engine::Finish;

const LIMITS: Limits = Limits {
    default_max_tokens: 512,
    max_tokens: 4096,
};

const PACK: PackTraits = PackTraits {
    thinking_switch: true,
};

fn parse(body: &str) -> Result<Parsed, ApiError> {
    parse_messages(body.as_bytes(), &LIMITS, PACK, false)
}

#[test]
fn a_messages_request_becomes_the_templates_conversation() {
    let p = parse(
        r#"{"model":"m","max_tokens":50,"system":[{"type":"text","text":"Be brief."},{"type":"text","text":"Use tools."}],
        "messages":[
          {"role":"user","content":"Weather in Paris?"},
          {"role":"assistant","content":[{"type":"thinking","thinking":"..","signature":"x"},
             {"type":"text","text":"Let me check."},
             {"type":"tool_use","id":"toolu_1","name":"get_weather","input":{"city":"Paris","days":[1,2]}}]},
          {"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":[{"type":"text","text":"20 C"}]},
             {"type":"text","text":"Thanks"}]}],
        "tools":[{"name":"get_weather","description":"Weather","input_schema":{"type":"object","properties":{"city":{"type":"string"}}}}],
        "tool_choice":{"type":"any"},"stop_sequences":["END"],"temperature":0.5,"top_p":0.9,"top_k":20,
        "metadata":{"user_id":"u"},"thinking":{"type":"disabled"},"stream":true}"#,
    )
    .unwrap();
    let Prompt::Chat(m) = &p.prompt else {
        panic!("{:?}", p.prompt)
    };
    let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "tool", "user"]);
    assert_eq!(m[0].content, "Be brief.\n\nUse tools.");
    assert_eq!(m[2].content, "Let me check.");
    assert_eq!(
        m[2].tool_calls.as_ref().unwrap()[0],
        json!({"id": "toolu_1", "type": "function",
               "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}})
    );
    assert_eq!(
        (m[3].content.as_str(), m[3].tool_call_id.as_deref()),
        ("20 C", Some("toolu_1"))
    );
    assert_eq!(m[4].content, "Thanks");
    let tools = p.render.tools.as_ref().unwrap();
    assert_eq!(
        tools[0]["function"]["parameters"]["properties"]["city"]["type"],
        "string"
    );
    assert_eq!(tools[0]["function"]["description"], "Weather");
    assert_eq!(p.render.enable_thinking, Some(false));
    assert!(p.parse_tools && p.stream);
    assert_eq!(p.request.max_tokens, 50);
    assert_eq!(p.request.stop, ["END"]);
    assert_eq!(p.request.sampler.top_k, 20);
    // A template without the switch: `thinking` is accepted and ignored.
    let body = r#"{"max_tokens":5,"messages":[{"role":"user","content":"x"}],"thinking":{"type":"enabled","budget_tokens":1024}}"#;
    let q = parse_messages(
        body.as_bytes(),
        &LIMITS,
        PackTraits {
            thinking_switch: false,
        },
        false,
    )
    .unwrap();
    assert_eq!(q.render.enable_thinking, None);
    assert_eq!(parse(body).unwrap().render.enable_thinking, Some(true));
    // count_tokens takes the body without max_tokens.
    let count = r#"{"messages":[{"role":"user","content":"x"}]}"#;
    assert!(parse_messages(count.as_bytes(), &LIMITS, PACK, true).is_ok());
    // A budget past the server's limit is capped; server tools are left out.
    let big = r#"{"max_tokens":100000,"messages":[{"role":"user","content":"x"}],"tools":[{"type":"web_search_20250305","name":"web_search"},{"type":"custom","name":"f","input_schema":{}}]}"#;
    let b = parse(big).unwrap();
    assert_eq!(b.request.max_tokens, LIMITS.max_tokens);
    assert_eq!(b.render.tools.unwrap()[0]["function"]["name"], "f");
    let none = r#"{"max_tokens":5,"messages":[{"role":"user","content":"x"}],"tools":[{"name":"f","input_schema":{}}],"tool_choice":{"type":"none"}}"#;
    assert!(!parse(none).unwrap().parse_tools);
}

#[test]
fn bad_messages_requests_are_invalid_request_errors() {
    for body in [
        r#"{"messages":[{"role":"user","content":"x"}]}"#,
        r#"{"max_tokens":5,"messages":[]}"#,
        r#"{"max_tokens":5,"messages":[{"role":"system","content":"x"}]}"#,
        r#"{"max_tokens":5,"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"AAAA"}}]}]}"#,
        r#"{"max_tokens":5,"messages":[{"role":"user","content":[{"type":"tool_use","id":"a","name":"f","input":{}}]}]}"#,
        r#"{"max_tokens":5,"messages":[{"role":"assistant","content":[{"type":"tool_use","name":"f"}]}]}"#,
        r#"{"max_tokens":5,"messages":[{"role":"user","content":"x"}],"temperature":1.5}"#,
        r#"{"max_tokens":5,"messages":[{"role":"user","content":"x"}],"tool_choice":{"type":"tool","name":"g"},"tools":[{"name":"f"}]}"#,
        r#"{"max_tokens":5,"messages":[{"role":"user","content":"x"}],"thinking":{"type":"maybe"}}"#,
        r#"{"max_tokens":0,"messages":[{"role":"user","content":"x"}]}"#,
        r#"{"max_tokens":"5","messages":[{"role":"user","content":"x"}]}"#,
        r#"{"max_tokens":5,"messages":"x"}"#,
        r#"[1]"#,
        r#"{"max_tokens":5,"#,
        "",
    ] {
        let err = parse(body).unwrap_err();
        assert_eq!(err.status, 400, "{body}");
        let v = error_body(&err);
        assert_eq!(v["type"], "error", "{body}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    let img =
        r#"{"max_tokens":5,"messages":[{"role":"user","content":[{"type":"image","source":{}}]}]}"#;
    assert!(parse(img).unwrap_err().message.contains("image"));
    for (status, kind) in [
        (401, "authentication_error"),
        (404, "not_found_error"),
        (529, "overloaded_error"),
        (500, "api_error"),
    ] {
        assert_eq!(error_type(status), kind);
    }
}

fn completion(text: &str, finish: Finish, stop: Option<&str>) -> Completion {
    let mut c = crate::serve::completion_for_tests(text, finish);
    c.stop_string = stop.map(str::to_string);
    c
}

fn with_tools() -> Parsed {
    parse(
        r#"{"max_tokens":50,"messages":[{"role":"user","content":"x"}],"stop_sequences":["END"],
        "tools":[{"name":"get_weather","input_schema":{"type":"object"}}]}"#,
    )
    .unwrap()
}

#[test]
fn a_message_has_anthropics_shape_and_stop_reasons() {
    let p = with_tools();
    let r = MessageResponder::new(3, "tiny", &p, ToolFormat::QwenJson);
    let v = r.full(&completion("Hello", Finish::Stop, None));
    assert!(v["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["content"], json!([{"type": "text", "text": "Hello"}]));
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["stop_sequence"], Value::Null);
    assert_eq!(
        v["usage"],
        json!({"input_tokens": 4, "output_tokens": 4, "cache_read_input_tokens": 6, "cache_creation_input_tokens": 0})
    );
    let v = r.full(&completion("Hel", Finish::Stop, Some("END")));
    assert_eq!(
        (v["stop_reason"].as_str(), v["stop_sequence"].as_str()),
        (Some("stop_sequence"), Some("END"))
    );
    // The template's own stop ends a turn.
    let v = r.full(&completion("Hel", Finish::Stop, Some("\nUser:")));
    assert_eq!(v["stop_reason"], "end_turn");
    let v = r.full(&completion("Hel", Finish::Length, None));
    assert_eq!(v["stop_reason"], "max_tokens");
    let call = "On it.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    let v = r.full(&completion(call, Finish::Stop, None));
    assert_eq!(v["stop_reason"], "tool_use");
    assert_eq!(v["content"][0], json!({"type": "text", "text": "On it."}));
    assert_eq!(v["content"][1]["type"], "tool_use");
    assert!(v["content"][1]["id"]
        .as_str()
        .unwrap()
        .starts_with("toolu_"));
    assert_eq!(v["content"][1]["input"], json!({"city": "Paris"}));
}

#[test]
fn a_stream_has_anthropics_event_sequence() {
    let p = with_tools();
    let mut r = MessageResponder::new(3, "tiny", &p, ToolFormat::QwenJson);
    let mut ev = r.start(10, 6);
    let call = "On it.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}\n</tool_call>";
    let (first, rest) = call.split_at("On it.".len());
    let pieces = std::iter::once(first).chain(rest.split_inclusive(['.', ' ', '\n']));
    for piece in pieces {
        ev.extend(r.piece(&Piece {
            text: piece.into(),
            reasoning: String::new(),
            logprobs: Vec::new(),
        }));
    }
    ev.extend(r.end(&completion(call, Finish::Stop, None)));
    let names: Vec<&str> = ev.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    for (name, v) in &ev {
        assert_eq!(v["type"], *name);
    }
    assert_eq!(ev[0].1["message"]["usage"]["cache_read_input_tokens"], 6);
    assert_eq!(
        ev[3].1["delta"],
        json!({"type": "text_delta", "text": "On it."})
    );
    assert_eq!(ev[5].1["index"], 1);
    assert_eq!(ev[5].1["content_block"]["name"], "get_weather");
    assert_eq!(ev[5].1["content_block"]["input"], json!({}));
    assert_eq!(ev[6].1["delta"]["type"], "input_json_delta");
    let input: Value =
        serde_json::from_str(ev[6].1["delta"]["partial_json"].as_str().unwrap()).unwrap();
    assert_eq!(input, json!({"city": "Zürich"}));
    assert_eq!(ev[8].1["delta"]["stop_reason"], "tool_use");
    assert_eq!(ev[8].1["usage"]["output_tokens"], 4);
    // An empty answer still has one (empty) text block.
    let mut r = MessageResponder::new(4, "tiny", &p, ToolFormat::None);
    let ev = r.end(&completion("", Finish::Stop, Some("END")));
    let names: Vec<&str> = ev.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(ev[3].1["delta"]["stop_sequence"], "END");
}
