//! OpenAI's wire format: request bodies in (checked), response objects and stream chunks out.
//!
//! In: the JSON of `/v1/chat/completions` and `/v1/completions` requests. Out: an engine
//! [`Request`] and prompt, or an [`ApiError`] in OpenAI's error shape; response objects, stream
//! chunks and usage from engine [`Completion`]s and [`Piece`]s.
//! Invariant: nothing a client sends can panic here; every refusal names the field and the
//! accepted values. Unknown fields are ignored, as OpenAI's own server and mlx-lm's do, since
//! clients send options (penalties, user) that do not change what a local model does. Tools,
//! `tool_choice`, assistant `tool_calls` and `tool` messages go to the template; calls in the
//! answer come back as `tool_calls` (`tools.rs` reads them).

use serde::Deserialize;
use serde_json::{json, Value};

use crate::run::engine::{Completion, Finish, Piece, Request, TokenText, MAX_TOP_LOGPROBS};
use crate::run::sample::SamplerOptions;
use crate::run::template::{Message, RenderOptions};

use super::tools::{self, Out, ToolCall, ToolFormat, ToolScan};

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with its HTTP
/// status (and, for 429, the seconds to wait).
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
            retry_after_s: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn status(mut self, status: u16) -> ApiError {
        self.status = status;
        self
    }

    pub fn server(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 500,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after_s: None,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// `stop`: one string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "`stop` as a string or a list of strings")]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "`stream_options` as an object such as {\"include_usage\": true}")]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// The fields both endpoints share.
#[derive(Debug, Deserialize)]
struct Common {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "`content` as a string or a list of parts such as {\"type\": \"text\", \"text\": \"...\"}"
)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a content part as an object such as {\"type\": \"text\", \"text\": \"...\"}")]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a message as an object such as {\"role\": \"user\", \"content\": \"...\"}")]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    tool_calls: Option<Vec<CallIn>>,
    #[serde(default)]
    tool_call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

/// An assistant message's earlier call: `{"id", "type": "function", "function": {"name",
/// "arguments": "<JSON text>"}}`.
#[derive(Debug, Deserialize)]
#[serde(
    expecting = "a tool call as {\"id\": ..., \"type\": \"function\", \"function\": {\"name\": ..., \"arguments\": \"{...}\"}}"
)]
struct CallIn {
    #[serde(default)]
    id: Option<String>,
    function: FunctionIn,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a function as {\"name\": ..., \"arguments\": \"{...}\"}")]
struct FunctionIn {
    name: String,
    #[serde(default)]
    arguments: Option<Value>,
}

/// A tool the model may call: `{"type": "function", "function": {"name", "description",
/// "parameters"}}`.
#[derive(Debug, Deserialize)]
#[serde(
    expecting = "a tool as {\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": {...}}}"
)]
struct ToolIn {
    #[serde(rename = "type")]
    kind: String,
    function: Value,
}

/// The template's shape of an earlier call (what transformers' templates read): the arguments
/// as an object where the JSON text is one, since GLM's and Qwen3-Coder's templates iterate
/// them; Qwen3's writes either.
pub fn template_call(id: Option<&str>, name: &str, arguments: Value) -> Value {
    let arguments = match arguments {
        Value::String(s) => match serde_json::from_str::<Value>(&s) {
            Ok(o @ Value::Object(_)) => o,
            _ => Value::String(s),
        },
        Value::Null => json!({}),
        v => v,
    };
    let mut call = json!({"type": "function", "function": {"name": name, "arguments": arguments}});
    if let Some(id) = id {
        call["id"] = json!(id);
    }
    call
}

/// Whether the model's output is read for calls: tools were given and `tool_choice` is not
/// `none`. `required` and a named function are taken, and not enforced: nothing constrains
/// the sampling (decision 0028). A function is named as chat names it (`{"type": "function",
/// "function": {"name"}}`) or as the Responses API does (`{"type": "function", "name"}`);
/// `shape` is the one the endpoint's errors show.
pub(super) fn parses_tools(
    tools: &[Value],
    choice: Option<&Value>,
    shape: &str,
) -> Result<bool, ApiError> {
    let bad = |v: &Value| {
        ApiError::invalid(
            Some("tool_choice"),
            format!("tool_choice {v} is not one of \"auto\", \"required\", \"none\" or {shape}"),
        )
    };
    let on = match choice {
        None => true,
        Some(Value::String(s)) => match s.as_str() {
            "auto" | "required" => true,
            "none" => false,
            _ => return Err(bad(choice.unwrap_or(&Value::Null))),
        },
        Some(v @ Value::Object(_)) => {
            let name = v.pointer("/function/name").or_else(|| {
                v.get("name")
                    .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
            });
            match name.and_then(Value::as_str) {
                Some(n) if tools.iter().any(|t| t["function"]["name"] == n) => true,
                Some(n) => {
                    return Err(ApiError::invalid(
                        Some("tool_choice"),
                        format!("tool_choice names the function {n:?}, which is not in tools"),
                    ))
                }
                None => return Err(bad(v)),
            }
        }
        Some(v) => return Err(bad(v)),
    };
    Ok(on && !tools.is_empty())
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a JSON object with `messages`")]
struct ChatBody {
    #[serde(flatten)]
    common: Common,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<u64>,
    #[serde(default)]
    tools: Option<Vec<ToolIn>>,
    #[serde(default)]
    tool_choice: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "`prompt` as a string, a list of one string, or a list of token ids (integers from 0)"
)]
enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a JSON object with `prompt`")]
struct CompletionBody {
    #[serde(flatten)]
    common: Common,
    prompt: PromptField,
    #[serde(default)]
    logprobs: Option<u64>,
    #[serde(default)]
    echo: Option<bool>,
}

/// What to generate from.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// A conversation, through the chat template.
    Chat(Vec<Message>),
    Text(String),
    Ids(Vec<u32>),
}

/// A checked request: what the engine runs and how to answer.
#[derive(Clone, Debug)]
pub struct Parsed {
    pub prompt: Prompt,
    pub request: Request,
    pub model: Option<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Tools and the reasoning switch, for the template.
    pub render: RenderOptions,
    /// Whether the output is read for tool calls (tools given, `tool_choice` not `none`).
    pub parse_tools: bool,
}

/// Server-side defaults and limits a request is checked against.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// The most a request may ask for.
    pub max_tokens: usize,
}

pub(super) fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid(
            None,
            "the request has no body: send a JSON object (Content-Type: application/json)",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "the body is not valid JSON"
        } else {
            "the body does not have the fields this endpoint takes"
        };
        ApiError::invalid(None, format!("{what}: {e}"))
    })
}

/// Seconds since the Unix epoch, for `created`.
pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Common {
    /// The parsed request: `prompt` and the checked `request`, with the fields every endpoint
    /// shares (model, streaming and its usage chunk).
    fn parsed(&self, prompt: Prompt, request: Request) -> Parsed {
        Parsed {
            prompt,
            request,
            model: self.model.clone(),
            stream: self.stream.unwrap_or(false),
            include_usage: self
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            render: RenderOptions::default(),
            parse_tools: false,
        }
    }

    fn check(&self, max_tokens: Option<u64>, limits: &Limits) -> Result<Request, ApiError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::invalid(
                    Some("n"),
                    format!("n = {n}: this server generates one choice per request; use n = 1"),
                ));
            }
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 4 {
            return Err(ApiError::invalid(
                Some("stop"),
                format!("{} stop sequences: give at most 4", stop.len()),
            ));
        }
        let mut request = sampling(
            self.temperature,
            self.top_p,
            (max_tokens, "max_tokens"),
            self.seed,
            limits,
        )?;
        request.stop = stop;
        Ok(request)
    }
}

/// The sampler and length every OpenAI endpoint checks alike: `temperature` 0 to 2 and
/// `top_p` in (0, 1] (both 1 by default), the answer's length (`max`: the value and the name of
/// its field) from 1 to the server's limit, its default when absent; a request without a seed
/// samples differently each time, as OpenAI's does.
pub(super) fn sampling(
    temperature: Option<f32>,
    top_p: Option<f32>,
    max: (Option<u64>, &'static str),
    seed: Option<i64>,
    limits: &Limits,
) -> Result<Request, ApiError> {
    let temperature = temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::invalid(
            Some("temperature"),
            format!("temperature {temperature} is out of range: use 0 (greedy) to 2"),
        ));
    }
    let top_p = top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            Some("top_p"),
            format!("top_p {top_p} is out of range: use a value above 0 and at most 1"),
        ));
    }
    let (max_tokens, field) = max;
    let max_tokens = match max_tokens {
        None => limits.default_max_tokens,
        Some(0) => {
            return Err(ApiError::invalid(
                Some(field),
                format!("{field} 0: ask for at least 1 token"),
            ))
        }
        Some(n) if n > limits.max_tokens as u64 => {
            return Err(ApiError::invalid(
                Some(field),
                format!(
                    "{field} {n} is more than this server allows ({}); ask for fewer",
                    limits.max_tokens
                ),
            ))
        }
        Some(n) => n as usize,
    };
    let seed = match seed {
        Some(s) => s as u64,
        None => fresh_seed(),
    };
    Ok(Request {
        max_tokens,
        sampler: SamplerOptions {
            temperature,
            top_p,
            top_k: 0,
            seed,
        },
        logprobs: None,
        stop: Vec::new(),
    })
}

pub(crate) fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos
        ^ COUNT
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn check_top(n: u64, param: &'static str) -> Result<usize, ApiError> {
    if n > MAX_TOP_LOGPROBS as u64 {
        return Err(ApiError::invalid(
            Some(param),
            format!("{param} {n} is too many: use 0 to {MAX_TOP_LOGPROBS}"),
        ));
    }
    Ok(n as usize)
}

/// Parses and checks a `/v1/chat/completions` body.
pub fn parse_chat(body: &[u8], limits: &Limits) -> Result<Parsed, ApiError> {
    let b: ChatBody = parse_json(body)?;
    if b.messages.is_empty() {
        return Err(ApiError::invalid(
            Some("messages"),
            "messages is empty: send at least one message",
        ));
    }
    let mut messages = Vec::with_capacity(b.messages.len());
    for (i, m) in b.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" => "tool",
            other => {
                return Err(ApiError::invalid(
                    Some("messages"),
                    format!("messages[{i}].role {other:?} is not supported: use system, developer, user, assistant or tool"),
                ))
            }
        };
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                Some("messages"),
                                format!("messages[{i}] has a content part of type {kind:?}: this model takes text parts only"),
                            ))
                        }
                    }
                }
                text
            }
        };
        let mut message = Message::new(role, &content);
        if let Some(calls) = &m.tool_calls {
            if role != "assistant" {
                return Err(ApiError::invalid(
                    Some("messages"),
                    format!("messages[{i}] has tool_calls: only an assistant message may"),
                ));
            }
            message.tool_calls = Some(
                calls
                    .iter()
                    .map(|c| {
                        template_call(
                            c.id.as_deref(),
                            &c.function.name,
                            c.function.arguments.clone().unwrap_or(Value::Null),
                        )
                    })
                    .collect(),
            );
        }
        if role == "tool" {
            message.tool_call_id = m.tool_call_id.clone();
            message.name = m.name.clone();
        }
        messages.push(message);
    }
    let mut tools = Vec::new();
    for (i, t) in b.tools.iter().flatten().enumerate() {
        if t.kind != "function" || !t.function.get("name").is_some_and(Value::is_string) {
            return Err(ApiError::invalid(
                Some("tools"),
                format!("tools[{i}] is not {{\"type\": \"function\", \"function\": {{\"name\": ..., \"parameters\": {{...}}}}}}"),
            ));
        }
        tools.push(json!({"type": "function", "function": t.function}));
    }
    let parse_tools = parses_tools(
        &tools,
        b.tool_choice.as_ref(),
        r#"{"type": "function", "function": {"name": ...}}"#,
    )?;
    let mut request = b
        .common
        .check(b.max_completion_tokens.or(b.common.max_tokens), limits)?;
    if b.logprobs == Some(true) {
        request.logprobs = Some(check_top(b.top_logprobs.unwrap_or(0), "top_logprobs")?);
    } else if let Some(n) = b.top_logprobs {
        check_top(n, "top_logprobs")?;
    }
    let mut parsed = b.common.parsed(Prompt::Chat(messages), request);
    parsed.render.tools = (!tools.is_empty()).then_some(tools);
    parsed.parse_tools = parse_tools;
    Ok(parsed)
}

/// Parses and checks a `/v1/completions` body. `max_tokens` defaults to 16, as OpenAI's.
pub fn parse_completion(body: &[u8], limits: &Limits) -> Result<Parsed, ApiError> {
    let b: CompletionBody = parse_json(body)?;
    let prompt = match b.prompt {
        PromptField::Text(t) => Prompt::Text(t),
        PromptField::Texts(mut v) if v.len() == 1 => Prompt::Text(v.remove(0)),
        PromptField::Texts(v) => {
            return Err(ApiError::invalid(
                Some("prompt"),
                format!(
                    "prompt is a list of {} texts: send one prompt per request",
                    v.len()
                ),
            ))
        }
        PromptField::Ids(ids) => Prompt::Ids(ids),
    };
    if b.echo == Some(true) {
        return Err(ApiError::invalid(
            Some("echo"),
            "echo is not supported: the prompt is not sent back",
        ));
    }
    let limits = Limits {
        default_max_tokens: 16.min(limits.max_tokens),
        ..*limits
    };
    let mut request = b.common.check(b.common.max_tokens, &limits)?;
    if let Some(n) = b.logprobs {
        request.logprobs = Some(check_top(n, "logprobs")?);
    }
    Ok(b.common.parsed(prompt, request))
}

/// Which endpoint a response is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// Builds the response objects of one request.
#[derive(Clone, Debug)]
pub struct Responder {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
    /// Characters of text sent so far (the legacy logprobs' `text_offset`).
    offset: usize,
    /// Reads tool calls out of the answer, when the request gave tools.
    scan: Option<ToolScan>,
    /// Calls streamed so far.
    calls_streamed: usize,
}

/// `finish_reason` of a finished completion (`tool_calls` when it made calls and was not cut
/// short).
fn finish_reason(f: Finish, calls: usize) -> &'static str {
    match f {
        Finish::Stop if calls > 0 => "tool_calls",
        Finish::Stop => "stop",
        Finish::Length | Finish::Cancelled => "length",
    }
}

/// OpenAI's `tool_calls` entry for call `k` of the response `id`.
fn call_object(id: &str, k: usize, call: &ToolCall) -> Value {
    json!({
        "id": call_id(id, k),
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments.to_string()},
    })
}

/// A call's id: unique within the server's run (the response's id and the call's index).
pub fn call_id(response_id: &str, k: usize) -> String {
    let tail = response_id.rsplit('-').next().unwrap_or(response_id);
    format!("call_{tail}{k:02}")
}

/// Usage counts, with the prompt tokens the KV cache gave.
pub fn usage(c: &Completion) -> Value {
    json!({
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": c.cached_tokens},
    })
}

/// The engine's own timings (llama-server's `timings` object, which OpenAI clients ignore): the
/// prompt's time to the first token and the decode time per token, measured in the engine, so a
/// client can tell the server's overhead from the model's time.
pub fn timings(c: &Completion) -> Value {
    let per_token = if c.stats.decode_tokens_per_s > 0.0 {
        1e3 / c.stats.decode_tokens_per_s
    } else {
        0.0
    };
    json!({
        "prompt_n": c.prompt_tokens - c.cached_tokens,
        "prompt_ms": c.stats.time_to_first_token_s * 1e3,
        "predicted_n": c.completion_tokens,
        "predicted_per_token_ms": per_token,
    })
}

fn chat_logprobs(lps: &[TokenText]) -> Value {
    let entry = |t: &str, lp: f32, b: &[u8]| json!({"token": t, "logprob": lp, "bytes": b});
    json!({"content": lps.iter().map(|l| {
        let mut e = entry(&l.token, l.logprob, &l.bytes);
        e["top_logprobs"] = l.top.iter().map(|(t, p, b)| entry(t, *p, b)).collect();
        e
    }).collect::<Vec<_>>()})
}

fn completion_logprobs(lps: &[TokenText], mut offset: usize) -> Value {
    let mut offsets = Vec::with_capacity(lps.len());
    for l in lps {
        offsets.push(offset);
        offset += l.token.chars().count();
    }
    json!({
        "tokens": lps.iter().map(|l| &l.token).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|l| {
            l.top.iter().map(|(t, p, _)| (t.clone(), json!(p))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

impl Responder {
    pub fn new(endpoint: Endpoint, n: u64, model: &str, include_usage: bool) -> Responder {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        let created = now_s();
        Responder {
            endpoint,
            id: format!("{prefix}-{created:x}{n:06x}"),
            created,
            model: model.to_string(),
            include_usage,
            offset: 0,
            scan: None,
            calls_streamed: 0,
        }
    }

    /// Reads the answer for calls in `format` (a chat request that gave tools).
    pub fn with_tools(mut self, format: ToolFormat, tools: Vec<Value>) -> Responder {
        self.scan = Some(ToolScan::new(format, tools));
        self
    }

    fn object(&self, stream: bool) -> &'static str {
        match (self.endpoint, stream) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn logprobs(&self, lps: &[TokenText], asked: bool, offset: usize) -> Value {
        if !asked {
            return Value::Null;
        }
        match self.endpoint {
            Endpoint::Chat => chat_logprobs(lps),
            Endpoint::Completion => completion_logprobs(lps, offset),
        }
    }

    /// The whole response of a request that did not stream.
    pub fn full(&self, c: &Completion, logprobs: bool) -> Value {
        let lp = self.logprobs(&c.logprobs, logprobs, 0);
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut message = json!({"role": "assistant", "content": c.text});
                let mut calls = Vec::new();
                if let Some(scan) = &self.scan {
                    let mut text = String::new();
                    for o in tools::parse(scan.format(), scan.tools(), &c.text) {
                        match o {
                            Out::Text(t) => text.push_str(&t),
                            Out::Call(call) => {
                                calls.push(call_object(&self.id, calls.len(), &call))
                            }
                        }
                    }
                    message["content"] = if text.is_empty() && !calls.is_empty() {
                        Value::Null
                    } else {
                        json!(text)
                    };
                    if !calls.is_empty() {
                        message["tool_calls"] = json!(calls);
                    }
                }
                if !c.reasoning.is_empty() {
                    message["reasoning_content"] = json!(c.reasoning);
                }
                json!({
                    "index": 0,
                    "message": message,
                    "logprobs": lp,
                    "finish_reason": finish_reason(c.finish, calls.len()),
                })
            }
            Endpoint::Completion => json!({
                "index": 0,
                "text": c.text,
                "logprobs": lp,
                "finish_reason": finish_reason(c.finish, 0),
            }),
        };
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(c),
            "timings": timings(c),
        })
    }

    fn chunk(&self, choice: Value) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if self.include_usage {
            // OpenAI sends `usage: null` on every chunk but the last when usage is asked for.
            v["usage"] = Value::Null;
        }
        v
    }

    /// The first chunk of a chat stream: the assistant's role and no text yet.
    pub fn role_chunk(&self) -> Option<Value> {
        (self.endpoint == Endpoint::Chat).then(|| {
            self.chunk(json!({
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": Value::Null,
                "finish_reason": Value::Null,
            }))
        })
    }

    /// The chunks of a piece of text: one, or with tools, one per text and two per call read
    /// from it (the call's id, type and name, then its arguments), possibly none while text that
    /// may open a call is held.
    pub fn piece_chunks(&mut self, p: &Piece, logprobs: bool) -> Vec<Value> {
        let lp = self.logprobs(&p.logprobs, logprobs, self.offset);
        self.offset += p.text.chars().count();
        match self.endpoint {
            Endpoint::Chat => {
                let outs = match self.scan.as_mut() {
                    Some(scan) => scan.push(&p.text),
                    None => vec![Out::Text(p.text.clone())],
                };
                let mut chunks = self.chat_deltas(outs);
                // A harmony model's reasoning as `reasoning_content` (DeepSeek's and vLLM's
                // field), and the logprobs, on the first chunk (an empty one if all is held).
                if chunks.is_empty() && (!p.reasoning.is_empty() || !p.logprobs.is_empty()) {
                    chunks.push(json!({"content": ""}));
                }
                if let Some(first) = chunks.first_mut() {
                    if !p.reasoning.is_empty() {
                        first["reasoning_content"] = json!(p.reasoning);
                    }
                }
                chunks
                    .into_iter()
                    .enumerate()
                    .map(|(i, delta)| {
                        self.chunk(json!({
                            "index": 0,
                            "delta": delta,
                            "logprobs": if i == 0 { lp.clone() } else { Value::Null },
                            "finish_reason": Value::Null,
                        }))
                    })
                    .collect()
            }
            Endpoint::Completion => vec![self.chunk(json!({
                "index": 0,
                "text": p.text,
                "logprobs": lp,
                "finish_reason": Value::Null,
            }))],
        }
    }

    /// Chat deltas for text and calls, as OpenAI streams calls: a first delta with the call's
    /// index, id, type and name (empty arguments), then its arguments.
    fn chat_deltas(&mut self, outs: Vec<Out>) -> Vec<Value> {
        let mut deltas = Vec::new();
        for o in outs {
            match o {
                Out::Text(t) => deltas.push(json!({"content": t})),
                Out::Call(call) => {
                    deltas.push(json!({"tool_calls": [{
                        "index": self.calls_streamed,
                        "id": call_id(&self.id, self.calls_streamed),
                        "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }]}));
                    deltas.push(json!({"tool_calls": [{
                        "index": self.calls_streamed,
                        "function": {"arguments": call.arguments.to_string()},
                    }]}));
                    self.calls_streamed += 1;
                }
            }
        }
        deltas
    }

    /// The last chunks: what the tool scan still held, the finish reason, then (when asked
    /// for) usage with no choices.
    pub fn end_chunks(&mut self, c: &Completion) -> Vec<Value> {
        let held = self.scan.as_mut().map(ToolScan::finish).unwrap_or_default();
        let mut out: Vec<Value> = self
            .chat_deltas(held)
            .into_iter()
            .map(|delta| {
                self.chunk(json!({
                    "index": 0,
                    "delta": delta,
                    "logprobs": Value::Null,
                    "finish_reason": Value::Null,
                }))
            })
            .collect();
        let finish = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "delta": {},
                "logprobs": Value::Null,
                "finish_reason": finish_reason(c.finish, self.calls_streamed),
            }),
            Endpoint::Completion => json!({
                "index": 0,
                "text": "",
                "logprobs": Value::Null,
                "finish_reason": finish_reason(c.finish, 0),
            }),
        };
        let mut end = self.chunk(finish);
        end["timings"] = timings(c);
        out.push(end);
        if self.include_usage {
            let mut u = self.chunk(Value::Null);
            u["choices"] = json!([]);
            u["usage"] = usage(c);
            out.push(u);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        default_max_tokens: 512,
        max_tokens: 4096,
    };

    fn chat(body: &str) -> Result<Parsed, ApiError> {
        parse_chat(body.as_bytes(), &LIMITS)
    }

    #[test]
    fn a_chat_request_takes_openais_fields() {
        let p = chat(
            r#"{"model":"m","messages":[{"role":"developer","content":"Be brief."},
            {"role":"user","content":[{"type":"text","text":"Hi "},{"type":"text","text":"there"}]}],
            "max_completion_tokens":7,"max_tokens":99,"temperature":0,"top_p":0.5,"seed":3,
            "stop":"\n","stream":true,"stream_options":{"include_usage":true},"n":1,
            "logprobs":true,"top_logprobs":10,"presence_penalty":0.1,"user":"x"}"#,
        )
        .unwrap();
        assert_eq!(
            p.prompt,
            Prompt::Chat(vec![
                Message::new("system", "Be brief."),
                Message::new("user", "Hi there")
            ])
        );
        assert_eq!(p.request.max_tokens, 7, "max_completion_tokens wins");
        assert_eq!(p.request.sampler.temperature, 0.0);
        assert_eq!(p.request.sampler.top_p, 0.5);
        assert_eq!(p.request.sampler.seed, 3);
        assert_eq!(p.request.stop, vec!["\n".to_string()]);
        assert_eq!(p.request.logprobs, Some(10));
        assert!(p.stream && p.include_usage);
        assert_eq!(p.model.as_deref(), Some("m"));
        let p = chat(r#"{"messages":[{"role":"user","content":"x"}],"stop":["a","b"]}"#).unwrap();
        assert_eq!(p.request.max_tokens, 512);
        assert_eq!(p.request.stop.len(), 2);
        assert_eq!(p.request.logprobs, None);
    }

    #[test]
    fn bad_chat_requests_name_the_field() {
        for (body, param) in [
            (r#"{"messages":[]}"#, Some("messages")),
            (
                r#"{"messages":[{"role":"robot","content":"x"}]}"#,
                Some("messages"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"n":2}"#,
                Some("n"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"temperature":3}"#,
                Some("temperature"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"top_p":0}"#,
                Some("top_p"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":100000}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":11}"#,
                Some("top_logprobs"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]}"#,
                Some("stop"),
            ),
            (r#"{"messages":"hello"}"#, None),
            (r#"{"messages":[{"role":"user","content":5}]}"#, None),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":"9"}"#,
                None,
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"stop":7}"#,
                None,
            ),
            (r#"[1,2]"#, None),
            (r#"{"messages":[{"role":"user""#, None),
            ("", None),
        ] {
            let err = chat(body).unwrap_err();
            assert_eq!(err.status, 400, "{body}");
            assert_eq!(err.param, param, "{body}: {}", err.message);
            assert_eq!(err.body()["error"]["type"], "invalid_request_error");
        }
    }

    #[test]
    fn a_completion_request_takes_text_a_one_item_list_or_ids() {
        let p = parse_completion(br#"{"prompt":"The","logprobs":2}"#, &LIMITS).unwrap();
        assert_eq!(p.prompt, Prompt::Text("The".into()));
        assert_eq!(p.request.max_tokens, 16);
        assert_eq!(p.request.logprobs, Some(2));
        let p = parse_completion(br#"{"prompt":["The"]}"#, &LIMITS).unwrap();
        assert_eq!(p.prompt, Prompt::Text("The".into()));
        let p = parse_completion(br#"{"prompt":[1,2,3]}"#, &LIMITS).unwrap();
        assert_eq!(p.prompt, Prompt::Ids(vec![1, 2, 3]));
        for body in [
            r#"{"prompt":["a","b"]}"#,
            r#"{"prompt":"a","echo":true}"#,
            r#"{"prompt":"a","logprobs":11}"#,
            r#"{"prompt":[-1]}"#,
            r#"{}"#,
        ] {
            assert_eq!(
                parse_completion(body.as_bytes(), &LIMITS)
                    .unwrap_err()
                    .status,
                400,
                "{body}"
            );
        }
    }

    fn completion(text: &str, finish: Finish) -> Completion {
        Completion {
            reasoning: String::new(),
            text: text.into(),
            finish,
            stop_string: None,
            prompt_tokens: 10,
            completion_tokens: 3,
            cached_tokens: 7,
            logprobs: vec![TokenText {
                token: "Hi".into(),
                bytes: b"Hi".to_vec(),
                logprob: -0.5,
                top: vec![
                    ("Hi".into(), -0.5, b"Hi".to_vec()),
                    ("\u{FFFD}".into(), -1.5, vec![0xE4]),
                    ("\u{FFFD}".into(), -2.5, vec![0xB8]),
                ],
            }],
            stats: Default::default(),
            tokens: vec![1, 2, 3],
            at_first_token: None,
            cpu_s: Default::default(),
        }
    }

    #[test]
    fn responses_have_openais_shapes() {
        let mut r = Responder::new(Endpoint::Chat, 1, "tiny", true);
        let v = r.full(&completion("Hi", Finish::Stop), true);
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], "Hi");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["total_tokens"], 13);
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 7);
        let lp = &v["choices"][0]["logprobs"]["content"][0];
        assert_eq!(lp["token"], "Hi");
        assert_eq!(lp["bytes"], json!([72, 105]));
        // Byte tokens that both show U+FFFD carry their own bytes (issue 33, item 5).
        assert_eq!(lp["top_logprobs"][1]["token"], "\u{FFFD}");
        assert_eq!(lp["top_logprobs"][1]["bytes"], json!([0xE4]));
        assert_eq!(lp["top_logprobs"][2]["bytes"], json!([0xB8]));
        let end = r.end_chunks(&completion("Hi", Finish::Length));
        assert_eq!(end[0]["choices"][0]["finish_reason"], "length");
        assert_eq!(end[0]["usage"], Value::Null);
        assert_eq!(end[1]["choices"], json!([]));
        assert_eq!(end[1]["usage"]["completion_tokens"], 3);

        let mut r = Responder::new(Endpoint::Completion, 2, "tiny", false);
        assert!(r.role_chunk().is_none());
        let c = r
            .piece_chunks(
                &Piece {
                    text: "Hi".into(),
                    reasoning: String::new(),
                    logprobs: completion("", Finish::Stop).logprobs,
                },
                true,
            )
            .remove(0);
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["choices"][0]["text"], "Hi");
        assert_eq!(c["choices"][0]["logprobs"]["top_logprobs"][0]["Hi"], -0.5);
        assert_eq!(c["choices"][0]["logprobs"]["text_offset"], json!([0]));
        assert!(c.get("usage").is_none());
    }

    #[test]
    fn chat_tools_tool_calls_and_tool_messages_are_parsed_for_the_template() {
        let p = chat(
            r#"{"messages":[{"role":"user","content":"Weather?"},
            {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function",
              "function":{"name":"get_weather","arguments":"{\"city\": \"Paris\"}"}}]},
            {"role":"tool","tool_call_id":"call_1","content":"20 C"}],
            "tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}],
            "tool_choice":"required"}"#,
        )
        .unwrap();
        let Prompt::Chat(m) = &p.prompt else { panic!() };
        assert_eq!(
            m[1].tool_calls.as_ref().unwrap()[0],
            json!({"id": "call_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": {"city": "Paris"}}})
        );
        assert_eq!(
            (m[2].role.as_str(), m[2].tool_call_id.as_deref()),
            ("tool", Some("call_1"))
        );
        assert_eq!(p.render.tools.as_ref().unwrap().len(), 1);
        assert!(p.parse_tools);
        for (choice, parse) in [
            (r#""auto""#, true),
            (r#""none""#, false),
            (
                r#"{"type":"function","function":{"name":"get_weather"}}"#,
                true,
            ),
        ] {
            let body = format!(
                r#"{{"messages":[{{"role":"user","content":"x"}}],"tool_choice":{choice},
                "tools":[{{"type":"function","function":{{"name":"get_weather"}}}}]}}"#
            );
            assert_eq!(chat(&body).unwrap().parse_tools, parse, "{choice}");
        }
        for body in [
            r#"{"messages":[{"role":"user","content":"x"}],"tool_choice":"sometimes","tools":[{"type":"function","function":{"name":"f"}}]}"#,
            r#"{"messages":[{"role":"user","content":"x"}],"tool_choice":{"type":"function","function":{"name":"g"}},"tools":[{"type":"function","function":{"name":"f"}}]}"#,
            r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"retrieval","function":{"name":"f"}}]}"#,
        ] {
            let err = chat(body).unwrap_err();
            assert_eq!(err.status, 400, "{body}");
        }
    }

    /// A streamed answer holding a Qwen3 call: text deltas, then the call as OpenAI streams
    /// it (index, id, type and name; then the arguments), then `finish_reason: tool_calls`; the
    /// same text not streamed gives the same call in `message.tool_calls`.
    #[test]
    fn tool_calls_stream_as_openai_streams_them() {
        let text = "Checking.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}\n</tool_call>";
        let tools = vec![json!({"type": "function", "function": {"name": "get_weather"}})];
        let mut r = Responder::new(Endpoint::Chat, 9, "tiny", false)
            .with_tools(ToolFormat::QwenJson, tools.clone());
        let mut chunks = Vec::new();
        for piece in text.split_inclusive(['\n', ' ']) {
            let p = Piece {
                text: piece.into(),
                reasoning: String::new(),
                logprobs: Vec::new(),
            };
            chunks.extend(r.piece_chunks(&p, false));
        }
        chunks.extend(r.end_chunks(&completion(text, Finish::Stop)));
        let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
        let content: String = deltas
            .iter()
            .filter_map(|d| d["content"].as_str())
            .collect();
        assert_eq!(content, "Checking.\n");
        let calls: Vec<&Value> = deltas.iter().filter_map(|d| d.get("tool_calls")).collect();
        assert_eq!(calls.len(), 2, "{chunks:?}");
        assert_eq!(calls[0][0]["index"], 0);
        assert_eq!(calls[0][0]["type"], "function");
        assert_eq!(calls[0][0]["function"]["name"], "get_weather");
        assert_eq!(calls[0][0]["function"]["arguments"], "");
        let id = calls[0][0]["id"].as_str().unwrap();
        assert!(id.starts_with("call_"), "{id}");
        assert_eq!(
            calls[1][0]["function"]["arguments"],
            "{\"city\":\"Zürich\"}"
        );
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");

        let r = Responder::new(Endpoint::Chat, 9, "tiny", false)
            .with_tools(ToolFormat::QwenJson, tools);
        let v = r.full(&completion(text, Finish::Stop), false);
        let m = &v["choices"][0]["message"];
        assert_eq!(m["content"], "Checking.\n");
        assert!(m["tool_calls"][0]["id"]
            .as_str()
            .unwrap()
            .starts_with("call_"));
        assert_eq!(m["tool_calls"][0]["function"]["name"], "get_weather");
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        // Without tools the same text is text.
        let r = Responder::new(Endpoint::Chat, 9, "tiny", false);
        let v = r.full(&completion(text, Finish::Stop), false);
        assert_eq!(v["choices"][0]["message"]["content"], text);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }
}
