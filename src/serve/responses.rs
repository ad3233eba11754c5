//! OpenAI's Responses API wire format (what Codex CLI speaks): request bodies in (checked),
//! response objects and stream events out.
//!
//! In: the JSON of `POST /v1/responses`, and the conversation a `previous_response_id` names
//! (`store.rs`). Out: the same checked [`Parsed`] request the chat endpoints make (a
//! conversation for the chat template, with its tools), or an [`ApiError`] in OpenAI's shape;
//! from engine [`Completion`]s and [`Piece`]s, a `response` object or the stream's events
//! (`response.created`, `response.in_progress`, `response.output_item.added` / `.done`,
//! `response.content_part.added` / `.done`, `response.output_text.delta` / `.done`,
//! `response.function_call_arguments.delta` / `.done`, then `response.completed` or
//! `response.incomplete`; `error` and `response.failed` when the engine fails), each with its
//! `sequence_number`.
//! Invariant: nothing a client sends can panic here; every refusal names the field. Items map
//! to the conversation transformers' templates read, as chat's messages do: a message to its
//! role (`developer` is `system`), `function_call` items to the assistant's `tool_calls`,
//! `function_call_output` items to `tool` messages; earlier `reasoning` items are dropped, and
//! images, files and audio refused. A response's output is stored as the items it would be if
//! sent back, so continuing it by id renders the same prompt as sending the whole conversation.
//! docs/decisions/0029-responses-api.md.

pub mod store;

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::run::engine::{Completion, Finish, Piece};
use crate::run::template::Message;

use super::anthropic::PackTraits;
use super::openai::{parse_json, parses_tools, sampling, template_call, ApiError, Limits};
use super::openai::{Parsed, Prompt};
use super::tools::{Out, ToolCall, ToolFormat, ToolScan};
pub use store::ResponseStore;

/// A stream event: its name (`event:`) and its data, which repeats the name as `type`.
pub type NamedEvent = (&'static str, Value);

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "`input` as a string or a list of items")]
enum Input {
    Text(String),
    Items(Vec<Value>),
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a JSON object with `input`")]
struct Body {
    #[serde(default)]
    model: Option<String>,
    input: Input,
    #[serde(default)]
    instructions: Option<String>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    previous_response_id: Option<String>,
    #[serde(default)]
    store: Option<bool>,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(default)]
    reasoning: Option<Value>,
    #[serde(default)]
    background: Option<bool>,
    #[serde(default)]
    conversation: Option<Value>,
}

/// A checked `/v1/responses` request.
#[derive(Clone, Debug)]
pub struct ResponsesRequest {
    /// What the engine runs: the prompt is `instructions` and `history`.
    pub parsed: Parsed,
    /// The conversation without `instructions`: the previous response's, then this input;
    /// what this response is stored as, with its output.
    pub history: Vec<Message>,
    /// `store` (true unless the request says false): keep the conversation for a follow-up.
    pub store: bool,
    /// The fields the response object repeats from the request.
    pub echo: Map<String, Value>,
}

fn invalid(param: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(Some(param), message)
}

/// The text of a content list: `input_text` / `output_text` parts (and an assistant's
/// `refusal`), joined by a blank line as Anthropic's text blocks are (Codex sends separate
/// blocks of instructions as parts of one message); images, files and audio are refused.
fn parts_text(parts: &[Value], at: &str) -> Result<String, ApiError> {
    let mut text: Vec<&str> = Vec::new();
    for (j, p) in parts.iter().enumerate() {
        let kind = p.get("type").and_then(Value::as_str).unwrap_or("(none)");
        let field = match kind {
            "input_text" | "output_text" | "text" => "text",
            "refusal" => "refusal",
            "input_image" | "input_file" | "input_audio" => {
                return Err(invalid(
                    "input",
                    format!("{at}.content[{j}]: {kind} parts are not supported: this model reads text only; send the content as input_text"),
                ))
            }
            _ => {
                return Err(invalid(
                    "input",
                    format!("{at}.content[{j}] has type {kind:?}: use input_text or output_text parts"),
                ))
            }
        };
        match p.get(field).and_then(Value::as_str) {
            Some(t) => text.push(t),
            None => {
                return Err(invalid(
                    "input",
                    format!("{at}.content[{j}]: a {kind} part needs `{field}` as a string"),
                ))
            }
        }
    }
    Ok(text.join("\n\n"))
}

/// A string or a content list, as message content and function outputs take it.
fn content_text(v: Option<&Value>, at: &str) -> Result<String, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => parts_text(parts, at),
        Some(_) => Err(invalid(
            "input",
            format!("{at}: content must be a string or a list of input_text parts"),
        )),
    }
}

/// Items as template messages, appended to `out` (`what` names the list in errors): a
/// `function_call` joins the assistant message it follows (text and calls are one turn in
/// chat's shape), else opens one; a `function_call_output` is a `tool` message named after
/// its call where the call is in the conversation.
fn convert_items(items: &[Value], what: &str, out: &mut Vec<Message>) -> Result<(), ApiError> {
    for (i, item) in items.iter().enumerate() {
        let at = format!("{what}[{i}]");
        let Some(obj) = item.as_object() else {
            return Err(invalid("input", format!("{at} is not an item object such as {{\"role\": \"user\", \"content\": \"...\"}}")));
        };
        let field = |name: &str| obj.get(name).and_then(Value::as_str);
        // An item without a type but with a role is a message (the SDK's EasyInputMessage).
        let kind = field("type").or(obj.get("role").map(|_| "message"));
        match kind {
            Some("message") => {
                let role = match field("role") {
                    Some(r @ ("user" | "assistant")) => r,
                    Some("system" | "developer") => "system",
                    other => {
                        return Err(invalid(
                            "input",
                            format!("{at}.role {} is not supported: use user, assistant, system or developer", other.map_or("(none)".into(), |r| format!("{r:?}"))),
                        ))
                    }
                };
                out.push(Message::new(role, &content_text(obj.get("content"), &at)?));
            }
            Some("function_call") => {
                let (Some(call_id), Some(name)) = (field("call_id"), field("name")) else {
                    return Err(invalid(
                        "input",
                        format!("{at}: a function_call item needs `call_id`, `name` and `arguments`"),
                    ));
                };
                let arguments = obj.get("arguments").cloned().unwrap_or(Value::Null);
                let call = template_call(Some(call_id), name, arguments);
                match out.last_mut() {
                    Some(m) if m.role == "assistant" => {
                        m.tool_calls.get_or_insert_with(Vec::new).push(call)
                    }
                    _ => {
                        let mut m = Message::new("assistant", "");
                        m.tool_calls = Some(vec![call]);
                        out.push(m);
                    }
                }
            }
            Some("function_call_output") => {
                let Some(call_id) = field("call_id") else {
                    return Err(invalid(
                        "input",
                        format!("{at}: a function_call_output item needs `call_id` and `output`"),
                    ));
                };
                let output = content_text(obj.get("output"), &at)?;
                let name = out
                    .iter()
                    .rev()
                    .flat_map(|m| m.tool_calls.iter().flatten())
                    .find(|c| c["id"] == call_id)
                    .and_then(|c| c["function"]["name"].as_str())
                    .map(str::to_string);
                let mut m = Message::new("tool", &output);
                m.tool_call_id = Some(call_id.to_string());
                m.name = name;
                out.push(m);
            }
            // Earlier reasoning that a client sends back: not rendered (templates drop it).
            Some("reasoning") => {}
            Some("item_reference") => {
                return Err(invalid(
                    "input",
                    format!("{at}: item_reference is not supported: send the item itself, or continue a response with previous_response_id"),
                ))
            }
            Some(other) => {
                return Err(invalid(
                    "input",
                    format!("{at} has type {other:?}: this server takes message, function_call and function_call_output items (and drops reasoning)"),
                ))
            }
            None => {
                return Err(invalid(
                    "input",
                    format!("{at} has no `type`: give message, function_call or function_call_output"),
                ))
            }
        }
    }
    Ok(())
}

/// The prompt's messages: one system message of `instructions` and the system messages that
/// open the conversation (Codex sends its instructions and then developer messages; many
/// templates take one system message, first), then the rest as they are.
pub fn prompt_messages(instructions: Option<&str>, history: &[Message]) -> Vec<Message> {
    let lead = history.iter().take_while(|m| m.role == "system").count();
    let system: Vec<&str> = instructions
        .into_iter()
        .chain(history[..lead].iter().map(|m| m.content.as_str()))
        .filter(|s| !s.is_empty())
        .collect();
    let mut out = Vec::with_capacity(history.len() + 1);
    if !system.is_empty() {
        out.push(Message::new("system", &system.join("\n\n")));
    }
    out.extend(history[lead..].iter().cloned());
    out
}

/// Function tools in the template's shape (`{"type": "function", "function": {...}}`), and
/// as the request gave them (what the response repeats). Tools of other types (OpenAI's hosted
/// `web_search`, `file_search`, Codex's `local_shell`, `custom`) are left out: nothing here
/// runs them, and refusing them would fail an agent's every request.
fn function_tools(tools: &[Value]) -> Result<(Vec<Value>, Vec<Value>), ApiError> {
    let mut template = Vec::new();
    let mut given = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            continue;
        }
        let Some(name) = t.get("name").and_then(Value::as_str) else {
            return Err(invalid(
                "tools",
                format!("tools[{i}] is not {{\"type\": \"function\", \"name\": ..., \"parameters\": {{...}}}} (the Responses API names a function at the top, not in `function`)"),
            ));
        };
        let mut f = json!({
            "name": name,
            "parameters": t.get("parameters").filter(|p| !p.is_null()).cloned()
                .unwrap_or(json!({"type": "object", "properties": {}})),
        });
        if let Some(d) = t.get("description").and_then(Value::as_str) {
            f["description"] = json!(d);
        }
        template.push(json!({"type": "function", "function": f}));
        given.push(t.clone());
    }
    Ok((template, given))
}

/// `reasoning.effort` as the template's `enable_thinking`: `none` off, any other effort on,
/// none given the template's default.
fn thinking(reasoning: Option<&Value>) -> Result<Option<bool>, ApiError> {
    let effort = match reasoning {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(r)) => r.get("effort"),
        Some(v) => {
            return Err(invalid(
                "reasoning",
                format!("reasoning {v} is not an object such as {{\"effort\": \"medium\"}}"),
            ))
        }
    };
    match effort.map(|e| (e, e.as_str())) {
        None | Some((Value::Null, _)) => Ok(None),
        Some((_, Some("none"))) => Ok(Some(false)),
        Some((_, Some("minimal" | "low" | "medium" | "high" | "xhigh"))) => Ok(Some(true)),
        Some((e, _)) => Err(invalid(
            "reasoning",
            format!("reasoning.effort {e} is not one of none, minimal, low, medium, high, xhigh"),
        )),
    }
}

/// Parses and checks a `/v1/responses` body; `previous` gives the stored conversation of a
/// response id (`None`: unknown, or not stored).
pub fn parse_responses(
    body: &[u8],
    limits: &Limits,
    pack: PackTraits,
    previous: &dyn Fn(&str) -> Option<Arc<Vec<Message>>>,
) -> Result<ResponsesRequest, ApiError> {
    let b: Body = parse_json(body)?;
    if b.background == Some(true) {
        return Err(invalid(
            "background",
            "background responses are not supported: send the request without `background`, and it is answered now",
        ));
    }
    if b.conversation.as_ref().is_some_and(|c| !c.is_null()) {
        return Err(invalid(
            "conversation",
            "conversation objects are not supported: continue a response with previous_response_id, or send the whole conversation in input",
        ));
    }
    let mut history = Vec::new();
    if let Some(id) = &b.previous_response_id {
        match previous(id) {
            Some(before) => history.extend(before.iter().cloned()),
            None => {
                return Err(invalid(
                    "previous_response_id",
                    format!("Previous response with id {id:?} not found: it was never stored here (store: false), was dropped from the server's store, or the server restarted; send the whole conversation in input"),
                )
                .status(404)
                .with_code("previous_response_not_found"))
            }
        }
    }
    match &b.input {
        Input::Text(t) => history.push(Message::new("user", t)),
        Input::Items(items) => convert_items(items, "input", &mut history)?,
    }
    if history.is_empty() {
        return Err(invalid("input", "input is empty: send at least one item"));
    }
    let (tools, given_tools) = function_tools(b.tools.as_deref().unwrap_or_default())?;
    let parse_tools = parses_tools(
        &tools,
        b.tool_choice.as_ref(),
        r#"{"type": "function", "name": ...}"#,
    )?;
    let enable_thinking = thinking(b.reasoning.as_ref())?;
    if b.metadata
        .as_ref()
        .is_some_and(|m| !m.is_object() && !m.is_null())
    {
        return Err(invalid("metadata", "metadata must be an object of strings"));
    }
    // Agents send a fixed budget: the server's limit caps it, as the context caps every answer.
    // Without one the answer may run to that limit (OpenAI's has none but the context's): Codex
    // sends none, and takes an answer cut short (`incomplete`) as a failed turn.
    let max_output_tokens = b.max_output_tokens.map(|n| n.min(limits.max_tokens as u64));
    let limits = Limits {
        default_max_tokens: limits.max_tokens,
        ..*limits
    };
    let request = sampling(
        b.temperature,
        b.top_p,
        (max_output_tokens, "max_output_tokens"),
        None,
        &limits,
    )?;
    let store = b.store.unwrap_or(true);
    let prompt = prompt_messages(b.instructions.as_deref(), &history);
    let echo = json!({
        "instructions": b.instructions,
        "max_output_tokens": b.max_output_tokens,
        "metadata": b.metadata.clone().filter(|m| !m.is_null()).unwrap_or(json!({})),
        "parallel_tool_calls": b.parallel_tool_calls.unwrap_or(true),
        "previous_response_id": b.previous_response_id,
        "reasoning": b.reasoning.clone().filter(|r| !r.is_null())
            .unwrap_or(json!({"effort": null, "summary": null})),
        "store": store,
        "temperature": request.sampler.temperature,
        "text": {"format": {"type": "text"}},
        "tool_choice": b.tool_choice.clone().unwrap_or(json!("auto")),
        "tools": given_tools,
        "top_p": request.sampler.top_p,
        "truncation": "disabled",
    });
    let Value::Object(echo) = echo else {
        unreachable!("a JSON object literal")
    };
    Ok(ResponsesRequest {
        parsed: Parsed {
            prompt: Prompt::Chat(prompt),
            request,
            model: b.model,
            stream: b.stream.unwrap_or(false),
            include_usage: false,
            render: pack.render(tools, enable_thinking),
            parse_tools,
        },
        history,
        store,
        echo,
    })
}

/// `usage`: the prompt's tokens (`cached_tokens` of them from the KV cache) and the answer's.
/// flashpack keeps every prompt without being asked, so nothing counts as a cache write; a
/// harmony model's reasoning is not in the answer, so none counts as reasoning.
fn usage(c: &Completion) -> Value {
    json!({
        "input_tokens": c.prompt_tokens,
        "input_tokens_details": {"cached_tokens": c.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": c.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": c.prompt_tokens + c.completion_tokens,
    })
}

/// The message item being streamed: its id and its text so far.
#[derive(Debug)]
struct OpenText {
    id: String,
    text: String,
}

/// Builds the response object or the stream events of one request; stores the response's
/// conversation when it ends, if asked to.
#[derive(Debug)]
pub struct ResponsesResponder {
    pub id: String,
    created_at: u64,
    model: String,
    echo: Map<String, Value>,
    scan: ToolScan,
    /// The next event's `sequence_number`.
    sequence: u64,
    /// Output items finished so far.
    items: Vec<Value>,
    open: Option<OpenText>,
    /// The store and the conversation before the output, when the response is kept.
    keep: Option<(Arc<ResponseStore>, Vec<Message>)>,
}

impl ResponsesResponder {
    /// `format`: how the model writes calls (read only when the request gave tools and
    /// `tool_choice` is not `none`).
    pub fn new(
        n: u64,
        model: &str,
        req: ResponsesRequest,
        format: ToolFormat,
        store: &Arc<ResponseStore>,
    ) -> ResponsesResponder {
        let created_at = super::openai::now_s();
        let format = if req.parsed.parse_tools {
            format
        } else {
            ToolFormat::None
        };
        ResponsesResponder {
            id: format!("resp_{created_at:x}{n:06x}"),
            created_at,
            model: model.to_string(),
            echo: req.echo,
            scan: ToolScan::new(format, req.parsed.render.tools.unwrap_or_default()),
            sequence: 0,
            items: Vec::new(),
            open: None,
            keep: req.store.then(|| (store.clone(), req.history)),
        }
    }

    /// An output item's id (`prefix` `msg`, `fc` or `call`): the response's and its index.
    fn item_id(&self, prefix: &str, index: usize) -> String {
        format!("{prefix}_{}{index:02}", &self.id["resp_".len()..])
    }

    fn event(&mut self, kind: &'static str, mut v: Value) -> NamedEvent {
        v["type"] = json!(kind);
        v["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        (kind, v)
    }

    /// The response object with the output so far.
    fn object(&self, status: &str, usage: Value) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": null,
            "incomplete_details": if status == "incomplete" {
                json!({"reason": "max_output_tokens"})
            } else {
                Value::Null
            },
            "model": self.model,
            "output": self.items,
            "usage": usage,
        });
        for (k, e) in &self.echo {
            v[k] = e.clone();
        }
        v
    }

    /// The stream's opening events: `response.created` and `response.in_progress`.
    pub fn start(&mut self) -> Vec<NamedEvent> {
        let r = self.object("in_progress", Value::Null);
        vec![
            self.event("response.created", json!({"response": r.clone()})),
            self.event("response.in_progress", json!({"response": r})),
        ]
    }

    /// Events for a piece of the answer (a harmony model's reasoning is not sent).
    pub fn piece(&mut self, p: &Piece) -> Vec<NamedEvent> {
        let outs = self.scan.push(&p.text);
        self.events(outs)
    }

    fn events(&mut self, outs: Vec<Out>) -> Vec<NamedEvent> {
        let mut ev = Vec::new();
        for o in outs {
            match o {
                Out::Text(t) => self.text(&t, &mut ev),
                Out::Call(call) => self.call(&call, &mut ev),
            }
        }
        ev
    }

    fn text(&mut self, t: &str, ev: &mut Vec<NamedEvent>) {
        let index = self.items.len();
        let id = match &mut self.open {
            Some(open) => {
                open.text.push_str(t);
                open.id.clone()
            }
            None => {
                let id = self.item_id("msg", index);
                self.open = Some(OpenText {
                    id: id.clone(),
                    text: t.to_string(),
                });
                let item = json!({"id": id, "type": "message", "status": "in_progress",
                                  "role": "assistant", "content": []});
                let e = self.event(
                    "response.output_item.added",
                    json!({"output_index": index, "item": item}),
                );
                ev.push(e);
                let e = self.event(
                    "response.content_part.added",
                    json!({"item_id": id, "output_index": index, "content_index": 0,
                           "part": {"type": "output_text", "text": "", "annotations": []}}),
                );
                ev.push(e);
                id
            }
        };
        if !t.is_empty() {
            let e = self.event(
                "response.output_text.delta",
                json!({"item_id": id, "output_index": index, "content_index": 0,
                       "delta": t, "logprobs": []}),
            );
            ev.push(e);
        }
    }

    /// Ends the open message item with `status`.
    fn close(&mut self, status: &str, ev: &mut Vec<NamedEvent>) {
        let Some(open) = self.open.take() else {
            return;
        };
        let index = self.items.len();
        let part = json!({"type": "output_text", "text": open.text, "annotations": []});
        let e = self.event(
            "response.output_text.done",
            json!({"item_id": open.id, "output_index": index, "content_index": 0,
                   "text": open.text, "logprobs": []}),
        );
        ev.push(e);
        let e = self.event(
            "response.content_part.done",
            json!({"item_id": open.id, "output_index": index, "content_index": 0,
                   "part": part}),
        );
        ev.push(e);
        let item = json!({"id": open.id, "type": "message", "status": status,
                          "role": "assistant", "content": [part]});
        let e = self.event(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
        ev.push(e);
        self.items.push(item);
    }

    /// A call, sent once whole (as the chat endpoints send calls, decision 0028): the item,
    /// its arguments as one delta, their end, the item done.
    fn call(&mut self, call: &ToolCall, ev: &mut Vec<NamedEvent>) {
        self.close("completed", ev);
        let index = self.items.len();
        let id = self.item_id("fc", index);
        let arguments = call.arguments.to_string();
        let mut item = json!({"id": id, "type": "function_call", "status": "in_progress",
                              "call_id": self.item_id("call", index), "name": call.name,
                              "arguments": ""});
        let e = self.event(
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        );
        ev.push(e);
        let e = self.event(
            "response.function_call_arguments.delta",
            json!({"item_id": id, "output_index": index, "delta": arguments}),
        );
        ev.push(e);
        let e = self.event(
            "response.function_call_arguments.done",
            json!({"item_id": id, "output_index": index, "name": call.name,
                   "arguments": arguments}),
        );
        ev.push(e);
        item["status"] = json!("completed");
        item["arguments"] = json!(arguments);
        let e = self.event(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
        ev.push(e);
        self.items.push(item);
    }

    /// The closing events: what the scan held, the open message's end, then
    /// `response.completed` (or `response.incomplete`, cut at `max_output_tokens`) with the
    /// whole response; the conversation is stored if asked.
    pub fn end(&mut self, c: &Completion) -> Vec<NamedEvent> {
        let held = self.scan.finish();
        let mut ev = self.events(held);
        if self.items.is_empty() && self.open.is_none() {
            self.text("", &mut ev);
        }
        let status = match c.finish {
            Finish::Length => "incomplete",
            Finish::Stop | Finish::Cancelled => "completed",
        };
        self.close(status, &mut ev);
        let response = self.object(status, usage(c));
        if let Some((store, mut conversation)) = self.keep.take() {
            // The output as the items a client would send back, so a follow-up by id renders
            // as the whole conversation would.
            if convert_items(&self.items, "output", &mut conversation).is_ok() {
                store.put(&self.id, conversation);
            }
        }
        let kind = if status == "incomplete" {
            "response.incomplete"
        } else {
            "response.completed"
        };
        ev.push(self.event(kind, json!({"response": response})));
        ev
    }

    /// The whole response of a request that did not stream (the stream's events, unsent).
    pub fn full(&mut self, c: &Completion) -> Value {
        let outs = self.scan.push(&c.text);
        self.events(outs);
        self.end(c)
            .pop()
            .map_or(Value::Null, |(_, mut v)| v["response"].take())
    }

    /// A failure after the stream started: an `error` event, then `response.failed`.
    pub fn error(&mut self, e: &ApiError) -> Vec<NamedEvent> {
        let error = self.event(
            "error",
            json!({"code": e.code.unwrap_or(e.kind), "message": e.message, "param": e.param}),
        );
        let mut r = self.object("failed", Value::Null);
        r["error"] = json!({"code": "server_error", "message": e.message});
        vec![error, self.event("response.failed", json!({"response": r}))]
    }
}

#[cfg(test)]
mod tests;
