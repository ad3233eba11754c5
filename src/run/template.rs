//! Chat templates: a conversation becomes prompt text through the pack's Hugging Face template
//! (minijinja), or a plain transcript for packs that carry none.
//!
//! In: messages (role, content) and the pack's special tokens. Out: the prompt text, ending with
//! the assistant's turn when `add_generation_prompt` is set.
//! Invariant: rendering the conversation so far and then the same conversation with one more
//! turn gives texts that share the first as a prefix wherever the template allows it, which is
//! what lets the KV cache be reused across turns (prefix reuse, `generate.rs`).
//!
//! The environment is the one transformers renders with (`apply_chat_template`,
//! utils/chat_template_utils.py `_compile_jinja_template`): `trim_blocks` and `lstrip_blocks`,
//! `raise_exception(msg)`, `strftime_now(format)` (local time, C `strftime`), and a `tojson`
//! that writes what Python's `json.dumps` writes (`", "` and `": "` separators, no HTML
//! escaping, non-ASCII kept); Python's string and dict methods (`.items()`, `.startswith()`,
//! `.strip()`, ...) come from minijinja-contrib's `pycompat`. gpt-oss's harmony template
//! (fixtures/templates/) needs all of these.

use minijinja::value::{Kwargs, Value};
use minijinja::{Error, ErrorKind};

use crate::format::Pack;

/// One message of a conversation, as Hugging Face templates read it: `role` and `content`,
/// and for tool use (absent otherwise, so a template's `message.tool_calls is defined` is false)
/// an assistant's `tool_calls` (`[{"id", "type": "function", "function": {"name",
/// "arguments"}}]`, the arguments an object where they are one: GLM's and Qwen3-Coder's
/// templates iterate them) and a tool result's `tool_call_id` and `name`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
            ..Message::default()
        }
    }
}

/// What a template is rendered with beyond the messages: the tools a model may call (OpenAI's
/// `[{"type": "function", "function": {"name", "description", "parameters"}}]`, the shape
/// transformers passes as `tools`), and the reasoning switch (`enable_thinking`, Qwen3's and
/// GLM's name for it), passed only when set, since templates test `enable_thinking is defined`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RenderOptions {
    pub tools: Option<Vec<serde_json::Value>>,
    pub enable_thinking: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    #[error("the pack's chat template does not parse; use --raw")]
    Parse(#[source] minijinja::Error),
    #[error("the pack's chat template failed to render; use --raw")]
    Render(#[source] minijinja::Error),
}

/// For packs without a chat template (base models such as the bundled tiny one): a transcript
/// of `User:` / `Assistant:` lines after the system text, ending with `Assistant:`. An answer is
/// rendered trimmed after `Assistant: `, which is the text the model generated after
/// `Assistant:` (its first token carries the space), so the next turn's prompt starts with the
/// tokens already in the KV cache.
/// [`PLAIN_STOP`] ends an answer where the model starts the user's next line. Tools, an
/// answer's tool calls and tool results get a line each (`Tools: a b`, `[call NAME {...}]`,
/// `Tool result: ...`), so a conversation with tools still shows the model what happened.
pub const PLAIN_TEMPLATE: &str = "{% if tools %}Tools:{% for t in tools %} \
{{ t.function.name }}{% endfor %}{{ '\\n\\n' }}{% endif %}{% for m in messages %}\
{% if m.role == 'system' %}{{ m.content }}\n\n\
{% elif m.role == 'user' %}User: {{ m.content }}\n\
{% elif m.role == 'tool' %}Tool result: {{ m.content }}\n\
{% else %}Assistant: {{ m.content | trim }}\
{% for c in m.tool_calls or [] %}{% if m.content | trim or not loop.first %} {% endif %}\
[call {{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}{{ '\\n' }}\
{% endif %}\
{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}";

/// The stop string that goes with [`PLAIN_TEMPLATE`].
pub const PLAIN_STOP: &str = "\nUser:";

/// A pack's chat template (or [`PLAIN_TEMPLATE`]) with the special tokens it may use.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    plain: bool,
    bos: String,
    eos: String,
    /// `strftime_now`'s time, seconds since the epoch in UTC; `None`: now, local time.
    fixed_time: Option<i64>,
}

impl ChatTemplate {
    /// The pack's own template; `None` if it has none.
    pub fn of_pack(pack: &Pack) -> Option<ChatTemplate> {
        let source = crate::run::open::chat_template(pack)?;
        Some(ChatTemplate::new(source, false, pack))
    }

    /// The pack's template, else the plain transcript.
    pub fn of_pack_or_plain(pack: &Pack) -> ChatTemplate {
        ChatTemplate::of_pack(pack)
            .unwrap_or_else(|| ChatTemplate::new(PLAIN_TEMPLATE.into(), true, pack))
    }

    fn new(source: String, plain: bool, pack: &Pack) -> ChatTemplate {
        let token = |key: &str| pack.meta().special_token(key).unwrap_or("").to_string();
        ChatTemplate {
            source,
            plain,
            bos: token("bos_token"),
            eos: token("eos_token"),
            fixed_time: None,
        }
    }

    /// `source` with the given special tokens (a template read from elsewhere than a pack).
    pub fn from_source(source: &str, bos: &str, eos: &str) -> ChatTemplate {
        ChatTemplate {
            source: source.to_string(),
            plain: false,
            bos: bos.to_string(),
            eos: eos.to_string(),
            fixed_time: None,
        }
    }

    /// The same template with `strftime_now` reading this time (seconds since the epoch, in
    /// UTC) instead of the clock: for reproducible prompts and tests.
    pub fn at_time(self, unix_seconds: i64) -> ChatTemplate {
        ChatTemplate {
            fixed_time: Some(unix_seconds),
            ..self
        }
    }

    /// Whether the template writes OpenAI's harmony format (gpt-oss): messages framed by
    /// `<|start|>` and `<|message|>` with a `<|channel|>`; the answer then comes in channels
    /// (`harmony.rs`).
    pub fn is_harmony(&self) -> bool {
        !self.plain
            && ["<|start|>", "<|channel|>", "<|message|>"]
                .iter()
                .all(|t| self.source.contains(t))
    }

    /// Whether this is the plain transcript (the pack has no template).
    pub fn is_plain(&self) -> bool {
        self.plain
    }

    /// Stop strings an answer needs beyond the model's end-of-sequence tokens.
    pub fn stops(&self) -> Vec<String> {
        if self.plain {
            vec![PLAIN_STOP.to_string()]
        } else {
            Vec::new()
        }
    }

    /// Whether the template has a reasoning switch (`enable_thinking`: Qwen3, GLM-4.5).
    pub fn has_thinking_switch(&self) -> bool {
        !self.plain && self.source.contains("enable_thinking")
    }

    /// The template's text (the plain transcript's for a pack without one).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The prompt text for `messages`, ending with the assistant's turn.
    pub fn render(&self, messages: &[Message]) -> Result<String, TemplateError> {
        self.render_with(messages, &RenderOptions::default())
    }

    /// [`ChatTemplate::render`] with tools and the reasoning switch.
    pub fn render_with(
        &self,
        messages: &[Message],
        opts: &RenderOptions,
    ) -> Result<String, TemplateError> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        let fixed = self.fixed_time;
        env.add_function("strftime_now", move |format: &str| {
            strftime_now(format, fixed)
        });
        env.add_filter("tojson", tojson);
        env.add_template("chat", &self.source)
            .map_err(TemplateError::Parse)?;
        let mut ctx = std::collections::BTreeMap::new();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(true));
        ctx.insert("bos_token", Value::from(self.bos.as_str()));
        ctx.insert("eos_token", Value::from(self.eos.as_str()));
        if let Some(tools) = opts.tools.as_ref().filter(|t| !t.is_empty()) {
            ctx.insert("tools", Value::from_serialize(tools));
        }
        if let Some(on) = opts.enable_thinking {
            ctx.insert("enable_thinking", Value::from(on));
        }
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(TemplateError::Render)
    }
}

/// `raise_exception(message)`: the template refuses the conversation.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: `datetime.now().strftime(format)`, through the C library's
/// `strftime` as Python's goes (in the "C" locale: flashpack never sets another); `fixed`
/// formats that time in UTC instead.
fn strftime_now(format: &str, fixed: Option<i64>) -> Result<String, Error> {
    let bad = |what: &str| Error::new(ErrorKind::InvalidOperation, format!("strftime_now: {what}"));
    let fmt = std::ffi::CString::new(format).map_err(|_| bad("a NUL in the format"))?;
    // SAFETY: `tm` is plain data that `localtime_r` / `gmtime_r` fill in (they return NULL,
    // checked, when they cannot); `strftime` writes at most `buf.len()` bytes into `buf` and
    // returns how many, reading the NUL-terminated `fmt` and the filled `tm`.
    unsafe {
        let now = fixed.unwrap_or_else(|| libc::time(std::ptr::null_mut()) as i64) as libc::time_t;
        let mut tm: libc::tm = std::mem::zeroed();
        let filled = match fixed {
            Some(_) => libc::gmtime_r(&now, &mut tm),
            None => libc::localtime_r(&now, &mut tm),
        };
        if filled.is_null() {
            return Err(bad("the clock is out of range"));
        }
        let mut buf = vec![0u8; 256 + 8 * format.len()];
        let n = libc::strftime(buf.as_mut_ptr().cast(), buf.len(), fmt.as_ptr(), &tm);
        if n == 0 && !format.is_empty() {
            return Err(bad("the formatted date is too long or empty"));
        }
        buf.truncate(n);
        String::from_utf8(buf).map_err(|_| bad("the formatted date is not UTF-8"))
    }
}

/// transformers' `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)` with Python's default separators (`", "`,
/// `": "`; `","` and `": "` with an indent). Custom separators and `sort_keys` are refused
/// rather than ignored.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // Non-ASCII is always kept, as with transformers' default ensure_ascii=False.
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    // Serialized straight from the value, so maps keep their order as Python's dicts do.
    let json = value;
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let f = serde_json::ser::PrettyFormatter::with_indent(&pad);
            let mut ser = serde_json::Serializer::with_formatter(&mut out, f);
            serde::Serialize::serialize(&json, &mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonJson);
            serde::Serialize::serialize(&json, &mut ser)
        }
    };
    written.map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from(String::from_utf8_lossy(&out).into_owned()))
}

/// `json.dumps`'s one-line layout: `", "` between items, `": "` after keys.
struct PythonJson;

impl serde_json::ser::Formatter for PythonJson {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain() -> ChatTemplate {
        ChatTemplate {
            source: PLAIN_TEMPLATE.into(),
            plain: true,
            bos: String::new(),
            eos: String::new(),
            fixed_time: None,
        }
    }

    #[test]
    fn the_plain_transcript_renders_turns_and_each_turn_extends_the_last() {
        let t = plain();
        let one = [
            Message::new("system", "Be brief."),
            Message::new("user", "Hi"),
        ];
        let first = t.render(&one).unwrap();
        assert_eq!(first, "Be brief.\n\nUser: Hi\nAssistant:");
        let two = [
            one[0].clone(),
            one[1].clone(),
            Message::new("assistant", " Hello."),
            Message::new("user", "Bye"),
        ];
        let second = t.render(&two).unwrap();
        assert!(second.starts_with(&first), "{second:?}");
        assert!(
            second.ends_with("Assistant: Hello.\nUser: Bye\nAssistant:"),
            "{second:?}"
        );
        assert_eq!(t.stops(), vec!["\nUser:".to_string()]);
    }

    /// gpt-oss's harmony template (fixtures/templates/gpt-oss-chat_template.jinja) renders as
    /// transformers renders it (the expected texts are jinja2's, with transformers' settings):
    /// the system message with today's date, the first message as the developer's
    /// instructions, and after an answer the next turn's prompt extends the first (the
    /// answer's reasoning is not rendered back).
    #[test]
    fn the_gpt_oss_harmony_template_renders_as_transformers_does() {
        let source = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/templates/gpt-oss-chat_template.jinja"
        ))
        .unwrap();
        // 2026-11-30 12:00 UTC.
        let t = ChatTemplate::from_source(&source, "<|startoftext|>", "<|return|>")
            .at_time(1_796_040_000);
        assert!(t.is_harmony() && !plain().is_harmony());
        let system = "<|start|>system<|message|>You are ChatGPT, a large language model trained \
                      by OpenAI.\nKnowledge cutoff: 2024-06\nCurrent date: 2026-11-30\n\n\
                      Reasoning: medium\n\n# Valid channels: analysis, commentary, final. \
                      Channel must be included for every message.<|end|>";
        let one = [
            Message::new("system", "Be brief."),
            Message::new("user", "Hi"),
        ];
        let first = t.render(&one).unwrap();
        assert_eq!(
            first,
            format!(
                "{system}<|start|>developer<|message|># Instructions\n\nBe brief.\n\n<|end|>\
                 <|start|>user<|message|>Hi<|end|><|start|>assistant"
            )
        );
        let two = [
            one[0].clone(),
            one[1].clone(),
            Message::new("assistant", "Hello!"),
            Message::new("user", "Bye"),
        ];
        let second = t.render(&two).unwrap();
        assert_eq!(
            second,
            format!(
                "{first}<|channel|>final<|message|>Hello!<|end|><|start|>user<|message|>Bye\
                 <|end|><|start|>assistant"
            )
        );
        // Without a system message there is no developer message.
        assert_eq!(
            t.render(&[Message::new("user", "Hi")]).unwrap(),
            format!("{system}<|start|>user<|message|>Hi<|end|><|start|>assistant")
        );
        // The template refuses channel tags in an answer (raise_exception).
        let tagged = [
            Message::new("user", "Hi"),
            Message::new("assistant", "<|channel|>final<|message|>x"),
            Message::new("user", "Hi"),
        ];
        let err = t.render(&tagged).unwrap_err();
        assert!(matches!(err, TemplateError::Render(_)), "{err}");
        // The clock: today's date in the local time zone.
        let now = ChatTemplate::from_source(&source, "", "")
            .render(&one)
            .unwrap();
        let date = now.split("Current date: ").nth(1).unwrap();
        assert!(date.as_bytes()[..10]
            .iter()
            .enumerate()
            .all(|(i, c)| if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }));
    }

    /// System, user, assistant, user: the conversation each model's format is checked on.
    fn four_turns() -> [Message; 4] {
        [
            Message::new("system", "Be brief."),
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello!"),
            Message::new("user", "Bye"),
        ]
    }

    fn fixture_template(name: &str) -> String {
        std::fs::read_to_string(format!(
            "{}/fixtures/templates/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    /// Renders `t` on the first two and on all four turns: the expected texts, and the first a
    /// prefix of the second (the KV cache carries over).
    fn check_turns(t: &ChatTemplate, first: &str, second: &str) {
        let turns = four_turns();
        assert_eq!(t.render(&turns[..2]).unwrap(), first);
        assert_eq!(t.render(&turns).unwrap(), second);
        assert!(second.starts_with(first));
    }

    /// Kimi K2's template (moonshotai/Kimi-K2-Instruct's `chat_template.jinja`, as llama.cpp keeps
    /// it; Kimi K2.5's frames turns alike): every turn `<|im_{role}|>{role}<|im_middle|>...<|im_end|>`,
    /// the prompt ending with the assistant's header. The expected texts are jinja2's with
    /// transformers' settings.
    #[test]
    fn kimi_k2_template_renders_as_transformers_does() {
        let t = ChatTemplate::from_source(
            &fixture_template("moonshotai-Kimi-K2-chat_template.jinja"),
            "[BOS]",
            "[EOS]",
        );
        let first = "<|im_system|>system<|im_middle|>Be brief.<|im_end|>\
                     <|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|>";
        check_turns(
            &t,
            first,
            &format!(
                "{first}Hello!<|im_end|><|im_user|>user<|im_middle|>Bye<|im_end|>\
                 <|im_assistant|>assistant<|im_middle|>"
            ),
        );
    }

    /// GLM-4.6's template (zai-org/GLM-4.6's `chat_template.jinja`, as llama.cpp keeps it; GLM-5's
    /// frames turns alike): `[gMASK]<sop>`, `<|{role}|>\n{text}`, an earlier answer with an empty
    /// reasoning block. The next turn's text does not extend the first (the answer is rendered
    /// back as `\n<think></think>\n{text}`), as upstream's does not.
    #[test]
    fn glm_template_renders_as_transformers_does() {
        let t = ChatTemplate::from_source(
            &fixture_template("zai-org-GLM-4.6-chat_template.jinja"),
            "",
            "",
        );
        let turns = four_turns();
        assert_eq!(
            t.render(&turns[..2]).unwrap(),
            "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>"
        );
        assert_eq!(
            t.render(&turns).unwrap(),
            "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\n<think></think>\nHello!\
             <|user|>\nBye<|assistant|>"
        );
    }

    /// DeepSeek-V3.2's built-in format (its repository ships Python, not a template): what
    /// `encode_messages(messages, thinking_mode="chat")` writes, per the format it documents.
    #[test]
    fn deepseek_v32_built_in_format_is_upstreams_chat_mode() {
        let source = crate::arch::Arch::DeepseekV32.def().chat_template.unwrap();
        // The pack's own tokens do not matter: the format writes its own BOS.
        let t = ChatTemplate::from_source(source, "", "");
        let first = "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜></think>";
        check_turns(
            &t,
            first,
            &format!("{first}Hello!<｜end▁of▁sentence｜><｜User｜>Bye<｜Assistant｜></think>"),
        );
        assert_eq!(
            t.render(&[Message::new("user", "Hi")]).unwrap(),
            "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>"
        );
        let err = t
            .render(&[Message::new("tool", "42"), Message::new("user", "Hi")])
            .unwrap_err();
        assert!(matches!(err, TemplateError::Render(_)), "{err}");
        assert!(format!("{:?}", err).contains("tool message"), "{err:?}");
        // Only DeepSeek-V3.2 has one, and DeepSeek-V4.1, whose chat mode is the same.
        use crate::arch::Arch;
        for arch in Arch::ALL {
            assert_eq!(
                arch.def().chat_template.is_some(),
                matches!(arch, Arch::DeepseekV32 | Arch::DeepseekV41),
                "{arch}"
            );
        }
        assert_eq!(
            Arch::DeepseekV41.def().chat_template,
            Arch::DeepseekV32.def().chat_template
        );
    }

    /// Qwen3's template (fixtures/templates/Qwen-Qwen3-chat_template.jinja) with tools, an
    /// answer's tool call, the tool's result and `enable_thinking` false renders as transformers
    /// renders it (the expected text is jinja2's with transformers' settings; the tools' keys in
    /// serde_json's sorted order, which is the order flashpack passes them in).
    #[test]
    fn qwen3_template_renders_tools_calls_results_and_the_thinking_switch() {
        let t =
            ChatTemplate::from_source(&fixture_template("Qwen-Qwen3-chat_template.jinja"), "", "");
        assert!(t.has_thinking_switch() && !plain().has_thinking_switch());
        let tools = vec![serde_json::json!({"type": "function", "function": {
            "name": "get_weather", "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        }})];
        let mut call = Message::new("assistant", "");
        call.tool_calls = Some(vec![serde_json::json!({"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}})]);
        let mut result = Message::new("tool", "20 C");
        result.tool_call_id = Some("call_1".into());
        let messages = [
            Message::new("system", "Be brief."),
            Message::new("user", "Weather in Zürich?"),
            call,
            result,
        ];
        let opts = RenderOptions {
            tools: Some(tools),
            enable_thinking: Some(false),
        };
        assert_eq!(t.render_with(&messages, &opts).unwrap(), EXPECTED);
        // Without options the template sees neither (`enable_thinking is defined` is false).
        assert!(t
            .render(&messages[..2])
            .unwrap()
            .ends_with("<|im_start|>assistant\n"));
        // The plain transcript shows tools, calls and results as lines.
        let plain_text = plain()
            .render_with(
                &messages,
                &RenderOptions {
                    tools: opts.tools.clone(),
                    enable_thinking: None,
                },
            )
            .unwrap();
        assert_eq!(
            plain_text,
            "Tools: get_weather\n\nBe brief.\n\nUser: Weather in Zürich?\nAssistant: \
             [call get_weather {\"city\": \"Zürich\"}]\nTool result: 20 C\nAssistant:"
        );
    }

    const EXPECTED: &str = "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{\"function\": {\"description\": \"Weather\", \"name\": \"get_weather\", \"parameters\": {\"properties\": {\"city\": {\"type\": \"string\"}}, \"type\": \"object\"}}, \"type\": \"function\"}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWeather in Zürich?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n20 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n";

    /// `tojson` writes what Python's `json.dumps` writes; `.items()` works on mappings.
    #[test]
    fn tojson_and_dict_methods_follow_python() {
        let t = ChatTemplate::from_source(
            "{% for m in messages %}{{ m | tojson }}{% for k, v in m.items() %}|{{ k }}{% endfor %}\
             {{ m.content.startswith('é') }}{% endfor %}",
            "",
            "",
        );
        let out = t.render(&[Message::new("user", "é <b>\"x\"")]).unwrap();
        assert_eq!(
            out,
            "{\"role\": \"user\", \"content\": \"é <b>\\\"x\\\"\"}|role|contentTrue"
        );
    }

    #[test]
    fn a_broken_template_is_an_error_that_names_it() {
        let t = ChatTemplate {
            source: "{% for m in messages %}".into(),
            plain: false,
            bos: String::new(),
            eos: String::new(),
            fixed_time: None,
        };
        let err = t.render(&[Message::new("user", "x")]).unwrap_err();
        assert!(matches!(err, TemplateError::Parse(_)), "{err}");
    }
}
