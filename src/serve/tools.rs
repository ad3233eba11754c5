//! Tool calls in a model's output: generated text -> text and calls, one format per family.
//!
//! In: the answer's text as it streams (pieces), and the pack's [`ToolFormat`], chosen once
//! from its chat template's markers and its model type ([`ToolFormat::detect`]). Out: [`Out`]s
//! in order: text to show, and [`ToolCall`]s (a name and its arguments as a JSON object).
//! Invariant: no text is lost and nothing panics: text that may begin a call is held back until
//! it cannot, a call region that does not parse is given out as the text it was, and a call
//! left open when generation ends is a call only if what came parses. Whitespace after a call
//! is dropped (the templates write a newline between calls). The OpenAI and Anthropic endpoints
//! share this module (docs/decisions/0028-agent-apis-and-tool-calls.md).
//!
//! The formats, as each family's template writes an earlier call back (and so as the model
//! writes one):
//! - Qwen3 (and Qwen2.5, Hermes): `<tool_call>\n{"name": N, "arguments": {...}}\n</tool_call>`.
//! - Qwen3-Coder / Qwen3.5 / Qwen3-Next: `<tool_call>\n<function=N>\n<parameter=P>\nV\n</parameter>\n
//!   </function>\n</tool_call>`, a value raw where the tool's schema says string, else JSON.
//! - GLM-4.5/4.6/4.7, GLM-5: `<tool_call>N\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>\n...
//!   </tool_call>`, a value raw where the schema says string, else JSON where it parses.
//! - DeepSeek-V3/R1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>N\n```json\n
//!   {...}\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`; V3.1: `<｜tool▁call▁begin｜>N<｜tool▁sep｜>{...}
//!   <｜tool▁call▁end｜>`.
//! - Kimi-K2: `<|tool_calls_section_begin|><|tool_call_begin|>functions.N:0<|tool_call_argument_begin|>
//!   {...}<|tool_call_end|>...<|tool_calls_section_end|>`.
//! - gpt-oss (harmony): a message to a function, `<|start|>assistant<|channel|>commentary
//!   to=functions.N <|constrain|>json<|message|>{...}<|call|>`, which `run/harmony.rs` passes
//!   through as answer text framed so.

use serde_json::{Map, Value};

/// How a family writes tool calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    /// No known format: the output is text.
    None,
    /// Qwen3 / Hermes: JSON in `<tool_call>`.
    QwenJson,
    /// Qwen3-Coder / Qwen3.5: `<function=N><parameter=P>` in `<tool_call>`.
    QwenXml,
    /// GLM-4.5 and later: `<arg_key>` / `<arg_value>` in `<tool_call>`.
    Glm,
    /// DeepSeek-V3.x's tool-call tokens.
    DeepSeek,
    /// Kimi-K2's tool-call section.
    Kimi,
    /// gpt-oss: harmony messages to `functions.*`.
    Harmony,
}

/// A parsed call.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// Always a JSON object.
    pub arguments: Value,
}

/// What the scan gives out, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Out {
    Text(String),
    Call(ToolCall),
}

const DS_CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
const DS_CALLS_END: &str = "<｜tool▁calls▁end｜>";
const DS_CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
const DS_CALL_END: &str = "<｜tool▁call▁end｜>";
const DS_SEP: &str = "<｜tool▁sep｜>";
const KIMI_BEGIN: &str = "<|tool_calls_section_begin|>";
const KIMI_END: &str = "<|tool_calls_section_end|>";
const KIMI_CALL_BEGIN: &str = "<|tool_call_begin|>";
const KIMI_CALL_END: &str = "<|tool_call_end|>";
const KIMI_ARGS: &str = "<|tool_call_argument_begin|>";

impl ToolFormat {
    /// The format of a pack: the template's own markers first (what mlx-lm's
    /// `_infer_tool_parser` looks for), then the model type for templates that do not write
    /// calls back (llama.cpp's copy of Kimi-K2's) or packs without one.
    pub fn detect(model_type: &str, template: &str, harmony: bool) -> ToolFormat {
        if harmony {
            return ToolFormat::Harmony;
        }
        if template.contains("<arg_key>") {
            return ToolFormat::Glm;
        }
        if template.contains("<function=") {
            return ToolFormat::QwenXml;
        }
        if template.contains(KIMI_BEGIN) {
            return ToolFormat::Kimi;
        }
        if template.contains("tool▁calls▁begin") {
            return ToolFormat::DeepSeek;
        }
        if template.contains("<tool_call>") {
            return ToolFormat::QwenJson;
        }
        match model_type {
            "qwen3_moe" | "qwen2_moe" => ToolFormat::QwenJson,
            "qwen3_next" | "qwen3_5_moe" => ToolFormat::QwenXml,
            "glm4_moe" | "glm_moe_dsa" => ToolFormat::Glm,
            "kimi_k25" => ToolFormat::Kimi,
            // Kimi-K2 runs as deepseek_v3; its template frames turns with `<|im_...|>`.
            "deepseek_v3" if template.contains("<|im_") => ToolFormat::Kimi,
            "deepseek_v3" => ToolFormat::DeepSeek,
            "gpt_oss" => ToolFormat::Harmony,
            _ => ToolFormat::None,
        }
    }

    /// The marker that opens a call region, and the one that closes it.
    fn markers(self) -> Option<(&'static str, &'static str)> {
        match self {
            ToolFormat::None => None,
            ToolFormat::QwenJson | ToolFormat::QwenXml | ToolFormat::Glm => {
                Some(("<tool_call>", "</tool_call>"))
            }
            ToolFormat::DeepSeek => Some((DS_CALLS_BEGIN, DS_CALLS_END)),
            ToolFormat::Kimi => Some((KIMI_BEGIN, KIMI_END)),
            ToolFormat::Harmony => Some(("<|start|>assistant", "<|call|>")),
        }
    }

    /// The calls in one region (the text between the markers), or `None` when it is not a
    /// valid call of this format.
    fn parse_region(self, region: &str, tools: &[Value]) -> Option<Vec<ToolCall>> {
        let calls = match self {
            ToolFormat::None => return None,
            ToolFormat::QwenJson => vec![json_call(region)?],
            ToolFormat::QwenXml => vec![xml_call(region, tools)?],
            ToolFormat::Glm => vec![glm_call(region, tools)?],
            ToolFormat::DeepSeek => delimited(region, DS_CALL_BEGIN, DS_CALL_END, deepseek_call)?,
            ToolFormat::Kimi => delimited(region, KIMI_CALL_BEGIN, KIMI_CALL_END, kimi_call)?,
            ToolFormat::Harmony => vec![harmony_call(region)?],
        };
        Some(calls)
    }
}

/// Finds calls in streamed text.
#[derive(Clone, Debug)]
pub struct ToolScan {
    format: ToolFormat,
    /// The request's tools (OpenAI's shape), for the parameter types of XML formats.
    tools: Vec<Value>,
    /// Text not yet given out: a tail that may open a call, or an open call's region.
    held: String,
    in_call: bool,
    /// Whitespace after a call, given out only if text follows.
    after_call: Option<String>,
    /// Calls given out so far.
    pub calls: usize,
}

impl ToolScan {
    pub fn new(format: ToolFormat, tools: Vec<Value>) -> ToolScan {
        ToolScan {
            format,
            tools,
            held: String::new(),
            in_call: false,
            after_call: None,
            calls: 0,
        }
    }

    pub fn format(&self) -> ToolFormat {
        self.format
    }

    pub fn tools(&self) -> &[Value] {
        &self.tools
    }

    /// What of `text` is now certain.
    pub fn push(&mut self, text: &str) -> Vec<Out> {
        let mut out = Vec::new();
        let Some((open, close)) = self.format.markers() else {
            self.text(text.to_string(), &mut out);
            return out;
        };
        self.held.push_str(text);
        loop {
            if self.in_call {
                let Some(at) = self.held.find(close) else {
                    return out;
                };
                let region = self.held[..at].to_string();
                self.held.drain(..at + close.len());
                self.in_call = false;
                self.region(&region, open, close, &mut out);
            } else if let Some(at) = self.held.find(open) {
                let before = self.held[..at].to_string();
                self.held.drain(..at + open.len());
                self.text(before, &mut out);
                self.in_call = true;
            } else {
                let keep = prefix_tail(&self.held, open);
                let cut = self.held.len() - keep;
                let text: String = self.held.drain(..cut).collect();
                self.text(text, &mut out);
                return out;
            }
        }
    }

    /// The rest, once generation has ended: an open call that parses without its closing
    /// marker (a model stopped by its end-of-sequence token right after the call), else text.
    pub fn finish(&mut self) -> Vec<Out> {
        let mut out = Vec::new();
        let held = std::mem::take(&mut self.held);
        if self.in_call {
            self.in_call = false;
            let (open, _) = self.format.markers().unwrap_or(("", ""));
            match self.format.parse_region(&held, &self.tools) {
                Some(calls) => self.emit_calls(calls, &mut out),
                None => self.text(format!("{open}{held}"), &mut out),
            }
        } else {
            self.text(held, &mut out);
        }
        out
    }

    fn region(&mut self, region: &str, open: &str, close: &str, out: &mut Vec<Out>) {
        match self.format.parse_region(region, &self.tools) {
            Some(calls) => self.emit_calls(calls, out),
            None => self.text(format!("{open}{region}{close}"), out),
        }
    }

    fn emit_calls(&mut self, calls: Vec<ToolCall>, out: &mut Vec<Out>) {
        self.calls += calls.len();
        out.extend(calls.into_iter().map(Out::Call));
        self.after_call = Some(String::new());
    }

    fn text(&mut self, text: String, out: &mut Vec<Out>) {
        if text.is_empty() {
            return;
        }
        let text = match self.after_call.take() {
            Some(mut ws) => {
                ws.push_str(&text);
                if ws.trim().is_empty() {
                    self.after_call = Some(ws);
                    return;
                }
                ws
            }
            None => text,
        };
        match out.last_mut() {
            Some(Out::Text(t)) => t.push_str(&text),
            _ => out.push(Out::Text(text)),
        }
    }
}

/// The whole of a finished text, scanned at once.
pub fn parse(format: ToolFormat, tools: &[Value], text: &str) -> Vec<Out> {
    let mut scan = ToolScan::new(format, tools.to_vec());
    let mut out = scan.push(text);
    for o in scan.finish() {
        match (out.last_mut(), o) {
            (Some(Out::Text(t)), Out::Text(more)) => t.push_str(&more),
            (_, o) => out.push(o),
        }
    }
    out
}

/// Length of the longest tail of `text` that is a proper prefix of `marker`.
fn prefix_tail(text: &str, marker: &str) -> usize {
    (1..marker.len())
        .rev()
        .filter(|&n| marker.is_char_boundary(n))
        .find(|&n| text.ends_with(&marker[..n]))
        .unwrap_or(0)
}

/// A call's arguments: an object, or a string holding one (some models quote them); absent or
/// null is no arguments.
fn arguments(v: Option<&Value>) -> Option<Value> {
    match v {
        None | Some(Value::Null) => Some(Value::Object(Map::new())),
        Some(Value::Object(_)) => v.cloned(),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(o @ Value::Object(_)) => Some(o),
            _ => None,
        },
        Some(_) => None,
    }
}

fn call(name: &str, args: Value) -> Option<ToolCall> {
    let name = name.trim();
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
    valid.then(|| ToolCall {
        name: name.to_string(),
        arguments: args,
    })
}

/// Qwen3: `{"name": N, "arguments": {...}}`.
fn json_call(region: &str) -> Option<ToolCall> {
    let v: Value = serde_json::from_str(region.trim()).ok()?;
    let name = v.get("name")?.as_str()?;
    call(name, arguments(v.get("arguments").or(v.get("parameters")))?)
}

/// The JSON schema type a tool gives parameter `param` of `function` (`None`: not declared).
fn param_type<'a>(tools: &'a [Value], function: &str, param: &str) -> Option<&'a str> {
    tools
        .iter()
        .map(|t| t.get("function").unwrap_or(t))
        .find(|f| f.get("name").and_then(Value::as_str) == Some(function))?
        .pointer(&format!("/parameters/properties/{param}/type"))?
        .as_str()
}

/// A value a template wrote raw where its schema says string and as JSON otherwise: a string
/// where the schema says so, else its JSON where it parses, else the text.
fn typed_value(raw: &str, ty: Option<&str>, unknown_as_json: bool) -> Value {
    let json = || serde_json::from_str::<Value>(raw).ok();
    match ty {
        Some("string") => Value::String(raw.to_string()),
        Some(_) => json().unwrap_or_else(|| Value::String(raw.to_string())),
        None if unknown_as_json => json().unwrap_or_else(|| Value::String(raw.to_string())),
        None => Value::String(raw.to_string()),
    }
}

/// Qwen3-Coder: `<function=N>\n<parameter=P>\nV\n</parameter>\n</function>`.
fn xml_call(region: &str, tools: &[Value]) -> Option<ToolCall> {
    let body = region.trim().strip_prefix("<function=")?;
    let (name, rest) = body.split_once('>')?;
    let rest = rest.trim_end().strip_suffix("</function>")?;
    let mut args = Map::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let p = rest.strip_prefix("<parameter=")?;
        let (param, after) = p.split_once('>')?;
        let (value, after) = after.split_once("</parameter>")?;
        let value = value.strip_prefix('\n').unwrap_or(value);
        let value = value.strip_suffix('\n').unwrap_or(value);
        let ty = param_type(tools, name.trim(), param.trim());
        args.insert(param.trim().to_string(), typed_value(value, ty, false));
        rest = after.trim();
    }
    call(name, Value::Object(args))
}

/// GLM: `N\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>...`.
fn glm_call(region: &str, tools: &[Value]) -> Option<ToolCall> {
    let (name, mut rest) = match region.find("<arg_key>") {
        Some(at) => (region[..at].trim(), region[at..].trim()),
        None => (region.trim(), ""),
    };
    let mut args = Map::new();
    while !rest.is_empty() {
        let k = rest.strip_prefix("<arg_key>")?;
        let (key, after) = k.split_once("</arg_key>")?;
        let v = after.trim_start().strip_prefix("<arg_value>")?;
        let (value, after) = v.split_once("</arg_value>")?;
        let ty = param_type(tools, name, key.trim());
        args.insert(key.trim().to_string(), typed_value(value, ty, true));
        rest = after.trim();
    }
    call(name, Value::Object(args))
}

/// Calls each framed `begin ... end` in a region, nothing but whitespace between them; at
/// least one, the last possibly without its `end` (the region ended with generation).
fn delimited(
    region: &str,
    begin: &str,
    end: &str,
    one: fn(&str) -> Option<ToolCall>,
) -> Option<Vec<ToolCall>> {
    let mut calls = Vec::new();
    let mut rest = region.trim();
    while !rest.is_empty() {
        let body = rest.strip_prefix(begin)?;
        let (inner, after) = body.split_once(end).unwrap_or((body, ""));
        calls.push(one(inner)?);
        rest = after.trim();
    }
    (!calls.is_empty()).then_some(calls)
}

/// DeepSeek-V3: `function<｜tool▁sep｜>N\n```json\n{...}\n````; V3.1: `N<｜tool▁sep｜>{...}`.
fn deepseek_call(inner: &str) -> Option<ToolCall> {
    let (head, rest) = inner.split_once(DS_SEP)?;
    let (name, args) = if head.trim() == "function" {
        rest.split_once('\n')?
    } else {
        (head, rest)
    };
    let args = args.trim();
    let args = match args.strip_prefix("```json") {
        Some(fenced) => fenced.trim_end().strip_suffix("```")?,
        None => args,
    };
    let v: Value = serde_json::from_str(args.trim()).ok()?;
    call(name, arguments(Some(&v))?)
}

/// Kimi-K2: `functions.N:0<|tool_call_argument_begin|>{...}`.
fn kimi_call(inner: &str) -> Option<ToolCall> {
    let (id, args) = inner.split_once(KIMI_ARGS)?;
    let id = id.trim();
    let id = id.strip_prefix("functions.").unwrap_or(id);
    let (name, index) = id.rsplit_once(':')?;
    index.parse::<u32>().ok()?;
    let v: Value = serde_json::from_str(args.trim()).ok()?;
    call(name, arguments(Some(&v))?)
}

/// gpt-oss: `<|channel|>commentary to=functions.N <|constrain|>json<|message|>{...}` (the
/// recipient may come before the channel).
fn harmony_call(region: &str) -> Option<ToolCall> {
    let (header, body) = region.split_once("<|message|>")?;
    let after = header.split_once("to=functions.")?.1;
    let end = after
        .find(|c: char| c.is_whitespace() || c == '<')
        .unwrap_or(after.len());
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    call(&after[..end], arguments(Some(&v))?)
}

#[cfg(test)]
mod tests;
