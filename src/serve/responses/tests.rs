use super::*;
use crate::serve::completion_for_tests as completion;

const LIMITS: Limits = Limits {
    default_max_tokens: 512,
    max_tokens: 4096,
};

const PACK: PackTraits = PackTraits {
    thinking_switch: true,
};

fn nothing_stored(_: &str) -> Option<Arc<Vec<Message>>> {
    None
}

fn parse(body: &str) -> Result<ResponsesRequest, ApiError> {
    parse_responses(body.as_bytes(), &LIMITS, PACK, &nothing_stored)
}

fn messages(r: &ResponsesRequest) -> &[Message] {
    match &r.parsed.prompt {
        Prompt::Chat(m) => m,
        p => panic!("{p:?}"),
    }
}

const WEATHER: &str = r#"{"type":"function","name":"get_weather","description":"Weather",
    "parameters":{"type":"object","properties":{"city":{"type":"string"}}},"strict":true}"#;

#[test]
fn input_items_become_the_templates_conversation() {
    let body = format!(
        r#"{{"model":"m","instructions":"Be brief.","input":[
          {{"type":"message","role":"developer","content":[{{"type":"input_text","text":"Sandbox: on."}}]}},
          {{"role":"user","content":"Weather in Paris?"}},
          {{"type":"reasoning","id":"rs_1","summary":[]}},
          {{"type":"message","role":"assistant","content":[{{"type":"output_text","text":"Checking.","annotations":[]}}]}},
          {{"type":"function_call","call_id":"call_1","name":"get_weather","arguments":"{{\"city\": \"Paris\"}}"}},
          {{"type":"function_call_output","call_id":"call_1","output":"20 C"}},
          {{"type":"function_call","call_id":"call_2","name":"get_weather","arguments":"{{}}"}},
          {{"type":"function_call_output","call_id":"call_2","output":[{{"type":"input_text","text":"21 C"}},{{"type":"input_text","text":"sunny"}}]}},
          {{"type":"message","role":"user","content":[{{"type":"input_text","text":"Thanks"}}]}}],
        "tools":[{WEATHER},{{"type":"web_search"}},{{"type":"local_shell"}}],
        "tool_choice":"required","max_output_tokens":50,"temperature":0.5,"top_p":0.9,
        "reasoning":{{"effort":"none"}},"stream":true,"store":false,"metadata":{{"k":"v"}},
        "parallel_tool_calls":false,"include":["reasoning.encrypted_content"],"prompt_cache_key":"x"}}"#
    );
    let r = parse(&body).unwrap();
    let m = messages(&r);
    let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(
        roles,
        [
            "system",
            "user",
            "assistant",
            "tool",
            "assistant",
            "tool",
            "user"
        ]
    );
    // The instructions and the developer message that opens the input: one system message.
    assert_eq!(m[0].content, "Be brief.\n\nSandbox: on.");
    // Text and the call that follows it: one assistant turn, as chat writes it.
    assert_eq!(m[2].content, "Checking.");
    assert_eq!(
        m[2].tool_calls.as_ref().unwrap()[..],
        [json!({"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}}})]
    );
    assert_eq!(
        (
            m[3].content.as_str(),
            m[3].tool_call_id.as_deref(),
            m[3].name.as_deref()
        ),
        ("20 C", Some("call_1"), Some("get_weather"))
    );
    // A call after a tool's output opens a new assistant turn.
    assert_eq!(m[4].content, "");
    assert_eq!(m[4].tool_calls.as_ref().unwrap().len(), 1);
    assert_eq!(m[5].content, "21 C\n\nsunny");
    assert_eq!(m[6].content, "Thanks");
    // The history keeps the developer message apart (it is stored as sent) and has no
    // instructions (OpenAI does not carry them over to a follow-up).
    assert_eq!(r.history[0], Message::new("system", "Sandbox: on."));
    assert_eq!(r.history.len(), 7);
    // Function tools go to the template in chat's shape; hosted tools are left out.
    let tools = r.parsed.render.tools.as_ref().unwrap();
    assert_eq!(tools.len(), 1);
    assert_eq!(tools[0]["function"]["name"], "get_weather");
    assert_eq!(tools[0]["function"]["description"], "Weather");
    assert_eq!(
        tools[0]["function"]["parameters"]["properties"]["city"]["type"],
        "string"
    );
    assert!(r.parsed.parse_tools && r.parsed.stream && !r.store);
    assert_eq!(r.parsed.render.enable_thinking, Some(false));
    assert_eq!(r.parsed.request.max_tokens, 50);
    assert_eq!(r.parsed.request.sampler.temperature, 0.5);
    assert_eq!(r.parsed.request.sampler.top_p, 0.9);
    // What the response repeats.
    assert_eq!(r.echo["instructions"], "Be brief.");
    assert_eq!(r.echo["metadata"], json!({"k": "v"}));
    assert_eq!(r.echo["parallel_tool_calls"], false);
    assert_eq!(r.echo["tool_choice"], "required");
    assert_eq!(r.echo["tools"].as_array().unwrap().len(), 1);
    assert_eq!(r.echo["tools"][0]["strict"], true);
    assert_eq!(r.echo["store"], false);
}

#[test]
fn a_string_input_is_a_user_message_and_defaults_apply() {
    let r = parse(r#"{"input":"Hi","max_output_tokens":1000000}"#).unwrap();
    assert_eq!(messages(&r), [Message::new("user", "Hi")]);
    assert!(r.store && !r.parsed.stream && !r.parsed.parse_tools);
    assert_eq!(
        r.parsed.render,
        crate::run::template::RenderOptions::default()
    );
    assert_eq!(r.parsed.request.max_tokens, 4096, "capped to the server's");
    assert_eq!(r.echo["tool_choice"], "auto");
    assert_eq!(r.echo["parallel_tool_calls"], true);
    assert_eq!(r.echo["temperature"], 1.0);
    let r = parse(r#"{"input":"Hi","reasoning":{"effort":"high"}}"#).unwrap();
    assert_eq!(r.parsed.render.enable_thinking, Some(true));
    assert_eq!(
        r.parsed.request.max_tokens, 4096,
        "without max_output_tokens, up to the server's limit"
    );
    let no_switch = PackTraits {
        thinking_switch: false,
    };
    let r = parse_responses(
        br#"{"input":"Hi","reasoning":{"effort":"high"}}"#,
        &LIMITS,
        no_switch,
        &nothing_stored,
    )
    .unwrap();
    assert_eq!(r.parsed.render.enable_thinking, None);
}

#[test]
fn previous_response_id_continues_the_stored_conversation() {
    let before = Arc::new(vec![
        Message::new("system", "Sandbox: on."),
        Message::new("user", "Tell me about Rome."),
        Message::new("assistant", "Rome was"),
    ]);
    let stored = |id: &str| (id == "resp_1").then(|| before.clone());
    let r = parse_responses(
        br#"{"previous_response_id":"resp_1","input":"And Greece?","instructions":"Be brief."}"#,
        &LIMITS,
        PACK,
        &stored,
    )
    .unwrap();
    let m = messages(&r);
    assert_eq!(m[0].content, "Be brief.\n\nSandbox: on.");
    assert_eq!(m[1..3], before[1..3]);
    assert_eq!(m[3], Message::new("user", "And Greece?"));
    assert_eq!(r.history.len(), 4);
    assert_eq!(r.echo["previous_response_id"], "resp_1");
    let err = parse_responses(
        br#"{"previous_response_id":"resp_2","input":"x"}"#,
        &LIMITS,
        PACK,
        &stored,
    )
    .unwrap_err();
    assert_eq!(err.status, 404);
    assert_eq!(err.param, Some("previous_response_id"));
    assert_eq!(err.code, Some("previous_response_not_found"));
    assert!(err.message.contains("resp_2"), "{}", err.message);
}

#[test]
fn bad_requests_name_the_field() {
    for (body, param, says) in [
        (r#"{"input":[]}"#, Some("input"), "empty"),
        (
            r#"{"input":[{"role":"user","content":[{"type":"input_image","image_url":"x"}]}]}"#,
            Some("input"),
            "input_image",
        ),
        (
            r#"{"input":[{"type":"function_call_output","call_id":"c","output":[{"type":"input_file","file_id":"f"}]}]}"#,
            Some("input"),
            "input_file",
        ),
        (
            r#"{"input":[{"role":"robot","content":"x"}]}"#,
            Some("input"),
            "robot",
        ),
        (
            r#"{"input":[{"type":"function_call","name":"f"}]}"#,
            Some("input"),
            "call_id",
        ),
        (
            r#"{"input":[{"type":"item_reference","id":"msg_1"}]}"#,
            Some("input"),
            "item_reference",
        ),
        (
            r#"{"input":[{"type":"computer_call","id":"c"}]}"#,
            Some("input"),
            "computer_call",
        ),
        (r#"{"input":[{"content":"x"}]}"#, Some("input"), "type"),
        (r#"{"input":["x"]}"#, Some("input"), "item"),
        (
            r#"{"input":[{"role":"user","content":5}]}"#,
            Some("input"),
            "content",
        ),
        (
            r#"{"input":"x","tools":[{"type":"function","function":{"name":"f"}}]}"#,
            Some("tools"),
            "name",
        ),
        (
            r#"{"input":"x","tools":[{"type":"function","name":"f"}],"tool_choice":{"type":"function","name":"g"}}"#,
            Some("tool_choice"),
            "\"g\"",
        ),
        (
            r#"{"input":"x","tool_choice":"sometimes"}"#,
            Some("tool_choice"),
            "sometimes",
        ),
        (
            r#"{"input":"x","temperature":3}"#,
            Some("temperature"),
            "temperature",
        ),
        (r#"{"input":"x","top_p":0}"#, Some("top_p"), "top_p"),
        (
            r#"{"input":"x","max_output_tokens":0}"#,
            Some("max_output_tokens"),
            "max_output_tokens",
        ),
        (
            r#"{"input":"x","reasoning":{"effort":"extreme"}}"#,
            Some("reasoning"),
            "extreme",
        ),
        (
            r#"{"input":"x","reasoning":"high"}"#,
            Some("reasoning"),
            "object",
        ),
        (
            r#"{"input":"x","metadata":[1]}"#,
            Some("metadata"),
            "object",
        ),
        (
            r#"{"input":"x","background":true}"#,
            Some("background"),
            "background",
        ),
        (
            r#"{"input":"x","conversation":"conv_1"}"#,
            Some("conversation"),
            "previous_response_id",
        ),
        (r#"{"model":"m"}"#, None, "input"),
        (r#"{"input":5}"#, None, "input"),
        (r#"{"input":"x","max_output_tokens":"9"}"#, None, "fields"),
        (r#"{"input":"#, None, "JSON"),
        ("", None, "no body"),
    ] {
        let err = parse(body).unwrap_err();
        assert_eq!(err.status, 400, "{body}");
        assert_eq!(err.param, param, "{body}: {}", err.message);
        assert!(err.message.contains(says), "{body}: {}", err.message);
        assert_eq!(err.body()["error"]["type"], "invalid_request_error");
    }
}

fn responder(body: &str, store: &Arc<ResponseStore>) -> ResponsesResponder {
    ResponsesResponder::new(7, "tiny", parse(body).unwrap(), ToolFormat::QwenJson, store)
}

/// An answer holding a Qwen3 call, streamed in pieces: a message item with its text deltas,
/// then the call as a function_call item, then `response.completed` with both items, every
/// event numbered in order; the same text not streamed gives the same response.
#[test]
fn a_streamed_answer_with_a_call_has_openais_events_in_order() {
    let text = "Checking.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}\n</tool_call>";
    let body = format!(r#"{{"input":"Weather?","tools":[{WEATHER}]}}"#);
    let store = Arc::new(ResponseStore::new(1 << 20));
    let mut r = responder(&body, &store);
    let mut events = r.start();
    for piece in text.split_inclusive(['\n', ' ']) {
        events.extend(r.piece(&Piece {
            text: piece.into(),
            reasoning: String::new(),
            logprobs: Vec::new(),
        }));
    }
    events.extend(r.end(&completion(text, Finish::Stop)));
    for (i, (name, v)) in events.iter().enumerate() {
        assert_eq!(v["type"], *name);
        assert_eq!(v["sequence_number"], i, "{v}");
    }
    let mut kinds: Vec<&str> = events.iter().map(|(n, _)| *n).collect();
    kinds.dedup();
    assert_eq!(
        kinds,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    let deltas: String = events
        .iter()
        .filter(|(n, _)| *n == "response.output_text.delta")
        .map(|(_, v)| v["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, "Checking.\n");
    let created = &events[0].1["response"];
    assert_eq!(created["status"], "in_progress");
    assert_eq!(created["output"], json!([]));
    let done = &events.last().unwrap().1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["id"], r.id);
    let output = done["output"].as_array().unwrap();
    assert_eq!(output[0]["type"], "message");
    assert_eq!(output[0]["content"][0]["text"], "Checking.\n");
    assert_eq!(output[1]["type"], "function_call");
    assert_eq!(output[1]["name"], "get_weather");
    assert_eq!(output[1]["arguments"], "{\"city\":\"Zürich\"}");
    assert_eq!(output[1]["status"], "completed");
    let call_id = output[1]["call_id"].as_str().unwrap();
    assert!(call_id.starts_with("call_"), "{call_id}");
    assert!(output[1]["id"].as_str().unwrap().starts_with("fc_"));
    assert_eq!(done["usage"]["input_tokens"], 10);
    assert_eq!(done["usage"]["input_tokens_details"]["cached_tokens"], 6);
    assert_eq!(done["usage"]["output_tokens"], 4);
    assert_eq!(done["usage"]["total_tokens"], 14);

    // Not streamed: the same response, but for its id and time.
    let mut full = responder(&body, &store).full(&completion(text, Finish::Stop));
    let mut streamed = done.clone();
    for v in [&mut full, &mut streamed] {
        let tail = v["id"].as_str().unwrap()["resp_".len()..].to_string();
        *v = serde_json::from_str(&v.to_string().replace(&tail, "ID")).unwrap();
        v["created_at"] = json!(0);
    }
    assert_eq!(full, streamed);

    // Stored as the items a client would send back: the call joins the assistant's turn.
    let stored = store.get(&r.id).unwrap();
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[1].role, "assistant");
    assert_eq!(stored[1].content, "Checking.\n");
    let calls = stored[1].tool_calls.as_ref().unwrap();
    assert_eq!(calls[0]["id"], call_id);
    assert_eq!(calls[0]["function"]["arguments"], json!({"city": "Zürich"}));
}

#[test]
fn an_answer_cut_at_max_output_tokens_is_incomplete_and_store_false_keeps_nothing() {
    let store = Arc::new(ResponseStore::new(1 << 20));
    let mut r = responder(r#"{"input":"Hi","store":false}"#, &store);
    let v = r.full(&completion("Rome was", Finish::Length));
    assert_eq!(v["status"], "incomplete");
    assert_eq!(v["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(v["output"][0]["status"], "incomplete");
    assert_eq!(v["output"][0]["content"][0]["text"], "Rome was");
    assert_eq!(store.usage().0, 0);
    let mut events = responder(r#"{"input":"Hi"}"#, &store).end(&completion("", Finish::Length));
    let (last, v) = events.pop().unwrap();
    assert_eq!(last, "response.incomplete");
    // An empty answer is still one message item.
    assert_eq!(v["response"]["output"][0]["content"][0]["text"], "");
    assert_eq!(store.usage().0, 1);
}

#[test]
fn text_that_is_not_a_call_stays_text_and_tool_choice_none_reads_no_calls() {
    let store = Arc::new(ResponseStore::new(1 << 20));
    let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {}}\n</tool_call>";
    let body = format!(r#"{{"input":"x","tools":[{WEATHER}],"tool_choice":"none"}}"#);
    let v = responder(&body, &store).full(&completion(call, Finish::Stop));
    assert_eq!(v["output"].as_array().unwrap().len(), 1);
    assert_eq!(v["output"][0]["content"][0]["text"], call);
    let broken = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": \n</tool_call>";
    let body = format!(r#"{{"input":"x","tools":[{WEATHER}]}}"#);
    let v = responder(&body, &store).full(&completion(broken, Finish::Stop));
    assert_eq!(v["output"][0]["content"][0]["text"], broken);
    assert_eq!(v["status"], "completed");
}

#[test]
fn a_failure_after_the_start_is_an_error_event_then_response_failed() {
    let store = Arc::new(ResponseStore::new(1 << 20));
    let mut r = responder(r#"{"input":"Hi"}"#, &store);
    let start = r.start();
    let ev = r.error(&ApiError::server("the engine failed"));
    assert_eq!(ev[0].0, "error");
    assert_eq!(ev[0].1["message"], "the engine failed");
    assert_eq!(ev[0].1["sequence_number"], start.len());
    assert_eq!(ev[1].0, "response.failed");
    assert_eq!(ev[1].1["response"]["status"], "failed");
    assert_eq!(ev[1].1["response"]["error"]["code"], "server_error");
    assert_eq!(store.usage().0, 0);
}

/// What Codex CLI 0.169 sends (its request captured, texts cut short): no `instructions` but
/// developer messages, parts that are separate blocks, function tools beside a `namespace` of
/// sub-agent tools and `web_search`, `reasoning` with a summary and no effort, metadata of its
/// own.
#[test]
fn a_request_as_codex_sends_it_is_taken() {
    let r = parse(
        r#"{"model":"agents","stream":true,"input":[
          {"type":"message","id":"msg_1","role":"developer","content":[{"type":"input_text","text":"You are a coding agent."}]},
          {"type":"message","id":"msg_2","role":"developer","content":[{"type":"input_text","text":"<permissions instructions>read-only</permissions instructions>"},{"type":"input_text","text":"<collaboration_mode>default</collaboration_mode>"}]},
          {"type":"message","id":"msg_3","role":"user","content":[{"type":"input_text","text":"<environment_context><cwd>/tmp</cwd></environment_context>"}]},
          {"type":"message","id":"msg_4","role":"user","content":[{"type":"input_text","text":"Say hello"}]}],
        "tools":[{"type":"function","name":"exec_command","description":"Runs a command.","strict":false,
                  "parameters":{"type":"object","properties":{"cmd":{"type":"string"}},"required":["cmd"],"additionalProperties":false}},
                 {"type":"namespace","name":"multi_agent_v1","description":"Sub-agents.",
                  "tools":[{"type":"function","name":"close_agent","parameters":{"type":"object"}}]},
                 {"type":"web_search","external_web_access":false}],
        "tool_choice":"auto","parallel_tool_calls":true,"reasoning":{"summary":"auto"},"store":false,
        "include":["reasoning.encrypted_content"],"prompt_cache_key":"01a2","client_metadata":{"turn_id":"01a2"}}"#,
    )
    .unwrap();
    let m = messages(&r);
    let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["system", "user", "user"]);
    assert_eq!(
        m[0].content,
        "You are a coding agent.\n\n<permissions instructions>read-only</permissions instructions>\n\n<collaboration_mode>default</collaboration_mode>"
    );
    assert_eq!(m[2].content, "Say hello");
    let tools = r.parsed.render.tools.as_ref().unwrap();
    let names: Vec<&Value> = tools.iter().map(|t| &t["function"]["name"]).collect();
    assert_eq!(names, [&json!("exec_command")]);
    assert!(r.parsed.parse_tools && r.parsed.stream && !r.store);
    assert_eq!(r.parsed.render.enable_thinking, None);
}
