//! Anthropic's Messages API wire format (what Claude Code speaks): request bodies in (checked),
//! message objects, stream events and error objects out.
//!
//! In: the JSON of `POST /v1/messages` and `/v1/messages/count_tokens`. Out: the same checked
//! [`Parsed`] request the OpenAI endpoints make (a conversation for the chat template, with its
//! tools), or an [`ApiError`] that [`error_body`] writes in Anthropic's shape; from engine
//! [`Completion`]s and [`Piece`]s, a `message` object or the stream's events
//! (`message_start`, `content_block_start` / `_delta` / `_stop`, `message_delta`,
//! `message_stop`, `ping`).
//! Invariant: nothing a client sends can panic here; every refusal names the field. Blocks map
//! to the conversation transformers' templates read: `text` to content, `tool_use` to an
//! assistant's `tool_calls`, `tool_result` to a `tool` message; `image` and `document` are
//! refused (the models served read text). docs/decisions/0028-agent-apis-and-tool-calls.md.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::run::engine::{Completion, Finish, Piece, Request};
use crate::run::sample::SamplerOptions;
use crate::run::template::{Message, RenderOptions};

use super::openai::{template_call, ApiError, Limits, Parsed, Prompt};
use super::tools::{self, Out, ToolCall, ToolFormat, ToolScan};

/// An [`ApiError`] as Anthropic writes errors: `{"type": "error", "error": {"type",
/// "message"}}`, the type from the status.
pub fn error_body(e: &ApiError) -> Value {
    json!({"type": "error", "error": {"type": error_type(e.status), "message": e.message}})
}

/// Anthropic's error type for an HTTP status (its errors page).
pub fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    }
}

/// What the pack tells the parser.
#[derive(Clone, Copy, Debug)]
pub struct PackTraits {
    /// The template has `enable_thinking`.
    pub thinking_switch: bool,
}

impl PackTraits {
    /// What the template renders a conversation with: the tools (none when empty), and the
    /// reasoning switch only where the template has one (elsewhere it is accepted and ignored).
    pub fn render(self, tools: Vec<Value>, enable_thinking: Option<bool>) -> RenderOptions {
        RenderOptions {
            tools: (!tools.is_empty()).then_some(tools),
            enable_thinking: enable_thinking.filter(|_| self.thinking_switch),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or a list of content blocks")]
enum Content {
    Text(String),
    Blocks(Vec<Value>),
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a message as {\"role\": \"user\", \"content\": ...}")]
struct MessageIn {
    role: String,
    content: Content,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a tool as {\"name\": ..., \"description\": ..., \"input_schema\": {...}}")]
struct ToolIn {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    input_schema: Option<Value>,
    /// Anthropic's server tools (`web_search_20250305`, ...) carry a type; client tools may
    /// carry `custom`.
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a JSON object with `messages`")]
struct Body {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<u64>,
    messages: Vec<MessageIn>,
    #[serde(default)]
    system: Option<Content>,
    #[serde(default)]
    stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<u64>,
    /// Accepted and ignored (`user_id`).
    #[serde(default)]
    #[allow(dead_code)]
    metadata: Option<Value>,
    #[serde(default)]
    tools: Option<Vec<ToolIn>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    thinking: Option<Value>,
}

fn invalid(param: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(Some(param), message)
}

/// A text-or-blocks field's text: `text` blocks joined; `what` names it in errors.
fn text_of(c: &Content, what: &str) -> Result<String, ApiError> {
    match c {
        Content::Text(t) => Ok(t.clone()),
        Content::Blocks(blocks) => {
            let mut parts = Vec::new();
            for b in blocks {
                match (b.get("type").and_then(Value::as_str), b.get("text")) {
                    (Some("text"), Some(Value::String(t))) => parts.push(t.as_str()),
                    (kind, _) => {
                        return Err(invalid(
                            "messages",
                            format!(
                                "{what}: a block of type {} where text blocks ({{\"type\": \"text\", \"text\": \"...\"}}) are taken",
                                kind.map_or("(none)".into(), |k| format!("{k:?}"))
                            ),
                        ))
                    }
                }
            }
            Ok(parts.join("\n\n"))
        }
    }
}

/// One message's blocks as template messages: a user's `tool_result`s become `tool` messages
/// (before its text, as Anthropic orders them), an assistant's `tool_use`s its `tool_calls`.
fn convert(i: usize, m: &MessageIn, out: &mut Vec<Message>) -> Result<(), ApiError> {
    let role = match m.role.as_str() {
        r @ ("user" | "assistant") => r,
        other => {
            return Err(invalid(
                "messages",
                format!("messages.{i}.role {other:?} is not supported: use \"user\" or \"assistant\" (the system prompt goes in `system`)"),
            ))
        }
    };
    let blocks = match &m.content {
        Content::Text(t) => {
            out.push(Message::new(role, t));
            return Ok(());
        }
        Content::Blocks(b) => b,
    };
    let mut text: Vec<String> = Vec::new();
    let mut calls = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let at = format!("messages.{i}.content.{j}");
        let kind = b.get("type").and_then(Value::as_str).unwrap_or("");
        let field = |name: &str| b.get(name).and_then(Value::as_str);
        match kind {
            "text" => match field("text") {
                Some(t) => text.push(t.to_string()),
                None => return Err(invalid("messages", format!("{at}: a text block needs `text`"))),
            },
            "image" | "document" => {
                return Err(invalid(
                    "messages",
                    format!("{at}: {kind} blocks are not supported: this model reads text only; send the content as text"),
                ))
            }
            "tool_use" if role == "assistant" => {
                let (Some(id), Some(name)) = (field("id"), field("name")) else {
                    return Err(invalid(
                        "messages",
                        format!("{at}: a tool_use block needs `id`, `name` and `input`"),
                    ));
                };
                let input = b.get("input").cloned().unwrap_or(json!({}));
                if !input.is_object() {
                    return Err(invalid("messages", format!("{at}: tool_use `input` must be an object")));
                }
                calls.push(template_call(Some(id), name, input));
            }
            "tool_result" if role == "user" => {
                let Some(id) = field("tool_use_id") else {
                    return Err(invalid("messages", format!("{at}: a tool_result block needs `tool_use_id`")));
                };
                let content = match b.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(s)) => s.clone(),
                    Some(v) => {
                        let c: Content = serde_json::from_value(v.clone()).map_err(|e| {
                            invalid("messages", format!("{at}: tool_result `content`: {e}"))
                        })?;
                        text_of(&c, &format!("{at}.content"))?
                    }
                };
                let mut m = Message::new("tool", &content);
                m.tool_call_id = Some(id.to_string());
                out.push(m);
            }
            // Earlier reasoning that a client sends back: not rendered (templates drop it).
            "thinking" | "redacted_thinking" => {}
            other => {
                return Err(invalid(
                    "messages",
                    format!("{at}: a block of type {other:?} is not taken in a {role} message: use text, tool_use (assistant) or tool_result (user)"),
                ))
            }
        }
    }
    if !text.is_empty() || !calls.is_empty() || role == "assistant" {
        let mut msg = Message::new(role, &text.join("\n\n"));
        if !calls.is_empty() {
            msg.tool_calls = Some(calls);
        }
        out.push(msg);
    }
    Ok(())
}

/// Parses and checks a `/v1/messages` body (`count` for `/v1/messages/count_tokens`, which
/// takes the same body without `max_tokens`).
pub fn parse_messages(
    body: &[u8],
    limits: &Limits,
    pack: PackTraits,
    count: bool,
) -> Result<Parsed, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid(
            None,
            "the request has no body: send a JSON object",
        ));
    }
    let b: Body = serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "the body is not valid JSON"
        } else {
            "the body does not have the fields this endpoint takes"
        };
        ApiError::invalid(None, format!("{what}: {e}"))
    })?;
    if b.messages.is_empty() {
        return Err(invalid(
            "messages",
            "messages: at least one message is required",
        ));
    }
    let mut messages = Vec::new();
    if let Some(system) = &b.system {
        let text = text_of(system, "system")?;
        if !text.is_empty() {
            messages.push(Message::new("system", &text));
        }
    }
    for (i, m) in b.messages.iter().enumerate() {
        convert(i, m, &mut messages)?;
    }
    let mut tools = Vec::new();
    for t in b.tools.iter().flatten() {
        // Anthropic's server tools (`web_search_20250305`, ...) run on Anthropic's side; this
        // server has none, so they are left out rather than failing an agent's request.
        if t.kind.as_deref().is_some_and(|k| k != "custom") {
            continue;
        }
        let mut f = json!({"name": t.name, "parameters": t.input_schema.clone().unwrap_or(json!({"type": "object", "properties": {}}))});
        if let Some(d) = &t.description {
            f["description"] = json!(d);
        }
        tools.push(json!({"type": "function", "function": f}));
    }
    let parse_tools = !tools.is_empty()
        && match &b.tool_choice {
            None => true,
            Some(c) => match (c.get("type").and_then(Value::as_str), c.get("name").and_then(Value::as_str)) {
                (Some("auto" | "any"), _) => true,
                (Some("none"), _) => false,
                (Some("tool"), Some(n)) if tools.iter().any(|t| t["function"]["name"] == n) => true,
                (Some("tool"), Some(n)) => {
                    return Err(invalid("tool_choice", format!("tool_choice names the tool {n:?}, which is not in tools")))
                }
                _ => {
                    return Err(invalid(
                        "tool_choice",
                        format!("tool_choice {c} is not {{\"type\": \"auto\" | \"any\" | \"none\"}} or {{\"type\": \"tool\", \"name\": ...}}"),
                    ))
                }
            },
        };
    let enable_thinking = match b.thinking.as_ref().map(|t| t.get("type").and_then(Value::as_str)) {
        None => None,
        Some(Some("enabled" | "adaptive")) => Some(true),
        Some(Some("disabled")) => Some(false),
        Some(_) => {
            return Err(invalid(
                "thinking",
                "thinking must be {\"type\": \"enabled\", \"budget_tokens\": N} or {\"type\": \"disabled\"}",
            ))
        }
    };
    let max_tokens = match b.max_tokens {
        None if count => 1,
        None => return Err(invalid("max_tokens", "max_tokens: Field required")),
        Some(0) => {
            return Err(invalid(
                "max_tokens",
                "max_tokens: ask for at least 1 token",
            ))
        }
        // Agents send a fixed budget (Claude Code 32,000 and more): the server's limit caps it,
        // as the context caps every answer, rather than refusing the request.
        Some(n) => n.min(limits.max_tokens as u64) as usize,
    };
    let temperature = b.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=1.0).contains(&temperature)) {
        return Err(invalid(
            "temperature",
            format!("temperature: {temperature} is out of range: use 0 to 1"),
        ));
    }
    let top_p = b.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(invalid(
            "top_p",
            format!("top_p: {top_p} is out of range: use a value above 0 and at most 1"),
        ));
    }
    let stop = b.stop_sequences.clone().unwrap_or_default();
    Ok(Parsed {
        prompt: Prompt::Chat(messages),
        request: Request {
            max_tokens,
            sampler: SamplerOptions {
                temperature,
                top_p,
                top_k: b.top_k.map_or(0, |k| k.min(usize::MAX as u64) as usize),
                seed: super::openai::fresh_seed(),
            },
            logprobs: None,
            stop,
        },
        model: b.model,
        stream: b.stream.unwrap_or(false),
        include_usage: false,
        render: pack.render(tools, enable_thinking),
        parse_tools,
    })
}

/// `usage`: the prompt's tokens the KV cache gave are `cache_read_input_tokens`, the rest
/// `input_tokens`, so the three add up to the prompt (what count_tokens gives); flashpack keeps
/// every prompt without being asked, so nothing counts as a cache write.
fn usage(prompt_tokens: usize, cached_tokens: usize, output_tokens: usize) -> Value {
    json!({
        "input_tokens": prompt_tokens.saturating_sub(cached_tokens),
        "output_tokens": output_tokens,
        "cache_read_input_tokens": cached_tokens,
        "cache_creation_input_tokens": 0,
    })
}

/// Builds the message object or stream events of one request.
#[derive(Debug)]
pub struct MessageResponder {
    pub id: String,
    model: String,
    /// The client's stop sequences (the template's own stops end a turn, not a sequence).
    stops: Vec<String>,
    scan: ToolScan,
    /// The open content block: its index and whether it is text.
    open: Option<usize>,
    blocks: usize,
    calls: usize,
}

impl MessageResponder {
    /// `format`: how the model writes calls, or [`ToolFormat::None`] when the request gave no
    /// tools or `tool_choice` is `none`.
    pub fn new(n: u64, model: &str, parsed: &Parsed, format: ToolFormat) -> MessageResponder {
        let tools = parsed.render.tools.clone().unwrap_or_default();
        let format = if parsed.parse_tools {
            format
        } else {
            ToolFormat::None
        };
        MessageResponder {
            id: format!("msg_{:x}{n:06x}", super::openai::now_s()),
            model: model.to_string(),
            stops: parsed.request.stop.clone(),
            scan: ToolScan::new(format, tools),
            open: None,
            blocks: 0,
            calls: 0,
        }
    }

    fn tool_id(&self, k: usize) -> String {
        format!("toolu_{}{k:02}", &self.id[4..])
    }

    fn stop(&self, c: &Completion, calls: usize) -> (&'static str, Value) {
        match (&c.finish, &c.stop_string) {
            (Finish::Stop, Some(s)) if self.stops.contains(s) => ("stop_sequence", json!(s)),
            (Finish::Stop, _) if calls > 0 => ("tool_use", Value::Null),
            (Finish::Stop | Finish::Cancelled, _) => ("end_turn", Value::Null),
            (Finish::Length, _) => ("max_tokens", Value::Null),
        }
    }

    /// The whole message of a request that did not stream.
    pub fn full(&self, c: &Completion) -> Value {
        let mut content = Vec::new();
        let mut calls = 0;
        for o in tools::parse(self.scan.format(), self.scan.tools(), &c.text) {
            match o {
                Out::Text(t) => content.push(json!({"type": "text", "text": t})),
                Out::Call(call) => {
                    content.push(self.tool_use(calls, &call, call.arguments.clone()));
                    calls += 1;
                }
            }
        }
        if content.is_empty() {
            content.push(json!({"type": "text", "text": ""}));
        }
        let (reason, sequence) = self.stop(c, calls);
        json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": usage(c.prompt_tokens, c.cached_tokens, c.completion_tokens),
        })
    }

    fn tool_use(&self, k: usize, call: &ToolCall, input: Value) -> Value {
        json!({"type": "tool_use", "id": self.tool_id(k), "name": call.name, "input": input})
    }

    /// The stream's opening events: `message_start` (with the prompt's usage) and a `ping`.
    pub fn start(&self, prompt_tokens: usize, cached_tokens: usize) -> Vec<(&'static str, Value)> {
        vec![
            (
                "message_start",
                json!({"type": "message_start", "message": {
                    "id": self.id,
                    "type": "message",
                    "role": "assistant",
                    "model": self.model,
                    "content": [],
                    "stop_reason": Value::Null,
                    "stop_sequence": Value::Null,
                    "usage": usage(prompt_tokens, cached_tokens, 0),
                }}),
            ),
            ("ping", json!({"type": "ping"})),
        ]
    }

    /// Events for a piece of the answer (a harmony model's reasoning is not sent).
    pub fn piece(&mut self, p: &Piece) -> Vec<(&'static str, Value)> {
        let outs = self.scan.push(&p.text);
        self.events(outs)
    }

    fn close(&mut self, ev: &mut Vec<(&'static str, Value)>) {
        if let Some(index) = self.open.take() {
            ev.push((
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    fn events(&mut self, outs: Vec<Out>) -> Vec<(&'static str, Value)> {
        let mut ev = Vec::new();
        for o in outs {
            match o {
                Out::Text(t) => {
                    if self.open.is_none() {
                        self.open = Some(self.blocks);
                        ev.push((
                            "content_block_start",
                            json!({"type": "content_block_start", "index": self.blocks,
                                   "content_block": {"type": "text", "text": ""}}),
                        ));
                        self.blocks += 1;
                    }
                    ev.push((
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": self.blocks - 1,
                               "delta": {"type": "text_delta", "text": t}}),
                    ));
                }
                Out::Call(call) => {
                    self.close(&mut ev);
                    let index = self.blocks;
                    self.blocks += 1;
                    ev.push((
                        "content_block_start",
                        json!({"type": "content_block_start", "index": index,
                               "content_block": self.tool_use(self.calls, &call, json!({}))}),
                    ));
                    ev.push((
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": index,
                               "delta": {"type": "input_json_delta", "partial_json": call.arguments.to_string()}}),
                    ));
                    ev.push((
                        "content_block_stop",
                        json!({"type": "content_block_stop", "index": index}),
                    ));
                    self.calls += 1;
                }
            }
        }
        ev
    }

    /// The closing events: what the scan held, the last block's stop, `message_delta` with
    /// the stop reason and the output's usage, `message_stop`.
    pub fn end(&mut self, c: &Completion) -> Vec<(&'static str, Value)> {
        let held = self.scan.finish();
        let mut ev = self.events(held);
        if self.blocks == 0 {
            ev.extend(self.events(vec![Out::Text(String::new())]));
        }
        self.close(&mut ev);
        let (reason, sequence) = self.stop(c, self.calls);
        ev.push((
            "message_delta",
            json!({"type": "message_delta",
                   "delta": {"stop_reason": reason, "stop_sequence": sequence},
                   "usage": {"output_tokens": c.completion_tokens}}),
        ));
        ev.push(("message_stop", json!({"type": "message_stop"})));
        ev
    }
}

#[cfg(test)]
mod tests;
