//! `flashpack serve` for agents (issue 27, items 1 to 3): Anthropic's Messages API driven by
//! the `anthropic` Python SDK, OpenAI chat with tools and OpenAI's Responses API driven by the
//! `openai` SDK (each skipped with a note where its module is missing, a failure under
//! `FLASHPACK_CI=1`), plus Anthropic's error objects and the Responses API's events and errors
//! on raw requests. The pack is the bundled tiny model converted with
//! Qwen3's chat template (fixtures/templates/Qwen-Qwen3-chat_template.jinja), so tools, tool
//! calls, tool results and `enable_thinking` go through a real template; the tiny model does
//! not call tools by itself, so the parse path of calls is checked on known text by the unit
//! tests of `serve::tools`, `serve::openai`, `serve::anthropic` and `serve::responses`.

use crate::common::http;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use http::{request, Server};
use serde_json::{json, Value};

/// The tiny model with Qwen3's template, converted once per run.
fn qwen3_pack() -> &'static Path {
    static PACK: OnceLock<PathBuf> = OnceLock::new();
    PACK.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let src = tmp.join("qwen3-template-src");
        let _ = std::fs::remove_dir_all(&src);
        std::fs::create_dir_all(&src).unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3moe-tiny");
        for entry in std::fs::read_dir(&fixture).unwrap() {
            let path = entry.unwrap().path();
            std::os::unix::fs::symlink(&path, src.join(path.file_name().unwrap())).unwrap();
        }
        let template = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/templates/Qwen-Qwen3-chat_template.jinja");
        std::fs::copy(template, src.join("chat_template.jinja")).unwrap();
        let pack = tmp.join("agents.flashpack");
        http::convert_quiet(&src, &pack);
        pack
    })
}

fn run_script(name: &str, server: &Server, base: &str, checks: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(name);
    let out = Command::new("python3")
        .arg(&script)
        .arg(base)
        .arg("sk-agents")
        .arg("agents")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{name}:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for check in checks {
        assert!(
            stdout.contains(check),
            "{check} missing from {name}:\n{stdout}"
        );
    }
    let _ = server;
}

/// One server, both SDKs: Anthropic's messages (plain, streamed, stop sequences, count_tokens,
/// a tool round trip, thinking, keys, errors), then OpenAI's chat with tools.
#[test]
fn the_anthropic_and_openai_sdks_use_messages_tools_and_keys() {
    let anthropic = crate::common::python::python_imports("anthropic", "the anthropic SDK checks");
    let openai = crate::common::python::python_imports("openai", "the openai tools checks");
    if !anthropic && !openai {
        return;
    }
    let server = Server::start(qwen3_pack(), &["--api-key", "sk-agents"]);
    if anthropic {
        run_script(
            "anthropic_client.py",
            &server,
            &server.url(""),
            &[
                "message ok",
                "stream ok",
                "stop ok",
                "count ok",
                "tools ok",
                "thinking ok",
                "keys ok",
                "errors ok",
            ],
        );
    }
    if openai {
        run_script(
            "openai_tools_client.py",
            &server,
            &server.url("/v1"),
            &["tool_choice ok", "round trip ok", "stream ok"],
        );
    }
}

/// Anthropic's error objects on what no SDK sends: broken JSON, fields of the wrong type, an
/// unknown path, a missing or wrong key (401 `authentication_error`), the body too large; the key
/// as a bearer token and on OpenAI's endpoints; a request shaped as Claude Code sends them.
#[test]
fn malformed_requests_to_messages_get_anthropic_error_objects() {
    let server = Server::start(
        qwen3_pack(),
        &["--api-key", "k1", "--max-body-bytes", "4096"],
    );
    let key = [("x-api-key", "k1")];
    let check = |r: &http::Response, status: u16, kind: &str| {
        assert_eq!(r.status, status, "{}", r.text());
        let v = r.json();
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], kind, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
    };
    for body in [
        &b"{\"max_tokens\": 5, \"messages\": ["[..],
        b"[]",
        b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}",
        b"{\"max_tokens\": 5, \"messages\": [{\"role\": \"user\", \"content\": 7}]}",
        b"\xff\xfe",
    ] {
        let r = request(server.addr, "POST", "/v1/messages", &key, body);
        check(&r, 400, "invalid_request_error");
    }
    let ok = json!({"max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}).to_string();
    let r = request(server.addr, "POST", "/v1/messages", &[], ok.as_bytes());
    check(&r, 401, "authentication_error");
    let r = request(
        server.addr,
        "POST",
        "/v1/messages",
        &[("x-api-key", "k2")],
        ok.as_bytes(),
    );
    check(&r, 401, "authentication_error");
    let r = request(
        server.addr,
        "POST",
        "/v1/messages/batches",
        &key,
        ok.as_bytes(),
    );
    check(&r, 404, "not_found_error");
    let big = json!({"max_tokens": 2, "messages": [{"role": "user", "content": "x".repeat(5000)}]});
    let r = request(
        server.addr,
        "POST",
        "/v1/messages",
        &key,
        big.to_string().as_bytes(),
    );
    check(&r, 413, "request_too_large");
    // The same key as a bearer token, and on the OpenAI endpoints as x-api-key.
    let r = request(
        server.addr,
        "POST",
        "/v1/messages",
        &[("Authorization", "Bearer k1")],
        ok.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v: Value = r.json();
    assert_eq!(v["type"], "message");
    let r = request(server.addr, "GET", "/v1/models", &key, b"");
    assert_eq!(r.status, 200, "{}", r.text());
    // What Claude Code sends as a matter of course: a query string, its headers, system blocks
    // with cache_control, metadata, a server tool beside its own, another model's name.
    let claude = json!({
        "model": "claude-sonnet-4-5", "max_tokens": 2, "stream": false,
        "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}]}],
        "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
                  {"name": "Bash", "description": "Runs a command", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": false},
        "metadata": {"user_id": "user_x"},
    });
    let headers = [
        ("x-api-key", "k1"),
        ("anthropic-version", "2023-06-01"),
        ("anthropic-beta", "claude-code-20250219"),
    ];
    let r = request(
        server.addr,
        "POST",
        "/v1/messages?beta=true",
        &headers,
        claude.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (v["model"].as_str(), v["usage"]["output_tokens"].as_u64()),
        (Some("agents"), Some(2))
    );
    // OpenAI's endpoints keep OpenAI's error shape.
    let r = request(server.addr, "GET", "/v1/models", &[], b"");
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
}

/// OpenAI's Responses API (what Codex CLI speaks) through the `openai` SDK: plain and streamed
/// responses (the SDK's stream helper too), function tools and a round trip rendered through
/// the template, `previous_response_id` served from the prompt cache with the tokens of the
/// whole conversation, unknown and unstored ids, malformed requests.
#[test]
fn the_openai_sdk_uses_the_responses_api() {
    if !crate::common::python::python_imports("openai", "the Responses API checks") {
        return;
    }
    let server = Server::start(qwen3_pack(), &["--api-key", "sk-agents"]);
    run_script(
        "openai_responses_client.py",
        &server,
        &server.url("/v1"),
        &[
            "response ok",
            "stream ok",
            "tools ok",
            "round trip ok",
            "previous_response_id ok",
            "unknown id ok",
            "errors ok",
        ],
    );
}

/// The Responses API's stream as no SDK shows it (each event named as its data's `type`, no
/// `[DONE]`), and OpenAI's error objects for what no SDK sends: broken JSON, a body that is
/// not an object, bytes that are not UTF-8, a tool in chat's shape, an unknown
/// `previous_response_id`, another model, no key, another content type.
#[test]
fn responses_stream_named_events_and_malformed_bodies_get_openai_errors() {
    let server = Server::start(qwen3_pack(), &["--api-key", "k1"]);
    let key = [("Authorization", "Bearer k1")];
    let body = json!({"input": "Tell me about Rome.", "max_output_tokens": 4, "temperature": 0,
                      "stream": true});
    let r = request(
        server.addr,
        "POST",
        "/v1/responses",
        &key,
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/event-stream")));
    let text = r.text();
    let mut names = Vec::new();
    for block in text
        .split("\n\n")
        .filter(|b| !b.is_empty() && !b.starts_with(':'))
    {
        let (event, data) = block.split_once('\n').expect("event: and data: lines");
        let name = event.strip_prefix("event: ").expect(block);
        let v: Value = serde_json::from_str(data.strip_prefix("data: ").expect(block)).unwrap();
        assert_eq!(v["type"], name, "{block}");
        assert_eq!(v["sequence_number"], names.len(), "{block}");
        names.push(name.to_string());
    }
    assert_eq!(names[..2], ["response.created", "response.in_progress"]);
    assert!(
        ["response.completed", "response.incomplete"].contains(&names.last().unwrap().as_str()),
        "{names:?}"
    );
    assert!(!text.contains("[DONE]"));

    let check = |r: &http::Response, status: u16, param: Option<&str>| {
        assert_eq!(r.status, status, "{}", r.text());
        let v = r.json();
        assert_eq!(v["error"]["param"].as_str(), param, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        assert!(v["error"]["type"].is_string(), "{v}");
    };
    for (body, status, param) in [
        (&b"{\"input\": "[..], 400, None),
        (b"[]", 400, None),
        (b"\xff\xfe", 400, None),
        (
            b"{\"input\": \"x\", \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\"}}]}",
            400,
            Some("tools"),
        ),
        (
            b"{\"input\": \"x\", \"previous_response_id\": \"resp_x\"}",
            404,
            Some("previous_response_id"),
        ),
        (b"{\"input\": \"x\", \"model\": \"gpt-5\"}", 404, Some("model")),
    ] {
        let r = request(server.addr, "POST", "/v1/responses", &key, body);
        check(&r, status, param);
    }
    let ok = json!({"input": "Hi", "max_output_tokens": 1}).to_string();
    let r = request(server.addr, "POST", "/v1/responses", &[], ok.as_bytes());
    check(&r, 401, None);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let raw = format!(
        "POST /v1/responses HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer k1\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{ok}",
        server.addr,
        ok.len()
    );
    let r = http::send_raw(server.addr, raw.as_bytes()).unwrap();
    check(&r, 415, None);
    let r = request(server.addr, "GET", "/v1/responses", &key, b"");
    check(&r, 405, None);
    // And the server still answers.
    let r = request(server.addr, "POST", "/v1/responses", &key, ok.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["object"], "response");
}
